"""The protocol of the sample-wise kernels, and the one driver that runs them.

A sample-wise kernel computes `scale * sum_n d_n`, a sum over samples of a per-sample
diagonal (or, with `keep_samples`, the `d_n` themselves). It says three things, and the
driver does the rest (chunking, masking the padding, the scale, the dtype):

- `pieces(params, static, loss, sample)`: whatever one sample contributes, from that
  sample alone (`sample` is one sample's slice of the batch: `(x, y)`, or
  `(x, y, length)`; the model is `eqx.combine(params, static)`, `params` its trained
  arrays);
- `contract(params, static, pieces, samples, mask)`: a chunk's pieces (stacked on a
  leading axis) summed into totals, each sample weighted by `mask`: 0 for padding,
  otherwise the loss's scale (a number, or a traced array with lengths), so the
  contraction must be linear in `mask` (multiply by it; never test it against 0 or 1).
  Dense layers contract here, over the whole chunk in one matrix product;
- `assemble(params, static, totals)`: the totals placed into the structure of `params`
  (that of `eqx.filter(model, filter_spec)`, `None` at frozen leaves).

Adding a kernel is one subclass; the plan (`curvzoo.plan`) picks it.
"""

import abc
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PyTree

from ._lanes import chunked
from ._precision import accumulation_dtype, upcast


def trained_mask(params: PyTree) -> PyTree:
    """Bools shaped like the model: `True` where `params` holds a trained array."""
    return jax.tree.map(lambda leaf: leaf is not None, params, is_leaf=lambda x: x is None)


def cast_like(result: PyTree, params: PyTree) -> PyTree:
    """Each leaf of `result` in its parameter's dtype (sums over mixed-precision
    parameters are accumulated in their common dtype)."""
    return jax.tree.map(lambda leaf, param: leaf.astype(param.dtype), result, params)


def _expand(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda leaf: leaf[None], tree)


class AbstractSampleKernel(eqx.Module):
    """A kernel that is a sum over samples of independent contributions.

    Subclasses hold only static data (the model's structure, which layers are trained,
    the quantity), so that two equal kernels share compiled code.
    """

    label: eqx.AbstractClassVar[str]

    @abc.abstractmethod
    def pieces(self, params: PyTree, static: PyTree, loss, sample: PyTree) -> PyTree:
        """One sample's contribution, before the contraction over samples."""

    @abc.abstractmethod
    def contract(self, params: PyTree, static: PyTree, pieces: PyTree, samples: PyTree, mask):
        """The `mask`-weighted sum of a chunk's stacked `pieces`, linear in `mask` (the
        padding's zeros times the scale; see the module docstring)."""

    @abc.abstractmethod
    def assemble(self, params: PyTree, static: PyTree, totals: PyTree) -> PyTree:
        """`totals` (each leaf possibly with a leading sample axis) placed into the
        structure of `params` (`None` at frozen leaves)."""


def chunk_function(
    kernel: AbstractSampleKernel, params, static, loss, *, scale, keep_samples: bool = False
):
    """The function `(samples, mask) -> sums` that `run_sample_kernel` runs on each
    chunk (`samples` with a leading axis of the chunk's size): the pieces of every
    sample and their `mask * scale`-weighted contraction, or with `keep_samples` each
    sample's own. The plan profiles it on the chunk it will most likely run (or on
    chunks of one and two samples, where that chunk is above the budget)."""

    def chunk_sum(samples, mask):
        # The scale rides on the mask (every contraction is linear in it), so it
        # multiplies a chunk's per-sample pieces, not the parameter-sized result.
        weights = mask * jnp.asarray(scale, mask.dtype)
        return _chunk_sum(kernel, params, static, loss, samples, weights)

    def chunk_stack(samples, mask):
        # Each sample as a chunk of one: the same contraction, so no second code path.
        def one(piece, sample, weight):
            return kernel.contract(params, static, _expand(piece), _expand(sample), weight[None])

        return jax.vmap(one)(_pieces(kernel, params, static, loss, samples), samples, mask)

    return chunk_stack if keep_samples else chunk_sum


@eqx.filter_jit
def _chunk_sum(kernel, params, static, loss, samples, weights):
    """A chunk's weighted sum, as one (inlined) compiled call: its trace is cached per
    kernel, static parts and shapes, so the plan's cost trace of a chunk and the run's
    trace of the same chunk trace the kernel once."""
    pieces = _pieces(kernel, params, static, loss, samples)
    return kernel.contract(params, static, pieces, samples, weights)


def _pieces(kernel, params, static, loss, samples):
    """Each sample's pieces, stacked, in at least float32 (the sums' precision)."""
    dtype = accumulation_dtype(jnp.result_type(*jax.tree.leaves(params)))
    return jax.vmap(lambda sample: upcast(kernel.pieces(params, static, loss, sample), dtype))(
        samples
    )


def run_sample_kernel(
    kernel: AbstractSampleKernel,
    params: PyTree,
    static: PyTree,
    loss: Any,
    batch: PyTree,
    *,
    scale,
    chunk: int,
    keep_samples: bool = False,
    progress: int = 0,
    mesh=None,
) -> PyTree:
    """`scale * sum_n d_n` (or, with `keep_samples`, every `scale_n * d_n` on a new
    leading axis, `scale` a number or one per sample) for a sample-wise `kernel`, in
    chunks of `chunk` samples.

    `batch` is a PyTree of arrays sharing the leading sample axis. Memory holds one
    chunk's pieces at a time (plus, with `keep_samples`, the stacked result).

    Precision: each sample's pieces are computed in the model's precision; the sums
    over samples and chunks are accumulated in at least float32 (the pieces of a
    bfloat16 or float16 model are cast up before the contraction; for float32 and
    float64 nothing is cast), and the result is cast to each leaf's dtype at the end.
    """
    dtype = accumulation_dtype(jnp.result_type(*jax.tree.leaves(params)))
    totals = chunked(
        chunk_function(kernel, params, static, loss, scale=scale, keep_samples=keep_samples),
        batch,
        chunk,
        reduce="stack" if keep_samples else "sum",
        dtype=dtype,
        mesh=mesh,
        progress=progress,
        label=f"{kernel.label}: chunks of samples",
    )
    if keep_samples:
        per = jnp.asarray(scale)  # a number, or one per sample

        def scaled(leaf):
            return jnp.reshape(per, per.shape + (1,) * (leaf.ndim - per.ndim)) * leaf

        totals = jax.tree.map(scaled, totals)
    return cast_like(kernel.assemble(params, static, totals), params)
