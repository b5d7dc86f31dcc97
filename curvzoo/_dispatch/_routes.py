"""Routes: how each kind of kernel is costed and run for one call.

A route knows its kernel's lanes (samples, basis vectors or probes), profiles one lane
and the part the lanes share (`_costs.profile`, on abstract inputs: nothing runs), and
runs the kernel on a call's (traced) inputs with the chunk the plan chose. The plan
(`_plan.py`) picks the route; the run driver (`curvzoo/_run/_execute.py`) compiles it.
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from .._kernels._generic import (
    generic_hessian_diagonal,
    generic_per_sample_hessian_diagonal,
    hessian_vector_product,
)
from .._kernels._hutchinson import hutchinson_kernel, probe_product
from .._kernels._precision import accumulation_dtype
from .._kernels._samples import AbstractSampleKernel, chunk_function, run_sample_kernel
from .._losses import batch_parts, reduction_factor
from ._costs import Profile, profile


@dataclasses.dataclass(frozen=True)
class Context:
    """One call's inputs (abstract while planning, traced while running) and the
    static facts the plan found."""

    quantity: str
    params: Any
    static: Any
    loss: Any
    batch: Any
    args: Any
    key: Any
    batch_size: int
    prediction_shape: tuple | None
    options: Any
    progress: int = 0  # report every `progress`-th chunk (0: never), set by the plan

    def bound_loss(self):
        """The loss as `loss(model, batch)`, with `args` bound where given."""
        return bind(self.loss, self.args)

    def lengths(self):
        """The batch's lengths (a triple `(inputs, targets, lengths)`), or `None`."""
        return batch_parts(self.batch)[2]

    def scale(self, per_sample: bool):
        """The loss's reduction factor for the batch, or with `per_sample` for each
        sample alone (`(N,)` where lengths make them differ): on traced inputs only."""
        return reduction_factor(
            self.loss, self.batch_size, self.prediction_shape[1:], self.lengths(), per_sample
        )


def bind(loss, args):
    """`loss` as `loss(model, batch)`, with `args` bound where given."""
    if args is None:
        return loss
    return lambda model, batch: loss(model, batch, args)


@dataclasses.dataclass(frozen=True)
class Cost:
    """A kernel's cost in parts: `shared` once, and `count` lanes run in chunks (a
    chunk's lanes side by side, `jax.vmap`ped), then a second kernel (`extra`: the
    control variate's exact GGN, in chunks of its own).

    The memory of a chunk of `n` lanes is about `chunk_fixed.bytes + n * lane.bytes`
    (from one traced chunk, or chunks of one and two lanes: it chooses the chunk). Its
    work is read off the chunk as it will run, `chunk_work(n)` (a product's rate depends
    on its size: a chunk of one sample's pieces contracts over one entry, one of 128
    over 128), or, where no
    `chunk_work` is given, `chunk_fixed + n * lane` with the steps of one lane."""

    shared: Profile  # done once
    lane: Profile  # done per lane
    lanes: str  # what a lane is
    count: int  # how many lanes
    chunk_fixed: Profile = Profile(0.0, 0.0, 0)  # done per chunk, whatever its size
    extra: "Cost | None" = None  # a second part (the control variate's exact GGN)
    extra_text: str | None = None
    extra_beside: int = 0  # bytes the first part leaves live while the second runs
    chunk_work: Callable[[int], Profile] | None = dataclasses.field(default=None, compare=False)

    def per_chunk(self, chunk: int, exact: bool = True) -> Profile:
        """The work of one chunk of `chunk` lanes (traced as it will run where
        `chunk_work` is given and `exact`, else from a lane's)."""
        if self.chunk_work is not None and exact:
            return self.chunk_work(chunk)
        lanes = dataclasses.replace(self.lane * chunk, steps=self.lane.steps)
        return self.chunk_fixed + lanes

    def total(
        self, chunk: int, extra_chunk: int = 1, num_chunks: int | None = None, exact: bool = True
    ) -> Profile:
        """The whole work in `num_chunks` chunks of `chunk` lanes (by default as many as
        `count` needs: the kernels pad the last), and the second part's in chunks of
        `extra_chunk`."""
        if num_chunks is None:
            num_chunks = -(-self.count // chunk)
        work = self.shared + self.per_chunk(chunk, exact) * num_chunks
        if self.extra is None:
            return work
        return work + self.extra.total(extra_chunk, exact=exact)

    def chunk_bytes(self, chunk: int) -> int:
        """One chunk's working set: counted on the chunk as it will run where
        `chunk_work` is given, else `chunk_fixed` and `chunk` lanes."""
        if self.chunk_work is not None:
            return self.chunk_work(chunk).bytes
        return self.chunk_fixed.bytes + chunk * self.lane.bytes

    def memory(self, chunk: int, extra_chunk: int = 1) -> int:
        """The peak bytes for chunks of `chunk` lanes: the shared part and one chunk's
        working set (counted on the chunk as it will run, where `chunk_work` is given),
        or the second part's peak in chunks of `extra_chunk` beside the
        first part's results (`extra_beside`), where that is larger (it runs after the
        chunks)."""
        own = self.shared.bytes + self.chunk_bytes(chunk)
        if self.extra is None:
            return own
        return max(own, self.extra_beside + self.extra.memory(extra_chunk))


def _abstract_leading(tree, size: int):
    """`tree`'s arrays as `jax.ShapeDtypeStruct`s with a leading axis of `size`."""
    return jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct((size, *leaf.shape[1:]), leaf.dtype), tree
    )


def _tree_bytes(tree, at_least=None) -> int:
    """The bytes of `tree`'s arrays (or `jax.ShapeDtypeStruct`s); with `at_least`, of
    their floating-point ones promoted to that dtype (sums kept in float32)."""

    def itemsize(dtype):
        if at_least is not None and jnp.issubdtype(dtype, jnp.floating):
            dtype = jnp.promote_types(dtype, at_least)
        return jnp.dtype(dtype).itemsize

    return sum(
        math.prod(leaf.shape) * itemsize(leaf.dtype)
        for leaf in jax.tree.leaves(tree)
        if hasattr(leaf, "shape")
    )


def _target_draws(ctx: Context):
    """`(N, S, *target)` targets drawn from the model's predictions (the Fisher)."""
    model = eqx.combine(ctx.params, ctx.static)
    inputs = ctx.batch[0]
    predictions = jax.lax.stop_gradient(ctx.loss.predictions(model, inputs, ctx.lengths()))

    def draws(sample_key, prediction):
        keys = jax.random.split(sample_key, ctx.options.estimator.num_samples)
        return jax.vmap(lambda k: ctx.loss.sample_targets(k, prediction))(keys)

    return jax.vmap(draws)(jax.random.split(ctx.key, predictions.shape[0]), predictions)


@dataclasses.dataclass(frozen=True)
class SampleRoute:
    """A sample-wise kernel (layered, recurrent, or vector-Jacobian products)."""

    kernel: AbstractSampleKernel
    name: str  # "layered", "recurrent" or "vjp"

    def samples(self, ctx: Context):
        """What the kernel sums over: the batch, or for the Fishers the inputs with the
        targets stacked on a new axis (the true one, or the draws)."""
        rest = tuple(ctx.batch[2:])  # the lengths, if any
        if ctx.quantity == "empirical_fisher":
            inputs, targets = ctx.batch[0], ctx.batch[1]
            if isinstance(targets, jax.ShapeDtypeStruct):  # planning: shapes only
                shape = (targets.shape[0], 1, *targets.shape[1:])
                return (inputs, jax.ShapeDtypeStruct(shape, targets.dtype), *rest)
            return (inputs, jnp.asarray(targets)[:, None], *rest)
        if ctx.quantity == "fisher":
            if isinstance(ctx.key, jax.ShapeDtypeStruct):  # planning: shapes only
                targets = ctx.batch[1]
                draws = jax.ShapeDtypeStruct(
                    (targets.shape[0], ctx.options.estimator.num_samples, *targets.shape[1:]),
                    _draw_dtype(ctx),
                )
                return (ctx.batch[0], draws, *rest)
            return (ctx.batch[0], _target_draws(ctx), *rest)
        return ctx.batch

    def cost(self, ctx: Context) -> Cost:
        # One trace where it can: the chunk the plan will most likely run (the whole
        # batch, or `chunk_size`'s), from which a lane is that chunk's share. Where that
        # chunk is above the budget, chunks of one and two samples: what each sample adds
        # (its pieces, its share of the contraction) is their difference, and the rest
        # is each chunk's own, whatever its size (what depends on the parameters only,
        # such as a squared weight matrix). Tracing costs the same at any chunk size.
        keep = ctx.options.per_sample
        samples = self.samples(ctx)
        dtype = accumulation_dtype(jnp.result_type(*jax.tree.leaves(ctx.params)))
        work = {}

        def chunk_work(size):
            if size not in work:
                lanes = _abstract_leading(samples, size)
                mask = jax.ShapeDtypeStruct((size,), dtype)

                def run(params, static, loss, lanes, mask):
                    fn = chunk_function(
                        self.kernel, params, static, loss, scale=1.0, keep_samples=keep
                    )
                    return fn(lanes, mask)

                work[size] = profile(run, ctx.params, ctx.static, ctx.loss, lanes, mask)
            return work[size]

        requested = ctx.options.chunk_size
        likely = min(requested or ctx.batch_size, ctx.batch_size)
        first = chunk_work(likely)
        if requested is not None or first.bytes <= ctx.options.memory_budget:
            lane = dataclasses.replace(first * (1 / likely), bytes=first.bytes // likely)
            lane = dataclasses.replace(lane, steps=first.steps)
            fixed = Profile(0.0, 0.0, 0)
        else:
            one, two = chunk_work(1), chunk_work(2)
            lane = two.minus(one)
            fixed = one.minus(lane)
        # Beside the chunks: the running sums (at least float32) and the result, `N`
        # of them with `per_sample` (the batch and the parameters exist before the call)
        results = ctx.batch_size if ctx.options.per_sample else 1
        sums = _tree_bytes(ctx.params, at_least=jnp.float32)
        # ... and each result written once more (stacked, cast), an operation per entry
        entries = results * sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(ctx.params))
        shared = Profile(0.0, float(entries), sums + results * _tree_bytes(ctx.params))
        return Cost(
            shared, lane, "samples", ctx.batch_size, chunk_fixed=fixed, chunk_work=chunk_work
        )

    def run(self, ctx: Context, chunk: int):
        keep = ctx.options.per_sample
        return run_sample_kernel(
            self.kernel, ctx.params, ctx.static, ctx.loss, self.samples(ctx),
            scale=ctx.scale(keep), chunk=chunk, keep_samples=keep,
            progress=ctx.progress, mesh=ctx.options.mesh,
        )  # fmt: skip


def _draw_dtype(ctx: Context):
    model = eqx.combine(ctx.params, ctx.static)
    lengths = ctx.lengths()

    def draw(loss, m, x, lengths):
        first = jax.tree.map(lambda v: v[:1], (x, lengths))
        return loss.sample_targets(jax.random.key(0), loss.predictions(m, *first)[0])

    shapes = eqx.filter_eval_shape(draw, ctx.loss, model, ctx.batch[0], lengths)
    return shapes.dtype


def _vector_chunks(build, ctx: Context, batch, base: Profile, times: int = 1):
    """`Cost.chunk_work` for a route whose lane is a product with one flat vector:
    `build(params, static, loss, batch, args) -> (flat, product)`, the product
    `jax.vmap`ped over `n` vectors, traced whole less the building (`base`), `times`
    over (once per sample with `per_sample`)."""
    found: dict = {}

    def work(n):
        if n not in found:

            def whole(params, static, loss, batch, args):
                flat, product = build(params, static, loss, batch, args)
                return jax.vmap(product)(jnp.zeros((n, flat.size), flat.dtype))

            traced = profile(whole, ctx.params, ctx.static, ctx.loss, batch, ctx.args)
            found[n] = traced.minus(base) * times
        return found[n]

    return work


@dataclasses.dataclass(frozen=True)
class GenericRoute:
    """One Hessian-vector product per parameter (per sample with `per_sample`)."""

    per_sample: bool
    name: str = "generic"

    def _batch(self, ctx: Context):
        if not self.per_sample:
            return ctx.batch
        return jax.tree.map(
            lambda leaf: (
                jax.ShapeDtypeStruct((1, *leaf.shape[1:]), leaf.dtype)
                if hasattr(leaf, "shape")
                else leaf
            ),
            ctx.batch,
        )

    def cost(self, ctx: Context) -> Cost:
        found = {}

        def build(params, static, loss, batch, args):
            flat, _, hvp = hessian_vector_product(params, static, bind(loss, args), batch)
            return flat, lambda v: hvp(v)[0]

        def shared(params, static, loss, batch, args):
            flat, product = build(params, static, loss, batch, args)
            found["lane"] = profile(product, flat)
            return flat

        base = profile(shared, ctx.params, ctx.static, ctx.loss, self._batch(ctx), ctx.args)
        lane = found["lane"]
        times = ctx.batch_size if self.per_sample else 1
        chunks = _vector_chunks(build, ctx, self._batch(ctx), base, times)
        count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(ctx.params))
        # the linearisation (one sample's with `per_sample`), the flat diagonal and the
        # result: `N` of both with `per_sample`
        results = ctx.batch_size if self.per_sample else 1
        base = dataclasses.replace(base, bytes=base.bytes + 2 * results * _tree_bytes(ctx.params))
        if self.per_sample:  # P products for each sample, one sample after another
            base, lane = base * ctx.batch_size, lane * ctx.batch_size
        # A lane's bytes from one product's trace: the plan fits the chunk to the budget
        # on the chunk as it runs (`chunk_work`), which also gives the memory estimate.
        return Cost(base, lane, "basis vectors", count, chunk_work=chunks)

    def run(self, ctx: Context, chunk: int):
        kernel = (
            generic_per_sample_hessian_diagonal if self.per_sample else generic_hessian_diagonal
        )
        return kernel(
            ctx.params, ctx.static, ctx.bound_loss(), ctx.batch, chunk=chunk,
            progress=ctx.progress, mesh=ctx.options.mesh,
        )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class HutchinsonRoute:
    """Rademacher probes of `H` (or of `H - G`, with the exact GGN added back)."""

    ggn: SampleRoute | None  # the control variate's exact GGN, or None
    ggn_chunk: int = 0  # its chunk of samples, chosen by the plan
    name: str = "hutchinson"

    def cost(self, ctx: Context) -> Cost:
        found = {}

        def build(params, static, loss, batch, args):
            flat, _, product = probe_product(
                params, static, bind(loss, args), batch, self.ggn is not None
            )
            return flat, lambda v: v * product(v)

        def shared(params, static, loss, batch, args):
            flat, product = build(params, static, loss, batch, args)
            found["lane"] = profile(product, flat)
            return flat

        base = profile(shared, ctx.params, ctx.static, ctx.loss, ctx.batch, ctx.args)
        chunks = _vector_chunks(build, ctx, ctx.batch, base)
        # the linearisation, three running sums (float32 at least: count, sum, squares)
        # and the estimate and its standard error
        params = ctx.params
        extra = 2 * _tree_bytes(params, at_least=jnp.float32) + 2 * _tree_bytes(params)
        base = dataclasses.replace(base, bytes=base.bytes + extra)
        probes = ctx.options.estimator.num_probes
        lane = found["lane"]  # the chunk is fitted on its own trace, as for `GenericRoute`
        if self.ggn is None:
            return Cost(base, lane, "probes", probes, chunk_work=chunks)
        ggn = self.ggn.cost(dataclasses.replace(ctx, quantity="ggn"))
        text = f"the exact GGN diagonal ({self.ggn.kernel.label})"
        return Cost(
            base, lane, "probes", probes, extra=ggn, extra_text=text,
            extra_beside=2 * _tree_bytes(params), chunk_work=chunks,
        )  # fmt: skip

    def run(self, ctx: Context, chunk: int):
        subtract = self.ggn is not None
        estimate, stderr = hutchinson_kernel(
            ctx.params, ctx.static, ctx.bound_loss(), ctx.batch, key=ctx.key,
            num_probes=ctx.options.estimator.num_probes, subtract_ggn=subtract, chunk=chunk,
            progress=ctx.progress, mesh=ctx.options.mesh,
        )  # fmt: skip
        if subtract:
            ggn_ctx = dataclasses.replace(
                ctx, quantity="ggn", options=dataclasses.replace(ctx.options, per_sample=False)
            )
            exact = self.ggn.run(ggn_ctx, self.ggn_chunk)
            estimate = jax.tree.map(jnp.add, estimate, exact)
        return estimate, stderr
