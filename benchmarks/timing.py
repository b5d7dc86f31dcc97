"""Timing and memory measurement: medians of repeated calls, interleaved medians, and
the process's peak resident memory."""

import resource
import statistics
import time
from collections.abc import Callable


def median_seconds(fn: Callable, repeats: int, *, warmup: bool = True) -> float:
    """Median wall time of `repeats` calls of `fn` (each waited for with
    `jax.block_until_ready`), after one call that compiles and warms up (with
    `warmup=False`, none: the caller has made it)."""
    import jax

    if warmup:
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_seconds(fns: dict[str, Callable], rounds: int, *, warmup: int = 2) -> dict:
    """Median wall time of each of `fns`, timed alternately: every round calls each
    function once, in an order that rotates from round to round, so slow drift of a
    shared machine (other jobs starting or stopping) reaches every function alike.

    **Returns:** a dict from the names of `fns` to their median seconds over `rounds`
    calls, after `warmup` untimed calls of each (compilation included there).
    """
    import jax

    names = list(fns)
    for _ in range(warmup):
        for name in names:
            jax.block_until_ready(fns[name]())
    times = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            jax.block_until_ready(fns[name]())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (`ru_maxrss`; Linux counts KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_kind() -> str:
    """The kind of JAX's first device, e.g. `cpu`."""
    import jax

    return str(jax.devices()[0].device_kind)


def compiled_once_seconds(fn: Callable, *args, rerun_below: float = 1.0) -> float:
    """Wall time of one call of `fn(*args)` compiled ahead: `fn` is wrapped in an outer
    `eqx.filter_jit`, lowered and compiled without running, then called once, for calls
    too long to run twice (a warm-up and a timed call). The first call of a compiled
    program pays one-off costs (buffer allocation, thread start-up: up to tens of
    milliseconds), so a call shorter than `rerun_below` seconds is made again and the
    second one timed. Python work outside the compiled program is not timed."""
    import equinox as eqx
    import jax

    compiled = eqx.filter_jit(fn).lower(*args).compile()

    def call() -> float:
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        return time.perf_counter() - start

    first = call()
    return first if first >= rerun_below else call()


def current_rss_bytes() -> int:
    """Resident memory of this process now (`/proc/self/statm`), or its peak
    (`peak_rss_bytes`) where `/proc` is not there."""
    import os

    try:
        with open("/proc/self/statm") as file:
            return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def reset_peak_rss() -> bool:
    """Lower this process's peak resident memory (`ru_maxrss`, `VmHWM`) to its current
    resident memory, after first handing freed heap memory back to the system
    (`malloc_trim`), so that `peak_rss_bytes` afterwards is the peak of what runs next:
    Linux's `/proc/self/clear_refs` (since 4.0). **Returns:** whether it could; where it
    could not, `peak_rss_bytes` keeps the process's earlier peak (compilation's, say)
    and a growth measured from it is a lower bound."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
    except OSError:
        return False
    return True


def device_memory_stats() -> dict | None:
    """`bytes_in_use` and `peak_bytes_in_use` of JAX's first device, where its backend
    keeps them (GPUs and TPUs; `None` on the CPU)."""
    import jax

    stats = jax.devices()[0].memory_stats()
    if not stats or "bytes_in_use" not in stats:
        return None
    return {
        "bytes_in_use": int(stats["bytes_in_use"]),
        "peak_bytes_in_use": int(stats.get("peak_bytes_in_use", stats["bytes_in_use"])),
    }
