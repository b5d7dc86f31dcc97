"""The Hessian and the generalised Gauss-Newton matrix as linear operators.

Two forms of each product:

- inside the spectral kernels, `flat_product` ravels the trained leaves into one vector
  of length `P` and linearises once per compiled call (one forward and one backward
  pass whose residuals are kept), so that every further product is a tangent pass;
- for users, `hessian_operator` and `ggn_operator` return `lineax` operators on
  PyTrees shaped like `equinox.filter(model, filter_spec)`, whose products go through
  module-level `equinox.filter_jit` functions: compiled once per shapes and reused by
  every operator built for new values of the same shapes.
"""

from collections.abc import Callable
from typing import Any, no_type_check

import equinox as eqx
import jax
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh
from jaxtyping import PyTree

from .._kernels._generic import ggn_vector_product
from ._setup import prepare, require


def _loss_of(loss: Callable, static: PyTree, batch: PyTree) -> Callable:
    def loss_of_params(params):
        return loss(eqx.combine(params, static), batch)

    return loss_of_params


def flat_product(
    operator: str, params: PyTree, static: PyTree, loss, batch: PyTree
) -> tuple[jax.Array, Callable, Callable]:
    """For use inside a compiled kernel: `(flat, unravel, product)`, with `flat` the
    raveled trained parameters (length `P`) and `product` the linear map
    `v -> A v` on vectors of that length, for `A` the Hessian (forward over reverse:
    the gradient is linearised once, each product is one tangent pass, about the work
    of one to two gradients) or the GGN `J^T H_out J` (the prediction is linearised
    once; each product is a Jacobian-vector product, the loss's Hessian in the
    prediction, and the transposed Jacobian: about two gradients)."""
    flat, unravel = ravel_pytree(params)

    def model_of(vector):
        return eqx.combine(unravel(vector), static)

    if operator == "hessian":
        _, product = jax.linearize(jax.grad(lambda vector: loss(model_of(vector), batch)), flat)
        return flat, unravel, product
    return flat, unravel, ggn_vector_product(loss, model_of, batch, flat)


@eqx.filter_jit
def _hessian_mv(params: PyTree, static: PyTree, loss, batch: PyTree, vector: PyTree) -> PyTree:
    gradient = jax.grad(_loss_of(loss, static, batch))
    return jax.jvp(gradient, (params,), (vector,))[1]


@eqx.filter_jit
def _ggn_mv(params, static, loss, batch, vector: PyTree) -> PyTree:
    return ggn_vector_product(loss, lambda p: eqx.combine(p, static), batch, params)(vector)


class HessianProduct(eqx.Module):
    """`vector -> H vector` at fixed `(params, static, loss, batch)`; a PyTree, so an
    operator built on it can cross `jax.jit` boundaries as an argument."""

    params: PyTree
    static: PyTree
    loss: Any
    batch: PyTree

    def __call__(self, vector: PyTree) -> PyTree:
        return _hessian_mv(self.params, self.static, self.loss, self.batch, vector)


class GGNProduct(eqx.Module):
    """`vector -> G vector` at fixed `(params, static, loss, batch)`, with `G` the GGN."""

    params: PyTree
    static: PyTree
    loss: Any
    batch: PyTree

    def __call__(self, vector: PyTree) -> PyTree:
        return _ggn_mv(self.params, self.static, self.loss, self.batch, vector)


def _operator(kind: str, model, loss, batch, filter_spec, check_finite, mesh):
    lx = require("lineax")
    problem = prepare(
        model, loss, batch, operator=kind, filter_spec=filter_spec, memory_budget=None,
        check_finite=check_finite, mesh=mesh,
    )  # fmt: skip
    args = (problem.params, problem.static, problem.loss, problem.batch)
    structure = jax.eval_shape(lambda: problem.params)
    if kind == "hessian":
        return lx.FunctionLinearOperator(
            HessianProduct(*args), structure, lx.symmetric_tag, closure_convert=False
        )
    tags = (lx.symmetric_tag, lx.positive_semidefinite_tag)
    return lx.FunctionLinearOperator(GGNProduct(*args), structure, tags, closure_convert=False)


# Arguments are checked with errors that name them, so the test-time runtime type
# checker is kept out of the way.
@no_type_check
def hessian_operator(
    model: eqx.Module,
    loss: Callable,
    batch: PyTree,
    *,
    filter_spec: PyTree | Callable = eqx.is_inexact_array,
    check_finite: bool = True,
    mesh: Mesh | None = None,
):
    """The Hessian of `loss(model, batch)` in the trained parameters, as a
    [lineax](https://github.com/patrick-kidger/lineax) linear operator tagged symmetric.

    Its `mv` takes and returns PyTrees shaped like `equinox.filter(model, filter_spec)`
    (an array at each trained leaf, `None` elsewhere), the structure every curvzoo
    diagonal has. It works with everything that takes a lineax operator:
    `lineax.linear_solve` (say with `lineax.CG` on a damped operator,
    `operator + lineax.IdentityLinearOperator(...)`), `operator.as_matrix()` for small
    models, and `operator.mv` is a plain callable for matfree's Lanczos and trace
    estimators.

    **Arguments:**

    - `model`: any Equinox module. It is not modified.
    - `loss`: a curvzoo loss or any callable `loss(model, batch) -> scalar`.
    - `batch`: a PyTree of arrays sharing a leading batch axis; for curvzoo losses a
        pair `(inputs, targets)`, or a triple `(inputs, targets, lengths)` for sequences
        of different lengths (`curvzoo.losses`).
    - `filter_spec`: which leaves are trained, as in [`curvzoo.hessian_diagonal`][];
        restricting it to one leaf gives that leaf's diagonal block of the Hessian.
    - `check_finite`: if `True` (default), raise a `ValueError` naming the leaf when
        `model` or `batch` holds NaN or inf.
    - `mesh`: a `jax.sharding.Mesh`: the model is replicated and the batch split over
        its devices, so each product sums over the samples with an all-reduce.

    **Returns:**

    A `lineax.FunctionLinearOperator` tagged `lineax.symmetric_tag`. The operator is a
    PyTree holding the model's arrays and the batch, so it can be passed into
    `jax.jit`; its product is compiled once per shapes and reused by operators built
    later for new values of the same shapes.

    **Cost:** each `mv` is one Hessian-vector product by forward over reverse
    (`jax.jvp` of `jax.grad`): one forward pass, one backward pass and their tangents,
    about two to three gradients. The spectral functions
    ([`curvzoo.hessian_eigenvalues`][] and the others) linearise the gradient once
    instead and pay only the tangent pass per product. Memory: that of one
    Hessian-vector product; no `P x P` matrix unless you call `as_matrix`.

    **Example:**

    ```python
    op = curvzoo.hessian_operator(model, curvzoo.losses.cross_entropy, (x, y))
    hv = op.mv(jax.tree.map(jnp.ones_like, eqx.filter(model, eqx.is_inexact_array)))
    ```
    """
    return _operator("hessian", model, loss, batch, filter_spec, check_finite, mesh)


@no_type_check
def ggn_operator(
    model: eqx.Module,
    loss: Callable,
    batch: PyTree,
    *,
    filter_spec: PyTree | Callable = eqx.is_inexact_array,
    check_finite: bool = True,
    mesh: Mesh | None = None,
):
    """The generalised Gauss-Newton matrix `G = scale * sum_n J_n^T H_n J_n` of a
    curvzoo loss (see [`curvzoo.ggn_diagonal`][]) as a lineax linear operator tagged
    symmetric and positive semi-definite.

    **Arguments:**

    - `model`: any Equinox module that maps one example to one prediction.
    - `loss`: a curvzoo loss (`curvzoo.losses.*` or an `AbstractLoss` subclass that does
        not override `__call__`): the GGN needs its split into `loss.predict` and
        `loss.per_sample`, which a plain callable does not expose.
    - `batch`: a pair `(inputs, targets)` whose leaves share a leading batch axis, or a
        triple `(inputs, targets, lengths)` for sequences of different lengths.
    - `filter_spec`, `check_finite`, `mesh`: as for [`curvzoo.hessian_operator`][].

    **Returns:**

    A `lineax.FunctionLinearOperator` on PyTrees shaped like
    `equinox.filter(model, filter_spec)`, tagged `lineax.symmetric_tag` and
    `lineax.positive_semidefinite_tag` (so `lineax.CG` accepts it), compiled once per
    shapes like [`curvzoo.hessian_operator`][].

    **Cost:** each `mv` is one forward pass linearised in the parameters, one
    Jacobian-vector product, one product with the loss's Hessian in the predictions
    (block-diagonal over samples, by forward over reverse of `per_sample`) and one
    vector-Jacobian product: about two to three gradients.
    """
    return _operator("ggn", model, loss, batch, filter_spec, check_finite, mesh)
