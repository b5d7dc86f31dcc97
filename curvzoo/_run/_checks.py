"""Input checks shared by every curvature function.

Each raises a `ValueError` or `TypeError` that names the offending argument, before any
heavy work (shapes are checked by tracing, not by running the model).
"""

import collections
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree

from .._losses import AbstractLoss


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
                f"every array in `batch` needs a leading batch axis, but `{name}` is a scalar."
            )
        sizes[name] = jnp.shape(leaf)[0]
    if not sizes:
        raise ValueError("`batch` holds no arrays; pass e.g. `(inputs, targets)`.")
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


def split_trainable(model: eqx.Module, filter_spec: PyTree | Callable) -> tuple:
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
        if not jax.tree.leaves(params):
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
    if not jax.tree.leaves(params):
        raise ValueError(_NOTHING_TO_DIFFERENTIATE)
    return params, static


_NOTHING_TO_DIFFERENTIATE = (
    "`filter_spec` leaves nothing to differentiate: it selects no floating-point array of `model`."
)


_CACHE: collections.OrderedDict = collections.OrderedDict()
_CACHE_SIZE = 256


def cached(name: str, compute: Callable, *trees) -> Any:
    """`compute()`, remembered for inputs with the same structure, shapes and dtypes.

    Checks that trace a model cost milliseconds; like `jax.jit`, they only depend on
    the treedef (static fields included) and on the arrays' shapes and dtypes, so a
    repeated call with the same shapes skips them. Failures are not remembered, and
    inputs that cannot be hashed are never cached.
    """
    leaves, treedef = jax.tree.flatten(trees)
    signature = tuple(
        (jnp.shape(leaf), jnp.result_type(leaf), getattr(leaf, "weak_type", False))
        if _is_array(leaf)
        else leaf
        for leaf in leaves
    )
    key = (name, treedef, signature)
    try:
        hit = key in _CACHE
    except TypeError:  # an unhashable static part
        return compute()
    if hit:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    value = compute()
    _CACHE[key] = value
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return value


def _trace_loss(loss: Callable, model: eqx.Module, batch: PyTree):
    if isinstance(loss, AbstractLoss):
        prediction_shape = loss.prediction_shape(model, batch)
    else:
        prediction_shape = None
    out = eqx.filter_eval_shape(loss, model, batch)
    if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != ():
        shape = getattr(out, "shape", None)
        got = f"shape {shape}" if shape is not None else f"a {type(out).__name__}"
        raise ValueError(f"`loss` must return a scalar, but `loss(model, batch)` gives {got}.")
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(f"`loss` must return a real floating-point scalar, got dtype {out.dtype}.")
    return prediction_shape


def check_loss_output(loss: Callable, model: eqx.Module, batch: PyTree) -> tuple | None:
    """Trace `loss(model, batch)` (no compute; remembered per shapes) and check that it
    is a real scalar and, for a curvzoo loss, that the targets fit the predictions.
    Target values (label range, BCE targets in `[0, 1]`) are checked where they are
    concrete, that is outside `jax.jit`; inside it they cannot be, and stay the caller's
    responsibility.

    **Returns:** for a curvzoo loss the shape of the batch of predictions, else `None`.
    """
    prediction_shape = cached("loss", lambda: _trace_loss(loss, model, batch), loss, model, batch)
    if isinstance(loss, AbstractLoss):
        targets = batch[1]
        if not isinstance(targets, jax.core.Tracer):
            loss.check_values(prediction_shape, np.asarray(targets))
    return prediction_shape


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

    Called once the finiteness flags, computed with the kernel, have shown a failure
    (never under a trace), to find and name it. `trees` maps a name (`"model"`,
    `"batch"`, `"diagonal"`) to a PyTree of concrete arrays. Inputs are reported first;
    for the trees named in `results` the message says that the inputs were finite and
    the curvature itself overflowed.
    """
    named = [
        (name + jax.tree_util.keystr(path), np.asarray(leaf))
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
