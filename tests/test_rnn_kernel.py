"""The structured recurrent kernel on stacked layers, token inputs and batches of
different lengths, against `jnp.diag(jax.hessian(...))` and an independent GGN, in
float64 on tiny models.

The combinations of cell, depth, readout, loss, reduction, inputs and lengths form a
pairwise covering set (every pair of values of any two factors meets in some case) rather
than the full product: a covering set finds the faults that depend on two factors at
once, at a tenth of the compilations."""

import curvzoo as cz
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from .helpers import assert_diagonal_close, reference_hessian_diagonal, spy_kernels


LOSSES = {"ce": cz.losses.CrossEntropy, "mse": cz.losses.MSE, "bce": cz.losses.BCEWithLogits}
STEPS, BATCH = 4, 3

# (cell, layers, loss, readout, tokens, lengths, reduction): a pairwise covering set.
CASES = [
    ("elman", 1, "bce", "all", True, True, "sum"),
    ("gru", 3, "mse", "last", False, True, "mean"),
    ("lstm", 2, "ce", "all", True, False, "mean"),
    ("elman", 3, "ce", "last", False, False, "sum"),
    ("lstm", 1, "bce", "last", False, False, "mean"),
    ("gru", 2, "mse", "all", False, False, "sum"),
    ("elman", 2, "mse", "last", True, True, "mean"),
    ("lstm", 3, "bce", "all", True, True, "sum"),
    ("gru", 1, "ce", "last", True, True, "sum"),
    ("lstm", 1, "mse", "last", True, True, "mean"),
    ("gru", 2, "bce", "last", False, True, "mean"),
]


def make(cell, layers, loss_name, readout, tokens, lengths, key, *, batch_size=BATCH):
    """A tiny model (input 2, 3 units, 3 outputs; 5 tokens) and a batch for it."""
    k_model, k_x, k_y, k_len = jr.split(key, 4)
    vocab = 5 if tokens else None
    model = cz.RNN(2, 3, 3, cell, readout, num_layers=layers, vocab_size=vocab, key=k_model)
    if tokens:
        xs = jr.randint(k_x, (batch_size, STEPS), 0, vocab)
    else:
        xs = jr.normal(k_x, (batch_size, STEPS, 2))
    shape = (batch_size, STEPS) if readout == "all" else (batch_size,)
    if loss_name == "ce":
        ys = jr.randint(k_y, shape, 0, 3)
    elif loss_name == "mse":
        ys = jr.normal(k_y, (*shape, 3))
    else:
        ys = jr.uniform(k_y, (*shape, 3))
    if not lengths:
        return model, (xs, ys)
    # Always one full sequence and one of length 1, the edge cases.
    rest = jr.randint(k_len, (batch_size - 2,), 1, STEPS + 1)
    return model, (xs, ys, jnp.concatenate([jnp.array([STEPS, 1]), rest]))


@pytest.mark.parametrize("cell,layers,loss_name,readout,tokens,lengths,reduction", CASES)
def test_hessian_against_jax_hessian(
    cell, layers, loss_name, readout, tokens, lengths, reduction, getkey
):
    model, batch = make(cell, layers, loss_name, readout, tokens, lengths, getkey())
    loss = LOSSES[loss_name](reduction=reduction)
    result = cz.hessian_diagonal(model, loss, batch, method="structured")
    assert_diagonal_close(result, reference_hessian_diagonal(model, loss, batch))


def test_generic_kernel_with_lengths_and_tokens(getkey):
    model, batch = make("gru", 2, "ce", "all", True, True, getkey())
    loss = cz.losses.CrossEntropy(reduction="sum")
    result = cz.hessian_diagonal(model, loss, batch, method="generic")
    assert_diagonal_close(result, reference_hessian_diagonal(model, loss, batch))


def test_mean_over_valid_steps_through_the_driver(getkey):
    model, batch = make("elman", 1, "ce", "all", False, True, getkey())
    loss = cz.losses.cross_entropy
    result = cz.hessian_diagonal(model, loss, batch, method="structured")
    assert_diagonal_close(result, reference_hessian_diagonal(model, loss, batch))


def _frozen(model, where):
    spec = jax.tree.map(lambda _: True, model)
    return eqx.tree_at(where, spec, replace_fn=lambda node: jax.tree.map(lambda _: False, node))


@pytest.mark.parametrize(
    "where",
    [
        lambda m: (m.embedding, m.upper_cells[0].weight_hh, m.head.bias),
        lambda m: (m.cell, m.upper_cells, m.head),  # the embedding alone
    ],
)
def test_frozen_subsets(where, getkey):
    model, batch = make("lstm", 2, "ce", "all", True, True, getkey())
    loss = cz.losses.CrossEntropy(reduction="sum")
    spec = _frozen(model, where)
    result = cz.hessian_diagonal(model, loss, batch, filter_spec=spec, method="structured")
    is_none = jax.tree.map(lambda x: x is None, result, is_leaf=lambda x: x is None)
    assert all(jax.tree.leaves(where(is_none)))
    assert_diagonal_close(result, reference_hessian_diagonal(model, loss, batch, spec))


def test_per_sample_with_lengths(getkey):
    model, batch = make("gru", 2, "mse", "all", True, True, getkey())
    loss = cz.losses.MSE(reduction="sum")
    result = cz.hessian_diagonal(model, loss, batch, method="structured", per_sample=True)
    for n in range(BATCH):
        one = jax.tree.map(lambda leaf: leaf[n : n + 1], batch)
        expected = reference_hessian_diagonal(model, loss, one)
        assert_diagonal_close(jax.tree.map(lambda leaf: leaf[n], result), expected)


# ## The GGN


def reference_ggn(model, loss, batch):
    """`scale * sum_n J_n^T H_n J_n` with `J_n` by `jax.jacfwd` of the model's
    prediction and `H_n` by `jax.hessian` of the loss on the valid steps, masked by hand:
    independent of the kernels and of the losses' masking."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    flat, unravel = ravel_pytree(params)
    xs, ys = batch[0], batch[1]
    lengths = batch[2] if len(batch) == 3 else jnp.full(xs.shape[0], STEPS)

    def sample(x, y, length):
        def predict(vector):
            return eqx.combine(unravel(vector), static)(x, length)

        prediction = predict(flat)
        jac = jax.jacfwd(predict)(flat).reshape(-1, flat.size)

        def sample_loss(z):
            z = z.reshape(prediction.shape)
            if model.readout == "last":
                return loss.per_sample(z, y)
            terms = jax.vmap(loss.per_sample)(z, y)
            return jnp.sum(terms * (jnp.arange(STEPS) < length))

        hess = jax.hessian(sample_loss)(prediction.reshape(-1))
        return jnp.diag(jac.T @ hess @ jac)

    total = jnp.sum(jax.jit(jax.vmap(sample))(xs, ys, lengths), axis=0)
    assert loss.reduction == "sum"
    return unravel(total)


@pytest.mark.parametrize(
    "cell,layers,loss_name,readout,tokens,lengths",
    [
        ("gru", 2, "ce", "all", True, True),
        ("lstm", 1, "mse", "last", False, True),
        ("elman", 3, "bce", "all", False, False),
    ],
)
def test_ggn_against_an_independent_reference(
    cell, layers, loss_name, readout, tokens, lengths, getkey
):
    model, batch = make(cell, layers, loss_name, readout, tokens, lengths, getkey())
    loss = LOSSES[loss_name](reduction="sum")
    result = cz.ggn_diagonal(model, loss, batch, method="structured")
    assert_diagonal_close(result, reference_ggn(model, loss, batch))


def test_auto_takes_the_recurrent_kernel_where_it_is_cheaper(getkey, monkeypatch):
    """The Hessian of a small GRU and the GGN of a character model (many classes at
    every step) take the recurrent kernel; the GGN of one output on the last state
    takes one vector-Jacobian product per sample. (Decisions only: no run.)"""
    lm = cz.RNN(8, 16, 40, "gru", "all", num_layers=2, vocab_size=40, key=getkey())
    tokens = jnp.zeros((4, 12), jnp.int32)
    lm_batch = (tokens, tokens, jnp.full(4, 12))
    assert cz.plan(lm, cz.losses.cross_entropy, lm_batch).kernel == "recurrent"
    assert cz.plan(lm, cz.losses.cross_entropy, lm_batch, quantity="ggn").kernel == "recurrent"
    adding = cz.RNN(2, 16, 1, "gru", key=getkey())
    adding_batch = (jnp.zeros((4, 12, 2)), jnp.zeros((4, 1)))
    assert cz.plan(adding, cz.losses.mse, adding_batch, quantity="ggn").kernel == "vjp"
    calls = spy_kernels(monkeypatch)
    model, batch = make("gru", 1, "ce", "last", True, True, getkey())
    model.hessian_diagonal(cz.losses.cross_entropy, batch)
    assert calls == ["recurrent"]


def test_one_sample_one_step_and_padding_everywhere(getkey):
    """The edges: a single step, and a batch where every sequence but one is a single
    step of padding-filled input."""
    model = cz.RNN(2, 3, 3, "lstm", "all", num_layers=2, key=getkey())
    xs = jr.normal(getkey(), (1, 1, 2))
    batch = (xs, jnp.array([[2]]))
    loss = cz.losses.CrossEntropy(reduction="sum")
    got = cz.hessian_diagonal(model, loss, batch, method="structured")
    assert_diagonal_close(got, reference_hessian_diagonal(model, loss, batch))
    padded = (jnp.concatenate([xs, jnp.zeros((1, 1, 2))], axis=1), jnp.array([[2, 0]]))
    with_length = (*padded, jnp.array([1]))
    again = cz.hessian_diagonal(model, loss, with_length, method="structured")
    np.testing.assert_allclose(ravel_pytree(again)[0], ravel_pytree(got)[0], rtol=1e-12, atol=1e-14)
