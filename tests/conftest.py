"""Test configuration: float64, a key fixture, and a compiler that does not optimise.

Compiling is most of the suite's time, and tests of numbers do not need fast code: XLA
runs here without most of its optimisation passes and without its CPU fusion emitters
(about a quarter of the compile time; results agree to rounding). The settings go into
the environment too, so that the subprocesses some tests start inherit them.
`CURVZOO_TEST_OPTIMIZED=1` keeps XLA's defaults (to test the code users run).
"""

import os


if os.environ.get("CURVZOO_TEST_OPTIMIZED", "0") != "1":
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    os.environ["JAX_EXEC_TIME_OPTIMIZATION_EFFORT"] = "-1.0"
    _FLAGS = ("--xla_cpu_use_fusion_emitters=false", "--xla_cpu_parallel_codegen_split_count=1")
    _present = os.environ.get("XLA_FLAGS", "").split()
    os.environ["XLA_FLAGS"] = " ".join(_present + [f for f in _FLAGS if f not in _present])

import jax  # noqa: E402
import jax.random as jr  # noqa: E402
import pytest  # noqa: E402


jax.config.update("jax_enable_x64", True)
if os.environ.get("CURVZOO_TEST_OPTIMIZED", "0") != "1":
    jax.config.update("jax_disable_most_optimizations", True)
    jax.config.update("jax_exec_time_optimization_effort", -1.0)


@pytest.fixture
def getkey():
    """A fresh `jax.random.key` on every call, from a fixed seed per test."""
    keys = iter(jr.split(jr.key(5678), 1000))
    return lambda: next(keys)


# The files whose tests take longest (subprocesses, whole recipes, the README, every
# kernel against `jax.hessian`) go first: with `pytest -n`, a long test collected last
# leaves the other workers idle at the end.
_FIRST = (
    "test_distributed.py",
    "test_readme.py",
    "test_recipes.py",
    "test_devices.py",
    "test_guides.py",
    "test_lengths.py",
    "test_precision.py",
    "test_properties.py",
    "test_spectral.py",
)


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return _FIRST.index(name) if name in _FIRST else len(_FIRST)

    items.sort(key=rank)  # stable: the order within a file is kept
