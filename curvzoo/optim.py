"""Diagonal second-order optimisers as optax transformations.

Three preconditioners, each a `scale_by_*` transformation and an optimiser that chains
it with a learning rate, as `optax.adam` chains `optax.scale_by_adam`:

- [`scale_by_diagonal_newton`][curvzoo.optim.scale_by_diagonal_newton] /
  [`diagonal_newton`][curvzoo.optim.diagonal_newton]: the gradient over the exact
  Hessian diagonal's magnitude, damped and optionally clipped (Becker and LeCun 1988);
- [`scale_by_adahessian`][curvzoo.optim.scale_by_adahessian] /
  [`adahessian`][curvzoo.optim.adahessian]: Adam's moments over a Hutchinson estimate,
  with spatial averaging and a Hessian power (Yao et al. 2021);
- [`scale_by_sophia`][curvzoo.optim.scale_by_sophia] /
  [`sophia`][curvzoo.optim.sophia]: momentum over a lazily refreshed running mean of a
  GGN, Fisher or Hutchinson diagonal, clipped (Liu et al. 2023).

How they are built, and why:

- **The curvature is an extra argument of `update`.** Each is an
  `optax.GradientTransformationExtraArgs`: the curvature is data of the step, like the
  `value` and `grad` that optax's line searches take. In an `optax.chain` the other
  transformations ignore it, and these ignore the extra arguments they do not use.
- **Two ways to give it.** `update(..., curvature=d)` takes any PyTree shaped like the
  updates, whatever computed it (a cached diagonal, another estimator), so the
  optimiser does not decide how curvature is obtained. Built with `loss=`, the
  optimiser computes it from `update(..., model=, batch=, key=)` with the matching
  curvzoo function; this is the shorter form, and the one where Sophia can skip the
  estimate on the steps that do not refresh it (`jax.lax.cond`), which a caller could
  only do by reading the optimiser's state. Giving both, or neither, is an error that
  says which argument to pass.
- **Trained leaves come from the updates.** Where `updates` holds `None` (a frozen
  leaf, as `equinox.filter_grad` returns), the curvature is not computed and must be
  `None`, so there is no second filter to keep in step with the gradient's.
- **Pure and explicit.** `update` is a pure function of its arguments and jits with
  the training step. A random estimate needs `key=` on every call; no key lives in the
  state, so the caller controls the randomness, as everywhere in curvzoo.
- **States are NamedTuples** of a step `count` and moments shaped like the
  parameters, in their dtype (the curvature is cast to it), as optax's are.
- **Settings are checked when the transformation is built**, with errors that name
  the setting; `update`'s arguments when it is traced.
- **Weight decay is decoupled** (`adahessian`, `sophia`), as in AdamW and both papers,
  and chained only when it is not 0, so that `update` needs `params` only then.
"""

from ._optim._adahessian import (
    adahessian as adahessian,
    AdaHessianState as AdaHessianState,
    scale_by_adahessian as scale_by_adahessian,
)
from ._optim._newton import (
    diagonal_newton as diagonal_newton,
    DiagonalNewtonState as DiagonalNewtonState,
    scale_by_diagonal_newton as scale_by_diagonal_newton,
)
from ._optim._sophia import (
    scale_by_sophia as scale_by_sophia,
    sophia as sophia,
    SophiaState as SophiaState,
)
