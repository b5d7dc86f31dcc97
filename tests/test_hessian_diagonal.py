"""The generic exact kernel against `jnp.diag(jax.hessian(...))`, in float64."""

import curvzoo as cz
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from .helpers import (
    assert_diagonal_close,
    count_compilations,
    LOSS_CLASSES,
    make_batch,
    MODELS,
    reference_hessian_diagonal,
    tree_allclose,
    with_reductions,
)


@pytest.mark.parametrize(
    "model_name,loss_name,reduction", with_reductions([m[0] for m in MODELS], sorted(LOSS_CLASSES))
)
def test_matches_jax_hessian(model_name, loss_name, reduction, getkey):
    """Both kernels (every zoo model has a structured one) against `jax.hessian`, and
    against each other; `auto` runs one of them, the one its plan names. Where that is
    the structured kernel, `auto`'s result is the structured kernel's (forcing it would
    compile the same computation again); elsewhere the structured kernel is forced.
    Every model meets every loss, and every model and every loss meets both
    reductions."""
    model = dict(MODELS)[model_name](getkey())
    loss = LOSS_CLASSES[loss_name](reduction=reduction)
    batch = make_batch(model, loss_name, getkey())
    expected = reference_hessian_diagonal(model, loss, batch)
    generic = model.hessian_diagonal(loss, batch, method="generic")
    assert_diagonal_close(generic, expected)
    kernel = cz.plan(model, loss, batch).kernel
    structured_kernel = "recurrent" if isinstance(model, cz.RNN) else "layered"
    assert kernel in (structured_kernel, "generic")
    auto = model.hessian_diagonal(loss, batch)
    if kernel == "generic":
        assert tree_allclose(auto, generic, rtol=0)
        structured = model.hessian_diagonal(loss, batch, method="structured")
    else:
        structured = auto
    assert_diagonal_close(structured, expected)
    assert_diagonal_close(structured, generic)
    # The method and the function are the same computation.
    assert tree_allclose(cz.hessian_diagonal(model, loss, batch), auto, rtol=0)


@pytest.mark.parametrize("method", ["generic", "structured"])
def test_structure_and_dtype(method, getkey):
    model = cz.MLP(3, 2, 4, 2, key=getkey())
    batch = make_batch(model, "ce", getkey())
    diag = model.hessian_diagonal(cz.losses.cross_entropy, batch, method=method)
    expected = eqx.filter(model, eqx.is_inexact_array)
    assert jax.tree.structure(diag) == jax.tree.structure(expected)
    for d, leaf in zip(jax.tree.leaves(diag), jax.tree.leaves(expected)):
        assert d.shape == leaf.shape and d.dtype == leaf.dtype
    assert diag.activation is None
    assert diag.layers[0].weight.shape == (4, 3)
    # Returned as a module of the same type, usable with `eqx.apply_updates`-style code.
    assert isinstance(diag, cz.MLP)


@pytest.mark.parametrize("method", ["generic", "structured"])
def test_float32_model_keeps_float32(method, getkey):
    model = cz.MLP(3, 2, 4, 1, dtype=jnp.float32, key=getkey())
    x = jr.normal(getkey(), (4, 3), jnp.float32)
    y = jnp.array([0, 1, 1, 0])
    diag = model.hessian_diagonal(cz.losses.cross_entropy, (x, y), method=method)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(diag))
    expected = reference_hessian_diagonal(model, cz.losses.cross_entropy, (x, y))
    assert_diagonal_close(diag, expected, rtol=1e-4)


def test_frozen_leaves(getkey):
    model = cz.RNN(2, 3, 3, cell="gru", key=getkey())
    batch = make_batch(model, "ce", getkey())
    spec = jax.tree.map(lambda _: True, model)
    spec = eqx.tree_at(lambda s: (s.cell.weight_hh, s.head.bias), spec, (False, False))
    diag = model.hessian_diagonal(cz.losses.cross_entropy, batch, filter_spec=spec)
    assert diag.cell.weight_hh is None and diag.head.bias is None
    full = model.hessian_diagonal(cz.losses.cross_entropy, batch)
    # Freezing leaves does not change the diagonal entries of the others.
    for path in (
        lambda m: m.cell.weight_ih,
        lambda m: m.cell.bias,
        lambda m: m.cell.bias_n,
        lambda m: m.head.weight,
    ):
        np.testing.assert_allclose(path(diag), path(full), rtol=1e-12, atol=1e-15)
    expected = reference_hessian_diagonal(model, cz.losses.cross_entropy, batch, spec)
    assert_diagonal_close(diag, expected)


@pytest.mark.parametrize("method", ["generic", "structured"])
def test_frozen_by_callable_spec(method, getkey):
    model = cz.MLP(3, 3, 4, 1, key=getkey())
    batch = make_batch(model, "mse", getkey())

    def only_weights(leaf):
        return eqx.is_inexact_array(leaf) and leaf.ndim == 2

    diag = model.hessian_diagonal(cz.losses.mse, batch, filter_spec=only_weights, method=method)
    assert all(layer.bias is None for layer in diag.layers)
    expected = reference_hessian_diagonal(model, cz.losses.mse, batch, only_weights)
    assert_diagonal_close(diag, expected)


def test_custom_callable_loss(getkey):
    model = cz.MLP(3, 2, 4, 1, key=getkey())
    x = jr.normal(getkey(), (6, 3))
    w = jr.uniform(getkey(), (6,))

    def weighted_quartic(model, batch):
        inputs, weights = batch
        out = jax.vmap(model)(inputs)
        return jnp.sum(weights * jnp.sum(out**4, axis=-1)) + jnp.sum(out[:, 0] * out[:, 1])

    diag = cz.hessian_diagonal(model, weighted_quartic, (x, w))
    expected = reference_hessian_diagonal(model, weighted_quartic, (x, w))
    assert_diagonal_close(diag, expected)


def test_chunk_sizes_agree(getkey):
    model = cz.RNN(2, 3, 3, cell="lstm", key=getkey())
    batch = make_batch(model, "ce", getkey())
    size = ravel_pytree(eqx.filter(model, eqx.is_inexact_array))[0].size
    results = [
        model.hessian_diagonal(cz.losses.cross_entropy, batch, chunk_size=c, method="generic")
        for c in (1, 7, size)
    ]
    results.append(
        model.hessian_diagonal(cz.losses.cross_entropy, batch, memory_budget=1, method="generic")
    )
    for other in results[1:]:
        assert tree_allclose(results[0], other, rtol=1e-14, atol=1e-16)
    expected = reference_hessian_diagonal(model, cz.losses.cross_entropy, batch)
    assert_diagonal_close(results[0], expected)


def test_plain_equinox_module(getkey):
    model = eqx.nn.MLP(3, 2, 5, 2, activation=jax.nn.softplus, key=getkey())
    x = jr.normal(getkey(), (7, 3))
    y = jr.normal(getkey(), (7, 2))
    diag = cz.hessian_diagonal(model, cz.losses.mse, (x, y))
    assert isinstance(diag, eqx.nn.MLP)
    assert diag.layers[1].weight.shape == (5, 5)
    expected = reference_hessian_diagonal(model, cz.losses.mse, (x, y))
    assert_diagonal_close(diag, expected)


@pytest.mark.parametrize("method", ["generic", "structured"])
def test_batch_of_one(method, getkey):
    model = cz.CNN(1, 3, 10, channels=(2, 2), pool="avg", key=getkey())
    batch = make_batch(model, "ce", getkey(), batch_size=1)
    diag = model.hessian_diagonal(cz.losses.cross_entropy, batch, method=method)
    assert_diagonal_close(diag, reference_hessian_diagonal(model, cz.losses.cross_entropy, batch))


@pytest.mark.parametrize("method", ["generic", "structured"])
def test_model_is_not_modified(method, getkey):
    model = cz.MLP(3, 2, 4, 1, key=getkey())
    before = jax.tree.map(lambda x: np.array(x) if eqx.is_array(x) else x, model)
    batch = make_batch(model, "ce", getkey())
    model.hessian_diagonal(cz.losses.cross_entropy, batch, method=method)
    assert tree_allclose(model, before, rtol=0)


@pytest.mark.parametrize("method", ["generic", "structured"])
def test_no_recompilation(method, getkey):
    model = cz.MLP(3, 2, 4, 1, key=getkey())
    batch = make_batch(model, "ce", getkey())
    other_model = cz.MLP(3, 2, 4, 1, key=getkey())
    other_batch = make_batch(model, "ce", getkey())
    model.hessian_diagonal(cz.losses.cross_entropy, batch, method=method)
    with count_compilations() as count:
        first = other_model.hessian_diagonal(cz.losses.cross_entropy, other_batch, method=method)
        jax.block_until_ready(first)
        # A fresh but equal loss object hashes the same, so it hits the cache too.
        second = other_model.hessian_diagonal(cz.losses.CrossEntropy(), other_batch, method=method)
        jax.block_until_ready(second)
    assert count[0] == 0
    assert tree_allclose(first, second, rtol=0)


@pytest.mark.parametrize("method", ["generic", "structured"])
def test_inside_jit_and_vmap(method, getkey):
    model = cz.MLP(3, 2, 4, 1, key=getkey())
    xs = jr.normal(getkey(), (3, 5, 3))
    ys = jr.randint(getkey(), (3, 5), 0, 2)

    @eqx.filter_jit
    def per_batch(model, xs, ys):
        return jax.vmap(
            lambda x, y: cz.hessian_diagonal(model, cz.losses.cross_entropy, (x, y), method=method)
        )(xs, ys)

    stacked = per_batch(model, xs, ys)
    for i in range(3):
        expected = reference_hessian_diagonal(model, cz.losses.cross_entropy, (xs[i], ys[i]))
        assert_diagonal_close(jax.tree.map(lambda leaf: leaf[i], stacked), expected)
