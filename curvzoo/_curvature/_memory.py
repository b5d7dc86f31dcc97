"""Chunk sizes from a memory budget."""

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
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


def sample_chunks(
    per_sample: Callable, inputs, targets, chunk_size: int | None, memory_budget: int, dtype
):
    """Split a batch `(inputs, targets)` into equal chunks of samples for `jax.lax.scan`.

    With `chunk_size=None` the chunk is the largest whose per-sample working set
    (measured on `per_sample`'s traced intermediates) fits `memory_budget`. Chunks are
    as even as possible; the last is padded by repeating the first sample, and `mask`
    (`(num_chunks, chunk)`, 1 for real samples, 0 for padding) says which is which.

    **Returns:** `(chunked_inputs, chunked_targets, mask)`, each with leading axes
    `(num_chunks, chunk)`.
    """
    num = inputs.shape[0]
    if chunk_size is None:
        lane = bytes_per_lane(lambda xy: per_sample(*xy), (inputs[0], targets[0]))
        chunk_size = chunk_from_budget(lane, num, memory_budget)
    num_chunks = -(-num // min(chunk_size, num))
    chunk_size = -(-num // num_chunks)
    padded = num_chunks * chunk_size

    def chunked(leaf):
        extra = padded - leaf.shape[0]
        if extra:
            leaf = jnp.concatenate([leaf, jnp.repeat(leaf[:1], extra, axis=0)])
        return leaf.reshape(num_chunks, chunk_size, *leaf.shape[1:])

    mask = (jnp.arange(padded) < num).astype(dtype).reshape(num_chunks, chunk_size)
    return chunked(inputs), chunked(targets), mask
