"""The run driver: every diagonal is `evaluate(...)` with its options' estimator.

1. *Check* what changes from call to call and is cheap: the argument types, the
   trained leaves, and (for a callable loss that is not an Equinox module) a fresh
   trace of the loss, so that its result is that of the loss as it stands now.
2. *Plan*, or find the plan of an equal request (same shapes, dtypes, static parts and
   options) in a bounded cache, with its compiled program.
3. *Run* the compiled program on this call's arrays.
4. *Verify*: check concrete target values and that the inputs and the result are
   finite, naming the leaf that holds NaN or inf. Inputs are checked by one small
   compiled reduction, and a `jax.Array` once checked is remembered (arrays are
   immutable), so a repeated call on the same model and batch only checks its result.
   The result is checked by one flag that the compiled program computes with it (see
   `all_finite`: about 50 us for the 269,322 entries of `mlp2` on 2 CPU cores).
"""

import collections
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import numpy as np
from jaxtyping import PyTree

from .._dispatch._costs import estimated_seconds, Profile, surely_faster_than
from .._dispatch._plan import (
    all_finite,
    build_plan,
    duration,
    KERNELS,
    Options,
    Plan,
    QUANTITIES,
    Request,
    runner,
)
from .._dispatch._signature import (
    flatten,
    is_array,
    Layout,
    trace_loss,
    WithArgs,
)
from .._dispatch._structures import registry_version
from .._losses import AbstractLoss
from ._checks import check_batch, check_loss, check_model, raise_non_finite, trained
from ._devices import check_mesh, place_batch, replicate


_SIZE = 64  # plans (and their compiled programs) kept; the oldest is dropped
_PLANS: collections.OrderedDict = collections.OrderedDict()
_MASKS: collections.OrderedDict = collections.OrderedDict()
_BATCHES: collections.OrderedDict = collections.OrderedDict()


_MISSING = object()


def remember(cache: collections.OrderedDict, key, make: Callable):
    """`make()`, remembered under `key` in the bounded `cache` (not when unhashable)."""
    try:
        value = cache.get(key, _MISSING)
    except TypeError:  # an unhashable static leaf
        return make()
    if value is not _MISSING:
        cache.move_to_end(key)
        return value
    value = make()
    cache[key] = value
    if len(cache) > _SIZE:
        cache.popitem(last=False)
    return value


# Filter specs that read only a leaf's type and dtype, which a model's layout holds: their
# mask is remembered per layout. (Any other callable may read values, and is applied anew.)
_DTYPE_SPECS = (eqx.is_inexact_array, eqx.is_array)


def _trained(model, layout: Layout, filter_spec) -> tuple:
    """One bool per leaf of `model`: trained or not (remembered per model layout for a
    PyTree spec and for `_DTYPE_SPECS`; another callable spec is applied anew)."""
    if any(filter_spec is spec for spec in _DTYPE_SPECS):
        return remember(_MASKS, (layout, filter_spec), lambda: trained(model, filter_spec))
    if callable(filter_spec) and not isinstance(filter_spec, eqx.Module):
        return trained(model, filter_spec)
    spec_leaves, spec_def = jax.tree.flatten(filter_spec)
    key = (layout, spec_def, tuple(spec_leaves))
    return remember(_MASKS, key, lambda: trained(model, filter_spec))


def _check_batch(batch, layout: Layout) -> None:
    remember(_BATCHES, layout, lambda: check_batch(batch))


class Prepared:
    """A call, checked and planned: its request, plan, compiled program and arrays."""

    def __init__(self, request, plan, compiled, arrays, trees):
        self.request, self.plan, self.compiled = request, plan, compiled
        self.arrays, self.trees = arrays, trees


def prepare(
    model: Any,
    loss: Any,
    batch: PyTree,
    *,
    options: Options,
    filter_spec: Any,
    args: PyTree | None = None,
    key: Any = None,
) -> Prepared:
    """Checks, the plan (cached per request) and the arrays of one call of
    `options.estimator`."""
    quantity = type(options.estimator).quantity
    check_model(model)
    check_mesh(model, options.mesh)
    check_loss(loss)
    trees = (model, batch, loss, args)
    model_arrays, model_layout = flatten(model)
    batch_arrays, batch_layout = flatten(batch)
    _check_batch(batch, batch_layout)
    mask = _trained(model, model_layout, filter_spec)
    if args is not None and isinstance(loss, AbstractLoss):  # `args` go to the model
        model = WithArgs(model, args)
        mask = mask + (False,) * len(jax.tree.leaves(args))
        model_arrays, model_layout = flatten(model)
        args = None
    args_arrays, args_layout = ([], None) if args is None else flatten(args)
    if not isinstance(loss, eqx.Module):  # traced now: its closure is read at this call
        # Per sample, the generic kernel calls the loss on one-sample batches.
        one = quantity == "hessian" and options.per_sample
        traced_layout = batch_layout.with_leading(1) if one else batch_layout
        loss, _ = trace_loss(loss, model_layout, traced_layout, args_layout)
    loss_arrays, loss_layout = flatten(loss)
    key_aval = None if key is None else (tuple(key.shape), key.dtype)
    request = Request(
        options, model_layout, mask, batch_layout, loss_layout, args_layout, key_aval,
        registry_version(),
    )  # fmt: skip

    def make():
        plan = build_plan(request)
        return plan, jax.jit(runner(request, plan))

    plan, compiled = remember(_PLANS, request, make)
    arrays = [model_arrays, batch_arrays, loss_arrays, args_arrays]
    return Prepared(request, plan, compiled, arrays, trees)


class SlowCurvatureWarning(UserWarning):
    """A curvature call is estimated to run for more than a minute (`SLOW_SECONDS`) on
    this machine, by the same estimate as `curvzoo.plan`'s: every function and kernel
    warns before it runs (the diagonals on any kernel, Hutchinson's probes, the curvature
    per time step, the spectral tools' products). Silence it with
    `warnings.filterwarnings("ignore", category=curvzoo.SlowCurvatureWarning)`."""


SLOW_SECONDS = 60.0

_FASTER = {
    "generic": (
        "Faster routes: a zoo model, or a model whose structure is registered "
        "(`equinox.nn.MLP`, `equinox.nn.Sequential` of dense and convolutional layers, "
        "elementwise activations, pooling, a flatten), with a curvzoo loss; the exact GGN "
        "diagonal (`curvzoo.ggn_diagonal`, a few vector-Jacobian products per sample); or "
        "an unbiased estimate (`curvzoo.hutchinson_diagonal`, one product per probe)."
    ),
    "hutchinson": "Fewer probes cost proportionally less (the error falls as 1/sqrt(probes)).",
}


def warn_if_slow(work: Profile, kernel: str, what: str, *, stacklevel: int = 3) -> None:
    """Warn where `work` (a `Profile`) on `kernel` is estimated to take more than
    `SLOW_SECONDS`. The machine's rates are measured only where even the slowest rates
    cannot rule that out (`surely_faster_than`: for element operations alone, under
    about 6e8), so a small call pays nothing and no call above the threshold is passed
    over."""
    if surely_faster_than(work, kernel, SLOW_SECONDS):
        return
    seconds = estimated_seconds(work, kernel)
    if seconds < SLOW_SECONDS:
        return
    advice = _FASTER.get(kernel, "A smaller batch, or a chunk of it, costs proportionally less.")
    warnings.warn(
        f"{what}: about {duration(seconds)} on this machine, by `curvzoo.plan`'s estimate. "
        + advice,
        SlowCurvatureWarning,
        stacklevel=stacklevel,
    )


def _warn_if_slow(plan: Plan) -> None:
    reason = f" ({plan.reason})" if plan.reason else ""
    what = (
        f"this {QUANTITIES[plan.quantity]} of {plan.model} (P = {plan.num_params:,}) takes "
        f"the {KERNELS[plan.kernel]} kernel{reason}"
    )
    warn_if_slow(plan.work, plan.kernel, what, stacklevel=5)


def _is_concrete(leaf) -> bool:
    return not isinstance(leaf, jax.core.Tracer)


def evaluate(model, loss, batch, *, key=None, **kwargs) -> PyTree:
    """Check, plan, run and verify one call of `options.estimator` (see the module
    docstring)."""
    prepared = prepare(model, loss, batch, key=key, **kwargs)
    plan, options = prepared.plan, prepared.request.options
    _warn_if_slow(plan)
    model, batch, loss, args = prepared.trees
    if isinstance(loss, AbstractLoss):
        check_batch_values(loss, plan.prediction_shape, batch, model, prepared.request.model)
    model_arrays, batch_arrays, loss_arrays, args_arrays = prepared.arrays
    if options.mesh is not None:
        model_arrays = replicate(model_arrays, options.mesh)
        split = plan.lanes == "samples" or options.per_sample
        batch_arrays = place_batch(batch_arrays, options.mesh, split=split, size=plan.batch_size)
    if options.check_finite:
        _check_inputs_finite(prepared.arrays, {"model": model, "batch": batch, "args": args})
    result, flags = prepared.compiled(model_arrays, batch_arrays, loss_arrays, args_arrays, key)
    result = _unwrapped(result)
    if flags is not None and _is_concrete(flags) and not np.asarray(flags).all():
        trees = {"model": model, "batch": batch, "args": args, "diagonal": result}
        raise_non_finite(trees, results=("diagonal",))
    return result


_all_finite = jax.jit(all_finite)
_CHECKED: dict = {}  # id -> (weak reference, the checks it passed), for `jax.Array`s


def _passed(leaf, check) -> bool:
    """Whether the `jax.Array` `leaf` has passed `check` (a hashable tag) before."""
    entry = _CHECKED.get(id(leaf))
    return entry is not None and entry[0]() is leaf and check in entry[1]


def _remember_passed(leaf, check) -> None:
    """Remember that `leaf` passed `check`; nothing for a mutable (NumPy) array."""
    if not isinstance(leaf, jax.Array):
        return
    key = id(leaf)
    entry = _CHECKED.get(key)
    if entry is None or entry[0]() is not leaf:
        entry = (weakref.ref(leaf, lambda _: _CHECKED.pop(key, None)), set())
        _CHECKED[key] = entry
    entry[1].add(check)


def check_batch_values(loss: AbstractLoss, prediction_shape: tuple, batch, model, layout) -> None:
    """`loss.check_batch_values` of a curvzoo loss's batch: the lengths in `[1, T]`,
    the targets (at valid steps) and the model's inputs (`check_input_values`, the zoo
    `RNN`'s token ids), with the errors the loss itself raises. Every function that
    takes such a batch calls this, eagerly; the batch's `jax.Array`s are remembered
    once they pass (arrays cannot change) for an equal loss, prediction shape and model
    layout (its static fields, such as `vocab_size`, take part in the check)."""
    leaves = [leaf for leaf in jax.tree.leaves(batch) if is_array(leaf)]
    if not all(_is_concrete(leaf) for leaf in leaves):
        loss.check_batch_values(prediction_shape, batch, model)  # checks what is known
        return
    check = (loss, tuple(prediction_shape), layout)
    try:
        hash(check)
    except TypeError:  # a loss with array fields: checked at every call
        check = None
    if check is not None and leaves and all(_passed(leaf, check) for leaf in leaves):
        return
    loss.check_batch_values(prediction_shape, batch, model)
    if check is not None:
        for leaf in leaves:
            _remember_passed(leaf, check)


def _check_inputs_finite(arrays: list, trees: dict) -> None:
    """Raise naming the first input leaf with NaN or inf. Arrays already found finite
    are skipped (a `jax.Array` cannot change); under a trace nothing can be checked."""
    leaves = [
        leaf
        for part in (arrays[0], arrays[1], arrays[3])
        for leaf in part
        if not _passed(leaf, "finite") and np.issubdtype(leaf.dtype, np.inexact)
    ]
    if not leaves or not all(_is_concrete(leaf) for leaf in leaves):
        return
    finite = _all_finite(leaves)
    if not _is_concrete(finite):  # concrete arrays, but inside an outer trace
        return
    if not bool(finite):
        raise_non_finite(trees)
    for leaf in leaves:
        _remember_passed(leaf, "finite")


def _unwrapped(result):
    """The result shaped like the user's model, not like its `WithArgs` wrapper."""
    if isinstance(result, WithArgs):
        return result.model
    if isinstance(result, tuple) and result and isinstance(result[0], WithArgs):
        return tuple(part.model for part in result)
    return result


def plan_of(model, loss, batch, *, key=None, **kwargs) -> Plan:
    """The plan `evaluate` would run, without running it (a curvzoo loss's batch
    values are checked as `evaluate` checks them: the plan of a call that would raise
    raises the same error)."""
    prepared = prepare(model, loss, batch, key=key, **kwargs)
    model, batch, loss, _ = prepared.trees
    if isinstance(loss, AbstractLoss):
        layout = prepared.request.model
        check_batch_values(loss, prepared.plan.prediction_shape, batch, model, layout)
    return prepared.plan
