"""The Lanczos step that the eigensolver and the spectral density share.

The basis `Q` is stored as the rows of a fixed-shape array, zero beyond the rows in
use. Each new product is orthogonalised against the whole basis (full
reorthogonalisation), and the inner products fill one column (and row) of the
projected matrix `H = Q^T A Q`: with Lanczos' three-term structure it is tridiagonal up
to rounding, but it is always the Rayleigh quotient of an orthonormal basis, also
after a restart or a breakdown.

A breakdown is a product that the basis already (numerically) contains: the Krylov
space is invariant. The next vector is then a fresh one, orthogonal to the basis,
rather than the normalised rounding noise, which loses orthogonality (matfree 0.6's
`decomp.tridiag_sym` does that, and on a GGN of rank 10 with 69 parameters its 30-step
tridiagonal matrix had eigenvalues of -5.5 and 6.0 for a spectrum in [0, 0.64]).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, PyTree


_DGKS = 0.5**0.5
HIGHEST = jax.lax.Precision.HIGHEST
# What is left of a product after orthogonalisation, below `eps^(3/4) |A|` (`eps` the
# dtype's rounding unit), is taken for rounding noise: a breakdown. About 2e-12 |A| in
# float64 and 7e-6 |A| in float32: Hessian-vector products by automatic
# differentiation carry rounding errors of many units, and `16 eps |A|` missed them.
FLOOR_POWER = 0.75


def work_dtype(params: PyTree):
    """The dtype of the iteration: the parameters' own, at least float32."""
    return jnp.promote_types(jnp.result_type(*jax.tree.leaves(params)), jnp.float32)


@eqx.filter_jit
def random_vectors(key: Array, count: int, length: int, dtype, kind: str) -> Array:
    """`(count, length)` independent `"normal"` or `"rademacher"` entries from `key`
    (compiled once per shape, outside the kernels that use them)."""
    sample = jr.normal if kind == "normal" else jr.rademacher
    return sample(key, (count, length), dtype=dtype)


def dot(a: Array, b: Array) -> Array:
    return jnp.matmul(a, b, precision=HIGHEST)


def _pass(basis: Array, vector: Array) -> tuple[Array, Array]:
    """One classical Gram-Schmidt pass: `(vector - Q^T (Q vector), Q vector)`, with the
    unused rows of `basis` zero. Two reads of the basis, as two matrix-vector
    products (blocks of the used rows alone were slower on CPUs: each block was copied
    before its product)."""
    coefficients = dot(basis, vector)
    return vector - dot(coefficients, basis), coefficients


def orthogonalise(basis: Array, vector: Array) -> tuple[Array, Array]:
    """`(vector - Q Q^T vector, Q^T vector)` by classical Gram-Schmidt, a second pass
    only where the first cancelled most of `vector` (the criterion of Daniel, Gragg,
    Kaufman and Stewart 1976: then its rounding errors may not be orthogonal)."""
    remainder, coefficients = _pass(basis, vector)

    def again(remainder):
        remainder, more = _pass(basis, remainder)
        return remainder, more

    cancelled = jnp.linalg.norm(remainder) < _DGKS * jnp.linalg.norm(vector)
    remainder, more = jax.lax.cond(
        cancelled, again, lambda r: (r, jnp.zeros_like(coefficients)), remainder
    )
    return remainder, coefficients + more


def extend(basis: Array, projected: Array, index, vector: Array, image: Array, floor, spare, shift):
    """Add the unit `vector` (orthogonal to the basis) as row `index`, with its product
    `image = A vector`.

    The large components of `image` are removed first, along `vector` and along the
    row before it (Lanczos' three-term recurrence, two vector operations); a
    Gram-Schmidt pass over the whole basis then removes what rounding left along the
    others (and, after a restart, the couplings to the kept Ritz vectors, for which
    the second pass comes into play).

    **Returns:** `(basis, projected, next, beta, breakdown)`: `next` is the unit vector
    to add after it, the remainder of `image` normalised, or on a breakdown
    (`beta = |remainder| <= floor`) the vector `spare`, rolled by `shift` (a
    permutation of independent random entries is one too), orthogonalised."""
    basis = jax.lax.dynamic_update_slice_in_dim(basis, vector[None], index, 0)
    previous = basis[jnp.maximum(index - 1, 0)] * (index > 0)
    own = jnp.vdot(vector, image)
    remainder = image - own * vector
    before = jnp.vdot(previous, remainder)
    remainder = remainder - before * previous
    remainder, column = orthogonalise(basis, remainder)
    column = column.at[index].add(own).at[jnp.maximum(index - 1, 0)].add(before)
    projected = projected.at[:, index].set(column).at[index, :].set(column)
    beta = jnp.linalg.norm(remainder)
    breakdown = beta <= floor

    def fresh():
        rolled = jnp.roll(spare, shift)
        replacement, _ = orthogonalise(basis, orthogonalise(basis, rolled)[0])
        tiny = jnp.finfo(replacement.dtype).tiny
        return replacement / jnp.maximum(jnp.linalg.norm(replacement), tiny)

    following = jax.lax.cond(breakdown, fresh, lambda: remainder / jnp.where(breakdown, 1, beta))
    return basis, projected, following, beta, breakdown
