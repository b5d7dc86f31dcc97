"""The curvature family: GGN, empirical Fisher, Monte-Carlo Fisher, Hutchinson, and
per-sample diagonals, in float64 against independent references."""

import curvzoo as cz
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from .helpers import (
    assert_diagonal_close,
    flat,
    LOSS_CLASSES,
    make_batch,
    MODELS,
    reference_ggn_diagonal,
    reference_hessian_diagonal,
    reference_per_sample_ggn_diagonal,
    reference_per_sample_hessian_diagonal,
    reference_squared_gradients,
    spy_kernels,
    tree_allclose,
    with_reductions,
)


LOSS_NAMES = sorted(LOSS_CLASSES)


def _model_and_loss(index, make_model, key_model, key_batch, reduction="mean"):
    """Model `index` of `MODELS` with a loss that cycles over the three losses, so that
    every model kind and every loss is covered without the full product."""
    model = make_model(key_model)
    loss_name = LOSS_NAMES[index % len(LOSS_NAMES)]
    loss = LOSS_CLASSES[loss_name](reduction=reduction)
    return model, loss, make_batch(model, loss_name, key_batch)


# ## GGN


@pytest.mark.parametrize("index", range(len(MODELS)), ids=[m[0] for m in MODELS])
def test_ggn_matches_jacobian_reference(index, getkey):
    """`diag(J^T H_out J)` from `jax.jacfwd`, for every zoo model kind and every loss;
    both routes (`auto`, structured for MLP and CNN, and vector-Jacobian products)."""
    model, loss, batch = _model_and_loss(index, MODELS[index][1], getkey(), getkey())
    expected = reference_ggn_diagonal(model, loss, batch)
    assert_diagonal_close(model.ggn_diagonal(loss, batch), expected)
    assert_diagonal_close(cz.ggn_diagonal(model, loss, batch, method="generic"), expected)


def test_ggn_sum_reduction_and_structured_route(getkey, monkeypatch):
    model = cz.CNN(1, 3, 6, channels=(2,), key=getkey())
    loss = cz.losses.MSE(reduction="sum")
    batch = make_batch(model, "mse", getkey())
    calls = spy_kernels(monkeypatch)
    result = cz.ggn_diagonal(model, loss, batch, method="structured")
    assert calls == ["structured"]
    assert_diagonal_close(result, reference_ggn_diagonal(model, loss, batch))


def test_ggn_equals_hessian_for_a_model_linear_in_its_parameters(getkey):
    """Under MSE the Hessian of a model linear in its parameters is its GGN: a zoo MLP
    of depth 0 (structured route) and a plain `eqx.nn.Linear` (generic route)."""
    for model in (cz.MLP(4, 3, 5, 0, key=getkey()), eqx.nn.Linear(4, 3, key=getkey())):
        x = jr.normal(getkey(), (6, 4))
        batch = (x, jr.normal(getkey(), (6, 3)))
        expected = reference_hessian_diagonal(model, cz.losses.mse, batch)
        assert_diagonal_close(cz.ggn_diagonal(model, cz.losses.mse, batch), expected)


@pytest.mark.parametrize("loss_name", ["ce", "bce"])
def test_ggn_equals_hessian_diagonal_for_relu(loss_name, getkey):
    """A ReLU network is piecewise linear: its activations have no second derivative,
    and the products weight x input have none on the diagonal, so the Hessian's
    diagonal is the GGN's."""
    model = cz.MLP(3, 4, 6, 2, activation=jax.nn.relu, key=getkey())
    loss = LOSS_CLASSES[loss_name]()
    batch = make_batch(model, loss_name, getkey(), batch_size=7)
    expected = reference_hessian_diagonal(model, loss, batch)
    assert_diagonal_close(model.ggn_diagonal(loss, batch), expected)
    assert_diagonal_close(model.ggn_diagonal(loss, batch, method="generic"), expected)


def test_ggn_differs_from_hessian_for_tanh(getkey):
    """The identities above are not vacuous: with tanh the two differ."""
    model = cz.MLP(3, 4, 6, 2, key=getkey())
    batch = make_batch(model, "ce", getkey())
    ggn = flat(model.ggn_diagonal(cz.losses.cross_entropy, batch))
    hessian = flat(model.hessian_diagonal(cz.losses.cross_entropy, batch))
    assert np.max(np.abs(ggn - hessian)) > 1e-3 * np.max(np.abs(hessian))


# ## Empirical Fisher


@pytest.mark.parametrize("model_name,make_model", [MODELS[2], MODELS[6], MODELS[-1]])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_empirical_fisher_matches_vmapped_gradients(model_name, make_model, reduction, getkey):
    """`scale * sum_n g_n^2` against `jax.vmap(jax.grad)` of the per-sample loss, for an
    MLP, an RNN and the CNN, by both routes; per sample, `scale(1) * g_n^2`."""
    model = make_model(getkey())
    loss = cz.losses.CrossEntropy(reduction=reduction)
    batch = make_batch(model, "ce", getkey())
    squared = reference_squared_gradients(model, loss, batch)
    predictions = jax.vmap(model)(batch[0])
    scale = loss.scale(predictions.shape[0], predictions.shape[1:])
    expected = jax.tree.map(lambda leaf: scale * leaf.sum(0), squared)
    assert_diagonal_close(model.empirical_fisher_diagonal(loss, batch), expected)
    generic = cz.empirical_fisher_diagonal(model, loss, batch, method="generic")
    assert_diagonal_close(generic, expected)
    per_sample = model.empirical_fisher_diagonal(loss, batch, per_sample=True)
    one = loss.scale(1, predictions.shape[1:])
    assert_diagonal_close(per_sample, jax.tree.map(lambda leaf: one * leaf, squared))


# ## Per-sample diagonals


@pytest.mark.parametrize(
    "index,reduction",
    with_reductions([1, 5, 6, 10]),
    ids=[MODELS[i][0] for i in (1, 5, 6, 10)],
)
def test_per_sample_diagonals_sum_to_the_batch(index, reduction, getkey):
    """Per-sample diagonals, times the reduction's factor (`1/N` for mean, `1` for
    sum), sum to the batch's; and sample `n`'s is that of the batch of sample `n`
    alone (`jax.hessian`, or the Jacobian GGN, of `loss(model, batch_n)`), for every
    `n`. Hessian (structured or recurrent, and generic), GGN."""
    model, loss, batch = _model_and_loss(index, MODELS[index][1], getkey(), getkey(), reduction)
    num = batch[0].shape[0]
    factor = 1 / num if reduction == "mean" else 1.0
    references = {
        cz.hessian_diagonal: reference_per_sample_hessian_diagonal(model, loss, batch),
        cz.ggn_diagonal: reference_per_sample_ggn_diagonal(model, loss, batch),
    }
    for function, alone in references.items():
        # Every zoo model has a structured Hessian kernel; the GGN's is auto's choice.
        methods = ("structured", "generic") if function is cz.hessian_diagonal else ("auto",)
        whole = function(model, loss, batch)
        for method in methods:
            stacked = function(model, loss, batch, per_sample=True, method=method)
            for leaf, full in zip(jax.tree.leaves(stacked), jax.tree.leaves(whole)):
                assert leaf.shape == (num, *full.shape)
            total = jax.tree.map(lambda x: factor * np.asarray(x).sum(0), stacked)
            assert_diagonal_close(total, whole)
            for n in range(num):
                assert_diagonal_close(_row(stacked, n), _row(alone, n))


def _row(tree, n):
    return jax.tree.map(lambda x: np.asarray(x)[n], tree)


def test_per_sample_with_a_custom_callable_loss(getkey):
    """For a plain callable, sample `n`'s diagonal is that of `loss(model, batch_n)`."""
    model = eqx.nn.MLP(3, 2, 4, 1, key=getkey())

    def loss(model, batch):
        x, y = batch
        return jnp.mean((jax.vmap(model)(x) - y) ** 3)

    batch = (jr.normal(getkey(), (4, 3)), jr.normal(getkey(), (4, 2)))
    stacked = cz.hessian_diagonal(model, loss, batch, per_sample=True)
    for n in range(4):
        alone = jax.tree.map(lambda leaf: leaf[n : n + 1], batch)
        assert_diagonal_close(
            jax.tree.map(lambda x: x[n], stacked), reference_hessian_diagonal(model, loss, alone)
        )


# ## Monte-Carlo Fisher


@pytest.mark.parametrize(
    "make_model,loss_name",
    [(MODELS[2][1], "ce"), (MODELS[5][1], "bce"), (MODELS[-1][1], "mse")],
    ids=["mlp-ce", "rnn-bce", "cnn-mse"],
)
def test_fisher_is_unbiased_for_the_ggn(make_model, loss_name, getkey):
    """Over 1200 keys from three seeds (`jax.vmap` of the public function), the mean
    estimate lies within 4 standard errors of the exact GGN diagonal at every entry."""
    model = make_model(getkey())
    loss = LOSS_CLASSES[loss_name]()
    batch = make_batch(model, loss_name, getkey())
    expected = flat(reference_ggn_diagonal(model, loss, batch))

    @jax.jit
    @jax.vmap
    def estimate(key):
        return ravel_pytree(cz.fisher_diagonal(model, loss, batch, key=key))[0]

    draws = np.concatenate([estimate(jr.split(jr.key(seed), 400)) for seed in range(3)])
    mean = draws.mean(axis=0)
    stderr = draws.std(axis=0, ddof=1) / np.sqrt(draws.shape[0])
    assert np.all(np.abs(mean - expected) <= 4 * stderr + 1e-12 * np.abs(expected).max())
    assert np.all(draws >= 0)


def test_fisher_draws_and_keys(getkey):
    """The same key gives the same bits; another key another estimate; `num_samples`
    draws average towards the GGN."""
    model = cz.MLP(3, 3, 4, 1, key=getkey())
    loss = cz.losses.cross_entropy
    batch = make_batch(model, "ce", getkey())
    first = model.fisher_diagonal(loss, batch, key=jr.key(1))
    assert tree_allclose(first, model.fisher_diagonal(loss, batch, key=jr.key(1)), rtol=0)
    assert not tree_allclose(first, model.fisher_diagonal(loss, batch, key=jr.key(2)))
    many = flat(model.fisher_diagonal(loss, batch, key=jr.PRNGKey(0), num_samples=4000))
    ggn = flat(model.ggn_diagonal(loss, batch))
    assert np.max(np.abs(many - ggn)) < 0.05 * np.max(ggn)


# ## Hutchinson


@pytest.mark.parametrize("control_variate", [None, "ggn"])
@pytest.mark.parametrize(
    "make_model,loss_name",
    [(MODELS[2][1], "ce"), (MODELS[6][1], "mse")],
    ids=["mlp-ce", "rnn-gru-mse"],
)
def test_hutchinson_is_unbiased(make_model, loss_name, control_variate, getkey):
    """Three seeds of 1000 probes: the standard errors it returns are calibrated (mean
    squared z-score near 1), and the pooled estimate lies within 4 pooled standard
    errors of the exact diagonal at every entry."""
    model = make_model(getkey())
    loss = LOSS_CLASSES[loss_name]()
    batch = make_batch(model, loss_name, getkey())
    exact = flat(reference_hessian_diagonal(model, loss, batch))
    estimates, stderrs = [], []
    for seed in range(3):
        estimate, stderr = cz.hutchinson_diagonal(
            model, loss, batch, key=jr.key(seed), num_probes=1000,
            control_variate=control_variate, return_stderr=True,
        )  # fmt: skip
        assert jax.tree.structure(estimate) == jax.tree.structure(stderr)
        estimates.append(flat(estimate))
        stderrs.append(flat(stderr))
    errors, stderrs = np.stack(estimates) - exact, np.stack(stderrs)
    spread = stderrs > 0
    assert 0.5 < np.mean((errors[spread] / stderrs[spread]) ** 2) < 2.0
    pooled_error = errors.mean(axis=0)
    pooled_stderr = np.sqrt(np.sum(stderrs**2, axis=0)) / len(stderrs)
    assert np.all(np.abs(pooled_error) <= 4 * pooled_stderr + 1e-12 * np.abs(exact).max())


@pytest.mark.parametrize("make_model", [MODELS[2][1], MODELS[6][1]], ids=["mlp", "rnn-gru"])
def test_control_variate_lowers_the_standard_error(make_model, getkey):
    """Near a fit of a regression (targets within 0.01 of the predictions) the Hessian
    is close to the GGN, and the control variate cuts the mean standard error
    several-fold, on an MLP and an RNN."""
    model = make_model(getkey())
    inputs = make_batch(model, "mse", getkey())[0]
    predictions = jax.vmap(model)(inputs)
    batch = (inputs, predictions + 0.01 * jr.normal(getkey(), predictions.shape))
    errors = {}
    for control_variate in (None, "ggn"):
        _, stderr = cz.hutchinson_diagonal(
            model, cz.losses.mse, batch, key=jr.key(0), num_probes=64,
            control_variate=control_variate, return_stderr=True,
        )  # fmt: skip
        errors[control_variate] = np.mean(flat(stderr))
    assert errors["ggn"] < errors[None] / 4


def test_one_probe_is_exact_on_a_diagonal_hessian(getkey):
    """`z * (D z) = D z^2 = D` for a diagonal `D` and `z` of +-1: a loss that acts on
    every parameter separately."""
    model = eqx.nn.Linear(3, 2, key=getkey())

    def loss(model, batch):
        del batch
        leaves = jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))
        return sum(jnp.sum(jnp.sin(leaf) * leaf**3) for leaf in leaves)

    batch = jnp.zeros((1, 1))
    estimate = cz.hutchinson_diagonal(model, loss, batch, key=jr.key(0), num_probes=1)
    assert_diagonal_close(estimate, reference_hessian_diagonal(model, loss, batch))


def test_hutchinson_keys_and_chunks(getkey):
    """Same key, same bits; the probes do not depend on `chunk_size`; a legacy
    `PRNGKey` works; the public function runs under `jax.jit`."""
    model = cz.RNN(2, 3, 2, cell="elman", key=getkey())
    loss = cz.losses.cross_entropy
    batch = make_batch(model, "ce", getkey())
    kwargs = dict(key=jr.key(3), num_probes=7, control_variate="ggn")
    first = model.hutchinson_diagonal(loss, batch, **kwargs)
    assert tree_allclose(first, model.hutchinson_diagonal(loss, batch, **kwargs), rtol=0)
    assert tree_allclose(first, model.hutchinson_diagonal(loss, batch, chunk_size=3, **kwargs))
    jitted = eqx.filter_jit(lambda m, b, k: cz.hutchinson_diagonal(m, loss, b, key=k, num_probes=7))
    legacy = jr.PRNGKey(3)
    assert tree_allclose(
        jitted(model, batch, legacy),
        cz.hutchinson_diagonal(model, loss, batch, key=legacy, num_probes=7),
    )


# ## Structure, dtypes, frozen leaves


def test_family_results_are_module_shaped_with_frozen_leaves(getkey):
    """Every function returns the filtered model's structure, `None` at frozen leaves,
    float32 kept in float32."""
    model = cz.MLP(3, 3, 4, 1, key=getkey())
    model = jax.tree.map(lambda x: x.astype(jnp.float32) if eqx.is_inexact_array(x) else x, model)
    spec = jax.tree.map(eqx.is_inexact_array, model)
    spec = eqx.tree_at(lambda m: m.layers[0].bias, spec, replace=False)
    x, y = make_batch(model, "ce", getkey())
    batch = (x.astype(jnp.float32), y)
    loss = cz.losses.cross_entropy
    key = jr.key(0)
    results = [
        model.ggn_diagonal(loss, batch, filter_spec=spec),
        model.empirical_fisher_diagonal(loss, batch, filter_spec=spec),
        model.fisher_diagonal(loss, batch, key=key, filter_spec=spec),
        *model.hutchinson_diagonal(
            loss, batch, key=key, num_probes=3, control_variate="ggn", return_stderr=True,
            filter_spec=spec,
        ),
    ]  # fmt: skip
    expected = jax.tree.structure(eqx.filter(model, spec))
    for result in results:
        assert jax.tree.structure(result) == expected
        assert result.layers[0].bias is None
        for leaf in jax.tree.leaves(result):
            assert leaf.dtype == jnp.float32
    ggn64 = cz.ggn_diagonal(
        jax.tree.map(lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, model),
        loss,
        (x, y),
        filter_spec=spec,
    )
    np.testing.assert_allclose(flat(results[0]), flat(ggn64), rtol=1e-4)


class _HalfMSE(cz.losses.MSE):
    """`0.5 * sum (f - y)^2` with its own element curvature: the GGN may use it."""

    def per_sample(self, prediction, target):
        return 0.5 * jnp.sum((prediction - target) ** 2)

    def element_curvature(self, prediction):
        return jnp.ones_like(prediction)


def test_subclass_with_its_own_curvature(getkey):
    """A loss subclass that overrides `per_sample` and the curvature the GGN reads is
    accepted, by both routes, and matches the reference; the Fisher refuses it, since
    its inherited sampler belongs to the parent's likelihood."""
    model = cz.MLP(3, 2, 4, 1, key=getkey())
    batch = make_batch(model, "mse", getkey())
    expected = reference_ggn_diagonal(model, _HalfMSE(), batch)
    assert_diagonal_close(cz.ggn_diagonal(model, _HalfMSE(), batch), expected)
    assert_diagonal_close(cz.ggn_diagonal(model, _HalfMSE(), batch, method="generic"), expected)
    with pytest.raises(ValueError, match="inherits `sample_targets` from MSE"):
        cz.fisher_diagonal(model, _HalfMSE(), batch, key=jr.key(0))


def test_mixed_precision_leaves_keep_their_dtype(getkey):
    model = cz.MLP(3, 3, 4, 1, key=getkey())
    model = jax.tree.map(lambda x: x.astype(jnp.float32) if eqx.is_inexact_array(x) else x, model)
    model = eqx.tree_at(lambda m: m.layers[1].weight, model, replace_fn=jnp.bfloat16)
    x, y = make_batch(model, "ce", getkey())
    batch = (x.astype(jnp.float32), y)
    loss = cz.losses.cross_entropy
    for result in (
        model.ggn_diagonal(loss, batch),
        model.ggn_diagonal(loss, batch, method="generic"),
        model.empirical_fisher_diagonal(loss, batch),
        model.hutchinson_diagonal(loss, batch, key=jr.key(0), num_probes=2, control_variate="ggn"),
    ):
        assert result.layers[1].weight.dtype == jnp.bfloat16
        assert result.layers[0].weight.dtype == jnp.float32
