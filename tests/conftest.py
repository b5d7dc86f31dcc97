import jax
import jax.random as jr
import pytest


jax.config.update("jax_enable_x64", True)


@pytest.fixture
def getkey():
    """A fresh `jax.random.key` on every call, from a fixed seed per test."""
    keys = iter(jr.split(jr.key(5678), 1000))
    return lambda: next(keys)
