"""The generic kernel for squared-column diagonals (GGN, Fisher, empirical Fisher).

Per sample `n` these diagonals are `sum_k w_k (J_n^T c_k)^2`, where `J_n` is the
Jacobian of sample `n`'s prediction in the parameters and `(c_k, w_k)` are the
quantity's output columns (`_factors.py`). Each `J_n^T c_k` is one vector-Jacobian
product, so this kernel works for any Equinox module: `K` backward passes per sample
(`K = C` for the GGN of a cross-entropy or elementwise loss on `C` outputs, `1` for the
empirical Fisher, `S` for an `S`-draw Fisher), never `P` of them.
"""

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp

from ._factors import output_factor
from ._samples import AbstractSampleKernel


class VJPKernel(AbstractSampleKernel):
    """`sum_n sum_k w_k (J_n^T c_k)^2` for a curvzoo `loss` and any model.

    Cost: per sample one forward pass (through `loss.predict` on a batch of one, so a
    loss that overrides `predict` is respected; with the sample's length, if any) and
    `K` vector-Jacobian products, `jax.vmap`ped. Memory: per sample in a chunk, the `K`
    parameter-sized gradients.
    """

    quantity: str = eqx.field(static=True)
    label: ClassVar[str] = "vector-Jacobian products"

    def pieces(self, params, static, loss, sample):
        x, y = sample[0], sample[1]
        length = sample[2] if len(sample) > 2 else None  # a batch with lengths

        def predict(p):
            one = jax.tree.map(lambda leaf: leaf[None], (x, length))
            return loss.predictions(eqx.combine(p, static), *one)[0]

        prediction, vjp = jax.vjp(predict, params)
        cols, weights = output_factor(self.quantity, loss, prediction, y, length)
        grads = jax.vmap(lambda c: vjp(c)[0])(cols)
        return jax.tree.map(lambda g: jnp.tensordot(weights, g**2, axes=1), grads)

    def contract(self, params, static, pieces, samples, mask):
        del params, static, samples
        return jax.tree.map(lambda leaf: jnp.tensordot(mask, leaf, axes=1), pieces)

    def assemble(self, params, static, totals):
        del params, static
        return totals
