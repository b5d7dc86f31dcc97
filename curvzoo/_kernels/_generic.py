"""The generic exact kernel: one Hessian-vector product per parameter."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jaxtyping import PyTree

from .._losses import batch_parts
from ._lanes import chunked


LABEL = "Hessian diagonal (generic): chunks of entries"


def hessian_vector_product(params: PyTree, static: PyTree, loss: Callable, batch: PyTree):
    """`(flat, unravel, hvp)`: the trainable leaves raveled into one vector `flat`, and
    `hvp(v) = H v` for the Hessian of `loss(combine(unravel(flat), static), batch)`.

    One linearisation of the gradient (`jax.linearize(jax.grad(f))`: a forward and a
    backward pass whose residuals are kept) turns every product into a tangent
    evaluation (forward-over-reverse) that reuses them."""
    flat, unravel = ravel_pytree(params)

    def loss_of_flat(vector):
        return loss(eqx.combine(unravel(vector), static), batch)

    _, hvp = jax.linearize(jax.grad(loss_of_flat), flat)
    return flat, unravel, hvp


def ggn_vector_product(loss, model_of: Callable, batch: PyTree, at: PyTree) -> Callable:
    """`v -> G v` at the parameters `at` (`model_of(at)` the model), for the GGN
    `G = J^T H_out J` of a curvzoo `loss`: `J` the Jacobian of the batch's predictions
    in the parameters, `H_out` the Hessian in them of the loss's per-sample form
    `scale * sum_n sample_loss(prediction_n, y_n[, length_n])`, block-diagonal over
    samples. A batch `(inputs, targets, lengths)` is predicted with its lengths, its
    padded steps are masked and `scale` is that of the mean over valid steps.

    The predictions and the output gradient are linearised once; each product is then
    a Jacobian-vector product, a tangent pass through the output gradient and a
    vector-Jacobian product (about two gradients)."""
    inputs, targets, lengths = batch_parts(batch)

    def predict(p):
        return loss.predictions(model_of(p), inputs, lengths)

    predictions, jvp = jax.linearize(predict, at)
    scale = loss.scale(predictions.shape[0], predictions.shape[1:], lengths)

    def outer_loss(prediction):
        if lengths is None:
            terms = jax.vmap(loss.sample_loss)(prediction, targets)
        else:
            terms = jax.vmap(loss.sample_loss)(prediction, targets, lengths)
        return scale * jnp.sum(terms)

    _, out_product = jax.linearize(jax.grad(outer_loss), predictions)
    vjp = jax.linear_transpose(jvp, at)
    return lambda vector: vjp(out_product(jvp(vector)))[0]


def generic_hessian_diagonal(
    params: PyTree,
    static: PyTree,
    loss: Callable,
    batch: PyTree,
    *,
    chunk: int,
    progress: int = 0,
    mesh=None,
) -> PyTree:
    """Exact `diag(H)` of `loss(combine(params, static), batch)` w.r.t. `params`.

    `H[i, i] = (H e_i)[i]` is evaluated for one-hot `e_i`, `jax.vmap`ped over `chunk`
    basis vectors at a time and mapped over chunks, so no `P x P` matrix is ever built;
    with a `mesh`, each chunk's basis vectors are split over its devices.

    Cost: `P` Hessian-vector products, each the work of one to two gradients, plus one
    linearisation. Memory: the shared linearisation (a few copies of the activations
    for the batch) plus, per basis vector in a chunk, two length-`P` vectors and the
    tangents of one Hessian-vector product.
    """
    flat, unravel, hvp = hessian_vector_product(params, static, loss, batch)
    size = flat.size

    def entries(indices, mask):
        del mask  # padded lanes repeat entry 0; `chunked` drops them

        def entry(index):
            return hvp(jax.nn.one_hot(index, size, dtype=flat.dtype))[index]

        return jax.vmap(entry)(indices)

    diagonal = chunked(
        entries,
        jnp.arange(size),
        chunk,
        reduce="stack",
        dtype=flat.dtype,
        mesh=mesh,
        progress=progress,
        label=LABEL,
    )
    return unravel(diagonal)


def generic_per_sample_hessian_diagonal(
    params: PyTree,
    static: PyTree,
    loss: Callable,
    batch: PyTree,
    *,
    chunk: int,
    progress: int = 0,
    mesh=None,
) -> PyTree:
    """The generic kernel on each sample's one-sample batch in turn: `diag` of
    `loss(model, batch_n)` for every `n`, stacked on a new leading axis.

    Cost: `P` Hessian-vector products of a one-sample loss per sample, `N P` in all (about
    the work of `P` products on the whole batch); samples run one after another, so
    memory is that of the generic kernel on one sample plus the `N x P` result.
    """
    del mesh  # the samples run one after another; each one's basis is not split
    arrays, other = eqx.partition(batch, eqx.is_array)

    def one_sample(sample, mask):
        del mask
        single = eqx.combine(sample, other)
        diagonal = generic_hessian_diagonal(params, static, loss, single, chunk=chunk)
        return jax.tree.map(lambda leaf: leaf[None], diagonal)

    return chunked(
        one_sample,
        arrays,
        1,
        reduce="stack",
        progress=progress,
        label="Hessian diagonal (generic, per sample): samples",
    )
