"""`curvzoo.hutchinson_diagonal`."""

from collections.abc import Callable
from typing import no_type_check

import equinox as eqx
from jax.sharding import Mesh
from jaxtyping import Array, PyTree

from .._estimators import Estimate, from_names
from ._diagonal import diagonal


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
    args: PyTree | None = None,
    filter_spec: PyTree | Callable = eqx.is_inexact_array,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    check_finite: bool = True,
    mesh: Mesh | None = None,
    progress: bool = False,
) -> PyTree | Estimate:
    """Hutchinson's unbiased estimate of the Hessian diagonal, `mean(z * (H z))` over
    Rademacher probes `z` (Bekas, Kokiopoulou and Saad 2007; as in AdaHessian, Yao et
    al. 2021): [`curvzoo.diagonal`][] with
    `curvzoo.Hutchinson(num_probes, control_variate)`.

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
        pair `(inputs, targets)`, or a triple `(inputs, targets, lengths)` for sequences
        of different lengths (`curvzoo.losses`).
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
        the largest chunk that fits `memory_budget` and holds about 5e8 operations
        (each probe is a product over the whole batch, so more at once only grows the
        working set: on `mlp2`, 16 probes take 45 ms in chunks of 4 and 72 ms in one
        chunk).

    **Returns:**

    A PyTree with the structure of `equinox.filter(model, filter_spec)`: the estimate at
    each trained leaf, `None` elsewhere. With `return_stderr=True`, an
    [`curvzoo.Estimate`][] of two such PyTrees, which unpacks as the pair
    `estimate, stderr`.

    **Precision:** each leaf in its parameter's dtype; the probes' products are in the
    model's precision, their mean and standard error accumulated in at least float32.

    **Cost:** one Hessian-vector product per probe, plus with the control variate one
    Gauss-Newton-vector product per probe and one exact GGN diagonal. Measured on the
    `mlp2` benchmark row (`python -m benchmarks --rows probe-cost`): 4.0 gradients per
    probe, 4.9 with the control variate (its exact GGN included, over 16 probes).
    Memory does not grow with `num_probes`: chunks of probes are reduced to a running
    mean and variance as they go.

    **Example:**

    ```python
    estimate, stderr = curvzoo.hutchinson_diagonal(
        model, loss, batch, key=jax.random.key(0), num_probes=16,
        control_variate="ggn", return_stderr=True,
    )
    ```
    """

    estimator = from_names("hutchinson", num_probes=num_probes, control_variate=control_variate)
    return diagonal(
        model, loss, batch, estimator, key=key, return_stderr=return_stderr, args=args,
        filter_spec=filter_spec, chunk_size=chunk_size, memory_budget=memory_budget,
        check_finite=check_finite, mesh=mesh, progress=progress,
    )  # fmt: skip
