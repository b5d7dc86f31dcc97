"""The checks and the preparation that every spectral function shares.

Each check raises a `TypeError` or `ValueError` naming the argument, before any heavy
work. The argument checks themselves are the shared ones of `curvzoo._run._checks`;
what is particular to the spectral functions (the choice of operator, the GGN's need
for a curvzoo loss, the batch split over a mesh) is here.
"""

import collections
import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree

from .._dispatch._costs import Profile, profile
from .._dispatch._plan import check_loss_output
from .._dispatch._signature import flatten, fresh
from .._losses import AbstractLoss
from .._run import _execute as execute
from .._run._checks import (
    check_batch,
    check_loss,
    check_model,
    check_positive_int,
    raise_non_finite,
    split_trainable,
)
from .._run._devices import check_mesh, host_value, place_batch, replicate
from .._run._execute import check_batch_values, remember
from .._run._memory import DEFAULT_MEMORY_BUDGET


OPERATORS = ("hessian", "ggn")


def require(module: str) -> ModuleType:
    """Import an optional dependency of the spectral tools, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"this function needs `{module}`, which is not installed; install curvzoo's "
            'spectral extra with `pip install "curvzoo[spectral]"`.'
        ) from error


def check_bool(value: Any, name: str) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be True or False, got {value!r}.")


def check_choice(value: Any, name: str, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")


def check_number(value: Any, name: str, *, positive: bool) -> float:
    """A real, finite Python number: `> 0` with `positive`, else `>= 0`."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise TypeError(f"`{name}` must be a real number, got {value!r}.")
    value = float(value)
    if not np.isfinite(value) or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"`{name}` must be a finite number {bound}, got {value}.")
    return value


def require_per_sample_form(loss: Any, operator: str) -> None:
    """The GGN is `scale * sum_n J_n^T H_n J_n`, built from the loss's split into
    `predict` and `per_sample`; a plain callable does not expose that split."""
    if operator != "ggn":
        return
    if not isinstance(loss, AbstractLoss):
        raise TypeError(
            "`operator='ggn'` needs a curvzoo loss (`curvzoo.losses.*` or a subclass of "
            "`curvzoo.losses.AbstractLoss`), which exposes its split into a prediction and "
            f"a per-sample loss; got a custom callable of type {type(loss).__name__}. Use "
            "`operator='hessian'` for any callable loss."
        )
    for klass in type(loss).__mro__:
        if "__call__" in vars(klass):
            if klass is not AbstractLoss:
                raise ValueError(
                    f"`loss` ({type(loss).__name__}) overrides `__call__`; the GGN is built "
                    "from the loss's per-sample form, `scale * sum of "
                    "per_sample(predict(model, inputs))`, which `__call__` then need not "
                    "compute. Use `operator='hessian'`."
                )
            break


def _check_loss_output(loss: Callable, model: eqx.Module, batch: PyTree) -> None:
    """As for the other functions (`curvzoo._dispatch._plan.check_loss_output`), and a
    curvzoo loss's batch values too (lengths, targets, token ids), where they are
    concrete, as every function checks them (`curvzoo._run._execute.check_batch_values`)."""
    prediction_shape = check_loss_output(loss, model, batch, None)
    if isinstance(loss, AbstractLoss):
        check_batch_values(loss, prediction_shape, batch, model, flatten(model)[1])


@eqx.filter_jit
def _finite_flags(tree: PyTree) -> jax.Array:
    leaves = [leaf for leaf in jax.tree.leaves(tree) if eqx.is_inexact_array(leaf)]
    return jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves])


def check_finite_inputs(model: eqx.Module, batch: PyTree) -> None:
    """Raise a `ValueError` naming the first leaf of `model` or `batch` that holds NaN
    or inf (one compiled pass and a few bytes to the host; skipped under a trace)."""
    tree = (model, batch)
    leaves = [leaf for leaf in jax.tree.leaves(tree) if eqx.is_inexact_array(leaf)]
    if not leaves or any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
        return
    if not host_value(_finite_flags(tree)).all():
        raise_non_finite({"model": model, "batch": batch})


def check_finite_result(values: jax.Array, name: str) -> None:
    """Raise where the inputs were finite but the result is not (the loss or its
    derivatives overflow); skipped under a trace."""
    if isinstance(values, jax.core.Tracer) or np.all(np.isfinite(host_value(values))):
        return
    raise ValueError(
        f"the result came out non-finite: `{name}` holds NaN or inf although `model` and "
        "`batch` are finite, so the loss or its derivatives overflow at this point (a log "
        "of zero, say). Pass `check_finite=False` to get the raw result."
    )


class Problem(NamedTuple):
    """What every spectral function needs once the arguments are checked."""

    model: eqx.Module  # replicated on `mesh` when one is given
    loss: Any  # a callable that is not an Equinox module: traced now (`fresh`)
    params: PyTree  # the trained leaves; `None` elsewhere
    static: PyTree
    batch: PyTree  # split over `mesh` when one is given
    size: int  # `P`, the number of trained parameters
    memory_budget: int


def prepare(
    model: Any,
    loss: Any,
    batch: Any,
    *,
    operator: Any,
    filter_spec: Any,
    memory_budget: Any,
    check_finite: Any,
    mesh: Any,
) -> Problem:
    """The checks that every spectral function shares, in the order a user would fix
    them, then the model and the batch placed on `mesh`."""
    check_model(model)
    check_mesh(model, mesh)
    check_loss(loss)
    check_choice(operator, "operator", OPERATORS)
    require_per_sample_form(loss, operator)
    size = check_batch(batch)
    check_positive_int(memory_budget, "memory_budget", allow_none=True)
    check_bool(check_finite, "check_finite")
    model = replicate(model, mesh)
    params, static = split_trainable(model, filter_spec)
    loss = fresh(loss, model, batch)
    _check_loss_output(loss, model, batch)
    if check_finite:
        check_finite_inputs(model, batch)
    # Split over the mesh, so that the sums over samples in every product become
    # all-reduces (leaves already on the mesh keep their sharding).
    batch = place_batch(batch, mesh, split=True, size=size)
    count = sum(int(np.prod(jnp.shape(leaf))) for leaf in jax.tree.leaves(params))
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else int(memory_budget)
    return Problem(model, loss, params, static, batch, count, budget)


_PRODUCT_WORK: collections.OrderedDict = collections.OrderedDict()  # per layouts


def _product_work(problem: Problem, operator: str) -> Profile:
    """The work (`Profile`) of one product with the operator, as traced (its linearisation
    counted with it: an upper bound where the tools linearise once)."""
    from ._operators import flat_product  # it imports this module

    def one(params, static, loss, batch):
        flat, _, product = flat_product(operator, params, static, loss, batch)
        return product(flat)

    return profile(one, problem.params, problem.static, problem.loss, problem.batch)


def warn_if_slow(problem: Problem, operator: str, products: int, what: str) -> None:
    """`SlowCurvatureWarning` where `products` products with the operator are estimated
    to take more than a minute (as for the diagonals: `curvzoo._run._execute`). One
    product's work is traced once per layout of the call."""
    key = tuple(
        flatten(part)[1] for part in (problem.params, problem.static, problem.loss, problem.batch)
    ) + (operator,)
    work = remember(_PRODUCT_WORK, key, lambda: _product_work(problem, operator))
    what = f"{what} ({products:,} {operator} products of P = {problem.size:,} on N samples)"
    execute.warn_if_slow(work * products, "generic", what, stacklevel=4)
