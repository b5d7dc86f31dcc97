from collections.abc import Callable
from typing import no_type_check

import equinox as eqx
import jax
from jaxtyping import PyTree

from .._losses import AbstractElementwiseLoss, AbstractLoss, AbstractStepwiseLoss
from ._checks import (
    cached,
    check_batch,
    check_loss,
    check_loss_output,
    check_model,
    check_positive_int,
    split_trainable,
)
from ._generic import generic_hessian_diagonal
from ._layers import check_supported, defining_class, Unsupported
from ._memory import DEFAULT_MEMORY_BUDGET
from ._recurrent import estimated_costs, recurrent_hessian_diagonal
from ._structured import structured_hessian_diagonal


_METHODS = ("auto", "structured", "generic")


# `method="auto"` takes the recurrent kernel unless its estimated multiply-adds, times this
# margin, exceed the generic kernel's. Measured on 2 CPU cores, the structured kernel ran
# at 0.4-0.5 times the generic kernel's rate (multiply-adds per second) for 8-16 units and
# at 0.8-1.2 times for 64-128; with 2.5, auto picked the faster kernel in every case
# measured (Elman with 2, 3, 4, 8 and 16 units over 64-300 steps, where the estimated
# ratio ran from 0.07 to 3.0, and the GRU/LSTM/Elman grid of the benchmark).
_RECURRENT_MARGIN = 2.5


def _loss_mismatch(loss: AbstractLoss) -> str | None:
    """Why the structured kernels, which rebuild the loss from `per_sample`, `scale` and
    its closed-form curvature, would not compute `loss(model, batch)`; `None` if they do."""
    cls = type(loss)
    for name in ("__call__", "predict"):
        if defining_class(cls, name) is not AbstractLoss:
            return (
                f"`loss` ({cls.__name__}) overrides `{name}`, which the structured kernels "
                "do not call"
            )
    owner = defining_class(cls, "per_sample")
    for name in ("element_curvature", "output_hessian_factor", "output_hessian_step_factor"):
        where = defining_class(cls, name)
        if where in (None, AbstractLoss, AbstractElementwiseLoss):
            continue  # absent, or derived from `per_sample` / `element_curvature`
        if not issubclass(where, owner):
            return (
                f"`loss` ({cls.__name__}) overrides `per_sample` but inherits `{name}` from "
                f"{where.__name__}, which may not match it"
            )
    return None


def _structured_kernel(model, loss) -> tuple[Callable | None, str | None]:
    """The structured kernel that takes `(model, loss)`, or `None` and the reason."""
    if not isinstance(loss, AbstractLoss):
        return None, (
            "`loss` is a custom callable; the structured kernel needs a curvzoo loss "
            "(`curvzoo.losses.*`), which exposes its per-sample form"
        )
    mismatch = _loss_mismatch(loss)
    if mismatch is not None:
        return None, mismatch
    try:
        kind = cached("structure", lambda: check_supported(model), model)
    except Unsupported as error:
        return None, f"`model` has a part the structured kernel does not support: {error}"
    if kind == "layered":
        return structured_hessian_diagonal, None
    if not isinstance(loss, AbstractStepwiseLoss):
        return None, (
            f"`loss` ({type(loss).__name__}) defines no per-step Hessian factor (it is not "
            "an `AbstractStepwiseLoss`), which the recurrent kernel needs"
        )
    return recurrent_hessian_diagonal, None


# Arguments are checked below with errors that name them, so the test-time runtime
# type checker is kept out of the way.
@no_type_check
def hessian_diagonal(
    model: eqx.Module,
    loss: Callable,
    batch: PyTree,
    *,
    filter_spec: PyTree | Callable = eqx.is_inexact_array,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    method: str = "auto",
) -> PyTree:
    """The exact diagonal of the Hessian of `loss(model, batch)` with respect to the
    trainable parameters of `model`.

    **Arguments:**

    - `model`: any Equinox module (a zoo model or your own). It is not modified.
    - `loss`: a curvzoo loss such as `curvzoo.losses.cross_entropy`, or any callable
        `loss(model, batch) -> scalar`. Pass the same callable object each time so that
        the compiled kernel is reused.
    - `batch`: a PyTree of arrays sharing a leading batch axis; for curvzoo losses a pair
        `(inputs, targets)`.
    - `filter_spec`: which leaves are trained, as in `equinox.partition`: a callable on
        leaves (default `equinox.is_inexact_array`) or a PyTree of bools that is a prefix
        of `model`. Only floating-point arrays are differentiated.
    - `chunk_size`: how much work is batched together with `jax.vmap`: basis vectors
        for the generic kernel, samples for the structured one. `None` (default) picks
        the largest chunk that fits `memory_budget`.
    - `memory_budget`: bytes for the per-chunk working set when `chunk_size=None`;
        default 128 MiB. The chunk's working set stays within it whenever one basis
        vector's (or sample's) does; beyond that the generic kernel holds the
        linearisation of one gradient (a few copies of the batch's activations) and the
        length-`P` result, and never a `P x P` matrix.
    - `method`: `"auto"` (default) takes the structured kernel where the model and the
        loss support it (for a recurrent network, where its estimated cost is also the
        lower one) and the generic kernel otherwise; `"structured"` forces the
        structured kernel and raises a `ValueError` naming the unsupported part;
        `"generic"` forces the reference kernel. Both are exact.

    **Returns:**

    A PyTree with the structure of `equinox.filter(model, filter_spec)`, as
    `equinox.filter_grad` returns: at each trained leaf an array of that leaf's shape
    and dtype holding the diagonal of the Hessian for that leaf's entries; `None` at
    frozen leaves and at leaves that are not floating-point arrays.

    **Cost:** the generic kernel (any Equinox module, any loss) takes one
    Hessian-vector product per trained parameter, `P` in all, batched in chunks; never a
    `P x P` matrix. The structured kernel for zoo `MLP` and `CNN` with a curvzoo loss
    backpropagates the loss Hessian's rank-`C` factor and the activations' diagonal
    residuals layer by layer: about `C` extra backward passes for a two-hidden-layer
    MLP, plus full Jacobian products for residuals two or more dense layers up. For the
    zoo `RNN` (Elman, GRU, LSTM; either readout) it works with the same-unit blocks of
    the Hessian with respect to per-step state perturbations, the state Jacobians and
    the BPTT adjoints: about `T^2 H^3` work per sample for `T` steps and `H` units,
    against `T H^4` for the generic kernel.

    **Example:**

    ```python
    model = curvzoo.MLP(4, 3, width_size=8, depth=1, key=jax.random.key(0))
    diag = curvzoo.hessian_diagonal(model, curvzoo.losses.cross_entropy, (x, labels))
    diag.layers[0].weight.shape  # (8, 4)
    ```
    """
    check_model(model)
    check_loss(loss)
    check_positive_int(chunk_size, "chunk_size", allow_none=True)
    check_positive_int(memory_budget, "memory_budget", allow_none=True)
    if method not in _METHODS:
        raise ValueError(f"`method` must be one of {_METHODS}, got {method!r}.")
    check_batch(batch)
    params, static = split_trainable(model, filter_spec)
    check_loss_output(loss, model, batch)
    if memory_budget is None:
        memory_budget = DEFAULT_MEMORY_BUDGET
    if method != "generic":
        kernel, reason = _structured_kernel(model, loss)
        if kernel is recurrent_hessian_diagonal and method == "auto":
            structured, generic = estimated_costs(
                model, batch, sum(leaf.size for leaf in jax.tree.leaves(params))
            )
            if structured * _RECURRENT_MARGIN > generic:
                kernel = None
        if kernel is None and method == "structured":
            raise ValueError(
                f"`method='structured'` cannot be used here: {reason}. Use "
                "`method='auto'` or `method='generic'`."
            )
    else:
        kernel = None
    return (kernel or generic_hessian_diagonal)(
        params,
        static,
        loss,
        batch,
        None if chunk_size is None else int(chunk_size),
        int(memory_budget),
    )
