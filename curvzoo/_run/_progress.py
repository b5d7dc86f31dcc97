"""A progress line for long curvature computations (`progress=True`).

Kernels call `report(label, done, total)` from inside their compiled loops through
`jax.debug.callback`; with `progress=False` (the default) they make no such call, so
their compiled code is unchanged. The line goes to standard error: items done, rate and
time left, rewritten in place and ended when the last item is done.
"""

import sys
import time

import jax
import numpy as np


_STARTS: dict[str, tuple[float, int]] = {}


def _print(label: str, done, total: int) -> None:
    done = int(np.max(np.asarray(done))) + 1  # under `jax.vmap`: the chunk's indices
    now = time.perf_counter()
    start, first = _STARTS.get(label, (now, done))
    if done <= first or label not in _STARTS:
        _STARTS[label] = (now, done)
        start, first = now, done
    rate = (done - first) / (now - start) if now > start else 0.0
    left = (total - done) / rate if rate > 0 else float("nan")
    line = f"\r{label}: {done}/{total} ({100 * done / total:5.1f}%)"
    if rate > 0:
        line += f", {rate:,.1f}/s, {left:,.0f} s left"
    end = "\n" if done >= total else ""
    sys.stderr.write(line + " " * 8 + end)
    sys.stderr.flush()
    if done >= total:
        _STARTS.pop(label, None)


def report(progress: bool, label: str, index, total: int, after=None) -> None:
    """Report that item `index` (0-based; an array of them under `jax.vmap`) of `total`
    is being done; nothing at all when `progress` is false. `after`, an array the
    callback receives and ignores, makes the report wait for whatever computes it."""
    if progress:
        jax.debug.callback(lambda i, _: _print(label, i, total), index, after)
