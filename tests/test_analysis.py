"""`curvzoo.analysis`: summaries of diagonal PyTrees, checked on hand-made trees whose
entries say where they come from."""

import curvzoo as cz
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest


def _row_coded(model):
    """A model-shaped tree whose every entry is its row index (its position along the
    leaf's first axis), so that a gate split can be checked row by row."""

    def code(leaf):
        rows = jnp.arange(leaf.shape[0], dtype=jnp.float64)
        return jnp.broadcast_to(rows.reshape(-1, *([1] * (leaf.ndim - 1))), leaf.shape)

    return jax.tree.map(code, eqx.filter(model, eqx.is_inexact_array))


def test_statistics():
    stats = cz.analysis.statistics(jnp.array([[-2.0, 1.0], [3.0, -0.5]]))
    assert stats == dict(count=4, median_abs=1.5, max=3.0, min=-2.0, fraction_negative=0.5, sum=1.5)


@pytest.mark.parametrize(
    "cell,gates",
    [
        ("gru", ["reset", "update", "new"]),
        ("lstm", ["input", "forget", "cell", "output"]),
        ("elman", [None]),
    ],
)
def test_rnn_groups_split_the_stacked_gates(cell, gates, getkey):
    hidden = 3
    model = cz.RNN(2, hidden, 4, cell=cell, key=getkey())
    summary = cz.analysis.summarize(_row_coded(model), model)
    groups = model.parameter_groups(_row_coded(model))
    for kind in ("input", "recurrent", "bias"):
        for g, gate in enumerate(gates):
            name = kind if gate is None else f"{kind}.{gate}"
            rows = np.unique(np.asarray(groups[name]))
            # `bias_n` (rows 0..H-1 of its own leaf) joins the GRU's `bias.new`
            expected = set(range(g * hidden, (g + 1) * hidden))
            if cell == "gru" and name == "bias.new":
                expected |= set(range(hidden))
            assert set(rows.tolist()) == expected, name
    assert set(summary["kinds"]) == {"input", "recurrent", "bias", "readout"}
    # Every entry in exactly one group: counts and sums add up to the whole.
    total = sum(leaf.size for leaf in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array)))
    assert sum(s["count"] for s in summary["groups"].values()) == total
    np.testing.assert_allclose(sum(s["sum"] for s in summary["groups"].values()), summary["trace"])
    np.testing.assert_allclose(sum(s["trace_share"] for s in summary["kinds"].values()), 1.0)


def test_frozen_leaves_are_skipped_and_leaves_without_a_model(getkey):
    model = cz.RNN(2, 3, 4, cell="gru", key=getkey())
    coded = eqx.tree_at(lambda m: m.cell.weight_hh, _row_coded(model), replace=None)
    groups = cz.analysis.summarize(coded, model)["groups"]
    assert not any(name.startswith("recurrent") for name in groups)
    plain = cz.analysis.summarize(coded)  # no model: one group per leaf
    assert ".cell.weight_hh" not in plain["leaves"]
    assert "cell.weight_ih" in plain["groups"]
    assert plain["leaves"][".cell.weight_ih"]["shape"] == (9, 2)


def test_top_entries_name_their_leaf_and_index(getkey):
    model = cz.MLP(3, 2, 4, 1, key=getkey())
    diagonal = jax.tree.map(jnp.zeros_like, eqx.filter(model, eqx.is_inexact_array))
    diagonal = eqx.tree_at(
        lambda d: d.layers[0].weight, diagonal, replace_fn=lambda w: w.at[2, 1].set(-7.0)
    )
    diagonal = eqx.tree_at(
        lambda d: d.layers[1].bias, diagonal, replace_fn=lambda b: b.at[1].set(5.0)
    )
    summary = cz.analysis.summarize(diagonal, model, top_k=2)
    assert summary["top"] == [
        dict(leaf=".layers[0].weight", index=(2, 1), value=-7.0),
        dict(leaf=".layers[1].bias", index=(1,), value=5.0),
    ]
    assert summary["trace"] == -2.0
    assert summary["leaves"][".layers[0].weight"]["fraction_negative"] == 1 / 12


def test_table_lists_every_group_aligned(getkey):
    model = cz.RNN(2, 3, 4, cell="lstm", key=getkey())
    summary = cz.analysis.summarize(_row_coded(model), model)
    table = cz.analysis.format_summary(summary, leaves=True)
    lines = table.splitlines()
    for name in summary["groups"]:
        assert any(line.startswith(name + " ") for line in lines), name
    rows = [line for line in lines if line.startswith(("input.", "recurrent.", "bias."))]
    assert len({len(line) for line in rows}) == 1  # aligned columns
    assert "largest entries" in table


def test_bad_input():
    with pytest.raises(ValueError, match="`diagonal` holds no arrays"):
        cz.analysis.summarize({"a": None})
    with pytest.raises(ValueError, match="`top_k` must be an integer >= 0"):
        cz.analysis.summarize({"a": jnp.ones(2)}, top_k=-1)


def test_diagonals_that_do_not_fit_the_model_are_refused(getkey):
    model = cz.RNN(2, 3, 4, cell="gru", key=getkey())
    coded = _row_coded(model)
    stacked = jax.tree.map(lambda leaf: jnp.stack([leaf, leaf]), coded)
    with pytest.raises(
        ValueError, match=r"`diagonal\.cell\.weight_ih` has shape \(2, 9, 2\).*one sample at a time"
    ):
        cz.analysis.summarize(stacked, model)
    with pytest.raises(ValueError, match="`diagonal` has a leaf at"):
        cz.analysis.summarize({"weight": jnp.ones(3)}, model)
    zero = jax.tree.map(jnp.zeros_like, coded)
    summary = cz.analysis.summarize(zero, model)
    assert summary["trace"] == 0 and summary["groups"]["input.reset"]["trace_share"] is None
    # Without a trace the table shows no shares ("-"), but every group and kind.
    lines = cz.analysis.format_summary(summary).splitlines()
    for name in [*summary["groups"], *summary["kinds"]]:
        (row,) = [line for line in lines if line.startswith(name + " ")]
        assert row.split()[-1] == "-", row


def test_trace_splits_by_leaf_group_and_kind(getkey):
    """On a row-coded GRU, each gate's share of a stacked matrix is known in closed form:
    rows `g H .. (g + 1) H - 1`, each repeated over the matrix's columns."""
    hidden, inputs = 3, 2
    model = cz.RNN(inputs, hidden, 4, cell="gru", key=getkey())
    coded = _row_coded(model)
    traces = cz.analysis.trace(coded, model)
    total = sum(float(jnp.sum(leaf)) for leaf in jax.tree.leaves(coded))
    assert traces["total"] == total
    for part in ("leaves", "groups", "kinds"):
        np.testing.assert_allclose(sum(traces[part].values()), total)
    update_rows = sum(range(hidden, 2 * hidden))
    assert traces["groups"]["input.update"] == update_rows * inputs
    assert traces["groups"]["recurrent.update"] == update_rows * hidden
    assert traces["leaves"][".cell.weight_ih"] == sum(range(3 * hidden)) * inputs
    plain = cz.analysis.trace(coded)  # without a model: one group per leaf
    assert plain["groups"]["cell.weight_hh"] == sum(range(3 * hidden)) * hidden
    with pytest.raises(ValueError, match="`diagonal` holds no arrays"):
        cz.analysis.trace({"a": None})
