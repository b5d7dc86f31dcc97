"""Hutchinson's estimator of a Hessian diagonal, with an optional GGN control variate.

For Rademacher probes `z` (entries +-1 with equal probability), `E[z * (A z)] = diag(A)`
for any square `A`, and the variance of one probe's entry `i` is `sum_{j != i} A_ij^2`
(Bekas, Kokiopoulou and Saad 2007; AdaHessian, Yao et al. 2021). With the control
variate the probes see `A = H - G` (`G` the generalised Gauss-Newton matrix, whose
diagonal is then added back exactly), so the variance only comes from the off-diagonal
part of the network's own second derivatives, typically far smaller than that of `H`.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PyTree

from ._generic import ggn_vector_product, hessian_vector_product
from ._lanes import chunked


def _merge(a, b):
    """Chan et al.'s pairwise update of `(count, mean, sum of squared deviations)`."""
    count_a, mean_a, m2_a = a
    count_b, mean_b, m2_b = b
    count = count_a + count_b
    safe = jnp.maximum(count, 1)
    delta = mean_b - mean_a
    mean = mean_a + delta * (count_b / safe)
    m2 = m2_a + m2_b + delta**2 * (count_a * count_b / safe)
    return count, mean, m2


def probe_product(params, static, loss, batch, subtract_ggn: bool):
    """`(flat, unravel, product)`: the trainable leaves raveled, and `product(z) = A z`
    for `A = H`, or with `subtract_ggn` `A = H - G`."""
    flat, unravel, hvp = hessian_vector_product(params, static, loss, batch)
    if not subtract_ggn:
        return flat, unravel, hvp
    gvp = ggn_vector_product(loss, lambda v: eqx.combine(unravel(v), static), batch, flat)
    return flat, unravel, lambda z: hvp(z) - gvp(z)


def hutchinson_kernel(
    params: PyTree,
    static: PyTree,
    loss,
    batch: PyTree,
    *,
    key: Array,
    num_probes: int,
    subtract_ggn: bool,
    chunk: int,
    progress: int = 0,
    mesh=None,
) -> tuple[PyTree, PyTree]:
    """The mean of `z * (A z)` over `num_probes` Rademacher probes and its standard
    error, for `A = H` or (with `subtract_ggn`) `A = H - G`.

    Probe `i` is drawn from `jax.random.split(key, num_probes)[i]`, so the probes do
    not depend on `chunk` (the result only through rounding).

    Cost: one Hessian-vector product per probe (forward over reverse on one shared
    linearisation of the gradient), plus with `subtract_ggn` one Gauss-Newton-vector
    product (a Jacobian-vector product, the loss's Hessian in the prediction, a
    vector-Jacobian product). Memory: the linearisation and, per probe in a chunk, a few
    parameter-sized vectors; the statistics are merged chunk by chunk (Chan's update),
    so memory does not grow with `num_probes`.
    """
    flat, unravel, product = probe_product(params, static, loss, batch, subtract_ggn)
    size = flat.size
    # Statistics in at least float32, whatever the parameters' precision.
    stat_dtype = jnp.promote_types(flat.dtype, jnp.float32)

    def probe(k):
        z = jax.random.rademacher(k, (size,), dtype=flat.dtype)
        return z * product(z)

    def statistics(chunk_keys, mask):
        samples = jax.vmap(probe)(chunk_keys).astype(stat_dtype)
        weights = mask.astype(stat_dtype)[:, None]
        count = jnp.sum(mask).astype(stat_dtype)
        mean = jnp.sum(weights * samples, axis=0) / jnp.maximum(count, 1)
        m2 = jnp.sum(weights * (samples - mean) ** 2, axis=0)
        return count, mean, m2

    zeros = jnp.zeros(size, stat_dtype)
    start = (jnp.zeros((), stat_dtype), zeros, zeros)
    count, mean, m2 = chunked(
        statistics,
        jax.random.split(key, num_probes),
        chunk,
        reduce=_merge,
        init=start,
        dtype=stat_dtype,
        mesh=mesh,
        progress=progress,
        label="Hutchinson: chunks of probes",
    )
    stderr = jnp.sqrt(m2 / jnp.maximum(count - 1, 1) / count)
    return unravel(mean.astype(flat.dtype)), unravel(stderr.astype(flat.dtype))
