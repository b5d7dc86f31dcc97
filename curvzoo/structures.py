"""Registering a model's structure, so that the structured kernels take it.

A model type registers, once, a function that describes an instance as a chain of
operations on one example, `u_{i+1} = op_i(u_i)`:

```python
import curvzoo.structures as cs

class TwoLayer(eqx.Module):
    first: eqx.nn.Linear
    second: eqx.nn.Linear

    def __call__(self, x):
        return self.second(jnp.tanh(self.first(x)))

cs.register(TwoLayer, lambda model, example: cs.Layered((
    cs.layer(model, lambda m: m.first, "first"),
    cs.activation(jnp.tanh),
    cs.layer(model, lambda m: m.second, "second"),
)))
```

Then every curvzoo function takes `TwoLayer` on the layered kernel (Hessian, GGN and
both Fishers), as `curvzoo.plan` shows. This is how curvzoo registers `equinox.nn.MLP`
and `equinox.nn.Sequential` itself.

A description is trusted only once it has been checked, for every plan (every new set
of shapes): that every floating-point array of the model belongs to one of its layers;
that every activation is elementwise (its traced program and its derivatives', at the
shapes the model really uses); that the class registered is the one whose `__call__`
runs (a subclass that overrides it is not described by its parent's registration); and,
for a registration made here, that the chain computes what the model computes: both run
on random parameters of the model's shapes and a random example, and must agree to
rounding. A description that fails a check is not used: the call takes the generic
kernel, `curvzoo.plan` says why, and `method="structured"` raises that reason.
"""

from collections.abc import Callable
from typing import no_type_check

import equinox as eqx

from ._dispatch._structures import (
    Layered as Layered,
    param_layer,
    pool as _pool,
    register_declared,
    Unsupported as Unsupported,
)
from ._kernels._ops import Elementwise, Linear


@no_type_check  # the checks below name the argument
def register(cls: type, describe: Callable) -> None:
    """Register `describe(model, example) -> curvzoo.structures.Layered` as the
    structure of instances of `cls` (and of its subclasses that keep its `__call__`).

    **Arguments:**

    - `cls`: a subclass of `equinox.Module`.
    - `describe`: called with a model of type `cls` and one input example (an array or
        a `jax.ShapeDtypeStruct`: use its shape only), returning `Layered(ops)` with
        ops from `layer`, `activation`, `linear` and `pool`; or raising
        `curvzoo.structures.Unsupported("why")` for an instance it cannot describe
        (that call then takes the generic kernel, with the reason in its plan).

    A later registration of the same class replaces the earlier one.
    """
    if not (isinstance(cls, type) and issubclass(cls, eqx.Module)):
        raise TypeError(f"`cls` must be a subclass of `equinox.Module`, got {cls!r}.")
    if not callable(describe):
        raise TypeError(
            f"`describe` must be a function `describe(model, example) -> Layered`, got "
            f"{type(describe).__name__}."
        )
    register_declared(cls, describe)


@no_type_check  # the checks below name the argument
def layer(model: eqx.Module, where: Callable, name: str | None = None):
    """The `equinox.nn.Linear` or `equinox.nn.Conv` at `where(model)`, as an op
    (`where` is a function of the model, as for `equinox.tree_at`; `name` is how plans
    and errors refer to it). Any other layer type raises `Unsupported`."""
    if not callable(where):
        raise TypeError(f"`where` must be a function of the model, got {type(where).__name__}.")
    return param_layer(where, model, name or "layer")


@no_type_check  # the checks below name the argument
def activation(fn: Callable, name: str = "activation"):
    """An activation `fn` applied entrywise (`jnp.tanh`, `jax.nn.gelu`, ...), as an op:
    the only kind of op whose second derivative enters the Hessian. It is checked to be
    elementwise at the shapes the model uses."""
    if not callable(fn):
        raise TypeError(f"`fn` must be a function, got {type(fn).__name__}.")
    return Elementwise(fn, name)


@no_type_check  # the checks below name the argument
def linear(fn: Callable, name: str = "linear", *, keeps_diagonal: bool = False):
    """A map `fn` linear in its input and without parameters (a reshape, a flatten, a
    fixed projection), as an op. `keeps_diagonal=True` promises that it maps each input
    entry to at most one output entry, with weight one (a reshape or a transpose: the
    Hessian's diagonal then passes through it)."""
    if not callable(fn):
        raise TypeError(f"`fn` must be a function, got {type(fn).__name__}.")
    return Linear(fn, name, keeps_diagonal=bool(keeps_diagonal))


@no_type_check  # the checks below name the argument
def pool(module: eqx.Module, name: str = "pool"):
    """An `equinox.nn` pooling layer (max or average) as an op."""
    return _pool(module, name)
