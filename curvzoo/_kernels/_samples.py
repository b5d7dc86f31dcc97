"""Sums over samples in chunks, shared by the kernels that work sample by sample."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import PyTree

from .._run._memory import bytes_per_lane, chunk_from_budget
from .._run._progress import report


def trained_mask(params: PyTree) -> PyTree:
    """Bools shaped like the model: `True` where `params` holds a trained array."""
    return jax.tree.map(lambda leaf: leaf is not None, params, is_leaf=lambda x: x is None)


def cast_like(result: PyTree, params: PyTree) -> PyTree:
    """Each leaf of `result` in its parameter's dtype (sums over mixed-precision
    parameters are accumulated in their common dtype)."""
    return jax.tree.map(lambda leaf, param: leaf.astype(param.dtype), result, params)


def _first(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda leaf: leaf[0], tree)


def sample_chunks(
    per_sample: Callable, inputs, targets, chunk_size: int | None, memory_budget: int, dtype
):
    """Split a batch `(inputs, targets)` (PyTrees of arrays with a leading batch axis)
    into equal chunks of samples for `jax.lax.scan`.

    With `chunk_size=None` the chunk is the largest whose per-sample working set
    (measured on `per_sample`'s traced intermediates) fits `memory_budget`. Chunks are
    as even as possible; the last is padded by repeating the first sample, and `mask`
    (`(num_chunks, chunk)` of `dtype`, 1 for real samples, 0 for padding) says which is
    which.

    **Returns:** `(chunked_inputs, chunked_targets, mask)`, each with leading axes
    `(num_chunks, chunk)`.
    """
    num = jax.tree.leaves(inputs)[0].shape[0]
    if chunk_size is None:
        lane = bytes_per_lane(lambda xy: per_sample(*xy), (_first(inputs), _first(targets)))
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
    return jax.tree.map(chunked, inputs), jax.tree.map(chunked, targets), mask


def sum_over_samples(
    batch: PyTree,
    per_sample: Callable,
    contract: Callable,
    scale: float,
    chunk_size: int | None,
    memory_budget: int,
    dtype,
    *,
    keep_samples: bool = False,
    progress: bool = False,
    label: str = "samples",
) -> PyTree:
    """`scale * sum over chunks of contract(pieces, inputs, mask)`, or with
    `keep_samples=True` the same per sample, stacked on a new leading axis.

    `batch` is `(inputs, targets)`. `per_sample(x, y)` gives one sample's pieces;
    `contract(pieces, inputs, mask)` turns a chunk's stacked pieces into a PyTree of
    sums over that chunk, weighting each sample by `mask` (0 for padding). Chunks are
    scanned, so memory holds one chunk at a time (plus, with `keep_samples`, the
    stacked result).
    """
    inputs, targets = batch
    chunks = sample_chunks(per_sample, inputs, targets, chunk_size, memory_budget, dtype)

    def chunk_sum(x, y, mask):
        return contract(jax.vmap(per_sample)(x, y), x, mask)

    def sample_results(x, y, mask):
        # Each sample as a chunk of one: the same contraction, so no second code path.
        def one(piece, xi, mi):
            expand = lambda tree: jax.tree.map(lambda leaf: leaf[None], tree)  # noqa: E731
            return contract(expand(piece), expand(xi), mi[None])

        return jax.vmap(one)(jax.vmap(per_sample)(x, y), x, mask)

    num_chunks = chunks[-1].shape[0]  # the mask, `(num_chunks, chunk)`

    def tell(index):
        report(progress, f"{label}: chunks of samples", index, num_chunks)

    if keep_samples:

        def stacked_chunk(indexed):
            index, chunk = indexed
            tell(index)
            return sample_results(*chunk)

        stacked = jax.lax.map(stacked_chunk, (jnp.arange(num_chunks), chunks))
        num = jax.tree.leaves(inputs)[0].shape[0]
        return jax.tree.map(lambda leaf: scale * leaf.reshape(-1, *leaf.shape[2:])[:num], stacked)

    def accumulate(total, indexed):
        index, chunk = indexed
        tell(index)
        return jax.tree.map(jnp.add, total, chunk_sum(*chunk)), None

    if num_chunks == 1:  # one chunk: no loop, so XLA can fuse across it
        tell(0)
        total = chunk_sum(*_first(chunks))
    else:
        zeros = jax.tree.map(
            lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(chunk_sum, *_first(chunks))
        )
        total, _ = jax.lax.scan(accumulate, zeros, (jnp.arange(num_chunks), chunks))
    return jax.tree.map(lambda leaf: scale * leaf, total)
