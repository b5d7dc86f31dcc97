from collections.abc import Callable

import equinox as eqx
import jax
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from .._dispatch._structures import Layered, param_layer, structure
from .._kernels._ops import Elementwise
from .._kernels._precision import in_precision, parameter_dtype
from ._base import AbstractModel, precision_ops


class MLP(AbstractModel):
    """A multi-layer perceptron: `depth` hidden layers of `width_size` units, each a
    dense layer followed by `activation`, then a dense output layer with no activation
    (logits, or a regression output).

    Layers are `equinox.nn.Linear`, so `model.layers[i].weight` has shape
    `(out_features, in_features)`. `depth=0` is a single dense layer from `in_size` to
    `out_size`.

    **Example:**

    ```python
    model = curvzoo.MLP(784, 10, width_size=256, depth=2, key=jax.random.key(0))
    diag = model.hessian_diagonal(curvzoo.losses.cross_entropy, (x, labels))
    diag.layers[0].weight.shape  # (256, 784)
    ```
    """

    layers: tuple[eqx.nn.Linear, ...]
    activation: Callable[[Array], Array]
    in_size: int = eqx.field(static=True)
    out_size: int = eqx.field(static=True)
    width_size: int = eqx.field(static=True)
    depth: int = eqx.field(static=True)

    def __init__(
        self,
        in_size: int,
        out_size: int,
        width_size: int,
        depth: int,
        activation: Callable[[Array], Array] = jax.nn.tanh,
        *,
        dtype=None,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `in_size`: the size of one input vector.
        - `out_size`: the size of one output vector.
        - `width_size`: the size of each hidden layer.
        - `depth`: the number of hidden layers (`0` for a single dense layer).
        - `activation`: an elementwise function applied after each hidden layer
            (default `jax.nn.tanh`).
        - `dtype`: the parameters' dtype; defaults to JAX's default float dtype.
        - `key`: a `jax.random.key` for the initialisation. (Keyword only.)
        """
        for name, value, low in (
            ("in_size", in_size, 1),
            ("out_size", out_size, 1),
            ("width_size", width_size, 1),
            ("depth", depth, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}.")
        if not callable(activation):
            raise TypeError(f"`activation` must be callable, got {activation!r}.")
        sizes = [in_size] + [width_size] * depth + [out_size]
        keys = jr.split(key, depth + 1)
        self.layers = tuple(
            eqx.nn.Linear(n_in, n_out, dtype=dtype, key=k)
            for n_in, n_out, k in zip(sizes[:-1], sizes[1:], keys)
        )
        self.activation = activation
        self.in_size = in_size
        self.out_size = out_size
        self.width_size = width_size
        self.depth = depth

    def __call__(self, x: Float[Array, " in_size"]) -> Float[Array, " out_size"]:
        """**Arguments:**

        - `x`: one input, shape `(in_size,)`; a float input of another dtype is cast
            to the parameters' (the model computes in its own precision).

        **Returns:**

        The output, shape `(out_size,)`.
        """
        if x.shape != (self.in_size,):
            raise ValueError(
                f"MLP expects one input of shape ({self.in_size},), got {x.shape}; "
                "batch with `jax.vmap`."
            )
        x = in_precision(x, parameter_dtype(self.layers))
        for layer in self.layers[:-1]:
            x = self.activation(layer(x))
        return self.layers[-1](x)


@structure.register(MLP)
def _structure(model: MLP, example) -> Layered:
    ops = precision_ops(parameter_dtype(model.layers), example)
    for i in range(len(model.layers)):
        ops.append(param_layer(lambda m, i=i: m.layers[i], model, f"layers[{i}]"))
        if i < len(model.layers) - 1:
            ops.append(Elementwise(model.activation, "activation"))
    return Layered(tuple(ops))
