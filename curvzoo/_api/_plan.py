"""`curvzoo.plan`: which kernel a call will take, why, and what it will cost."""

from collections.abc import Callable
from typing import no_type_check

import equinox as eqx
import jax
from jax.sharding import Mesh
from jaxtyping import PyTree

from .._dispatch._plan import Plan, QUANTITIES
from .._run._checks import check_positive_int
from .._run._execute import plan_of
from ._options import make_options


@no_type_check
def plan(
    model: eqx.Module,
    loss: Callable,
    batch: PyTree,
    *,
    quantity: str = "hessian",
    method: str = "auto",
    per_sample: bool = False,
    args: PyTree | None = None,
    filter_spec: PyTree | Callable = eqx.is_inexact_array,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    mesh: Mesh | None = None,
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
        `mesh`: as for the function of `quantity` (see [`curvzoo.hessian_diagonal`][]).
    - `quantity`: `"hessian"` ([`curvzoo.hessian_diagonal`][], default), `"ggn"`,
        `"empirical_fisher"`, `"fisher"` or `"hutchinson"`.
    - `method`, `per_sample`: as for the function (`"hessian"`, `"ggn"`,
        `"empirical_fisher"`; `method` for `"fisher"` too).
    - `num_samples` (`"fisher"`), `num_probes` and `control_variate` (`"hutchinson"`).

    **Returns:**

    A [`curvzoo.Plan`][]; its `repr` reads at a glance.

    **Raises:** the errors the function itself would raise for the same arguments.

    **Example:**

    ```python
    print(curvzoo.plan(model, curvzoo.losses.cross_entropy, (x, labels)))
    ```
    """
    if quantity not in QUANTITIES:
        raise ValueError(f"`quantity` must be one of {tuple(QUANTITIES)}, got {quantity!r}.")
    key = None
    if quantity == "fisher":
        check_positive_int(num_samples, "num_samples")
        key = jax.random.key(0)
    if quantity == "hutchinson":
        check_positive_int(num_probes, "num_probes")
        if control_variate not in (None, "ggn"):
            raise ValueError(f"`control_variate` must be None or 'ggn', got {control_variate!r}.")
        key = jax.random.key(0)
    options = make_options(
        method=method, per_sample=per_sample, chunk_size=chunk_size,
        memory_budget=memory_budget, mesh=mesh, num_samples=num_samples,
        num_probes=num_probes, control_variate=control_variate,
    )  # fmt: skip
    return plan_of(
        quantity, model, loss, batch, key=key, options=options, filter_spec=filter_spec,
        args=args,
    )  # fmt: skip
