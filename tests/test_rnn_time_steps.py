"""`curvzoo.time_step_curvature` against `jax.hessian` with respect to perturbations
injected into a hand-written forward pass (the cells' own `__call__` for the states,
the gates written out for the pre-activations), in float64."""

import curvzoo as cz
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from .test_rnn_kernel import LOSSES, make, STEPS


def _gates(cell, x, state, delta):
    """One step of the cell with `delta` added to its gate pre-activations (`(G, H)`)."""
    if isinstance(cell, cz.ElmanCell):
        return jnp.tanh(cell.weight_ih @ x + cell.weight_hh @ state + cell.bias + delta[0])
    if isinstance(cell, eqx.nn.GRUCell):
        ir, iz, i_n = jnp.split(cell.weight_ih @ x + cell.bias, 3)
        hr, hz, h_n = jnp.split(cell.weight_hh @ state, 3)
        reset = jax.nn.sigmoid(ir + hr + delta[0])
        update = jax.nn.sigmoid(iz + hz + delta[1])
        new = jnp.tanh(i_n + reset * (h_n + cell.bias_n) + delta[2])
        return new + update * (state - new)
    h, c = state
    i, f, g, o = jnp.split(cell.weight_ih @ x + cell.weight_hh @ h + cell.bias, 4)
    i, f = jax.nn.sigmoid(i + delta[0]), jax.nn.sigmoid(f + delta[1])
    g, o = jnp.tanh(g + delta[2]), jax.nn.sigmoid(o + delta[3])
    c = f * c + i * g
    return o * jnp.tanh(c), c


def _flat(state):
    return jnp.concatenate(state) if isinstance(state, tuple) else state


def _unflat(flat, like):
    if isinstance(like, tuple):
        return tuple(jnp.split(flat, 2))
    return flat


def _predict(model, x, length, eps, site):
    """One sequence with `eps` `(T, L, size)` added to each layer's state after each
    step (`site="state"`) or to its gate pre-activations."""
    lstm = isinstance(model.cell, eqx.nn.LSTMCell)
    zero = jnp.zeros(model.hidden_size)
    states = [(zero, zero) if lstm else zero for _ in model.cells]
    inputs = model.embedding.weight[x] if model.vocab_size else x
    tops = []
    for t, inp in enumerate(inputs):
        for layer, cell in enumerate(model.cells):
            if site == "state":
                new = _flat(cell(inp, states[layer])) + eps[t, layer]
                states[layer] = _unflat(new, states[layer])
            else:
                delta = eps[t, layer].reshape(-1, model.hidden_size)
                states[layer] = _gates(cell, inp, states[layer], delta)
            inp = states[layer][0] if lstm else states[layer]
        tops.append(inp)
    hs = jnp.stack(tops)
    if model.readout == "all":
        return jax.vmap(model.head)(hs)
    return model.head(hs[length - 1])


def _masked(loss, prediction, target, length, readout):
    if readout == "last":
        return loss.per_sample(prediction, target)
    terms = jax.vmap(loss.per_sample)(prediction, target)
    return jnp.sum(terms * (jnp.arange(STEPS) < length))


def reference(model, loss, batch, site, quantity):
    """Per sample, `(N, T, L size)`: the diagonal of the Hessian (or GGN) of that
    sample's loss (scaled as `loss(model, batch_n)`) in the injected perturbations."""
    xs, ys = batch[0], batch[1]
    lengths = batch[2] if len(batch) == 3 else jnp.full(xs.shape[0], STEPS)
    lstm = isinstance(model.cell, eqx.nn.LSTMCell)
    gates = {cz.ElmanCell: 1, eqx.nn.GRUCell: 3, eqx.nn.LSTMCell: 4}[type(model.cell)]
    width = (2 if lstm else 1) if site == "state" else gates
    shape = (STEPS, model.num_layers, width * model.hidden_size)

    def sample(x, y, length):
        one = tuple(leaf[None] for leaf in (x, y, length))[: len(batch)]
        prediction_shape = loss.prediction_shape(model, one)
        with_length = None if len(batch) == 2 else one[2]
        scale = loss.scale(1, prediction_shape[1:], with_length)

        def predict(flat):
            return _predict(model, x, length, flat.reshape(shape), site)

        def of_prediction(prediction):
            return scale * _masked(loss, prediction, y, length, model.readout)

        zero = jnp.zeros(np.prod(shape))
        if quantity == "hessian":
            diag = jnp.diag(jax.hessian(lambda e: of_prediction(predict(e)))(zero))
        else:
            prediction = predict(zero)
            jac = jax.jacfwd(predict)(zero).reshape(-1, zero.size)
            hess = jax.hessian(lambda z: of_prediction(z.reshape(prediction.shape)))(
                prediction.reshape(-1)
            )
            diag = jnp.diag(jac.T @ hess @ jac)
        return diag.reshape(STEPS, -1)

    return jax.jit(jax.vmap(sample))(xs, ys, lengths)


CASES = [
    # (cell, layers, loss, readout, tokens, lengths, reduction, site, quantity)
    ("gru", 2, "ce", "all", True, True, "sum", "state", "hessian"),
    ("lstm", 1, "mse", "last", False, True, "mean", "preactivation", "hessian"),
    ("elman", 3, "bce", "all", False, False, "mean", "preactivation", "ggn"),
    ("lstm", 2, "ce", "last", True, False, "sum", "state", "ggn"),
]


@pytest.mark.parametrize(
    "cell,layers,loss_name,readout,tokens,lengths,reduction,site,quantity", CASES
)
def test_against_injected_perturbations(
    cell, layers, loss_name, readout, tokens, lengths, reduction, site, quantity, getkey
):
    model, batch = make(cell, layers, loss_name, readout, tokens, lengths, getkey())
    loss = LOSSES[loss_name](reduction=reduction)
    expected = reference(model, loss, batch, site, quantity)  # (N, T, size), per sample
    options = dict(site=site, quantity=quantity)
    each = cz.time_step_curvature(model, loss, batch, per_sample=True, **options)
    scale = float(np.max(np.abs(expected)))
    assert scale > 0
    np.testing.assert_allclose(each, expected, rtol=1e-10, atol=1e-10 * scale)
    total = cz.time_step_curvature(model, loss, batch, **options)
    if reduction == "sum":
        summed = expected.sum(axis=0)
    else:  # the batch's mean is the mean of the samples' (each of length T or one step)
        summed = expected.mean(axis=0)
    np.testing.assert_allclose(total, summed, rtol=1e-10, atol=1e-10 * scale)
    if lengths:  # steps past a sequence's end reach no loss term
        for n, length in enumerate(np.asarray(batch[2])):
            assert np.all(np.asarray(each[n, length:]) == 0)
    if quantity == "ggn":
        assert np.all(np.asarray(each) >= -1e-12 * scale)


def test_mean_over_valid_steps(getkey):
    """With lengths and per-step targets, `"mean"` is over the valid steps of the whole
    batch: the sum's curvature over `sum(lengths)`."""
    model, batch = make("gru", 1, "ce", "all", False, True, getkey())
    mean = cz.time_step_curvature(model, cz.losses.CrossEntropy(reduction="mean"), batch)
    total = cz.time_step_curvature(model, cz.losses.CrossEntropy(reduction="sum"), batch)
    np.testing.assert_allclose(mean * int(jnp.sum(batch[2])), total, rtol=1e-12)


def test_chunks_and_shapes(getkey):
    model, batch = make("lstm", 2, "mse", "all", False, False, getkey(), batch_size=5)
    loss = cz.losses.mse
    whole = cz.time_step_curvature(model, loss, batch)
    assert whole.shape == (STEPS, 2 * 2 * 3) and whole.dtype == jnp.float64
    chunked = cz.time_step_curvature(model, loss, batch, chunk_size=2)
    np.testing.assert_allclose(chunked, whole, rtol=1e-12)
    gates = cz.time_step_curvature(model, loss, batch, site="preactivation", per_sample=True)
    assert gates.shape == (5, STEPS, 2 * 4 * 3)


def test_bad_input(getkey):
    model, batch = make("gru", 1, "ce", "last", False, False, getkey())
    loss = cz.losses.cross_entropy
    with pytest.raises(ValueError, match="`quantity` must be one of"):
        cz.time_step_curvature(model, loss, batch, quantity="fisher")
    with pytest.raises(ValueError, match="`site` must be one of"):
        cz.time_step_curvature(model, loss, batch, site="gates")
    with pytest.raises(TypeError, match="`per_sample` must be True or False"):
        cz.time_step_curvature(model, loss, batch, per_sample=1)
    with pytest.raises(ValueError, match="`chunk_size` must be >= 1"):
        cz.time_step_curvature(model, loss, batch, chunk_size=0)
    with pytest.raises(TypeError, match="`loss` must be a curvzoo loss"):
        cz.time_step_curvature(model, lambda m, b: loss(m, b), batch)
    mlp = cz.MLP(2, 3, 4, 1, key=getkey())
    with pytest.raises(TypeError, match="`model` must be a recurrent model"):
        cz.time_step_curvature(mlp, loss, (jnp.zeros((3, 2)), jnp.zeros(3, jnp.int32)))
    bad = (batch[0], batch[1], jnp.array([1, 5, 2]))
    with pytest.raises(ValueError, match=r"`batch` lengths .* must lie in \[1, 4\]"):
        cz.time_step_curvature(model, loss, bad)


def test_a_repeated_call_does_its_static_work_once(monkeypatch):
    """The structure, the prediction's shape and the chunk (a trace of one sample) are
    worked out once per request: a repeated call with new values of the same shapes
    reuses them, and gives the numbers of its own values; new shapes work them out
    again."""
    from curvzoo._api import _time_steps

    calls = []
    original = _time_steps._setup
    monkeypatch.setattr(_time_steps, "_setup", lambda *a, **k: calls.append(1) or original(*a, **k))
    model = cz.RNN(2, 3, 2, cell="gru", key=jax.random.key(7))
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(4, 5, 2)))
    y = jnp.asarray(rng.normal(size=(4, 2)))
    first = cz.time_step_curvature(model, cz.losses.mse, (x, y), chunk_size=3)
    second = cz.time_step_curvature(model, cz.losses.mse, (2 * x, y), chunk_size=3)
    assert len(calls) == 1 and not np.allclose(first, second)
    again = cz.time_step_curvature(model, cz.losses.mse, (2 * x, y), chunk_size=3)
    np.testing.assert_array_equal(again, second)
    cz.time_step_curvature(model, cz.losses.mse, (x[:3], y[:3]), chunk_size=3)
    assert len(calls) == 2
