"""Where a preconditioner's curvature comes from: `update`'s extra argument
`curvature=`, or a curvzoo diagonal of `loss` computed from `model=`, `batch=` (and
`key=`)."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
from jaxtyping import PyTree

# The public functions are looked up when called: this module is imported while
# `curvzoo/__init__.py` is still running, and the private modules behind them are
# free to move.
import curvzoo


# `estimate(model, loss, batch, key, filter_spec) -> curvature`
Estimate = Callable[[eqx.Module, Callable, PyTree, Any, PyTree], PyTree]


def check_like(curvature: PyTree, updates: PyTree, name: str) -> None:
    """`curvature` must be shaped like `updates`: the same structure, `None` where
    `updates` is `None`, and an array of the same shape at every other leaf."""
    hint = (
        f"`{name}` must be a PyTree shaped like `updates`: the same structure, `None` "
        "where `updates` has `None` (a frozen leaf), and an array of the update's shape "
        "at every other leaf"
    )
    if jax.tree.structure(curvature) != jax.tree.structure(updates):
        raise ValueError(
            f"{hint}; its structure differs: {jax.tree.structure(curvature)} against "
            f"{jax.tree.structure(updates)}."
        )
    paths = jax.tree_util.tree_leaves_with_path(updates)
    for (path, update), leaf in zip(paths, jax.tree.leaves(curvature)):
        where = jax.tree_util.keystr(path)
        if not eqx.is_array(leaf):
            raise TypeError(f"{hint}; at {where} it holds {type(leaf).__name__}.")
        if leaf.shape != jax.numpy.shape(update):
            raise ValueError(
                f"{hint}; at {where} it has shape {leaf.shape}, the update "
                f"{jax.numpy.shape(update)}."
            )


def trained_spec(model: eqx.Module, updates: PyTree) -> PyTree:
    """A `filter_spec` for the curvzoo functions: `True` at the leaves of `model` for
    which `updates` holds an array, so that the curvature is computed for exactly the
    trained leaves and comes back shaped like `updates`."""
    try:
        return jax.tree.map(lambda _, update: update is not None, model, updates)
    except ValueError as error:
        raise ValueError(
            "`updates` must have the structure of `model`, with `None` at the leaves that "
            "are not trained, as `equinox.filter_grad(loss)(model, batch)` returns, so "
            f"that the curvature can be computed from `model`: {error}"
        ) from None


def get_curvature(
    updates: PyTree,
    *,
    owner: str,
    curvature: PyTree | None,
    model: Any,
    batch: Any,
    key: Any,
    loss: Callable | None,
    estimate: Estimate,
    needs_key: bool,
) -> PyTree:
    """The curvature for this step, shaped like `updates`: `curvature` as given, or
    `estimate(model, loss, batch, key, filter_spec)` when the transformation has a
    `loss` and `update` received `model=` and `batch=`."""
    from_model = model is not None or batch is not None
    if curvature is not None and from_model:
        raise TypeError(
            f"`{owner}` got both `curvature=` and `model=`/`batch=`: pass the curvature "
            "itself, or the model and batch to compute it from, not both."
        )
    if curvature is not None:
        check_like(curvature, updates, "curvature")
        return curvature
    if loss is None:
        if from_model:
            raise TypeError(
                f"`{owner}` got `model=`/`batch=` but was built without `loss`: build it "
                "with `loss=` to compute the curvature, or pass `curvature=`."
            )
        raise TypeError(
            f"`{owner}`'s update needs the curvature: pass `curvature=` (a PyTree shaped "
            "like `updates`), or build it with `loss=` and pass `model=` and `batch=`."
        )
    for value, name in ((model, "model"), (batch, "batch")):
        if value is None:
            raise TypeError(
                f"`{owner}` was built with `loss` and computes the curvature itself: "
                f"`update` needs `{name}=` (and `model=`, `batch=`"
                + (", `key=`" if needs_key else "")
                + "), or pass `curvature=` instead."
            )
    if needs_key and key is None:
        raise TypeError(
            f"`{owner}` draws a random estimate of the curvature: `update` needs `key=`, "
            "a fresh `jax.random.key` each step (for example `jax.random.fold_in(key, "
            "step)`)."
        )
    if not isinstance(model, eqx.Module):
        raise TypeError(
            f"`model` must be an Equinox module to compute the curvature from, got "
            f"{type(model).__name__}."
        )
    result = estimate(model, loss, batch, key, trained_spec(model, updates))
    check_like(result, updates, "the computed curvature")
    return result


def of_estimator(estimator, options: dict) -> Estimate:
    """`estimate(model, loss, batch, key, filter_spec)`: `estimator`'s diagonal (an
    estimator object) by `curvzoo.diagonal`, with `options` its further keywords."""

    def estimate(model, loss, batch, key, filter_spec):
        return curvzoo.diagonal(
            model, loss, batch, estimator, key=key if estimator.random else None,
            filter_spec=filter_spec, **options,
        )  # fmt: skip

    return estimate
