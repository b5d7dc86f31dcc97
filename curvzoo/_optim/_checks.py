"""Checks of the optimisers' settings, with errors that name the setting."""

import inspect
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp


def check_real(
    value: Any,
    name: str,
    *,
    low: int | float | None = None,
    high: int | float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    hint: str = "",
) -> None:
    """`value` must be a real number (a Python number or a 0-d array) in the interval
    given by `low`, `high` and whether each end is open. Traced values (hyperparameters
    injected with `optax.inject_hyperparams` under `jax.jit`) are not range-checked."""
    is_scalar_array = (
        eqx.is_array(value)
        and jnp.ndim(value) == 0
        and (jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer))
    )
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) or is_scalar_array):
        raise TypeError(f"`{name}` must be a real number, got {value!r}.{hint}")
    if isinstance(value, jax.core.Tracer):
        return
    number = float(value)
    inside = True
    if low is not None:
        inside &= number > low if low_open else number >= low
    if high is not None:
        inside &= number < high if high_open else number <= high
    if not inside or number != number:  # NaN is never inside
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        low_text = "-inf" if low is None else f"{low:g}"
        high_text = "inf" if high is None else f"{high:g}"
        raise ValueError(
            f"`{name}` must be in {left}{low_text}, {high_text}{right}, got {number!r}.{hint}"
        )


def check_positive_int(value: Any, name: str, *, hint: str = "") -> None:
    """A Python integer, or a 0-d integer array (as `optax.inject_hyperparams` passes
    it; traced ones are not range-checked), of at least 1."""
    is_array = (
        eqx.is_array(value) and jnp.ndim(value) == 0 and jnp.issubdtype(value.dtype, jnp.integer)
    )
    if isinstance(value, bool) or not (isinstance(value, numbers.Integral) or is_array):
        raise TypeError(f"`{name}` must be a positive integer, got {value!r}.{hint}")
    if isinstance(value, jax.core.Tracer):
        return
    if value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.{hint}")


def check_bool(value: Any, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False, got {value!r}.")


def check_learning_rate(value: Any) -> None:
    """A number or an optax schedule (a callable of the step count)."""
    if callable(value):
        return
    check_real(
        value,
        "learning_rate",
        hint=" Pass a float, or a schedule such as `optax.cosine_decay_schedule(...)`.",
    )


def check_loss(loss: Any) -> None:
    if isinstance(loss, type):
        raise TypeError(
            f"`loss` must be a loss object, got the class {loss.__name__}; pass an "
            f"instance such as `{loss.__name__}()`."
        )
    if loss is not None and not callable(loss):
        raise TypeError(
            "`loss` must be None (the curvature is then passed to `update` as "
            "`curvature=`), a curvzoo loss such as `curvzoo.losses.mse`, or a callable "
            f"`loss(model, batch) -> scalar`; got {loss!r}."
        )


def check_options(options: Any, reserved: tuple[str, ...]) -> dict:
    """`curvature_options`: `None` or a mapping of keyword arguments for the curvzoo
    function, without the ones the optimiser sets itself."""
    if options is None:
        return {}
    if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
        raise TypeError(
            "`curvature_options` must be None or a mapping from keyword names to values, "
            f"such as `{{'memory_budget': 2**26}}`; got {options!r}."
        )
    clash = sorted(set(options) & set(reserved))
    if clash:
        raise ValueError(
            f"`curvature_options` must not set {', '.join(f'`{k}`' for k in clash)}: the "
            "optimiser sets `key` (from `update`'s `key=`), `filter_spec` (from the "
            "leaves `updates` holds) and `num_probes` (from its own argument) itself, and "
            "needs one diagonal shaped like the updates (no `per_sample`, no "
            "`return_stderr`)."
        )
    return dict(options)


def check_callable_options(fn: Callable, options: dict) -> None:
    """Unknown keyword names fail now, not at the first `update`."""
    accepted = inspect.signature(fn).parameters
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"`curvature_options` has {', '.join(f'`{k}`' for k in unknown)}, which "
            f"`curvzoo.{fn.__name__}` does not take."
        )
