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


def _targets(loss, shape, getkey):
    if isinstance(loss, cz.losses.CrossEntropy):
        return jr.randint(getkey(), shape[:-1], 0, shape[-1])
    if isinstance(loss, cz.losses.BCEWithLogits):
        return jr.uniform(getkey(), shape)
    return jr.normal(getkey(), shape)


LOSSES = [cz.losses.cross_entropy, cz.losses.mse, cz.losses.binary_cross_entropy_with_logits]


@pytest.mark.parametrize("loss", LOSSES, ids=lambda loss: type(loss).__name__)
@pytest.mark.parametrize("shape", [(1,), (2,), (10,), (3, 10), (4, 2)])
def test_output_hessian_factors_rebuild_the_hessian(loss, shape, getkey):
    """`sum_k w_k c_k c_k^T` is `jax.hessian(per_sample)`, for the whole prediction and
    per step; cross-entropy's factor has `C - 1` columns per step (its rank)."""
    prediction = 4 * jr.normal(getkey(), shape)
    target = _targets(loss, shape, getkey)
    size = prediction.size
    reference = jax.hessian(lambda z: loss.per_sample(z.reshape(shape), target))(
        prediction.reshape(-1)
    )
    cols, weights = loss.output_hessian_factor(prediction, target)
    flat = cols.reshape(cols.shape[0], size)
    assert jnp.allclose(jnp.einsum("k,ki,kj->ij", weights, flat, flat), reference, atol=1e-14)
    if isinstance(loss, cz.losses.CrossEntropy) and shape[-1] > 1:
        steps = size // shape[-1]
        assert cols.shape[0] == steps * (shape[-1] - 1)
    if len(shape) == 2:  # per step: the diagonal blocks of the reference
        step_cols, step_weights = loss.output_hessian_step_factor(prediction, target)
        blocks = jnp.einsum("tk,tki,tkj->tij", step_weights, step_cols, step_cols)
        classes = shape[-1]
        for t in range(shape[0]):
            block = reference[t * classes : (t + 1) * classes, t * classes : (t + 1) * classes]
            assert jnp.allclose(blocks[t], block, atol=1e-14)
