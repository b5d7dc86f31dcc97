"""AdaHessian (Yao et al. 2021): Adam's moments with a Hutchinson estimate of the
Hessian diagonal in place of the squared gradient."""

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, no_type_check

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Int, PyTree

# The public functions are looked up when called (`curvzoo` is still loading now).
import curvzoo

from .._estimators import from_names
from . import _curvature
from ._chain import with_learning_rate
from ._checks import (
    check_bool,
    check_callable_options,
    check_learning_rate,
    check_loss,
    check_options,
    check_positive_int,
    check_real,
)
from ._moments import ema, precondition, zeros_like


class AdaHessianState(NamedTuple):
    """The state of [`curvzoo.optim.scale_by_adahessian`][].

    - `count`: the number of updates so far, an `int32` scalar.
    - `mu`: the running mean of the updates (gradients), shaped like the parameters.
    - `nu`: the running mean of the squared, spatially averaged curvature, shaped like
        the parameters.
    """

    count: Int[Array, ""]
    mu: optax.Updates
    nu: optax.Updates


def _spatial_average(curvature: PyTree) -> PyTree:
    """`|D|`, averaged over the axes from 2 on of every leaf of three or more dimensions
    (the spatial axes of an Equinox convolution kernel) and broadcast back."""

    def average(leaf):
        magnitude = jnp.abs(leaf)
        if magnitude.ndim < 3:
            return magnitude
        axes = tuple(range(2, magnitude.ndim))
        return jnp.broadcast_to(jnp.mean(magnitude, axis=axes, keepdims=True), leaf.shape)

    return jax.tree.map(average, curvature)


# The settings are checked below with errors that name them, so the test-time runtime
# type checker is kept out of the way.
@no_type_check
def scale_by_adahessian(
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-4,
    hessian_power: float = 1.0,
    spatial_average: bool = True,
    loss: Callable | None = None,
    num_probes: int = 1,
    curvature_options: Mapping[str, Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Scale updates as AdaHessian does (Yao, Gholami, Shen, Mustafa, Keutzer and
    Mahoney 2021, "ADAHESSIAN: An Adaptive Second Order Optimizer for Machine
    Learning"): a bias-corrected running mean of the updates over the
    `hessian_power`-th power of a bias-corrected running root mean square of a
    Hutchinson estimate `D` of the Hessian diagonal,

        D_s = spatial_average(|D|)           (or |D| with spatial_average=False)
        m <- b1 m + (1 - b1) g,    v <- b2 v + (1 - b2) D_s^2
        update = m_hat / (sqrt(v_hat)^hessian_power + eps),

    with `m_hat = m / (1 - b1^t)` and `v_hat = v / (1 - b2^t)` at step `t`. Chain it
    with `optax.scale_by_learning_rate` (or use [`curvzoo.optim.adahessian`][]).

    **Arguments:**

    - `b1`: the decay of the running mean of the updates, in `[0, 1)`.
    - `b2`: the decay of the running mean of `D_s^2`, in `[0, 1)`.
    - `eps`: added to the denominator, `> 0`: the step is at most `|m_hat| / eps`
        where the curvature is near zero. The paper's value, `1e-4`, is the default.
    - `hessian_power`: `k` in `(0, 1]`. `1` is the paper's default; smaller powers move
        towards a curvature-free step (`k -> 0` is momentum SGD scaled by
        `1 / (1 + eps)`).
    - `spatial_average`: whether to average `|D|` over each convolution kernel's
        spatial axes, as the paper does. A leaf of three or more dimensions is read in
        Equinox's convolution layout `(out_channels, in_channels, *spatial)`
        (`equinox.nn.Conv1d/2d/3d`): `|D|` is averaged over its axes from 2 on, so the
        entries of one `(out, in)` filter share one value. Leaves of fewer dimensions
        (dense weights, biases) keep `|D|` entry by entry, a block of one, as in the
        paper's code; an Equinox convolution's bias, `(out_channels, 1, ..., 1)`, is
        averaged over axes of size one, which changes nothing. Averaging lowers the
        variance of a one-probe estimate where one filter's entries have similar
        curvature. Leave it off for other layouts.
    - `loss`: `None` (default), to pass `D` to `update` as `curvature=`; or a curvzoo
        loss or callable `loss(model, batch) -> scalar`, so that `update` computes `D`
        itself from `model=`, `batch=` and `key=` with
        [`curvzoo.hutchinson_diagonal`][].
    - `num_probes`: Rademacher probes per step when the estimate is computed here
        (default 1, as in the paper).
    - `curvature_options`: further keyword arguments for
        [`curvzoo.hutchinson_diagonal`][], such as `memory_budget` or
        `control_variate="ggn"`; not `key`, `num_probes` or `filter_spec`, which are set
        here, nor `return_stderr`.

    **Returns:**

    An `optax.GradientTransformationExtraArgs`. Its `init(params)` returns an
    [`curvzoo.optim.AdaHessianState`][] with zeros shaped like `params` (`None` stays
    `None`); its `update(updates, state, params=None, *, curvature=None, model=None,
    batch=None, key=None, **extra_args)` takes the curvature either as `curvature`, a
    PyTree shaped like `updates` with `None` where `updates` is `None` (a frozen leaf),
    or, with `loss`, computes it from `model` (the Equinox module whose gradient
    `updates` is, with `None` at untrained leaves as `equinox.filter_grad` returns),
    `batch` and `key` (a fresh key each step). Other extra arguments are ignored, as
    in `optax.chain`. It is a pure function of its inputs and can be jitted with the
    training step.

    **Cost:** per step, the elementwise work of Adam plus the curvature: one
    Hessian-vector product per probe (about two gradients) when computed here.
    Memory: two parameter-sized moments.
    """
    check_real(b1, "b1", low=0, high=1, high_open=True)
    check_real(b2, "b2", low=0, high=1, high_open=True)
    check_real(eps, "eps", low=0, low_open=True)
    check_real(hessian_power, "hessian_power", low=0, high=1, low_open=True)
    check_bool(spatial_average, "spatial_average")
    check_loss(loss)
    check_positive_int(num_probes, "num_probes")
    reserved = ("key", "num_probes", "filter_spec", "return_stderr")
    options = check_options(curvature_options, reserved)
    check_callable_options(curvzoo.hutchinson_diagonal, options)
    control = options.pop("control_variate", None)
    estimator = from_names("hutchinson", num_probes=num_probes, control_variate=control)
    estimate = _curvature.of_estimator(estimator, options)

    def init(params):
        zeros = zeros_like(params)
        return AdaHessianState(jnp.zeros((), jnp.int32), zeros, zeros)

    def update(updates, state, params=None, *, curvature=None, model=None, batch=None,
               key=None, **extra_args):  # fmt: skip
        del params, extra_args
        curvature = _curvature.get_curvature(
            updates, owner="scale_by_adahessian", curvature=curvature, model=model,
            batch=batch, key=key, loss=loss, estimate=estimate, needs_key=True,
        )  # fmt: skip
        if spatial_average:
            curvature = _spatial_average(curvature)
        else:
            curvature = jax.tree.map(jnp.abs, curvature)
        count = optax.safe_int32_increment(state.count)
        mu = ema(state.mu, updates, b1)
        nu = ema(state.nu, jax.tree.map(jnp.square, curvature), b2)
        scaled = precondition(mu, nu, count, b1, b2, eps, hessian_power)
        return scaled, AdaHessianState(count, mu, nu)

    return optax.GradientTransformationExtraArgs(init, update)


@no_type_check
def adahessian(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-4,
    hessian_power: float = 1.0,
    spatial_average: bool = True,
    weight_decay: float = 0.0,
    loss: Callable | None = None,
    num_probes: int = 1,
    curvature_options: Mapping[str, Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
    """The AdaHessian optimiser (Yao et al. 2021): [`curvzoo.optim.scale_by_adahessian`][],
    then, if `weight_decay` is not 0, decoupled weight decay as in AdamW
    (`optax.add_decayed_weights`), then a step of `-learning_rate`:
    `params <- params - learning_rate * (update + weight_decay * params)`.

    **Arguments:**

    - `learning_rate`: a float or an optax schedule. The paper's default is `0.15`.
    - `weight_decay`: the decoupled weight decay (default 0: no decay step is chained,
        and `update` needs no `params`).
    - the others: as for [`curvzoo.optim.scale_by_adahessian`][].

    **Returns:**

    An `optax.GradientTransformationExtraArgs` whose `update` takes the same extra
    arguments as [`curvzoo.optim.scale_by_adahessian`][]'s, and `params` when
    `weight_decay` is not 0.

    **Example:**

    ```python
    optimiser = curvzoo.optim.adahessian(0.1, loss=curvzoo.losses.mse)
    state = optimiser.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, state, batch, key):
        grads = eqx.filter_grad(curvzoo.losses.mse)(model, batch)
        updates, state = optimiser.update(
            grads, state, model=model, batch=batch, key=key
        )
        return eqx.apply_updates(model, updates), state
    ```
    """
    check_learning_rate(learning_rate)
    check_real(weight_decay, "weight_decay")
    scale = scale_by_adahessian(
        b1=b1, b2=b2, eps=eps, hessian_power=hessian_power, spatial_average=spatial_average,
        loss=loss, num_probes=num_probes, curvature_options=curvature_options,
    )  # fmt: skip
    return with_learning_rate(scale, learning_rate, weight_decay)
