"""What a kernel squares: the output-space columns of each curvature quantity.

Every diagonal here is, per sample, `sum_k w_k (J^T c_k)^2` over columns `c_k` in the
prediction's space (`J` the Jacobian of the prediction in the parameters), plus, for
the Hessian only, the residual terms of the network's own second derivatives:

- `"hessian"` and `"ggn"`: the loss Hessian's factor `H_out = sum_k w_k c_k c_k^T`
  (`C - 1` columns for cross-entropy over `C` classes, its rank; diagonal for
  elementwise losses);
- `"gradients"`: the loss's gradients in the prediction at each of the targets stacked
  on the target's leading axis, with weights `1 / S`: one true target gives the
  empirical Fisher, `S` targets drawn from the model give the Monte-Carlo Fisher.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array


QUANTITIES = ("hessian", "ggn", "gradients")


def output_factor(
    quantity: str, loss, prediction: Array, target: Array, length: Array | None = None
) -> tuple[Array, Array]:
    """`(columns (K, *prediction.shape), weights (K,))` of one sample; with `length`,
    those of its masked loss (`loss.sample_loss`): the columns times the step mask,
    which zeroes the padded steps' gradients and Hessian blocks alike."""
    if quantity == "gradients":
        grads = jax.vmap(jax.grad(loss.per_sample), (None, 0))(prediction, target)
        cols, weights = grads, jnp.full(grads.shape[0], 1 / grads.shape[0], grads.dtype)
    elif quantity in ("hessian", "ggn"):
        cols, weights = loss.output_hessian_factor(prediction, target)
    else:
        raise ValueError(f"unknown quantity {quantity!r}")
    mask = loss.step_mask(prediction, length)
    return (cols, weights) if mask is None else (cols * mask, weights)
