"""The structured kernels rebuild a loss from its per-sample parts and a model from its
layer description; subclasses that change either must fall back to the generic kernel
(or, forced, raise), never give a wrong number."""

import curvzoo as cz
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest

from .helpers import assert_diagonal_close, make_batch, reference_hessian_diagonal


class HalfMSE(cz.losses.MSE):
    """Overrides `per_sample`, inherits MSE's closed-form curvature (now wrong)."""

    def per_sample(self, prediction, target):
        return 0.5 * jnp.sum((prediction - target) ** 2)


class TemperedCE(cz.losses.CrossEntropy):
    def predict(self, model, inputs):
        return jax.vmap(model)(inputs) / 3.0


class PenalisedCE(cz.losses.CrossEntropy):
    def __call__(self, model, batch):
        weights = model.layers[0].weight if isinstance(model, cz.MLP) else model.head.weight
        return super().__call__(model, batch) + 0.1 * jnp.sum(weights**2)


class ScaledMLP(cz.MLP):
    def __call__(self, x):
        return 2.0 * super().__call__(x)


@pytest.mark.parametrize("loss_cls", [HalfMSE, TemperedCE, PenalisedCE])
@pytest.mark.parametrize("model_kind", ["mlp", "rnn"])
def test_overridden_losses(loss_cls, model_kind, getkey):
    if model_kind == "mlp":
        model = cz.MLP(3, 3, 4, 2, key=getkey())
    else:
        model = cz.RNN(2, 3, 3, "gru", "all", key=getkey())
    loss = loss_cls()
    batch = make_batch(model, "mse" if loss_cls is HalfMSE else "ce", getkey())
    expected = reference_hessian_diagonal(model, loss, batch)
    assert_diagonal_close(model.hessian_diagonal(loss, batch), expected)
    with pytest.raises(ValueError, match="`method='structured'`.*`loss`"):
        model.hessian_diagonal(loss, batch, method="structured")


def test_overridden_model_call(getkey):
    model = ScaledMLP(3, 3, 4, 2, key=getkey())
    batch = make_batch(model, "ce", getkey())
    expected = reference_hessian_diagonal(model, cz.losses.cross_entropy, batch)
    assert_diagonal_close(model.hessian_diagonal(cz.losses.cross_entropy, batch), expected)
    with pytest.raises(ValueError, match="overrides `__call__`"):
        model.hessian_diagonal(cz.losses.cross_entropy, batch, method="structured")


@pytest.mark.parametrize("cell", ["elman", "gru", "lstm"])
def test_recurrent_with_narrower_inputs(cell, getkey):
    """float32 data into a float64 model: the state follows the model's arithmetic."""
    model = cz.RNN(2, 3, 2, cell, key=getkey())
    xs = jr.normal(getkey(), (3, 4, 2), jnp.float32)
    ys = jr.randint(getkey(), (3,), 0, 2)
    structured = model.hessian_diagonal(cz.losses.cross_entropy, (xs, ys), method="structured")
    expected = reference_hessian_diagonal(model, cz.losses.cross_entropy, (xs, ys))
    assert_diagonal_close(structured, expected)


def test_loss_class_instead_of_instance(getkey):
    model = cz.MLP(3, 3, 4, 1, key=getkey())
    with pytest.raises(TypeError, match=r"got the class CrossEntropy; pass .*CrossEntropy\(\)"):
        model.hessian_diagonal(cz.losses.CrossEntropy, make_batch(model, "ce", getkey()))


def test_empty_sequence(getkey):
    model = cz.RNN(2, 3, 2, "gru", key=getkey())
    with pytest.raises(ValueError, match="T >= 1"):
        model.hessian_diagonal(
            cz.losses.cross_entropy, (jnp.zeros((3, 0, 2)), jnp.zeros(3, jnp.int32))
        )
