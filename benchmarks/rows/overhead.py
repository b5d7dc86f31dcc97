"""Row `overhead`: per-call overhead of a repeated call (input checks, planning,
dispatch): the time of `cz.ggn_diagonal(model, loss, batch)` and of
`cz.hessian_diagonal(model, loss, batch)` (default options) minus the time of the same
call inside an outer `eqx.filter_jit`, whose repeated call only dispatches the compiled
program. On the `mlp2` model and batch, and on an MLP 3-4-2 with a batch of 5, where
compute is negligible. The four calls per model are timed interleaved (`--rounds`
rounds, medians). Target: at most 0.15 ms on `mlp2`, for both functions.
"""

import equinox as eqx

from ..models import build, build_tiny, num_params
from ..options import Options
from ..timing import device_kind, interleaved_seconds


ROWS = ("overhead",)
SUMMARY = {
    "overhead": "per-call overhead of ggn_diagonal and hessian_diagonal, mlp2 and MLP 3-4-2 "
    "(target <= 0.15 ms on mlp2)",
}
TARGET_S = 0.15e-3
FUNCTIONS = ("ggn_diagonal", "hessian_diagonal")


def measure_model(name: str, model, batch, rounds: int) -> list[dict]:
    """Direct and outer-jitted calls of each of `FUNCTIONS` on one model, interleaved.

    **Returns:** one dict per function: `direct_s`, `jitted_s` (medians of `rounds`
    calls) and `overhead_s`, their difference.
    """
    import curvzoo as cz

    loss = cz.losses.cross_entropy
    fns = {}
    for function in FUNCTIONS:
        call = getattr(cz, function)
        jitted = eqx.filter_jit(lambda model, batch, call=call: call(model, loss, batch))
        fns[function] = lambda call=call: call(model, loss, batch)
        fns[f"{function} jitted"] = lambda jitted=jitted: jitted(model, batch)
    medians = interleaved_seconds(fns, rounds)
    return [
        {
            "model": name,
            "params": num_params(model),
            "batch": int(batch[0].shape[0]),
            "function": function,
            "direct_s": medians[function],
            "jitted_s": medians[f"{function} jitted"],
            "overhead_s": medians[function] - medians[f"{function} jitted"],
        }
        for function in FUNCTIONS
    ]


def measure(row: str, options: Options) -> dict:
    """Both models. Cost: `rounds` times the four calls, about 3 s at 200 rounds."""
    calls = measure_model("mlp2", *build("mlp2", options.seed), options.rounds)
    calls += measure_model("mlp 3-4-2", *build_tiny(options.seed), options.rounds)
    worst = max(call["overhead_s"] for call in calls if call["model"] == "mlp2")
    return {
        "row": "overhead",
        "calls": calls,
        "rounds": options.rounds,
        "target": f"overhead on mlp2 <= {TARGET_S * 1e3:g} ms",
        "target_met": bool(worst <= TARGET_S),
        "device": device_kind(),
    }


def headline(result: dict) -> list[tuple[str, float, str]]:
    """Every call's overhead and direct time."""
    figures = []
    for call in result["calls"]:
        label = f"{call['model']} {call['function']}"
        figures.append((f"{label} overhead", call["overhead_s"] * 1e3, "ms"))
        figures.append((f"{label} direct", call["direct_s"] * 1e3, "ms"))
    return figures
