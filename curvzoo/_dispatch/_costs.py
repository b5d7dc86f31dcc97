"""What a kernel will cost, read off its traced program before it runs.

`profile(fn, *args)` traces `fn` (no compute) and counts its multiply-adds (the
contractions: `dot_general` and convolutions, and the element operations) and the bytes
of everything it computes. Kernels are made of lanes (samples, basis vectors, probes)
and a part they share; the plan profiles one lane and the shared part and multiplies.

Time is estimated from the multiply-adds and a rate: this machine's own
matrix-multiply rate, the best of a few measurements in this process (`machine_rate`)
of a float32 product, times a
per-kernel efficiency (the fraction of that rate the kernel reached in the benchmark on
2 CPU cores, where its work is counted the same way).
"""

import dataclasses
import functools
import math
import time
from collections.abc import Callable

import equinox as eqx
import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Profile:
    multiply_adds: float  # contractions (matrix products, convolutions)
    element_ops: float  # everything else, one per output element
    bytes: int  # every intermediate it computes (an upper bound: XLA frees and fuses)

    @property
    def work(self) -> float:
        return self.multiply_adds + self.element_ops

    def __add__(self, other: "Profile") -> "Profile":
        return Profile(
            self.multiply_adds + other.multiply_adds,
            self.element_ops + other.element_ops,
            self.bytes + other.bytes,
        )

    def __mul__(self, times: int | float) -> "Profile":
        return Profile(self.multiply_adds * times, self.element_ops * times, self.bytes)


def _size(var) -> int:
    aval = var.aval
    return math.prod(getattr(aval, "shape", ())) if hasattr(aval, "dtype") else 0


def _bytes(var) -> int:
    aval = var.aval
    if hasattr(aval, "shape") and hasattr(aval, "dtype"):
        return math.prod(aval.shape) * np.dtype(aval.dtype).itemsize
    return 0


def _sub_jaxprs(params) -> list:
    found = []
    for value in params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(sub, jex.core.ClosedJaxpr):
                found.append(sub.jaxpr)
            elif isinstance(sub, jex.core.Jaxpr):
                found.append(sub)
    return found


def _count(jaxpr) -> tuple[float, float, int]:
    macs, other, nbytes = 0.0, 0.0, 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        out = sum(_size(v) for v in eqn.outvars)
        nbytes += sum(_bytes(v) for v in eqn.outvars)
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            macs += out * math.prod(lhs[d] for d in contract)
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
            macs += out * math.prod(rhs) / max(out_features, 1)
        elif _sub_jaxprs(eqn.params):
            subs = [_count(sub) for sub in _sub_jaxprs(eqn.params)]
            times = eqn.params.get("length", 1) if name == "scan" else 1
            if name == "cond":  # one branch runs
                best = max(subs, key=lambda c: c[0] + c[1])
                subs = [best]
            macs += times * sum(s[0] for s in subs)
            other += times * sum(s[1] for s in subs)
            nbytes += sum(s[2] for s in subs)
        else:
            other += out
    return macs, other, nbytes


def profile(fn: Callable, *args) -> Profile:
    """Trace `fn(*args)` (PyTrees of arrays or `jax.ShapeDtypeStruct`s, and static
    leaves; nothing runs) and count its work and memory."""
    jaxpr = eqx.filter_make_jaxpr(fn)(*args)[0].jaxpr
    macs, other, nbytes = _count(jaxpr)
    return Profile(macs, other, int(nbytes))


# ## This machine's rate

_RATE: dict = {"best": 0.0, "measured": 0, "last": -math.inf}
_REMEASURE_EVERY = 2.0  # seconds between measurements
_MEASUREMENTS = 8  # at most, per process


def _measure_rate() -> float:
    """Multiply-adds per second of one float32 product, 512 x 512 by 512 x 512, on the
    default device: the best of 5 after a warm-up (about 20 ms on 2 CPU cores)."""
    size = 512
    a = jnp.ones((size, size), jnp.float32)
    product = _product()
    jax.block_until_ready(product(a))
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        jax.block_until_ready(product(a))
        best = min(best, time.perf_counter() - start)
    return size**3 / best


@functools.cache
def _product():
    return jax.jit(lambda x: x @ x)


def machine_rate(*, refresh: bool = False) -> float:
    """This machine's float32 matrix-multiply rate (multiply-adds per second): the best
    of every measurement so far in this process. It is measured at the first call and,
    with `refresh` (each new plan asks for it), again at most every 2 s, up to 8 times:
    a measurement taken while the machine was busy is superseded by a later, quieter
    one, so one unlucky moment no longer skews every later estimate (it did: one GRU
    plan said 13 s in one process and 1.8 s in the next for a call of 0.6-1.0 s)."""
    now = time.monotonic()
    due = refresh and now - _RATE["last"] >= _REMEASURE_EVERY
    if _RATE["measured"] == 0 or (due and _RATE["measured"] < _MEASUREMENTS):
        _RATE["best"] = max(_RATE["best"], _measure_rate())
        _RATE["measured"] += 1
        _RATE["last"] = time.monotonic()
    return _RATE["best"]


# No machine curvzoo runs on multiplies float32 matrices slower than this (multiply-adds
# per second; 2 busy CPU cores here measure 2e10 to 4e10): the floor of
# `surely_faster_than`, so that a plan's time need not be measured to know it is short.
_SLOWEST_RATE = 1e8


def surely_faster_than(work: float, kernel: str, seconds: float) -> bool:
    """Whether `work` operations on `kernel` take less than `seconds` even at the
    slowest rate any machine has (`_SLOWEST_RATE`): then no measurement is needed to
    know it, and no call whose estimate is above `seconds` can be passed over."""
    return work / (_SLOWEST_RATE * EFFICIENCY[kernel]) < seconds


# The fraction of the machine's matrix-multiply rate each kernel reached on the
# benchmark rows (2 CPU cores, float32), counted as `profile` counts it. Deliberately
# on the slow side: an estimate that errs should promise too little.
EFFICIENCY = {
    "layered": 0.25,
    "recurrent": 0.25,
    "generic": 0.1,
    "vjp": 0.1,
    "hutchinson": 0.1,
}


def estimated_seconds(work: float, kernel: str, *, refresh: bool = False) -> float:
    """The estimated run time of `work` operations on `kernel` (see `machine_rate`)."""
    return work / (machine_rate(refresh=refresh) * EFFICIENCY[kernel])
