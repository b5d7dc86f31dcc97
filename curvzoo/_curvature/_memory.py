"""Chunk sizes from a memory budget."""

import math
from collections.abc import Callable

import jax
from jaxtyping import Array


DEFAULT_MEMORY_BUDGET = 256 * 2**20
"""Default working-set budget of a curvature computation: 256 MiB."""


def _jaxpr_bytes(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            aval = var.aval
            if hasattr(aval, "shape") and hasattr(aval, "dtype"):
                total += math.prod(aval.shape) * aval.dtype.itemsize
    return total


def bytes_per_lane(fn: Callable[[Array], Array], example: Array) -> int:
    """Bytes that one lane of `jax.vmap(fn)` needs: every intermediate of `fn` on one
    input (an upper bound, since XLA frees and fuses buffers), plus its input and
    output."""
    closed = jax.make_jaxpr(fn)(example)
    out_bytes = sum(math.prod(v.aval.shape) * v.aval.dtype.itemsize for v in closed.jaxpr.outvars)
    return _jaxpr_bytes(closed.jaxpr) + example.size * example.dtype.itemsize + out_bytes


def chunk_from_budget(per_lane: int, total: int, memory_budget: int) -> int:
    """The largest chunk of lanes whose working set fits `memory_budget`, in
    `[1, total]`."""
    return max(1, min(total, memory_budget // max(per_lane, 1)))
