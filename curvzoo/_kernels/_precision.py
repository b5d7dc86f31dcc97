"""Precision: the dtype a model computes in, and the dtype sums over samples use.

A zoo model computes in its parameters' precision (float inputs of another dtype are
cast to it), and the kernels that rebuild its forward pass (the layered ops, the
recurrent kernel) do the same. Sums over samples and chunks are accumulated in at least
float32 (`accumulation_dtype`): a bfloat16 sum over a batch keeps 8 bits whatever the
batch size. For float32 and float64 parameters nothing changes: the accumulation dtype
is theirs and no cast is made.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PyTree


def parameter_dtype(*modules) -> Any:
    """The precision a model (or its parts, `modules`) computes in: the common dtype of
    their floating-point arrays (frozen integer leaves do not count), `None` if they
    hold none."""
    leaves = [
        leaf
        for leaf in jax.tree.leaves(modules)
        if eqx.is_array(leaf) and jnp.issubdtype(leaf.dtype, jnp.floating)
    ]
    return jnp.result_type(*leaves) if leaves else None


def in_precision(x: Array, dtype) -> Array:
    """Float `x` cast to `dtype` (a model's precision; `None` for none); integer inputs
    (token ids) and inputs already in `dtype` unchanged."""
    if dtype is None or not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == dtype:
        return x
    return x.astype(dtype)


def accumulation_dtype(dtype) -> Any:
    """The dtype of sums over samples for results of `dtype`: at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def upcast(tree: PyTree, dtype) -> PyTree:
    """The floating-point leaves of `tree` of lower precision than `dtype` cast to it;
    everything else (integer leaves, leaves already in `dtype`) as it is."""

    def cast(leaf):
        if (
            eqx.is_array(leaf)
            and jnp.issubdtype(leaf.dtype, jnp.floating)
            and leaf.dtype != dtype
            and jnp.promote_types(leaf.dtype, dtype) == dtype
        ):
            return leaf.astype(dtype)
        return leaf

    return jax.tree.map(cast, tree)
