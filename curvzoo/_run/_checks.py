"""Input checks shared by every curvature function.

Each raises a `ValueError` or `TypeError` that names the offending argument, before any
heavy work (shapes are checked by tracing, not by running the model).
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def check_model(model: Any) -> None:
    if not isinstance(model, eqx.Module):
        raise TypeError(
            "`model` must be an Equinox module (an instance of `equinox.Module`), got "
            f"{type(model).__name__}."
        )


def check_loss(loss: Any) -> None:
    if isinstance(loss, type):
        raise TypeError(
            f"`loss` must be a loss object, got the class {loss.__name__}; pass an instance "
            f"such as `{loss.__name__}()`."
        )
    if not callable(loss):
        raise TypeError(
            "`loss` must be a curvzoo loss or a callable `loss(model, batch) -> scalar`, "
            f"got {type(loss).__name__}."
        )
    module = getattr(loss, "__module__", None) or ""
    if not isinstance(loss, eqx.Module) and module.split(".")[0] in ("jax", "numpy", "optax"):
        name = getattr(loss, "__name__", type(loss).__name__)
        raise TypeError(
            f"`loss` is `{module}.{name}`, a function of arrays; curvzoo calls "
            "`loss(model, batch)` with the model and the whole batch. Pass a curvzoo loss "
            "(`curvzoo.losses.mse`, `curvzoo.losses.cross_entropy`, ...) or a function such "
            "as `lambda model, batch: jnp.mean((jax.vmap(model)(batch[0]) - batch[1]) ** 2)`."
        )


def explained(error: Exception) -> Exception | None:
    """A clearer error for a known failure of the user's model or loss while curvzoo
    traces it, or `None` (then the original error stands, with a note added by the
    caller). Known: a collective over a named batch axis (`BatchNorm` in training mode
    averages over `axis_name`, which curvzoo's one-example calls do not bind)."""
    text = str(error)
    if isinstance(error, NameError) and "unbound axis name" in text:
        return ValueError(
            f"`model` (or `loss`) uses a collective over a named axis ({text.split('.')[0]}): "
            "an `eqx.nn.BatchNorm` in training mode averages over the batch, which curvzoo's "
            "calls of the model on one example at a time do not name. Put it in inference "
            "mode, `model = eqx.nn.inference_mode(model)`, and pass its state with "
            "`args=state` (a curvzoo loss then calls `model(x, state)`); or compute the "
            "batch statistics in your loss."
        )
    return None


def check_batch(batch: PyTree) -> int:
    """Check that every array leaf of `batch` has the same leading (batch) axis.

    **Returns:** the batch size.
    """
    leaves = jax.tree_util.tree_flatten_with_path(batch)[0]
    sizes = {}
    for path, leaf in leaves:
        if not _is_array(leaf):
            continue
        name = "batch" + jax.tree_util.keystr(path)
        if jnp.ndim(leaf) == 0:
            raise ValueError(
                f"every array in `batch` needs a leading batch axis, but `{name}` is a "
                "scalar. Pass arrays that are not per-sample (class weights, an anchor, an "
                "`eqx.nn.State`) with `args=` instead, or as array fields of a loss module."
            )
        if jnp.issubdtype(jnp.result_type(leaf), jnp.complexfloating):
            raise TypeError(
                f"`{name}` is complex ({jnp.result_type(leaf)}); curvzoo computes the "
                "curvature of a real loss: pass real arrays (real and imaginary parts as "
                "two real arrays)."
            )
        sizes[name] = jnp.shape(leaf)[0]
    if not sizes:
        plain = [leaf for _, leaf in leaves if isinstance(leaf, (int, float, list, tuple))]
        hint = (
            " It holds Python numbers: convert them with `jnp.asarray`, e.g. "
            "`(jnp.asarray(inputs), jnp.asarray(targets))`."
            if plain
            else ""
        )
        raise ValueError(f"`batch` holds no arrays; pass e.g. `(inputs, targets)`.{hint}")
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{name}: {size}" for name, size in sizes.items())
        raise ValueError(
            f"the leaves of `batch` must share their leading (batch) axis; got {listing}."
        )
    (size,) = set(sizes.values())
    if size == 0:
        raise ValueError("`batch` is empty (its leading axis has size 0).")
    return size


def check_positive_int(value: Any, name: str, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        expected = "a positive integer" + (" or None" if allow_none else "")
        raise TypeError(f"`{name}` must be {expected}, got {value!r}.")
    if value < 1:
        raise ValueError(f"`{name}` must be >= 1, got {value}.")
    if value > _LARGEST:  # counts go into compiled programs as 32-bit integers
        raise ValueError(f"`{name}` must be at most 2**31 - 1, got {value}.")


_LARGEST = 2**31 - 1


def split_trainable(
    model: eqx.Module, filter_spec: PyTree | Callable, *, nothing_ok: bool = False
) -> tuple:
    """Partition `model` into `(params, static)`.

    `params` holds the leaves that `filter_spec` selects and that are floating-point
    arrays (the only ones with a derivative); everything else is in `static`. Raises if
    `filter_spec` does not fit `model` or selects nothing.
    """
    # A module-shaped spec is a PyTree even though modules with `__call__` are callable.
    if isinstance(filter_spec, eqx.Module) or not callable(filter_spec):
        bad = [
            leaf
            for leaf in jax.tree.leaves(filter_spec)
            if not (isinstance(leaf, (bool, np.bool_)) or callable(leaf))
        ]
        if bad:
            raise TypeError(
                "`filter_spec` must be a callable or a PyTree of bools (or callables) "
                f"that is a prefix of `model`; it holds {type(bad[0]).__name__} leaves."
            )
    if callable(filter_spec) and not isinstance(filter_spec, eqx.Module):
        # One pass: the spec and "is a floating-point array" in a single predicate.
        params, static = eqx.partition(
            model, lambda leaf: eqx.is_inexact_array(leaf) and filter_spec(leaf)
        )
        if not (nothing_ok or jax.tree.leaves(params)):
            raise ValueError(_NOTHING_TO_DIFFERENTIATE)
        return params, static
    try:
        params, static = eqx.partition(model, filter_spec)
    except ValueError as error:
        raise ValueError(
            "`filter_spec` must be a callable or a PyTree of bools whose structure is a "
            "prefix of `model`'s (as in `equinox.partition`); its structure does not "
            f"match:\n{error}"
        ) from None
    params, frozen = eqx.partition(params, eqx.is_inexact_array)
    static = eqx.combine(static, frozen)
    if not (nothing_ok or jax.tree.leaves(params)):
        raise ValueError(_NOTHING_TO_DIFFERENTIATE)
    return params, static


def trained(model: eqx.Module, filter_spec: PyTree | Callable) -> tuple[bool, ...]:
    """One bool per leaf of `model` (in `jax.tree.leaves` order): whether `filter_spec`
    selects it for differentiation (and it is a floating-point array). Raises as
    `split_trainable` does, and for complex leaves, whose curvature is not what the
    functions compute."""
    if filter_spec is eqx.is_inexact_array:  # the default: no partition needed
        mask = tuple(eqx.is_inexact_array(leaf) for leaf in jax.tree.leaves(model))
    else:
        params, _ = split_trainable(model, filter_spec, nothing_ok=True)
        mask = tuple(jax.tree.leaves(jax.tree.map(lambda _, p: p is not None, model, params)))
    if not any(mask):
        raise ValueError(_NOTHING_TO_DIFFERENTIATE)
    for (path, leaf), selected in zip(jax.tree_util.tree_flatten_with_path(model)[0], mask):
        if selected and jnp.issubdtype(leaf.dtype, jnp.complexfloating):
            raise TypeError(
                f"`model{jax.tree_util.keystr(path)}` is complex ({leaf.dtype}); curvzoo "
                "computes the curvature of a real loss in real parameters. Split it into "
                "real and imaginary parts (two real leaves), or freeze it with `filter_spec`."
            )
    return mask


_NOTHING_TO_DIFFERENTIATE = (
    "`filter_spec` leaves nothing to differentiate: it selects no floating-point array of `model`."
)


def check_key(key: Any) -> None:
    """`key` must be a JAX PRNG key: a typed key array of shape `()` or a legacy
    `uint32` key of shape `(2,)`."""
    dtype, shape = getattr(key, "dtype", None), getattr(key, "shape", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key) and shape == ():
        return
    if dtype == jnp.uint32 and shape == (2,):
        return
    got = f"an array of shape {shape} and dtype {dtype}" if dtype is not None else repr(key)
    raise TypeError(
        "`key` must be one JAX PRNG key, such as `jax.random.key(0)` or "
        f"`jax.random.PRNGKey(0)`; got {got}."
    )


def raise_non_finite(trees: dict[str, PyTree], *, results: tuple[str, ...] = ()) -> None:
    """Raise a `ValueError` naming the first leaf, by its path, that holds NaN or inf.

    Called once a quick check (`all_finite`, a sum of squares per leaf) has shown a
    possible failure (never under a trace), to find and name it; it reads every leaf,
    and returns without raising when none holds NaN or inf (a sum of squares that
    overflowed on large finite entries). `trees` maps a name (`"model"`,
    `"batch"`, `"diagonal"`) to a PyTree of concrete arrays. Inputs are reported first;
    for the trees named in `results` the message says that the inputs were finite and
    the curvature itself overflowed.
    """
    from ._devices import host_value  # `_devices` imports this module

    named = [
        (name + jax.tree_util.keystr(path), host_value(leaf))
        for name, tree in trees.items()
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
        if eqx.is_inexact_array(leaf)
    ]
    flags = [bool(np.all(np.isfinite(leaf))) for _, leaf in named]
    order = sorted(range(len(named)), key=lambda i: named[i][0].startswith(results))
    for i in order:
        (name, leaf), finite = named[i], flags[i]
        if finite:
            continue
        count = int(np.sum(~np.isfinite(leaf)))
        if results and name.startswith(results):
            raise ValueError(
                f"the curvature came out non-finite: `{name}` holds {count} NaN or inf "
                "entries although `model` and `batch` are finite, so the loss or its "
                "derivatives overflow at this point (a log of zero, say). Pass "
                "`check_finite=False` to get the raw result."
            )
        raise ValueError(
            f"`{name}` holds {count} non-finite value(s) (NaN or inf) out of {leaf.size}; "
            "the curvature of a non-finite model or batch would be meaningless. Pass "
            "`check_finite=False` to skip this check."
        )
