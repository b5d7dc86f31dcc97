"""The structured kernel for recurrent networks against `jax.hessian` and the generic
kernel, in float64."""

import curvzoo as cz
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest
from curvzoo._kernels._recurrent import _node_inputs, _run

from .helpers import (
    assert_diagonal_close,
    LOSS_CLASSES,
    make_targets,
    reference_hessian_diagonal,
    rng,
    spy_kernels,
    with_reductions,
)


CELLS = ["elman", "gru", "lstm"]


def _batch(model, loss_name, key, batch_size, steps):
    k_in, k_out = rng(key).integers(0, 2**31, 2)
    xs = jnp.asarray(rng(k_in).standard_normal((batch_size, steps, model.in_size)))
    return xs, make_targets(model, xs, loss_name, k_out)


def _check(model, loss, batch):
    result = model.hessian_diagonal(loss, batch, method="structured")
    assert_diagonal_close(result, reference_hessian_diagonal(model, loss, batch))
    return result


@pytest.mark.parametrize("readout", ["last", "all"])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("steps,batch_size", [(1, 3), (6, 1), (5, 7)])
def test_sequence_lengths_and_batch_sizes(cell, readout, steps, batch_size, getkey):
    model = cz.RNN(2, 3, 3, cell, readout, key=getkey())
    batch = _batch(model, "ce", getkey(), batch_size, steps)
    _check(model, cz.losses.CrossEntropy(reduction="sum"), batch)


@pytest.mark.parametrize("cell,loss_name,reduction", with_reductions(CELLS, ["mse", "bce"]))
def test_losses_per_step_readout(cell, loss_name, reduction, getkey):
    model = cz.RNN(3, 4, 2, cell, "all", key=getkey())
    loss = LOSS_CLASSES[loss_name](reduction=reduction)
    _check(model, loss, _batch(model, loss_name, getkey(), 3, 4))


# The structured kernel against the generic one, for every cell and readout: in
# `test_hessian_diagonal.py::test_matches_jax_hessian` (with `jax.hessian` as well).


@pytest.mark.parametrize(
    "frozen",
    [
        lambda m: m.cell.weight_hh,
        lambda m: (m.cell.weight_ih, m.head.weight),
        lambda m: m.head,
    ],
)
@pytest.mark.parametrize("cell", CELLS)
def test_frozen_leaves(cell, frozen, getkey):
    model = cz.RNN(2, 3, 3, cell, "last", key=getkey())
    batch = _batch(model, "mse", getkey(), 4, 5)
    spec = jax.tree.map(lambda _: True, model)
    spec = eqx.tree_at(frozen, spec, replace_fn=lambda node: jax.tree.map(lambda _: False, node))
    result = model.hessian_diagonal(cz.losses.mse, batch, filter_spec=spec, method="structured")
    is_none = jax.tree.map(lambda x: x is None, result, is_leaf=lambda x: x is None)
    assert all(jax.tree.leaves(frozen(is_none)))
    expected = reference_hessian_diagonal(model, cz.losses.mse, batch, spec)
    assert jax.tree.structure(result) == jax.tree.structure(expected)
    assert_diagonal_close(result, expected)


@pytest.mark.parametrize("chunk_size", [1, 2, None])
def test_chunks(chunk_size, getkey):
    model = cz.RNN(2, 3, 2, "gru", "all", key=getkey())
    batch = _batch(model, "ce", getkey(), 5, 3)
    result = model.hessian_diagonal(
        cz.losses.cross_entropy, batch, method="structured", chunk_size=chunk_size
    )
    assert_diagonal_close(result, reference_hessian_diagonal(model, cz.losses.cross_entropy, batch))


@pytest.mark.parametrize("cell", CELLS)
def test_site_form_reproduces_the_cell(cell, getkey):
    """The kernel's node-input/unit-update form of each cell is the cell itself."""
    model = cz.RNN(3, 4, 2, cell, "all", key=getkey())
    xs = jr.normal(getkey(), (6, 3))
    states, xis = _run(cell, model.cell, xs)
    assert xis.shape[:2] == (6, 4)
    state = (jnp.zeros(4), jnp.zeros(4)) if cell == "lstm" else jnp.zeros(4)
    for t in range(6):
        state = model.cell(xs[t], state)
        flat = jnp.concatenate(state) if cell == "lstm" else state
        assert jnp.allclose(states[t], flat, rtol=1e-13, atol=1e-15)
    assert _node_inputs(cell, model.cell, xs[0], states[0]).shape[0] == 4


def test_auto_takes_the_structured_kernel(getkey, monkeypatch):
    calls = spy_kernels(monkeypatch)
    model = cz.RNN(2, 8, 2, "lstm", key=getkey())  # the recurrent kernel's clear win
    model.hessian_diagonal(cz.losses.cross_entropy, _batch(model, "ce", getkey(), 4, 4))
    assert calls == ["recurrent"]


def test_loss_without_step_factor_falls_back(getkey):
    class Quartic(cz.losses.AbstractLoss):
        reduction: str = "sum"

        def per_sample(self, prediction, target):
            return jnp.sum((prediction - target) ** 4)

        def elements_per_sample(self, prediction_shape):
            return 1

        def check_shapes(self, prediction_shape, target_shape, target_dtype):
            pass

    model = cz.RNN(2, 3, 2, "gru", "all", key=getkey())
    batch = _batch(model, "mse", getkey(), 3, 4)
    with pytest.raises(ValueError, match="no per-step Hessian factor"):
        model.hessian_diagonal(Quartic(), batch, method="structured")
    auto = model.hessian_diagonal(Quartic(), batch)
    assert_diagonal_close(auto, reference_hessian_diagonal(model, Quartic(), batch))


def test_auto_picks_the_faster_kernel_by_cost(getkey, monkeypatch):
    """A long sequence through a tiny cell is cheaper for the generic kernel (one
    Hessian-vector product per parameter, few parameters); the benchmark's GRU shape is
    far cheaper for the structured one. (Decision only; timings live in the benchmark.)"""

    def estimates(model, loss, batch):
        return [cz.plan(model, loss, batch, method=m).seconds for m in ("structured", "generic")]

    tiny = cz.RNN(1, 2, 1, "elman", "last", key=getkey())
    batch = _batch(tiny, "mse", getkey(), 2, 300)
    structured, generic = estimates(tiny, cz.losses.mse, batch)
    assert structured > generic
    gru = cz.RNN(8, 64, 10, "gru", "last", key=getkey())
    labels = jnp.zeros(32, jnp.int32)
    structured, generic = estimates(gru, cz.losses.cross_entropy, (jnp.zeros((32, 16, 8)), labels))
    assert 20 * structured < generic
    calls = spy_kernels(monkeypatch)
    tiny.hessian_diagonal(cz.losses.mse, batch)
    small_gru = cz.RNN(2, 8, 2, "gru", "last", key=getkey())  # 9x apart: not a near tie
    small_gru.hessian_diagonal(cz.losses.cross_entropy, _batch(small_gru, "ce", getkey(), 4, 4))
    assert calls == ["generic", "recurrent"]


def test_no_recompilation(getkey):
    from .helpers import count_compilations

    model = cz.RNN(2, 3, 2, "lstm", "all", key=getkey())
    batch = _batch(model, "ce", getkey(), 3, 4)
    model.hessian_diagonal(cz.losses.cross_entropy, batch, method="structured")
    other = cz.RNN(2, 3, 2, "lstm", "all", key=getkey())
    other_batch = _batch(model, "ce", getkey(), 3, 4)
    with count_compilations() as count:
        jax.block_until_ready(
            other.hessian_diagonal(cz.losses.cross_entropy, other_batch, method="structured")
        )
    assert count[0] == 0
