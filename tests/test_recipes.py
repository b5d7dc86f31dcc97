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
