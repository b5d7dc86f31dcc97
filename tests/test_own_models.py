"""Users' own Equinox models: `eqx.nn.MLP` and `eqx.nn.Sequential` of dense and
convolutional layers, elementwise activations, pooling and a flatten register their
structure and take the structured kernels, exactly; an activation that is not
elementwise at the model's shapes sends the call to the generic kernel; a call the
generic kernel would run for long warns."""

import curvzoo as cz
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from .helpers import assert_diagonal_close, reference_ggn_diagonal, reference_hessian_diagonal


RNG = np.random.default_rng(1)
KEYS = iter(jax.random.split(jax.random.key(2), 40))


def _vectors(n=5, size=3):
    return jnp.asarray(RNG.normal(size=(n, size)))


def _images(n=3):
    return jnp.asarray(RNG.normal(size=(n, 1, 8, 8)))


def _targets(model, inputs):
    return jnp.asarray(RNG.normal(size=jax.vmap(model)(inputs).shape))


def _sequential(*layers):
    return eqx.nn.Sequential(list(layers))


def _linear(n_in, n_out):
    return eqx.nn.Linear(n_in, n_out, key=next(KEYS))


MODELS = {
    "eqx-mlp": lambda: (
        eqx.nn.MLP(3, 2, 4, 2, activation=jax.nn.softplus, key=next(KEYS)),
        _vectors(),
    ),
    "eqx-mlp-final": lambda: (
        eqx.nn.MLP(3, 2, 4, 1, final_activation=jnp.tanh, use_final_bias=False, key=next(KEYS)),
        _vectors(),
    ),
    # Two activations in a row: a residual pulled through an activation.
    "two-activations": lambda: (
        _sequential(
            _linear(3, 4), eqx.nn.Lambda(jnp.tanh), eqx.nn.Lambda(jax.nn.softplus), _linear(4, 2)
        ),
        _vectors(),
    ),  # fmt: skip
    # Residuals two dense layers up, through a convolution below them.
    "conv-dense-dense": lambda: (
        _sequential(
            eqx.nn.Conv2d(1, 2, 3, key=next(KEYS)),
            eqx.nn.Lambda(jnp.tanh),
            eqx.nn.MaxPool2d(2, 2),
            eqx.nn.Lambda(jnp.ravel),
            _linear(18, 4),
            eqx.nn.Lambda(jnp.tanh),
            _linear(4, 2),
        ),
        _images(),
    ),  # fmt: skip
    # An activation after max-pooling (a residual pulled through pooling) and average
    # pooling (which does not keep a diagonal diagonal).
    "pool-then-activation": lambda: (
        _sequential(
            eqx.nn.Conv2d(1, 2, 3, key=next(KEYS)),
            eqx.nn.MaxPool2d(2, 2),
            eqx.nn.Lambda(jnp.tanh),
            eqx.nn.Conv2d(2, 2, 2, key=next(KEYS)),
            eqx.nn.Lambda(jax.nn.sigmoid),
            eqx.nn.AvgPool2d(2, 1),
            eqx.nn.Lambda(jnp.ravel),
            _linear(2 * 1 * 1, 3),
        ),
        _images(),
    ),  # fmt: skip
    "linear": lambda: (_linear(3, 2), _vectors()),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_registered_models_take_the_structured_kernel_exactly(name):
    model, inputs = MODELS[name]()
    batch = (inputs, _targets(model, inputs))
    loss = cz.losses.mse
    assert cz.plan(model, loss, batch).kernel == "layered"
    assert cz.plan(model, loss, batch, quantity="ggn").kernel == "layered"
    assert_diagonal_close(
        cz.hessian_diagonal(model, loss, batch), reference_hessian_diagonal(model, loss, batch)
    )
    assert_diagonal_close(
        cz.ggn_diagonal(model, loss, batch), reference_ggn_diagonal(model, loss, batch)
    )


def test_cross_entropy_on_an_equinox_mlp_with_frozen_leaves():
    model = eqx.nn.MLP(3, 4, 5, 2, activation=jax.nn.gelu, key=next(KEYS))
    batch = (_vectors(6), jnp.asarray(RNG.integers(0, 4, size=6)))
    spec = eqx.tree_at(lambda m: m.layers[1].weight, jax.tree.map(lambda _: True, model), False)
    loss = cz.losses.CrossEntropy(reduction="sum")
    result = cz.hessian_diagonal(model, loss, batch, filter_spec=spec, chunk_size=4)
    assert result.layers[1].weight is None
    assert_diagonal_close(result, reference_hessian_diagonal(model, loss, batch, spec))


def _shape_dependent(u):
    """Elementwise at length 5 only: a probe of length 5 could not tell."""
    if u.shape[-1] == 5:
        return jnp.tanh(u)
    return jnp.tanh(u) + 0.3 * jnp.roll(u, 1)


@pytest.mark.parametrize(
    "activation",
    [
        _shape_dependent,
        lambda u: jnp.tanh(u) + 0.1 * jnp.sum(u),
        lambda u: jnp.where(u > 10.0, u[::-1], jnp.tanh(u)),
    ],
    ids=["shape-dependent", "sum", "value-dependent"],
)
def test_activations_that_mix_entries_go_generic(activation):
    """Elementwise is read off the program at the model's real shapes, not probed: each
    of these mixes entries (at width 4, or for some values only), so `auto` takes the
    generic kernel and the result is exact; `method="structured"` names the activation."""
    model = cz.MLP(3, 2, 4, 1, activation=activation, key=next(KEYS))
    inputs = _vectors()
    batch = (inputs, _targets(model, inputs))
    plan = cz.plan(model, cz.losses.mse, batch)
    assert plan.kernel == "generic" and "activation" in plan.reason
    assert_diagonal_close(
        cz.hessian_diagonal(model, cz.losses.mse, batch),
        reference_hessian_diagonal(model, cz.losses.mse, batch),
    )
    with pytest.raises(ValueError, match="activation.*not an elementwise function"):
        cz.hessian_diagonal(model, cz.losses.mse, batch, method="structured")


def test_unsupported_layers_are_named():
    model = _sequential(_linear(3, 4), eqx.nn.LayerNorm(4), _linear(4, 2))
    inputs = _vectors()
    batch = (inputs, _targets(model, inputs))
    plan = cz.plan(model, cz.losses.mse, batch)
    assert plan.kernel == "generic" and "layers[1] of type LayerNorm" in plan.reason
    assert "LayerNorm" in repr(plan)


def test_a_long_call_warns_on_every_kernel(monkeypatch):
    """The warning names the estimate, the kernel and the faster routes, for the
    generic kernel and the structured one alike (with the threshold at zero)."""
    from curvzoo._run import _execute

    monkeypatch.setattr(_execute, "SLOW_SECONDS", 0.0)
    model = cz.MLP(3, 2, 4, 1, key=next(KEYS))
    inputs = _vectors()
    batch = (inputs, _targets(model, inputs))
    with pytest.warns(cz.SlowCurvatureWarning, match="generic .*kernel.*ggn_diagonal"):
        cz.hessian_diagonal(model, lambda m, b: cz.losses.mse(m, b), batch)
    with pytest.warns(cz.SlowCurvatureWarning, match="structured, layered"):
        cz.hessian_diagonal(model, cz.losses.mse, batch)
