"""The generic kernel for squared-column diagonals (GGN, Fisher, empirical Fisher).

Per sample `n` these diagonals are `sum_k w_k (J_n^T c_k)^2`, where `J_n` is the
Jacobian of sample `n`'s prediction in the parameters and `(c_k, w_k)` are the
quantity's output columns (`_factors.py`). Each `J_n^T c_k` is one vector-Jacobian
product, so this kernel works for any Equinox module: `K` backward passes per sample
(`K = C` for the GGN of a cross-entropy or elementwise loss on `C` outputs, `1` for the
empirical Fisher, `S` for an `S`-draw Fisher), never `P` of them.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PyTree

from ._factors import output_factor
from ._samples import cast_like, sum_over_samples


@eqx.filter_jit
def outer_diagonal(
    params: PyTree,
    static: PyTree,
    loss,
    batch: PyTree,
    scale: float,
    chunk_size: int | None,
    memory_budget: int,
    quantity: str,
    keep_samples: bool = False,
    progress: bool = False,
) -> PyTree:
    """`scale * sum_n sum_k w_k (J_n^T c_k)^2` for a curvzoo `loss` and any model.

    Cost: per sample one forward pass (through `loss.predict` on a batch of one, so a
    loss that overrides `predict` is respected) and `K` vector-Jacobian products,
    `jax.vmap`ped. Memory: per sample in a chunk, the `K` parameter-sized gradients;
    with `chunk_size=None` the chunk of samples is the largest that fits
    `memory_budget` (at least one sample). `keep_samples=True` returns one diagonal per
    sample on a new leading axis instead of the sum.
    """

    def per_sample(x, y):
        def predict(p):
            one = jax.tree.map(lambda leaf: leaf[None], x)
            return loss.predict(eqx.combine(p, static), one)[0]

        prediction, vjp = jax.vjp(predict, params)
        cols, weights = output_factor(quantity, loss, prediction, y)
        grads = jax.vmap(lambda c: vjp(c)[0])(cols)
        return jax.tree.map(lambda g: jnp.tensordot(weights, g**2, axes=1), grads)

    def contract(pieces, inputs, mask):
        del inputs
        return jax.tree.map(lambda leaf: jnp.tensordot(mask, leaf, axes=1), pieces)

    inputs, targets = batch
    dtype = jnp.result_type(*jax.tree.leaves(params))
    result = sum_over_samples(
        (inputs, jnp.asarray(targets)),
        per_sample,
        contract,
        scale,
        chunk_size,
        memory_budget,
        dtype,
        keep_samples=keep_samples,
        progress=progress,
        label="vector-Jacobian products",
    )
    return cast_like(result, params)
