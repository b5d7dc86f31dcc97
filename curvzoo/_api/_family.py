"""The GGN family: `ggn_diagonal`, `empirical_fisher_diagonal`, `fisher_diagonal`."""

from collections.abc import Callable
from typing import no_type_check

import equinox as eqx
from jax.sharding import Mesh
from jaxtyping import Array, PyTree

from .._estimators import EmpiricalFisher, from_names, GGN
from .._losses import AbstractLoss
from ._diagonal import diagonal


_GGN, _EMPIRICAL_FISHER = GGN(), EmpiricalFisher()  # built once (about 10 us each)


@no_type_check
def ggn_diagonal(
    model: eqx.Module,
    loss: AbstractLoss,
    batch: PyTree,
    *,
    args: PyTree | None = None,
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
    in that prediction (Schraudolph 2002): [`curvzoo.diagonal`][] with `curvzoo.GGN()`.

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
    - `batch`: a pair `(inputs, targets)` whose leaves share a leading batch axis `N`,
        or a triple `(inputs, targets, lengths)` for sequences of different lengths.
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

    **Precision:** as [`curvzoo.hessian_diagonal`][]: each leaf in its parameter's
    dtype, per-sample terms in the model's precision, sums over samples in at least
    float32.

    **Cost:** never `P` products. The generic route takes, per sample, one forward pass
    and one vector-Jacobian product per column of a square root of `H_n` (`C` columns for
    `C` outputs with MSE and BCE, `C - 1` with cross-entropy; `T` times as many for a
    per-step readout over `T` steps),
    with that many parameter-sized gradients per sample of a chunk in memory. The
    structured route for `MLP` and `CNN` pulls the same columns down the layers as
    matrix products and contracts each dense layer with its squared inputs in one matrix
    product over the batch, never forming a per-sample gradient of a dense layer (a
    convolution takes `C` per-sample weight gradients). For the zoo `RNN` the recurrent
    kernel without its node Hessians (about `L^2 T^2 n^3 / 2` multiply-adds per sample)
    competes with the vector-Jacobian products, and the plan takes the cheaper: the
    recurrent kernel for many outputs at every step (a language model), the products
    for a few outputs on the last state.

    **Example:**

    ```python
    ggn = model.ggn_diagonal(curvzoo.losses.cross_entropy, (x, labels))
    ```
    """

    return diagonal(
        model, loss, batch, _GGN, per_sample=per_sample, args=args, filter_spec=filter_spec,
        chunk_size=chunk_size, memory_budget=memory_budget, method=method,
        check_finite=check_finite, mesh=mesh, progress=progress,
    )  # fmt: skip


@no_type_check
def empirical_fisher_diagonal(
    model: eqx.Module,
    loss: AbstractLoss,
    batch: PyTree,
    *,
    args: PyTree | None = None,
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
    gradient of sample `n`'s per-sample loss at its own target: [`curvzoo.diagonal`][]
    with `curvzoo.EmpiricalFisher()`.

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
    - `batch`: a pair `(inputs, targets)` whose leaves share a leading batch axis `N`,
        or a triple `(inputs, targets, lengths)` for sequences of different lengths.
    - `filter_spec`, `chunk_size` (samples per chunk), `memory_budget`,
        `check_finite`, `mesh`, `progress`: as for [`curvzoo.hessian_diagonal`][].
    - `method`: as for [`curvzoo.ggn_diagonal`][].
    - `per_sample`: if `True`, the squared gradients one sample at a time: sample `n`'s
        entry is the empirical Fisher of the batch of that sample alone,
        `scale(1) * g_n^2`; the batch's diagonal is their sum (`reduction="sum"`) or
        mean (`"mean"`), weighted by length with lengths and per-step targets, as in
        [`curvzoo.hessian_diagonal`][].

    **Returns:**

    A PyTree with the structure of `equinox.filter(model, filter_spec)`: the diagonal at
    each trained leaf, `None` elsewhere; with `per_sample=True` each array gains a
    leading axis of size `N`.

    **Precision:** as [`curvzoo.hessian_diagonal`][]: each leaf in its parameter's
    dtype, per-sample terms in the model's precision, sums over samples in at least
    float32.

    **Cost:** one gradient column per sample: for `MLP` and `CNN` about two gradients
    (dense layers contract the squared inputs and squared output gradients in one
    matrix product, never forming a per-sample gradient); otherwise one
    vector-Jacobian product per sample, `jax.vmap`ped in chunks.
    """

    return diagonal(
        model, loss, batch, _EMPIRICAL_FISHER, per_sample=per_sample, args=args,
        filter_spec=filter_spec, chunk_size=chunk_size, memory_budget=memory_budget, method=method,
        check_finite=check_finite, mesh=mesh, progress=progress,
    )  # fmt: skip


@no_type_check
def fisher_diagonal(
    model: eqx.Module,
    loss: AbstractLoss,
    batch: PyTree,
    *,
    key: Array,
    num_samples: int = 1,
    args: PyTree | None = None,
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
    `scale * sum_n mean_s (grad per_sample(f_n, y_ns))^2`: [`curvzoo.diagonal`][] with
    `curvzoo.Fisher(num_samples)`.

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
    - `batch`: a pair `(inputs, targets)` whose leaves share a leading batch axis `N`
        (or a triple with lengths); the targets are checked like everywhere else but not used.
    - `key`: a JAX PRNG key (keyword-only, required). The same key gives the same
        result.
    - `num_samples`: targets drawn per sample (default 1).
    - `filter_spec`, `chunk_size` (samples per chunk), `memory_budget`,
        `check_finite`, `mesh`, `progress`: as for [`curvzoo.hessian_diagonal`][].
    - `method`: as for [`curvzoo.ggn_diagonal`][].

    **Returns:**

    A PyTree with the structure of `equinox.filter(model, filter_spec)`: the estimate at
    each trained leaf, `None` elsewhere.

    **Precision:** as [`curvzoo.hessian_diagonal`][]: each leaf in its parameter's
    dtype, per-sample terms in the model's precision, sums over samples in at least
    float32.

    **Cost:** one forward pass to draw the targets, then `num_samples` gradient columns
    per sample, as in [`curvzoo.empirical_fisher_diagonal`][].
    """

    return diagonal(
        model, loss, batch, from_names("fisher", num_samples=num_samples), key=key, args=args,
        filter_spec=filter_spec,
        chunk_size=chunk_size, memory_budget=memory_budget, method=method,
        check_finite=check_finite, mesh=mesh, progress=progress,
    )  # fmt: skip
