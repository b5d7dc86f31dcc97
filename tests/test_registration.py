"""`curvzoo.structures`: a model type registered by its user takes the layered kernel,
with every quantity exact against independent float64 references, and a description
that is not the model's is refused (the generic kernel, with the reason in the plan),
never used."""

import re

import curvzoo as cz
import curvzoo.structures as cs
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest

from .helpers import (
    assert_diagonal_close,
    reference_ggn_diagonal,
    reference_hessian_diagonal,
    reference_squared_gradients,
    spy_kernels,
)


class Conv1dNet(eqx.Module):
    """A convolution, a flatten, a dense readout: three kinds of op."""

    conv: eqx.nn.Conv1d
    out: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jr.split(key)
        self.conv = eqx.nn.Conv1d(2, 3, 3, key=k1)
        self.out = eqx.nn.Linear(3 * 4, 4, key=k2)

    def __call__(self, x):
        return self.out(jnp.ravel(jnp.tanh(self.conv(x))))


def _describe(model, example):
    del example
    return cs.Layered(
        (
            cs.layer(model, lambda m: m.conv, "conv"),
            cs.activation(jnp.tanh, "tanh"),
            cs.linear(jnp.ravel, "flatten", keeps_diagonal=True),
            cs.layer(model, lambda m: m.out, "out"),
        )
    )


@pytest.fixture
def registered():
    cs.register(Conv1dNet, _describe)
    model = Conv1dNet(jr.key(0))
    x = jr.normal(jr.key(1), (5, 2, 6))
    return model, x


def _register(*ops_of):
    """Register a description built from `ops_of(model)` for `Conv1dNet`."""
    cs.register(Conv1dNet, lambda model, example: cs.Layered(tuple(f(model) for f in ops_of)))


@pytest.mark.parametrize("loss_name", ["ce", "mse"])
def test_a_registered_model_is_exact_on_the_layered_kernel(registered, loss_name, monkeypatch):
    model, x = registered
    if loss_name == "ce":
        loss, y = cz.losses.cross_entropy, jr.randint(jr.key(2), (5,), 0, 4)
    else:
        loss, y = cz.losses.mse, jr.normal(jr.key(2), (5, 4))
    batch = (x, y)
    for estimator in (cz.Exact(), cz.GGN(), cz.EmpiricalFisher()):
        assert cz.plan(model, loss, batch, estimator).kernel == "layered"
    calls = spy_kernels(monkeypatch)
    assert_diagonal_close(
        cz.diagonal(model, loss, batch), reference_hessian_diagonal(model, loss, batch)
    )
    assert calls == ["structured"]
    assert_diagonal_close(
        cz.diagonal(model, loss, batch, cz.GGN()), reference_ggn_diagonal(model, loss, batch)
    )
    scale = 1 / (5 * (1 if loss_name == "ce" else 4))  # the mean's reduction factor
    squared = jax.tree.map(
        lambda g: scale * g.sum(0), reference_squared_gradients(model, loss, batch)
    )
    assert_diagonal_close(cz.diagonal(model, loss, batch, cz.EmpiricalFisher()), squared)


WRONG = {
    "no activation": (
        [lambda m: cs.layer(m, lambda n: n.conv, "conv"),
         lambda m: cs.linear(jnp.ravel, "flatten", keeps_diagonal=True),
         lambda m: cs.layer(m, lambda n: n.out, "out")],
        "does not compute what its `__call__` computes",
    ),
    "another activation": (
        [lambda m: cs.layer(m, lambda n: n.conv, "conv"),
         lambda m: cs.activation(jax.nn.sigmoid),
         lambda m: cs.linear(jnp.ravel, "flatten", keeps_diagonal=True),
         lambda m: cs.layer(m, lambda n: n.out, "out")],
        "does not compute what its `__call__` computes",
    ),
    "a layer left out": (
        [lambda m: cs.layer(m, lambda n: n.conv, "conv"),
         lambda m: cs.activation(jnp.tanh),
         lambda m: cs.linear(lambda u: jnp.ravel(u)[:4], "slice")],
        r"parameter \.out\.weight outside its description",
    ),
    "a nonlinear map declared linear": (
        [lambda m: cs.layer(m, lambda n: n.conv, "conv"),
         lambda m: cs.linear(lambda u: jnp.ravel(jnp.tanh(u)), "flatten"),
         lambda m: cs.layer(m, lambda n: n.out, "out")],
        "declared `linear` but is not linear",
    ),
    "a mixing map said to keep the diagonal": (
        [lambda m: cs.layer(m, lambda n: n.conv, "conv"),
         lambda m: cs.activation(jnp.tanh),
         lambda m: cs.linear(lambda u: jnp.ravel(u + jnp.roll(u, 1)) / 1.0, "mix",
                             keeps_diagonal=True),
         lambda m: cs.layer(m, lambda n: n.out, "out")],
        "keeps_diagonal=True",
    ),
    "a non-elementwise activation": (
        [lambda m: cs.layer(m, lambda n: n.conv, "conv"),
         lambda m: cs.activation(jax.nn.softmax, "softmax"),
         lambda m: cs.linear(jnp.ravel, "flatten", keeps_diagonal=True),
         lambda m: cs.layer(m, lambda n: n.out, "out")],
        "is not an elementwise function",
    ),
    "not a Layered": ([], "not a `curvzoo.structures.Layered`"),
    "a foreign op": ([lambda m: "tanh"], "build ops with `curvzoo.structures.layer`"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(WRONG))
def test_a_description_that_is_not_the_models_is_refused(registered, name):
    model, x = registered
    ops_of, reason = WRONG[name]
    if name == "not a Layered":
        cs.register(Conv1dNet, lambda model, example: (cs.activation(jnp.tanh),))
    else:
        _register(*ops_of)
    try:
        batch = (x, jr.randint(jr.key(2), (5,), 0, 4))
        plan = cz.plan(model, cz.losses.cross_entropy, batch)
        assert plan.kernel == "generic"
        assert plan.reason is not None
        assert re.search(reason, plan.reason), plan.reason
        with pytest.raises(ValueError, match="`method='structured'` cannot be used here"):
            cz.hessian_diagonal(model, cz.losses.cross_entropy, batch, method="structured")
        # the generic kernel is still exact
        assert_diagonal_close(
            cz.hessian_diagonal(model, cz.losses.cross_entropy, batch),
            reference_hessian_diagonal(model, cz.losses.cross_entropy, batch),
        )
    finally:
        cs.register(Conv1dNet, _describe)


def test_a_subclass_that_changes_the_forward_pass_is_not_described(registered):
    class Doubled(Conv1dNet):
        def __call__(self, x):
            return 2 * super().__call__(x)

    model = Doubled(jr.key(0))
    _, x = registered
    plan = cz.plan(model, cz.losses.cross_entropy, (x, jnp.zeros(5, jnp.int32)))
    assert plan.kernel == "generic" and "overrides `__call__`" in plan.reason


def test_an_unsupported_instance_says_why(registered):
    def describe(model, example):
        raise cs.Unsupported("this instance is too exotic")

    cs.register(Conv1dNet, describe)
    try:
        model, x = registered
        plan = cz.plan(model, cz.losses.cross_entropy, (x, jnp.zeros(5, jnp.int32)))
        assert plan.kernel == "generic" and "too exotic" in plan.reason
    finally:
        cs.register(Conv1dNet, _describe)


def test_bad_arguments():
    with pytest.raises(TypeError, match="`cls` must be a subclass of `equinox.Module`"):
        cs.register(int, _describe)

    with pytest.raises(TypeError, match="`cls` must be a subclass"):
        cs.register(Conv1dNet(jr.key(0)), _describe)
    with pytest.raises(TypeError, match="`describe` must be a function"):
        cs.register(Conv1dNet, None)
    model = Conv1dNet(jr.key(0))
    with pytest.raises(TypeError, match="`where` must be a function of the model"):
        cs.layer(model, "conv")
    with pytest.raises(cs.Unsupported, match="of type Lambda"):
        cs.layer(eqx.nn.Sequential([eqx.nn.Lambda(jnp.tanh)]), lambda m: m.layers[0])
    with pytest.raises(TypeError, match="`fn` must be a function"):
        cs.activation(3)
    with pytest.raises(TypeError, match="`fn` must be a function"):
        cs.linear("ravel")
    with pytest.raises(cs.Unsupported, match="pooling layer"):
        cs.pool(eqx.nn.Lambda(jnp.tanh))
