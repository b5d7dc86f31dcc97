"""The structured kernel for MLP and CNN against `jax.hessian` and the generic kernel."""

import curvzoo as cz
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from curvzoo._dispatch._structures import describe

from .helpers import (
    assert_diagonal_close,
    LOSS_CLASSES,
    make_batch,
    reference_hessian_diagonal,
    spy_kernels,
    tree_allclose,
    with_reductions,
)


ACTIVATIONS = {
    "tanh": jax.nn.tanh,
    "sigmoid": jax.nn.sigmoid,
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "softplus": jax.nn.softplus,
}


def _check(model, loss, batch):
    result = model.hessian_diagonal(loss, batch, method="structured")
    assert_diagonal_close(result, reference_hessian_diagonal(model, loss, batch))
    return result


# Depths 0 to 3, with the same sizes, losses, reductions and batch, are the models
# `mlp0` to `mlp3` of `test_hessian_diagonal.py::test_matches_jax_hessian`, which checks
# the structured kernel against `jax.hessian` just as here.
@pytest.mark.parametrize(
    "depth,loss_name,reduction",
    [case for case in with_reductions([0, 1, 2, 3, 4], sorted(LOSS_CLASSES)) if case[0] == 4],
)
def test_mlp_depths(depth, loss_name, reduction, getkey):
    model = cz.MLP(3, 3, 4, depth, key=getkey())
    loss = LOSS_CLASSES[loss_name](reduction=reduction)
    _check(model, loss, make_batch(model, loss_name, getkey()))


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("depth", [2, 4])
def test_mlp_activations(activation, depth, getkey):
    model = cz.MLP(3, 3, 5, depth, activation=ACTIVATIONS[activation], key=getkey())
    batch = make_batch(model, "ce", getkey(), batch_size=7)
    result = _check(model, cz.losses.cross_entropy, batch)
    generic = model.hessian_diagonal(cz.losses.cross_entropy, batch, method="generic")
    assert_diagonal_close(result, generic)


@pytest.mark.parametrize(
    "pool,loss_name,reduction", with_reductions(["max", "avg"], sorted(LOSS_CLASSES))
)
def test_cnn(pool, loss_name, reduction, getkey):
    model = cz.CNN(2, 3, (11, 10), channels=(2, 3), pool=pool, key=getkey())
    loss = LOSS_CLASSES[loss_name](reduction=reduction)
    _check(model, loss, make_batch(model, loss_name, getkey(), batch_size=3))


@pytest.mark.parametrize("activation", ["relu", "softplus"])
def test_cnn_activations_and_three_convs(activation, getkey):
    model = cz.CNN(1, 2, 22, channels=(2, 2, 2), activation=ACTIVATIONS[activation], key=getkey())
    batch = make_batch(model, "bce", getkey(), batch_size=3)
    _check(model, cz.losses.BCEWithLogits(reduction="sum"), batch)


@pytest.mark.parametrize("batch_size", [1, 2, 7])
@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_batch_and_chunk_sizes(batch_size, chunk_size, getkey):
    model = cz.MLP(3, 3, 4, 3, activation=jax.nn.softplus, key=getkey())
    batch = make_batch(model, "ce", getkey(), batch_size=batch_size)
    result = model.hessian_diagonal(
        cz.losses.cross_entropy, batch, method="structured", chunk_size=chunk_size
    )
    assert_diagonal_close(result, reference_hessian_diagonal(model, cz.losses.cross_entropy, batch))


def test_cnn_chunks(getkey):
    model = cz.CNN(1, 3, 10, channels=(2, 2), pool="avg", key=getkey())
    batch = make_batch(model, "ce", getkey(), batch_size=5)
    whole = model.hessian_diagonal(cz.losses.cross_entropy, batch, method="structured")
    for chunk_size in (1, 2):
        chunked = model.hessian_diagonal(
            cz.losses.cross_entropy, batch, method="structured", chunk_size=chunk_size
        )
        assert tree_allclose(whole, chunked, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    "frozen",
    [
        lambda m: m.layers[1].weight,
        lambda m: (m.layers[0].weight, m.layers[0].bias),
        lambda m: (m.layers[2].bias, m.layers[1].bias),
    ],
)
def test_mlp_frozen_leaves(frozen, getkey):
    model = cz.MLP(3, 3, 4, 2, key=getkey())
    batch = make_batch(model, "mse", getkey())
    spec = jax.tree.map(lambda _: True, model)
    leaves = frozen(spec)
    spec = eqx.tree_at(frozen, spec, jax.tree.map(lambda _: False, leaves))
    result = model.hessian_diagonal(cz.losses.mse, batch, filter_spec=spec, method="structured")
    for leaf in jax.tree.leaves(
        frozen(jax.tree.map(lambda x: x is None, result, is_leaf=lambda x: x is None))
    ):
        assert leaf
    generic = model.hessian_diagonal(cz.losses.mse, batch, filter_spec=spec, method="generic")
    assert jax.tree.structure(result) == jax.tree.structure(generic)
    assert_diagonal_close(result, generic)
    assert_diagonal_close(result, reference_hessian_diagonal(model, cz.losses.mse, batch, spec))


def test_cnn_frozen_convolution(getkey):
    model = cz.CNN(1, 3, 10, channels=(2, 2), key=getkey())
    batch = make_batch(model, "ce", getkey())
    spec = jax.tree.map(lambda _: True, model)
    spec = eqx.tree_at(lambda s: (s.convs[1].weight, s.head), spec, (False, False))
    result = model.hessian_diagonal(cz.losses.cross_entropy, batch, filter_spec=spec)
    assert result.convs[1].weight is None and result.head.weight is None
    assert result.convs[1].bias is not None
    expected = reference_hessian_diagonal(model, cz.losses.cross_entropy, batch, spec)
    assert_diagonal_close(result, expected)


# ## Every branch of the layered kernel, through `equinox.nn.Sequential` models

_L = eqx.nn.Lambda


def _sequential(name, key):
    """`(model, input shape)`. Each model reaches one branch of the layered kernel that
    the zoo's layouts do not (`curvzoo/_kernels/_layered.py`)."""
    k1, k2, k3, k4 = jr.split(key, 4)
    if name == "two-activations":  # `_pull`: a residual through an activation below another
        layers = [eqx.nn.Linear(3, 4, key=k1), _L(jnp.tanh), _L(jax.nn.softplus)]
        return eqx.nn.Sequential([*layers, eqx.nn.Linear(4, 3, key=k2)]), (3,)
    if name == "activation-after-max-pool":  # `_pull`: a residual through max pooling
        layers = [eqx.nn.Conv2d(1, 2, 3, key=k1), eqx.nn.MaxPool2d(2, 2), _L(jnp.tanh)]
        head = [_L(jnp.ravel), eqx.nn.Linear(18, 3, key=k2)]
        return eqx.nn.Sequential(layers + head), (1, 8, 8)
    if name == "activation-after-reshape":  # `_pull`: a residual through a reshape
        layers = [eqx.nn.Conv2d(1, 2, 3, key=k1), _L(jnp.ravel), _L(jax.nn.sigmoid)]
        return eqx.nn.Sequential([*layers, eqx.nn.Linear(32, 3, key=k2)]), (1, 6, 6)
    if name == "lazy-rows-in-a-tangent-quadratic":
        # A one-unit bottleneck (`"scalar"` features): the state below the scalar layer
        # is unavailable, so the first layer's tangents are pushed up to a state that
        # still holds the lazy rows of the 4-by-4 layer (`_State.quadratic`).
        layers = [
            eqx.nn.Linear(3, "scalar", key=k1), _L(jnp.tanh),
            eqx.nn.Linear("scalar", 4, key=k2), _L(jnp.tanh),
            eqx.nn.Linear(4, 4, key=k3), _L(jnp.tanh), eqx.nn.Linear(4, 3, key=k4),
        ]  # fmt: skip
        return eqx.nn.Sequential(layers), (3,)
    raise ValueError(name)


@pytest.mark.parametrize(
    "name",
    [
        "two-activations",
        "activation-after-max-pool",
        "activation-after-reshape",
        "lazy-rows-in-a-tangent-quadratic",
    ],
)
def test_sequential_models_reach_every_branch(name, getkey):
    """The structured kernel runs (its plan says so) and matches `jax.hessian`."""
    model, shape = _sequential(name, getkey())
    generator = np.random.default_rng(len(name))
    batch = (
        jnp.asarray(generator.standard_normal((5, *shape))),
        jnp.asarray(generator.integers(0, 3, 5)),
    )
    loss = cz.losses.cross_entropy
    assert cz.plan(model, loss, batch).kernel == "layered"
    result = cz.hessian_diagonal(model, loss, batch)
    assert_diagonal_close(result, reference_hessian_diagonal(model, loss, batch))


def test_layer_chain_reproduces_the_model(getkey):
    for model in (
        cz.MLP(3, 2, 4, 3, key=getkey()),
        cz.CNN(2, 3, 12, channels=(3, 2), pool="avg", key=getkey()),
    ):
        x = jr.normal(getkey(), (model.in_size,) if isinstance(model, cz.MLP) else (2, 12, 12))
        u = x
        for op in describe(model, x).ops:
            u = op.apply(model, u)
        assert jnp.array_equal(u, model(x))


def test_auto_dispatch(getkey, monkeypatch):
    """`auto` takes the structured kernel for zoo MLP/CNN with curvzoo losses and the
    generic kernel otherwise."""
    calls = spy_kernels(monkeypatch)

    mlp = cz.MLP(3, 2, 4, 1, key=getkey())
    cnn = cz.CNN(1, 2, 10, channels=(2, 2), key=getkey())
    for model in (mlp, cnn):
        model.hessian_diagonal(cz.losses.cross_entropy, make_batch(model, "ce", getkey()))

    def custom(model, batch):
        return cz.losses.cross_entropy(model, batch)

    mlp.hessian_diagonal(custom, make_batch(mlp, "ce", getkey()))
    softmax_mlp = cz.MLP(3, 2, 4, 1, activation=jax.nn.softmax, key=getkey())
    softmax_mlp.hessian_diagonal(cz.losses.cross_entropy, make_batch(mlp, "ce", getkey()))
    unregistered = _Residual(eqx.nn.Linear(3, 2, key=getkey()))
    cz.hessian_diagonal(unregistered, cz.losses.mse, (jnp.zeros((2, 3)), jnp.zeros((2, 2))))
    assert calls == ["structured", "structured", "generic", "generic", "generic"]
    # `eqx.nn.MLP` registers its structure, so it takes the structured kernel too.
    model = eqx.nn.MLP(3, 2, 4, 1, key=getkey())
    cz.hessian_diagonal(model, cz.losses.mse, (jnp.zeros((2, 3)), jnp.zeros((2, 2))))
    assert calls[-1] == "structured"


class _Residual(eqx.Module):
    """A model type with no registered structure."""

    layer: eqx.nn.Linear

    def __call__(self, x):
        return self.layer(x) + x[:2]


def test_forced_structured_names_the_unsupported_part(getkey):
    mlp = cz.MLP(3, 2, 4, 1, key=getkey())
    with pytest.raises(ValueError, match="`method='structured'`.*`loss` is a custom callable"):
        mlp.hessian_diagonal(
            lambda m, b: cz.losses.mse(m, b), make_batch(mlp, "mse", getkey()), method="structured"
        )
    softmax_mlp = cz.MLP(3, 2, 4, 1, activation=jax.nn.softmax, key=getkey())
    with pytest.raises(ValueError, match="activation.*not an elementwise function"):
        softmax_mlp.hessian_diagonal(
            cz.losses.cross_entropy, make_batch(mlp, "ce", getkey()), method="structured"
        )
    model = _Residual(eqx.nn.Linear(3, 2, key=getkey()))
    with pytest.raises(ValueError, match="`method='structured'`.*_Residual"):
        cz.hessian_diagonal(
            model, cz.losses.mse, (jnp.zeros((2, 3)), jnp.zeros((2, 2))), method="structured"
        )


def test_bad_method(getkey):
    mlp = cz.MLP(3, 2, 4, 1, key=getkey())
    with pytest.raises(ValueError, match="`method` must be one of"):
        mlp.hessian_diagonal(cz.losses.mse, make_batch(mlp, "mse", getkey()), method="fast")


def test_custom_loss_subclass_uses_eigendecomposition(getkey):
    """A user subclass of `AbstractLoss` without a closed-form factor still works."""

    class Cosh(cz.losses.AbstractLoss):
        reduction: str = "mean"

        def per_sample(self, prediction, target):
            return jnp.sum(jnp.log(jnp.cosh(prediction - target)) + prediction[0] * prediction[-1])

        def elements_per_sample(self, prediction_shape):
            return 1

        def check_shapes(self, prediction_shape, target_shape, target_dtype):
            pass

    model = cz.MLP(3, 3, 4, 2, key=getkey())
    batch = make_batch(model, "mse", getkey())
    _check(model, Cosh(), batch)
