"""The one chunked loop that every kernel runs its lanes through.

A *lane* is one independent piece of work: a sample (the sample-wise kernels), a basis
vector (the generic kernel) or a probe (Hutchinson). `chunked` evaluates
`fn(chunk_of_lanes, mask)` on equal chunks of lanes, `jax.vmap`-friendly and bounded in
memory, and reduces the chunks' results.

The chunks are as even as possible: `num_chunks = ceil(L / chunk)`, then
`chunk = ceil(L / num_chunks)`, so at most `num_chunks - 1` lanes are padding. Padding
repeats lane 0 and carries `mask = 0`; every reduction must weight by `mask` (a sum) or
drop the padded lanes (a stack), and `chunked` does the latter itself.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, PyTree

from .._run._devices import split_lanes
from .._run._progress import report


def even_chunks(num_lanes: int, chunk: int, multiple: int = 1) -> tuple[int, int]:
    """`(chunk, num_chunks)` for `num_lanes` lanes in chunks of at most `chunk` (at least
    one lane), as even as possible, each a multiple of `multiple` where it can be (the
    devices of a mesh, so that a chunk splits evenly over them). Applied to its own
    `chunk` it returns the same split, so the plan's split is the one that runs."""
    chunk = max(1, min(int(chunk), num_lanes))
    num_chunks = -(-num_lanes // chunk)
    chunk = -(-num_lanes // num_chunks)
    if multiple > 1 and chunk >= multiple:
        chunk = -(-chunk // multiple) * multiple
        num_chunks = -(-num_lanes // chunk)
    return chunk, num_chunks


def _first(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda leaf: leaf[0], tree)


def chunked(
    fn: Callable,
    lanes: PyTree,
    chunk: int,
    *,
    reduce: str | Callable = "sum",
    init: PyTree | None = None,
    dtype=jnp.float32,
    mesh=None,
    progress: int = 0,
    label: str = "lanes",
) -> PyTree:
    """Run `fn(chunk_lanes, mask)` over `lanes` (a PyTree of arrays sharing a leading
    axis of size `L`) in chunks of at most `chunk` lanes.

    **Arguments:**

    - `fn`: takes a chunk of lanes (each leaf with leading axis `chunk`) and `mask`
        (`(chunk,)` of `dtype`: 1 for real lanes, 0 for padding) and returns a PyTree.
    - `reduce`: `"sum"` adds the chunks' results (so `fn` must weight its lanes by
        `mask`); `"stack"` concatenates them along their leading axis (of size `chunk`)
        and drops the padded lanes, giving leading axis `L`; a callable
        `reduce(carry, chunk_result)` folds them, starting from `init`.
    - `mesh`: if given, each chunk's lanes are split over the mesh's devices where they
        divide evenly.
    - `progress`, `label`: report every `progress`-th chunk (and the last) as they go
        (`curvzoo`'s progress display); `0` reports nothing.

    **Cost:** `num_chunks` calls of `fn`, one after another (`jax.lax.scan`); memory
    holds one chunk's working set at a time, plus for `"stack"` the whole result. A single
    chunk runs without a loop, so XLA can fuse across it.
    """
    num = jax.tree.leaves(lanes)[0].shape[0]
    multiple = 1 if mesh is None else mesh.size
    chunk, num_chunks = even_chunks(num, chunk, multiple)
    padded = num_chunks * chunk

    def split(leaf):
        extra = padded - leaf.shape[0]
        if extra:
            leaf = jnp.concatenate([leaf, jnp.repeat(leaf[:1], extra, axis=0)])
        return leaf.reshape(num_chunks, chunk, *leaf.shape[1:])

    chunks = jax.tree.map(split, lanes)
    masks = (jnp.arange(padded) < num).astype(dtype).reshape(num_chunks, chunk)

    def one(index, chunk_lanes, mask):
        if progress > 1 and num_chunks > 1:  # only every `progress`-th chunk calls back
            due = (index % progress == 0) | (index == num_chunks - 1)
            jax.lax.cond(due, lambda: report(True, label, index, num_chunks), lambda: None)
        else:
            report(bool(progress), label, index, num_chunks)
        chunk_lanes = jax.tree.map(lambda leaf: split_lanes(leaf, mesh), chunk_lanes)
        return fn(chunk_lanes, mask)

    if reduce == "stack":
        if num_chunks == 1:
            stacked = jax.tree.map(lambda leaf: leaf[None], one(0, _first(chunks), masks[0]))
        else:
            stacked = jax.lax.map(lambda args: one(*args), (jnp.arange(num_chunks), chunks, masks))
        return jax.tree.map(lambda leaf: leaf.reshape(padded, *leaf.shape[2:])[:num], stacked)

    if reduce == "sum":
        fold = lambda total, result: jax.tree.map(jnp.add, total, result)  # noqa: E731
    else:
        fold = reduce
    if num_chunks == 1 and init is None:
        return one(0, _first(chunks), masks[0])
    if init is None:
        shapes = jax.eval_shape(lambda c, m: fn(c, m), _first(chunks), masks[0])
        init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def step(carry, args):
        return fold(carry, one(*args)), None

    total, _ = jax.lax.scan(step, init, (jnp.arange(num_chunks), chunks, masks))
    return total


def mask_like(mask: Array, leaf: Array) -> Array:
    """`mask` (`(chunk,)`) shaped to broadcast against `leaf` (`(chunk, ...)`)."""
    return mask.reshape(mask.shape + (1,) * (leaf.ndim - 1)).astype(leaf.dtype)
