"""Sums over samples in chunks, shared by the structured kernels."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import PyTree

from ._memory import bytes_per_lane, chunk_from_budget


def trained_mask(params: PyTree) -> PyTree:
    """Bools shaped like the model: `True` where `params` holds a trained array."""
    return jax.tree.map(lambda leaf: leaf is not None, params, is_leaf=lambda x: x is None)


def sample_chunks(
    per_sample: Callable, inputs, targets, chunk_size: int | None, memory_budget: int, dtype
):
    """Split a batch `(inputs, targets)` into equal chunks of samples for `jax.lax.scan`.

    With `chunk_size=None` the chunk is the largest whose per-sample working set
    (measured on `per_sample`'s traced intermediates) fits `memory_budget`. Chunks are
    as even as possible; the last is padded by repeating the first sample, and `mask`
    (`(num_chunks, chunk)` of `dtype`, 1 for real samples, 0 for padding) says which is
    which.

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


def sum_over_samples(
    loss,
    model,
    batch: PyTree,
    per_sample: Callable,
    contract: Callable,
    chunk_size: int | None,
    memory_budget: int,
    dtype,
) -> PyTree:
    """`loss.scale(N, ...) * sum over chunks of contract(pieces, inputs, mask)`.

    `per_sample(x, y)` gives one sample's pieces; `contract(pieces, inputs, mask)` turns a
    chunk's stacked pieces into a PyTree of sums over that chunk, weighting each sample by
    `mask` (0 for padding). Chunks are scanned, so memory holds one chunk at a time.
    """
    inputs, targets = (jnp.asarray(leaf) for leaf in batch)
    chunks = sample_chunks(per_sample, inputs, targets, chunk_size, memory_budget, dtype)

    def chunk_sum(x, y, mask):
        return contract(jax.vmap(per_sample)(x, y), x, mask)

    def accumulate(total, chunk):
        return jax.tree.map(jnp.add, total, chunk_sum(*chunk)), None

    first = jax.tree.map(lambda leaf: leaf[0], chunks)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(chunk_sum, *first))
    total, _ = jax.lax.scan(accumulate, zeros, chunks)
    scale = loss.scale(inputs.shape[0], jax.eval_shape(model, inputs[0]).shape)
    return jax.tree.map(lambda leaf: scale * leaf, total)
