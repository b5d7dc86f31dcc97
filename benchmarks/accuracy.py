"""A plan against its run: one case's `cz.plan` beside the measured time and memory of
the same call, in a process of its own.

Run as `python -P -m benchmarks.accuracy CONFIG` (`CONFIG`: JSON with `case`, `seed` and
`repeats`) by the rows `plan-accuracy`, `plan-slow` and `research`, one process per
case, so that each case's memory is its own and its plan measures the machine's rate
afresh, as a user's process does. It prints one line of JSON. In that process, in order:

1. `plan = cz.plan(model, loss, batch, quantity=..., **options)`: `plan.seconds` (which
   measures the machine's matrix-multiply rate, once per process) and
   `plan.memory_bytes`.
2. The call, the curvzoo function inside one `jax.jit` over the model's, the batch's
   and the key's arrays, lowered and compiled ahead (compilation excluded from every
   figure). The compiled program's buffer assignment (`Compiled.memory_analysis()`):
   `temp_size_in_bytes + output_size_in_bytes`, the buffers a call allocates (its
   arguments exist before it; on the CPU the temporaries are one block per call).
3. Memory: freed heap memory handed back (`malloc_trim`), the peak resident memory
   reset to the current one (`/proc/self/clear_refs`), one call, and the peak resident
   memory after it: the *RSS growth*. On a device that keeps memory statistics (GPUs),
   also the device's peak bytes in use after the call minus its bytes in use before:
   the *device growth* (over the first call: the device's peak cannot be reset). The
   RSS is read over the first call, and again over the second, whose readings are the
   ones reported (the first call pays one-off costs, such as the
   runtime's code paged in: `rss_growth_first_bytes`); a first call over 30 s is the
   only one, and its readings stand.
4. Time: the median of the second and further calls (`repeats` in all for calls under
   half a second, fewer for longer ones, down to one), or the first where it is the
   only one.
5. With `gradient`, the jitted gradient of the same loss, compiled ahead, median of 20.
6. A yardstick: the median rate of 20 float32 `512 x 512` products
   (`benchmarks.gemm.gemm_rate`), to put the plan's assumed rate
   (`(multiply_adds + element_ops) / seconds`) and the achieved one on one scale.
"""

import json
import math
import os
import statistics
import subprocess
import sys
import time

from .cases import build, call, Case, KEYED
from .gemm import gemm_rate
from .timing import (
    current_rss_bytes,
    device_kind,
    device_memory_stats,
    median_seconds,
    peak_rss_bytes,
    reset_peak_rss,
)


GRADIENT_REPEATS = 20
YARDSTICK = 512
FULL_REPEATS_BELOW = 0.5  # seconds: calls shorter than this are timed `repeats` times
TIMED_SECONDS = 3.0  # about this long is spent on the further calls of a longer one
SINGLE_CALL_ABOVE = 30.0  # seconds: a first call longer than this is the only one
TIME_TARGET = 3.0  # estimated time within 3x of the measured, either way (issue 18)
MEMORY_TARGET = 2.0  # estimated memory within 2x of the measured growth (zoo models)
MEMORY_FLOOR = 4 * 2**20  # below this on both sides, page and allocator granularity rule


def further_calls(first: float, repeats: int) -> int:
    """How many calls to time after a first call of `first` seconds."""
    if first < FULL_REPEATS_BELOW:
        return repeats
    if first > SINGLE_CALL_ABOVE:
        return 0
    return max(1, min(repeats, math.floor(TIMED_SECONDS / first)))


def _compiled(fn, tree):
    """`(compiled, arrays, seconds)`: `fn(*tree)` inside one `jax.jit` over the arrays of
    `tree` (the rest closed over), lowered and compiled ahead."""
    import equinox as eqx
    import jax

    arrays, static = eqx.partition(tree, eqx.is_array)
    jitted = jax.jit(lambda a: fn(*eqx.combine(a, static)))
    start = time.perf_counter()
    compiled = jitted.lower(arrays).compile()
    return compiled, arrays, time.perf_counter() - start


def _buffers(compiled) -> dict:
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    found = {
        name: int(getattr(stats, f"{name}_size_in_bytes"))
        for name in ("argument", "output", "temp", "alias", "generated_code")
    }
    peak = getattr(stats, "peak_memory_in_bytes", None)
    found["peak"] = None if peak is None else int(peak)
    return found


def _memory_call(timed_call, result: dict) -> float:
    """Run `timed_call` once between the memory readings (see the module docstring),
    writing them into `result`. **Returns:** the call's seconds."""
    result["rss_reset"] = reset_peak_rss()
    rss_before, peak_before = current_rss_bytes(), peak_rss_bytes()
    device_before = device_memory_stats()
    seconds = timed_call()
    result["rss_peak_bytes"] = peak_rss_bytes()
    result["rss_before_bytes"] = rss_before
    # Where the peak could not be reset, growth over the earlier peak: a lower bound.
    base = rss_before if result["rss_reset"] else peak_before
    result["rss_growth_bytes"] = max(0, result["rss_peak_bytes"] - base)
    device_after = device_memory_stats()
    # The device's peak cannot be reset: its readings are the first call's.
    fresh = "device_growth_bytes" not in result
    if fresh and device_before is not None and device_after is not None:
        result["device_growth_bytes"] = max(
            0, device_after["peak_bytes_in_use"] - device_before["bytes_in_use"]
        )
        # An earlier peak above this call's hides the call's own.
        result["device_peak_masked"] = (
            device_after["peak_bytes_in_use"] <= device_before["peak_bytes_in_use"]
        )
    return seconds


def measure_case(case: Case, seed: int, repeats: int) -> dict:
    """Plan, compile, and measure `case` in this process (see the module docstring).

    **Returns:** a JSON-ready dict: the plan's fields and estimates, the compiled
    program's buffers, the RSS (and device) growth over the first call, the median
    time, and the yardstick.
    """
    import curvzoo as cz
    import equinox as eqx
    import jax

    model, batch, loss = build(case, seed)
    key = jax.random.key(seed) if case.function in KEYED else None
    options = dict(case.options)
    start = time.perf_counter()
    plan = cz.plan(model, loss, batch, quantity=case.function, **options)
    estimate = plan.seconds
    plan_s = time.perf_counter() - start
    work = plan.multiply_adds + plan.element_ops
    result = {
        "case": case.to_json(),
        "name": case.name,
        "label": case.label,
        "row": case.row,
        "zoo": isinstance(model, cz.AbstractModel),
        "kernel": plan.kernel,
        "params": plan.num_params,
        "batch": plan.batch_size,
        "chunk": plan.chunk,
        "num_chunks": plan.num_chunks,
        "lanes": plan.lanes,
        "multiply_adds": plan.multiply_adds,
        "element_ops": plan.element_ops,
        "estimated_s": estimate,
        "estimated_bytes": plan.memory_bytes,
        "shared_bytes": plan.shared_bytes,
        "memory_budget": plan.memory_budget,
        "plan_call_s": plan_s,
        "plan_ops_per_s": work / estimate if estimate > 0 else None,
    }
    compiled, arrays, result["compile_s"] = _compiled(call(case, loss), (model, batch, key))
    result["buffers"] = _buffers(compiled)
    buffers = result["buffers"]
    result["compiled_bytes"] = buffers.get("temp", 0) + buffers.get("output", 0)

    def timed_call():
        begin = time.perf_counter()
        jax.block_until_ready(compiled(arrays))
        return time.perf_counter() - begin

    first = result["first_call_s"] = _memory_call(timed_call, result)
    result["rss_growth_first_bytes"] = result["rss_growth_bytes"]
    if first > SINGLE_CALL_ABOVE:  # the first call's readings and time stand
        result["memory_call"], times = "first", [first]
    else:  # the first call was the warm-up (one-off costs: the runtime's code paged in)
        result["memory_call"], times = "second", [_memory_call(timed_call, result)]
        times += [timed_call() for _ in range(max(0, further_calls(first, repeats) - 1))]
    result["timed_calls"] = len(times)
    result["measured_s"] = statistics.median(times)
    result["measured_ops_per_s"] = work / result["measured_s"]
    if case.gradient:
        grad, grad_arrays, _ = _compiled(eqx.filter_grad(loss), (model, batch))
        result["gradient_s"] = median_seconds(
            lambda: grad(grad_arrays), max(repeats, GRADIENT_REPEATS)
        )
    # GFLOP/s, 2 operations per multiply-add: as a multiply-add rate, / 2.
    result["gemm_gflops_per_s"] = gemm_rate(YARDSTICK, YARDSTICK, YARDSTICK, seed=seed)
    result["device"] = device_kind()
    result["num_devices"] = jax.device_count()
    result["curvzoo_file"] = cz.__file__
    return result


def summarise(result: dict) -> dict:
    """The ratios and verdicts of one case's figures (added to it, in place, and
    returned): `time_ratio` (estimated / measured), `memory_ratio` (estimated /
    measured growth: the device's where the device keeps statistics, else the RSS's or
    the compiled buffers', whichever is larger),
    `compiled_ratio` (estimated / compiled buffers), and whether each is within its
    target (`TIME_TARGET`, `MEMORY_TARGET`; memory only on zoo models, and only where
    the estimate or the growth reaches `MEMORY_FLOOR`)."""
    if "error" in result:
        result.update(time_met=False, memory_met=None)
        return result
    result["time_ratio"] = result["estimated_s"] / result["measured_s"]
    if "device_growth_bytes" in result:
        measured, result["memory_measure"] = result["device_growth_bytes"], "device"
    else:
        # A call allocates at least its compiled buffers (one block per call on the
        # CPU); its RSS growth is below them where the allocator hands back pages the
        # warm-up call freed (`mlp2`'s GGN: 1.8 MiB of growth for 4.2 MiB of buffers).
        measured = max(result["rss_growth_bytes"], result["compiled_bytes"])
        result["memory_measure"] = (
            "rss" if result["rss_growth_bytes"] >= result["compiled_bytes"] else "compiled"
        )
    result["measured_bytes"] = measured
    result["memory_ratio"] = result["estimated_bytes"] / measured if measured else math.inf
    compiled = result["compiled_bytes"]
    result["compiled_ratio"] = result["estimated_bytes"] / compiled if compiled else math.inf
    result["time_met"] = bool(1 / TIME_TARGET <= result["time_ratio"] <= TIME_TARGET)
    counted = result["zoo"] and max(result["estimated_bytes"], measured) >= MEMORY_FLOOR
    result["memory_counted"] = bool(counted)
    result["memory_met"] = (
        bool(1 / MEMORY_TARGET <= result["memory_ratio"] <= MEMORY_TARGET) if counted else None
    )
    return result


def run_case(case: Case, seed: int, repeats: int) -> dict:
    """Measure `case` in a fresh process (this one's environment, so the same
    `PYTHONPATH` and `curvzoo`); its stderr passes through.

    **Returns:** the case's figures, summarised (`summarise`), or, where the process
    failed (out of memory, say), `{"name", "label", "row", "error"}`, so that one
    failure does not lose a row's other cases. Raises `RuntimeError` if the process
    imported `curvzoo` from elsewhere than this one did.
    """
    import curvzoo

    config = json.dumps({"case": case.to_json(), "seed": seed, "repeats": repeats})
    done = subprocess.run(
        [sys.executable, "-P", "-m", "benchmarks.accuracy", config],
        env=dict(os.environ),
        stdout=subprocess.PIPE,
        text=True,
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        failed = {"name": case.name, "label": case.label, "row": case.row, "zoo": None}
        failed["error"] = f"exit status {done.returncode}"
        return summarise(failed)
    result = json.loads(lines[-1])
    if os.path.realpath(result["curvzoo_file"]) != os.path.realpath(curvzoo.__file__):
        raise RuntimeError(
            f"case {case.name} imported curvzoo from {result['curvzoo_file']}, not "
            f"{curvzoo.__file__}"
        )
    return summarise(result)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    config = json.loads(argv[0])
    result = measure_case(Case.from_json(config["case"]), config["seed"], config["repeats"])
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
