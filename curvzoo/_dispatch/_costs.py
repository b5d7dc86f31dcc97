"""What a kernel will cost, read off its traced program before it runs.

`profile(fn, *args)` traces `fn` (no compute) and counts its multiply-adds (the
contractions: `dot_general` and convolutions, and the element operations) and the most
memory its intermediates hold at once. Kernels are made of lanes (samples, basis vectors, probes)
and a part they share; the plan profiles one lane and the shared part and multiplies.

Time is estimated from the counted work and this machine's own rates, the best of a
few measurements in this process (`machine_rates`): matrix products, convolutions and
element operations each at the rate of a small float32 program of its kind, each step
run one after another at the latency of a scan's step, and the whole scaled by a
per-kernel factor calibrated on the benchmark's `plan-accuracy` row (`EFFICIENCY`).
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
    multiply_adds: float  # contractions (matrix products and convolutions)
    element_ops: float  # everything else, one per output element
    bytes: int  # the most its intermediates hold at once (`_count`)
    convolutions: float = 0.0  # the multiply-adds of convolutions (part of `multiply_adds`)
    steps: float = 0.0  # operations run one after another (`_count`): each costs latency
    memory_bound: float = 0.0  # multiply-adds of products that stream memory (`_count`)

    @property
    def work(self) -> float:
        return self.multiply_adds + self.element_ops

    def __add__(self, other: "Profile") -> "Profile":
        return Profile(
            self.multiply_adds + other.multiply_adds,
            self.element_ops + other.element_ops,
            self.bytes + other.bytes,
            self.convolutions + other.convolutions,
            self.steps + other.steps,
            self.memory_bound + other.memory_bound,
        )

    def minus(self, other: "Profile") -> "Profile":
        """`self - other`, each figure at least 0 (a difference of two profiles)."""
        return Profile(
            max(0.0, self.multiply_adds - other.multiply_adds),
            max(0.0, self.element_ops - other.element_ops),
            max(0, self.bytes - other.bytes),
            max(0.0, self.convolutions - other.convolutions),
            max(0.0, self.steps - other.steps),
            max(0.0, self.memory_bound - other.memory_bound),
        )

    def __mul__(self, times: int | float) -> "Profile":
        """The work of `times` runs, one after another (the memory of one)."""
        return Profile(
            self.multiply_adds * times,
            self.element_ops * times,
            self.bytes,
            self.convolutions * times,
            self.steps * times,
            self.memory_bound * times,
        )


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


def _last_uses(jaxpr) -> tuple[dict, set]:
    """`(last, fused)`: for each variable `jaxpr`'s equations define, the index of the
    last equation that reads it (`len(jaxpr.eqns)` for the program's outputs); and the
    variables XLA fuses into their one reader, so that they never take memory: made by
    an elementwise or layout operation (`_FUSIBLE`) and read by one other such one or a
    reduction, or a broadcast read once by anything but a convolution. A fused
    equation runs inside the one that reads its result, so what it reads is read
    there: a convolution's output read through a reshape and a transpose by an add
    lives until the add."""
    last, reads, readers, reader_index = {}, {}, {}, {}
    for index, eqn in enumerate(jaxpr.eqns):
        for var in eqn.invars:
            if isinstance(var, jex.core.Var):
                last[var] = index
                reads[var] = reads.get(var, 0) + 1
                readers[var] = eqn.primitive.name
                reader_index[var] = index
    for var in jaxpr.outvars:
        if isinstance(var, jex.core.Var):
            last[var] = len(jaxpr.eqns)
            reads[var] = reads.get(var, 0) + 2  # an output is materialised
    fused = {
        var
        for eqn in jaxpr.eqns
        if eqn.primitive.name in _FUSIBLE
        for var in eqn.outvars
        if reads.get(var) == 1
        and (
            readers[var] in _FUSING_READERS
            or (eqn.primitive.name in _FUSED_INTO_ANY and readers[var] not in _MATERIALISING)
        )
    }
    # Where each equation really runs: inside its reader's, where its results are fused.
    runs_at = list(range(len(jaxpr.eqns)))
    for index in reversed(range(len(jaxpr.eqns))):
        outs = jaxpr.eqns[index].outvars
        if outs and all(var in fused for var in outs):
            runs_at[index] = max(runs_at[reader_index[var]] for var in outs)
    for index, eqn in enumerate(jaxpr.eqns):
        for var in eqn.invars:
            if isinstance(var, jex.core.Var) and last[var] < len(jaxpr.eqns):
                last[var] = max(last[var], runs_at[index])
    return last, fused


# Operations XLA fuses with their neighbours (elementwise arithmetic, layout changes):
# an intermediate between two of them is computed inside one loop, never stored.
_FUSIBLE = frozenset(
    "abs add and broadcast_in_dim convert_element_type copy cos div eq exp exp2 "
    "expand_dims expm1 ge gt integer_pow le log log1p logistic lt max min mul ne neg not "
    "or pow reshape rsqrt select_n sign sin sqrt square squeeze stop_gradient sub tan "
    "tanh transpose xor".split()
)
# ... read by one of those or by a reduction (which XLA fuses its inputs into) ...
_FUSING_READERS = _FUSIBLE | {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod"}
# ... and those XLA fuses into whatever reads them (a broadcast is an index map) but a
# convolution or a windowed reduction (pooling), which take their operands
# materialised (the CNN's chunks held four buffers of 110 MB where a count that fused
# the broadcasts into its pooling saw one).
_FUSED_INTO_ANY = frozenset(("broadcast_in_dim", "iota"))
_MATERIALISING = frozenset(
    "conv_general_dilated reduce_window reduce_window_max reduce_window_min "
    "reduce_window_sum select_and_gather_add select_and_scatter_add".split()
)


# Multiply-adds per entry read or written below which a product streams memory rather
# than computing: a matrix product's rate is some 10 times the rate of element
# operations on 2 CPU cores (`Rates`), more on a GPU.
_BALANCE = 8


def _hoisted(jaxpr, fused) -> tuple[set, dict]:
    """The materialised broadcasts (and iotas) that XLA may run as soon as their inputs
    exist, long before their reader: `(indices, bytes arriving at each index)`. A
    broadcast of a small input into a large buffer for a windowed reduction or a
    convolution is scheduled early and held (the CNN's pooling derivative: its 53 MiB
    broadcast lived beside the convolution's output, which the program order frees
    first, so XLA's buffers were 1.9 times the count)."""
    defined: dict = {}
    hoisted, arriving = set(), {}
    for index, eqn in enumerate(jaxpr.eqns):
        if eqn.primitive.name in _FUSED_INTO_ANY:
            stored = [v for v in eqn.outvars if v not in fused]
            if stored:
                inputs = [defined.get(v, -1) for v in eqn.invars if isinstance(v, jex.core.Var)]
                start = max(inputs, default=-1) + 1
                if start < index:
                    hoisted.add(index)
                    arriving[start] = arriving.get(start, 0) + sum(_bytes(v) for v in stored)
        for var in eqn.outvars:
            defined[var] = index
    return hoisted, arriving


def _count(jaxpr) -> Profile:
    """The `Profile` of `jaxpr`.

    - `multiply_adds`, `convolutions`, `element_ops`: a contraction's multiply-adds,
      one operation per output element of anything else, a loop's body times its
      length.
    - `memory_bound`: the multiply-adds of products that do fewer than `_BALANCE` of
      them per entry they read or write (an outer product, a matrix times a vector):
      those run at the rate memory streams, not at the rate of matrix products.
    - `bytes`: the most memory its intermediates hold at once, in program order: each
      one is counted from the equation that makes it to the last one that reads it (an
      equation with a sub-program, such as a loop's body, adds that program's own peak
      while it runs), its inputs excluded (the caller holds them), and the intermediates
      of a chain of elementwise operations left out (`_last_uses`: XLA fuses them).
    - `steps`: the operations that run one after another, each paying the machine's
      latency (`machine_rates`): every equation whose result is stored (a fused one
      runs inside its reader), a loop's body times its length, one branch of a `cond`.

    Checked against the measured time and memory, and XLA's own buffer assignment, by
    the `plan-accuracy` benchmark row."""
    macs, other, convs, steps, bound = 0.0, 0.0, 0.0, 0.0, 0.0
    last, fused = _last_uses(jaxpr)
    hoisted, arriving = _hoisted(jaxpr, fused)
    live, peak = 0, 0
    dying: dict[int, int] = {}
    for index, eqn in enumerate(jaxpr.eqns):
        name = eqn.primitive.name
        out = sum(_size(v) for v in eqn.outvars)
        live += arriving.pop(index, 0)
        made = 0
        for var in eqn.outvars:
            if var in last and var not in fused:  # never read: freed at once
                if index not in hoisted:  # a hoisted one is live since it could run
                    made += _bytes(var)
                dying[last[var]] = dying.get(last[var], 0) + _bytes(var)
        inner = 0
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            product = out * math.prod(lhs[d] for d in contract)
            macs += product
            moved = out + sum(_size(v) for v in eqn.invars)
            if product < _BALANCE * moved:  # an outer product, a matrix-vector one
                bound += product
            steps += 1
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
            conv = out * math.prod(rhs) / max(out_features, 1)
            macs += conv
            convs += conv
            steps += 1
        elif _sub_jaxprs(eqn.params):
            subs = [_count(sub) for sub in _sub_jaxprs(eqn.params)]
            if name == "cond":  # one branch runs
                subs = [max(subs, key=lambda c: (c.work, c.steps))]
            times = eqn.params.get("length", 1) if name == "scan" else 1
            for sub in subs:
                macs += times * sub.multiply_adds
                other += times * sub.element_ops
                convs += times * sub.convolutions
                steps += times * sub.steps
                bound += times * sub.memory_bound
            inner = max(sub.bytes for sub in subs)
            if name not in ("scan", "while"):  # a call: its outputs are the program's own
                inner = max(0, inner - made)
        else:
            other += out
            if any(v not in fused for v in eqn.outvars):
                steps += 1
        stored = sum(_bytes(v) for v in eqn.outvars if v not in fused)
        peak = max(peak, live + made + inner, live + stored)
        live += made - dying.pop(index, 0)
    return Profile(macs, other, int(peak), convs, steps, bound)


def profile(fn: Callable, *args) -> Profile:
    """Trace `fn(*args)` (PyTrees of arrays or `jax.ShapeDtypeStruct`s, and static
    leaves; nothing runs) and count its work, memory and steps (`_count`)."""
    return _count(eqx.filter_make_jaxpr(fn)(*args)[0].jaxpr)


# ## This machine's rates


@dataclasses.dataclass(frozen=True)
class Rates:
    """What this machine does per second, each the best of its measurements so far.

    - `matmul`: multiply-adds of a float32 matrix product, `512 x 512` by `512 x 512`.
    - `convolution`: multiply-adds of a float32 `3 x 3` convolution, 16 channels in and
      out over a batch of 8 images of `32 x 32`.
    - `elementwise`: element operations of a fused multiply and add over `2**23`
      float32 entries: memory-bound, reading 32 MiB and writing 32 MiB of fresh memory,
      as a call's large results and XLA's block of temporaries are (each call
      allocates them anew, and the first write to each page costs a fault).
    - `step`: seconds per step (`_count`) of a `jax.lax.scan` whose body multiplies an
      `8 x 16` carry by a `16 x 16` matrix and takes its `tanh` (an RNN's step at a
      tiny size): the latency every operation run after another pays.
    """

    matmul: float
    convolution: float
    elementwise: float
    step: float

    def best(self, other: "Rates") -> "Rates":
        return Rates(
            max(self.matmul, other.matmul),
            max(self.convolution, other.convolution),
            max(self.elementwise, other.elementwise),
            min(self.step, other.step),
        )


_RATE: dict = {"best": None, "measured": 0, "last": -math.inf}
_REMEASURE_EVERY = 2.0  # seconds between measurements
_MEASUREMENTS = 8  # at most, per process
_SCAN_LENGTH = 1000


@functools.cache
def _probes():
    """The four jitted programs `_measure_rates` times, with their inputs and work."""
    size, images, channels, width, entries = 512, 8, 16, 32, 2**23
    # NumPy inputs: the rates may be asked for while a `jax.jit` traces (a plan made
    # inside the user's jitted function), where a JAX array made here would be a tracer.
    square = np.ones((size, size), np.float32)
    pictures = np.ones((images, channels, width, width), np.float32)
    kernel = np.ones((channels, channels, 3, 3), np.float32)
    vector = np.ones((entries,), np.float32)

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME")

    def loop(c, w):  # each step a small product and an activation, as in an RNN's scan
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), c, length=_SCAN_LENGTH)[0]

    small = np.ones((8, 16), np.float32)
    weight = np.full((16, 16), 0.01, np.float32)

    return (
        (jax.jit(lambda x: x @ x), (square,), size**3),
        (jax.jit(conv), (pictures, kernel), images * channels * width**2 * channels * 9),
        (jax.jit(lambda v: v * 1.0001 + 0.5), (vector,), 2 * entries),
        (jax.jit(loop), (small, weight), profile(loop, small, weight).steps),
    )


def _best_seconds(fn, args, times: int = 5) -> float:
    args = [jax.device_put(arg) for arg in args]  # on the device, once
    jax.block_until_ready(fn(*args))  # compiled, and warm
    best = float("inf")
    for _ in range(times):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return max(best, 1e-9)


def _measure_rates() -> Rates:
    """One measurement of each of `Rates`' figures on the default device: the best of
    5 runs after a warm-up (3 for the element operations; about 0.2 s on 2 CPU cores,
    and the compilation of four small programs, once per process)."""
    (mm, mm_args, mm_work), (cv, cv_args, cv_work), (ew, ew_args, ew_work), (lp, lp_args, n) = (
        _probes()
    )
    with jax.ensure_compile_time_eval():  # run now, even inside a trace
        return Rates(
            matmul=mm_work / _best_seconds(mm, mm_args),
            convolution=cv_work / _best_seconds(cv, cv_args),
            elementwise=ew_work / _best_seconds(ew, ew_args, times=3),
            step=_best_seconds(lp, lp_args) / n,
        )


def machine_rates(*, refresh: bool = False) -> Rates:
    """This machine's `Rates`: the best of every measurement so far in this process.
    They are measured at the first call and, with `refresh` (each new plan that is not
    surely short asks for it), again at most every 2 s, up to 8 times: a measurement
    taken while the machine was busy is superseded by a later, quieter one, so one
    unlucky moment does not skew every later estimate (it did: one GRU plan said 13 s in
    one process and 1.8 s in the next for a call of 0.6-1.0 s)."""
    now = time.monotonic()
    due = refresh and now - _RATE["last"] >= _REMEASURE_EVERY
    if _RATE["measured"] == 0 or (due and _RATE["measured"] < _MEASUREMENTS):
        found = _measure_rates()
        _RATE["best"] = found if _RATE["best"] is None else _RATE["best"].best(found)
        _RATE["measured"] += 1
        _RATE["last"] = time.monotonic()
    return _RATE["best"]


# No machine curvzoo runs on is slower than this: the floor of `surely_faster_than`, so
# that a plan's time need not be measured to know it is short (2 busy CPU cores here
# measure about 2e10-4e10 multiply-adds/s in products, 1e10 in convolutions, 1e9
# element operations/s and 1-3 us a step).
_SLOWEST = Rates(matmul=1e8, convolution=3e7, elementwise=1e7, step=1e-3)


def _seconds(work: Profile, kernel: str, rates: Rates) -> float:
    products = max(0.0, work.multiply_adds - work.convolutions - work.memory_bound)
    compute = (
        products / rates.matmul
        + work.convolutions / rates.convolution
        + (work.element_ops + work.memory_bound) / rates.elementwise
    )
    return compute / EFFICIENCY[kernel] + work.steps * rates.step


def surely_faster_than(work: Profile, kernel: str, seconds: float) -> bool:
    """Whether `work` on `kernel` takes less than `seconds` even at the slowest rates
    any machine has (`_SLOWEST`): then no measurement is needed to know it, and no call
    whose estimate is above `seconds` can be passed over."""
    return _seconds(work, kernel, _SLOWEST) < seconds


# How much faster each kernel runs than the machine's rates alone predict for its
# counted work, calibrated on the benchmark's `plan-accuracy` row (2 CPU cores,
# float32; 34 cases, every kernel configuration the rows time): the geometric mean over
# a kernel's cases of measured against predicted. Above 1 where a kernel's element
# operations mostly stay in cache (the `elementwise` rate is that of fresh memory). With
# these, every case of that row is estimated within 3x of its measured time (its table
# lists them; the recurrent kernel's spread is the widest: 0.7x to 2.2x).
EFFICIENCY = {
    "layered": 1.0,
    "recurrent": 2.5,
    "generic": 2.25,
    "vjp": 3.3,
    "hutchinson": 2.6,
}


def estimated_seconds(work: Profile, kernel: str, *, refresh: bool = False) -> float:
    """The estimated run time of `work` on `kernel`: its matrix products, convolutions
    and element operations at this machine's rates for each (`machine_rates`) over the
    kernel's efficiency (`EFFICIENCY`), plus its steps at the machine's latency."""
    return _seconds(work, kernel, machine_rates(refresh=refresh))
