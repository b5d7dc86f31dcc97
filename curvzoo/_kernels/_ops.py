"""Layered descriptions of models, for the structured kernel.

A supported model is a chain of operations on one example, `u_{i+1} = op_i(u_i)`:

- `ParamLayer`: an `equinox.nn.Linear` or `equinox.nn.Conv`, affine in its parameters,
  where each output entry sees each parameter through a single product (a weight times
  an input entry, or a bias);
- `Elementwise`: an activation `sigma` applied entrywise, the only kind of op with a
  second derivative (its residual `sigma''(z) * dL/da` enters the Hessian);
- `Linear`: a map that is linear in its input on the region where it is evaluated
  (pooling, reshape); `keeps_diagonal` says whether it maps a diagonal matrix `D` to a
  diagonal `P^T D P` (true for reshapes and for max-pooling with non-overlapping
  windows, where every input entry reaches at most one output entry with weight 1).

`describe(model)` returns the chain or raises `Unsupported` with the part it cannot take.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


class Unsupported(Exception):
    """The structured kernel cannot take this model or loss; the message says why."""


@dataclasses.dataclass(frozen=True)
class ParamLayer:
    """A layer with parameters; `where(model)` finds it inside the model."""

    where: Callable[[Any], Any]
    name: str
    dense: bool  # an `equinox.nn.Linear`: output i sees weight row i only

    def layer(self, model):
        return self.where(model)

    def apply(self, model, u):
        return self.where(model)(u)


_PIECEWISE_LINEAR = (jax.nn.relu, jax.nn.relu6, jax.nn.hard_tanh)


@dataclasses.dataclass(frozen=True)
class Elementwise:
    fn: Callable
    name: str

    @property
    def has_residual(self) -> bool:
        """False for activations that are linear where they are differentiable (ReLU,
        ReLU6, hard tanh): their second derivative is zero, so is their residual."""
        return not any(self.fn is known for known in _PIECEWISE_LINEAR)

    def apply(self, model, u):
        del model
        return self.fn(u)

    def derivatives(self, z):
        """`(sigma'(z), sigma''(z))`, entrywise."""

        def first(z):
            return jax.jvp(self.fn, (z,), (jnp.ones_like(z),))[1]

        return jax.jvp(first, (z,), (jnp.ones_like(z),))


@dataclasses.dataclass(frozen=True)
class Linear:
    fn: Callable
    name: str
    keeps_diagonal: bool

    def apply(self, model, u):
        del model
        return self.fn(u)


def check_elementwise(fn: Callable, name: str) -> None:
    """Raise `Unsupported` unless `fn` acts entrywise (its Jacobian on a probe vector
    is diagonal and it keeps the shape)."""
    probe = np.linspace(-1.3, 1.7, 5)
    try:
        # Concrete even under an outer `jax.jit`: the probe is a constant.
        with jax.ensure_compile_time_eval():
            out = np.asarray(fn(jnp.asarray(probe)))
            jac = np.asarray(jax.jacfwd(fn)(jnp.asarray(probe)))
    except Exception as error:  # a function that fails on a vector cannot be used
        raise Unsupported(f"{name} ({fn!r}) cannot be evaluated on a vector: {error}")
    if out.shape != probe.shape or np.any(jac[~np.eye(5, dtype=bool)] != 0):
        raise Unsupported(
            f"{name} ({getattr(fn, '__name__', fn)!r}) is not an elementwise function"
        )


def make_pool(module) -> Linear:
    """A pooling layer as a `Linear` op."""
    if isinstance(module, (eqx.nn.MaxPool2d, eqx.nn.AvgPool2d)):
        stride = tuple(module.stride)
        kernel = tuple(module.kernel_size)
        pads = [p for pair in module.padding for p in pair]
        non_overlapping = all(s >= k for s, k in zip(stride, kernel))
        is_max = isinstance(module, eqx.nn.MaxPool2d)
        return Linear(
            module,
            type(module).__name__,
            keeps_diagonal=is_max and non_overlapping and not any(pads),
        )
    raise Unsupported(f"pooling layer {type(module).__name__}")


def make_param_layer(where, model, name: str) -> ParamLayer:
    """The layer at `where(model)` as a `ParamLayer` op."""
    layer = where(model)
    if isinstance(layer, eqx.nn.Linear):
        return ParamLayer(where, name, dense=True)
    if isinstance(layer, eqx.nn.Conv):
        return ParamLayer(where, name, dense=False)
    raise Unsupported(f"layer {name} of type {type(layer).__name__}")


def describe(model) -> list:
    """The chain of operations of `model`, or `Unsupported`. Traceable."""
    if not hasattr(model, "_layer_ops"):
        raise Unsupported(f"model of type {type(model).__name__} (no layered description)")
    return model._layer_ops()


def defining_class(cls: type, name: str) -> type | None:
    """The class in `cls`'s method resolution order that defines attribute `name`."""
    for klass in cls.__mro__:
        if name in vars(klass):
            return klass
    return None


def _check_covered(model, parts) -> None:
    covered = {
        id(leaf)
        for part in parts
        for leaf in jax.tree.leaves(eqx.filter(part, eqx.is_inexact_array))
    }
    for path, leaf in jax.tree_util.tree_flatten_with_path(eqx.filter(model, eqx.is_inexact_array))[
        0
    ]:
        if id(leaf) not in covered:
            raise Unsupported(f"parameter {jax.tree_util.keystr(path)} outside its description")


def check_supported(model) -> str:
    """Which structured kernel takes `model`: `"recurrent"` or `"layered"`; otherwise
    `Unsupported`. Checks what needs concrete values, so run outside `jax.jit`: the
    class that describes the model's structure also defines its `__call__` (a subclass
    that changes the forward pass is not described by its parent's structure), every
    floating-point array belongs to a described layer, and every activation is
    elementwise."""
    cls = type(model)
    for name, kind in (("_recurrent_chain", "recurrent"), ("_layer_ops", "layered")):
        if hasattr(model, name):
            owner = defining_class(cls, name)
            if defining_class(cls, "__call__") is not owner:
                raise Unsupported(
                    f"{cls.__name__} overrides `__call__` of {owner.__name__}, whose layer "
                    "structure the kernel would use"
                )
            break
    else:
        raise Unsupported(f"model of type {cls.__name__} (no layered description)")
    if kind == "recurrent":
        chain = model._recurrent_chain()
        _check_covered(model, (chain.cell(model), chain.head(model)))
        return kind
    ops = describe(model)
    for op in ops:
        if isinstance(op, Elementwise):
            check_elementwise(op.fn, op.name)
    _check_covered(model, [op.layer(model) for op in ops if isinstance(op, ParamLayer)])
    return kind
