"""The moving averages the preconditioners share, with Adam's bias correction."""

import jax
import jax.numpy as jnp
from jaxtyping import Array, PyTree


def zeros_like(params: PyTree) -> PyTree:
    """Zeros shaped like `params`; `None` stays `None` (a frozen leaf)."""
    return jax.tree.map(jnp.zeros_like, params)


def ema(moment: PyTree, value: PyTree, decay) -> PyTree:
    """`decay * moment + (1 - decay) * value`, leaf by leaf, in `moment`'s dtype."""
    return jax.tree.map(
        lambda m, x: decay * m + (1 - decay) * jnp.asarray(x).astype(m.dtype), moment, value
    )


def bias_corrected(moment: PyTree, decay, count: Array) -> PyTree:
    """`moment / (1 - decay**count)`: the average of a running mean started at zero,
    as in Adam (Kingma and Ba 2015). `decay = 0` leaves `moment` as it is."""
    correction = 1 - jnp.asarray(decay) ** count
    return jax.tree.map(lambda m: m / correction.astype(m.dtype), moment)


def precondition(mu: PyTree, nu: PyTree, count: Array, b1, b2, eps, power=1.0) -> PyTree:
    """`m_hat / (sqrt(v_hat)**power + eps)` with the bias-corrected averages `m_hat` of
    the gradient and `v_hat` of the squared curvature."""
    m_hat = bias_corrected(mu, b1, count)
    v_hat = bias_corrected(nu, b2, count)
    return jax.tree.map(lambda m, v: m / (jnp.sqrt(v) ** power + eps), m_hat, v_hat)
