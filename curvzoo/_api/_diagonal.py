"""`curvzoo.diagonal`: a curvature diagonal of any estimator, through one driver."""

from collections.abc import Callable
from typing import no_type_check

import equinox as eqx
from jax.sharding import Mesh
from jaxtyping import Array, PyTree

from .._estimators import AbstractEstimator, check_estimator, Estimate, Exact
from .._run._checks import check_key
from .._run._execute import evaluate
from ._options import check_bool, make_options


def check_estimator_options(
    estimator: AbstractEstimator, *, key, method, per_sample, return_stderr=False
) -> None:
    """The options that apply to `estimator`, checked: a random one needs `key`;
    `method` and `per_sample` only where the estimator has them; `return_stderr` only
    for Hutchinson with two probes or more. Each error names the argument."""
    kind = type(estimator)  # class attributes, read off the class (no instance lookup)
    name = kind.__name__
    if kind.random:
        if key is None:
            raise TypeError(
                f"`{name}` draws at random: `key` must be one JAX PRNG key, such as "
                "`jax.random.key(0)` (the same key gives the same result); got None."
            )
        check_key(key)
    elif key is not None:
        check_key(key)  # accepted (so one loop can pass it to every estimator), unused
    if not kind.has_method and method != "auto":
        raise ValueError(
            f"`method` does not apply to `{name}`, which takes one Hessian-vector product "
            f"per probe on any model; got `method={method!r}`. Leave it at 'auto'."
        )
    check_bool(per_sample, "per_sample")
    if per_sample and not kind.has_per_sample:
        raise ValueError(
            f"`per_sample=True` does not apply to `{name}`; the per-sample diagonals are "
            "those of `curvzoo.Exact()`, `curvzoo.GGN()` and `curvzoo.EmpiricalFisher()`."
        )
    check_bool(return_stderr, "return_stderr")
    if return_stderr:
        if not kind.has_stderr:
            raise ValueError(
                f"`return_stderr=True` applies to `curvzoo.Hutchinson`, got `{name}()`; for "
                "`curvzoo.Fisher`, compare estimates drawn with different keys."
            )
        if estimator.num_probes < 2:
            raise ValueError(
                "`return_stderr=True` needs `num_probes` >= 2 to estimate a spread, got "
                f"{estimator.num_probes}."
            )


@no_type_check
def diagonal(
    model: eqx.Module,
    loss: Callable,
    batch: PyTree,
    estimator: AbstractEstimator = Exact(),
    *,
    key: Array | None = None,
    return_stderr: bool = False,
    args: PyTree | None = None,
    filter_spec: PyTree | Callable = eqx.is_inexact_array,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    method: str = "auto",
    per_sample: bool = False,
    check_finite: bool = True,
    mesh: Mesh | None = None,
    progress: bool = False,
) -> PyTree:
    """The diagonal of a curvature matrix of `loss(model, batch)` with respect to the
    trainable parameters of `model`, as `estimator` defines it:

    - `curvzoo.Exact()` (default): the Hessian's, exactly; any loss.
    - `curvzoo.GGN()`: the generalised Gauss-Newton matrix's, exactly; a curvzoo loss.
    - `curvzoo.EmpiricalFisher()`: the empirical Fisher's (squared per-sample gradients);
        a curvzoo loss.
    - `curvzoo.Fisher(num_samples=1)`: the Fisher's, from targets drawn from the model
        (unbiased for the GGN's); a curvzoo loss and `key`.
    - `curvzoo.Hutchinson(num_probes=16, control_variate=None)`: the Hessian's, from
        random probes (unbiased); any loss (a curvzoo loss with the control variate
        `curvzoo.GGN()`) and `key`.

    Every estimator goes through the same driver: the call is checked, planned
    ([`curvzoo.plan`][] shows the plan; it is cached per shapes, dtypes, static parts
    and options, the estimator with its settings among them), run and its result
    verified. The functions [`curvzoo.hessian_diagonal`][], [`curvzoo.ggn_diagonal`][],
    [`curvzoo.empirical_fisher_diagonal`][], [`curvzoo.fisher_diagonal`][] and
    [`curvzoo.hutchinson_diagonal`][] (and the zoo models' methods) are this function
    with their estimator; their pages say what each computes and costs.

    **Arguments:**

    - `model`: any Equinox module (a zoo model or your own). It is not modified.
    - `loss`: a curvzoo loss such as `curvzoo.losses.cross_entropy`, or (for `Exact` and
        `Hutchinson` without a control variate) any callable
        `loss(model, batch) -> scalar`, traced at every call.
    - `batch`: a PyTree of arrays sharing a leading batch axis `N`; for curvzoo losses a
        pair `(inputs, targets)`, or a triple `(inputs, targets, lengths)` for sequences
        of different lengths (`curvzoo.losses`).
    - `estimator`: an estimator object, as in the table (default `curvzoo.Exact()`).
    - `key`: a JAX PRNG key, required by the random estimators (`Fisher`, `Hutchinson`);
        the same key gives the same result. The exact estimators accept it and do not
        use it, so one loop can pass it to every estimator.
    - `return_stderr`: for `Hutchinson` (with `num_probes >= 2`): return an
        [`curvzoo.Estimate`][] `(value, stderr)` instead of the value alone.
    - `args`, `filter_spec`, `chunk_size`, `memory_budget`, `check_finite`, `mesh`,
        `progress`: as for [`curvzoo.hessian_diagonal`][].
    - `method`: `"auto"` (default), `"structured"` or `"generic"`, as for
        [`curvzoo.hessian_diagonal`][] (the GGN family: [`curvzoo.ggn_diagonal`][]); not
        for `Hutchinson`.
    - `per_sample`: for `Exact`, `GGN` and `EmpiricalFisher`: one diagonal per sample,
        as for [`curvzoo.hessian_diagonal`][].

    **Returns:**

    A PyTree with the structure of `equinox.filter(model, filter_spec)`: at each trained
    leaf an array of that leaf's shape and dtype, `None` elsewhere (with
    `per_sample=True`, each array gains a leading axis of size `N`); with
    `return_stderr=True`, an [`curvzoo.Estimate`][] of two such PyTrees.

    **Raises:** a `TypeError` or `ValueError` naming the argument, for an estimator
    class or string instead of an object, a missing `key`, or an option that does not
    apply to the estimator, and as [`curvzoo.hessian_diagonal`][] for the rest.

    **Example:**

    ```python
    for estimator in (curvzoo.Exact(), curvzoo.GGN(), curvzoo.Hutchinson(num_probes=64)):
        diag = curvzoo.diagonal(model, curvzoo.losses.mse, (x, y), estimator, key=key)
    ```
    """
    estimator = check_estimator(estimator)
    check_estimator_options(
        estimator, key=key, method=method, per_sample=per_sample, return_stderr=return_stderr
    )
    options = make_options(
        method=method, per_sample=per_sample, chunk_size=chunk_size,
        memory_budget=memory_budget, check_finite=check_finite, progress=progress, mesh=mesh,
        estimator=estimator,
    )  # fmt: skip
    result = evaluate(
        model, loss, batch, key=key if type(estimator).random else None, options=options,
        filter_spec=filter_spec, args=args,
    )  # fmt: skip
    if type(estimator).has_stderr:
        value, stderr = result
        return Estimate(value, stderr) if return_stderr else value
    return result
