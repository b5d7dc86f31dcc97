"""The recipes run end to end in their quick modes."""

import importlib.util
import pathlib


RECIPES = pathlib.Path(__file__).parent.parent / "recipes"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart(capsys):
    _load("quickstart").main(quick=True, batch_size=8)
    out = capsys.readouterr().out
    for name in ("MLP", "RNN (Elman)", "RNN (GRU)", "RNN (LSTM)", "CNN"):
        assert name in out
    assert ".cell.weight_hh" in out and ".convs[1].weight" in out


def test_rnn_curvature(capsys, tmp_path):
    """The main job in quick mode: it writes the JSON and the figure, its printed table
    is the saved summary's, and the gates differ in curvature (by far more than the
    spread within noise)."""
    import json

    import curvzoo as cz

    result = _load("rnn_curvature").main(quick=True, out=str(tmp_path))
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "rnn_curvature.json").read_text())
    assert (tmp_path / "rnn_curvature.png").stat().st_size > 10_000
    assert len(saved["checkpoints"]) == len(result["checkpoints"]) == 4
    final = saved["checkpoints"][-1]
    assert cz.analysis.format_summary(final["hessian"]) in out
    assert "checkpoint 4/4" in out and "Median |diag GGN| per group" in out
    gates = [
        stats["median_abs"]
        for name, stats in final["hessian"]["groups"].items()
        if name.startswith("recurrent.")
    ]
    assert max(gates) > 10 * min(gates)
    assert final["eval_loss"] < saved["checkpoints"][0]["eval_loss"]


def test_obd_pruning(capsys, tmp_path):
    result = _load("obd_pruning").main(quick=True, out=str(tmp_path))
    out = capsys.readouterr().out
    assert (tmp_path / "obd_pruning.png").exists() and (tmp_path / "obd_pruning.json").exists()
    accuracy = result["accuracy"]
    # No pruning, same model: every criterion starts from the same accuracy.
    assert len({values[0] for values in accuracy.values()}) == 1
    assert accuracy["magnitude"][0] > 0.8
    assert "held-out accuracy after pruning" in out


def test_diagonal_newton(capsys, tmp_path):
    result = _load("diagonal_newton").main(quick=True, out=str(tmp_path))
    assert (tmp_path / "diagonal_newton.png").exists()
    for kind, losses in result["losses"].items():
        assert losses[-1] < 0.5 * losses[0], kind
    assert "AdaHessian (1 probe)" in capsys.readouterr().out


def test_laplace(capsys, tmp_path):
    result = _load("laplace").main(quick=True, out=str(tmp_path))
    assert (tmp_path / "laplace.png").exists()
    std = {row["region"]: row["std"] for row in result["points"]}
    # Uncertainty grows away from the data, in the gap between its two intervals.
    assert std["gap"] > std["data"]
    assert "prior precision" in capsys.readouterr().out
