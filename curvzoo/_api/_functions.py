"""The public curvature functions: argument checks, then one kernel each."""

from collections.abc import Callable
from typing import Any, NamedTuple, no_type_check

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jaxtyping import Array, PyTree

from .._kernels._generic import generic_hessian_diagonal, generic_per_sample_hessian_diagonal
from .._kernels._hutchinson import hutchinson_kernel
from .._kernels._layered import structured_diagonal
from .._kernels._ops import check_supported, defining_class, Unsupported
from .._kernels._recurrent import estimated_costs, recurrent_hessian_diagonal
from .._kernels._vjp import outer_diagonal
from .._losses import AbstractElementwiseLoss, AbstractLoss, AbstractStepwiseLoss, split_batch
from .._run._checks import (
    cached,
    check_batch,
    check_key,
    check_loss,
    check_loss_output,
    check_model,
    check_positive_int,
    raise_non_finite,
    split_trainable,
)
from .._run._devices import check_mesh, place_batch, replicate
from .._run._memory import DEFAULT_MEMORY_BUDGET


_METHODS = ("auto", "structured", "generic")


# `method="auto"` takes the recurrent kernel unless its estimated multiply-adds, times this
# margin, exceed the generic kernel's. Measured on 2 CPU cores, the structured kernel ran
# at 0.4-0.5 times the generic kernel's rate (multiply-adds per second) for 8-16 units and
# at 0.8-1.2 times for 64-128; with 2.5, auto picked the faster kernel in every case
# measured (Elman with 2, 3, 4, 8 and 16 units over 64-300 steps, where the estimated
# ratio ran from 0.07 to 3.0, and the GRU/LSTM/Elman grid of the benchmark).
_RECURRENT_MARGIN = 2.5


def _overrides(loss: AbstractLoss, name: str) -> bool:
    return defining_class(type(loss), name) is not AbstractLoss


# Where a loss method may come from without any doubt that it belongs to `per_sample`:
# absent, or written once on a base class in terms of `per_sample` (or, on
# `AbstractElementwiseLoss`, of `element_curvature`).
_DERIVED = (None, AbstractLoss, AbstractElementwiseLoss)

# The closed-form pieces each quantity reads.
_PIECES = {
    "hessian": ("element_curvature", "output_hessian_factor", "output_hessian_step_factor"),
    "ggn": ("output_hessian_factor",),
    "gradients": (),
}


def _inherited(loss: AbstractLoss, name: str) -> str | None:
    """Why `loss`'s method `name` may not belong to its `per_sample`: it comes from a
    class whose `per_sample` a subclass has overridden. `None` if it belongs."""
    cls = type(loss)
    where = defining_class(cls, name)
    if where in _DERIVED or issubclass(where, defining_class(cls, "per_sample")):
        return None
    return (
        f"`loss` ({cls.__name__}) overrides `per_sample` but inherits `{name}` from "
        f"{where.__name__}, which may not match it"
    )


def _factor_mismatch(loss: AbstractLoss, quantity: str) -> str | None:
    """Why the closed-form curvature that `quantity` reads may not be that of
    `loss.per_sample`; `None` if it is."""
    names = _PIECES[quantity]
    if quantity == "ggn" and defining_class(type(loss), names[0]) is AbstractElementwiseLoss:
        names = ("element_curvature",)  # the factor is built from it
    for name in names:
        mismatch = _inherited(loss, name)
        if mismatch is not None:
            return mismatch
    return None


def _loss_mismatch(loss: AbstractLoss, quantity: str) -> str | None:
    """Why the structured kernels, which rebuild the loss from `per_sample`, `scale` and
    its closed-form curvature, would not compute `quantity` of `loss(model, batch)`;
    `None` if they do."""
    for name in ("__call__", "predict"):
        if _overrides(loss, name):
            return (
                f"`loss` ({type(loss).__name__}) overrides `{name}`, which the structured "
                "kernels do not call"
            )
    return _factor_mismatch(loss, quantity)


def _structured_kernel(model, loss, quantity: str) -> tuple[Callable | None, str | None]:
    """The structured kernel that computes `quantity` for `(model, loss)`, or `None` and
    the reason."""
    if not isinstance(loss, AbstractLoss):
        return None, (
            "`loss` is a custom callable; the structured kernel needs a curvzoo loss "
            "(`curvzoo.losses.*`), which exposes its per-sample form"
        )
    mismatch = _loss_mismatch(loss, quantity)
    if mismatch is not None:
        return None, mismatch
    try:
        kind = cached("structure", lambda: check_supported(model), model)
    except Unsupported as error:
        return None, f"`model` has a part the structured kernel does not support: {error}"
    if kind == "layered":
        return structured_diagonal, None
    if not isinstance(loss, AbstractStepwiseLoss):
        return None, (
            f"`loss` ({type(loss).__name__}) defines no per-step Hessian factor (it is not "
            "an `AbstractStepwiseLoss`), which the recurrent kernel needs"
        )
    return recurrent_hessian_diagonal, None


def _check_bool(value: Any, name: str) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be True or False, got {value!r}.")


def _check_method(method: Any) -> None:
    if method not in _METHODS:
        raise ValueError(f"`method` must be one of {_METHODS}, got {method!r}.")


class _Setup(NamedTuple):
    """What every function needs after the shared checks."""

    model: eqx.Module  # replicated on `mesh` when one is given
    params: PyTree
    static: PyTree
    prediction_shape: tuple | None  # of the whole batch; `None` for a callable loss
    chunk_size: int | None
    memory_budget: int
    check_finite: bool
    progress: bool
    mesh: Mesh | None

    def check(self, batch: PyTree) -> PyTree | None:
        """What `_call_kernel` checks for finiteness: `(model, batch)`, or nothing."""
        return (self.model, batch) if self.check_finite else None


def _setup(
    model, loss, batch, filter_spec, chunk_size, memory_budget, check_finite, progress, mesh
) -> _Setup:
    """The checks every function shares, in the order a user would fix them; the model
    is placed on `mesh`, and the default budget filled in."""
    check_model(model)
    check_mesh(model, mesh)
    model = replicate(model, mesh)
    check_loss(loss)
    check_positive_int(chunk_size, "chunk_size", allow_none=True)
    check_positive_int(memory_budget, "memory_budget", allow_none=True)
    check_batch(batch)
    _check_bool(check_finite, "check_finite")
    _check_bool(progress, "progress")
    params, static = split_trainable(model, filter_spec)
    prediction_shape = check_loss_output(loss, model, batch)
    if memory_budget is None:
        memory_budget = DEFAULT_MEMORY_BUDGET
    chunk_size = None if chunk_size is None else int(chunk_size)
    return _Setup(
        model, params, static, prediction_shape, chunk_size, int(memory_budget),
        check_finite, progress, mesh,
    )  # fmt: skip


def _checked_leaves(tree: PyTree) -> list:
    return [leaf for leaf in jax.tree.leaves(tree) if eqx.is_inexact_array(leaf) and leaf.size]


@eqx.filter_jit
def _run_checked(kernel: Callable, args: tuple, kwargs: dict, inputs: PyTree):
    """`kernel(*args, **kwargs)` and, in the same compiled program, whether every
    floating-point array of `inputs` and of the result is finite (one flag per array)."""
    result = kernel(*args, **kwargs)
    leaves = _checked_leaves((inputs, result))
    flags = jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves])
    return result, flags


def _call_kernel(kernel: Callable, *args, check: PyTree | None = None, **kwargs):
    """`(kernel(*args, **kwargs), flags)`; with `check` (the `(model, batch)` to check),
    the finiteness flags of `check` and of the result are computed with the kernel, so
    `check_finite` costs one tiny transfer, not another pass and dispatch."""
    if check is None:
        return kernel(*args, **kwargs), None
    return _run_checked(kernel, args, kwargs, check)


def _finite_result(result: PyTree, flags, setup: _Setup, batch: PyTree) -> PyTree:
    """`result`, after reading the finiteness `flags` of `setup.check(batch)` and of
    `result` (`None` when not checked, a tracer under an outer `jax.jit`); on a failure
    the leaf is found and named."""
    if flags is None or isinstance(flags, jax.core.Tracer) or np.asarray(flags).all():
        return result
    trees = {"model": setup.model, "batch": batch, "diagonal": result}
    raise_non_finite(trees, results=("diagonal",))
    return result


def _scale(loss: AbstractLoss, prediction_shape: tuple, per_sample: bool) -> float:
    """The reduction's factor for the whole batch, or for a batch of one sample
    (remembered per loss and shape: a method call on an Equinox module costs tens of
    microseconds)."""

    def compute():
        return loss.scale(1 if per_sample else prediction_shape[0], prediction_shape[1:])

    if jax.tree.leaves(loss):  # array fields could enter the scale by value
        return compute()
    return cached("scale", compute, loss, prediction_shape, per_sample)


def _require_per_sample_form(loss, name: str, *, factor: bool, sampler: bool = False) -> None:
    """The GGN family works from `scale * sum_n per_sample(predict(model, x)_n, y_n)`:
    `loss` must be a curvzoo loss whose `__call__` computes that, with (for `factor`) a
    loss-Hessian factor that belongs to its `per_sample` and (for `sampler`) a
    `sample_targets` method."""
    if not isinstance(loss, AbstractLoss):
        raise TypeError(
            f"`loss` for {name} must be a curvzoo loss (`curvzoo.losses.*` or a subclass of "
            "`curvzoo.losses.AbstractLoss`), which exposes its per-sample form; got a "
            f"custom callable of type {type(loss).__name__}."
        )
    if _overrides(loss, "__call__"):
        raise ValueError(
            f"`loss` ({type(loss).__name__}) overrides `__call__`; {name} works from the "
            "loss's per-sample form, `scale * sum of per_sample(predict(model, inputs))`, "
            "which `__call__` then need not compute."
        )
    mismatch = _factor_mismatch(loss, "ggn") if factor else None
    if mismatch is not None:
        raise ValueError(f"{mismatch}; override `output_hessian_factor` too, to use {name}.")
    mismatch = _inherited(loss, "sample_targets") if sampler else None
    if mismatch is not None:
        raise ValueError(f"{mismatch}; override `sample_targets` too, to use {name}.")
    if sampler and not callable(getattr(loss, "sample_targets", None)):
        raise TypeError(
            f"`loss` ({type(loss).__name__}) for {name} needs a method "
            "`sample_targets(key, prediction)` that draws one sample's targets from the "
            "model's predictive distribution; the curvzoo losses define it."
        )


def _hessian_kernel(model, loss, batch, params, method: str) -> Callable | None:
    """The structured kernel that `method` picks for the Hessian, or `None` for the
    generic one."""
    if method == "generic":
        return None
    kernel, reason = _structured_kernel(model, loss, "hessian")
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
    return kernel


def _squared_columns(setup: _Setup, loss, batch, method, quantity, per_sample):
    """A diagonal of the form `sum_k w_k (J^T c_k)^2` per sample (GGN, Fisher, empirical
    Fisher): the layered structured kernel where it applies, else one vector-Jacobian
    product per column and sample. **Returns:** `(result, finiteness flags)`."""
    kernel = outer_diagonal
    if method != "generic":
        structured, reason = _structured_kernel(setup.model, loss, quantity)
        if structured is structured_diagonal:
            kernel = structured_diagonal
        elif method == "structured":
            if structured is recurrent_hessian_diagonal:
                reason = (
                    "the zoo RNN has a structured kernel for the Hessian only; this "
                    "diagonal takes `C` vector-Jacobian products per sample (`T C` for a "
                    "per-step readout) with `method='generic'`, which `'auto'` picks"
                )
            raise ValueError(
                f"`method='structured'` cannot be used here: {reason}. Use "
                "`method='auto'` or `method='generic'`."
            )
    scale = _scale(loss, setup.prediction_shape, per_sample)
    return _call_kernel(
        kernel, setup.params, setup.static, loss, batch, scale, setup.chunk_size,
        setup.memory_budget, quantity, per_sample, progress=setup.progress,
        check=setup.check(batch),
    )  # fmt: skip


@eqx.filter_jit
def _sampled_targets(loss, model, inputs, key, num_samples: int):
    """`(N, num_samples, *target)` targets drawn from the model's predictions."""
    predictions = jax.lax.stop_gradient(loss.predict(model, inputs))

    def draws(sample_key, prediction):
        keys = jax.random.split(sample_key, num_samples)
        return jax.vmap(lambda k: loss.sample_targets(k, prediction))(keys)

    return jax.vmap(draws)(jax.random.split(key, predictions.shape[0]), predictions)


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
    per_sample: bool = False,
    check_finite: bool = True,
    mesh: Mesh | None = None,
    progress: bool = False,
) -> PyTree:
    """The exact diagonal of the Hessian of `loss(model, batch)` with respect to the
    trainable parameters of `model`.

    **Arguments:**

    - `model`: any Equinox module (a zoo model or your own). It is not modified.
    - `loss`: a curvzoo loss such as `curvzoo.losses.cross_entropy`, or any callable
        `loss(model, batch) -> scalar`. Pass the same callable object each time so that
        the compiled kernel is reused.
    - `batch`: a PyTree of arrays sharing a leading batch axis `N`; for curvzoo losses a
        pair `(inputs, targets)`.
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
    - `per_sample`: if `True`, one diagonal per sample instead: sample `n`'s is the
        Hessian diagonal of `loss(model, batch_n)`, with `batch_n` the batch of that
        sample alone. For a curvzoo loss the batch's diagonal is then the mean of the
        per-sample ones (`reduction="mean"`) or their sum (`"sum"`).
    - `check_finite`: if `True` (default), raise a `ValueError` naming the leaf when
        `model` or `batch` holds NaN or inf, or when the result does (the loss or its
        derivatives overflow). The flags are computed with the kernel, in the same
        compiled program (one pass over the arrays, a few bytes to the host), and read
        after it; under an outer `jax.jit` the values are not known and nothing is
        checked.
    - `mesh`: a `jax.sharding.Mesh` to run on several devices. The model is
        replicated. Kernels that work sample by sample (structured, GGN family,
        per-sample) split the batch along its leading axis over all of the mesh's
        devices (its size must divide evenly), so every device handles its share of
        the samples; the generic kernel and Hutchinson instead split each chunk of
        basis vectors or probes over the devices, each of which sees the whole batch.
        XLA (GSPMD) partitions the work. Leaves already placed on `mesh` keep their
        sharding. For several hosts, call
        `jax.distributed.initialize()` first and pass a mesh over `jax.devices()` and
        a batch of global arrays (`jax.make_array_from_process_local_data`).
    - `progress`: if `True`, print a progress line to standard error while the kernel
        runs (chunks or entries done, rate, time left), from inside the compiled loop
        with `jax.debug.callback`. Off by default; it changes nothing in the result, and
        with `False` the compiled code has no callback at all.

    **Returns:**

    A PyTree with the structure of `equinox.filter(model, filter_spec)`, as
    `equinox.filter_grad` returns: at each trained leaf an array of that leaf's shape
    and dtype holding the diagonal of the Hessian for that leaf's entries; `None` at
    frozen leaves and at leaves that are not floating-point arrays. With
    `per_sample=True` every array gains a leading axis of size `N`.

    **Cost:** the generic kernel (any Equinox module, any loss) takes one
    Hessian-vector product per trained parameter, `P` in all, batched in chunks; never a
    `P x P` matrix. The structured kernel for zoo `MLP` and `CNN` with a curvzoo loss
    backpropagates the loss Hessian's rank-`C` factor and the activations' diagonal
    residuals layer by layer: about `C` extra backward passes for a two-hidden-layer
    MLP, plus full Jacobian products for residuals two or more dense layers up. For the
    zoo `RNN` (Elman, GRU, LSTM; either readout) it works with the same-unit blocks of
    the Hessian with respect to per-step state perturbations, the state Jacobians and
    the BPTT adjoints: about `T^2 H^3` work per sample for `T` steps and `H` units,
    against `T H^4` for the generic kernel. With `per_sample=True` the structured
    kernels cost the same and the generic kernel takes `P` products per sample, each
    on one sample; the result holds `N P` numbers.

    **Example:**

    ```python
    model = curvzoo.MLP(4, 3, width_size=8, depth=1, key=jax.random.key(0))
    diag = curvzoo.hessian_diagonal(model, curvzoo.losses.cross_entropy, (x, labels))
    diag.layers[0].weight.shape  # (8, 4)
    ```
    """
    _check_method(method)
    _check_bool(per_sample, "per_sample")
    setup = _setup(
        model, loss, batch, filter_spec, chunk_size, memory_budget, check_finite, progress, mesh
    )
    params, static = setup.params, setup.static
    kernel = _hessian_kernel(setup.model, loss, batch, params, method)
    # The generic kernel splits its basis vectors over the devices; the others the batch.
    batch = place_batch(batch, mesh, split=kernel is not None or per_sample)
    sizes = (setup.chunk_size, setup.memory_budget)
    options = dict(progress=progress, check=setup.check(batch))
    if kernel is None and per_sample:
        generic = generic_per_sample_hessian_diagonal
        result, flags = _call_kernel(generic, params, static, loss, batch, *sizes, **options)
    elif kernel is None:
        generic = generic_hessian_diagonal
        options["mesh"] = mesh
        result, flags = _call_kernel(generic, params, static, loss, batch, *sizes, **options)
    else:
        scale = _scale(loss, setup.prediction_shape, per_sample)
        result, flags = _call_kernel(
            kernel, params, static, loss, batch, scale, *sizes, keep_samples=per_sample, **options
        )
    return _finite_result(result, flags, setup, batch)


@no_type_check
def ggn_diagonal(
    model: eqx.Module,
    loss: AbstractLoss,
    batch: PyTree,
    *,
    filter_spec: PyTree | Callable = eqx.is_inexact_array,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    method: str = "auto",
    per_sample: bool = False,
    check_finite: bool = True,
    mesh: Mesh | None = None,
    progress: bool = False,
) -> PyTree:
    """The exact diagonal of the generalised Gauss-Newton matrix
    `G = scale * sum_n J_n^T H_n J_n`, where `J_n` is the Jacobian of sample `n`'s
    prediction in the trainable parameters and `H_n` the Hessian of its per-sample loss
    in that prediction (Schraudolph 2002).

    `G` is the Hessian without the network's own second derivatives: it equals the
    Hessian for a model linear in its parameters, and its diagonal equals the
    Hessian's for a piecewise-linear feed-forward network (ReLU), whatever the loss
    (the off-diagonal blocks differ). It is positive semi-definite for the curvzoo
    losses, and the expectation of the Fisher (`curvzoo.fisher_diagonal`).

    **Arguments:**

    - `model`: any Equinox module that maps one example to one prediction. It is not
        modified.
    - `loss`: a curvzoo loss (`curvzoo.losses.*` or an `AbstractLoss` subclass); the
        GGN needs its split into a prediction and a per-sample loss, which a plain
        callable does not expose.
    - `batch`: a pair `(inputs, targets)` whose leaves share a leading batch axis `N`.
    - `filter_spec`, `chunk_size` (samples per chunk), `memory_budget`,
        `check_finite`, `mesh`, `progress`: as for [`curvzoo.hessian_diagonal`][].
    - `method`: `"auto"` (default) or `"structured"` take the layered structured kernel
        for a zoo `MLP` or `CNN` (`"structured"` raises where it does not apply);
        `"generic"` uses vector-Jacobian products, for any model. Both are exact.
    - `per_sample`: if `True`, one diagonal per sample, of `loss(model, batch_n)` for
        the batch of that sample alone, as in [`curvzoo.hessian_diagonal`][].

    **Returns:**

    A PyTree with the structure of `equinox.filter(model, filter_spec)`: the diagonal at
    each trained leaf (its shape and dtype), `None` elsewhere; with `per_sample=True`
    each array gains a leading axis of size `N`.

    **Cost:** never `P` products. The generic route takes, per sample, one forward pass
    and one vector-Jacobian product per column of a square root of `H_n` (`C` columns for
    `C` outputs: cross-entropy, MSE, BCE; `T C` for a per-step readout over `T` steps),
    with that many parameter-sized gradients per sample of a chunk in memory. The
    structured route for `MLP` and `CNN` pulls the same `C` columns down the layers as
    matrix products and contracts each dense layer with its squared inputs in one matrix
    product over the batch, never forming a per-sample gradient of a dense layer (a
    convolution takes `C` per-sample weight gradients).

    **Example:**

    ```python
    ggn = model.ggn_diagonal(curvzoo.losses.cross_entropy, (x, labels))
    ```
    """
    _check_method(method)
    _check_bool(per_sample, "per_sample")
    setup = _setup(
        model, loss, batch, filter_spec, chunk_size, memory_budget, check_finite, progress, mesh
    )
    _require_per_sample_form(loss, "`ggn_diagonal`", factor=True)
    batch = place_batch(batch, mesh, split=True)
    result, flags = _squared_columns(setup, loss, batch, method, "ggn", per_sample)
    return _finite_result(result, flags, setup, batch)


@no_type_check
def empirical_fisher_diagonal(
    model: eqx.Module,
    loss: AbstractLoss,
    batch: PyTree,
    *,
    filter_spec: PyTree | Callable = eqx.is_inexact_array,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    method: str = "auto",
    per_sample: bool = False,
    check_finite: bool = True,
    mesh: Mesh | None = None,
    progress: bool = False,
) -> PyTree:
    """The diagonal of the empirical Fisher, `scale * sum_n g_n^2`, with `g_n` the
    gradient of sample `n`'s per-sample loss at its own target.

    **Scaling:** `scale` is the loss's reduction factor, as in the loss itself and in
    [`curvzoo.ggn_diagonal`][]: `1` for `reduction="sum"`, `1 / (N * elements)` for
    `"mean"`. So the empirical Fisher and the GGN are on the same scale, and where the
    targets were drawn from the model (see [`curvzoo.fisher_diagonal`][]) the
    empirical Fisher's expectation is the GGN diagonal. With real targets it is not
    (Kunstner, Balles and Hennig 2019): it is the squared-gradient statistic that Adam
    and many pruning criteria use.

    **Arguments:**

    - `model`: any Equinox module that maps one example to one prediction. It is not
        modified.
    - `loss`: a curvzoo loss (`curvzoo.losses.*` or an `AbstractLoss` subclass).
    - `batch`: a pair `(inputs, targets)` whose leaves share a leading batch axis `N`.
    - `filter_spec`, `chunk_size` (samples per chunk), `memory_budget`,
        `check_finite`, `mesh`, `progress`: as for [`curvzoo.hessian_diagonal`][].
    - `method`: as for [`curvzoo.ggn_diagonal`][].
    - `per_sample`: if `True`, the squared gradients one sample at a time: sample `n`'s
        entry is the empirical Fisher of the batch of that sample alone,
        `scale(1) * g_n^2`; the batch's diagonal is their mean (`reduction="mean"`) or
        sum (`"sum"`).

    **Returns:**

    A PyTree with the structure of `equinox.filter(model, filter_spec)`: the diagonal at
    each trained leaf, `None` elsewhere; with `per_sample=True` each array gains a
    leading axis of size `N`.

    **Cost:** one gradient column per sample: for `MLP` and `CNN` about two gradients
    (dense layers contract the squared inputs and squared output gradients in one
    matrix product, never forming a per-sample gradient); otherwise one
    vector-Jacobian product per sample, `jax.vmap`ped in chunks.
    """
    _check_method(method)
    _check_bool(per_sample, "per_sample")
    setup = _setup(
        model, loss, batch, filter_spec, chunk_size, memory_budget, check_finite, progress, mesh
    )
    _require_per_sample_form(loss, "`empirical_fisher_diagonal`", factor=False)
    inputs, targets = split_batch(place_batch(batch, mesh, split=True))
    one_draw = (inputs, jnp.asarray(targets)[:, None])
    result, flags = _squared_columns(setup, loss, one_draw, method, "gradients", per_sample)
    return _finite_result(result, flags, setup, one_draw)


@no_type_check
def fisher_diagonal(
    model: eqx.Module,
    loss: AbstractLoss,
    batch: PyTree,
    *,
    key: Array,
    num_samples: int = 1,
    filter_spec: PyTree | Callable = eqx.is_inexact_array,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    method: str = "auto",
    check_finite: bool = True,
    mesh: Mesh | None = None,
    progress: bool = False,
) -> PyTree:
    """A Monte-Carlo estimate of the Fisher information's diagonal: for every sample,
    `num_samples` targets are drawn from the model's predictive distribution, and the
    squared gradients at those targets are averaged,
    `scale * sum_n mean_s (grad per_sample(f_n, y_ns))^2`.

    The draws come from `loss.sample_targets`: a categorical on the softmax for
    cross-entropy, a Bernoulli on the sigmoid for BCE, and `Normal(f, 1/2)` for MSE, the
    Gaussian whose negative log-likelihood MSE is up to a constant. With these, the
    expectation is exactly the GGN diagonal ([`curvzoo.ggn_diagonal`][]), on the same
    scale; the estimate is unbiased for it, and non-negative.

    **Arguments:**

    - `model`: any Equinox module that maps one example to one prediction. It is not
        modified.
    - `loss`: a curvzoo loss with a `sample_targets` method (all of
        `curvzoo.losses.*`).
    - `batch`: a pair `(inputs, targets)` whose leaves share a leading batch axis `N`;
        the targets are checked like everywhere else but not used.
    - `key`: a JAX PRNG key (keyword-only, required). The same key gives the same
        result.
    - `num_samples`: targets drawn per sample (default 1).
    - `filter_spec`, `chunk_size` (samples per chunk), `memory_budget`,
        `check_finite`, `mesh`, `progress`: as for [`curvzoo.hessian_diagonal`][].
    - `method`: as for [`curvzoo.ggn_diagonal`][].

    **Returns:**

    A PyTree with the structure of `equinox.filter(model, filter_spec)`: the estimate at
    each trained leaf, `None` elsewhere.

    **Cost:** one forward pass to draw the targets, then `num_samples` gradient columns
    per sample, as in [`curvzoo.empirical_fisher_diagonal`][].
    """
    check_key(key)
    check_positive_int(num_samples, "num_samples")
    _check_method(method)
    setup = _setup(
        model, loss, batch, filter_spec, chunk_size, memory_budget, check_finite, progress, mesh
    )
    _require_per_sample_form(loss, "`fisher_diagonal`", factor=False, sampler=True)
    inputs, targets = split_batch(place_batch(batch, mesh, split=True))
    drawn = _sampled_targets(loss, setup.model, inputs, key, int(num_samples))
    expected = jnp.shape(targets)[1:]
    if drawn.shape[2:] != expected:
        raise ValueError(
            f"`loss.sample_targets` must return one sample's targets, of shape {expected}; "
            f"it returned shape {drawn.shape[2:]}."
        )
    drawn_batch = (inputs, drawn)
    result, flags = _squared_columns(setup, loss, drawn_batch, method, "gradients", False)
    return _finite_result(result, flags, setup, drawn_batch)


@no_type_check
def hutchinson_diagonal(
    model: eqx.Module,
    loss: Callable,
    batch: PyTree,
    *,
    key: Array,
    num_probes: int,
    control_variate: str | None = None,
    return_stderr: bool = False,
    filter_spec: PyTree | Callable = eqx.is_inexact_array,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    check_finite: bool = True,
    mesh: Mesh | None = None,
    progress: bool = False,
) -> PyTree | tuple[PyTree, PyTree]:
    """Hutchinson's unbiased estimate of the Hessian diagonal, `mean(z * (H z))` over
    Rademacher probes `z` (Bekas, Kokiopoulou and Saad 2007; as in AdaHessian, Yao et
    al. 2021).

    With `control_variate="ggn"` the probes estimate `diag(H - G)` instead and the
    exact GGN diagonal ([`curvzoo.ggn_diagonal`][]) is added back. The estimate stays
    unbiased; its variance, `sum_{j != i} (H - G)_ij^2 / num_probes` for entry `i`
    instead of `sum_{j != i} H_ij^2 / num_probes`, is much lower where the Hessian is
    close to the GGN: least squares near a fit, where the residuals that `H - G` is
    made of vanish. Under cross-entropy it typically does not help, as the loss's own
    Hessian shrinks with the residuals too (see the benchmark in the README).

    **Arguments:**

    - `model`: any Equinox module. It is not modified.
    - `loss`: a curvzoo loss or any callable `loss(model, batch) -> scalar`; the control
        variate needs a curvzoo loss.
    - `batch`: a PyTree of arrays sharing a leading batch axis; for curvzoo losses a
        pair `(inputs, targets)`.
    - `key`: a JAX PRNG key (keyword-only, required). Probe `i` comes from
        `jax.random.split(key, num_probes)[i]`: the same key gives the same result, and
        the same probes whatever `chunk_size` (results then agree to rounding).
    - `num_probes`: how many probes to average (at least 2 with `return_stderr`).
    - `control_variate`: `None` (default) or `"ggn"`.
    - `return_stderr`: if `True`, also return the standard error of each entry, the
        sample standard deviation over probes divided by `sqrt(num_probes)`.
    - `filter_spec`, `memory_budget`, `check_finite`, `mesh`, `progress`: as for
        [`curvzoo.hessian_diagonal`][].
    - `chunk_size`: probes evaluated together with `jax.vmap`; `None` (default) picks
        the largest chunk that fits `memory_budget`.

    **Returns:**

    A PyTree with the structure of `equinox.filter(model, filter_spec)`: the estimate at
    each trained leaf, `None` elsewhere. With `return_stderr=True`, a pair
    `(estimate, stderr)` of two such PyTrees.

    **Cost:** one Hessian-vector product per probe (about two gradients), plus with the
    control variate one Gauss-Newton-vector product per probe (about one more gradient)
    and one exact GGN diagonal. Memory does not grow with `num_probes`: chunks of
    probes are reduced to a running mean and variance as they go.

    **Example:**

    ```python
    estimate, stderr = curvzoo.hutchinson_diagonal(
        model, loss, batch, key=jax.random.key(0), num_probes=16,
        control_variate="ggn", return_stderr=True,
    )
    ```
    """
    check_key(key)
    check_positive_int(num_probes, "num_probes")
    if control_variate not in (None, "ggn"):
        raise ValueError(f"`control_variate` must be None or 'ggn', got {control_variate!r}.")
    _check_bool(return_stderr, "return_stderr")
    if return_stderr and num_probes < 2:
        raise ValueError(
            f"`return_stderr=True` needs `num_probes` >= 2 to estimate a spread, got {num_probes}."
        )
    setup = _setup(
        model, loss, batch, filter_spec, chunk_size, memory_budget, check_finite, progress, mesh
    )
    subtract = control_variate == "ggn"
    if subtract:
        _require_per_sample_form(loss, "`hutchinson_diagonal(control_variate='ggn')`", factor=True)
    scale = _scale(loss, setup.prediction_shape, False) if subtract else 1.0
    # Hutchinson splits its probes over the devices; every device sees the whole batch.
    batch = place_batch(batch, mesh, split=False)
    (estimate, stderr), flags = _call_kernel(
        hutchinson_kernel, setup.params, setup.static, loss, batch, scale, key,
        int(num_probes), subtract, setup.chunk_size, setup.memory_budget,
        progress=progress, mesh=mesh, check=setup.check(batch),
    )  # fmt: skip
    if subtract:
        # `chunk_size` counts probes here; the exact GGN picks its own chunk of samples.
        ggn_setup = setup._replace(chunk_size=None)
        exact, ggn_flags = _squared_columns(ggn_setup, loss, batch, "auto", "ggn", False)
        _finite_result(exact, ggn_flags, setup, batch)
        estimate = jax.tree.map(jnp.add, estimate, exact)
    _finite_result((estimate, stderr), flags, setup, batch)
    return (estimate, stderr) if return_stderr else estimate
