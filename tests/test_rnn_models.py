"""The zoo RNN grown up: stacked layers, token inputs and batches of sequences of
different lengths, checked against hand-written recurrences and truncated sequences;
the losses' reduction with lengths; bad input."""

import curvzoo as cz
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest


CELLS = ["elman", "gru", "lstm"]


def _by_hand(model, inputs):
    """The stacked recurrence written out with the cells' own `__call__`."""
    is_lstm = model.num_layers and isinstance(model.cell, eqx.nn.LSTMCell)
    zero = jnp.zeros(model.hidden_size)
    states = [(zero, zero) if is_lstm else zero for _ in range(model.num_layers)]
    tops = []
    for x in inputs:
        for layer, cell in enumerate([model.cell, *model.upper_cells]):
            states[layer] = cell(x, states[layer])
            x = states[layer][0] if is_lstm else states[layer]
        tops.append(x)
    return jnp.stack(tops)


@pytest.mark.parametrize("cell", CELLS)
def test_stacked_layers_and_tokens_match_hand_written(cell, getkey):
    model = cz.RNN(2, 3, 4, cell, "all", num_layers=3, vocab_size=6, key=getkey())
    assert len(model.cells) == 3 and model.cells[0] is model.cell
    assert model.upper_cells[0].weight_ih.shape[1] == 3  # reads the layer below's h
    assert model.embedding.weight.shape == (6, 2)
    tokens = jnp.array([0, 5, 2, 2, 1])
    hs = _by_hand(model, model.embedding.weight[tokens])
    expected = jax.vmap(model.head)(hs)
    np.testing.assert_allclose(model(tokens), expected, rtol=1e-13)


def test_one_layer_float_model_keeps_its_layout_and_initialisation(getkey):
    key = getkey()
    model = cz.RNN(2, 3, 4, "gru", key=key)
    k_cell, k_head = jr.split(key)
    cell = eqx.nn.GRUCell(2, 3, key=k_cell)
    assert model.embedding is None and model.upper_cells == ()
    assert [leaf.shape for leaf in jax.tree.leaves(model)] == [
        leaf.shape for leaf in jax.tree.leaves((cell, model.head))
    ]
    np.testing.assert_array_equal(model.cell.weight_hh, cell.weight_hh)


@pytest.mark.parametrize("readout", ["last", "all"])
def test_length_reads_the_truncated_sequence(readout, getkey):
    model = cz.RNN(2, 3, 2, "lstm", readout, num_layers=2, key=getkey())
    xs = jr.normal(getkey(), (6, 2))
    for length in (1, 4, 6):
        out = model(xs, jnp.asarray(length))
        short = model(xs[:length])
        if readout == "last":
            np.testing.assert_allclose(out, short, rtol=1e-13)
        else:
            assert out.shape == (6, 2)
            np.testing.assert_allclose(out[:length], short, rtol=1e-13)


def _truncated_loss(model, loss_name, xs, ys, lengths):
    """Mean over valid steps (or the sum), each sequence run alone on its first
    `length` steps: independent of the masking code."""
    total, count = 0.0, 0
    for x, y, length in zip(xs, ys, lengths):
        length = int(length)
        out = model(x[:length])
        if model.readout == "all":
            y = y[:length]
        if loss_name == "ce":
            logp = jax.nn.log_softmax(out, axis=-1)
            terms = -jnp.take_along_axis(logp, y[..., None], axis=-1)
        else:
            terms = (out - y) ** 2
        total += jnp.sum(terms)
        count += terms.size
    return total, count


@pytest.mark.parametrize(
    "readout,loss_name", [("all", "ce"), ("all", "mse"), ("last", "ce"), ("last", "mse")]
)
def test_loss_with_lengths_is_the_mean_over_valid_steps(readout, loss_name, getkey):
    model = cz.RNN(3, 4, 3, "gru", readout, num_layers=2, vocab_size=7, key=getkey())
    xs = jr.randint(getkey(), (4, 5), 0, 7)
    lengths = jnp.array([5, 1, 3, 2])
    shape = (4, 5) if readout == "all" else (4,)
    if loss_name == "ce":
        ys = jr.randint(getkey(), shape, 0, 3)
    else:
        ys = jr.normal(getkey(), (*shape, 3))
    total, count = _truncated_loss(model, loss_name, xs, ys, lengths)
    cls = {"ce": cz.losses.CrossEntropy, "mse": cz.losses.MSE}[loss_name]
    batch = (xs, ys, lengths)
    np.testing.assert_allclose(cls(reduction="sum")(model, batch), total, rtol=1e-12)
    np.testing.assert_allclose(cls(reduction="mean")(model, batch), total / count, rtol=1e-12)
    if readout == "all":  # every valid step weighs the same: sum(lengths) of them
        assert count == int(jnp.sum(lengths)) * (3 if loss_name == "mse" else 1)


def test_full_lengths_give_the_loss_without_lengths(getkey):
    model = cz.RNN(2, 3, 3, "elman", "all", key=getkey())
    xs = jr.normal(getkey(), (3, 4, 2))
    ys = jr.randint(getkey(), (3, 4), 0, 3)
    full = jnp.full(3, 4)
    for loss in (cz.losses.cross_entropy, cz.losses.CrossEntropy(reduction="sum")):
        np.testing.assert_allclose(loss(model, (xs, ys, full)), loss(model, (xs, ys)), rtol=1e-13)


def test_padded_targets_may_hold_anything(getkey):
    """Labels at padded steps (a padding label such as -1) are neither checked nor
    used."""
    model = cz.RNN(2, 3, 3, "gru", "all", vocab_size=4, key=getkey())
    xs = jr.randint(getkey(), (2, 4), 0, 4)
    ys = jnp.array([[0, 1, -1, -1], [2, 2, 1, -1]])
    lengths = jnp.array([2, 3])
    loss = cz.losses.cross_entropy
    clean = loss(model, (xs, jnp.where(ys < 0, 0, ys), lengths))
    np.testing.assert_allclose(loss(model, (xs, ys, lengths)), clean, rtol=1e-14)
    loss.check_batch_values((2, 4, 3), (xs, ys, lengths), model)
    with pytest.raises(ValueError, match=r"`batch` labels .* must lie in \[0, 3\)"):
        loss.check_batch_values((2, 4, 3), (xs, ys, jnp.array([3, 3])), model)


def test_parameter_groups_by_layer_and_kind(getkey):
    model = cz.RNN(2, 3, 4, "gru", "all", num_layers=2, vocab_size=5, key=getkey())
    groups = model.parameter_groups(model)
    assert groups["embedding"].size == 10
    for layer, width in ((1, 2), (2, 3)):
        assert groups[f"input.reset.layer{layer}"].size == 3 * width
        assert groups[f"recurrent.new.layer{layer}"].size == 9
        assert groups[f"bias.new.layer{layer}"].size == 6  # bias and bias_n
    assert sum(v.size for v in groups.values()) == sum(x.size for x in jax.tree.leaves(model))
    summary = cz.analysis.summarize(jax.tree.map(jnp.abs, model), model)
    assert set(summary["kinds"]) == {"embedding", "input", "recurrent", "bias", "readout"}


# ## Bad input


# Values of the wrong type are refused by the annotation checker at test time (a
# `TypeError` naming the parameter) and by the constructor's own check otherwise.
@pytest.mark.parametrize("value", [0, -1, True, 1.5, "2"])
def test_num_layers_must_be_a_positive_integer(value, getkey):
    match = "num_layers" if isinstance(value, (float, str)) else "`num_layers` must be an integer"
    with pytest.raises((TypeError, ValueError), match=match):
        cz.RNN(2, 3, 4, num_layers=value, key=getkey())


@pytest.mark.parametrize("value", [0, -3, False, 2.0])
def test_vocab_size_must_be_a_positive_integer(value, getkey):
    match = "vocab_size" if isinstance(value, float) else "`vocab_size` must be None"
    with pytest.raises((TypeError, ValueError), match=match):
        cz.RNN(2, 3, 4, vocab_size=value, key=getkey())


def test_floats_to_a_token_model_and_tokens_to_a_float_model(getkey):
    tokens_model = cz.RNN(2, 3, 4, vocab_size=5, key=getkey())
    float_model = cz.RNN(2, 3, 4, key=getkey())
    # The model's own checks (at test time the annotation checker may refuse first).
    with pytest.raises(TypeError, match="reads integer token ids .*vocab_size=5"):
        tokens_model._check_sequence(jnp.zeros(4))
    with pytest.raises(ValueError, match=r"shape \(T,\)"):
        tokens_model._check_sequence(jnp.zeros((4, 2), jnp.int32))
    with pytest.raises(TypeError, match="reads float inputs .* `vocab_size=`"):
        float_model._check_sequence(jnp.zeros((4, 2), jnp.int32))
    loss = cz.losses.cross_entropy
    floats = (jnp.zeros((3, 4)), jnp.zeros(3, jnp.int32))
    with pytest.raises(TypeError, match="token ids|'xs'"):
        cz.hessian_diagonal(tokens_model, loss, floats)
    tokens = (jnp.zeros((3, 4, 2), jnp.int32), jnp.zeros(3, jnp.int32))
    with pytest.raises(TypeError, match="float inputs|'xs'"):
        cz.hessian_diagonal(float_model, loss, tokens)


def test_token_ids_out_of_range(getkey):
    model = cz.RNN(2, 3, 4, vocab_size=5, key=getkey())
    loss = cz.losses.cross_entropy
    batch = (jnp.array([[0, 1, 5]]), jnp.array([1]))
    with pytest.raises(ValueError, match=r"`batch` token ids must lie in \[0, 5\)"):
        loss.check_batch_values((1, 4), batch, model)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 5\)"):
        model.check_input_values(jnp.array([-1, 2]))
    # Under an outer jit the values are unknown: ids are clipped, as documented.
    clipped = jax.jit(lambda t: model(t))(jnp.array([0, 1, 9]))
    np.testing.assert_allclose(clipped, model(jnp.array([0, 1, 4])), rtol=1e-14)


@pytest.mark.parametrize(
    "lengths,match",
    [
        (jnp.array([4, 0]), r"must lie in \[1, 4\].*from 0 to 4"),
        (jnp.array([5, 2]), r"must lie in \[1, 4\].*from 2 to 5"),
        (jnp.array([-1, 2]), r"must lie in \[1, 4\]"),
    ],
)
def test_length_values(lengths, match, getkey):
    model = cz.RNN(2, 3, 3, "gru", "all", key=getkey())
    batch = (jr.normal(getkey(), (2, 4, 2)), jnp.zeros((2, 4), jnp.int32), lengths)
    with pytest.raises(ValueError, match="`batch` lengths " + match.replace("must", ".*must")):
        cz.losses.cross_entropy(model, batch)
    with pytest.raises(ValueError, match=match):
        cz.losses.cross_entropy.check_batch_values((2, 4, 3), batch, model)


@pytest.mark.parametrize(
    "lengths,error,match",
    [
        (jnp.array([2.0, 3.0]), TypeError, "`batch` lengths .* must be integers"),
        (jnp.array([[2], [3]]), ValueError, r"`batch` lengths .* shape \(2,\)"),
        (jnp.array([2, 3, 1]), ValueError, "share their leading"),
    ],
)
def test_length_shapes_and_dtypes(lengths, error, match, getkey):
    model = cz.RNN(2, 3, 3, "gru", "all", key=getkey())
    batch = (jr.normal(getkey(), (2, 4, 2)), jnp.zeros((2, 4), jnp.int32), lengths)
    with pytest.raises(error, match=match):
        cz.hessian_diagonal(model, cz.losses.cross_entropy, batch)


def test_step_axis_must_match_the_inputs(getkey):
    """Per-step targets with lengths: the predictions' steps are the inputs' steps; a
    model whose per-step output has another length cannot be masked by them."""

    class Shorter(eqx.Module):
        inner: cz.RNN

        def __call__(self, xs, length=None):
            return self.inner(xs, length)[:-1]

    model = cz.RNN(2, 3, 3, "gru", "all", key=getkey())
    batch = (jr.normal(getkey(), (2, 4, 2)), jnp.zeros((2, 3), jnp.int32), jnp.array([2, 3]))
    with pytest.raises(ValueError, match="must have the inputs' T = 4 steps"):
        cz.hessian_diagonal(Shorter(model), cz.losses.cross_entropy, batch)
    wrong_targets = (batch[0], jnp.zeros((2, 5), jnp.int32), batch[2])
    with pytest.raises(ValueError, match=r"labels for CrossEntropy must have shape \(2, 4\)"):
        cz.hessian_diagonal(model, cz.losses.cross_entropy, wrong_targets)


def test_lengths_need_a_stepwise_loss(getkey):
    class Quartic(cz.losses.AbstractLoss):
        reduction: str = "sum"

        def per_sample(self, prediction, target):
            return jnp.sum((prediction - target) ** 4)

        def elements_per_sample(self, prediction_shape):
            return 1

        def check_shapes(self, prediction_shape, target_shape, target_dtype):
            pass

    model = cz.RNN(2, 3, 3, "gru", "all", key=getkey())
    batch = (jr.normal(getkey(), (2, 4, 2)), jnp.zeros((2, 4, 3)), jnp.array([2, 3]))
    with pytest.raises(ValueError, match="needs a loss that is a sum over steps"):
        cz.hessian_diagonal(model, Quartic(), batch)


def test_batch_of_three_parts_only(getkey):
    model = cz.RNN(2, 3, 3, "gru", key=getkey())
    with pytest.raises(ValueError, match=r"or a triple `\(inputs, targets, lengths\)`"):
        cz.losses.cross_entropy(model, (jnp.zeros((1, 2, 2)),) * 4)
