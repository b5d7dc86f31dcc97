import abc
from collections.abc import Callable
from typing import no_type_check

import equinox as eqx
from jaxtyping import Array, PyTree

from .._curvature import hessian_diagonal


class AbstractModel(eqx.Module):
    """Base class of the zoo's models.

    A zoo model is an Equinox module that maps one example to one prediction, like the
    layers of `equinox.nn`; a batch is handled by `jax.vmap` inside the losses. The
    curvature methods are written here once and call the functional API with the model
    as first argument, so `model.hessian_diagonal(loss, batch)` is
    `curvzoo.hessian_diagonal(model, loss, batch)`.
    """

    @abc.abstractmethod
    def __call__(self, x: Array) -> Array:
        """The prediction for one example."""

    @no_type_check  # arguments are checked by `curvzoo.hessian_diagonal`
    def hessian_diagonal(
        self,
        loss: Callable,
        batch: PyTree,
        *,
        filter_spec: PyTree | Callable = eqx.is_inexact_array,
        chunk_size: int | None = None,
        memory_budget: int | None = None,
        method: str = "auto",
    ) -> PyTree:
        """The exact diagonal of the loss's Hessian with respect to this model's
        trainable parameters. See [`curvzoo.hessian_diagonal`][] for the arguments and
        the structure of the result.
        """
        return hessian_diagonal(
            self,
            loss,
            batch,
            filter_spec=filter_spec,
            chunk_size=chunk_size,
            memory_budget=memory_budget,
            method=method,
        )
