"""The plan of a curvature call: which kernel, why, what it will cost, and the program
that runs it.

A call is *checked*, *planned*, *run*, and its result *verified*. Planning needs only
what is static about the call (its `Request`: tree structures, shapes, dtypes, static
fields and options), so the run driver caches plans per request: a repeated call with
the same shapes redoes none of the checks that cannot have changed and reuses the
compiled program.

Which kernel: a *structured* kernel where the model has a registered structure
(`_structures.py`) with a kernel for it (`sample_kernel`, registered per structure
type) and the loss's class allows it (its capabilities, worked out once per class in
`curvzoo/_losses.py`); otherwise the general kernel of the quantity: one
Hessian-vector product per parameter for the Hessian, one vector-Jacobian product per
output column and sample for the GGN family, Hessian-vector products per probe for
Hutchinson. For the recurrent kernel `method="auto"` compares the two estimates.
"""

import dataclasses
import functools
import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from .._estimators import AbstractEstimator, ESTIMATORS, Exact
from .._kernels._lanes import even_chunks
from .._kernels._layered import LayeredKernel, trainable_ops
from .._kernels._recurrent import RecurrentKernel
from .._kernels._samples import AbstractSampleKernel
from .._kernels._vjp import VJPKernel
from .._losses import AbstractLoss, capabilities
from .._run._checks import check_batch, explained
from .._run._devices import place_result
from .._run._memory import DEFAULT_MEMORY_BUDGET
from .._run._progress import INTERVAL as REPORT_INTERVAL
from ._costs import estimated_seconds, machine_rates, Profile, surely_faster_than
from ._routes import bind, Context, GenericRoute, HutchinsonRoute, SampleRoute
from ._signature import cached_hash, check_scalar, Layout, TracedLoss, WithArgs
from ._structures import describe, Layered, Recurrent, Unsupported


# What each quantity is and which function computes it, from its estimator's class.
QUANTITIES = {cls.quantity: cls.title for cls in ESTIMATORS}
FUNCTIONS = {cls.quantity: cls.function for cls in ESTIMATORS}
FUNCTIONS["hutchinson"] = (
    "`hutchinson_diagonal` with `control_variate='ggn'` "
    "(`curvzoo.Hutchinson(control_variate=curvzoo.GGN())`)"
)
KERNELS = {
    "layered": "structured, layered (Hessian backpropagation)",
    "recurrent": "structured, recurrent",
    "generic": "generic (one Hessian-vector product per parameter)",
    "vjp": "vector-Jacobian products (one per output column and sample)",
    "hutchinson": "Hutchinson (one Hessian-vector product per probe)",
}


@dataclasses.dataclass(frozen=True)
class Options:
    """A call's options, already checked (`curvzoo/_api/_options.py`)."""

    method: str = "auto"
    per_sample: bool = False
    chunk_size: int | None = None
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    check_finite: bool = True
    progress: bool = False
    mesh: Mesh | None = None
    estimator: AbstractEstimator = Exact()

    __hash__ = cached_hash  # hashed by each cache a call looks in


@dataclasses.dataclass(frozen=True)
class Request:
    """Everything static about a call, and so the key of its plan (the estimator, with
    its settings, is one of the options)."""

    options: Options
    model: Layout
    trained: tuple  # one bool per leaf of the model
    batch: Layout
    loss: Layout
    args: Layout | None
    key: tuple | None  # the PRNG key's (shape, dtype), for the stochastic quantities
    registry: int = 0  # the structure registry's version: a new registration, a new plan

    __hash__ = cached_hash

    @property
    def quantity(self) -> str:
        return type(self.options.estimator).quantity


# ## A structured kernel for each structure


@functools.singledispatch
def sample_kernel(found, quantity: str, trained_tree) -> AbstractSampleKernel:
    """The structured kernel that computes `quantity` (`"hessian"`, `"ggn"` or
    `"gradients"`) for a model of structure `found` (`trained_tree`: bools shaped like
    the model), or `Unsupported`. Registered per structure type: a new structure and its
    kernel are one registration."""
    raise Unsupported(f"no structured kernel for {type(found).__name__}")


@sample_kernel.register(Layered)
def _layered(found: Layered, quantity: str, trained_tree) -> AbstractSampleKernel:
    return LayeredKernel(found.ops, trainable_ops(found.ops, trained_tree), quantity)


@sample_kernel.register(Recurrent)
def _recurrent(found: Recurrent, quantity: str, trained_tree) -> AbstractSampleKernel:
    del trained_tree
    if quantity not in ("hessian", "ggn"):
        raise Unsupported(
            "the zoo RNN has a structured kernel for the Hessian and the GGN; squared "
            "gradients take one vector-Jacobian product per sample and draw with "
            "`method='generic'`, which `'auto'` picks",
            whole=True,
        )
    return RecurrentKernel(found.chain, quantity)


# ## The plan


@dataclasses.dataclass(frozen=True, repr=False)
class Plan:
    """How a curvature call will run, before it runs: what [`curvzoo.plan`][] returns.

    **Fields:**

    - `quantity`: `"hessian"`, `"ggn"`, `"empirical_fisher"`, `"fisher"` or
        `"hutchinson"`; `estimator`: the estimator object, with its settings
        (`curvzoo.Exact()`, `curvzoo.Hutchinson(num_probes=16)`, ...).
    - `kernel`: `"layered"` or `"recurrent"` (the structured kernels), `"generic"` (one
        Hessian-vector product per parameter), `"vjp"` (vector-Jacobian products, the
        GGN family's general kernel) or `"hutchinson"`.
    - `reason`: why no faster kernel applies, naming the part of the model or the loss
        (as the error of `method="structured"` would), or `None`.
    - `model`: the model's type (`curvzoo.MLP`, `equinox.nn.MLP`, ...); `num_params`: its
        trained entries `P`;
        `batch_size`: `N`.
    - `lanes`: what the work is chunked over (`"samples"`, `"basis vectors"` or
        `"probes"`): `num_chunks` chunks of `chunk` lanes.
    - `multiply_adds` and `element_ops`: the estimated matrix-product multiply-adds and
        other arithmetic, counted on the kernel's traced program.
    - `memory_bytes`: the estimated peak of the memory the call allocates (its inputs
        exist before it): `shared_bytes` for the result and what every
        chunk uses (the running sums, a linearisation of the whole batch), which no
        budget bounds, plus one chunk's working set, which `memory_budget` bounds (it
        sets the chunk; a single lane above it, or a `chunk_size`, can exceed it). The
        working set of a program is counted as the most its intermediates hold at once
        in program order (`benchmarks`' `plan-accuracy` row checks it against the
        measured growth).
    - `work`: the counted work as a whole (`_costs.Profile`: also the convolutions'
        share of the multiply-adds and the steps run one after another).
    - `seconds` (a property): the estimated run time, from this machine's measured
        rates (matrix products, convolutions, element operations, and the latency of
        a step) and the kernel's efficiency, calibrated on the benchmark's
        `plan-accuracy` row (`_costs.estimated_seconds`).
    """

    quantity: str
    kernel: str
    reason: str | None
    model: str
    num_params: int
    batch_size: int
    lanes: str
    chunk: int
    num_chunks: int
    multiply_adds: float
    element_ops: float
    memory_bytes: int
    memory_budget: int
    shared_bytes: int = 0
    extra: str | None = None
    progress_every: int = 0
    estimator: AbstractEstimator | None = None
    work: Profile = dataclasses.field(default=None, compare=False, repr=False)
    route: object = dataclasses.field(default=None, compare=False)
    prediction_shape: tuple | None = dataclasses.field(default=None, compare=False)

    @property
    def seconds(self) -> float:
        """The estimated run time in seconds, compilation excluded."""
        return estimated_seconds(self.work, self.kernel)

    def __repr__(self) -> str:
        kernel = KERNELS[self.kernel]
        if self.kernel == "generic" and self.lanes == "basis vectors" and self.route.per_sample:
            kernel += ", for each sample"
        lines = [
            f"Plan({QUANTITIES[self.quantity]} of {self.model}: P = {self.num_params:,}, "
            f"N = {self.batch_size:,}",
            f"  kernel   {kernel}",
        ]
        if self.extra:
            lines.append(f"           plus {self.extra}")
        if self.reason:
            lines.append(f"  because  {self.reason}")
        lines += [
            f"  cost     {self.multiply_adds:.3g} multiply-adds and {self.element_ops:.3g} "
            f"other operations: about {duration(self.seconds)} on this machine",
            f"  chunks   {self.num_chunks:,} of {self.chunk:,} {self.lanes}",
            f"  memory   {self.memory_text()}",
            ")",
        ]
        return "\n".join(lines)

    def memory_text(self) -> str:
        """The memory estimate as one statement: the whole, what `memory_budget` bounds
        (one chunk's working set) and what it cannot (the result and what every chunk
        shares), and whether the chunk is within the budget."""
        chunk_bytes = self.memory_bytes - self.shared_bytes
        budget = f"the {_mebibytes(self.memory_budget)} `memory_budget`"
        one = _ONE_LANE.get(self.lanes, self.lanes)
        lanes = f"{self.chunk:,} {self.lanes}" if self.chunk > 1 else one
        if chunk_bytes <= self.memory_budget:
            bound = f"{budget} bounds it"
        elif self.chunk == 1:
            bound = f"above {budget}: {one} alone needs more"
        else:
            bound = f"above {budget}: `chunk_size` set the chunk"
        return (
            f"about {_mebibytes(self.memory_bytes)} at the peak: "
            f"{_mebibytes(chunk_bytes)} for a chunk of {lanes} ({bound}) and "
            f"{_mebibytes(self.shared_bytes)} for the result and what the chunks share "
            "(no budget bounds it)"
        )


_ONE_LANE = {"samples": "one sample", "basis vectors": "one basis vector", "probes": "one probe"}


def duration(seconds: float) -> str:
    """A duration for people: `3.2 ms`, `980 ms`, `14 s`, `2.5 h`."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{_digits(seconds * 1e3)} ms"
    if seconds < 120:
        return f"{_digits(seconds)} s"
    if seconds < 7200:
        return f"{_digits(seconds / 60)} min"
    return f"{_digits(seconds / 3600)} h"


def _digits(value: float) -> str:
    """At least two significant digits, never in exponent form: `3.2`, `14`, `980`."""
    return f"{value:.2g}" if value < 10 else f"{value:.0f}"


def _mebibytes(size: int) -> str:
    if size < 999.5 * 2**10:  # what `.3g` prints below 1,000
        return f"{size / 2**10:.3g} KiB"
    return f"{size / 2**20:.3g} MiB"


# ## Planning


def _abstract_arrays(layout: Layout) -> list:
    return [jax.ShapeDtypeStruct(s, d, weak_type=w) for s, d, w in layout.avals]


def check_loss_output(loss, model, batch, args) -> tuple | None:
    """Trace the loss (no compute): it must return a real scalar, and a curvzoo loss's
    targets must fit its predictions. **Returns:** the shape of the batch of
    predictions for a curvzoo loss, else `None`."""
    if isinstance(loss, TracedLoss):
        return None  # its output was checked when it was traced
    prediction_shape = None
    try:
        if isinstance(loss, AbstractLoss):
            prediction_shape = loss.prediction_shape(model, batch)
        out = eqx.filter_eval_shape(lambda l, m, b, a: bind(l, a)(m, b), loss, model, batch, args)
        check_scalar(out)
    except NameError as error:
        clearer = explained(error)
        if clearer is None:
            raise
        raise clearer from error
    except TypeError as error:
        if "required positional argument" not in str(error):
            raise
        raise TypeError(
            f"calling the model (or the loss) failed: {error}. A model that takes more than "
            "one input, such as an `eqx.nn.State` for `BatchNorm`, gets it with `args=` "
            "(a curvzoo loss then calls `model(x, args)`; put `BatchNorm` in inference mode "
            "with `eqx.nn.inference_mode(model)`); a callable loss gets "
            "`loss(model, batch, args)`."
        ) from error
    return prediction_shape


def _require_per_sample_form(loss, quantity: str) -> None:
    """The GGN family works from `scale * sum_n per_sample(predict(model, x)_n, y_n)`:
    `loss` must be a curvzoo loss whose `__call__` computes that, with (for the GGN) a
    loss-Hessian factor and (for the Fisher) a `sample_targets` that belong to its
    `per_sample`."""
    name = FUNCTIONS[quantity]
    if not isinstance(loss, AbstractLoss):
        kind = "function" if isinstance(loss, TracedLoss) else type(loss).__name__
        raise TypeError(
            f"`loss` for {name} must be a curvzoo loss (`curvzoo.losses.*` or a subclass of "
            "`curvzoo.losses.AbstractLoss`), which exposes its per-sample form; got a "
            f"custom callable of type {kind}."
        )
    found = capabilities(loss)
    if found.own_call is not None:
        raise ValueError(found.own_call.format(name=name))
    if quantity in ("ggn", "hutchinson") and found.factor is not None:
        raise ValueError(f"{found.factor}; override `output_hessian_factor` too, to use {name}.")
    if quantity == "fisher" and found.sampler is not None:
        if "{name}" in found.sampler:
            raise TypeError(found.sampler.format(name=name))
        raise ValueError(f"{found.sampler}; override `sample_targets` too, to use {name}.")


def _structured(ctx: Context, model, kernel_quantity: str, trained_tree):
    """`(SampleRoute, None)` for the structured kernel, or `(None, reason)`."""
    loss = ctx.loss
    if not isinstance(loss, AbstractLoss):
        return None, (
            "`loss` is a custom callable; the structured kernel needs a curvzoo loss "
            "(`curvzoo.losses.*`), which exposes its per-sample form"
        )
    if ctx.args is not None:
        return None, "`args` is passed to the loss, which the structured kernels do not call"
    found = capabilities(loss)
    reason = found.structured[kernel_quantity]
    if reason is not None:
        return None, reason
    example = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), ctx.batch[0])
    try:
        structure = describe(model, example)
        if isinstance(structure, Recurrent) and found.stepwise is not None:
            if kernel_quantity == "hessian":
                return None, found.stepwise
        kernel = sample_kernel(structure, kernel_quantity, trained_tree)
    except Unsupported as error:
        if error.whole:
            return None, str(error)
        return None, f"`model` has a part the structured kernel does not support: {error}"
    name = "recurrent" if isinstance(kernel, RecurrentKernel) else "layered"
    return SampleRoute(kernel, name), None


def _choose(ctx: Context, model, trained_tree):
    """`(route, reason)`: the kernel that `method` picks, and why no faster one applies."""
    quantity, method = ctx.quantity, ctx.options.method
    kernel_quantity = {"empirical_fisher": "gradients", "fisher": "gradients"}.get(
        quantity, quantity
    )
    if quantity == "hutchinson":
        ggn = None
        if ctx.options.estimator.subtracts_ggn:  # the GGN diagonal as `ggn_diagonal` takes it
            general = SampleRoute(VJPKernel("ggn"), "vjp")
            ggn_ctx = dataclasses.replace(ctx, quantity="ggn")
            ggn, _ = _pick(ggn_ctx, model, trained_tree, "ggn", general, "auto")
        return HutchinsonRoute(ggn), None
    if quantity == "hessian":
        general = GenericRoute(ctx.options.per_sample)
    else:
        general = SampleRoute(VJPKernel(kernel_quantity), "vjp")
    return _pick(ctx, model, trained_tree, kernel_quantity, general, method)


def _pick(ctx: Context, model, trained_tree, kernel_quantity: str, general, method: str):
    """`(route, reason)` for `kernel_quantity`: the structured kernel where it applies
    (for a recurrent one, where its estimated time is also below `general`'s), else the
    `general` route; `method` forces either."""
    if method == "generic":
        return general, None
    route, reason = _structured(ctx, model, kernel_quantity, trained_tree)
    if route is None:
        if method == "structured":
            raise ValueError(
                f"`method='structured'` cannot be used here: {reason}. Use `method='auto'` "
                "or `method='generic'`."
            )
        return general, reason
    if route.name == "recurrent" and method == "auto":
        mine, theirs = (_work(_cost(r, ctx), ctx.options) for r in (route, general))
        if estimated_seconds(mine, "recurrent") > estimated_seconds(theirs, general.name):
            return general, (
                f"the recurrent kernel's estimated time here is above the {KERNELS[general.name]}"
                f" kernel's ({mine.work:.3g} against {theirs.work:.3g} operations)"
            )
    return route, None


def _type_name(model) -> str:
    """`curvzoo.MLP`, `equinox.nn.MLP`, `MyModel`: the public path of the model's type
    (its module's path up to the first private part)."""
    cls = type(model)
    public = []
    for part in cls.__module__.split("."):
        if part.startswith("_"):
            break
        public.append(part)
    return ".".join(public + [cls.__qualname__]) if public else cls.__qualname__


# The costs worked out while one plan is built (its kernel choice traces the chosen
# route's cost; the plan reuses it), keyed by the route and context objects, which are
# kept alive beside it.
_COSTS: dict = {}


def _cost(route, ctx: Context):
    key = (id(route), id(ctx))
    if key not in _COSTS:
        _COSTS[key] = (route, ctx, route.cost(ctx))
    return _COSTS[key][2]


def _work(cost, options) -> Profile:
    """`cost`'s whole work in about the chunks `memory_budget` (or `chunk_size`) makes,
    from a lane's traced work (no chunk traced at its size: this only compares two
    kernels, and the plan traces the chosen one's chunk)."""
    budget = options.memory_budget
    room = budget - cost.chunk_fixed.bytes
    chunk = options.chunk_size or max(1, min(cost.count, room // max(cost.lane.bytes, 1)))
    extra = 1
    if cost.extra is not None:
        extra = max(1, min(cost.extra.count, budget // max(cost.extra.lane.bytes, 1)))
    return cost.total(min(chunk, cost.count), extra, exact=False)


def _chunk(cost, requested: int | None, budget: int) -> int:
    """The chunk of lanes: `requested` (`chunk_size`) where given; else the most lanes
    whose working set fits `budget`, from a lane's working set, and checked on
    the chunk as it will run (`Cost.chunk_bytes`), smaller where that is above it."""
    if requested is not None:
        return max(1, min(requested, cost.count))
    room = budget - cost.chunk_fixed.bytes
    chunk = max(1, min(cost.count, room // max(cost.lane.bytes, 1)))
    for _ in range(4):
        used = cost.chunk_bytes(chunk)
        if chunk == 1 or used <= budget:
            break
        chunk = max(1, min(chunk - 1, math.floor(chunk * budget / used)))
    return chunk


# Hutchinson's probes per chunk are also bounded by their work: each probe is a
# Hessian-vector product over the whole batch, whose matrix products are already as large
# as the batch makes them, so more probes per chunk only grow the working set past the
# caches. Measured (2 CPU cores, 16 probes): `mlp2`, 1.1e8 operations per probe, 45 ms in
# chunks of 4, 58 ms of 8, 72 ms of 16; the GRU row with the control variate, 38 ms in
# chunks of 4, 45 ms of 16. A cheap probe (a small model) still runs many at once.
_PROBE_CHUNK_WORK = 5e8


def _probe_chunk(num_probes: int, probe_work: float) -> int:
    """The chunk of probes for `_PROBE_CHUNK_WORK`: of the sizes from that bound down to
    half of it, the one that pads the fewest probes (16 probes under a bound of 3 run
    as 8 chunks of 2, not 6 of 3 with 2 wasted: 51 ms against 61 ms on `mlp2`)."""
    bound = min(num_probes, max(1, math.ceil(_PROBE_CHUNK_WORK / max(probe_work, 1))))
    sizes = range(bound, max(1, bound // 2) - 1, -1)
    return min(sizes, key=lambda size: -(-num_probes // size) * size)


def build_plan(request: Request) -> Plan:
    """Check what shapes alone can show, choose the kernel, and estimate its cost.
    Nothing runs: the inputs are abstract (`jax.ShapeDtypeStruct`)."""
    options = request.options
    model = request.model.abstract()
    params, static = request.model.split(_abstract_arrays(request.model), request.trained)
    trained_tree = jax.tree.unflatten(request.model.treedef, list(request.trained))
    batch = request.batch.abstract()
    loss = request.loss.abstract()
    args = None if request.args is None else request.args.abstract()
    batch_size = check_batch(batch)
    prediction_shape = check_loss_output(loss, model, batch, args)
    quantity = request.quantity
    if options.estimator.needs_per_sample_form:
        _require_per_sample_form(loss, quantity)
    key = None if request.key is None else jax.ShapeDtypeStruct(*request.key)
    ctx = Context(
        quantity, params, static, loss, batch, args, key, batch_size, prediction_shape, options
    )
    if quantity == "fisher":
        _check_draws(ctx)

    _COSTS.clear()
    try:
        route, reason = _choose(ctx, model, trained_tree)
        cost = _cost(route, ctx)
    finally:
        _COSTS.clear()
    budget = options.memory_budget
    chunk = _chunk(cost, options.chunk_size, budget)
    if isinstance(route, HutchinsonRoute) and options.chunk_size is None:
        chunk = min(chunk, _probe_chunk(cost.count, cost.lane.work))
    multiple = 1 if options.mesh is None else options.mesh.size
    chunk, num_chunks = even_chunks(cost.count, chunk, multiple)
    ggn_chunk = 1
    if isinstance(route, HutchinsonRoute) and route.ggn is not None:
        ggn_chunk = _chunk(cost.extra, None, budget)
        route = dataclasses.replace(route, ggn_chunk=ggn_chunk)
    memory = cost.memory(chunk, ggn_chunk)
    work = cost.total(chunk, ggn_chunk, num_chunks)
    if not surely_faster_than(work, route.name, 1.0):  # a rate worth refining
        machine_rates(refresh=True)
    progress_every = 0
    if options.progress:  # a report every `REPORT_INTERVAL` seconds of estimated run time
        per_chunk = estimated_seconds(work, route.name) / num_chunks
        progress_every = max(1, min(num_chunks, math.ceil(REPORT_INTERVAL / max(per_chunk, 1e-9))))
    return Plan(
        quantity=quantity,
        kernel=route.name,
        reason=reason,
        model=_type_name(model.model if isinstance(model, WithArgs) else model),
        num_params=sum(math.prod(x.shape) for x in jax.tree.leaves(params)),
        batch_size=batch_size,
        lanes=cost.lanes,
        chunk=chunk,
        num_chunks=num_chunks,
        multiply_adds=work.multiply_adds,
        element_ops=work.element_ops,
        work=work,
        memory_bytes=int(memory),
        memory_budget=budget,
        shared_bytes=int(cost.shared.bytes),
        extra=cost.extra_text,
        progress_every=progress_every,
        estimator=options.estimator,
        route=route,
        prediction_shape=prediction_shape,
    )


def _check_draws(ctx: Context) -> None:
    """`loss.sample_targets` must return one sample's targets."""
    targets = ctx.batch[1]
    model = eqx.combine(ctx.params, ctx.static)

    def draw(loss, m, x):
        prediction = loss.predict(m, jax.tree.map(lambda v: v[:1], x))[0]
        return loss.sample_targets(jax.random.key(0), prediction)

    drawn = eqx.filter_eval_shape(draw, ctx.loss, model, ctx.batch[0])
    expected = tuple(targets.shape[1:])
    if tuple(drawn.shape) != expected:
        raise ValueError(
            f"`loss.sample_targets` must return one sample's targets, of shape {expected}; "
            f"it returned shape {tuple(drawn.shape)}."
        )


def all_finite(tree) -> jax.Array:
    """`False` where some floating-point entry of `tree` may be NaN or inf: one boolean.

    Computed as `isfinite(sum of each leaf's sum of squares)`, one dot product per leaf
    (in at least float32): a NaN or an infinite entry makes it NaN or `inf` (an
    infinity squares to `inf`, which no other square can cancel). It also overflows on
    large finite entries (beyond about 1e19 in float32), so `False` is only a reason to
    read the entries (`raise_non_finite` does, and raises only for a real NaN or inf).
    On 2 CPU cores, for `mlp2`'s 269,322 entries, about 50 us against 95 us for
    `isfinite(sum(leaf * 0))` (XLA's CPU reductions run on one core; its dot products do
    not) and 80 us for NumPy on the host."""
    sums = []
    for leaf in jax.tree.leaves(tree):
        if jnp.issubdtype(leaf.dtype, jnp.inexact) and leaf.size:
            flat = leaf.reshape(-1).astype(jnp.promote_types(leaf.dtype, jnp.float32))
            sums.append(jnp.vdot(flat, flat))
    return jnp.isfinite(sum(sums)) if sums else jnp.asarray(True)


def runner(request: Request, plan: Plan) -> Callable:
    """The traced function that runs `plan` on one call's arrays: `run(model_arrays,
    batch_arrays, loss_arrays, args_arrays, key) -> (result, finite | None)`, with
    `finite` `all_finite(result)` (with `check_finite`), to be `jax.jit`-compiled once
    per plan."""
    route, options = plan.route, request.options

    def run(model_arrays, batch_arrays, loss_arrays, args_arrays, key):
        params, static = request.model.split(model_arrays, request.trained)
        batch = request.batch.rebuild(batch_arrays)
        loss = request.loss.rebuild(loss_arrays)
        args = None if request.args is None else request.args.rebuild(args_arrays)
        ctx = Context(
            request.quantity, params, static, loss, batch, args, key, plan.batch_size,
            plan.prediction_shape, options, plan.progress_every,
        )  # fmt: skip
        result = route.run(ctx, plan.chunk)
        result = place_result(result, options.mesh, per_sample=options.per_sample)
        return result, (all_finite(result) if options.check_finite else None)

    return run
