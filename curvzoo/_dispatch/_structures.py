"""Model structures: what the structured kernels read, registered per model type.

`structure(model, example)` is a `functools.singledispatch` function: a model type
registers how it is built, once, as

- `Layered(ops)`: a chain `u_{i+1} = op_i(u_i)` of dense or convolutional layers,
  elementwise activations and linear maps (pooling, reshapes), for the layered kernel;
- `Recurrent(chain)`: a recurrent network, for the recurrent kernel.

The zoo's models register in their own modules; `equinox.nn.Linear`, `equinox.nn.Conv`,
`equinox.nn.MLP` and `equinox.nn.Sequential` (of those, elementwise `equinox.nn.Lambda`
activations, a flatten, and max or average pooling) are registered below. A model type
with no registration takes the generic kernel, and `curvzoo.plan` says so.

`describe(model, example)` checks what a registration cannot promise: that the class
registered is also the one whose `__call__` runs (a subclass that changes the forward
pass is not described by its parent), that every floating-point array of the model
belongs to a described layer, and that every activation is elementwise, by reading its
traced program at the real shapes (`elementwise_reason`), not by trying values.
"""

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np

from .._kernels._ops import Elementwise, Linear, ParamLayer
from ._signature import WithArgs


class Unsupported(Exception):
    """The structured kernels cannot take this model; the message says why.

    `whole=True` marks a message that is a whole reason on its own (a plan shows it as
    it is); otherwise the plan prefixes it with "`model` has a part the structured
    kernel does not support"."""

    def __init__(self, message: str, *, whole: bool = False):
        super().__init__(message)
        self.whole = whole


@dataclasses.dataclass(frozen=True)
class Layered:
    """A chain of ops on one example, `u_{i+1} = op_i(u_i)`: what the layered kernel
    reads (`curvzoo.structures.Layered` for a registration of your own).

    **Fields:** `ops`, a tuple of ops (`curvzoo.structures.layer`, `activation`,
    `linear`, `pool`)."""

    ops: tuple
    declared: bool = dataclasses.field(default=False, repr=False)  # registered by a user

    def __post_init__(self):
        object.__setattr__(self, "ops", tuple(self.ops))


@dataclasses.dataclass(frozen=True)
class Recurrent:
    chain: Any  # a `curvzoo._kernels._recurrent.RecurrentChain`


@functools.singledispatch
def structure(model, example) -> Layered | Recurrent:
    """The structure of `model` (one input `example`, an array or a
    `jax.ShapeDtypeStruct`, for registrations that need shapes), or `Unsupported`."""
    del example
    raise Unsupported(f"model of type {type(model).__name__} has no registered structure")


def defining_class(cls: type, name: str) -> type | None:
    """The class in `cls`'s method resolution order that defines attribute `name`."""
    for klass in cls.__mro__:
        if name in vars(klass):
            return klass
    return None


def _registered_class(cls: type) -> type | None:
    for klass in cls.__mro__:
        if klass is not object and klass in structure.registry:
            return klass
    return None


# ## Elementwise functions, read off their programs

# Primitives whose output entry i depends on the entries i of their operands only.
_ELEMENTWISE = frozenset(
    """neg sign floor ceil round is_finite exp exp2 log log1p expm1 tanh logistic sin cos
    tan asin acos atan sinh cosh asinh acosh atanh sqrt rsqrt cbrt abs erf erfc erf_inv
    lgamma digamma integer_pow pow square add add_any sub mul div rem max min atan2
    nextafter select_n clamp eq ne lt le gt ge and or not xor convert_element_type copy
    copy_p reduce_precision stop_gradient""".split()
)
# Primitives that only rearrange entries.
_REARRANGING = frozenset("reshape squeeze expand_dims transpose copy copy_p".split())


def _sub_jaxpr(eqn):
    """The program a call-like primitive runs (`jit`, custom derivatives, remat)."""
    for name in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(name)
        if isinstance(sub, jex.core.ClosedJaxpr):
            return sub.jaxpr
        if isinstance(sub, jex.core.Jaxpr):
            return sub
    return None


def _local_outputs(jaxpr, local: list, shape: tuple, allowed: frozenset) -> list | str:
    """Which outputs of `jaxpr` are *index-local* (entry i depends only on entries i of
    the local inputs, through `allowed` primitives on arrays of `shape`); a string
    naming the first primitive that breaks locality otherwise. Inputs that are not
    local are constants."""
    state = {var: flag for var, flag in zip(jaxpr.invars, local)}
    for var in jaxpr.constvars:
        state[var] = False

    def is_local(atom):
        return isinstance(atom, jex.core.Var) and state.get(atom, False)

    for eqn in jaxpr.eqns:
        flags = [is_local(atom) for atom in eqn.invars]
        if not any(flags):
            for var in eqn.outvars:
                state[var] = False
            continue
        sub = _sub_jaxpr(eqn)
        if sub is not None and len(sub.invars) == len(eqn.invars):
            outs = _local_outputs(sub, flags, shape, allowed)
            if isinstance(outs, str):
                return outs
            for var, flag in zip(eqn.outvars, outs):
                state[var] = flag
            continue
        name = eqn.primitive.name
        shapes_ok = all(
            tuple(atom.aval.shape) == shape for atom, flag in zip(eqn.invars, flags) if flag
        ) and all(tuple(var.aval.shape) == shape for var in eqn.outvars)
        if name not in allowed or not shapes_ok:
            return f"`{name}`"
        for var in eqn.outvars:
            state[var] = True
    return [is_local(atom) for atom in jaxpr.outvars]


def elementwise_reason(fn: Callable, shape: tuple, dtype) -> str | None:
    """Why `fn` is not an elementwise function on arrays of `shape` (`None` if it is).

    Sound, not sampled: the program of `fn`'s first and second directional derivatives
    (`jax.jvp` of `jax.jvp`, with free tangents, so that custom derivative rules are
    read too) must compute output entry `i` from entries `i` of its inputs only, through
    elementwise primitives, and `fn` must keep the shape."""

    def second_order(x, t, s):
        return jax.jvp(lambda y: jax.jvp(fn, (y,), (t,)), (x,), (s,))

    spec = jax.ShapeDtypeStruct(shape, dtype)
    try:
        closed, out = jax.make_jaxpr(second_order, return_shape=True)(spec, spec, spec)
    except Exception as error:  # a function that fails on this shape cannot be used
        return f"cannot be evaluated on an array of shape {shape}: {error}"
    if any(tuple(leaf.shape) != shape for leaf in jax.tree.leaves(out)):
        return f"does not keep the shape {shape}"
    outs = _local_outputs(closed.jaxpr, [True] * 3, shape, _ELEMENTWISE)
    if isinstance(outs, str):
        return f"is not an elementwise function (its program mixes entries with {outs})"
    return None


def _rearranges(fn: Callable, shape: tuple, dtype) -> bool:
    """Whether `fn` only rearranges the entries of an array of `shape` (a reshape or a
    transpose, like a flatten)."""
    try:
        closed = jax.make_jaxpr(fn)(jax.ShapeDtypeStruct(shape, dtype))
    except Exception:
        return False
    if len(closed.jaxpr.outvars) != 1 or closed.jaxpr.outvars[0].aval.size != math.prod(shape):
        return False
    for eqn in closed.jaxpr.eqns:
        sub = _sub_jaxpr(eqn)
        if eqn.primitive.name not in _REARRANGING and sub is None:
            return False
        if sub is not None and not all(e.primitive.name in _REARRANGING for e in sub.eqns):
            return False
    return True


def _has_residual(fn: Callable, shape: tuple, dtype) -> bool:
    """False where `fn`'s second derivative is zero everywhere (ReLU and other piecewise
    linear functions): its program then does not depend on the input at all, and is
    zero."""
    op = Elementwise(fn, "")
    closed = jax.make_jaxpr(lambda z: op.derivatives(z)[1])(jax.ShapeDtypeStruct(shape, dtype))
    if _local_outputs(closed.jaxpr, [True], shape, _ELEMENTWISE) != [False]:
        return True
    value = jex.core.jaxpr_as_fun(closed)(jnp.zeros(shape, dtype))[0]
    return bool(np.any(np.asarray(value) != 0))


# ## Checking a registration


def _is_float(leaf) -> bool:
    """A floating-point array, or its `jax.ShapeDtypeStruct` (plans see only those)."""
    dtype = getattr(leaf, "dtype", None)
    return (
        isinstance(leaf, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))
        and dtype is not None
        and jnp.issubdtype(dtype, jnp.inexact)
    )


def _check_covered(model, parts) -> None:
    covered = {id(leaf) for part in parts for leaf in jax.tree.leaves(eqx.filter(part, _is_float))}
    arrays = eqx.filter(model, _is_float)
    for path, leaf in jax.tree_util.tree_flatten_with_path(arrays)[0]:
        if id(leaf) not in covered:
            raise Unsupported(f"parameter {jax.tree_util.keystr(path)} outside its description")


def _check_layered(model, ops: tuple, example) -> tuple:
    """The ops, each activation's elementwise property verified at its input's shape and
    its residual switched off where it is zero; `Unsupported` otherwise."""
    checked = []
    u = jax.ShapeDtypeStruct(jnp.shape(example), jnp.result_type(example))
    for op in ops:
        if isinstance(op, Elementwise):
            reason = elementwise_reason(op.fn, u.shape, u.dtype)
            if reason is not None:
                name = getattr(op.fn, "__name__", type(op.fn).__name__)
                raise Unsupported(f"{op.name} ({name!r}) {reason}")
            if op.has_residual and not _has_residual(op.fn, u.shape, u.dtype):
                op = dataclasses.replace(op, has_residual=False)
        checked.append(op)
        u = eqx.filter_eval_shape(lambda m, v, op=op: op.apply(m, v), model, u)
    _check_covered(model, [op.layer(model) for op in checked if isinstance(op, ParamLayer)])
    return tuple(checked)


def describe(model, example) -> Layered | Recurrent:
    """The checked structure of `model`, or `Unsupported` naming the part that is not
    supported. Needs only shapes: `example` may be abstract."""
    cls = type(model)
    owner = _registered_class(cls)
    if owner is None:
        raise Unsupported(f"model of type {cls.__name__} has no registered structure")
    where = defining_class(cls, "__call__")
    if where is not None and not issubclass(owner, where):
        raise Unsupported(
            f"{cls.__name__} overrides `__call__` of {owner.__name__}, whose layer "
            "structure the kernel would use"
        )
    found = structure(model, example)
    if isinstance(found, Layered):
        ops = _check_layered(model, found.ops, example)
        if found.declared:
            _check_declared(model, ops, example)
        return Layered(ops)
    _check_covered(model, found.chain.parts(model))
    return found


# ## Registrations made with `curvzoo.structures.register`

_OPS = (ParamLayer, Elementwise, Linear)
_VERSION = [0]  # counts the registrations made here: plans are keyed on it


def registry_version() -> int:
    """How many registrations `register_declared` has made: part of every plan's key, so
    that a plan made before a (re-)registration is not reused after it."""
    return _VERSION[0]


def register_declared(cls: type, describe: Callable) -> None:
    """Register a user's `describe` for `cls`: its result must be a `Layered` of ops,
    and is marked as declared, so that `describe()` also checks it against the model's
    own forward pass (`_check_declared`)."""

    def described(model, example):
        found = describe(model, example)
        if not isinstance(found, Layered):
            raise Unsupported(
                f"the structure registered for {cls.__name__} returned "
                f"{type(found).__name__}, not a `curvzoo.structures.Layered`"
            )
        for i, op in enumerate(found.ops):
            if not isinstance(op, _OPS):
                raise Unsupported(
                    f"op {i} of the structure registered for {cls.__name__} is a "
                    f"{type(op).__name__}; build ops with `curvzoo.structures.layer`, "
                    "`activation`, `linear` or `pool`"
                )
        return Layered(found.ops, declared=True)

    structure.register(cls)(described)
    _VERSION[0] += 1


def _random_like(tree, key):
    """`tree`'s arrays (or `jax.ShapeDtypeStruct`s) as random arrays of the same shapes
    and dtypes: standard normal for floating point, zeros otherwise."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, max(len(leaves), 1))
    out = []
    for k, leaf in zip(keys, leaves):
        if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct, np.ndarray)):
            dtype = leaf.dtype
            if jnp.issubdtype(dtype, jnp.floating):
                leaf = jax.random.normal(k, leaf.shape, dtype)
            else:
                leaf = jnp.zeros(leaf.shape, dtype)
        out.append(leaf)
    return jax.tree.unflatten(treedef, out)


def _check_declared(model, ops: tuple, example) -> None:
    """What a user's registration cannot be trusted with, checked on random values of
    the model's shapes: the chain of `ops` computes what `model(x)` computes (to
    rounding), every `linear` op is linear (its second derivative is zero), and one that
    says it keeps a diagonal only rearranges entries (or is a pooling layer that
    `curvzoo.structures.pool` made). Runs at plan time, once per plan."""
    with jax.ensure_compile_time_eval():
        k_model, k_x, k_t = jax.random.split(jax.random.key(0), 3)
        concrete = _random_like(model, k_model)
        x = _random_like(jax.ShapeDtypeStruct(jnp.shape(example), jnp.result_type(example)), k_x)
        expected = concrete(x)
        u = x
        for op in ops:
            if isinstance(op, Linear) and not isinstance(op.fn, eqx.nn.Pool):
                t = _random_like(jax.ShapeDtypeStruct(u.shape, u.dtype), k_t)
                second = jax.jvp(lambda y, op=op: jax.jvp(op.fn, (y,), (t,))[1], (u,), (t,))[1]
                if np.any(np.asarray(second) != 0):
                    raise Unsupported(
                        f"{op.name} is declared `linear` but is not linear in its input"
                    )
                if op.keeps_diagonal and not _rearranges(op.fn, u.shape, u.dtype):
                    raise Unsupported(
                        f"{op.name} is declared with `keeps_diagonal=True` but does more "
                        "than rearrange its input's entries"
                    )
            u = op.apply(concrete, u)
        if not hasattr(expected, "shape") or tuple(u.shape) != tuple(expected.shape):
            got = getattr(expected, "shape", type(expected).__name__)
            raise Unsupported(
                f"the registered structure of {type(model).__name__} does not compute what "
                f"its `__call__` computes (output shape {tuple(u.shape)} against {got})"
            )
        u, expected = np.asarray(u, np.float64), np.asarray(expected, np.float64)
        scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
        tolerance = 1e3 * float(jnp.finfo(jnp.result_type(x)).eps) * scale  # rounding only
        if not np.all(np.abs(u - expected) <= tolerance):
            raise Unsupported(
                f"the registered structure of {type(model).__name__} does not compute what "
                "its `__call__` computes (on random parameters and a random input, they "
                f"differ by up to {np.max(np.abs(u - expected)):.3g})"
            )


@structure.register(WithArgs)
def _with_args(model: WithArgs, example):
    del model, example
    raise Unsupported(
        "`args` are passed to the model, and the structured kernels read models of one "
        "example only",
        whole=True,
    )


# ## Registrations for `equinox.nn`


def param_layer(where: Callable, model, name: str) -> ParamLayer:
    """The layer at `where(model)` as a `ParamLayer` op."""
    layer = where(model)
    if isinstance(layer, eqx.nn.Linear):
        return ParamLayer(where, name, dense=True)
    if isinstance(layer, eqx.nn.Conv):
        return ParamLayer(where, name, dense=False)
    raise Unsupported(f"layer {name} of type {type(layer).__name__}")


def pool(module, name: str = "pool") -> Linear:
    """A max or average pooling layer as a `Linear` op: it keeps a diagonal Hessian
    diagonal when it is max-pooling over disjoint windows without padding."""
    if not isinstance(module, eqx.nn.Pool):
        raise Unsupported(f"pooling layer {type(module).__name__}")
    stride, kernel = np.atleast_1d(module.stride), np.atleast_1d(module.kernel_size)
    pads = [p for pair in module.padding for p in pair]
    disjoint = bool(np.all(stride >= kernel))
    is_max = module.operation is jax.lax.max
    return Linear(module, name, keeps_diagonal=is_max and disjoint and not any(pads))


@structure.register(eqx.nn.Linear)
@structure.register(eqx.nn.Conv)
def _single_layer(model, example) -> Layered:
    del example
    return Layered((param_layer(lambda m: m, model, type(model).__name__),))


@structure.register(eqx.nn.MLP)
def _equinox_mlp(model: eqx.nn.MLP, example) -> Layered:
    del example
    if model.scan:
        raise Unsupported("eqx.nn.MLP with `scan=True` (its hidden layers are stacked)")
    ops = []
    for i in range(len(model.layers)):
        ops.append(param_layer(lambda m, i=i: m.layers[i], model, f"layers[{i}]"))
        if i < len(model.layers) - 1:
            # `eqx.nn.MLP` maps a (scalar) activation over the entries.
            activation = model.activation
            ops.append(Elementwise(lambda u, a=activation: _map_entries(a, u), "activation"))
    final = model.final_activation
    ops.append(Elementwise(lambda u, a=final: _map_entries(a, u), "final_activation"))
    return Layered(tuple(ops))


def _map_entries(fn, u):
    if u.ndim == 0:
        return fn(u)
    return jax.vmap(fn)(u)


def _sequential_ops(model, where: Callable, prefix: str, example) -> list:
    ops = []
    u = jax.ShapeDtypeStruct(jnp.shape(example), jnp.result_type(example))
    for i, layer in enumerate(model.layers):
        at = lambda m, i=i, where=where: where(m).layers[i]  # noqa: E731
        name = f"{prefix}layers[{i}]"
        if isinstance(layer, eqx.nn.Sequential):
            ops += _sequential_ops(layer, at, name + ".", u)
        elif isinstance(layer, (eqx.nn.Linear, eqx.nn.Conv)):
            ops.append(ParamLayer(at, name, dense=isinstance(layer, eqx.nn.Linear)))
        elif isinstance(layer, eqx.nn.Pool):
            ops.append(pool(layer, name))
        elif isinstance(layer, eqx.nn.Identity):
            pass
        elif isinstance(layer, eqx.nn.Lambda):
            if elementwise_reason(layer.fn, u.shape, u.dtype) is None:
                ops.append(Elementwise(layer.fn, name))
            elif _rearranges(layer.fn, u.shape, u.dtype):
                ops.append(Linear(layer.fn, name, keeps_diagonal=True))
            else:
                reason = elementwise_reason(layer.fn, u.shape, u.dtype)
                raise Unsupported(f"{name} (an `eqx.nn.Lambda`) {reason}, nor only a reshape")
        else:
            raise Unsupported(f"{name} of type {type(layer).__name__}")
        u = eqx.filter_eval_shape(lambda lay, v: lay(v), layer, u)
    return ops


@structure.register(eqx.nn.Sequential)
def _equinox_sequential(model: eqx.nn.Sequential, example) -> Layered:
    return Layered(tuple(_sequential_ops(model, lambda m: m, "", example)))
