"""What identifies a call: its arrays' shapes and dtypes and everything static.

A call's inputs (model, batch, loss, `args`) are split into their arrays, which become
the inputs of the compiled program, and a hashable *key* made of everything else: the
tree structures, the shapes and dtypes of the arrays, and every non-array leaf (static
fields, activation functions, Python numbers). Two calls with equal keys run the same
compiled program on their own arrays, as under `equinox.filter_jit`.

A loss that is not an Equinox module (a function, a lambda, a `functools.partial`, a
bound method of a plain object) is *traced at every call* (`TracedLoss`): the values it
closes over or reads from globals are then those of the moment of the call. Arrays it
captures and Python floats it reads become inputs (`trace_loss`); other Python values
(ints, bools, floats used as Python values) appear as literals in the traced program,
whose text is part of the key. So a fresh lambda computing the same thing, or the same
loss with a new weight, reuses the compiled program, and a changed captured constant
gives a new, correct one.
"""

import dataclasses
import functools
import types
from typing import Any

import equinox as eqx
import jax
import jax.extend as jex
import jax.numpy as jnp
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
    # `jax.dtypes`, not numpy: numpy does not count bfloat16 (an `ml_dtypes` type) as floating
    if not jax.dtypes.issubdtype(out.dtype, np.floating):
        raise ValueError(f"`loss` must return a real floating-point scalar, got dtype {out.dtype}.")


class TracedLoss(eqx.Module):
    """A callable loss, traced at the call's shapes: `loss(model, batch[, args])`
    evaluated from its program, the arrays it captured passed in as `consts` and the
    Python floats it reads (`lift_scalars`) as `scalars`, so that neither is a constant
    of the compiled program."""

    program: _Program = eqx.field(static=True)
    model_layout: Layout = eqx.field(static=True)
    batch_layout: Layout = eqx.field(static=True)
    args_layout: Layout | None = eqx.field(static=True)
    consts: list
    scalars: list

    def __call__(self, model, batch, args=None):
        inputs = list(jax.tree.leaves(eqx.filter(model, is_array)))
        inputs += jax.tree.leaves(eqx.filter(batch, is_array))
        if self.args_layout is not None:
            inputs += jax.tree.leaves(eqx.filter(args, is_array))
        inputs += list(self.scalars)
        closed = jex.core.ClosedJaxpr(self.program.jaxpr, list(self.consts))
        return jex.core.jaxpr_as_fun(closed)(*inputs)[0]


# ## Python floats a loss reads are inputs, not constants


def _is_float(value: Any) -> bool:
    """A Python float or a NumPy floating scalar (never a bool or an int: those often
    decide shapes, indices and control flow)."""
    return isinstance(value, (float, np.floating)) and not isinstance(value, bool)


class _Slots:
    """Where a plain function (or a `functools.partial` of one) reads Python floats: its
    closure cells, the globals its code names, its defaults, and a partial's bound
    arguments. `rebuild(values)` gives the same callable reading `values` there."""

    def __init__(self, fn):
        self.fn = fn
        self.values: list = []
        self._plan = self._find(fn)

    def _take(self, value):
        self.values.append(value)
        return len(self.values) - 1

    def _find(self, fn):
        if isinstance(fn, functools.partial):
            args = [self._take(a) if _is_float(a) else None for a in fn.args]
            keywords = {k: self._take(v) for k, v in fn.keywords.items() if _is_float(v)}
            return ("partial", self._find(fn.func), args, keywords)
        if not isinstance(fn, types.FunctionType):
            return None
        code = fn.__code__
        cells = {}
        for i, (name, cell) in enumerate(zip(code.co_freevars, fn.__closure__ or ())):
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if _is_float(value):
                cells[i] = self._take(value)
        names = {
            name: self._take(fn.__globals__[name])
            for name in code.co_names
            if name in fn.__globals__ and _is_float(fn.__globals__[name])
        }
        defaults = [self._take(d) if _is_float(d) else None for d in fn.__defaults__ or ()]
        kwdefaults = {
            k: self._take(v) for k, v in (fn.__kwdefaults__ or {}).items() if _is_float(v)
        }
        if not (cells or names or any(d is not None for d in defaults) or kwdefaults):
            return None
        return ("function", cells, names, defaults, kwdefaults)

    def rebuild(self, values):
        return self._rebuild(self.fn, self._plan, values)

    def _rebuild(self, fn, plan, values):
        if plan is None:
            return fn
        if plan[0] == "partial":
            _, inner, args, keywords = plan
            func = self._rebuild(fn.func, inner, values)
            new_args = [a if i is None else values[i] for a, i in zip(fn.args, args)]
            new_keywords = dict(fn.keywords)
            new_keywords.update({k: values[i] for k, i in keywords.items()})
            return functools.partial(func, *new_args, **new_keywords)
        _, cells, names, defaults, kwdefaults = plan
        closure = fn.__closure__
        if cells:
            closure = tuple(
                types.CellType(values[cells[i]]) if i in cells else cell
                for i, cell in enumerate(closure)
            )
        namespace = fn.__globals__
        if names:
            namespace = dict(namespace)
            namespace.update({name: values[i] for name, i in names.items()})
        new = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, closure)
        if fn.__defaults__:
            new.__defaults__ = tuple(
                d if i is None else values[i] for d, i in zip(fn.__defaults__, defaults)
            )
        if fn.__kwdefaults__:
            new.__kwdefaults__ = {
                k: values[kwdefaults[k]] if k in kwdefaults else v
                for k, v in fn.__kwdefaults__.items()
            }
        return new


def _reraise_explained():
    """Re-raise the error being handled (the user's loss failed while traced): as a
    clearer error where it is a known one (`explained`), else with a note saying
    how curvzoo called the loss."""
    import sys

    from .._run._checks import explained

    error = sys.exc_info()[1]
    clearer = explained(error)
    if clearer is not None:
        raise clearer from error
    error.add_note(
        "(raised while curvzoo traced `loss(model, batch)`: the loss is called with the "
        "whole model and the whole batch, and must return a real scalar)"
    )
    raise error


def trace_loss(
    loss, model_layout: Layout, batch_layout: Layout, args_layout: Layout | None
) -> tuple[TracedLoss, Any]:
    """Trace `loss(model, batch[, args])` at the given layouts' shapes.

    The Python floats that a plain function reads (from its closure, the globals its
    code names, its defaults, or a `functools.partial`'s arguments) are inputs of the
    traced program, each a weakly typed scalar as JAX treats a Python float: a loss
    `lambda m, b: w * ce(m, b)` with a new `w` at every call reuses one compiled program
    (before, each value was a literal of a new program: 4.9 s and 8.5 MiB a call on a
    small GRU). Where a float is used as a Python value (`if w > 0:`, `math.exp(w)`),
    the loss is traced with it as a constant, as before. Ints and bools stay constants.

    **Returns:** `(traced, output)`, with `output` the abstract value the loss returns.
    """
    slots = _Slots(loss)

    def call(model_arrays, batch_arrays, args_arrays, scalars):
        fn = slots.rebuild(scalars) if scalars else loss
        model = model_layout.rebuild(model_arrays)
        batch = batch_layout.rebuild(batch_arrays)
        if args_layout is None:
            return fn(model, batch)
        return fn(model, batch, args_layout.rebuild(args_arrays))

    def abstract(layout):
        if layout is None:
            return []
        return [jax.ShapeDtypeStruct(s, d, weak_type=w) for s, d, w in layout.avals]

    inputs = (abstract(model_layout), abstract(batch_layout), abstract(args_layout))
    scalars = [jnp.asarray(value) for value in slots.values]
    traced_scalars = [  # weakly typed where JAX types the value so (a Python float)
        jax.ShapeDtypeStruct((), x.dtype, weak_type=x.weak_type) for x in scalars
    ]
    try:
        closed, shape = jax.make_jaxpr(call, return_shape=True)(*inputs, traced_scalars)
    except Exception:  # a float used as a Python value: traced as a constant
        if not scalars:
            _reraise_explained()
        scalars = []
        try:
            closed, shape = jax.make_jaxpr(call, return_shape=True)(*inputs, [])
        except Exception:
            _reraise_explained()
    check_scalar(shape)
    rules: list = []
    _custom_rules(closed.jaxpr, rules)
    program = _Program(closed, tuple(rules))
    consts = list(closed.consts)
    traced = TracedLoss(program, model_layout, batch_layout, args_layout, consts, scalars)
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
