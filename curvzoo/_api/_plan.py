"""`curvzoo.plan`: which kernel a call will take, why, and what it will cost."""

from collections.abc import Callable
from typing import no_type_check

import equinox as eqx
import jax
from jax.sharding import Mesh
from jaxtyping import PyTree

from .._dispatch._plan import Plan
from .._estimators import AbstractEstimator, BY_QUANTITY, check_estimator, from_names
from .._run._execute import plan_of
from ._diagonal import check_estimator_options
from ._options import make_options


@no_type_check
def plan(
    model: eqx.Module,
    loss: Callable,
    batch: PyTree,
    estimator: AbstractEstimator | None = None,
    *,
    method: str = "auto",
    per_sample: bool = False,
    args: PyTree | None = None,
    filter_spec: PyTree | Callable = eqx.is_inexact_array,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    mesh: Mesh | None = None,
    quantity: str | None = None,
    num_samples: int = 1,
    num_probes: int = 1,
    control_variate: str | None = None,
) -> Plan:
    """The plan of a curvature call, without running it: the kernel it takes, why no
    faster one applies, its estimated multiply-adds, run time and working memory, and
    how it is chunked.

    Every function builds its plan through the same path and runs it, so this is
    exactly what the call would do. Plans are cached per shapes, dtypes, static parts
    and options: a later call with the same shapes finds it ready.

    **Arguments:**

    - `model`, `loss`, `batch`, `args`, `filter_spec`, `chunk_size`, `memory_budget`,
        `mesh`, `method`, `per_sample`: as for [`curvzoo.diagonal`][].
    - `estimator`: the estimator of the call, as for [`curvzoo.diagonal`][] (default
        `curvzoo.Exact()`); a random one needs no key here.
    - `quantity`, `num_samples`, `num_probes`, `control_variate`: the older way to name
        the estimator (instead of `estimator`): `quantity` is `"hessian"`, `"ggn"`,
        `"empirical_fisher"`, `"fisher"` (with `num_samples`) or `"hutchinson"` (with
        `num_probes` and `control_variate`, `None` or `"ggn"`).

    **Returns:**

    A [`curvzoo.Plan`][]; its `repr` reads at a glance.

    **Raises:** the errors the function itself would raise for the same arguments.

    **Example:**

    ```python
    print(curvzoo.plan(model, curvzoo.losses.cross_entropy, (x, labels), curvzoo.GGN()))
    ```
    """
    if estimator is not None and quantity is not None:
        raise TypeError(
            "`curvzoo.plan` got both `estimator` and `quantity`: pass the estimator object "
            f"alone (for `quantity={quantity!r}`, `curvzoo.{BY_QUANTITY[quantity].__name__}()`)"
            if quantity in BY_QUANTITY
            else "`curvzoo.plan` got both `estimator` and `quantity`: pass the estimator alone."
        )
    if estimator is None:
        estimator = from_names(
            "hessian" if quantity is None else quantity, num_samples=num_samples,
            num_probes=num_probes, control_variate=control_variate,
        )  # fmt: skip
    estimator = check_estimator(estimator)
    key = jax.random.key(0) if estimator.random else None
    check_estimator_options(estimator, key=key, method=method, per_sample=per_sample)
    options = make_options(
        method=method, per_sample=per_sample, chunk_size=chunk_size,
        memory_budget=memory_budget, mesh=mesh, estimator=estimator,
    )  # fmt: skip
    return plan_of(model, loss, batch, key=key, options=options, filter_spec=filter_spec, args=args)
