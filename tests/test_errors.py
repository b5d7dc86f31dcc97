"""Bad input raises a clear error naming the argument, before any heavy work."""

import curvzoo as cz
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from .helpers import (
    assert_diagonal_close,
    flat,
    reference_hutchinson,
    reference_squared_gradients,
)


@pytest.fixture
def setup(getkey):
    model = cz.MLP(3, 4, 5, 1, key=getkey())
    x = jr.normal(getkey(), (6, 3))
    y = jr.randint(getkey(), (6,), 0, 4)
    return model, x, y


def test_loss_returning_non_scalar(setup):
    model, x, y = setup

    def per_sample_losses(model, batch):
        return jnp.sum(jax.vmap(model)(batch[0]) ** 2, axis=-1)

    with pytest.raises(ValueError, match=r"`loss` must return a scalar.*\(6,\)"):
        cz.hessian_diagonal(model, per_sample_losses, (x, y))


def test_loss_returning_integer(setup):
    model, x, y = setup
    with pytest.raises(ValueError, match="`loss` must return a real floating-point"):
        cz.hessian_diagonal(model, lambda m, b: jnp.sum(b[1]), (x, y))


def test_loss_not_callable(setup):
    model, x, y = setup
    with pytest.raises(TypeError, match="`loss` must be"):
        cz.hessian_diagonal(model, "cross_entropy", (x, y))


def test_ragged_batch(setup):
    model, x, y = setup
    with pytest.raises(ValueError, match=r"leading \(batch\) axis.*batch\[0\]: 6.*batch\[1\]: 5"):
        cz.hessian_diagonal(model, cz.losses.cross_entropy, (x, y[:5]))


def test_scalar_in_batch(setup):
    model, x, _ = setup
    with pytest.raises(ValueError, match=r"`batch\[1\]` is a scalar"):
        cz.hessian_diagonal(model, cz.losses.cross_entropy, (x, jnp.array(1)))


def test_batch_not_a_pair(setup):
    model, x, y = setup
    with pytest.raises(ValueError, match=r"`batch` for a curvzoo loss must be a pair"):
        cz.hessian_diagonal(model, cz.losses.cross_entropy, (x, y, y))


def test_filter_spec_selects_nothing(setup):
    model, x, y = setup
    spec = jax.tree.map(lambda _: False, model)
    with pytest.raises(ValueError, match="`filter_spec` leaves nothing to differentiate"):
        cz.hessian_diagonal(model, cz.losses.cross_entropy, (x, y), filter_spec=spec)
    with pytest.raises(ValueError, match="`filter_spec` leaves nothing to differentiate"):
        cz.hessian_diagonal(model, cz.losses.cross_entropy, (x, y), filter_spec=lambda leaf: False)


def test_filter_spec_wrong_structure(setup):
    model, x, y = setup
    with pytest.raises(ValueError, match="`filter_spec` must be .* prefix of `model`"):
        cz.hessian_diagonal(model, cz.losses.cross_entropy, (x, y), filter_spec=[True])


def test_filter_spec_wrong_leaves(setup):
    model, x, y = setup
    spec = jax.tree.map(lambda _: 1, eqx.filter(model, eqx.is_array))
    with pytest.raises(TypeError, match="`filter_spec` must be a callable or a PyTree of bools"):
        cz.hessian_diagonal(model, cz.losses.cross_entropy, (x, y), filter_spec=spec)


@pytest.mark.parametrize("chunk_size", [0, -3])
def test_chunk_size_below_one(setup, chunk_size):
    model, x, y = setup
    with pytest.raises(ValueError, match="`chunk_size` must be >= 1"):
        cz.hessian_diagonal(model, cz.losses.cross_entropy, (x, y), chunk_size=chunk_size)


@pytest.mark.parametrize("chunk_size", [2.0, True, "7"])
def test_chunk_size_not_an_integer(setup, chunk_size):
    model, x, y = setup
    with pytest.raises(TypeError, match="`chunk_size` must be a positive integer"):
        cz.hessian_diagonal(model, cz.losses.cross_entropy, (x, y), chunk_size=chunk_size)


def test_memory_budget_below_one(setup):
    model, x, y = setup
    with pytest.raises(ValueError, match="`memory_budget` must be >= 1"):
        cz.hessian_diagonal(model, cz.losses.cross_entropy, (x, y), memory_budget=0)


@pytest.mark.parametrize("bad_shape", [(6, 1), (6, 4), ()])
def test_labels_of_wrong_shape(setup, bad_shape):
    model, x, _ = setup
    labels = jnp.zeros(bad_shape, jnp.int32)
    with pytest.raises(ValueError, match="`batch`"):
        cz.hessian_diagonal(model, cz.losses.cross_entropy, (x, labels))


def test_labels_of_wrong_shape_per_step(getkey):
    model = cz.RNN(2, 3, 4, cell="elman", readout="all", key=getkey())
    xs = jr.normal(getkey(), (5, 7, 2))
    with pytest.raises(
        ValueError, match=r"`batch` labels for CrossEntropy must have shape \(5, 7\)"
    ):
        cz.hessian_diagonal(model, cz.losses.cross_entropy, (xs, jnp.zeros(5, jnp.int32)))


def test_labels_not_integers(setup):
    model, x, _ = setup
    with pytest.raises(ValueError, match="`batch` labels for CrossEntropy must be integers"):
        cz.hessian_diagonal(model, cz.losses.cross_entropy, (x, jnp.zeros(6)))


def test_labels_out_of_range(setup):
    model, x, y = setup
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\)"):
        cz.hessian_diagonal(model, cz.losses.cross_entropy, (x, y.at[0].set(4)))
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\)"):
        cz.hessian_diagonal(model, cz.losses.cross_entropy, (x, y.at[0].set(-1)))


def test_regression_targets_of_wrong_shape(setup):
    model, x, _ = setup
    with pytest.raises(
        ValueError, match=r"`batch` targets for MSE must have the predictions' shape"
    ):
        cz.hessian_diagonal(model, cz.losses.mse, (x, jnp.zeros((6, 3))))
    with pytest.raises(
        ValueError, match=r"`batch` targets for BCEWithLogits must have the predictions"
    ):
        cz.hessian_diagonal(model, cz.losses.binary_cross_entropy_with_logits, (x, jnp.zeros(6)))


def test_bce_targets_out_of_range(setup):
    model, x, _ = setup
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        cz.hessian_diagonal(
            model, cz.losses.binary_cross_entropy_with_logits, (x, jnp.full((6, 4), 2.0))
        )


@pytest.mark.parametrize("model", [None, lambda x: x, jax.nn.tanh, {"w": jnp.ones(3)}])
def test_model_not_an_equinox_module(setup, model):
    _, x, y = setup
    with pytest.raises(TypeError, match="`model` must be an Equinox module"):
        cz.hessian_diagonal(model, cz.losses.cross_entropy, (x, y))


def test_inputs_of_wrong_shape(setup):
    model, _, y = setup
    with pytest.raises(ValueError, match=r"MLP expects one input of shape \(3,\)"):
        cz.hessian_diagonal(model, cz.losses.cross_entropy, (jnp.zeros((6, 2)), y))


def test_bad_reduction():
    with pytest.raises(ValueError, match="`reduction` must be one of"):
        cz.losses.CrossEntropy(reduction="batchmean")


# ## The curvature family


def _custom_loss(model, batch):
    return jnp.mean(jax.vmap(model)(batch[0]) ** 2)


@pytest.mark.parametrize(
    "function", [cz.ggn_diagonal, cz.empirical_fisher_diagonal, cz.fisher_diagonal]
)
def test_family_needs_a_curvzoo_loss(setup, function):
    model, x, y = setup
    kwargs = {"key": jr.key(0)} if function is cz.fisher_diagonal else {}
    with pytest.raises(TypeError, match="`loss` for `.*` must be a curvzoo loss"):
        function(model, _custom_loss, (x, y), **kwargs)


def test_control_variate_needs_a_curvzoo_loss(setup):
    model, x, y = setup
    with pytest.raises(TypeError, match="`loss` for `hutchinson_diagonal.*curvzoo loss"):
        cz.hutchinson_diagonal(
            model, _custom_loss, (x, y), key=jr.key(0), num_probes=2, control_variate="ggn"
        )
    # without the control variate a custom callable is fine, and gives the estimate
    estimate = cz.hutchinson_diagonal(model, _custom_loss, (x, y), key=jr.key(0), num_probes=2)
    expected, _ = reference_hutchinson(model, _custom_loss, (x, y), key=jr.key(0), num_probes=2)
    assert_diagonal_close(estimate, expected)


@pytest.mark.parametrize("function", [cz.fisher_diagonal, cz.hutchinson_diagonal])
def test_stochastic_functions_need_a_key(setup, function):
    model, x, y = setup
    loss = cz.losses.cross_entropy
    kwargs = {"num_probes": 2} if function is cz.hutchinson_diagonal else {}
    with pytest.raises(TypeError, match="key"):
        function(model, loss, (x, y), **kwargs)
    for bad in (0, jnp.zeros(3, jnp.uint32), jr.split(jr.key(0), 2), None):
        with pytest.raises(TypeError, match="`key` must be one JAX PRNG key"):
            function(model, loss, (x, y), key=bad, **kwargs)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_counts_must_be_positive_integers(setup, bad):
    model, x, y = setup
    loss = cz.losses.cross_entropy
    error = (TypeError, ValueError)
    with pytest.raises(error, match="`num_probes` must be"):
        cz.hutchinson_diagonal(model, loss, (x, y), key=jr.key(0), num_probes=bad)
    with pytest.raises(error, match="`num_samples` must be"):
        cz.fisher_diagonal(model, loss, (x, y), key=jr.key(0), num_samples=bad)


def test_hutchinson_options(setup):
    model, x, y = setup
    loss = cz.losses.cross_entropy
    key = jr.key(0)
    with pytest.raises(ValueError, match="`control_variate` must be None or 'ggn'"):
        cz.hutchinson_diagonal(model, loss, (x, y), key=key, num_probes=2, control_variate="gn")
    with pytest.raises(ValueError, match="`return_stderr=True` needs `num_probes` >= 2"):
        cz.hutchinson_diagonal(model, loss, (x, y), key=key, num_probes=1, return_stderr=True)
    with pytest.raises(TypeError, match="`return_stderr` must be True or False"):
        cz.hutchinson_diagonal(model, loss, (x, y), key=key, num_probes=2, return_stderr="yes")


@pytest.mark.parametrize(
    "function", [cz.hessian_diagonal, cz.ggn_diagonal, cz.empirical_fisher_diagonal]
)
def test_per_sample_must_be_a_bool(setup, function):
    model, x, y = setup
    with pytest.raises(TypeError, match="`per_sample` must be True or False"):
        function(model, cz.losses.cross_entropy, (x, y), per_sample=1)


def test_structured_ggn_for_an_rnn_names_the_reason(getkey):
    """The zoo RNN's structured kernel covers the Hessian and the GGN (since the
    recurrent issue); the squared-gradient diagonals still take vector-Jacobian
    products, and forcing the structured kernel names why."""
    model = cz.RNN(2, 3, 4, cell="gru", key=getkey())
    batch = (jr.normal(getkey(), (2, 3, 2)), jnp.array([0, 1]))
    with pytest.raises(ValueError, match="structured kernel for the Hessian and the GGN"):
        cz.empirical_fisher_diagonal(model, cz.losses.cross_entropy, batch, method="structured")
    with pytest.raises(ValueError, match="`method` must be one of"):
        cz.ggn_diagonal(model, cz.losses.cross_entropy, batch, method="exact")


def test_family_rejects_losses_it_cannot_read(setup):
    model, x, y = setup

    class Rescaled(cz.losses.CrossEntropy):
        def __call__(self, model, batch):
            return 2 * super().__call__(model, batch)

    class Focal(cz.losses.CrossEntropy):
        def per_sample(self, prediction, target):
            return super().per_sample(prediction, target) ** 2

    class NoSampler(cz.losses.AbstractLoss):
        reduction: str = "mean"

        def per_sample(self, prediction, target):
            return jnp.sum((prediction - target) ** 4)

        def elements_per_sample(self, prediction_shape):
            return 1

        def check_shapes(self, prediction_shape, target_shape, target_dtype):
            pass

    with pytest.raises(ValueError, match=r"`loss` \(Rescaled\) overrides `__call__`"):
        cz.ggn_diagonal(model, Rescaled(), (x, y))
    with pytest.raises(ValueError, match=r"inherits `output_hessian_factor`"):
        cz.ggn_diagonal(model, Focal(), (x, y))
    # the empirical Fisher needs no loss Hessian, so `Focal` is fine there
    squared = reference_squared_gradients(model, Focal(), (x, y))
    scale = Focal().scale(6, (4,))
    expected = jax.tree.map(lambda leaf: scale * leaf.sum(0), squared)
    assert_diagonal_close(cz.empirical_fisher_diagonal(model, Focal(), (x, y)), expected)
    targets = jnp.zeros((6, 4))
    with pytest.raises(TypeError, match=r"needs a method `sample_targets"):
        cz.fisher_diagonal(model, NoSampler(), (x, targets), key=jr.key(0))


# ## Non-finite models, batches and results


_FUNCTIONS = {
    "hessian": lambda m, l, b, **kw: cz.hessian_diagonal(m, l, b, **kw),
    "ggn": lambda m, l, b, **kw: cz.ggn_diagonal(m, l, b, **kw),
    "empirical_fisher": lambda m, l, b, **kw: cz.empirical_fisher_diagonal(m, l, b, **kw),
    "fisher": lambda m, l, b, **kw: cz.fisher_diagonal(m, l, b, key=jr.key(0), **kw),
    "hutchinson": lambda m, l, b, **kw: cz.hutchinson_diagonal(
        m, l, b, key=jr.key(0), num_probes=2, **kw
    ),
}


@pytest.mark.parametrize("function", list(_FUNCTIONS))
def test_non_finite_parameters_and_inputs_are_named(setup, function):
    model, x, y = setup
    call = _FUNCTIONS[function]
    loss = cz.losses.cross_entropy
    broken = eqx.tree_at(
        lambda m: m.layers[1].weight, model, replace_fn=lambda w: w.at[0, 2].set(jnp.nan)
    )
    with pytest.raises(ValueError, match=r"`model\.layers\[1\]\.weight` holds 1 non-finite"):
        call(broken, loss, (x, y))
    with pytest.raises(ValueError, match=r"`batch\[0\]` holds 2 non-finite"):
        call(model, loss, (x.at[1, :2].set(jnp.inf), y))


def test_non_finite_targets_and_results(setup, getkey):
    model, x, _ = setup
    targets = jr.normal(getkey(), (6, 4))
    with pytest.raises(ValueError, match=r"`batch\[1\]` holds 1 non-finite"):
        cz.ggn_diagonal(model, cz.losses.mse, (x, targets.at[3, 0].set(jnp.nan)))

    def overflowing(model, batch):
        return jnp.sum(jnp.exp(800.0 * jax.vmap(model)(batch[0])))

    with pytest.raises(ValueError, match=r"the curvature came out non-finite: `diagonal"):
        cz.hessian_diagonal(model, overflowing, (x,))
    # Opting out gives the raw numbers; under `jax.jit` nothing can be checked.
    raw = cz.hessian_diagonal(model, overflowing, (x,), check_finite=False)
    assert not all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(raw))
    jitted = eqx.filter_jit(lambda m, b: cz.hessian_diagonal(m, overflowing, b))
    np.testing.assert_allclose(flat(jitted(model, (x,))), flat(raw), rtol=1e-12)
    with pytest.raises(TypeError, match="`check_finite` must be True or False"):
        cz.hessian_diagonal(model, overflowing, (x,), check_finite="no")


def test_large_finite_results_are_not_called_non_finite(getkey):
    """The result's check squares entries (a sum of squares is finite only if every
    entry is); a float32 diagonal of about 1e20, whose squares overflow, is finite and
    must be returned, not refused."""
    model = cz.MLP(3, 2, 4, 1, key=getkey(), dtype=jnp.float32)

    def steep(model, batch):
        del batch
        params = eqx.filter(model, eqx.is_inexact_array)
        return 1e20 * sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(params))

    diagonal = cz.hessian_diagonal(model, steep, (jnp.zeros((2, 3), jnp.float32),))
    for leaf in jax.tree.leaves(diagonal):
        assert leaf.dtype == jnp.float32
        np.testing.assert_allclose(leaf, 2e20, rtol=1e-6)


@pytest.mark.parametrize("function", list(_FUNCTIONS))
def test_shared_bad_input_on_every_function(setup, function):
    """The checks every function shares, each naming its argument."""
    model, x, y = setup
    call = _FUNCTIONS[function]
    loss = cz.losses.cross_entropy
    with pytest.raises(ValueError, match="must share their leading"):
        call(model, loss, (x, y[:4]))
    with pytest.raises(ValueError, match="`filter_spec` must be"):
        call(model, loss, (x, y), filter_spec=[True, False])
    with pytest.raises(ValueError, match="`chunk_size` must be >= 1"):
        call(model, loss, (x, y), chunk_size=0)
    with pytest.raises(ValueError, match="`memory_budget` must be >= 1"):
        call(model, loss, (x, y), memory_budget=0)
    with pytest.raises(TypeError, match="`model` must be an Equinox module"):
        call(lambda v: v, loss, (x, y))
    with pytest.raises(TypeError, match="`mesh` must be a `jax.sharding.Mesh`"):
        call(model, loss, (x, y), mesh="data")


class _CappedLabels(cz.losses.CrossEntropy):
    """Cross-entropy whose label check reads a field of the loss."""

    cap: int = eqx.field(static=True)

    def __init__(self, cap: int):
        super().__init__()
        self.cap = cap

    def check_values(self, prediction_shape, targets) -> None:
        if targets.max() >= self.cap:
            raise ValueError(f"`batch` labels must lie below {self.cap}")


def test_target_checks_are_remembered_per_array_and_per_loss(setup):
    """A target array that passed one loss's check is checked again by a loss whose
    check differs (here by a field), and still refused after passing once."""
    model, x, _ = setup
    y = jnp.array([0, 1, 2, 3, 0, 1])
    cz.ggn_diagonal(model, _CappedLabels(4), (x, y))
    cz.ggn_diagonal(model, _CappedLabels(4), (x, y))  # remembered
    with pytest.raises(ValueError, match="below 2"):
        cz.ggn_diagonal(model, _CappedLabels(2), (x, y))
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\)"):
        cz.ggn_diagonal(model, cz.losses.cross_entropy, (x, y.at[0].set(4)))


# ## Errors that were opaque (issue 18): the model's output, a non-loss, BatchNorm


class _Pair(eqx.Module):
    linear: eqx.nn.Linear

    def __call__(self, x):
        return self.linear(x), self.linear(x)


class _Named(eqx.Module):
    linear: eqx.nn.Linear

    def __call__(self, x):
        return {"logits": self.linear(x)}


_KEY = jr.key(0)
_CALLS = {
    "hessian_diagonal": lambda m, l, b: cz.hessian_diagonal(m, l, b),
    "ggn_diagonal": lambda m, l, b: cz.ggn_diagonal(m, l, b),
    "plan": lambda m, l, b: cz.plan(m, l, b),
    "hessian_eigenvalues": lambda m, l, b: cz.hessian_eigenvalues(m, l, b, key=_KEY),
}


@pytest.mark.parametrize("call", _CALLS)
@pytest.mark.parametrize("wrapper", [_Pair, _Named])
def test_model_returning_a_pytree(call, wrapper, setup):
    _, x, y = setup
    model = wrapper(eqx.nn.Linear(3, 4, key=_KEY))
    with pytest.raises(ValueError, match=r"`model` must return one array per example"):
        _CALLS[call](model, cz.losses.cross_entropy, (x, y))
    with pytest.raises(ValueError, match=r"`model` must return one array per example"):
        cz.losses.cross_entropy(model, (x, y))


@pytest.mark.parametrize("call", _CALLS)
def test_array_function_as_loss(call, setup):
    model, x, y = setup
    with pytest.raises(TypeError, match=r"`loss` is `jax.numpy.mean`, a function of arrays"):
        _CALLS[call](model, jnp.mean, (x, y))


def _batch_norm_model():
    def make(key):
        return eqx.nn.Sequential(
            [eqx.nn.Linear(3, 4, key=key), eqx.nn.BatchNorm(4, "batch", mode="batch")]
        )

    return eqx.nn.make_with_state(make)(_KEY)


def test_batch_norm_in_training_mode(setup):
    _, x, y = setup
    model, state = _batch_norm_model()
    with pytest.raises(ValueError, match=r"inference_mode\(model\)"):
        cz.hessian_diagonal(model, cz.losses.cross_entropy, (x, y), args=state)

    def loss(m, b):
        out, _ = jax.vmap(m, in_axes=(0, None), out_axes=(0, None))(b[0], state)
        return cz.losses.cross_entropy(lambda z: z, (out, b[1]))

    for call in (cz.hessian_diagonal, cz.hessian_operator):
        with pytest.raises(ValueError, match=r"BatchNorm` in training mode"):
            call(model, loss, (x, y))
    # What the message says to do works, and is exact.
    model = eqx.nn.inference_mode(model)
    diagonal = cz.hessian_diagonal(model, cz.losses.cross_entropy, (x, y), args=state)
    generic = cz.hessian_diagonal(
        model, cz.losses.cross_entropy, (x, y), args=state, method="generic"
    )
    np.testing.assert_allclose(flat(diagonal), flat(generic), rtol=1e-10, atol=1e-14)


def test_an_error_inside_a_callable_loss_says_how_it_was_called(setup):
    model, x, y = setup

    def loss(m, b):
        return jnp.sum(jax.vmap(m)(b[0]) @ jnp.ones(5))  # (6, 4) @ (5,)

    with pytest.raises(TypeError) as info:
        cz.hessian_diagonal(model, loss, (x, y))
    assert "while curvzoo traced `loss(model, batch)`" in "".join(info.value.__notes__)
