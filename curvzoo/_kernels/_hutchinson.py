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
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, PyTree

from .._run._devices import split_lanes
from .._run._memory import bytes_per_lane, chunk_from_budget
from .._run._progress import report


def _merge(a, b):
    """Chan et al.'s pairwise update of `(count, mean, sum of squared deviations)`."""
    count_a, mean_a, m2_a = a
    count_b, mean_b, m2_b = b
    count = count_a + count_b
    delta = mean_b - mean_a
    mean = mean_a + delta * (count_b / count)
    m2 = m2_a + m2_b + delta**2 * (count_a * count_b / count)
    return count, mean, m2


@eqx.filter_jit
def hutchinson_kernel(
    params: PyTree,
    static: PyTree,
    loss,
    batch: PyTree,
    scale: float,
    key: Array,
    num_probes: int,
    subtract_ggn: bool,
    chunk_size: int | None,
    memory_budget: int,
    progress: bool = False,
    mesh=None,
) -> tuple[PyTree, PyTree]:
    """The mean of `z * (A z)` over `num_probes` Rademacher probes and its standard
    error, for `A = H` or (with `subtract_ggn`) `A = H - G`.

    Probe `i` is drawn from `jax.random.split(key, num_probes)[i]`, so the probes do
    not depend on `chunk_size` (the result only through rounding).

    Cost: one Hessian-vector product per probe (forward over reverse on one shared
    linearisation of the gradient), plus with `subtract_ggn` one Gauss-Newton-vector
    product (a Jacobian-vector product, the loss's Hessian in the prediction, a
    vector-Jacobian product). Memory: the linearisation and, per probe in a chunk, a few
    parameter-sized vectors; the statistics are merged chunk by chunk (Chan's update),
    so memory does not grow with `num_probes`.
    """
    flat, unravel = ravel_pytree(params)
    size = flat.size

    def model_of(vector):
        return eqx.combine(unravel(vector), static)

    _, hvp = jax.linearize(jax.grad(lambda v: loss(model_of(v), batch)), flat)
    if subtract_ggn:
        inputs, targets = batch
        predictions, jvp = jax.linearize(lambda v: loss.predict(model_of(v), inputs), flat)
        vjp = jax.linear_transpose(jvp, flat)

        def outer_loss(prediction):
            return scale * jnp.sum(jax.vmap(loss.per_sample)(prediction, targets))

        _, out_hvp = jax.linearize(jax.grad(outer_loss), predictions)

        def product(z):
            return hvp(z) - vjp(out_hvp(jvp(z)))[0]
    else:
        product = hvp

    def probe(k):
        z = jax.random.rademacher(k, (size,), dtype=flat.dtype)
        return z * product(z)

    # Statistics in at least float32, whatever the parameters' precision.
    stat_dtype = jnp.promote_types(flat.dtype, jnp.float32)

    def statistics(chunk_keys):
        samples = jax.vmap(probe)(split_lanes(chunk_keys, mesh)).astype(stat_dtype)
        mean = jnp.mean(samples, axis=0)
        m2 = jnp.sum((samples - mean) ** 2, axis=0)
        return jnp.asarray(samples.shape[0], stat_dtype), mean, m2

    keys = jax.random.split(key, num_probes)
    if chunk_size is None:
        chunk_size = chunk_from_budget(bytes_per_lane(probe, keys[0]), num_probes, memory_budget)
    chunk_size = min(chunk_size, num_probes)
    if mesh is not None and chunk_size >= mesh.size:
        chunk_size -= chunk_size % mesh.size
    num_full = num_probes // chunk_size
    full = keys[: num_full * chunk_size].reshape(num_full, chunk_size, *keys.shape[1:])

    remainder = num_full * chunk_size < num_probes
    num_chunks = num_full + int(remainder)

    def accumulate(carry, indexed):
        index, chunk_keys = indexed
        report(progress, "Hutchinson: chunks of probes", index, num_chunks)
        return _merge(carry, statistics(chunk_keys)), None

    zeros = jnp.zeros(size, stat_dtype)
    start = (jnp.zeros((), stat_dtype), zeros, zeros)
    stats, _ = jax.lax.scan(accumulate, start, (jnp.arange(num_full), full))
    if remainder:
        report(progress, "Hutchinson: chunks of probes", num_full, num_chunks, after=stats[0])
        stats = _merge(stats, statistics(keys[num_full * chunk_size :]))
    count, mean, m2 = stats
    stderr = jnp.sqrt(m2 / jnp.maximum(count - 1, 1) / count)
    return unravel(mean.astype(flat.dtype)), unravel(stderr.astype(flat.dtype))
