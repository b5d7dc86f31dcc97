"""A/B runs: a baseline commit and the working tree, measured alternately."""

import statistics
import sys

from . import rows as rows_
from .trees import (
    baseline_worktree,
    has_local_changes,
    REPO_ROOT,
    resolve_commit,
    run_worker,
    staged_benchmarks,
)


def run_ab(ref: str, rows: list[str], options, rounds: int) -> dict:
    """Measure every row on a `git worktree` of `ref` and on the working tree, each
    side in a process of its own per round, alternating which side goes first, with
    the same (copied) benchmark code on both sides. The worktree is removed afterwards.

    **Returns:** a dict: `curvzoo_files` (where each side's workers imported `curvzoo`
    from, each checked against its tree), `baseline_ref`, `baseline_commit`,
    `current_commit`, `current_changed` (uncommitted changes under `curvzoo/`),
    `rounds`, `figures` (per row and headline figure, the medians over rounds of both
    sides) and `results` (every worker's full figures).
    """
    results = {row: {"baseline": [], "current": []} for row in rows}
    with baseline_worktree(ref) as (baseline, commit), staged_benchmarks() as home:
        trees = {"baseline": baseline, "current": REPO_ROOT}
        for row in rows:
            for index in range(rounds):
                order = ("baseline", "current") if index % 2 == 0 else ("current", "baseline")
                for side in order:
                    print(
                        f"measuring {row} on {side} (round {index + 1}/{rounds}) ...",
                        file=sys.stderr,
                        flush=True,
                    )
                    results[row][side].append(run_worker(row, options, trees[side], home))
    figures = []
    for row in rows:
        medians = {}
        for side, runs in results[row].items():
            values = {}
            for run in runs:
                for label, value, unit in rows_.headline(run):
                    values.setdefault((label, unit), []).append(value)
            medians[side] = {key: statistics.median(v) for key, v in values.items()}
        for label, unit in medians["baseline"]:
            figures.append(
                {
                    "row": row,
                    "figure": label,
                    "unit": unit,
                    "baseline": medians["baseline"][label, unit],
                    "current": medians["current"].get((label, unit), float("nan")),
                }
            )
    sources = {
        side: sorted({run["curvzoo_file"] for row in rows for run in results[row][side]})
        for side in ("baseline", "current")
    }
    return {
        "curvzoo_files": sources,
        "baseline_ref": ref,
        "baseline_commit": commit,
        "current_commit": resolve_commit("HEAD"),
        "current_changed": has_local_changes(),
        "rounds": rounds,
        "figures": figures,
        "results": results,
    }
