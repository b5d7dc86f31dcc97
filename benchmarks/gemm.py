"""The machine's own float32 matrix-multiply rate, as a yardstick for kernels whose work
is matrix products: a kernel's GFLOP/s divided by these rates says how far it is from
the machine's peak for the same shapes."""

import jax
import jax.numpy as jnp
import jax.random as jr

from .timing import median_seconds


def _rate(flops: int, seconds: float) -> float:
    return flops / seconds / 1e9


def gemm_rate(m: int, k: int, n: int, *, repeats: int = 20, seed: int = 0) -> float:
    """GFLOP/s of one jitted float32 product of an `(m, k)` by a `(k, n)` matrix, counted
    as `2 m k n` floating-point operations, from the median of `repeats` calls after a
    warm-up. Cost: `repeats + 1` products and one compilation."""
    key_a, key_b = jr.split(jr.key(seed))
    a = jr.normal(key_a, (m, k), dtype=jnp.float32)
    b = jr.normal(key_b, (k, n), dtype=jnp.float32)
    product = jax.jit(jnp.matmul)
    return _rate(2 * m * k * n, median_seconds(lambda: product(a, b), repeats))


def batched_gemm_flops(n: int, T: int, N: int) -> int:
    """Floating-point operations of `N` products of an `(n, n)` by an `(n, T n)` matrix."""
    return 2 * N * n * n * T * n


def batched_gemm_rate(n: int, T: int, N: int, *, repeats: int = 20, seed: int = 0) -> float:
    """GFLOP/s of `N` jitted float32 products of an `(n, n)` by an `(n, T n)` matrix,
    batched in one call: the shape of a recurrent kernel's step that updates the impulse
    responses of `T` source steps at once (`J_t @ [Gamma_{t-1,s}]_s` for a state of size
    `n`, `N` samples). Counted as `2 N T n^3` operations; the median of `repeats` calls
    after a warm-up. Cost: `repeats + 1` such products and one compilation.

    **Arguments:**

    - `n`: the state size (`H` for Elman and GRU cells, `2H` for an LSTM's `(h, c)`).
    - `T`: the number of `n x n` blocks in the right-hand matrix (source steps).
    - `N`: the number of products in the batch (samples).
    - `repeats`: timed calls.
    - `seed`: seed of the random operands.

    **Returns:** the rate in GFLOP/s.
    """
    key_a, key_b = jr.split(jr.key(seed))
    a = jr.normal(key_a, (N, n, n), dtype=jnp.float32)
    b = jr.normal(key_b, (N, n, T * n), dtype=jnp.float32)
    product = jax.jit(jnp.matmul)
    seconds = median_seconds(lambda: product(a, b), repeats)
    return _rate(batched_gemm_flops(n, T, N), seconds)
