"""Every curvature function on batches `(inputs, targets, lengths)`, against the same
sequences cut to their lengths, one at a time, with dense `jax.hessian` / `jax.jacfwd`
matrices: a reference that never sees a mask or a length. Both reductions; readouts
`"all"` (the mean over valid steps) and `"last"`; the recurrent kernel, vector-Jacobian
products (the GGN and the empirical Fisher), Hutchinson with the control variate and
the spectral operators (the generic kernel, which differentiates the loss as written:
tests/test_rnn_kernel.py)."""

import curvzoo as cz
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from .helpers import assert_diagonal_close, dense_ggn, dense_hessian


STEPS = 5
LENGTHS = (5, 1, 3)
LOSSES = {"ce": cz.losses.CrossEntropy, "mse": cz.losses.MSE}
ELEMENTS_PER_STEP = {"ce": 1, "mse": 3}  # what the mean divides by at each step

# (cell, layers, readout, loss, reduction, tokens)
CASES = [
    ("gru", 2, "all", "ce", "mean", True),
    ("lstm", 1, "all", "mse", "sum", False),
    ("elman", 1, "last", "mse", "mean", False),
]


def make(cell, layers, readout, loss_name, tokens, key):
    k_model, k_x, k_y = jr.split(key, 3)
    vocab = 4 if tokens else None
    model = cz.RNN(2, 3, 3, cell, readout, num_layers=layers, vocab_size=vocab, key=k_model)
    n = len(LENGTHS)
    xs = jr.randint(k_x, (n, STEPS), 0, 4) if tokens else jr.normal(k_x, (n, STEPS, 2))
    shape = (n, STEPS) if readout == "all" else (n,)
    ys = jr.randint(k_y, shape, 0, 3) if loss_name == "ce" else jr.normal(k_y, (*shape, 3))
    return model, (xs, ys, jnp.array(LENGTHS))


def _cut(batch, n):
    """Sequence `n` alone, cut to its length, as a pair batch of one."""
    xs, ys, lengths = batch
    length = int(lengths[n])
    y = ys[n : n + 1, :length] if ys.ndim > 1 and ys.shape[1] == STEPS else ys[n : n + 1]
    return xs[n : n + 1, :length], y


def _weights(readout, loss_name, reduction, per_sample):
    """The reduction's factor for the sum of the cut sequences' losses (or for each)."""
    if reduction == "sum":
        return np.ones(len(LENGTHS)) if per_sample else 1.0
    steps = np.array(LENGTHS) if readout == "all" else np.ones(len(LENGTHS))
    per_step = ELEMENTS_PER_STEP[loss_name]
    if per_sample:
        return 1.0 / (steps * per_step)
    return 1.0 / (np.sum(steps) * per_step)


def references(model, batch, case, quantity):
    """`(dense matrix of the batch, [dense matrix of each sample alone])` from the cut
    sequences."""
    _, _, readout, loss_name, reduction, _ = case
    loss = LOSSES[loss_name](reduction="sum")
    dense = dense_hessian if quantity == "hessian" else dense_ggn
    pieces = [dense(model, loss, _cut(batch, n)) for n in range(len(LENGTHS))]
    total = _weights(readout, loss_name, reduction, False) * sum(pieces)
    weights = _weights(readout, loss_name, reduction, True)
    return total, [w * p for w, p in zip(weights, pieces)]


def unravel_like(model, vector):
    params = eqx.filter(model, eqx.is_inexact_array)
    return ravel_pytree(params)[1](jnp.asarray(vector))


@pytest.fixture(params=CASES, ids=lambda c: f"{c[0]}{c[1]}-{c[2]}-{c[3]}-{c[4]}")
def case(request):
    return request.param


def test_diagonals(case, getkey):
    """The Hessian (recurrent kernel) and the GGN (recurrent kernel and vector-Jacobian
    products), for the batch and per sample."""
    cell, layers, readout, loss_name, reduction, tokens = case
    model, batch = make(cell, layers, readout, loss_name, tokens, getkey())
    loss = LOSSES[loss_name](reduction=reduction)
    (hessian, hessian_rows), (ggn, ggn_rows) = (
        references(model, batch, case, quantity) for quantity in ("hessian", "ggn")
    )
    # The generic Hessian kernel differentiates the loss as written: tests/test_rnn_kernel.py.
    got = cz.hessian_diagonal(model, loss, batch, method="structured")
    assert_diagonal_close(got, unravel_like(model, np.diag(hessian)))
    for method in ("structured", "generic"):  # the recurrent kernel, and VJPs
        got = cz.ggn_diagonal(model, loss, batch, method=method)
        assert_diagonal_close(got, unravel_like(model, np.diag(ggn)))
    for function, expected_rows in (
        (cz.hessian_diagonal, hessian_rows),
        (cz.ggn_diagonal, ggn_rows),
    ):
        rows = function(model, loss, batch, per_sample=True)
        for n, expected in enumerate(expected_rows):
            row = jax.tree.map(lambda leaf, n=n: leaf[n], rows)
            assert_diagonal_close(row, unravel_like(model, np.diag(expected)))


def test_empirical_fisher(case, getkey):
    """Squared per-sequence gradients of the cut sequences' losses, times the
    reduction's factor."""
    cell, layers, readout, loss_name, reduction, tokens = case
    model, batch = make(cell, layers, readout, loss_name, tokens, getkey())
    params, static = eqx.partition(model, eqx.is_inexact_array)
    flat, unravel = ravel_pytree(params)
    loss_sum = LOSSES[loss_name](reduction="sum")
    squares = [
        jax.grad(lambda v, pair=_cut(batch, n): loss_sum(eqx.combine(unravel(v), static), pair))(
            flat
        )
        ** 2
        for n in range(len(LENGTHS))
    ]
    expected = _weights(readout, loss_name, reduction, False) * sum(squares)
    loss = LOSSES[loss_name](reduction=reduction)
    got = cz.empirical_fisher_diagonal(model, loss, batch)
    assert_diagonal_close(got, unravel(expected))


def test_hutchinson_and_the_spectral_operators(case, getkey):
    """Hutchinson's estimate with the control variate, written out by hand on the dense
    reference matrices with the documented probes; the operators' products and the top
    GGN eigenvalue against them."""
    cell, layers, readout, loss_name, reduction, tokens = case
    model, batch = make(cell, layers, readout, loss_name, tokens, getkey())
    loss = LOSSES[loss_name](reduction=reduction)
    hessian, ggn = (references(model, batch, case, q)[0] for q in ("hessian", "ggn"))
    flat = ravel_pytree(eqx.filter(model, eqx.is_inexact_array))[0]
    key, probes_count = getkey(), 4
    keys = jr.split(key, probes_count)
    probes = np.stack([np.asarray(jr.rademacher(k, flat.shape, dtype=flat.dtype)) for k in keys])
    expected = (probes * (probes @ (hessian - ggn))).mean(0) + np.diag(ggn)
    got = cz.hutchinson_diagonal(
        model, loss, batch, key=key, num_probes=probes_count, control_variate="ggn"
    )
    assert_diagonal_close(got, unravel_like(model, expected))
    vector = unravel_like(model, probes[0])
    for operator, matrix in ((cz.hessian_operator, hessian), (cz.ggn_operator, ggn)):
        product = ravel_pytree(operator(model, loss, batch).mv(vector))[0]
        np.testing.assert_allclose(product, matrix @ probes[0], rtol=1e-10, atol=1e-12)
    top = cz.hessian_eigenvalues(model, loss, batch, key=getkey(), operator="ggn", tol=1e-10)
    np.testing.assert_allclose(top.eigenvalues[0], np.linalg.eigvalsh(ggn)[-1], rtol=1e-8)


def test_padding_never_counts(getkey):
    """Whatever the inputs and targets hold at padded steps, every function returns the
    same numbers (the Fisher with the same key draws the same targets)."""
    model, batch = make("gru", 1, "all", "ce", True, getkey())
    xs, ys, lengths = batch
    padded = jnp.arange(STEPS)[None, :] >= lengths[:, None]
    other = (jnp.where(padded, 3, xs), jnp.where(padded, 2, ys), lengths)
    loss = cz.losses.cross_entropy
    key = getkey()
    calls = [
        lambda b: cz.hessian_diagonal(model, loss, b),
        lambda b: cz.ggn_diagonal(model, loss, b),
        lambda b: cz.fisher_diagonal(model, loss, b, key=key),
        lambda b: cz.empirical_fisher_diagonal(model, loss, b),
        lambda b: cz.hutchinson_diagonal(model, loss, b, key=key, num_probes=2),
        lambda b: cz.time_step_curvature(model, loss, b, per_sample=True),
    ]
    for call in calls:
        first, second = ravel_pytree(call(batch))[0], ravel_pytree(call(other))[0]
        np.testing.assert_allclose(first, second, rtol=1e-12, atol=1e-15)
