"""Hessian-vector products in plain JAX, the way the generic kernel evaluates them.

The generic kernel ravels the trainable leaves into one vector of length `P`,
linearises the gradient once (`jax.linearize(jax.grad(f))`: a forward and a backward
pass whose residuals are kept) and evaluates `H[i, i] = (H e_i)[i]` for one-hot `e_i`
by forward-over-reverse, `jax.vmap`ped over a chunk of basis vectors. Its cost is `P`
such products. The functions here rebuild that computation from JAX alone, so the
benchmark can time a prefix of it and size chunks from a memory budget without
importing any private part of curvzoo.
"""

import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree


DEFAULT_MEMORY_BUDGET = 128 * 2**20
"""curvzoo's default `memory_budget` (128 MiB), which the benchmark rows assume."""


def _jaxpr_bytes(jaxpr) -> int:
    """Bytes of every input, intermediate and output of `jaxpr` (before XLA frees or
    fuses any)."""

    def size(var) -> int:
        aval = var.aval
        if hasattr(aval, "shape") and hasattr(aval, "dtype"):
            return math.prod(aval.shape) * aval.dtype.itemsize
        return 0

    inner = sum(size(var) for eqn in jaxpr.eqns for var in eqn.outvars)
    return inner + sum(map(size, jaxpr.invars)) + sum(map(size, jaxpr.outvars))


def lane_bytes(product: Callable, example) -> int:
    """Bytes one lane of `jax.vmap(product)` needs: every intermediate of `product` on
    one input, plus its inputs and outputs. An upper bound, as the generic kernel
    estimates it. Traces only; runs nothing."""
    return _jaxpr_bytes(jax.make_jaxpr(product)(example).jaxpr)


def chunk_from_budget(per_lane: int, total: int, memory_budget: int) -> int:
    """The largest number of lanes in `[1, total]` whose working set fits the budget."""
    return max(1, min(total, memory_budget // max(per_lane, 1)))


def flat_loss(model: eqx.Module, loss: Callable, batch) -> tuple[Callable, jax.Array]:
    """`(f, flat)`: the loss as a function of the raveled trainable (inexact-array)
    leaves, and those leaves raveled, so that `f(flat) == loss(model, batch)`."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    flat, unravel = ravel_pytree(params)

    def f(vector):
        return loss(eqx.combine(unravel(vector), static), batch)

    return f, flat


def hvp_lane_bytes(model: eqx.Module, loss: Callable, batch) -> int:
    """Bytes of one lane of the linearised Hessian-vector product, traced abstractly
    (nothing is computed): the figure the generic kernel divides its budget by."""
    found = []

    def trace(flat, batch):
        f, _ = flat_loss(model, loss, batch)
        _, hvp = jax.linearize(jax.grad(f), flat)
        found.append(lane_bytes(hvp, flat))
        return flat

    _, flat = flat_loss(model, loss, batch)
    jax.eval_shape(trace, flat, batch)
    return found[0]


def kernel_chunk(
    model: eqx.Module, loss: Callable, batch, memory_budget: int = DEFAULT_MEMORY_BUDGET
) -> int:
    """The number of basis vectors per `jax.vmap` that the generic kernel's rule gives for
    the whole diagonal: the budget over one lane's bytes, in `[1, P]`. Traces only."""
    _, flat = flat_loss(model, loss, batch)
    return chunk_from_budget(hvp_lane_bytes(model, loss, batch), flat.size, memory_budget)


def hvp_diagonal_prefix(
    model: eqx.Module,
    loss: Callable,
    batch,
    count: int,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> tuple[Callable, int]:
    """A compiled function that evaluates the first `count` diagonal entries
    `(H e_i)[i]` of the Hessian of `loss(model, batch)` with respect to the trainable
    leaves, as the generic kernel does: one linearisation, then one-hot basis vectors
    `jax.vmap`ped in chunks sized from `memory_budget` (one chunk of all `count` when it
    fits) and mapped over chunks.

    **Returns:** `(run, chunk)`: `run()` returns the `count` entries (call it under
    `jax.block_until_ready` to time it), `chunk` is the number of products per `vmap`.

    Cost: one forward and backward pass plus `count` Hessian-vector products, each
    the work of one to two gradients; memory: the linearisation plus `chunk` lanes.
    """
    f, flat = flat_loss(model, loss, batch)
    count = min(count, flat.size)
    per_lane = hvp_lane_bytes(model, loss, batch)
    chunk = chunk_from_budget(per_lane, count, memory_budget)

    @jax.jit
    def prefix(flat, batch):
        f, _ = flat_loss(model, loss, batch)
        _, hvp = jax.linearize(jax.grad(f), flat)

        def entry(index):
            return hvp(jax.nn.one_hot(index, flat.size, dtype=flat.dtype))[index]

        return jax.lax.map(entry, jnp.arange(count), batch_size=chunk)

    return lambda: prefix(flat, batch), chunk
