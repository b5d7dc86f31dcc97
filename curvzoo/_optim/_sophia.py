"""Sophia (Liu et al. 2023): momentum over a clipped, lazily refreshed running mean of a
diagonal curvature estimate."""

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, no_type_check

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Int

# The public functions are looked up when called (`curvzoo` is still loading now).
import curvzoo

from .._estimators import from_names
from . import _curvature
from ._chain import with_learning_rate
from ._checks import (
    check_callable_options,
    check_learning_rate,
    check_loss,
    check_options,
    check_positive_int,
    check_real,
)
from ._moments import ema, zeros_like


_ESTIMATORS = ("gnb", "ggn", "hutchinson")
_SETTINGS = ("num_samples", "num_probes", "control_variate")  # an estimator's own fields


class SophiaState(NamedTuple):
    """The state of [`curvzoo.optim.scale_by_sophia`][].

    - `count`: the number of updates so far, an `int32` scalar. The curvature is
        refreshed on the updates where `count % k == 0` before the update: the first,
        then every `k`-th.
    - `mu`: the running mean of the updates (gradients), shaped like the parameters.
    - `hessian`: the running mean `h` of the curvature estimates, shaped like the
        parameters; it changes only on refresh steps.
    """

    count: Int[Array, ""]
    mu: optax.Updates
    hessian: optax.Updates


def _estimator(estimator, loss, options: dict):
    """`(estimate, needs_key)` for `estimator`: an estimator object, or one of the
    names `"gnb"` (`Fisher`), `"ggn"` (`GGN`) and `"hutchinson"` (`Hutchinson` with
    `num_probes` from `options`, default 1)."""
    label = f"`estimator={estimator!r}`"
    if isinstance(estimator, curvzoo.AbstractEstimator):
        if any(name in options for name in _SETTINGS):
            raise TypeError(
                "`curvature_options` may not set `num_probes`, `num_samples` or "
                f"`control_variate` with an estimator object ({estimator!r}): they are the "
                "estimator's own fields."
            )
    else:
        if not isinstance(estimator, str) or estimator not in _ESTIMATORS:
            raise ValueError(
                f"`estimator` must be an estimator object (`curvzoo.Fisher()`, "
                f"`curvzoo.GGN()`, `curvzoo.Hutchinson(num_probes=1)`, ...) or one of "
                f"{_ESTIMATORS}, got {estimator!r}."
            )
        options = dict(options)
        quantity = {"gnb": "fisher", "ggn": "ggn", "hutchinson": "hutchinson"}[estimator]
        check_callable_options(getattr(curvzoo, f"{quantity}_diagonal"), options)
        settings = {name: options.pop(name) for name in _SETTINGS if name in options}
        estimator = from_names(quantity, **settings)
    if estimator.needs_per_sample_form and loss is not None:
        if not isinstance(loss, curvzoo.losses.AbstractLoss):
            raise TypeError(
                f"{label} needs a curvzoo loss (`curvzoo.losses.*`), which "
                "exposes the per-sample form that the GGN and the Fisher are built from; "
                f"got a custom callable of type {type(loss).__name__}. Use "
                "`estimator=curvzoo.Hutchinson()` for a plain callable."
            )
    check_callable_options(curvzoo.diagonal, options)
    return _curvature.of_estimator(estimator, options), estimator.random


# The settings are checked below with errors that name them, so the test-time runtime
# type checker is kept out of the way.
@no_type_check
def scale_by_sophia(
    *,
    b1: float = 0.965,
    b2: float = 0.99,
    gamma: float = 0.01,
    eps: float = 1e-12,
    k: int = 10,
    loss: Callable | None = None,
    estimator: "str | curvzoo.AbstractEstimator" = "gnb",
    curvature_options: Mapping[str, Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Scale updates as Sophia does (Liu, Li, Hall, Liang and Ma 2023, "Sophia: A
    Scalable Stochastic Second-order Optimizer for Language Model Pre-training"): a
    running mean `m` of the updates, divided by a running mean `h` of a diagonal
    curvature estimate `h_hat`, and clipped entry by entry,

        m <- b1 m + (1 - b1) g                                   (every step)
        h <- b2 h + (1 - b2) h_hat     on steps 1, k + 1, 2k + 1, ... (else h is kept)
        update = clip(m / max(gamma * h, eps), -1, 1).

    As in the paper, neither average is bias-corrected: `h` starts at zero, so the
    first steps are mostly clipped, sign-of-momentum steps. Chained with a learning
    rate `lr`, no entry moves by more than `lr` per step; where the curvature is large
    and reliable the step is the Newton-like `(lr / gamma) * m / h`. A negative or
    zero `h` (possible with Hutchinson's estimate) gives the clipped step too.

    **Arguments:**

    - `b1`: the decay of the running mean of the updates, in `[0, 1)`.
    - `b2`: the decay of the running mean of the curvature, in `[0, 1)`, applied once
        per refresh.
    - `gamma`: the curvature's scale in the denominator, `> 0`: the clip is reached
        where `|m| >= gamma * h`. Tune it with the learning rate (the paper tunes it
        per model, in the range 0.01 to 0.05).
    - `eps`: the floor of the denominator, `> 0`.
    - `k`: refresh the curvature every `k` steps (a positive integer; 1 refreshes every
        step).
    - `loss`: `None` (default), to pass `h_hat` to `update` as `curvature=`; or a loss,
        so that `update` computes `h_hat` itself from `model=`, `batch=` (and `key=`)
        with `estimator`, only on refresh steps (`jax.lax.cond`).
    - `estimator`: what `h_hat` is when computed here: an estimator object
        (`curvzoo.Fisher()`, `curvzoo.GGN()`, `curvzoo.Hutchinson(num_probes=1)`, any
        of [`curvzoo.diagonal`][]'s, with its settings as its fields), or one of the
        names:
        - `"gnb"` (default): the paper's Gauss-Newton-Bartlett estimator, the Fisher
          diagonal at labels drawn from the model's predictive distribution, with
          [`curvzoo.fisher_diagonal`][] (one draw per sample; `num_samples` in
          `curvature_options` for more). The paper squares the gradient of the whole
          batch's loss and multiplies by the batch size; curvzoo sums squared
          per-sample gradients instead, which has the same expectation (the GGN
          diagonal) and no cross-sample terms, so a lower variance, at about the same
          cost for the zoo `MLP` and `CNN`. Needs a curvzoo loss and `key`.
        - `"ggn"`: the exact GGN diagonal, [`curvzoo.ggn_diagonal`][] (no `key`; needs
          a curvzoo loss).
        - `"hutchinson"`: the paper's Sophia-H, Hutchinson's estimate of the Hessian
          diagonal with one Rademacher probe (`num_probes` in `curvature_options` for
          more), [`curvzoo.hutchinson_diagonal`][] (needs `key`; any callable loss).
    - `curvature_options`: further keyword arguments for the curvzoo function, such as
        `memory_budget`; not `key` or `filter_spec`, which are set here, nor
        `per_sample` or `return_stderr`.

    **Returns:**

    An `optax.GradientTransformationExtraArgs`. Its `init(params)` returns a
    [`curvzoo.optim.SophiaState`][] with zeros shaped like `params` (`None` stays
    `None`); its `update(updates, state, params=None, *, curvature=None, model=None,
    batch=None, key=None, **extra_args)` takes the estimate either as `curvature`, a
    PyTree shaped like `updates` with `None` where `updates` is `None`, passed on
    every call and read only on refresh steps, or, with `loss`, computes it from
    `model` (the Equinox module whose gradient `updates` is, as
    `equinox.filter_grad` returns it), `batch` and `key` (needed on every call with a
    random estimator, used on refresh steps). Other extra arguments are ignored. It
    is a pure function of its inputs and can be jitted with the training step.

    **Cost:** the elementwise work of Adam on every step, and on one step in `k` the
    estimate: about two gradients for `"gnb"` and `"hutchinson"` on a zoo `MLP`,
    `C` vector-Jacobian products per sample for `"ggn"` on other models (see
    [`curvzoo.ggn_diagonal`][]). Memory: two parameter-sized moments.
    """
    check_real(b1, "b1", low=0, high=1, high_open=True)
    check_real(b2, "b2", low=0, high=1, high_open=True)
    check_real(gamma, "gamma", low=0, low_open=True)
    check_real(eps, "eps", low=0, low_open=True)
    check_positive_int(k, "k")
    check_loss(loss)
    reserved = ("key", "filter_spec", "per_sample", "return_stderr")
    options = check_options(curvature_options, reserved)
    estimate, needs_key = _estimator(estimator, loss, options)

    def init(params):
        zeros = zeros_like(params)
        return SophiaState(jnp.zeros((), jnp.int32), zeros, zeros)

    def update(updates, state, params=None, *, curvature=None, model=None, batch=None,
               key=None, **extra_args):  # fmt: skip
        del params, extra_args
        refresh = state.count % k == 0

        def fresh():
            return _curvature.get_curvature(
                updates, owner="scale_by_sophia", curvature=curvature, model=model,
                batch=batch, key=key, loss=loss, estimate=estimate, needs_key=needs_key,
            )  # fmt: skip

        if curvature is None and loss is not None:
            # Computed here, on refresh steps only; both branches in the updates' dtypes.
            def computed():
                return jax.tree.map(lambda c, u: c.astype(u.dtype), fresh(), updates)

            h_hat = jax.lax.cond(refresh, computed, lambda: jax.tree.map(jnp.zeros_like, updates))
        else:
            h_hat = fresh()
        hessian = jax.tree.map(
            lambda h, new: jnp.where(refresh, new, h), state.hessian, ema(state.hessian, h_hat, b2)
        )
        mu = ema(state.mu, updates, b1)
        scaled = jax.tree.map(
            lambda m, h: jnp.clip(m / jnp.maximum(gamma * h, eps), -1, 1), mu, hessian
        )
        count = optax.safe_int32_increment(state.count)
        return scaled, SophiaState(count, mu, hessian)

    return optax.GradientTransformationExtraArgs(init, update)


@no_type_check
def sophia(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.965,
    b2: float = 0.99,
    gamma: float = 0.01,
    eps: float = 1e-12,
    k: int = 10,
    weight_decay: float = 0.0,
    loss: Callable | None = None,
    estimator: "str | curvzoo.AbstractEstimator" = "gnb",
    curvature_options: Mapping[str, Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
    """The Sophia optimiser (Liu et al. 2023): [`curvzoo.optim.scale_by_sophia`][],
    then, if `weight_decay` is not 0, decoupled weight decay, then a step of
    `-learning_rate`: `params <- params - learning_rate * (update + weight_decay *
    params)`, the paper's `theta <- theta - lr * weight_decay * theta` followed by the
    clipped step.

    **Arguments:**

    - `learning_rate`: a float or an optax schedule: the largest move of any entry in
        one step (plus the weight decay).
    - `weight_decay`: the decoupled weight decay (default 0: no decay step is chained,
        and `update` needs no `params`).
    - the others: as for [`curvzoo.optim.scale_by_sophia`][].

    **Returns:**

    An `optax.GradientTransformationExtraArgs` whose `update` takes the same extra
    arguments as [`curvzoo.optim.scale_by_sophia`][]'s, and `params` when
    `weight_decay` is not 0.

    **Example:**

    ```python
    optimiser = curvzoo.optim.sophia(1e-3, loss=curvzoo.losses.cross_entropy)
    updates, state = optimiser.update(grads, state, model=model, batch=batch, key=key)
    ```
    """
    check_learning_rate(learning_rate)
    check_real(weight_decay, "weight_decay")
    scale = scale_by_sophia(
        b1=b1, b2=b2, gamma=gamma, eps=eps, k=k, loss=loss, estimator=estimator,
        curvature_options=curvature_options,
    )  # fmt: skip
    return with_learning_rate(scale, learning_rate, weight_decay)
