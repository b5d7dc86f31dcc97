"""One battery over every curvature function and a feed-forward and a recurrent zoo
model: same inputs give the same bits, float32 stays float32, a second call with the
same shapes does not recompile, and the model passed in is not modified."""

import curvzoo as cz
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from .helpers import count_compilations, make_batch, tree_allclose


FUNCTIONS = {
    "hessian": lambda m, b: cz.hessian_diagonal(m, cz.losses.cross_entropy, b),
    "hessian-per-sample": lambda m, b: cz.hessian_diagonal(
        m, cz.losses.cross_entropy, b, per_sample=True
    ),
    "ggn": lambda m, b: cz.ggn_diagonal(m, cz.losses.cross_entropy, b),
    "empirical-fisher": lambda m, b: cz.empirical_fisher_diagonal(m, cz.losses.cross_entropy, b),
    "fisher": lambda m, b: cz.fisher_diagonal(m, cz.losses.cross_entropy, b, key=jr.key(7)),
    "hutchinson-cv": lambda m, b: cz.hutchinson_diagonal(
        m, cz.losses.cross_entropy, b, key=jr.key(7), num_probes=3, control_variate="ggn",
        return_stderr=True,
    ),
}  # fmt: skip

MODELS = {
    "mlp": lambda key: cz.MLP(3, 3, 4, 1, key=key),
    "gru": lambda key: cz.RNN(2, 3, 3, cell="gru", key=key),
}


def _float32(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float32) if eqx.is_inexact_array(x) else x, tree)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("function_name", list(FUNCTIONS))
def test_battery(function_name, model_name, getkey):
    function = FUNCTIONS[function_name]
    model = MODELS[model_name](getkey())
    x, y = make_batch(model, "ce", getkey())
    model, batch = _float32(model), (x.astype(jnp.float32), y)
    before = jax.tree.map(lambda leaf: np.array(leaf) if eqx.is_array(leaf) else leaf, model)

    first = function(model, batch)
    assert tree_allclose(model, before, rtol=0), "the model was modified"
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(first))
    assert tree_allclose(function(model, batch), first, rtol=0), "not deterministic"

    other = MODELS[model_name](getkey())
    x2, y2 = make_batch(other, "ce", getkey())
    other, other_batch = _float32(other), (x2.astype(jnp.float32), y2)
    with count_compilations() as compilations:
        jax.block_until_ready(function(other, other_batch))
    assert compilations[0] == 0
