"""A few extreme eigenvalues of the Hessian or the GGN: thick-restart Lanczos with full
orthogonalisation, stopped on the residuals of the wanted Ritz pairs.

The basis `Q` (at most `krylov_size` rows of length `P`) is kept orthonormal and the
projected matrix `H = Q^T A Q` filled by the shared step of `_lanczos.py`, so every
check is a Rayleigh-Ritz step on an orthonormal basis. After step `m`,
`A Q_m = Q_m H_m + r e_m^T` (`r` the part of the last product left after
orthogonalisation), so the Ritz pair `(theta, Q_m y)` has residual norm `|r| |y_m|`
without another product (Lanczos 1950; Paige 1971).

When the basis is full it is compressed to its best Ritz vectors, which stay exact
Ritz pairs with `H` diagonal on them, and the iteration goes on from `r` (thick
restart: Wu and Simon 2000; Stathopoulos, Saad and Wu 1998). When `r` vanishes to
rounding, the Krylov space is invariant; the next vector is then a random one
orthogonal to the basis, and the iteration only stops after such a fresh vector has
left the wanted eigenvalues unchanged, so that an eigenvalue of multiplicity `> 1`
(the GGN's zero, for one) can show up more than once.

Why not matfree's `decomp.tridiag_sym`: it runs a fixed number of steps and cannot
be continued or restarted, so stopping at a tolerance would mean repeating it from
scratch with growing depths (about twice the products, and one compilation per
depth), and the basis could not be kept within a memory bound; nor does it survive an
invariant Krylov space (see `_lanczos.py`). Here the stopping test runs after every
product inside one compiled `jax.lax.while_loop`.
"""

from collections.abc import Callable
from typing import NamedTuple, no_type_check

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jaxtyping import Array, Bool, Float, Int, PyTree

from .._run._checks import check_key, check_positive_int
from ._lanczos import dot, extend, FLOOR_POWER, random_vectors, work_dtype
from ._operators import flat_product
from ._setup import check_choice, check_finite_result, check_number, prepare, warn_if_slow


_WHICH = ("largest", "smallest", "magnitude")


class Eigenpairs(eqx.Module):
    """A few eigenpairs of the Hessian or the GGN, as [`curvzoo.hessian_eigenvalues`][]
    returns them, most wanted first.

    **Fields:**

    - `eigenvalues`: shape `(k,)`. For `which="largest"` in decreasing order, for
        `"smallest"` increasing, for `"magnitude"` by decreasing absolute value. Each is
        the Rayleigh quotient `v^T A v` of its (unit) eigenvector.
    - `eigenvectors`: a PyTree shaped like `equinox.filter(model, filter_spec)` (an
        array at each trained leaf, `None` elsewhere) whose arrays have a leading axis
        of size `k`: `jax.tree.map(lambda a: a[i], eigenvectors)` is the unit
        eigenvector of `eigenvalues[i]`, with the norm taken over all trained leaves
        together. The sign is arbitrary.
    - `residuals`: shape `(k,)`, the true residual norms `|A v - lambda v|`, computed
        with one more product per pair after the iteration (not the estimates it
        stopped on).
    - `num_matvecs`: the number of Hessian (or GGN) vector products used, the `k`
        for the residuals included.
    - `converged`: whether every residual is within the tolerance,
        `residuals <= max(tol * |eigenvalues|, atol)` (or the rounding floor, see
        [`curvzoo.hessian_eigenvalues`][]).
    """

    eigenvalues: Float[Array, " k"]
    eigenvectors: PyTree
    residuals: Float[Array, " k"]
    num_matvecs: Int[Array, ""]
    converged: Bool[Array, ""]


def _normalise(vectors: Array) -> Array:
    return vectors / jnp.linalg.norm(vectors, axis=1, keepdims=True)


def _keys(values: Array, active: Array, which: Array) -> Array:
    """Larger is more wanted; inactive entries last. `which` indexes `_WHICH` (an
    array, so that each choice runs the same compiled loop)."""
    keys = jnp.select([which == 0, which == 1], [values, -values], jnp.abs(values))
    return jnp.where(active, keys, -jnp.inf)


def _ritz(projected: Array, size, which: Array, count: int):
    """The `count` most wanted Ritz pairs of the leading `size x size` block of
    `projected`: `(values, vectors (rows of the block) as columns, |H| estimate)`.

    The unused diagonal is set beyond the Gershgorin bound of the used block, so that
    one fixed-shape `eigh` separates the two: the used block's eigenvalues come first."""
    rows = projected.shape[0]
    used = jnp.arange(rows) < size
    bound = jnp.max(jnp.sum(jnp.abs(projected), axis=1))
    shifted = projected + jnp.diag(jnp.where(used, 0, 2 * bound + 1))
    values, vectors = jnp.linalg.eigh(shifted)
    _, index = jax.lax.top_k(_keys(values, used, which), count)
    norm = jnp.max(jnp.where(used, jnp.abs(values), 0))
    return values[index], vectors[:, index], norm


class _State(NamedTuple):
    basis: Array  # (rows, P): the orthonormal basis in its first `size` rows
    projected: Array  # (rows, rows): basis^T A basis in its leading block
    size: Array  # rows in use
    pending: Array  # (P,): the next basis vector, unit, orthogonal to the basis
    steps: Array  # Lanczos steps so far
    wanted: Array  # (k,): the wanted Ritz values after the last step
    norm: Array  # the largest Ritz value in magnitude: an estimate of |A|
    breakdown: Array  # whether the last step found an invariant subspace
    checking: Array  # -1 while iterating, then the Ritz vector whose product is next
    ritz: Array  # (k, P): the wanted Ritz vectors, once the iteration has stopped
    images: Array  # (k, P): their products


@eqx.filter_jit
def lanczos_kernel(
    params: PyTree,
    static: PyTree,
    loss,
    batch: PyTree,
    start_vectors: Array,
    operator: str,
    k: int,
    which: Array,
    krylov_size: int,
    keep: int,
    tol: Array,
    atol: Array,
    max_matvecs: Array,
):
    """`(eigenvalues, eigenvectors, residuals, products, converged)` for the `k` most
    wanted eigenpairs of the Hessian or the GGN; see the module docstring.

    `start_vectors` holds two Gaussian vectors of length `P` in the dtype of the
    iteration: the start, and a spare from which fresh vectors are drawn after a
    breakdown (drawn outside, so that `jax.random`'s generator is compiled once per `P`
    and not into every loop).

    One `jax.lax.while_loop` takes the Lanczos steps and then the `k` products for the
    true residuals, so the product is compiled once. Static: `operator`, `k`,
    `krylov_size` (the basis size) and `keep` (Ritz vectors kept at a restart); `which`
    (an index into `_WHICH`), `tol`, `atol` and `max_matvecs` are arrays, so new
    values do not recompile.
    """
    flat, unravel, product = flat_product(operator, params, static, loss, batch)
    dtype = start_vectors.dtype
    length = flat.size
    rows = krylov_size
    floor_unit = jnp.finfo(dtype).eps ** FLOOR_POWER
    tol, atol = tol.astype(dtype), atol.astype(dtype)
    start, spare = start_vectors

    def restart(parts):
        basis, projected = parts
        values, vectors, _ = _ritz(projected, krylov_size, which, keep)
        kept = dot(vectors.T, basis)
        basis = jnp.zeros_like(basis).at[:keep].set(kept)
        diagonal = jnp.arange(keep)
        projected = jnp.zeros_like(projected).at[diagonal, diagonal].set(values)
        return basis, projected

    def lanczos(state: _State, image: Array) -> _State:
        """One step with `image = A pending`, then the stopping test."""
        if krylov_size < length:
            full = state.size == krylov_size
            basis, projected = jax.lax.cond(
                full, restart, lambda parts: parts, (state.basis, state.projected)
            )
            index = jnp.where(full, keep, state.size)
        else:  # the basis can hold the whole space: never full before the end
            basis, projected, index = state.basis, state.projected, state.size
        floor = floor_unit * jnp.maximum(state.norm, jnp.linalg.norm(image))
        basis, projected, pending, beta, breakdown = extend(
            basis, projected, index, state.pending, image, floor, spare, state.steps + 1
        )
        size = index + 1
        values, vectors, norm = _ritz(projected, size, which, k)
        floor = floor_unit * norm
        residuals = beta * jnp.abs(vectors[size - 1])
        bound = jnp.maximum(tol * jnp.abs(values), jnp.maximum(atol, floor))
        converged = (size >= k) & jnp.all(residuals <= bound)
        unchanged = jnp.all(jnp.abs(values - state.wanted) <= bound)
        # After a breakdown, a fresh vector must first leave the wanted values unchanged.
        settled = ~breakdown | (state.breakdown & unchanged)
        steps = state.steps + 1
        stop = (size == length) | (converged & settled) | (steps >= max_matvecs)
        ritz = jax.lax.cond(
            stop,
            lambda: _normalise(dot(vectors.T, basis)),
            lambda: state.ritz,
        )
        checking = jnp.where(stop, 0, -1)
        return _State(
            basis, projected, size, pending, steps, values, norm, breakdown, checking,
            ritz, state.images,
        )  # fmt: skip

    def check(state: _State, image: Array) -> _State:
        images = state.images.at[state.checking].set(image)
        return state._replace(images=images, checking=state.checking + 1)

    def step(state: _State) -> _State:
        iterating = state.checking < 0
        vector = jnp.where(iterating, state.pending, state.ritz[jnp.maximum(state.checking, 0)])
        image = product(vector.astype(flat.dtype)).astype(dtype)
        return jax.lax.cond(iterating, lanczos, check, state, image)

    init = _State(
        basis=jnp.zeros((rows, length), dtype),
        projected=jnp.zeros((rows, rows), dtype),
        size=jnp.asarray(0),
        pending=start / jnp.linalg.norm(start),
        steps=jnp.asarray(0),
        wanted=jnp.zeros(k, dtype),
        norm=jnp.zeros((), dtype),
        breakdown=jnp.asarray(False),
        checking=jnp.asarray(-1),
        ritz=jnp.zeros((k, length), dtype),
        images=jnp.zeros((k, length), dtype),
    )
    final = jax.lax.while_loop(lambda state: state.checking < k, step, init)

    ritz, images = final.ritz, final.images
    values = jnp.sum(ritz * images, axis=1)
    residuals = jnp.linalg.norm(images - values[:, None] * ritz, axis=1)
    floor = floor_unit * jnp.maximum(final.norm, jnp.max(jnp.abs(values)))
    bound = jnp.maximum(tol * jnp.abs(values), jnp.maximum(atol, floor))
    converged = jnp.all(residuals <= bound)
    eigenvectors = jax.vmap(unravel)(ritz.astype(flat.dtype))
    return (
        values.astype(flat.dtype),
        eigenvectors,
        residuals.astype(flat.dtype),
        final.steps + k,
        converged,
    )


# Arguments are checked with errors that name them, so the test-time runtime type
# checker is kept out of the way.
@no_type_check
def hessian_eigenvalues(
    model: eqx.Module,
    loss: Callable,
    batch: PyTree,
    *,
    key: Array,
    k: int = 1,
    which: str = "largest",
    operator: str = "hessian",
    tol: float = 1e-4,
    atol: float = 0.0,
    max_matvecs: int = 1000,
    krylov_size: int | None = None,
    filter_spec: PyTree | Callable = eqx.is_inexact_array,
    check_finite: bool = True,
    mesh: Mesh | None = None,
) -> Eigenpairs:
    """The `k` largest (or smallest, or largest in magnitude) eigenvalues of the
    Hessian of `loss(model, batch)` in the trained parameters, or of the GGN, with
    their eigenvectors and residuals.

    Lanczos' method with full orthogonalisation and thick restarts (Lanczos 1950; Wu
    and Simon 2000), matrix-free: only Hessian-vector products (forward over reverse)
    or GGN-vector products (`J^T H_out J`), never a `P x P` matrix. It stops as soon as
    every wanted Ritz pair `(lambda, v)` has
    `|A v - lambda v| <= max(tol * |lambda|, atol)`, estimated after each product at
    no extra cost, then computes the true residuals with one more product per pair.
    The eigenvalue error is then about `residual^2 / gap` (the distance to the rest of
    the spectrum), far below `tol * |lambda|` unless eigenvalues cluster.

    Restricting `filter_spec` to one leaf (or one layer, or one gate's rows through a
    PyTree of bools) gives the eigenvalues of that diagonal block of the Hessian: the
    sharpness of a layer.

    **Arguments:**

    - `model`: any Equinox module. It is not modified.
    - `loss`: a curvzoo loss or any callable `loss(model, batch) -> scalar`; with
        `operator="ggn"` a curvzoo loss.
    - `batch`: a PyTree of arrays sharing a leading batch axis; for curvzoo losses a
        pair `(inputs, targets)`, or a triple `(inputs, targets, lengths)` for sequences
        of different lengths (`curvzoo.losses`).
    - `key`: a JAX PRNG key (keyword-only, required) for the start vector (and for the
        fresh vectors after an invariant subspace). The same key gives the same result.
    - `k`: how many eigenpairs, from 1 to the number of trained parameters `P`.
    - `which`: `"largest"` (default: the most positive eigenvalues, the sharpness),
        `"smallest"` (the most negative) or `"magnitude"` (largest `|lambda|`, what
        power iteration finds).
    - `operator`: `"hessian"` (default) or `"ggn"`, the generalised Gauss-Newton matrix
        of [`curvzoo.ggn_diagonal`][] (positive semi-definite for the curvzoo losses).
    - `tol`: the relative residual to reach (default `1e-4`).
    - `atol`: an absolute residual that also counts as converged (default 0); useful
        for eigenvalues at or near zero, such as the smallest of a GGN, where a relative
        test cannot be met. Residuals below the dtype's rounding floor,
        `eps^(3/4) |A|` (`eps` the dtype's rounding unit, `|A|` the largest Ritz value
        in magnitude: about `2e-12 |A|` in float64, `7e-6 |A|` in float32), always
        count.
    - `max_matvecs`: the most products the iteration may take (default 1000; at least
        `k`); the `k` for the final residuals come on top. Where it runs out, the best
        pairs so far are returned with `converged` false.
    - `krylov_size`: how many basis vectors to keep, `k + 1` to `P`. `None` (default)
        takes `min(P, max(48, 2 k + 16))`. Larger bases restart less often and need
        fewer products, at `krylov_size * P` numbers of memory; but the small
        `krylov_size x krylov_size` eigenproblem solved after each product goes to
        LAPACK, which OpenBLAS runs on several threads from about 64 rows, and on CPUs
        those threads then contend with XLA's (on `mlp2`, 16 ms per step at 64 rows
        against 5 ms at 48).
    - `filter_spec`: which leaves are trained, as in [`curvzoo.hessian_diagonal`][].
    - `check_finite`: if `True` (default), raise a `ValueError` naming the leaf when
        `model` or `batch` holds NaN or inf, or when the eigenvalues come out non-finite.
    - `mesh`: a `jax.sharding.Mesh`: the model is replicated and the batch split over
        its devices (its size must divide evenly), so each product's sum over samples
        is an all-reduce; the Lanczos vectors are replicated.

    **Returns:**

    An [`curvzoo.Eigenpairs`][] with `eigenvalues` (shape `(k,)`, most wanted first),
    `eigenvectors` (a PyTree shaped like `equinox.filter(model, filter_spec)` with a
    leading axis `k` on every array: one stacked tree rather than a list of `k`, as
    `jax.vmap` returns and as matfree's `eigh_partial` does), `residuals` (shape
    `(k,)`), `num_matvecs` and `converged`.

    **Cost:** one product per Lanczos step, each about the work of one to two
    gradients (the gradient, or the prediction, is linearised once), plus `k` for the
    residuals; an extreme, well-separated eigenvalue typically needs a few dozen steps
    where power iteration needs hundreds (to a relative residual of `1e-4`: 47
    products against 279 on a 784-256-256-10 MLP, 21 against 51 on a GRU). Each step also
    orthogonalises the product against the basis, reading its `krylov_size x P` array
    twice (`2 krylov_size P` multiply-adds), and solves the small
    `krylov_size x krylov_size` eigenproblem. Where products are cheap next to that (an
    MLP with `P = 269322` on a batch of 128: about 1 ms per product, 3 to 5 ms per step
    on 2 CPU cores), Lanczos takes about as long as power iteration despite 6 times
    fewer products; it wins in time where products cost more. Memory: the basis,
    `krylov_size * P` numbers, and the products' working set. Compiled once per shapes
    and settings (`k`, `operator`, `krylov_size`); new values of `which`, `tol`, `atol`
    and `max_matvecs` reuse the compiled loop.

    **Limits:** a single start vector finds each eigenvalue once until its Krylov space
    is exhausted, so an eigenvalue of multiplicity `> 1` is seen once on a large model
    (on a small one, once the space is exhausted, fresh random vectors find the other
    copies); the eigenvalues of the GGN beyond its rank (`N C`) are zero.

    **Example:**

    ```python
    top = curvzoo.hessian_eigenvalues(
        model, curvzoo.losses.cross_entropy, (x, y), key=jax.random.key(0), k=3
    )
    top.eigenvalues, top.residuals / abs(top.eigenvalues)
    ```
    """
    check_key(key)
    check_positive_int(k, "k")
    check_choice(which, "which", _WHICH)
    tol = check_number(tol, "tol", positive=True)
    atol = check_number(atol, "atol", positive=False)
    check_positive_int(max_matvecs, "max_matvecs")
    check_positive_int(krylov_size, "krylov_size", allow_none=True)
    problem = prepare(
        model, loss, batch, operator=operator, filter_spec=filter_spec,
        memory_budget=None, check_finite=check_finite, mesh=mesh,
    )  # fmt: skip
    size = problem.size
    if k > size:
        raise ValueError(
            f"`k` must be at most the number of trained parameters, P = {size}; got {k}."
        )
    if max_matvecs < k:
        raise ValueError(f"`max_matvecs` must be at least `k` = {k}; got {max_matvecs}.")
    if krylov_size is None:
        krylov_size = min(size, max(48, 2 * k + 16))
    elif krylov_size > size:
        krylov_size = size
    elif krylov_size < k + 1:
        raise ValueError(
            f"`krylov_size` must be at least `k + 1` = {k + 1} (or P = {size}), so that "
            f"each restart leaves room for a new vector; got {krylov_size}."
        )
    keep = min(krylov_size - 1, k + (krylov_size - k) // 2)
    least = min(krylov_size, max_matvecs)  # one Krylov space at least (up to max_matvecs)
    warn_if_slow(problem, operator, least, "these eigenvalues, at the least")
    start_vectors = random_vectors(key, 2, size, work_dtype(problem.params), "normal")
    values, vectors, residuals, products, converged = lanczos_kernel(
        problem.params, problem.static, problem.loss, problem.batch, start_vectors,
        operator, int(k), jnp.asarray(_WHICH.index(which)), int(krylov_size), int(keep),
        jnp.asarray(tol), jnp.asarray(atol), jnp.asarray(max_matvecs),
    )  # fmt: skip
    if check_finite:
        check_finite_result(values, "eigenvalues")
    return Eigenpairs(values, vectors, residuals, products, converged)
