"""One battery over every (model, estimator) pair, through `curvzoo.diagonal`: the zoo
MLP, CNN, Elman/GRU/LSTM, a stacked token RNN with lengths, `eqx.nn.MLP`,
`eqx.nn.Sequential` and a model registered with `curvzoo.structures`, under every
estimator. For each: float32 stays float32, the same inputs give the
same bits, the model passed in is not modified, and a second model of the same shapes
does not recompile; in float64, under an outer `eqx.filter_jit`, the result is the
eager one; `jax.vmap` over a stack of models; BCE with exact 0/1 labels. (Each
estimator's numbers against independent references: tests/test_estimators.py and the
per-quantity files; the functions as aliases of `curvzoo.diagonal`: the same.)"""

import curvzoo as cz
import curvzoo.structures as cs
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from .helpers import (
    assert_diagonal_close,
    count_compilations,
    make_batch,
    reference_ggn_diagonal,
    reference_hessian_diagonal,
    tree_allclose,
)


class Own(eqx.Module):
    """A model of the user's own, registered below."""

    first: eqx.nn.Linear
    second: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jr.split(key)
        self.first, self.second = eqx.nn.Linear(3, 4, key=k1), eqx.nn.Linear(4, 3, key=k2)

    def __call__(self, x):
        return self.second(jax.nn.softplus(self.first(x)))


cs.register(
    Own,
    lambda model, example: cs.Layered(
        (
            cs.layer(model, lambda m: m.first, "first"),
            cs.activation(jax.nn.softplus),
            cs.layer(model, lambda m: m.second, "second"),
        )
    ),
)


def _features(key, n=4):
    return jr.normal(key, (n, 3))


def _labels(key, n=4):
    return jr.randint(key, (n,), 0, 3)


# name -> (model from a key, batch from a model and a key, the kernel `auto` takes
# for the exact Hessian)
MODELS = {
    "mlp": (lambda k: cz.MLP(3, 3, 4, 1, key=k), None, "layered"),
    "cnn": (lambda k: cz.CNN(1, 3, (6, 6), channels=(2,), key=k), None, "layered"),
    "elman": (lambda k: cz.RNN(2, 3, 3, cell="elman", key=k), None, None),
    "gru": (lambda k: cz.RNN(2, 3, 3, cell="gru", key=k), None, None),
    "lstm": (lambda k: cz.RNN(2, 3, 3, cell="lstm", readout="all", key=k), None, None),
    "stacked-tokens-lengths": (
        lambda k: cz.RNN(3, 3, 3, "gru", readout="all", num_layers=2, vocab_size=5, key=k),
        lambda m, k: (
            jr.randint(k, (4, 4), 0, 5),
            jr.randint(jr.fold_in(k, 1), (4, 4), 0, 3),
            jnp.array([4, 2, 1, 3]),
        ),
        None,
    ),
    "eqx-mlp": (
        lambda k: eqx.nn.MLP(3, 3, 4, 1, key=k),
        lambda m, k: (_features(k), _labels(jr.fold_in(k, 1))),
        "layered",
    ),
    "eqx-sequential": (
        lambda k: eqx.nn.Sequential(
            [eqx.nn.Linear(3, 4, key=k), eqx.nn.Lambda(jnp.tanh), eqx.nn.Linear(4, 3, key=k)]
        ),
        lambda m, k: (_features(k), _labels(jr.fold_in(k, 1))),
        "layered",
    ),
    "own-registered": (
        Own,
        lambda m, k: (_features(k), _labels(jr.fold_in(k, 1))),
        "layered",
    ),
}

ESTIMATORS = {
    "exact": (cz.Exact(), {}),
    "ggn": (cz.GGN(), {}),
    "empirical-fisher": (cz.EmpiricalFisher(), {}),
    "fisher": (cz.Fisher(2), {"key": jr.key(7)}),
    "hutchinson-cv-stderr": (
        cz.Hutchinson(3, cz.GGN()),
        {"key": jr.key(7), "return_stderr": True},
    ),
}


def _case(model_name, key, dtype):
    make, batch_of, _ = MODELS[model_name]
    model = make(key)
    batch = make_batch(model, "ce", jr.fold_in(key, 1)) if batch_of is None else None
    if batch is None:
        batch = batch_of(model, jr.fold_in(key, 1))
    cast = lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x  # noqa: E731
    return jax.tree.map(cast, model), jax.tree.map(cast, batch)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("estimator_name", list(ESTIMATORS))
def test_battery(estimator_name, model_name, getkey, dtype=jnp.float32):
    estimator, kwargs = ESTIMATORS[estimator_name]
    model, batch = _case(model_name, getkey(), dtype)
    loss = cz.losses.cross_entropy
    before = jax.tree.map(lambda leaf: np.array(leaf) if eqx.is_array(leaf) else leaf, model)

    first = cz.diagonal(model, loss, batch, estimator, **kwargs)
    assert tree_allclose(model, before, rtol=0), "the model was modified"
    assert all(leaf.dtype == dtype for leaf in jax.tree.leaves(first))
    assert tree_allclose(cz.diagonal(model, loss, batch, estimator, **kwargs), first, rtol=0)
    if kwargs.get("return_stderr"):
        assert isinstance(first, cz.Estimate)

    other, other_batch = _case(model_name, getkey(), dtype)
    with count_compilations() as compilations:
        jax.block_until_ready(cz.diagonal(other, loss, other_batch, estimator, **kwargs))
    assert compilations[0] == 0, "a second model of the same shapes recompiled"


@pytest.mark.parametrize("model_name", ["stacked-tokens-lengths", "own-registered"])
@pytest.mark.parametrize("estimator_name", list(ESTIMATORS))
def test_under_an_outer_jit(estimator_name, model_name):
    """In float64, inside `eqx.filter_jit`: the eager numbers and dtypes."""
    estimator, kwargs = ESTIMATORS[estimator_name]
    model, batch = _case(model_name, jr.key(0), jnp.float64)
    loss = cz.losses.cross_entropy
    eager = cz.diagonal(model, loss, batch, estimator, **kwargs)
    assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(eager))
    run = eqx.filter_jit(lambda m, b: cz.diagonal(m, loss, b, estimator, **kwargs))
    assert tree_allclose(run(model, batch), eager, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("model_name", [m for m in MODELS if MODELS[m][2] is not None])
def test_the_fast_kernel_is_taken(model_name):
    """The models with a registered layered structure take it (a registration that
    silently fell back to the generic kernel would still pass the battery)."""
    model, batch = _case(model_name, jr.key(0), jnp.float64)
    assert cz.plan(model, cz.losses.cross_entropy, batch).kernel == MODELS[model_name][2]


@pytest.mark.parametrize("estimator_name", ["exact", "ggn", "fisher"])
def test_vmap_over_models(estimator_name):
    """`jax.vmap` over a stack of models (an ensemble), for the estimators that work
    sample by sample: each member's diagonal is the one computed alone."""
    estimator, kwargs = ESTIMATORS[estimator_name]
    keys = jr.split(jr.key(3), 3)
    models = [cz.MLP(3, 3, 4, 1, key=k) for k in keys]
    batch = make_batch(models[0], "ce", jr.key(4))
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs) if eqx.is_array(xs[0]) else xs[0], *models)
    params, static = eqx.partition(stacked, eqx.is_array)

    def one(p):
        return cz.diagonal(
            eqx.combine(p, static), cz.losses.cross_entropy, batch, estimator, **kwargs
        )

    together = eqx.filter_vmap(one)(params)
    for i, model in enumerate(models):
        alone = cz.diagonal(model, cz.losses.cross_entropy, batch, estimator, **kwargs)
        assert tree_allclose(jax.tree.map(lambda x: x[i], together), alone, rtol=1e-10)


def test_binary_cross_entropy_with_exact_labels():
    """BCE with exact 0/1 targets (labels) and with probabilities as targets: the exact
    estimators against `jax.hessian` and the Jacobian reference (float64)."""
    model = cz.MLP(3, 2, 4, 1, key=jr.key(0))
    x = jr.normal(jr.key(1), (6, 3))
    loss = cz.losses.binary_cross_entropy_with_logits
    for targets in (jnp.array([[0.0, 1.0]] * 3 + [[1.0, 1.0]] * 3), jnp.full((6, 2), 0.25)):
        batch = (x, targets)
        hessian = cz.diagonal(model, loss, batch)
        assert_diagonal_close(hessian, reference_hessian_diagonal(model, loss, batch))
        ggn = cz.diagonal(model, loss, batch, cz.GGN())
        assert_diagonal_close(ggn, reference_ggn_diagonal(model, loss, batch))
