"""The benchmark package (outside the wheel): its command line, one cheap row, the
plain-JAX Hessian-vector products it extrapolates from, the power iteration the
spectral row compares with, and the A/B plumbing that decides which tree a worker
imports `curvzoo` from. No timing is asserted."""

import os
import pathlib
import subprocess

import curvzoo as cz
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest
from benchmarks import cli, rows
from benchmarks.formatting import format_ab, format_results
from benchmarks.hvp import hvp_diagonal_prefix, kernel_chunk
from benchmarks.options import Options
from benchmarks.rows import scaling, spectral
from benchmarks.trees import (
    baseline_worktree,
    check_tree,
    REPO_ROOT,
    run_worker,
    staged_benchmarks,
    worker_env,
    WrongTreeError,
)

from .helpers import dense_hessian


TINY_GEMM = Options(repeats=1, gemm_squares=(8,), gemm_shapes=((4, 2, 3),))


def test_defaults_and_help(capsys):
    args, selected, options = cli.parse([])
    assert selected == [row for row in rows.ROWS if row not in cli.SUITES["gpu"]]
    assert options == Options() and args.ab is None
    with pytest.raises(SystemExit):
        cli.parse(["--help"])
    text = capsys.readouterr().out
    parser = cli.parser()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.option_strings[0] in text
        assert action.help and "%(default)" not in action.help
    # Every option but --help shows its default; every row is listed.
    assert text.count("(default:") == len(parser._actions) - 1
    for row in rows.ROWS:
        assert f"\n  {row} " in text


def test_parse_values():
    args, selected, options = cli.parse(
        ["--rows", "gemm, ratios", "--rounds", "9", "--gemm-shapes", "4x2x3,8x1x2",
         "--scaling-hidden", "16", "--ab", "HEAD~1", "--ab-rounds", "5"]
    )  # fmt: skip
    assert selected == ["gemm", "ratios"] and args.ab == "HEAD~1" and args.ab_rounds == 5
    assert options.rounds == 9 and options.scaling_hidden == (16,)
    assert options.gemm_shapes == ((4, 2, 3), (8, 1, 2))
    assert Options.from_json(options.to_json()) == options


@pytest.mark.parametrize(
    "argv, name",
    [
        (["--rows", "mlp2,nope"], "--rows"),
        (["--rows", ","], "--rows"),
        (["--repeats", "0"], "--repeats"),
        (["--ab-rounds", "0"], "--ab-rounds"),
        (["--gemm-shapes", "4x2"], "--gemm-shapes"),
        (["--scaling-steps", "0,8"], "--scaling-steps"),
        (["--scaling-cap", "0"], "--scaling-cap"),
    ],
)
def test_parse_errors_name_the_option(argv, name, capsys):
    with pytest.raises(SystemExit):
        cli.parse(argv)
    assert name in capsys.readouterr().err


def test_gemm_row_in_process():
    result = rows.measure("gemm", TINY_GEMM)
    square, batched = result["shapes"]
    assert square["flops"] == 2 * 8**3
    assert batched["flops"] == 2 * 3 * 4 * 4 * (2 * 4)  # N (n x n) @ (n x T n)
    assert all(shape["gflops_per_s"] > 0 for shape in result["shapes"])
    text = format_results([result])
    assert "3 x (4 x 4) @ (4 x 8)" in text and "GFLOP/s" in text
    assert "target (reported): -" in text
    assert [label for label, _, _ in rows.headline(result)] == [
        s["shape"] for s in result["shapes"]
    ]


def _tiny_problem():
    """A 26-parameter MLP, a batch of 5, cross-entropy, and its dense Hessian."""
    key_model, key_x, key_y = jr.split(jr.key(0), 3)
    model = cz.MLP(3, 2, 4, 1, activation=jax.nn.tanh, key=key_model)
    batch = (jr.normal(key_x, (5, 3)), jr.randint(key_y, (5,), 0, 2))
    loss = cz.losses.cross_entropy
    return model, batch, loss, dense_hessian(model, loss, batch)


def test_hvp_prefix_is_the_hessian_diagonal():
    """The plain-JAX products the scaling row extrapolates from give `diag(H)`."""
    model, batch, loss, hessian = _tiny_problem()
    exact = jnp.diag(hessian)
    for count, budget in ((26, 2**30), (11, 1)):
        run, chunk = hvp_diagonal_prefix(model, loss, batch, count, memory_budget=budget)
        assert chunk == (count if budget > 1 else 1)
        assert jnp.allclose(run(), exact[:count], rtol=1e-12, atol=1e-14)
    assert kernel_chunk(model, loss, batch) == hessian.shape[0] == 26


def test_power_iteration_finds_the_top_eigenvalue():
    """The spectral row's power iteration reaches the eigenvalue largest in magnitude
    to its residual; PyHessian's rule stops sooner, short of it."""
    model, batch, loss, hessian = _tiny_problem()
    eigenvalues = jnp.linalg.eigvalsh(hessian)
    top = eigenvalues[jnp.argmax(jnp.abs(eigenvalues))]
    value, steps, relative = spectral.power_iteration(
        model, loss, batch, jr.key(1), 1e-6, 4000, False
    )
    assert relative <= 1e-6 and steps < 4000
    assert jnp.allclose(value, top, rtol=1e-6)
    value, early, relative = spectral.power_iteration(
        model, loss, batch, jr.key(1), 1e-6, 4000, True
    )
    assert early < steps and relative > 1e-6
    assert jnp.allclose(value, top, rtol=1e-3)


def test_scaling_reduces_work_only_past_the_cap():
    assert scaling._batch_for(None, 20.0) == scaling._batch_for(19.0, 20.0) == 32
    assert scaling._batch_for(80.0, 20.0) == 8
    assert scaling._batch_for(200.0, 20.0) == 2
    assert scaling._batch_for(1e6, 20.0) == scaling.MIN_BATCH
    assert scaling._count_for(None, 20.0, 256, 78) == 256
    assert scaling._count_for(0.01, 20.0, 256, 78) == 256
    assert scaling._count_for(0.1, 20.0, 256, 78) == 156  # whole sub-chunks that fit
    assert scaling._count_for(1.0, 20.0, 256, 78) == 20
    assert scaling._count_for(100.0, 20.0, 256, 78) == 1
    grid = [{"hidden": 32, "steps": 8, "structured_s": 1.0}]
    assert scaling._predict(grid, "structured_s", (2.0, 3.0), 32, 16) == 4.0
    assert scaling._predict(grid, "structured_s", (2.0, 3.0), 64, 8) == 8.0
    assert scaling._predict([], "structured_s", (2.0, 3.0), 64, 8) is None


def test_check_tree(tmp_path):
    check_tree(cz.__file__, pathlib.Path(cz.__file__).parent.parent)
    with pytest.raises(WrongTreeError, match="not from the tree under test"):
        check_tree(cz.__file__, tmp_path)


def _git_checkout() -> bool:
    done = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True)
    return done.returncode == 0


@pytest.mark.skipif(not _git_checkout(), reason="needs a git checkout of curvzoo")
def test_ab_worker_imports_the_baseline_tree():
    """A worktree of HEAD: a worker pointed at it imports `curvzoo` from it, not from
    the repository; a worker whose path puts the repository first fails loudly."""
    with baseline_worktree("HEAD") as (path, commit), staged_benchmarks() as home:
        assert not path.resolve().is_relative_to(REPO_ROOT)
        assert (home / "benchmarks" / "worker.py").exists() and not (home / "curvzoo").exists()
        assert worker_env(path, home)["PYTHONPATH"].split(os.pathsep) == [
            str(home.resolve()),
            str(path.resolve()),
        ]
        result = run_worker("gemm", TINY_GEMM, path, home)
        assert pathlib.Path(result["curvzoo_file"]).resolve().is_relative_to(path.resolve())
        with pytest.raises(RuntimeError, match="exit status 2"):
            run_worker("gemm", TINY_GEMM, path, REPO_ROOT)
    assert not path.exists()
    listed = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "worktree", "list"], capture_output=True, text=True
    ).stdout
    assert str(path) not in listed


def test_ab_table():
    report = {
        "curvzoo_files": {"baseline": ["/tmp/x/baseline/curvzoo/__init__.py"], "current": ["c"]},
        "baseline_ref": "HEAD~1",
        "baseline_commit": "a" * 40,
        "current_commit": "b" * 40,
        "current_changed": False,
        "rounds": 3,
        "figures": [
            {"row": "ratios", "figure": "GGN", "unit": "ms", "baseline": 4.0, "current": 3.0}
        ],
    }
    text = format_ab(report)
    assert "HEAD~1 (aaaaaaaaaaaa)" in text and "/tmp/x/baseline/curvzoo" in text
    assert "uncommitted" not in text
    assert text.splitlines()[-1].split()[-3:] == ["4", "3", "0.750"]


def test_the_gpu_suite_is_one_command():
    """`--suite gpu` selects the research row (not run by default); `--quick` scales it
    down; the research sizes are the issue's (GRU/LSTM 256 units, T = 128; mlp2 and
    the CNN at batch 1024)."""
    from benchmarks.cases import research_cases

    _, selected, options = cli.parse(["--suite", "gpu", "--quick"])
    assert selected == ["research"] and options.quick
    full = {(c.name, c.function): dict(c.sizes) for c in research_cases()}
    assert full[("gru", "hessian")] == {"hidden": 256, "steps": 128, "batch": 256}
    assert full[("lstm", "ggn")]["hidden"] == 256 and full[("cnn", "hessian")]["batch"] == 1024
    assert full[("mlp2", "ggn")]["batch"] == 1024
    assert all(c.gradient for c in research_cases(quick=True))


def test_a_plan_accuracy_case_in_its_own_process():
    """One case as the plan rows run it (a process of its own): the plan's figures
    beside the measured ones, summarised and formatted into the table."""
    from benchmarks import accuracy
    from benchmarks.cases import Case
    from benchmarks.rows import plans

    case = Case("tiny", "mlp2", "hessian", (), (("batch", 4),), "ce", True, "research")
    result = accuracy.run_case(case, seed=0, repeats=2)
    assert "error" not in result, result
    assert result["kernel"] == "layered" and result["batch"] == 4
    assert result["measured_s"] > 0 and result["estimated_s"] > 0 and result["gradient_s"] > 0
    assert result["time_ratio"] == result["estimated_s"] / result["measured_s"]
    assert result["memory_counted"] in (True, False) and result["compiled_bytes"] > 0
    table = plans.format_result(
        {"row": "research", "cases": [result], "device": "cpu", "target_met": None}, ""
    )
    assert "tiny" in table and "est/meas" in table and "grad ms" in table
