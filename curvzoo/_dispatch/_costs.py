"""What a kernel will cost, read off its traced program before it runs.

`profile(fn, *args)` traces `fn` (no compute) and counts its multiply-adds (the
contractions: `dot_general` and convolutions, and the element operations) and the bytes
of everything it computes. Kernels are made of lanes (samples, basis vectors, probes)
and a part they share; the plan profiles one lane and the shared part and multiplies.

Time is estimated from the multiply-adds and a rate: this machine's own
matrix-multiply rate, measured once per process on a float32 product, times a
per-kernel efficiency (the fraction of that rate the kernel reached in the benchmark on
2 CPU cores, where its work is counted the same way).
"""

import dataclasses
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

_RATE: dict = {}


def machine_rate() -> float:
    """Multiply-adds per second of a float32 matrix product on this machine's default
    device (512 x 512 by 512 x 512, the best of 5 after a warm-up), measured once per
    process."""
    if "rate" not in _RATE:
        size = 512
        a = jnp.ones((size, size), jnp.float32)
        product = jax.jit(lambda x: x @ x)
        jax.block_until_ready(product(a))
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            jax.block_until_ready(product(a))
            best = min(best, time.perf_counter() - start)
        _RATE["rate"] = size**3 / best
    return _RATE["rate"]


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


def estimated_seconds(work: float, kernel: str) -> float:
    return work / (machine_rate() * EFFICIENCY[kernel])
