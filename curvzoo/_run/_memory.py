"""Chunk sizes from a memory budget."""

import math
from collections.abc import Callable

import jax
from jaxtyping import PyTree


DEFAULT_MEMORY_BUDGET = 128 * 2**20
"""Default working-set budget of a curvature computation: 128 MiB.

Larger chunks are not faster on CPUs: past a few tens of MiB the working set leaves the
caches (measured on the benchmark rows: the 4-hidden-layer MLP ran fastest at 32
samples per chunk, the CNN at 4, the 64-wide MLP's generic kernel at 64 basis vectors,
each near this budget)."""


def _jaxpr_bytes(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            total += _var_bytes(var)
    return total


def _var_bytes(var) -> int:
    aval = var.aval
    if hasattr(aval, "shape") and hasattr(aval, "dtype"):
        return math.prod(aval.shape) * aval.dtype.itemsize
    return 0


def bytes_per_lane(fn: Callable, example: PyTree) -> int:
    """Bytes that one lane of `jax.vmap(fn)` needs: every intermediate of `fn` on one
    input (an upper bound, since XLA frees and fuses buffers), plus its inputs and
    outputs. Runs at trace time only."""
    closed = jax.make_jaxpr(fn)(example)
    jaxpr = closed.jaxpr
    return (
        _jaxpr_bytes(jaxpr)
        + sum(_var_bytes(v) for v in jaxpr.invars)
        + sum(_var_bytes(v) for v in jaxpr.outvars)
    )


def chunk_from_budget(per_lane: int, total: int, memory_budget: int) -> int:
    """The largest chunk of lanes whose working set fits `memory_budget`, in
    `[1, total]`."""
    return max(1, min(total, memory_budget // max(per_lane, 1)))
