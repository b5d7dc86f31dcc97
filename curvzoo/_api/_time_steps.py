"""`curvzoo.time_step_curvature`: where in time the loss of a recurrent model is curved."""

import collections
import dataclasses
from typing import no_type_check

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jaxtyping import Array, Float, PyTree

from .._dispatch._costs import profile
from .._dispatch._plan import all_finite
from .._dispatch._signature import flatten
from .._dispatch._structures import describe, Recurrent, Unsupported
from .._kernels._lanes import chunked
from .._kernels._recurrent import SITES, time_step_curvature as _one_sample
from .._losses import AbstractLoss, AbstractStepwiseLoss, batch_parts, reduction_factor
from .._run._checks import check_batch, check_loss, check_model, raise_non_finite
from .._run._devices import check_mesh, place_batch, replicate
from .._run._execute import check_batch_values, remember, warn_if_slow
from ._options import make_options


QUANTITIES = ("hessian", "ggn")
_SETUPS: collections.OrderedDict = collections.OrderedDict()  # per static request


def _check_choice(value, name: str, choices: tuple) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")


def _one(tree):
    """One sample's abstract slice of a batch."""
    return jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(jnp.shape(leaf)[1:], jnp.result_type(leaf)), tree
    )


def _chain_of(model, batch):
    """The model's recurrent structure, or a `TypeError` saying which models have one."""
    try:
        found = describe(model, _one(batch[0]))
    except Unsupported as error:
        found = error
    if not isinstance(found, Recurrent):
        reason = f" ({found})" if isinstance(found, Unsupported) else ""
        raise TypeError(
            "`model` must be a recurrent model with a registered structure, such as "
            "`curvzoo.RNN`, whose time steps the curvature is read along; got "
            f"{type(model).__name__}{reason}."
        )
    return found.chain


def _scales(loss, size: int, prediction_shape: tuple, lengths, per_sample: bool):
    """The loss's reduction factor for the batch, or for each sample alone (`(N,)`)."""
    lengths = None if lengths is None else jnp.asarray(lengths)
    scale = reduction_factor(loss, size, tuple(prediction_shape[1:]), lengths, per_sample)
    return jnp.broadcast_to(jnp.asarray(scale), (size,) if per_sample else ())


def _setup(model, loss, batch, quantity: str, site: str, size: int, options):
    """`(chain, prediction_shape, chunk, work)`: the model's recurrent structure, the
    batch of predictions' shape (targets checked against it), the chunk of samples, from
    `chunk_size` or from one sample's working set (traced, not run) and the budget, and
    the call's work (a `Profile`: one sample's, as traced, times the batch)."""
    chain = _chain_of(model, batch)
    prediction_shape = loss.prediction_shape(model, batch)
    if chain.readout == "all" and AbstractStepwiseLoss not in type(loss).__mro__:
        raise ValueError(
            f"`loss` ({type(loss).__name__}) has no per-step Hessian (it is not an "
            "`AbstractStepwiseLoss`), which a readout at every step needs."
        )
    lane = profile(
        lambda m, l, x: _one_sample(chain, quantity, site, m, l, x), model, loss, _one(tuple(batch))
    )
    chunk = options.chunk_size or max(1, min(size, options.memory_budget // max(lane.bytes, 1)))
    # the samples of a chunk side by side: its steps are one sample's, once per chunk
    work = dataclasses.replace(lane * size, steps=lane.steps * -(-size // int(chunk)))
    return chain, prediction_shape, int(chunk), work


@eqx.filter_jit
def _compute(chain, quantity, site, model, loss, batch, scale, chunk, per_sample, progress, mesh):
    dtype = jnp.result_type(*jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array)))

    def lanes(samples, mask):
        values = jax.vmap(lambda one: _one_sample(chain, quantity, site, model, loss, one))(samples)
        if per_sample:
            return values
        return jnp.tensordot(mask.astype(values.dtype), values, axes=1)

    total = chunked(
        lanes, batch, chunk, reduce="stack" if per_sample else "sum", dtype=dtype, mesh=mesh,
        progress=progress, label="time-step curvature: chunks of samples",
    )  # fmt: skip
    total = total * (jnp.reshape(scale, (-1, 1, 1)) if per_sample else scale)
    total = total.astype(dtype)
    return total, all_finite(total)


@no_type_check
def time_step_curvature(
    model: eqx.Module,
    loss: AbstractLoss,
    batch: PyTree,
    *,
    quantity: str = "hessian",
    site: str = "state",
    per_sample: bool = False,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    check_finite: bool = True,
    mesh: Mesh | None = None,
    progress: bool = False,
) -> Float[Array, "steps size"] | Float[Array, "batch steps size"]:
    """Where in time the loss is curved: for a recurrent model, the diagonal of the
    Hessian (or of the GGN) of the loss with respect to a perturbation added to each
    step's hidden state, or to each step's gate pre-activations.

    Entry `(t, k)` is `d^2 loss / d eps^2` for `eps` added to value `k` of the state
    right after step `t` (everything after it counted: the later steps, the layers
    above and the readout), or to pre-activation `k` at step `t`. It says which steps
    the loss is sensitive to at second order: the steps the readout sees most, and how
    far back the sensitivity reaches. The recurrent kernel's backward sweep holds these
    numbers (`M_t`, see `curvzoo/_kernels/_recurrent.py`), so they cost a fraction of
    [`curvzoo.hessian_diagonal`][].

    **Arguments:**

    - `model`: a zoo `curvzoo.RNN` (any cell, depth, readout, token or float inputs).
    - `loss`: a curvzoo loss (`curvzoo.losses.*`); with `readout="all"`, one that is a
        sum over steps (an `AbstractStepwiseLoss`, as the curvzoo losses are).
    - `batch`: `(inputs, targets)` or `(inputs, targets, lengths)`, as for the loss.
    - `quantity`: `"hessian"` (default) or `"ggn"` (the loss's curvature in the
        outputs only, pulled back: positive semi-definite for the curvzoo losses).
    - `site`: `"state"` (default): every layer's state after each step, `(h,)` or for
        the LSTM `(h, c)`; `"preactivation"`: every layer's gate pre-activations at
        each step (the argument of `tanh` for the Elman cell; of the reset, update and
        new gates' nonlinearities for the GRU; of the input, forget, cell and output
        gates for the LSTM).
    - `per_sample`: if `True`, one result per sample, for the loss of that sample
        alone (`loss(model, batch_n)`), as `per_sample` in
        [`curvzoo.hessian_diagonal`][].
    - `chunk_size`, `memory_budget`, `check_finite`, `mesh`, `progress`: as for
        [`curvzoo.hessian_diagonal`][] (chunks of samples; a `mesh` splits the batch).

    **Returns:**

    An array of shape `(T, size)`, or `(N, T, size)` with `per_sample=True`, in the
    parameters' dtype: `size = L q H` for `site="state"` (layer by layer, first layer
    first, each `(h,)` or `(h, c)`) and `L G H` for `"preactivation"` (layer by layer,
    gate by gate in the cell's order). The loss's reduction scales it as it scales the
    loss (with `"mean"`, by `1 / N`, or over the valid steps with lengths). Steps at or
    past a sequence's length reach no loss term: their entries are zero.

    **Cost:** the recurrent kernel's forward pass, local derivatives and backward sweep
    over the layers' frontier, about `(2 L + 4) L T n^3` multiply-adds per sample for
    `L` layers of state size `n` (`H`, or `2H` for the LSTM), against `L^2 T^2 n^3 / 2`
    for [`curvzoo.hessian_diagonal`][]; memory `T (L n)^2` per sample of a chunk.

    **Example:**

    ```python
    curv = curvzoo.time_step_curvature(model, curvzoo.losses.cross_entropy, (x, y))
    curv.shape                   # (T, hidden_size): one row per step
    curv.sum(axis=1)             # the state's curvature at each step
    ```
    """
    check_model(model)
    check_mesh(model, mesh)
    check_loss(loss)
    if not isinstance(loss, AbstractLoss):
        raise TypeError(
            "`loss` must be a curvzoo loss (`curvzoo.losses.*` or a subclass of "
            "`curvzoo.losses.AbstractLoss`), whose per-step Hessian the curvature per time "
            f"step is built from; got {type(loss).__name__}."
        )
    _check_choice(quantity, "quantity", QUANTITIES)
    _check_choice(site, "site", SITES)
    options = make_options(
        per_sample=per_sample, chunk_size=chunk_size, memory_budget=memory_budget,
        check_finite=check_finite, progress=progress, mesh=mesh,
    )  # fmt: skip
    size = check_batch(batch)
    _, _, lengths = batch_parts(batch)
    # What shapes and static parts decide (the structure, the prediction's shape, the
    # chunk from one sample's traced working set) is worked out once per request.
    key = (
        flatten(model)[1], flatten(loss)[1], flatten(tuple(batch))[1], quantity, site,
        options.per_sample, options.chunk_size, options.memory_budget,
    )  # fmt: skip
    chain, prediction_shape, chunk, work = remember(
        _SETUPS, key, lambda: _setup(model, loss, batch, quantity, site, size, options)
    )
    check_batch_values(loss, prediction_shape, batch, model, key[0])
    warn_if_slow(work, "recurrent", f"this curvature per time step of {type(model).__name__}")
    scale = _scales(loss, size, prediction_shape, lengths, options.per_sample)
    model = replicate(model, mesh)
    batch = place_batch(tuple(batch), mesh, split=True, size=size)
    result, finite = _compute(
        chain, quantity, site, model, loss, batch, scale, int(chunk), options.per_sample,
        options.progress, mesh,
    )  # fmt: skip
    if options.check_finite and not isinstance(finite, jax.core.Tracer) and not bool(finite):
        trees = {"model": model, "batch": batch, "curvature": result}
        raise_non_finite(trees, results=("curvature",))
    return result
