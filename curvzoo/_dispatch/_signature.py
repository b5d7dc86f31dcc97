"""What identifies a call: its arrays' shapes and dtypes and everything static.

A call's inputs (model, batch, loss, `args`) are split into their arrays, which become
the inputs of the compiled program, and a hashable *key* made of everything else: the
tree structures, the shapes and dtypes of the arrays, and every non-array leaf (static
fields, activation functions, Python numbers). Two calls with equal keys run the same
compiled program on their own arrays, as under `equinox.filter_jit`.

A loss that is not an Equinox module (a function, a lambda, a `functools.partial`, a
bound method of a plain object) is *traced at every call* (`TracedLoss`): the values it
closes over or reads from globals are then those of the moment of the call. Arrays it
captures become inputs; Python numbers appear as literals in the traced program, whose
text is part of the key. So a fresh lambda computing the same thing reuses the compiled
program, and a changed captured value gives a new, correct one.
"""

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.extend as jex
import numpy as np
from jaxtyping import PyTree


def is_array(leaf: Any) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic))


def _aval_key(leaf) -> tuple:
    return (tuple(leaf.shape), np.dtype(leaf.dtype), bool(getattr(leaf, "weak_type", False)))


def cached_hash(self) -> int:
    """A frozen dataclass's hash, computed from its fields once (assign it as the
    class's `__hash__`, which `dataclasses` then keeps): a call hashes its layouts and
    its request several times (plan, mask and batch caches). Raises `TypeError` when a
    field is unhashable, as the generated hash would."""
    try:
        return self.__dict__["_hash"]
    except KeyError:
        value = hash(tuple(getattr(self, field.name) for field in dataclasses.fields(self)))
        object.__setattr__(self, "_hash", value)
        return value


@dataclasses.dataclass(frozen=True)
class Layout:
    """How to rebuild a PyTree from its arrays: the structure and the static leaves
    (`None` where an array goes). Hashable when every static leaf is."""

    treedef: Any
    static: tuple
    avals: tuple  # (shape, dtype, weak_type) per array, in order

    __hash__ = cached_hash

    def rebuild(self, arrays) -> PyTree:
        arrays = iter(arrays)
        leaves = [next(arrays) if leaf is _ARRAY else leaf for leaf in self.static]
        return jax.tree.unflatten(self.treedef, leaves)

    def split(self, arrays, trained: tuple) -> tuple[PyTree, PyTree]:
        """`(params, static)` as `eqx.partition` would give them: the leaves marked in
        `trained` (one bool per leaf) in `params`, everything else in `static`."""
        arrays = iter(arrays)
        params, static = [], []
        for leaf, selected in zip(self.static, trained):
            if leaf is _ARRAY:
                leaf = next(arrays)
                params.append(leaf if selected else None)
                static.append(None if selected else leaf)
            else:
                params.append(None)
                static.append(leaf)
        return jax.tree.unflatten(self.treedef, params), jax.tree.unflatten(self.treedef, static)

    def with_leading(self, size: int) -> "Layout":
        """The same layout with every array's leading axis of length `size`."""
        avals = tuple(((size, *shape[1:]), dtype, weak) for shape, dtype, weak in self.avals)
        return Layout(self.treedef, self.static, avals)

    def abstract(self) -> PyTree:
        """The tree with `jax.ShapeDtypeStruct` in place of its arrays."""
        return self.rebuild(
            jax.ShapeDtypeStruct(shape, dtype, weak_type=weak) for shape, dtype, weak in self.avals
        )


class _ArrayMarker:
    def __repr__(self):
        return "<array>"


_ARRAY = _ArrayMarker()


def flatten(tree: PyTree) -> tuple[list, Layout]:
    """`(arrays, layout)`: the array leaves of `tree` (the dynamic inputs) and what
    rebuilds it around them."""
    leaves, treedef = jax.tree.flatten(tree)
    arrays, static, avals = [], [], []
    for leaf in leaves:
        if is_array(leaf):
            arrays.append(leaf)
            static.append(_ARRAY)
            avals.append(_aval_key(leaf))
        else:
            static.append(leaf)
    return arrays, Layout(treedef, tuple(static), tuple(avals))


# ## Freshness: callables that are not Equinox modules are traced at every call


class _Program:
    """A traced program compared and hashed by its text (and the custom-derivative
    rules it calls, by identity), so that equal computations share compiled code."""

    def __init__(self, closed, rules: tuple):
        self.jaxpr = closed.jaxpr
        self.text = str(closed.jaxpr)
        self.rules = rules
        self._hash = hash((self.text, rules))

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return isinstance(other, _Program) and self.text == other.text and self.rules == other.rules


def _custom_rules(jaxpr, found: list) -> None:
    """The user-defined derivative rules a program calls: their printed form shows only
    a name, so they join the key by identity."""
    for eqn in jaxpr.eqns:
        params = eqn.params
        if "jvp_jaxpr_fun" in params:
            found.append(params["jvp_jaxpr_fun"])
        if "bwd" in params:
            bwd = params["bwd"]
            found.append(getattr(bwd, "f", bwd))
        for value in params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jex.core.ClosedJaxpr):
                    _custom_rules(sub.jaxpr, found)
                elif isinstance(sub, jex.core.Jaxpr):
                    _custom_rules(sub, found)


def fresh(loss, model, batch, args=None):
    """`loss` ready to be passed into compiled code so that its result is that of the
    loss as it stands now: an Equinox module as it is (its arrays are inputs), any other
    callable traced at these shapes (`TracedLoss`). Raises where the loss does not
    return a real scalar."""
    if isinstance(loss, eqx.Module):
        return loss
    args_layout = None if args is None else flatten(args)[1]
    traced, out = trace_loss(loss, flatten(model)[1], flatten(batch)[1], args_layout)
    check_scalar(out)
    return traced


def check_scalar(out) -> None:
    """A loss must return one real floating-point scalar (`out`: the abstract value it
    returns)."""
    if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != ():
        shape = getattr(out, "shape", None)
        got = f"shape {shape}" if shape is not None else f"a {type(out).__name__}"
        raise ValueError(f"`loss` must return a scalar, but `loss(model, batch)` gives {got}.")
    if not np.issubdtype(out.dtype, np.floating):
        raise ValueError(f"`loss` must return a real floating-point scalar, got dtype {out.dtype}.")


class TracedLoss(eqx.Module):
    """A callable loss, traced at the call's shapes: `loss(model, batch[, args])`
    evaluated from its program, the arrays it captured passed in as `consts`."""

    program: _Program = eqx.field(static=True)
    model_layout: Layout = eqx.field(static=True)
    batch_layout: Layout = eqx.field(static=True)
    args_layout: Layout | None = eqx.field(static=True)
    consts: list

    def __call__(self, model, batch, args=None):
        inputs = list(jax.tree.leaves(eqx.filter(model, is_array)))
        inputs += jax.tree.leaves(eqx.filter(batch, is_array))
        if self.args_layout is not None:
            inputs += jax.tree.leaves(eqx.filter(args, is_array))
        closed = jex.core.ClosedJaxpr(self.program.jaxpr, list(self.consts))
        return jex.core.jaxpr_as_fun(closed)(*inputs)[0]


def trace_loss(
    loss, model_layout: Layout, batch_layout: Layout, args_layout: Layout | None
) -> tuple[TracedLoss, Any]:
    """Trace `loss(model, batch[, args])` at the given layouts' shapes.

    **Returns:** `(traced, output)`, with `output` the abstract value the loss returns.
    """

    def call(model_arrays, batch_arrays, args_arrays):
        model = model_layout.rebuild(model_arrays)
        batch = batch_layout.rebuild(batch_arrays)
        if args_layout is None:
            return loss(model, batch)
        return loss(model, batch, args_layout.rebuild(args_arrays))

    def abstract(layout):
        if layout is None:
            return []
        return [jax.ShapeDtypeStruct(s, d, weak_type=w) for s, d, w in layout.avals]

    closed, shape = jax.make_jaxpr(call, return_shape=True)(
        abstract(model_layout), abstract(batch_layout), abstract(args_layout)
    )
    check_scalar(shape)
    rules: list = []
    _custom_rules(closed.jaxpr, rules)
    program = _Program(closed, tuple(rules))
    traced = TracedLoss(program, model_layout, batch_layout, args_layout, list(closed.consts))
    return traced, shape


class WithArgs(eqx.Module):
    """A model that takes non-batched `args` with each example, as a model of one
    example for a curvzoo loss: `model(x, args)`, and where that returns
    `(prediction, state)` with an `equinox.nn.State` (Equinox's stateful layers, such as
    `BatchNorm` in inference mode), the prediction."""

    model: Any
    args: Any

    def __call__(self, x):
        out = self.model(x, self.args)
        if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], eqx.nn.State):
            return out[0]
        return out
