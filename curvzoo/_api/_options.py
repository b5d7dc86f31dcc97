"""The options every public function shares, checked once into an `Options`."""

import math
from typing import Any

import numpy as np
from jax.sharding import Mesh

from .._dispatch._plan import Options
from .._estimators import AbstractEstimator, Exact
from .._run._checks import check_positive_int
from .._run._memory import DEFAULT_MEMORY_BUDGET


METHODS = ("auto", "structured", "generic")


def check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be True or False, got {value!r}.")
    return bool(value)


def _memory_budget(value: Any) -> int:
    """Bytes: an integer, or a float with an integral value such as `1e9`."""
    if value is None:
        return DEFAULT_MEMORY_BUDGET
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        raise TypeError(f"`memory_budget` must be a number of bytes or None, got {value!r}.")
    if not math.isfinite(value) or value != int(value):
        raise ValueError(f"`memory_budget` must be a whole number of bytes, got {value!r}.")
    if value < 1:
        raise ValueError(f"`memory_budget` must be >= 1, got {value}.")
    return int(value)


def make_options(
    *,
    method: Any = "auto",
    per_sample: Any = False,
    chunk_size: Any = None,
    memory_budget: Any = None,
    check_finite: Any = True,
    progress: Any = False,
    mesh: Any = None,
    estimator: AbstractEstimator = Exact(),
) -> Options:
    """The checked `Options`; each bad value raises an error naming its argument."""
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
    check_bool(per_sample, "per_sample")
    if mesh is not None and not isinstance(mesh, Mesh):
        raise TypeError(f"`mesh` must be a `jax.sharding.Mesh` or None, got {type(mesh).__name__}.")
    check_positive_int(chunk_size, "chunk_size", allow_none=True)
    budget = _memory_budget(memory_budget)
    check_bool(check_finite, "check_finite")
    check_bool(progress, "progress")
    return Options(
        method=method,
        per_sample=bool(per_sample),
        chunk_size=None if chunk_size is None else int(chunk_size),
        memory_budget=budget,
        check_finite=bool(check_finite),
        progress=bool(progress),
        mesh=mesh,
        estimator=estimator,
    )
