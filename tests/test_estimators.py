"""Estimators as objects: `curvzoo.diagonal(model, loss, batch, estimator)` against
independent references (float64, `jax.hessian` and Jacobians), the older functions as
its aliases (the same bits), `curvzoo.plan` with an estimator, `Estimate`, and the
bad-input battery."""

import curvzoo as cz
import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from .helpers import (
    _rademacher_probes,
    assert_diagonal_close,
    count_compilations,
    dense_hessian,
    make_batch,
    reference_hessian_diagonal,
    reference_squared_gradients,
    tree_allclose,
)


LOSS = cz.losses.cross_entropy


def _models():
    key = jr.key(3)
    return {
        "mlp": cz.MLP(3, 3, 5, 1, key=key),
        "token-gru-lengths": cz.RNN(3, 4, 3, "gru", "all", vocab_size=6, key=key),
    }


def _case(name):
    model = _models()[name]
    if name == "mlp":
        return model, make_batch(model, "ce", jr.key(4), batch_size=4)
    tokens = jr.randint(jr.key(5), (4, 5), 0, 6)  # 4 sequences of up to 5 tokens
    targets = jr.randint(jr.key(6), (4, 5), 0, 3)  # a class per step
    return model, (tokens, targets, jnp.array([5, 3, 1, 2]))


ALIASES = {
    "exact": (cz.Exact(), lambda m, b, k: cz.hessian_diagonal(m, LOSS, b)),
    "ggn": (cz.GGN(), lambda m, b, k: cz.ggn_diagonal(m, LOSS, b)),
    "empirical-fisher": (
        cz.EmpiricalFisher(), lambda m, b, k: cz.empirical_fisher_diagonal(m, LOSS, b)
    ),
    "fisher": (cz.Fisher(3), lambda m, b, k: cz.fisher_diagonal(m, LOSS, b, key=k, num_samples=3)),
    "hutchinson": (
        cz.Hutchinson(5),
        lambda m, b, k: cz.hutchinson_diagonal(m, LOSS, b, key=k, num_probes=5),
    ),
    "hutchinson-cv": (
        cz.Hutchinson(5, cz.GGN()),
        lambda m, b, k: cz.hutchinson_diagonal(
            m, LOSS, b, key=k, num_probes=5, control_variate="ggn"
        ),
    ),
}  # fmt: skip


@pytest.mark.parametrize("model_name", ["mlp", "token-gru-lengths"])
@pytest.mark.parametrize("name", list(ALIASES))
def test_the_functions_are_aliases(model_name, name):
    """`curvzoo.diagonal` with an estimator gives the bits of the function of the same
    estimator, on a feed-forward model and on a token GRU with lengths."""
    model, batch = _case(model_name)
    estimator, function = ALIASES[name]
    key = jr.key(9)
    got = cz.diagonal(model, LOSS, batch, estimator, key=key)
    assert tree_allclose(got, function(model, batch, key), rtol=0)
    if model_name == "mlp":  # the zoo models' methods too
        method = getattr(model, estimator.function.strip("`"))
        kwargs = {"key": key} if estimator.random else {}
        if isinstance(estimator, cz.Fisher):
            kwargs["num_samples"] = 3
        if isinstance(estimator, cz.Hutchinson):
            kwargs["num_probes"] = 5
            kwargs["control_variate"] = None if estimator.control_variate is None else "ggn"
        assert tree_allclose(method(LOSS, batch, **kwargs), got, rtol=0)
        assert tree_allclose(model.diagonal(LOSS, batch, estimator, key=key), got, rtol=0)


def _dense_ggn(model, batch) -> np.ndarray:
    """`scale * sum_n J_n^T H_n J_n` by hand: `J_n` by `jax.jacfwd` of sample `n`'s
    predictions (one row per step), `H_n` by `jax.hessian` of its cross-entropy summed
    over its valid steps (the steps past its length weigh zero), `scale` one over the
    valid steps (the mean); for the MLP, one step per sample."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    inputs, targets = batch[0], batch[1]
    lengths = batch[2] if len(batch) > 2 else jnp.ones(inputs.shape[0], jnp.int32)

    @jax.jit
    @jax.vmap
    def one(x, y, length):
        def predict(p):
            return eqx.combine(unravel(p), static)(x).reshape(-1, 3)

        def per_sample(z):
            valid = jnp.arange(z.shape[0]) < length
            picked = jnp.take_along_axis(jax.nn.log_softmax(z), y.reshape(-1, 1), 1)[:, 0]
            return -jnp.sum(jnp.where(valid, picked, 0.0))

        z = predict(flat)
        jac = jax.jacfwd(predict)(flat).reshape(-1, flat.size)
        hess = jax.hessian(per_sample)(z).reshape(jac.shape[0], jac.shape[0])
        return jac.T @ hess @ jac

    return np.asarray(one(inputs, targets, lengths).sum(0)) / float(jnp.sum(lengths))


def _as_tree(model, flat_values):
    params, _ = eqx.partition(model, eqx.is_inexact_array)
    return jax.flatten_util.ravel_pytree(params)[1](jnp.asarray(flat_values))


@pytest.mark.parametrize("model_name", ["mlp", "token-gru-lengths"])
def test_against_independent_references(model_name):
    """Each estimator against what it estimates, computed by hand in float64: the
    exact ones to 1e-10, Hutchinson with the documented probes to rounding, the Fisher
    over many draws within its sampling error of the GGN."""
    model, batch = _case(model_name)
    exact = reference_hessian_diagonal(model, LOSS, batch)  # `jax.hessian` of the loss
    assert_diagonal_close(cz.diagonal(model, LOSS, batch), exact)
    dense_ggn = _dense_ggn(model, batch)
    ggn = _as_tree(model, np.diag(dense_ggn))
    assert_diagonal_close(cz.diagonal(model, LOSS, batch, cz.GGN()), ggn)
    if model_name == "mlp":  # one label per sample: `scale = 1 / N` (the mean)
        squared = jax.tree.map(lambda g: g.mean(0), reference_squared_gradients(model, LOSS, batch))
        assert_diagonal_close(cz.diagonal(model, LOSS, batch, cz.EmpiricalFisher()), squared)
    key = jr.key(11)
    hessian = dense_hessian(model, LOSS, batch)
    probes = np.asarray(_rademacher_probes(key, 6, hessian.shape[0], jnp.float64))
    for control in (None, cz.GGN()):
        matrix = hessian if control is None else hessian - dense_ggn
        samples = probes * (probes @ matrix)
        value = samples.mean(0) + (0 if control is None else np.diag(dense_ggn))
        stderr = samples.std(0, ddof=1) / np.sqrt(6)
        estimate = cz.diagonal(
            model, LOSS, batch, cz.Hutchinson(6, control), key=key, return_stderr=True
        )
        assert_diagonal_close(estimate.value, _as_tree(model, value), rtol=1e-9)
        assert_diagonal_close(estimate.stderr, _as_tree(model, stderr), rtol=1e-9)
    # The Fisher is unbiased for the GGN: 8 independent estimates of 50 draws per
    # sample, their mean within 5 standard errors of the GGN.
    draws = [
        cz.diagonal(model, LOSS, batch, cz.Fisher(50), key=jr.fold_in(key, i)) for i in range(8)
    ]
    stacked = [np.stack(leaves) for leaves in zip(*map(jax.tree.leaves, draws))]
    for leaves, expected in zip(stacked, jax.tree.leaves(ggn)):
        mean, spread = leaves.mean(0), leaves.std(0, ddof=1) / np.sqrt(len(leaves))
        assert np.all(np.abs(mean - expected) <= 5 * spread + 1e-12)


def test_estimators_are_values():
    """Frozen, hashable, equal by their settings: an equal estimator finds the cached
    plan (no new compilation)."""
    assert cz.Hutchinson(4, cz.GGN()) == cz.Hutchinson(num_probes=4, control_variate=cz.GGN())
    assert hash(cz.Fisher(2)) == hash(cz.Fisher(2)) and cz.Fisher(2) != cz.Fisher(3)
    assert cz.Exact() != cz.GGN()
    with pytest.raises(AttributeError):
        cz.Fisher(2).num_samples = 3
    model, batch = _case("mlp")
    first, second = jr.key(0), jr.key(1)
    cz.diagonal(model, LOSS, batch, cz.Hutchinson(3), key=first)
    with count_compilations() as compiled:
        cz.diagonal(model, LOSS, batch, cz.Hutchinson(3), key=second)
    assert compiled[0] == 0


def test_estimate_is_a_pytree_that_unpacks():
    model, batch = _case("mlp")
    estimate = cz.diagonal(model, LOSS, batch, cz.Hutchinson(4), key=jr.key(0), return_stderr=True)
    assert isinstance(estimate, cz.Estimate)
    value, stderr = estimate
    assert value is estimate.value and stderr is estimate.stderr
    doubled = jax.tree.map(lambda x: 2 * x, estimate)
    assert tree_allclose(doubled.value, jax.tree.map(lambda x: 2 * x, value))
    old = cz.hutchinson_diagonal(
        model, LOSS, batch, key=jr.key(0), num_probes=4, return_stderr=True
    )
    assert isinstance(old, cz.Estimate) and tree_allclose(old.stderr, stderr, rtol=0)
    assert jax.tree.structure(value) == jax.tree.structure(stderr)


def test_under_an_outer_jit():
    """`curvzoo.diagonal` inside `eqx.filter_jit`, with the estimator as a static
    argument or closed over, gives the eager bits."""
    model, batch = _case("mlp")
    key = jr.key(2)

    @eqx.filter_jit
    def run(model, batch, key, estimator):
        return cz.diagonal(model, LOSS, batch, estimator, key=key)

    for estimator in (cz.Exact(), cz.GGN(), cz.Fisher(2), cz.Hutchinson(3, cz.GGN())):
        eager = cz.diagonal(model, LOSS, batch, estimator, key=key)
        assert tree_allclose(run(model, batch, key, estimator), eager, rtol=1e-12)


def test_plan_takes_the_estimator():
    """`curvzoo.plan(..., estimator)` is the plan of `curvzoo.diagonal` with it, and the
    same as the older `quantity=` form."""
    model, batch = _case("token-gru-lengths")
    pairs = [
        (cz.Exact(), {}),
        (cz.GGN(), {"quantity": "ggn"}),
        (cz.EmpiricalFisher(), {"quantity": "empirical_fisher"}),
        (cz.Fisher(2), {"quantity": "fisher", "num_samples": 2}),
        (
            cz.Hutchinson(4, cz.GGN()),
            {"quantity": "hutchinson", "num_probes": 4, "control_variate": "ggn"},
        ),
    ]  # fmt: skip
    for estimator, older in pairs:
        plan = cz.plan(model, LOSS, batch, estimator)
        assert plan == cz.plan(model, LOSS, batch, **older)
        assert plan.quantity == estimator.quantity
        assert plan.estimator == estimator
        assert type(estimator).title in repr(plan)


BAD = [
    (cz.GGN, {}, TypeError, r"got the class GGN; pass an instance such as `curvzoo.GGN\(\)`"),
    ("ggn", {}, TypeError, r"got the string 'ggn'; pass `curvzoo.GGN\(\)`"),
    (3, {}, TypeError, "`estimator` must be one of"),
    (cz.Fisher(), {"key": None}, TypeError, "`key` must be one JAX PRNG key"),
    (cz.Hutchinson(2), {"key": 0}, TypeError, "`key` must be one JAX PRNG key"),
    (cz.Exact(), {"key": 0}, TypeError, "`key` must be one JAX PRNG key"),
    (cz.Hutchinson(2), {"method": "generic"}, ValueError, "`method` does not apply to `Hutch"),
    (cz.Fisher(), {"per_sample": True}, ValueError, "`per_sample=True` does not apply to `Fi"),
    (cz.Hutchinson(2), {"per_sample": True}, ValueError, "`per_sample=True` does not apply"),
    (cz.GGN(), {"per_sample": 1}, TypeError, "`per_sample` must be True or False"),
    (cz.Exact(), {"return_stderr": True}, ValueError, "`return_stderr=True` applies to `curv"),
    (cz.Fisher(), {"return_stderr": True}, ValueError, "`return_stderr=True` applies"),
    (cz.Hutchinson(1), {"return_stderr": True}, ValueError, "needs `num_probes` >= 2"),
    (cz.Hutchinson(2), {"return_stderr": "yes"}, TypeError, "`return_stderr` must be True or"),
    (cz.Exact(), {"method": "fast"}, ValueError, "`method` must be one of"),
]


@pytest.mark.parametrize("estimator, kwargs, error, pattern", BAD)
def test_bad_arguments(estimator, kwargs, error, pattern):
    model, batch = _case("mlp")
    kwargs = {"key": jr.key(0), **kwargs}
    with pytest.raises(error, match=pattern):
        cz.diagonal(model, LOSS, batch, estimator, **kwargs)


def test_bad_estimator_settings():
    for bad in (0, -2):
        with pytest.raises(ValueError, match="`num_probes` must be"):
            cz.Hutchinson(bad)
        with pytest.raises(ValueError, match="`num_samples` must be"):
            cz.Fisher(bad)
    # (the string's hint: `control_variate=curvzoo.GGN()`; under the test-time type
    # checker the field's annotation refuses it first, naming the field)
    with pytest.raises(TypeError, match="control_variate"):
        cz.Hutchinson(2, "ggn")
    with pytest.raises(TypeError, match="control_variate"):
        cz.Hutchinson(2, cz.Exact())
    model, batch = _case("mlp")
    with pytest.raises(TypeError, match="both `estimator` and `quantity`"):
        cz.plan(model, LOSS, batch, cz.GGN(), quantity="ggn")
    with pytest.raises(TypeError, match="got the class Exact"):
        cz.plan(model, LOSS, batch, cz.Exact)


def test_the_loss_each_estimator_needs():
    """A plain callable loss works with `Exact` and `Hutchinson`, and the GGN family
    (and the control variate) say it needs a curvzoo loss."""
    model, batch = _case("mlp")

    def plain(model, batch):
        return LOSS(model, batch)

    key = jr.key(0)
    assert tree_allclose(cz.diagonal(model, plain, batch), cz.diagonal(model, LOSS, batch))
    cz.diagonal(model, plain, batch, cz.Hutchinson(2), key=key)
    for estimator in (cz.GGN(), cz.EmpiricalFisher(), cz.Fisher(), cz.Hutchinson(2, cz.GGN())):
        with pytest.raises(TypeError, match="must be a curvzoo loss"):
            cz.diagonal(model, plain, batch, estimator, key=key)
