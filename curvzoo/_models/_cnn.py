from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from .._dispatch._structures import Layered, param_layer, pool, structure
from .._kernels._ops import Elementwise, Linear
from .._kernels._precision import in_precision, parameter_dtype
from ._base import AbstractModel, precision_ops


_POOLS = {"max": eqx.nn.MaxPool2d, "avg": eqx.nn.AvgPool2d}


def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise ValueError(f"`{name}` must be an integer or a pair of integers, got {value!r}.")
    return (value[0], value[1])


class CNN(AbstractModel):
    """A small convolutional classifier: for each entry of `channels`, an unpadded
    ("valid") `equinox.nn.Conv2d`, `activation`, and a 2x2 pooling with stride 2 (floor);
    then a dense head (`equinox.nn.Linear`) on the flattened `(C, H, W)` features.

    With `image_size=28`, `channels=(8, 16)` and `kernel_size=3` the feature maps are
    26 -> 13 -> 11 -> 5, and the head sees `16 * 5 * 5 = 400` features.

    **Example:**

    ```python
    model = curvzoo.CNN(1, 10, image_size=28, key=jax.random.key(0))
    logits = model(image)           # image: (1, 28, 28) -> logits: (10,)
    ```
    """

    convs: tuple[eqx.nn.Conv2d, ...]
    pool: eqx.nn.MaxPool2d | eqx.nn.AvgPool2d
    head: eqx.nn.Linear
    activation: Callable[[Array], Array]
    in_channels: int = eqx.field(static=True)
    num_classes: int = eqx.field(static=True)
    image_size: tuple[int, int] = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int | tuple[int, int],
        channels: Sequence[int] = (8, 16),
        kernel_size: int = 3,
        activation: Callable[[Array], Array] = jax.nn.tanh,
        pool: str = "max",
        *,
        dtype=None,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `in_channels`: channels of the input image.
        - `num_classes`: the size of the output (logits).
        - `image_size`: the input's height and width, an integer or a pair.
        - `channels`: the output channels of each convolution (default `(8, 16)`).
        - `kernel_size`: the side of each square convolution kernel (default 3).
        - `activation`: an elementwise function after each convolution (default
            `jax.nn.tanh`).
        - `pool`: `"max"` (default) or `"avg"`, the 2x2 pooling after each activation.
        - `dtype`: the parameters' dtype; defaults to JAX's default float dtype.
        - `key`: a `jax.random.key` for the initialisation. (Keyword only.)
        """
        for name, value in (
            ("in_channels", in_channels),
            ("num_classes", num_classes),
            ("kernel_size", kernel_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
        channels = tuple(channels)
        if not channels or not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in channels
        ):
            raise ValueError(
                f"`channels` must be a non-empty sequence of integers >= 1, got {channels!r}."
            )
        if pool not in _POOLS:
            raise ValueError(f"`pool` must be one of {tuple(_POOLS)}, got {pool!r}.")
        if not callable(activation):
            raise TypeError(f"`activation` must be callable, got {activation!r}.")
        height, width = _pair(image_size, "image_size")
        size = (height, width)
        for _ in channels:
            size = tuple((s - kernel_size + 1) // 2 for s in size)
            if min(size) < 1:
                raise ValueError(
                    f"`image_size` {(height, width)} is too small for {len(channels)} "
                    f"convolutions of kernel {kernel_size} each followed by 2x2 pooling."
                )
        keys = jr.split(key, len(channels) + 1)
        sizes_in = (in_channels,) + channels[:-1]
        self.convs = tuple(
            eqx.nn.Conv2d(c_in, c_out, kernel_size, dtype=dtype, key=k)
            for c_in, c_out, k in zip(sizes_in, channels, keys[:-1])
        )
        self.pool = _POOLS[pool](kernel_size=2, stride=2)
        self.head = eqx.nn.Linear(
            channels[-1] * size[0] * size[1], num_classes, dtype=dtype, key=keys[-1]
        )
        self.activation = activation
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.image_size = (height, width)

    def __call__(self, x: Float[Array, "in_channels height width"]) -> Float[Array, " num_classes"]:
        """**Arguments:**

        - `x`: one image, shape `(in_channels, height, width)`; a float image of another
            dtype is cast to the parameters' (the model computes in its own precision).

        **Returns:**

        Logits, shape `(num_classes,)`.
        """
        expected = (self.in_channels, *self.image_size)
        if x.shape != expected:
            raise ValueError(
                f"CNN expects one image of shape {expected}, got {x.shape}; batch with `jax.vmap`."
            )
        x = in_precision(x, parameter_dtype(self.convs, self.head))
        for conv in self.convs:
            x = self.pool(self.activation(conv(x)))
        return self.head(x.reshape(-1))


@structure.register(CNN)
def _structure(model: CNN, example) -> Layered:
    ops = precision_ops(parameter_dtype(model.convs, model.head), example)
    for i in range(len(model.convs)):
        ops.append(param_layer(lambda m, i=i: m.convs[i], model, f"convs[{i}]"))
        ops.append(Elementwise(model.activation, "activation"))
        ops.append(pool(model.pool))
    ops.append(Linear(_flatten, "flatten", keeps_diagonal=True))
    ops.append(param_layer(lambda m: m.head, model, "head"))
    return Layered(tuple(ops))


def _flatten(x):
    return x.reshape(-1)
