"""The spectral density of the Hessian or the GGN by stochastic Lanczos quadrature.

For a unit start vector `q`, `m` Lanczos steps give a tridiagonal `T` whose
eigenvalues `theta_j` and squared first eigenvector components `tau_j^2` are the nodes
and weights of the `m`-point Gauss quadrature of the measure `sum_i (q . u_i)^2
delta(lambda_i)`; for `q = z / |z|` with `z` a Rademacher vector its expectation is the
spectral density `(1/P) sum_i delta(lambda_i)`. Averaging over probes gives stochastic
Lanczos quadrature (Golub and Meurant 2010; Ubaru, Chen and Saad 2017; for neural
networks, Ghorbani, Krishnan and Xiao 2019 and PyHessian, Yao et al. 2020).

The Lanczos steps are those of the eigensolver (`_lanczos.py`), fully
reorthogonalised; after an invariant Krylov space (always reached where `num_matvecs`
exceeds the rank, as for a GGN beyond `N C`) they go on from a fresh vector orthogonal
to the basis, whose nodes then carry zero weight, so the rule stays exact. matfree's
`decomp.tridiag_sym`, which does a fixed number of steps as quadrature needs, was the
first choice, but it normalises the rounding noise there and loses orthogonality:
nodes far outside the spectrum (see `_lanczos.py`).
"""

import math
from collections.abc import Callable
from typing import no_type_check

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jaxtyping import Array, ArrayLike, Float, Int, PyTree

from .._run._checks import check_key, check_positive_int
from .._run._memory import bytes_per_lane, chunk_from_budget
from ._lanczos import extend, FLOOR_POWER, random_vectors, work_dtype
from ._operators import flat_product
from ._setup import check_finite_result, check_number, prepare, warn_if_slow


class SpectralDensity(eqx.Module):
    """A spectral density estimated by stochastic Lanczos quadrature, as
    [`curvzoo.spectral_density`][] returns it.

    **Fields:**

    - `nodes`: shape `(num_probes, num_matvecs)`, the quadrature nodes (Ritz values) of
        each probe.
    - `weights`: shape `(num_probes, num_matvecs)`, their weights; each probe's row
        sums to `1 / num_probes`, so all of them sum to 1.
    - `mean`: the density's mean, `sum(weights * nodes)`: an unbiased estimate of
        `tr(A) / P` (it is Hutchinson's estimate with the same probes, divided by `P`).
    - `mean_stderr`: its standard error over the probes (NaN with one probe).
    - `dimension`: `P`, the number of trained parameters; `dimension * mean` estimates
        the trace.
    - `num_matvecs`: the number of products used, `num_probes * num_matvecs`.
    """

    nodes: Float[Array, "probes steps"]
    weights: Float[Array, "probes steps"]
    mean: Float[Array, ""]
    mean_stderr: Float[Array, ""]
    num_matvecs: Int[Array, ""]
    dimension: int = eqx.field(static=True)

    def density(self, grid: ArrayLike, width: ArrayLike) -> Array:
        """The density smoothed with a Gaussian of standard deviation `width`, at the
        points of `grid`: `sum_j weights_j N(x; nodes_j, width^2)`.

        **Arguments:**

        - `grid`: the points, an array of any shape (say
            `jnp.linspace(nodes.min(), nodes.max(), 400)`).
        - `width`: the Gaussian's standard deviation, `> 0`. A width near the spacing of
            the eigenvalues you want to tell apart; the integral over the real line is 1
            for any width.

        **Returns:** an array shaped like `grid`.
        """
        if not isinstance(width, jax.core.Tracer):
            width = check_number(width, "width", positive=True)
        grid = jnp.asarray(grid, self.nodes.dtype)
        offsets = (grid[..., None] - self.nodes.reshape(-1)) / width
        kernel = jnp.exp(-0.5 * offsets**2) / (width * math.sqrt(2 * math.pi))
        return jnp.sum(self.weights.reshape(-1) * kernel, axis=-1)


@eqx.filter_jit
def slq_kernel(
    params: PyTree,
    static: PyTree,
    loss,
    batch: PyTree,
    probes: Array,
    operator: str,
    num_matvecs: int,
    memory_budget: int,
) -> tuple[Array, Array, Array, Array]:
    """`(nodes, weights, mean, mean_stderr)`: `num_matvecs` Lanczos steps from each of
    the probes, `probes[:, 0]` the Rademacher start vectors and `probes[:, 1]` spares
    for fresh vectors; the probes run `jax.vmap`ped in chunks sized from
    `memory_budget`."""
    flat, _, product = flat_product(operator, params, static, loss, batch)
    dtype = probes.dtype
    floor_unit = jnp.finfo(dtype).eps ** FLOOR_POWER

    def quadrature(pair):
        start, spare = pair

        def step(index, state):
            basis, projected, vector, norm = state
            image = product(vector.astype(flat.dtype)).astype(dtype)
            norm = jnp.maximum(norm, jnp.linalg.norm(image))
            basis, projected, following, _, _ = extend(
                basis, projected, index, vector, image, floor_unit * norm, spare, index
            )
            return basis, projected, following, norm

        init = (
            jnp.zeros((num_matvecs, flat.size), dtype),
            jnp.zeros((num_matvecs, num_matvecs), dtype),
            start / jnp.linalg.norm(start),
            jnp.zeros((), dtype),
        )
        _, projected, _, _ = jax.lax.fori_loop(0, num_matvecs, step, init)
        nodes, vectors = jnp.linalg.eigh(projected)
        return nodes, vectors[0] ** 2

    num_probes = probes.shape[0]
    chunk = chunk_from_budget(bytes_per_lane(quadrature, probes[0]), num_probes, memory_budget)
    nodes, weights = jax.lax.map(quadrature, probes, batch_size=chunk)
    means = jnp.sum(nodes * weights, axis=1)
    mean_stderr = jnp.std(means, ddof=1) / jnp.sqrt(num_probes) if num_probes > 1 else jnp.nan
    cast = flat.dtype
    return (
        nodes.astype(cast),
        (weights / num_probes).astype(cast),
        jnp.mean(means).astype(cast),
        jnp.asarray(mean_stderr, cast),
    )


# Arguments are checked with errors that name them, so the test-time runtime type
# checker is kept out of the way.
@no_type_check
def spectral_density(
    model: eqx.Module,
    loss: Callable,
    batch: PyTree,
    *,
    key: Array,
    num_probes: int = 1,
    num_matvecs: int | None = None,
    operator: str = "hessian",
    filter_spec: PyTree | Callable = eqx.is_inexact_array,
    memory_budget: int | None = None,
    check_finite: bool = True,
    mesh: Mesh | None = None,
) -> SpectralDensity:
    """The eigenvalue density of the Hessian of `loss(model, batch)` in the trained
    parameters (or of the GGN) by stochastic Lanczos quadrature (Ubaru, Chen and Saad
    2017; Ghorbani, Krishnan and Xiao 2019), as in PyHessian's density plots.

    Each probe is a Rademacher vector; `num_matvecs` Lanczos steps from it (fully
    reorthogonalised, as in [`curvzoo.hessian_eigenvalues`][]) give a Gauss quadrature
    rule, exact for polynomials up to degree `2 num_matvecs - 1` in the eigenvalues: its
    nodes resolve the outliers of the spectrum sharply and the bulk coarsely. The rules
    of all probes averaged estimate the density without bias for such polynomials. The
    nodes always lie within the spectrum (they are Ritz values of an orthonormal basis),
    also where the Krylov space runs out, as it does for a GGN beyond its rank `N C`.

    **Arguments:**

    - `model`: any Equinox module. It is not modified.
    - `loss`: a curvzoo loss or any callable `loss(model, batch) -> scalar`; with
        `operator="ggn"` a curvzoo loss.
    - `batch`: a PyTree of arrays sharing a leading batch axis; for curvzoo losses a
        pair `(inputs, targets)`, or a triple `(inputs, targets, lengths)` for sequences
        of different lengths (`curvzoo.losses`).
    - `key`: a JAX PRNG key (keyword-only, required). The same key gives the same
        result.
    - `num_probes`: how many probes to average (default 1, as PyHessian; more give a
        smoother bulk and a standard error for the mean).
    - `num_matvecs`: Lanczos steps per probe, from 1 to `P`; `None` (default) takes
        `min(64, P)`.
    - `operator`: `"hessian"` (default) or `"ggn"` (see [`curvzoo.ggn_diagonal`][]).
    - `filter_spec`: which leaves are trained, as in [`curvzoo.hessian_diagonal`][].
    - `memory_budget`: bytes for the probes run together (`jax.vmap`ped in chunks);
        default 128 MiB. Each probe holds its `num_matvecs` Lanczos vectors.
    - `check_finite`, `mesh`: as for [`curvzoo.hessian_eigenvalues`][].

    **Returns:**

    A [`curvzoo.SpectralDensity`][] with `nodes` and `weights` (each
    `(num_probes, num_matvecs)`, weights summing to 1), `mean` (an unbiased estimate of
    `tr(A) / P`) with `mean_stderr`, `dimension` (`P`) and `num_matvecs`, and a method
    `density(grid, width)` for the Gaussian-smoothed density.

    **Cost:** `num_probes * num_matvecs` products (each about the work of one to two
    gradients), plus the reorthogonalisation, `2 num_matvecs^2 P` multiply-adds per
    probe. Memory: `num_matvecs * P` numbers per probe run together.

    **Example:**

    ```python
    spectrum = curvzoo.spectral_density(
        model, curvzoo.losses.cross_entropy, (x, y), key=jax.random.key(0), num_probes=4
    )
    grid = jnp.linspace(spectrum.nodes.min(), spectrum.nodes.max(), 400)
    curve = spectrum.density(grid, width=0.01 * (grid[-1] - grid[0]))
    ```
    """
    check_key(key)
    check_positive_int(num_probes, "num_probes")
    check_positive_int(num_matvecs, "num_matvecs", allow_none=True)
    problem = prepare(
        model, loss, batch, operator=operator, filter_spec=filter_spec,
        memory_budget=memory_budget, check_finite=check_finite, mesh=mesh,
    )  # fmt: skip
    if num_matvecs is None:
        num_matvecs = min(64, problem.size)
    elif num_matvecs > problem.size:
        raise ValueError(
            "`num_matvecs` must be at most the number of trained parameters, "
            f"P = {problem.size}, as the Krylov space has no more dimensions; got "
            f"{num_matvecs}."
        )
    warn_if_slow(problem, operator, num_probes * num_matvecs, "this spectral density")
    dtype = work_dtype(problem.params)
    probes = random_vectors(key, 2 * num_probes, problem.size, dtype, "rademacher")
    nodes, weights, mean, mean_stderr = slq_kernel(
        problem.params, problem.static, problem.loss, problem.batch,
        probes.reshape(num_probes, 2, problem.size), operator, int(num_matvecs),
        problem.memory_budget,
    )  # fmt: skip
    if check_finite:
        check_finite_result(nodes, "nodes")
    total = jnp.asarray(num_probes * num_matvecs)
    return SpectralDensity(nodes, weights, mean, mean_stderr, total, problem.size)
