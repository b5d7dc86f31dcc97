"""Rows `plan-accuracy`, `plan-slow`, `research`: `cz.plan` against the run it plans.

- `plan-accuracy`: every kernel configuration the other rows time, at their sizes,
  and the README's examples (`benchmarks.cases.PLAN_CASES`). Targets (issue 18): the
  estimated time within 3x of the measured one on every case, and the estimated
  memory within 2x of the measured growth on the zoo models' cases (where either
  reaches 4 MiB: below it, pages and the allocator's granularity rule).
- `plan-slow`: the README's main-job GRU with a loss written as a plain function (the
  generic kernel; minutes on 2 CPU cores). Same targets.
- `research` (`--suite gpu`): the Hessian and GGN diagonals of `mlp2` and the zoo CNN
  at batch 1024 and of a GRU and an LSTM of 256 units over T = 128 at batch 256, each
  beside the jitted gradient (`benchmarks.cases.research_cases`; `--quick`: small sizes
  for a smoke run on a CPU). Reported, with the same plan figures.

Each case runs in a process of its own (`benchmarks.accuracy`, whose docstring says
how time and memory are measured): its plan measures the machine's rate afresh, as a
user's first plan does, and its memory growth is its own.
"""

from .. import accuracy
from ..cases import describe, PLAN_CASES, research_cases, SLOW_CASES
from ..options import Options
from ..timing import device_kind


ROWS = ("plan-accuracy", "plan-slow", "research")
SUMMARY = {
    "plan-accuracy": "cz.plan's time and memory against the measured ones on every kernel "
    "configuration the rows time (targets: time within 3x, memory within 2x on zoo "
    "models; a process per case: minutes)",
    "plan-slow": "the same for the README's GRU with a plain-function loss (generic "
    "kernel: minutes)",
    "research": "the GPU suite (--suite gpu): Hessian and GGN diagonals at research sizes "
    "(GRU/LSTM 256 units, T = 128; mlp2/CNN at batch 1024) beside the gradient",
}


def cases(row: str, options: Options) -> tuple:
    if row == "plan-accuracy":
        return PLAN_CASES
    if row == "plan-slow":
        return SLOW_CASES
    return research_cases(quick=options.quick)


def measure(row: str, options: Options) -> dict:
    """Each case of the row in its own process (`benchmarks.accuracy.run_case`)."""
    found = []
    for case in cases(row, options):
        result = accuracy.run_case(case, options.seed, options.repeats)
        result["model_description"] = describe(case)
        found.append(result)
    timed = [r for r in found if "error" not in r]
    counted = [r for r in timed if r["memory_counted"]]
    met = bool(timed) and len(timed) == len(found) and all(r["time_met"] for r in timed)
    met = met and all(r["memory_met"] for r in counted)
    return {
        "row": row,
        "cases": found,
        "quick": options.quick,
        "target": "(reported)"
        if row == "research"
        else "time within 3x, zoo memory within 2x, every case",
        "target_met": None if row == "research" else met,
        "device": device_kind(),
    }


def headline(result: dict) -> list[tuple[str, float, str]]:
    figures = []
    for r in result["cases"]:
        if "error" not in r:
            label = f"{r['name']} {r['label']}"
            figures.append((f"{label} measured", r["measured_s"] * 1e3, "ms"))
            figures.append((f"{label} estimated/measured", r["time_ratio"], "x"))
    return figures


def _mib(size: float) -> str:
    return f"{size / 2**20:8.1f}"


def format_result(result: dict, verdict: str) -> str:
    """One line per case: estimated and measured time and memory, and their ratios."""
    research = result["row"] == "research"
    header = (
        f"{'case':<12} {'call':<24} {'kernel':<9} {'est. ms':>9} {'meas. ms':>9} "
        f"{'est/meas':>8} {'est. MiB':>8} {'meas. MiB':>9} {'est/meas':>8} "
        f"{'XLA MiB':>8}" + (f" {'grad ms':>8} {'/grad':>6}" if research else "")
    )
    lines = [
        f"{result['row']}: cz.plan against the call it plans, on {result['device']}"
        + (" (quick sizes)" if result.get("quick") else ""),
        header,
        "-" * len(header),
    ]
    notes = {}
    for r in result["cases"]:
        notes[r["name"]] = r.get("model_description", "")
        if "error" in r:
            lines.append(f"{r['name']:<12} {r['label']:<24} failed: {r['error']}")
            continue
        memory = f"{r['memory_ratio']:8.2f}" if r["measured_bytes"] else f"{'-':>8}"
        mark = "" if r["memory_counted"] else "*"
        line = (
            f"{r['name']:<12} {r['label']:<24} {r['kernel']:<9} "
            f"{r['estimated_s'] * 1e3:9.1f} {r['measured_s'] * 1e3:9.1f} "
            f"{r['time_ratio']:8.2f} {_mib(r['estimated_bytes'])} "
            f"{_mib(r['measured_bytes']):>9} {memory}{mark:1}{_mib(r['compiled_bytes'])}"
        )
        if research and "gradient_s" in r:
            line += f" {r['gradient_s'] * 1e3:8.1f} {r['measured_s'] / r['gradient_s']:6.1f}"
        lines.append(line)
    timed = [r for r in result["cases"] if "error" not in r]
    if timed:
        ratios = [r["time_ratio"] for r in timed]
        counted = [r["memory_ratio"] for r in timed if r["memory_counted"]]
        lines.append(
            f"time estimated/measured: {min(ratios):.2f} to {max(ratios):.2f} over "
            f"{len(ratios)} cases"
            + (
                f"; memory (zoo, counted): {min(counted):.2f} to {max(counted):.2f} over "
                f"{len(counted)} cases"
                if counted
                else ""
            )
        )
    lines.append(
        "meas. MiB: growth of the resident memory over one call, or the compiled "
        "buffers where those are larger (the device's peak on a GPU); XLA MiB: the "
        "compiled program's temporaries and outputs; * not counted "
        "(not a zoo model, or both under 4 MiB). Models:"
    )
    lines += [f"  {name}: {text}" for name, text in notes.items()]
    if result["target_met"] is not None:
        lines.append(f"target: {result['target']}: {verdict}")
    return "\n".join(lines)
