"""Placing a model and a batch on a `jax.sharding.Mesh`."""

from typing import Any

import equinox as eqx
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ._checks import check_batch, check_model


def _on(mesh: Mesh, leaf: Any) -> bool:
    sharding = getattr(leaf, "sharding", None)
    return isinstance(sharding, NamedSharding) and sharding.mesh == mesh


def place_on_mesh(model: Any, batch: Any, mesh: Any) -> tuple:
    """`(model, batch)` with the batch split along its leading axis over every device of
    `mesh` and the model's arrays replicated on them; both unchanged when `mesh` is
    `None`. Leaves already placed on `mesh` keep their sharding. The computations that
    follow are partitioned by XLA (GSPMD): each device works on its share of the
    samples, and the sums over samples become all-reduces."""
    if mesh is None:
        return model, batch
    check_model(model)
    if not isinstance(mesh, Mesh):
        raise TypeError(f"`mesh` must be a `jax.sharding.Mesh` or None, got {type(mesh).__name__}.")
    size = check_batch(batch)
    if size % mesh.size:
        raise ValueError(
            f"`batch` has {size} samples, which `mesh` cannot split evenly over its "
            f"{mesh.size} devices; use a batch size divisible by {mesh.size}."
        )
    split = NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))
    replicated = NamedSharding(mesh, PartitionSpec())

    def put(sharding):
        def place(leaf):
            if not eqx.is_array(leaf) or _on(mesh, leaf):
                return leaf
            return jax.device_put(leaf, sharding)

        return place

    return jax.tree.map(put(replicated), model), jax.tree.map(put(split), batch)
