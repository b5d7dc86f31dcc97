"""Models with a scalar output (`eqx.nn.Linear(..., "scalar")`, the last layer of an
`eqx.nn.MLP` or `eqx.nn.Sequential`) with `mse` and BCE, whose targets are one number per
sample: every kernel and every quantity against the independent references, in float64.
The layered and VJP kernels once crashed on them ("unexpected JAX type ... for argument
to VJP function")."""

import curvzoo as cz
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from .helpers import (
    assert_diagonal_close,
    reference_ggn_diagonal,
    reference_hessian_diagonal,
    reference_hutchinson,
    reference_per_sample_hessian_diagonal,
    reference_squared_gradients,
    rng,
    spy_kernels,
)


def _models():
    key = jr.key(0)
    k1, k2, k3 = jr.split(key, 3)
    return {
        "mlp": eqx.nn.MLP(3, "scalar", 4, 2, activation=jnp.tanh, key=k1),
        "linear": eqx.nn.Linear(3, "scalar", key=k2),
        "sequential": eqx.nn.Sequential(
            [
                eqx.nn.Linear(3, 4, key=k3),
                eqx.nn.Lambda(jnp.tanh),
                eqx.nn.Linear(4, "scalar", key=k1),
            ]
        ),
    }


MODEL_NAMES = ["mlp", "linear", "sequential"]
LOSSES = {"mse": cz.losses.MSE(), "bce": cz.losses.BCEWithLogits(reduction="sum")}


def _batch(loss_name, size=5):
    generator = rng(7)
    inputs = jnp.asarray(generator.standard_normal((size, 3)))
    if loss_name == "mse":
        targets = generator.standard_normal(size)
    else:
        targets = generator.uniform(size=size)
    return inputs, jnp.asarray(targets)


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_exact_diagonals_on_every_kernel(model_name, loss_name, monkeypatch):
    model, loss, batch = _models()[model_name], LOSSES[loss_name], _batch(loss_name)
    assert jax.eval_shape(model, batch[0][0]).shape == ()
    kernels = spy_kernels(monkeypatch)
    hessian = reference_hessian_diagonal(model, loss, batch)
    ggn = reference_ggn_diagonal(model, loss, batch)
    for method in ("structured", "generic", "auto"):
        assert_diagonal_close(cz.hessian_diagonal(model, loss, batch, method=method), hessian)
    for method in ("structured", "auto"):
        assert_diagonal_close(cz.ggn_diagonal(model, loss, batch, method=method), ggn)
    assert_diagonal_close(cz.ggn_diagonal(model, loss, batch, method="generic"), ggn)
    assert "structured" in kernels and "outer" in kernels and "generic" in kernels
    per_sample = cz.hessian_diagonal(model, loss, batch, per_sample=True)
    assert_diagonal_close(per_sample, reference_per_sample_hessian_diagonal(model, loss, batch))


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
def test_fishers_and_hutchinson(loss_name):
    model, loss, batch = _models()["mlp"], LOSSES[loss_name], _batch(loss_name)
    squared = reference_squared_gradients(model, loss, batch)
    scale = loss.scale(5, ())
    expected = jax.tree.map(lambda leaf: scale * np.sum(np.asarray(leaf), 0), squared)
    for method in ("auto", "generic"):
        result = cz.empirical_fisher_diagonal(model, loss, batch, method=method)
        assert_diagonal_close(result, expected)
    # The Monte-Carlo Fisher: one key, the same draw on both kernels; its mean over
    # draws is the GGN (for these losses the Fisher is the GGN).
    key = jr.key(3)
    structured = cz.fisher_diagonal(model, loss, batch, key=key, num_samples=4000)
    generic = cz.fisher_diagonal(model, loss, batch, key=key, num_samples=4000, method="generic")
    assert_diagonal_close(structured, generic)
    assert_diagonal_close(structured, reference_ggn_diagonal(model, loss, batch), rtol=0.1)
    estimate = cz.hutchinson_diagonal(model, loss, batch, key=key, num_probes=8)
    reference, _ = reference_hutchinson(model, loss, batch, key=key, num_probes=8)
    assert_diagonal_close(estimate, reference)
