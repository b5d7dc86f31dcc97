"""Placing a model and a batch on a `jax.sharding.Mesh`, and reading values back.

A mesh may span several processes (`jax.distributed`): its arrays are then global,
each process holding the shards on its own devices. Every place that reads an array's
values on the host (the checks of targets, lengths and token ids, the finiteness
checks, the spectral tools' results) goes through `host_value`.
"""

from typing import Any

import equinox as eqx
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ._checks import check_model


def _on(mesh: Mesh, leaf: Any) -> bool:
    sharding = getattr(leaf, "sharding", None)
    return isinstance(sharding, NamedSharding) and sharding.mesh == mesh


def check_mesh(model: Any, mesh: Any) -> None:
    if mesh is None:
        return
    check_model(model)
    if not isinstance(mesh, Mesh):
        raise TypeError(f"`mesh` must be a `jax.sharding.Mesh` or None, got {type(mesh).__name__}.")


def _put(tree: Any, mesh: Mesh, sharding: NamedSharding) -> Any:
    def place(leaf):
        if not eqx.is_array(leaf) or _on(mesh, leaf):
            return leaf
        return jax.device_put(leaf, sharding)

    return jax.tree.map(place, tree)


def replicate(tree: Any, mesh: Mesh | None) -> Any:
    """Every array of `tree` replicated on every device of `mesh` (unchanged for `None`,
    and for arrays already placed on `mesh`)."""
    if mesh is None:
        return tree
    return _put(tree, mesh, NamedSharding(mesh, PartitionSpec()))


def lanes(mesh: Mesh) -> NamedSharding:
    """A leading axis split over all of the mesh's devices."""
    return NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))


def place_batch(batch: Any, mesh: Mesh | None, *, split: bool, size: int) -> Any:
    """The batch split along its leading axis over the mesh's devices (`split=True`:
    each device then works on its share of the samples, and sums over samples become
    all-reduces), or replicated (for kernels that split their basis vectors or probes
    instead). Leaves already placed on `mesh` keep their sharding."""
    if mesh is None:
        return batch
    if not split:
        return replicate(batch, mesh)
    if size % mesh.size:
        raise ValueError(
            f"`batch` has {size} samples, which `mesh` cannot split evenly over its "
            f"{mesh.size} devices; use a batch size divisible by {mesh.size}."
        )
    return _put(batch, mesh, lanes(mesh))


def split_lanes(values: jax.Array, mesh: Mesh | None) -> jax.Array:
    """Inside a kernel: split a chunk's lanes (basis vectors, probes) over the mesh's
    devices, where they divide evenly."""
    if mesh is None or values.shape[0] % mesh.size:
        return values
    return jax.lax.with_sharding_constraint(values, lanes(mesh))


def host_value(x: Any) -> np.ndarray:
    """The value of `x` as a NumPy array on this host.

    A `jax.Array` split over devices of other processes (a global array on a mesh that
    spans processes) is gathered first with
    `jax.experimental.multihost_utils.process_allgather`. That is a collective: every
    process must reach it, which they do when each runs the same program on its share
    of a global array (whether to gather depends only on the array's global sharding,
    the same in every process). Arrays of this process alone, fully replicated ones
    (every process holds the whole value), NumPy arrays and Python numbers are read
    as they are."""
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def place_result(result: Any, mesh: Mesh | None, *, per_sample: bool) -> Any:
    """Inside a kernel: its result replicated on every device of `mesh`, so that every
    process holds it whole and can read it, whatever split the kernel worked with
    (basis vectors split over the devices leave each device with its own entries);
    per sample, split along its leading sample axis as the batch is. The same bits
    either way: an all-gather only copies."""
    if mesh is None:
        return result
    sharding = lanes(mesh) if per_sample else NamedSharding(mesh, PartitionSpec())
    return jax.lax.with_sharding_constraint(result, sharding)
