"""The generic exact kernel: one Hessian-vector product per parameter."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jaxtyping import PyTree

from .._run._devices import split_lanes
from .._run._memory import bytes_per_lane, chunk_from_budget
from .._run._progress import report


@eqx.filter_jit
def generic_hessian_diagonal(
    params: PyTree,
    static: PyTree,
    loss: Callable,
    batch: PyTree,
    chunk_size: int | None,
    memory_budget: int,
    basis_limit: int | None = None,
    progress: bool = False,
    mesh=None,
) -> PyTree:
    """Exact `diag(H)` of `loss(combine(params, static), batch)` w.r.t. `params`.

    The trainable leaves are raveled into one vector of length `P`. One linearisation
    of the gradient (`jax.linearize(jax.grad(f))`: a forward and a backward pass whose
    residuals are kept) turns every Hessian-vector product into a tangent evaluation
    (forward-over-reverse) that reuses them. `H[i, i] = (H e_i)[i]` is evaluated for
    one-hot `e_i`, `jax.vmap`ped over `chunk_size` basis vectors at a time and mapped
    over chunks with `jax.lax.map`, so no `P x P` matrix is ever built.

    Cost: `P` Hessian-vector products, each the work of one to two gradients.
    Memory: the shared linearisation (a few copies of the activations for the batch)
    plus, per basis vector in a chunk, two length-`P` vectors and the tangents of one
    Hessian-vector product. With `chunk_size=None` the chunk is the largest whose
    per-chunk working set, measured on the traced product, fits `memory_budget`.
    This runs at trace time only; calls with the same shapes reuse the compiled code.

    `basis_limit` (for benchmarks only) evaluates just the first `basis_limit` diagonal
    entries and leaves the rest zero: the kernel's cost is exactly linear in the number
    of entries, so timing a prefix measures the whole at large `P`.
    """
    flat, unravel = ravel_pytree(params)
    size = flat.size

    def loss_of_flat(vector):
        return loss(eqx.combine(unravel(vector), static), batch)

    _, hvp = jax.linearize(jax.grad(loss_of_flat), flat)
    if chunk_size is None:
        chunk_size = chunk_from_budget(bytes_per_lane(hvp, flat), size, memory_budget)
    chunk_size = min(chunk_size, size)

    count = size if basis_limit is None else min(basis_limit, size)
    label = "Hessian diagonal (generic): chunks of entries"

    def diagonal_entry(index):
        basis = jax.nn.one_hot(index, size, dtype=flat.dtype)
        return hvp(basis)[index]

    # `jax.lax.map(..., batch_size=chunk)`, written out to report progress per chunk and
    # to split each chunk's basis vectors over the devices of `mesh`.
    chunk = min(chunk_size, count)
    if mesh is not None and chunk >= mesh.size:
        chunk -= chunk % mesh.size
    num_full = count // chunk
    num_chunks = num_full + int(num_full * chunk < count)

    def chunk_entries(_, indexed):
        index, entries = indexed
        report(progress, label, index, num_chunks)
        return None, jax.vmap(diagonal_entry)(split_lanes(entries, mesh))

    entries = jnp.arange(num_full * chunk).reshape(num_full, chunk)
    _, diagonal = jax.lax.scan(chunk_entries, None, (jnp.arange(num_full), entries))
    diagonal = diagonal.reshape(-1)
    if num_full * chunk < count:
        report(progress, label, num_full, num_chunks, after=diagonal)
        rest = jax.vmap(diagonal_entry)(jnp.arange(num_full * chunk, count))
        diagonal = jnp.concatenate([diagonal, rest])
    if count < size:
        diagonal = jnp.concatenate([diagonal, jnp.zeros(size - count, diagonal.dtype)])
    return unravel(diagonal)


@eqx.filter_jit
def generic_per_sample_hessian_diagonal(
    params: PyTree,
    static: PyTree,
    loss: Callable,
    batch: PyTree,
    chunk_size: int | None,
    memory_budget: int,
    progress: bool = False,
) -> PyTree:
    """The generic kernel on each sample's one-sample batch in turn: `diag` of
    `loss(model, batch_n)` for every `n`, stacked on a new leading axis.

    Cost: `P` Hessian-vector products of a one-sample loss per sample, `N P` in all (about
    the work of `P` products on the whole batch); samples run one after another
    (`jax.lax.map`), so memory is that of the generic kernel on one sample plus the
    `N x P` result.
    """
    arrays, other = eqx.partition(batch, eqx.is_array)
    num = jax.tree.leaves(arrays)[0].shape[0]

    def one(indexed):
        index, sample = indexed
        report(progress, "Hessian diagonal (generic, per sample): samples", index, num)
        single = eqx.combine(jax.tree.map(lambda leaf: leaf[None], sample), other)
        return generic_hessian_diagonal(params, static, loss, single, chunk_size, memory_budget)

    return jax.lax.map(one, (jnp.arange(num), arrays))
