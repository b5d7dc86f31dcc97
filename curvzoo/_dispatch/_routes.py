"""Routes: how each kind of kernel is costed and run for one call.

A route knows its kernel's lanes (samples, basis vectors or probes), profiles one lane
and the part the lanes share (`_costs.profile`, on abstract inputs: nothing runs), and
runs the kernel on a call's (traced) inputs with the chunk the plan chose. The plan
(`_plan.py`) picks the route; the run driver (`curvzoo/_run/_execute.py`) compiles it.
"""

import dataclasses
import math
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
from .._kernels._samples import AbstractSampleKernel, run_sample_kernel
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
    shared: Profile  # done once
    lane: Profile  # done per lane
    lanes: str  # what a lane is
    count: int  # how many lanes
    extra: Profile | None = None  # a second part (the control variate's exact GGN)
    extra_text: str | None = None
    extra_lane_bytes: int = 0

    def total(self) -> Profile:
        work = self.shared + self.lane * self.count
        return work if self.extra is None else work + self.extra


def _abstract_first(tree):
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype), tree)


def _tree_bytes(tree) -> int:
    return sum(
        math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
        for leaf in jax.tree.leaves(tree)
        if hasattr(leaf, "shape")
    )


def _target_draws(ctx: Context):
    """`(N, S, *target)` targets drawn from the model's predictions (the Fisher)."""
    model = eqx.combine(ctx.params, ctx.static)
    inputs = ctx.batch[0]
    predictions = jax.lax.stop_gradient(ctx.loss.predictions(model, inputs, ctx.lengths()))

    def draws(sample_key, prediction):
        keys = jax.random.split(sample_key, ctx.options.num_samples)
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
                    (targets.shape[0], ctx.options.num_samples, *targets.shape[1:]),
                    _draw_dtype(ctx),
                )
                return (ctx.batch[0], draws, *rest)
            return (ctx.batch[0], _target_draws(ctx), *rest)
        return ctx.batch

    def cost(self, ctx: Context) -> Cost:
        one = _abstract_first(self.samples(ctx))
        lane = profile(
            lambda p, s, l, x: self.kernel.pieces(p, s, l, x), ctx.params, ctx.static, ctx.loss, one
        )
        shared = Profile(0.0, 0.0, _tree_bytes((ctx.params, ctx.batch)))
        return Cost(shared, lane, "samples", ctx.batch_size)

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

        def shared(params, static, loss, batch, args):
            flat, _, hvp = hessian_vector_product(params, static, bind(loss, args), batch)
            found["lane"] = profile(lambda v: hvp(v)[0], flat)
            return flat

        base = profile(shared, ctx.params, ctx.static, ctx.loss, self._batch(ctx), ctx.args)
        lane = found["lane"]
        count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(ctx.params))
        if self.per_sample:  # P products for each sample
            return Cost(base * ctx.batch_size, lane * ctx.batch_size, "basis vectors", count)
        return Cost(base, lane, "basis vectors", count)

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

        def shared(params, static, loss, batch, args):
            flat, _, product = probe_product(
                params, static, bind(loss, args), batch, self.ggn is not None
            )
            found["lane"] = profile(lambda v: v * product(v), flat)
            return flat

        base = profile(shared, ctx.params, ctx.static, ctx.loss, ctx.batch, ctx.args)
        if self.ggn is None:
            return Cost(base, found["lane"], "probes", ctx.options.num_probes)
        ggn = self.ggn.cost(dataclasses.replace(ctx, quantity="ggn"))
        text = f"the exact GGN diagonal ({self.ggn.kernel.label})"
        return Cost(
            base, found["lane"], "probes", ctx.options.num_probes, ggn.total(), text,
            ggn.lane.bytes,
        )  # fmt: skip

    def run(self, ctx: Context, chunk: int):
        subtract = self.ggn is not None
        estimate, stderr = hutchinson_kernel(
            ctx.params, ctx.static, ctx.bound_loss(), ctx.batch, key=ctx.key,
            num_probes=ctx.options.num_probes, subtract_ggn=subtract, chunk=chunk,
            progress=ctx.progress, mesh=ctx.options.mesh,
        )  # fmt: skip
        if subtract:
            ggn_ctx = dataclasses.replace(
                ctx, quantity="ggn", options=dataclasses.replace(ctx.options, per_sample=False)
            )
            exact = self.ggn.run(ggn_ctx, self.ggn_chunk)
            estimate = jax.tree.map(jnp.add, estimate, exact)
        return estimate, stderr
