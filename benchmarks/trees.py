"""Which source tree a worker process imports `curvzoo` from.

Every row runs in its own process, `python -P -m benchmarks.worker CONFIG`, whose
`PYTHONPATH` is the folder that holds the `benchmarks` package followed by the tree to
import `curvzoo` from (`-P` keeps the working directory off `sys.path`). For an A/B
run the baseline is a temporary `git worktree` of a commit, outside the repository,
and the benchmark code is a copy of this package in a folder of its own, so both sides
run the same benchmark code and no folder on the path but the tree holds a `curvzoo`.
The worker checks that `curvzoo.__file__` lies inside the tree it was given.
"""

import contextlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile


PACKAGE = pathlib.Path(__file__).resolve().parent
REPO_ROOT = PACKAGE.parent


class WrongTreeError(RuntimeError):
    """A worker imported `curvzoo` from another tree than the one it measures."""


def check_tree(module_file: str, tree: str | os.PathLike) -> None:
    """Raise `WrongTreeError` unless `module_file` (a `curvzoo.__file__`) lies inside
    `tree`."""
    found = pathlib.Path(module_file).resolve()
    expected = pathlib.Path(tree).resolve()
    if not found.is_relative_to(expected):
        raise WrongTreeError(
            f"curvzoo was imported from {found}, not from the tree under test {expected}: "
            "the measurement would be of the wrong code. Check PYTHONPATH and any "
            "installed curvzoo that comes before it."
        )


def worker_env(tree: str | os.PathLike, home: str | os.PathLike) -> dict:
    """The environment of a worker: this one with `PYTHONPATH` set to `home` (the folder
    holding the `benchmarks` package) then `tree`."""
    paths = [str(pathlib.Path(home).resolve())]
    if pathlib.Path(tree).resolve() != pathlib.Path(home).resolve():
        paths.append(str(pathlib.Path(tree).resolve()))
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths))


def worker_command(row: str, options, tree: str | os.PathLike) -> list[str]:
    """The command line of a worker that measures `row` on `tree`."""
    config = {"row": row, "tree": str(pathlib.Path(tree).resolve()), "options": options.to_json()}
    return [sys.executable, "-P", "-m", "benchmarks.worker", json.dumps(config)]


def run_worker(row: str, options, tree: str | os.PathLike, home: str | os.PathLike) -> dict:
    """Measure `row` in a fresh process that imports `curvzoo` from `tree` and the
    benchmark code from `home`; its stderr (progress, errors) passes through.

    **Returns:** the row's figures, with `curvzoo_file` (where `curvzoo` came from).
    Raises `RuntimeError` (with the worker's exit status) if the worker fails, the
    tree check included.
    """
    done = subprocess.run(
        worker_command(row, options, tree),
        env=worker_env(tree, home),
        cwd=str(home),
        stdout=subprocess.PIPE,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"row {row} failed on {tree} (exit status {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _git(*args: str) -> str:
    done = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def resolve_commit(ref: str) -> str:
    """The full commit hash of `ref` in this repository (an error naming `ref` if it
    names no commit)."""
    try:
        return _git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    except RuntimeError:
        raise ValueError(f"`--ab {ref}` names no commit of {REPO_ROOT}") from None


def has_local_changes(path: str = "curvzoo") -> bool:
    """Whether the working tree differs from `HEAD` under `path` (uncommitted or
    untracked files)."""
    return bool(_git("status", "--porcelain", "--", path))


@contextlib.contextmanager
def baseline_worktree(ref: str):
    """A detached `git worktree` of `ref` in a new temporary folder (outside the
    repository); removed, with the folder, on exit.

    **Returns:** (as the context's value) `(path, commit)`.
    """
    commit = resolve_commit(ref)
    folder = pathlib.Path(tempfile.mkdtemp(prefix="curvzoo-ab-"))
    path = folder / "baseline"
    try:
        _git("worktree", "add", "--detach", str(path), commit)
        yield path, commit
    finally:
        if path.exists():
            with contextlib.suppress(RuntimeError):
                _git("worktree", "remove", "--force", str(path))
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def staged_benchmarks():
    """A temporary folder holding a copy of this `benchmarks` package and nothing else,
    to put before a tree on `PYTHONPATH`; removed on exit."""
    folder = pathlib.Path(tempfile.mkdtemp(prefix="curvzoo-bench-"))
    try:
        shutil.copytree(
            PACKAGE, folder / "benchmarks", ignore=shutil.ignore_patterns("__pycache__")
        )
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
