"""Rows `mem-default`, `mem-16mib`: peak resident memory of the generic kernel on an MLP
128-256-256-10 (P = 101386), batch 32, at the default memory budget (128 MiB) and at
16 MiB, each in its own process. Target: under 1 GiB at the default budget; memory
follows the budget, not `P` (a `jnp.eye(P)` basis would need 41 GB in float32).

The `chunk` column is the benchmark's own reckoning of the kernel's chunk by the
kernel's documented rule: the budget divided by one lane's working set, every
intermediate of one linearised Hessian-vector product as traced (`benchmarks.hvp`).
"""

import time

import jax

from ..hvp import chunk_from_budget, DEFAULT_MEMORY_BUDGET, hvp_lane_bytes
from ..models import build_memory_model, num_params
from ..options import Options
from ..timing import device_kind, peak_rss_bytes


ROWS = ("mem-default", "mem-16mib")
SUMMARY = {
    "mem-default": "generic kernel, P = 101386, 128 MiB budget: peak RSS (target < 1 GiB)",
    "mem-16mib": "generic kernel, P = 101386, 16 MiB budget: peak RSS (reported)",
}
BUDGETS = {"mem-default": None, "mem-16mib": 16 * 2**20}
MEMORY_TARGET = 2**30


def measure(row: str, options: Options) -> dict:
    """One call of the generic kernel at the row's budget, compilation included: its
    time and the process's peak RSS before and after. Cost: 30-50 s on 2 CPU cores."""
    import curvzoo as cz

    model, batch = build_memory_model(options.seed)
    loss = cz.losses.cross_entropy
    budget = BUDGETS[row]
    size = num_params(model)
    lane = hvp_lane_bytes(model, loss, batch)
    effective = DEFAULT_MEMORY_BUDGET if budget is None else budget
    rss_before = peak_rss_bytes()
    start = time.perf_counter()
    jax.block_until_ready(
        model.hessian_diagonal(loss, batch, method="generic", memory_budget=budget)
    )
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes()
    return {
        "row": row,
        "params": size,
        "budget_bytes": effective,
        "lane_bytes_estimate": lane,
        "chunk": chunk_from_budget(lane, size, effective),
        "seconds_with_compilation": seconds,
        "rss_before_bytes": rss_before,
        "peak_rss_bytes": peak,
        "eye_bytes": size**2 * 4,
        "target": "peak RSS < 1 GiB" if budget is None else "(reported)",
        "target_met": bool(peak < MEMORY_TARGET) if budget is None else None,
        "device": device_kind(),
    }


def headline(result: dict) -> list[tuple[str, float, str]]:
    """The figures an A/B comparison reports for this row."""
    return [
        ("peak RSS", result["peak_rss_bytes"] / 2**20, "MiB"),
        ("peak - before", (result["peak_rss_bytes"] - result["rss_before_bytes"]) / 2**20, "MiB"),
        ("s with compile", result["seconds_with_compilation"], "s"),
    ]
