"""The operations of a layered model, as the structured kernel reads them.

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

The chains themselves come from the structure registry (`curvzoo/_dispatch/_structures.py`).
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


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


@dataclasses.dataclass(frozen=True)
class Elementwise:
    """An activation applied entrywise. `has_residual` is false for activations whose
    second derivative is zero wherever they are differentiable (ReLU, ReLU6, hard tanh):
    their residual then vanishes and is skipped."""

    fn: Callable
    name: str
    has_residual: bool = True

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
