"""Loss conventions against optax and hand-written formulas."""

import curvzoo as cz
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
import pytest


def _identity_model(x):
    return x


def test_cross_entropy_matches_optax(getkey):
    logits = jr.normal(getkey(), (7, 4))
    labels = jr.randint(getkey(), (7,), 0, 4)
    per = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    batch = (logits, labels)
    assert jnp.allclose(cz.losses.cross_entropy(_identity_model, batch), per.mean(), rtol=1e-14)
    assert jnp.allclose(
        cz.losses.CrossEntropy(reduction="sum")(_identity_model, batch), per.sum(), rtol=1e-14
    )


def test_cross_entropy_per_step_mean_over_samples_and_steps(getkey):
    logits = jr.normal(getkey(), (3, 5, 4))
    labels = jr.randint(getkey(), (3, 5), 0, 4)
    per = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    assert per.shape == (3, 5)
    assert jnp.allclose(
        cz.losses.cross_entropy(_identity_model, (logits, labels)), per.mean(), rtol=1e-14
    )


def test_mse_is_mean_over_all_elements(getkey):
    pred = jr.normal(getkey(), (6, 3))
    target = jr.normal(getkey(), (6, 3))
    expected = optax.squared_error(pred, target).mean()
    assert jnp.allclose(cz.losses.mse(_identity_model, (pred, target)), expected, rtol=1e-14)
    assert jnp.allclose(
        cz.losses.MSE(reduction="sum")(_identity_model, (pred, target)),
        jnp.sum((pred - target) ** 2),
        rtol=1e-14,
    )


def test_bce_with_logits_matches_optax(getkey):
    logits = 3 * jr.normal(getkey(), (6, 2))
    target = jr.uniform(getkey(), (6, 2))
    expected = optax.sigmoid_binary_cross_entropy(logits, target)
    loss = cz.losses.binary_cross_entropy_with_logits
    assert jnp.allclose(loss(_identity_model, (logits, target)), expected.mean(), rtol=1e-12)
    assert jnp.allclose(
        cz.losses.BCEWithLogits(reduction="sum")(_identity_model, (logits, target)),
        expected.sum(),
        rtol=1e-12,
    )


@pytest.mark.parametrize("loss", [cz.losses.CrossEntropy(), cz.losses.MSE(reduction="sum")])
def test_scale_times_per_sample_sum_is_the_loss(loss, getkey):
    model = cz.RNN(2, 3, 4, cell="gru", readout="all", key=getkey())
    xs = jr.normal(getkey(), (5, 6, 2))
    preds = jax.vmap(model)(xs)
    if isinstance(loss, cz.losses.CrossEntropy):
        targets = jr.randint(getkey(), (5, 6), 0, 4)
    else:
        targets = jr.normal(getkey(), preds.shape)
    total = loss.scale(5, preds.shape[1:]) * jnp.sum(jax.vmap(loss.per_sample)(preds, targets))
    assert jnp.allclose(loss(model, (xs, targets)), total, rtol=1e-14)


def test_losses_are_jittable_and_hashable():
    assert hash(cz.losses.CrossEntropy()) == hash(cz.losses.cross_entropy)
    assert cz.losses.CrossEntropy() == cz.losses.cross_entropy
    assert cz.losses.MSE(reduction="sum") != cz.losses.mse
