"""The recipes run end to end in their quick modes."""

import importlib.util
import pathlib

import numpy as np


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
    # Sharpness: converged Lanczos, the top eigenvalue within the trace; the curvature
    # per step of every sequence, and the report on the marked steps.
    for record in saved["checkpoints"]:
        for which in ("hessian", "ggn"):
            top = record["sharpness"][which]
            assert top["residual"] <= 1e-3 * abs(top["eigenvalue"])
        assert 0 < record["sharpness"]["ggn"]["eigenvalue"] <= record["ggn_trace"]
    assert np.shape(saved["time_steps_per_sequence"]) == (128, 10)
    assert "Sharpness and trace over training" in out
    assert "the step of largest curvature is a marked step in" in out


def test_rnn_curvature_language_model(capsys, tmp_path):
    """The character model in quick mode: two layers, the embedding among the groups,
    lengths respected (no curvature at padded steps)."""
    import json

    result = _load("rnn_curvature").main(quick=True, out=str(tmp_path), task="lm")
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "rnn_curvature_lm.json").read_text())
    assert (tmp_path / "rnn_curvature_lm.png").stat().st_size > 10_000
    assert len(result["checkpoints"]) == 4
    groups = saved["checkpoints"][-1]["hessian"]["groups"]
    assert "embedding" in groups and "recurrent.new.layer2" in groups
    assert len(saved["checkpoints"][-1]["time_steps"]) == 2  # one curve per layer
    rows = saved["time_steps_per_sequence"]
    assert any(None in row for row in rows) and all(row[0] is not None for row in rows)
    assert saved["checkpoints"][-1]["eval_loss"] < saved["checkpoints"][0]["eval_loss"]
    assert "Median |diag GGN| per group" in out


def test_obd_pruning(capsys, tmp_path):
    module = _load("obd_pruning")
    result = module.main(quick=True, out=str(tmp_path))
    out = capsys.readouterr().out
    assert (tmp_path / "obd_pruning.png").exists() and (tmp_path / "obd_pruning.json").exists()
    accuracy = result["accuracy"]
    # No pruning, same model: every criterion starts from the same accuracy, and removing
    # 95% of the weights costs accuracy whichever criterion picks them.
    assert len({values[0] for values in accuracy.values()}) == 1
    assert accuracy["magnitude"][0] > 0.8
    for values in accuracy.values():
        assert values[-1] < values[0] - 0.1
    assert "held-out accuracy after pruning" in out


def test_global_pruning_mask(getkey):
    """`prune` zeroes exactly the lowest-scored fraction, ranked over all weight matrices
    together, and leaves the model passed in alone."""
    import curvzoo as cz
    import jax.numpy as jnp

    module = _load("obd_pruning")
    model = cz.MLP(4, 3, 5, 1, key=getkey())  # weights (5, 4) and (3, 5): 35 entries
    scores = [jnp.arange(w.size, dtype=w.dtype).reshape(w.shape) for w in module.weights_of(model)]
    scores[1] = scores[1] - 100.0  # every entry of the second matrix ranks below the first's
    first, second = module.weights_of(module.prune(model, scores, 0.4))  # 14 of 35
    assert bool(jnp.all(first != 0))
    assert bool(jnp.all(second.reshape(-1)[:14] == 0)) and second.reshape(-1)[14] != 0
    assert bool(jnp.all(module.weights_of(model)[1] != 0))


def test_diagonal_newton(capsys, tmp_path):
    result = _load("diagonal_newton").main(quick=True, out=str(tmp_path))
    assert (tmp_path / "diagonal_newton.png").exists()
    for kind, losses in result["losses"].items():
        assert losses[-1] < 0.5 * losses[0], kind
    # The diagonal misses most of the curvature along the Newton step at the start, and
    # the trust radius keeps the exact-diagonal optimiser's first steps from blowing up
    # (without it, the first step multiplied the loss by 5.5 in float32, 8 in float64;
    # with it the loss wobbles by at most about 15% early on, as Adam's does).
    check = result["overshoot"]
    assert check["pHp"] > 10 * check["diagonal_pHp"]
    assert check["loss_after_step"] > 2 * check["loss"] > check["loss_after_clipped_step"]
    assert max(result["losses"]["newton"][1:]) < 1.5 * result["losses"]["newton"][0]
    out = capsys.readouterr().out
    assert "AdaHessian (1 probe)" in out and "highest" in out


def test_laplace(capsys, tmp_path):
    result = _load("laplace").main(quick=True, out=str(tmp_path))
    assert (tmp_path / "laplace.png").exists()
    std = {row["region"]: row["std"] for row in result["points"]}
    # Uncertainty grows away from the data, in the gap between its two intervals.
    assert std["gap"] > std["data"]
    assert "prior precision" in capsys.readouterr().out


def test_laplace_evidence_is_exact_for_an_orthogonal_linear_model():
    """For `y = X w + noise` with orthonormal columns the GGN is diagonal, so the
    Laplace evidence is the exact log marginal likelihood, up to a constant in the prior
    precision: compare differences over two precisions with the Gaussian marginal."""
    import jax.numpy as jnp
    import numpy as np

    module = _load("laplace")
    rng = np.random.default_rng(0)
    X, _ = np.linalg.qr(rng.normal(size=(12, 3)))  # orthonormal columns
    y = X @ np.array([0.5, -1.0, 2.0]) + 0.1 * rng.normal(size=12)
    sigma2 = 0.3**2
    curvature = np.diag(X.T @ X) / sigma2  # the GGN diagonal of the NLL
    mode = lambda lam: np.linalg.solve(X.T @ X / sigma2 + lam * np.eye(3), X.T @ y / sigma2)  # noqa: E731

    def laplace(lam):
        w = mode(lam)
        nll = np.sum((X @ w - y) ** 2) / (2 * sigma2) + 6 * np.log(2 * np.pi * sigma2)
        return float(module.log_evidence(lam, jnp.asarray(curvature), jnp.asarray(w), nll))

    def exact(lam):  # y ~ N(0, X X^T / lam + sigma2 I), plus the P/2 log 2 pi of the prior
        cov = X @ X.T / lam + sigma2 * np.eye(12)
        sign, logdet = np.linalg.slogdet(cov)
        return -0.5 * (y @ np.linalg.solve(cov, y) + logdet + 12 * np.log(2 * np.pi))

    assert np.isclose(laplace(2.0) - laplace(0.5), exact(2.0) - exact(0.5), rtol=1e-9, atol=1e-9)
