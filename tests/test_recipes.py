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
