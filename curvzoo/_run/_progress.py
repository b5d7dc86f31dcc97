"""The progress bar of long curvature computations (`progress=True`).

Kernels call `report(progress, label, index, total)` from inside their compiled loops,
through `jax.debug.callback`, once per chunk; with `progress=False` (the default) they
make no such call, so their compiled code is unchanged. What is shown:

- with `tqdm` installed (it comes with the `recipes` extra), a `tqdm` bar on standard
  error (in a notebook, its widget), with the rate and the time left;
- otherwise one line on standard error, rewritten in place at most once every
  `INTERVAL` seconds (items done, percentage, rate, time left) and ended when the last
  chunk is done.

A callback from inside a compiled loop costs milliseconds on the CPU backend (it stops
the loop), so the plan (`curvzoo.plan`) calls back only every so many chunks: about
every `INTERVAL` seconds of estimated run time (the estimate is on the safe side, so a
few times a second in practice), and at the last chunk. At `INTERVAL = 0.25` the
`progress` benchmark row measured 3.6-5.5% of a 0.6 s run; at one second, nothing
measurable (-1.4% and -1.9%, within the noise).
"""

import sys
import time

import jax
import numpy as np


INTERVAL = 1.0  # seconds of estimated run time between two reports (and two writes)


def _tqdm():
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm


class _Line:
    """One progress line, rewritten in place, throttled."""

    def __init__(self, label: str, total: int):
        self.label, self.total = label, total
        self.start = time.perf_counter()
        self.done = 0
        self.written = -float("inf")

    def update(self, done: int) -> None:
        self.done = done
        now = time.perf_counter()
        if done < self.total and now - self.written < INTERVAL:
            return
        self.written = now
        line = f"\r{self.label}: {done}/{self.total} ({100 * done / self.total:5.1f}%)"
        elapsed = now - self.start
        if elapsed > 0 and done > 0:
            rate = done / elapsed
            line += f", {rate:,.1f}/s, {(self.total - done) / rate:,.0f} s left"
        end = "\n" if done >= self.total else ""
        sys.stderr.write(line + " " * 8 + end)
        sys.stderr.flush()

    def close(self) -> None:
        pass


class _Bar:
    """A `tqdm` bar."""

    def __init__(self, label: str, total: int, tqdm):
        self.bar = tqdm(total=total, desc=label, mininterval=INTERVAL, file=sys.stderr)
        self.done = 0

    def update(self, done: int) -> None:
        self.bar.update(done - self.done)
        self.done = done

    def close(self) -> None:
        self.bar.close()


_ACTIVE: dict = {}


def _show(label: str, index, total: int) -> None:
    done = int(np.max(np.asarray(index))) + 1  # under `jax.vmap`: the chunk's indices
    shown = _ACTIVE.get(label)
    if shown is None or done <= shown.done:  # a new run of this loop
        if shown is not None:
            shown.close()
        tqdm = _tqdm()
        shown = _Line(label, total) if tqdm is None else _Bar(label, total, tqdm)
        _ACTIVE[label] = shown
    shown.update(done)
    if done >= total:
        shown.close()
        _ACTIVE.pop(label, None)


def report(progress: bool, label: str, index, total: int, after=None) -> None:
    """Report that item `index` (0-based; an array of them under `jax.vmap`) of `total`
    is being done; nothing at all when `progress` is false. `after`, an array the
    callback receives and ignores, makes the report wait for whatever computes it."""
    if progress:
        jax.debug.callback(lambda i, _: _show(label, i, total), index, after)
