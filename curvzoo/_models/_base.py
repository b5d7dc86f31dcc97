import abc
import dataclasses
from collections.abc import Callable
from typing import Any, no_type_check

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, PyTree

from .._api._diagonal import diagonal
from .._api._family import empirical_fisher_diagonal, fisher_diagonal, ggn_diagonal
from .._api._hessian import hessian_diagonal
from .._api._hutchinson import hutchinson_diagonal
from .._estimators import AbstractEstimator, Estimate
from .._kernels._ops import Linear
from .._kernels._precision import in_precision


@dataclasses.dataclass(frozen=True)
class _Cast:
    dtype: Any

    def __call__(self, u: Array) -> Array:
        return in_precision(u, self.dtype)


def precision_ops(dtype, example) -> list:
    """The op that a layered structure starts with where the model casts its input
    (`in_precision`): `[]` when `example` (one input, or its `jax.ShapeDtypeStruct`)
    already has the model's precision, so that the usual case has no extra op."""
    given = jnp.result_type(example)
    if dtype is None or not jnp.issubdtype(given, jnp.floating) or given == dtype:
        return []
    return [Linear(_Cast(jnp.dtype(dtype)), "input cast", keeps_diagonal=True)]


class AbstractModel(eqx.Module):
    """Base class of the zoo's models.

    A zoo model is an Equinox module that maps one example to one prediction, like the
    layers of `equinox.nn`; a batch is handled by `jax.vmap` inside the losses. The
    curvature methods are written here once and call the functional API with the model
    as first argument, so `model.hessian_diagonal(loss, batch, **options)` is
    `curvzoo.hessian_diagonal(model, loss, batch, **options)`, and likewise for
    `ggn_diagonal`, `fisher_diagonal`, `empirical_fisher_diagonal` and
    `hutchinson_diagonal`.
    """

    @abc.abstractmethod
    def __call__(self, x: Array) -> Array:
        """The prediction for one example."""

    # Arguments are checked by the functions these forward to.
    @no_type_check
    def hessian_diagonal(self, loss: Callable, batch: PyTree, **options) -> PyTree:
        """The exact diagonal of the loss's Hessian with respect to this model's
        trainable parameters. See [`curvzoo.hessian_diagonal`][] for the options
        (`filter_spec`, `chunk_size`, `memory_budget`, `method`, `per_sample`,
        `check_finite`, `mesh`, `progress`) and the structure of the result.
        """
        return hessian_diagonal(self, loss, batch, **options)

    @no_type_check
    def diagonal(
        self, loss: Callable, batch: PyTree, estimator: AbstractEstimator | None = None, **options
    ) -> PyTree | Estimate:
        """The diagonal that `estimator` defines (default `curvzoo.Exact()`, the Hessian's).
        See [`curvzoo.diagonal`][]."""
        if estimator is None:
            return diagonal(self, loss, batch, **options)
        return diagonal(self, loss, batch, estimator, **options)

    @no_type_check
    def ggn_diagonal(self, loss: Callable, batch: PyTree, **options) -> PyTree:
        """The exact diagonal of the generalised Gauss-Newton matrix. See
        [`curvzoo.ggn_diagonal`][]."""
        return ggn_diagonal(self, loss, batch, **options)

    @no_type_check
    def fisher_diagonal(self, loss: Callable, batch: PyTree, **options) -> PyTree:
        """A Monte-Carlo estimate of the Fisher diagonal (needs `key=`). See
        [`curvzoo.fisher_diagonal`][]."""
        return fisher_diagonal(self, loss, batch, **options)

    @no_type_check
    def empirical_fisher_diagonal(self, loss: Callable, batch: PyTree, **options) -> PyTree:
        """The diagonal of the empirical Fisher (squared per-sample gradients). See
        [`curvzoo.empirical_fisher_diagonal`][]."""
        return empirical_fisher_diagonal(self, loss, batch, **options)

    @no_type_check
    def hutchinson_diagonal(self, loss: Callable, batch: PyTree, **options) -> PyTree | Estimate:
        """Hutchinson's estimate of the Hessian diagonal (needs `key=` and
        `num_probes=`). See [`curvzoo.hutchinson_diagonal`][]."""
        return hutchinson_diagonal(self, loss, batch, **options)
