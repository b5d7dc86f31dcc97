"""Property tests: random zoo configurations (sizes, depths, activations, cells,
readouts, losses, reductions, frozen subsets) against `jax.hessian` in float64.

The default profile runs four hand-picked examples per test (every model kind, every
loss, both reductions, several samples, frozen leaves) and two drawn ones
(`derandomize`, so CI is repeatable; the first is the smallest configuration: one
sample through a one-unit model); `CURVZOO_HYPOTHESIS_PROFILE=long` runs 200 random
ones besides the hand-picked.
"""

import os

import curvzoo as cz
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from hypothesis import example, given, HealthCheck, settings, strategies as st
from jax.flatten_util import ravel_pytree

from .helpers import (
    LOSS_CLASSES,
    make_batch,
    reference_ggn_diagonal,
    reference_hessian_diagonal,
)


settings.register_profile(
    "ci", max_examples=2, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip
settings.register_profile(
    "long", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("CURVZOO_HYPOTHESIS_PROFILE", "ci"))

ACTIVATIONS = {
    "tanh": jax.nn.tanh,
    "sigmoid": jax.nn.sigmoid,
    "relu": jax.nn.relu,
    "softplus": jax.nn.softplus,
    "gelu": jax.nn.gelu,
}


@st.composite
def configurations(draw):
    """Plain values only; the models are built in the test (`build`), not while drawing."""
    kind = draw(st.sampled_from(["mlp", "rnn", "cnn"]))
    if kind == "mlp":
        sizes = [draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 5))]
        options = dict(
            depth=draw(st.integers(0, 3)), activation=draw(st.sampled_from(sorted(ACTIVATIONS)))
        )
    elif kind == "rnn":
        sizes = [draw(st.integers(1, 3)) for _ in range(3)]
        options = dict(
            cell=draw(st.sampled_from(["elman", "gru", "lstm"])),
            readout=draw(st.sampled_from(["last", "all"])),
        )
    else:
        sizes = [1, draw(st.integers(1, 3)), draw(st.integers(5, 7))]
        options = dict(
            kernel_size=draw(st.sampled_from([2, 3])), pool=draw(st.sampled_from(["max", "avg"]))
        )
    return dict(
        kind=kind, sizes=sizes, options=options, seed=draw(st.integers(0, 2**16)),
        loss=draw(st.sampled_from(sorted(LOSS_CLASSES))),
        reduction=draw(st.sampled_from(["mean", "sum"])), batch_size=draw(st.integers(1, 4)),
        frozen=draw(st.lists(st.integers(0, 20), max_size=6)),
    )  # fmt: skip


def build(config):
    key = jr.key(config["seed"])
    options = dict(config["options"])
    if config["kind"] == "mlp":
        depth = options.pop("depth")
        activation = ACTIVATIONS[options.pop("activation")]
        model = cz.MLP(*config["sizes"], depth, activation=activation, key=key)
    elif config["kind"] == "rnn":
        model = cz.RNN(*config["sizes"], **options, key=key)
    else:
        model = cz.CNN(*config["sizes"], channels=(2,), **options, key=key)
    loss = LOSS_CLASSES[config["loss"]](reduction=config["reduction"])
    batch = make_batch(model, config["loss"], jr.key(config["seed"] + 1), config["batch_size"])
    # Freeze the floating-point leaves whose positions were drawn, keeping one trained.
    leaves, treedef = jax.tree.flatten(model)
    arrays = [i for i, leaf in enumerate(leaves) if eqx.is_inexact_array(leaf)]
    frozen = {arrays[i % len(arrays)] for i in config["frozen"]}
    if frozen >= set(arrays):
        frozen.discard(arrays[0])
    spec = jax.tree.unflatten(
        treedef, [i in arrays and i not in frozen for i in range(len(leaves))]
    )
    return model, loss, batch, spec


def assert_close(result, expected):
    """As `assert_diagonal_close`, but a diagonal that is identically zero (ReLU units
    that are all inactive, say) is allowed, and must then be matched by zeros."""
    flat_r, flat_e = ravel_pytree(result)[0], ravel_pytree(expected)[0]
    assert jax.tree.structure(result) == jax.tree.structure(expected)
    scale = max(float(jnp.max(jnp.abs(flat_e))), 1e-300)
    np.testing.assert_allclose(flat_r, flat_e, rtol=1e-10, atol=1e-10 * scale)


def _config(kind, sizes, options, loss, reduction, batch_size, frozen=(), seed=0):
    return dict(
        kind=kind, sizes=sizes, options=options, seed=seed, loss=loss, reduction=reduction,
        batch_size=batch_size, frozen=list(frozen),
    )  # fmt: skip


@given(configurations())
@example(_config("mlp", [3, 2, 4], dict(depth=2, activation="tanh"), "ce", "mean", 3, [1]))
@example(_config("rnn", [2, 3, 2], dict(cell="lstm", readout="all"), "mse", "sum", 3))
@example(_config("cnn", [1, 2, 6], dict(kernel_size=3, pool="avg"), "bce", "sum", 2, [0]))
@example(_config("rnn", [1, 2, 3], dict(cell="gru", readout="last"), "ce", "mean", 2, [2, 5]))
def test_every_exact_kernel_against_jax_hessian(config):
    model, loss, batch, spec = build(config)
    expected = reference_hessian_diagonal(model, loss, batch, filter_spec=spec)
    for method in ("structured", "generic"):
        assert_close(
            cz.hessian_diagonal(model, loss, batch, filter_spec=spec, method=method), expected
        )


@given(configurations())
@example(_config("mlp", [2, 3, 5], dict(depth=3, activation="softplus"), "mse", "mean", 4))
@example(_config("rnn", [2, 2, 3], dict(cell="elman", readout="last"), "bce", "mean", 3, [1]))
@example(_config("cnn", [1, 3, 7], dict(kernel_size=2, pool="max"), "ce", "sum", 3, [3]))
@example(_config("rnn", [3, 2, 2], dict(cell="gru", readout="all"), "ce", "sum", 2))
def test_ggn_against_the_jacobian_reference(config):
    model, loss, batch, spec = build(config)
    expected = reference_ggn_diagonal(model, loss, batch, filter_spec=spec)
    assert_close(cz.ggn_diagonal(model, loss, batch, filter_spec=spec), expected)
