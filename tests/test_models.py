"""The zoo's models: shapes, layouts, and constructor checks."""

import curvzoo as cz
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_mlp_layout(depth, getkey):
    model = cz.MLP(5, 3, 7, depth, key=getkey())
    assert len(model.layers) == depth + 1
    assert all(isinstance(layer, eqx.nn.Linear) for layer in model.layers)
    assert model.layers[0].weight.shape == ((7, 5) if depth else (3, 5))
    assert model(jnp.ones(5)).shape == (3,)


def test_mlp_matches_hand_written(getkey):
    model = cz.MLP(4, 2, 3, 2, activation=jax.nn.sigmoid, key=getkey())
    x = jr.normal(getkey(), (4,))
    h = x
    for layer in model.layers[:-1]:
        h = jax.nn.sigmoid(layer.weight @ h + layer.bias)
    expected = model.layers[-1].weight @ h + model.layers[-1].bias
    assert jnp.allclose(model(x), expected, rtol=1e-14)


@pytest.mark.parametrize("cell", ["elman", "gru", "lstm"])
@pytest.mark.parametrize("readout", ["last", "all"])
def test_rnn_shapes(cell, readout, getkey):
    model = cz.RNN(3, 6, 4, cell=cell, readout=readout, key=getkey())
    xs = jr.normal(getkey(), (9, 3))
    out = model(xs)
    assert out.shape == ((4,) if readout == "last" else (9, 4))
    gates = {"elman": 1, "gru": 3, "lstm": 4}[cell]
    assert model.cell.weight_ih.shape == (gates * 6, 3)
    assert model.cell.weight_hh.shape == (gates * 6, 6)


def test_elman_cell_recurrence(getkey):
    model = cz.RNN(2, 3, 1, cell="elman", readout="all", key=getkey())
    xs = jr.normal(getkey(), (4, 2))
    h = jnp.zeros(3)
    cell = model.cell
    for x in xs:
        h = jnp.tanh(cell.weight_ih @ x + cell.weight_hh @ h + cell.bias)
    expected = model.head.weight @ h + model.head.bias
    assert jnp.allclose(model(xs)[-1], expected, rtol=1e-14)


def test_rnn_last_equals_last_step_of_all(getkey):
    key = getkey()
    last = cz.RNN(2, 4, 3, cell="lstm", readout="last", key=key)
    every = cz.RNN(2, 4, 3, cell="lstm", readout="all", key=key)
    xs = jr.normal(getkey(), (6, 2))
    assert jnp.allclose(last(xs), every(xs)[-1], rtol=1e-14)


def test_cnn_mnist_layout(getkey):
    model = cz.CNN(1, 10, 28, channels=(8, 16), kernel_size=3, key=getkey())
    assert model.head.weight.shape == (10, 16 * 5 * 5)
    assert model(jnp.ones((1, 28, 28))).shape == (10,)


def test_cnn_avg_pool_and_rectangular(getkey):
    model = cz.CNN(2, 3, (12, 9), channels=(4,), pool="avg", key=getkey())
    assert model.head.weight.shape == (3, 4 * 5 * 3)
    assert model(jnp.ones((2, 12, 9))).shape == (3,)


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda k: cz.MLP(0, 2, 3, 1, key=k), "`in_size`"),
        (lambda k: cz.MLP(2, 2, 3, -1, key=k), "`depth`"),
        (lambda k: cz.RNN(2, 3, 1, cell="rnn", key=k), "`cell` must be one of"),
        (lambda k: cz.RNN(2, 3, 1, readout="first", key=k), "`readout` must be one of"),
        (lambda k: cz.CNN(1, 10, 6, channels=(8, 16), key=k), "`image_size`"),
        (lambda k: cz.CNN(1, 10, 28, pool="min", key=k), "`pool` must be one of"),
        (lambda k: cz.CNN(1, 10, 28, channels=(), key=k), "`channels`"),
    ],
)
def test_bad_constructor_arguments(build, match, getkey):
    with pytest.raises(ValueError, match=match):
        build(getkey())


def test_models_are_final_modules():
    for cls in (cz.MLP, cz.RNN, cz.CNN):
        assert issubclass(cls, cz.AbstractModel) and issubclass(cls, eqx.Module)
