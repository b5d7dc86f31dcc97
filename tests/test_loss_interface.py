"""The loss interface: results are those of the loss as it stands at the call (closures,
globals, bound methods, partials), fresh lambdas and new Python floats share compiled
code, non-batched arrays
go in with `args=` or as a loss module's fields, and complex numbers are refused."""

import functools

import curvzoo as cz
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from .helpers import assert_diagonal_close, count_compilations, reference_hessian_diagonal


RNG = np.random.default_rng(0)
MODEL = cz.MLP(3, 2, 4, 1, key=jax.random.key(0))
BATCH = (jnp.asarray(RNG.normal(size=(5, 3))), jnp.asarray(RNG.normal(size=(5, 2))))
LABELS = jnp.asarray(RNG.integers(0, 2, size=5))

WEIGHT = 1.0  # read as a global by `_global_weighted`


def _global_weighted(model, batch):
    return WEIGHT * cz.losses.mse(model, batch)


def _flat(tree):
    return np.asarray(ravel_pytree(tree)[0])


def test_closed_over_and_global_values_are_read_at_each_call():
    """The same loss object, with the value it reads changed between calls, gives the
    diagonal of the loss as it is now (as `jax.hessian` does), for a captured Python
    float, a captured array, a global, and through `hutchinson_diagonal` too."""
    global WEIGHT
    base = _flat(cz.hessian_diagonal(MODEL, cz.losses.mse, BATCH))
    weight = 1.0
    closure = lambda m, b: weight * cz.losses.mse(m, b)  # noqa: E731
    array = jnp.asarray(1.0)
    captured = lambda m, b: array * cz.losses.mse(m, b)  # noqa: E731
    key = jax.random.key(0)
    hutch_base = _flat(cz.hutchinson_diagonal(MODEL, cz.losses.mse, BATCH, key=key, num_probes=3))
    for value in (1.0, 3.0, 10.0):
        weight, array, WEIGHT = value, jnp.asarray(value), value
        for loss in (closure, captured, _global_weighted):
            np.testing.assert_allclose(
                _flat(cz.hessian_diagonal(MODEL, loss, BATCH)), value * base, rtol=1e-12
            )
        estimate = cz.hutchinson_diagonal(MODEL, closure, BATCH, key=key, num_probes=3)
        np.testing.assert_allclose(_flat(estimate), value * hutch_base, rtol=1e-12)
    WEIGHT = 1.0


class _Scaled:
    """A plain object whose bound method is the loss."""

    def __init__(self, factor):
        self.factor = factor

    def loss(self, model, batch):
        return self.factor * cz.losses.mse(model, batch)


def test_bound_methods_and_partials():
    base = _flat(cz.hessian_diagonal(MODEL, cz.losses.mse, BATCH))
    owner = _Scaled(2.0)
    assert np.allclose(_flat(cz.hessian_diagonal(MODEL, owner.loss, BATCH)), 2 * base)
    owner.factor = 5.0
    assert np.allclose(_flat(cz.hessian_diagonal(MODEL, owner.loss, BATCH)), 5 * base)

    def weighted(model, batch, factor):
        return factor * cz.losses.mse(model, batch)

    for factor in (0.5, 4.0):
        loss = functools.partial(weighted, factor=factor)
        assert np.allclose(_flat(cz.hessian_diagonal(MODEL, loss, BATCH)), factor * base)


def test_fresh_lambdas_share_compiled_code():
    """The AdaHessian-in-a-loop pattern: a new lambda computing the same loss at every
    call compiles once."""
    cz.hessian_diagonal(MODEL, lambda m, b: cz.losses.mse(m, b), BATCH)
    with count_compilations() as count:
        for _ in range(5):
            cz.hessian_diagonal(MODEL, lambda m, b: cz.losses.mse(m, b), BATCH)
    assert count[0] == 0


def _kwdefault_weighted(model, batch, *, weight=1.0):
    return weight * cz.losses.mse(model, batch)


def test_python_floats_a_loss_reads_are_inputs():
    """A loss that reads a Python float (closure, global, default, keyword default, a
    partial's argument, a NumPy scalar) with a new value at every call compiles once
    and gives the diagonal at the new value (before: a new program per value, 4.9 s a
    call on a small GRU). A float used as a Python value still gives the right number."""
    global WEIGHT
    base = _flat(cz.hessian_diagonal(MODEL, cz.losses.mse, BATCH))
    weight = 1.0

    def losses(value):
        def weighted(model, batch, factor):
            return factor * cz.losses.mse(model, batch)

        scalar = np.float32(value)
        return {
            "closure": lambda m, b: weight * cz.losses.mse(m, b),
            "global": _global_weighted,
            "default": lambda m, b, v=value: v * cz.losses.mse(m, b),
            "kwdefault": functools.partial(_kwdefault_weighted, weight=value),
            "partial": functools.partial(weighted, factor=value),
            "numpy": lambda m, b: scalar * cz.losses.mse(m, b),
            "branch": lambda m, b: (weight if weight > 0 else -weight) * cz.losses.mse(m, b),
        }

    for name in losses(1.0):
        weight = WEIGHT = 1.0
        cz.hessian_diagonal(MODEL, losses(1.0)[name], BATCH)  # compiles
        with count_compilations() as count:
            for value in (2.0, 0.25, 7.5):
                weight = WEIGHT = value
                result = cz.hessian_diagonal(MODEL, losses(value)[name], BATCH)
                np.testing.assert_allclose(_flat(result), value * base, rtol=1e-12)
        if name != "branch":  # a float in Python control flow is a constant
            assert count[0] == 0, name
    WEIGHT = 1.0


def test_lifted_floats_keep_their_dtype():
    """A lifted Python float is weakly typed, as JAX types it: a float32 model stays
    float32."""
    model = jax.tree.map(lambda a: a.astype(jnp.float32) if eqx.is_inexact_array(a) else a, MODEL)
    batch = jax.tree.map(lambda a: a.astype(jnp.float32), BATCH)
    weight = 0.5
    result = cz.hessian_diagonal(model, lambda m, b: weight * cz.losses.mse(m, b), batch)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(result))


def test_plan_cache_is_bounded():
    """Distinct computations keep at most a bounded number of plans (and their compiled
    programs) alive."""
    from curvzoo._run import _execute

    for value in range(_execute._SIZE + 5):  # ints are constants: a program each
        cz.plan(MODEL, lambda m, b, v=value: v * cz.losses.mse(m, b), BATCH)
    assert len(_execute._PLANS) <= _execute._SIZE


def test_loss_module_with_array_fields():
    """A loss written as an Equinox module: its array fields are inputs, so a new value
    gives a new result without recompiling."""

    class Weighted(eqx.Module):
        weights: jax.Array

        def __call__(self, model, batch):
            x, y = batch
            return jnp.sum(self.weights * jnp.sum((jax.vmap(model)(x) - y) ** 2, axis=-1))

    first = Weighted(jnp.arange(1.0, 6.0))
    expected = reference_hessian_diagonal(MODEL, first, BATCH)
    assert_diagonal_close(cz.hessian_diagonal(MODEL, first, BATCH), expected)
    second = Weighted(jnp.arange(5.0, 0.0, -1.0))
    with count_compilations() as count:
        result = cz.hessian_diagonal(MODEL, second, BATCH)
    assert count[0] == 0
    assert_diagonal_close(result, reference_hessian_diagonal(MODEL, second, BATCH))


def test_args_for_class_weights_and_an_anchor():
    """Non-batched arrays through `args=`: class weights of a weighted cross-entropy and
    the anchor of an EWC penalty, each against `jax.hessian` of the bound loss."""

    def weighted_ce(model, batch, class_weights):
        x, y = batch
        logits = jax.vmap(model)(x)
        per = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[:, None], -1)[:, 0]
        return jnp.mean(class_weights[y] * per)

    class_weights = jnp.array([0.3, 2.0])
    batch = (BATCH[0], LABELS)
    result = cz.hessian_diagonal(MODEL, weighted_ce, batch, args=class_weights)
    expected = reference_hessian_diagonal(
        MODEL, lambda m, b: weighted_ce(m, b, class_weights), batch
    )
    assert_diagonal_close(result, expected)

    anchor = jax.tree.map(lambda p: 0.5 * p, eqx.filter(MODEL, eqx.is_inexact_array))

    def ewc(model, batch, anchor):
        params = jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))
        penalty = sum(jnp.sum(jnp.sin(p - a) ** 2) for p, a in zip(params, jax.tree.leaves(anchor)))
        return cz.losses.mse(model, batch) + 0.1 * penalty

    result = cz.hessian_diagonal(MODEL, ewc, BATCH, args=anchor)
    expected = reference_hessian_diagonal(MODEL, lambda m, b: ewc(m, b, anchor), BATCH)
    assert_diagonal_close(result, expected)
    estimate = cz.hutchinson_diagonal(
        MODEL, ewc, BATCH, args=anchor, key=jax.random.key(1), num_probes=2
    )
    assert jax.tree.structure(estimate) == jax.tree.structure(result)


class _BatchNormNet(eqx.Module):
    dense: eqx.nn.Linear
    norm: eqx.nn.BatchNorm
    out: eqx.nn.Linear

    def __call__(self, x, state):
        h, state = self.norm(self.dense(x), state)
        return self.out(jnp.tanh(h)), state


def _batch_norm_net():
    k1, k2 = jax.random.split(jax.random.key(3))
    make = eqx.nn.make_with_state(_BatchNormNet)
    model, state = make(
        eqx.nn.Linear(3, 4, key=k1), eqx.nn.BatchNorm(4, "batch", mode="batch"),
        eqx.nn.Linear(4, 2, key=k2),
    )  # fmt: skip
    return eqx.nn.inference_mode(model), state


def test_batch_norm_state_through_args():
    """A BatchNorm model in inference mode with its `eqx.nn.State` through `args=`: a
    curvzoo loss calls `model(x, state)` and takes the prediction; the Hessian and the
    GGN match their references."""
    model, state = _batch_norm_net()

    def bound(m, b):
        return cz.losses.mse(lambda x: m(x, state)[0], b)

    result = cz.hessian_diagonal(model, cz.losses.mse, BATCH, args=state)
    assert_diagonal_close(result, reference_hessian_diagonal(model, bound, BATCH))
    assert isinstance(result, _BatchNormNet)
    ggn = cz.ggn_diagonal(model, cz.losses.mse, BATCH, args=state)
    # For MSE the GGN is 2 J^T J scaled: against the Hessian of the linearised loss.
    flat, unravel = ravel_pytree(eqx.filter(model, eqx.is_inexact_array))
    static = eqx.filter(model, lambda leaf: not eqx.is_inexact_array(leaf))

    def predictions(vector):
        full = eqx.combine(unravel(vector), static)
        return jax.vmap(lambda x: full(x, state)[0])(BATCH[0])

    jac = jax.jacfwd(predictions)(flat).reshape(-1, flat.size)
    expected = unravel(2 * jnp.sum(jac**2, axis=0) / BATCH[1].size)
    assert_diagonal_close(ggn, expected)


def test_missing_state_points_to_args():
    model, _ = _batch_norm_net()
    with pytest.raises(TypeError, match="`args=`"):
        cz.hessian_diagonal(model, cz.losses.mse, BATCH)


def test_scalar_in_batch_points_to_args():
    with pytest.raises(ValueError, match=r"`batch\[2\]` is a scalar.*`args=`"):
        cz.hessian_diagonal(MODEL, lambda m, b: cz.losses.mse(m, b[:2]), (*BATCH, jnp.ones(())))


def test_complex_parameters_and_batches_are_refused():
    complex_model = eqx.tree_at(
        lambda m: m.layers[0].weight, MODEL, replace_fn=lambda w: w.astype(jnp.complex128)
    )
    for function in (cz.hessian_diagonal, cz.ggn_diagonal, cz.empirical_fisher_diagonal):
        with pytest.raises(TypeError, match=r"`model\.layers\[0\]\.weight` is complex"):
            function(complex_model, cz.losses.mse, BATCH)
    with pytest.raises(TypeError, match=r"`batch\[0\]` is complex"):
        cz.hessian_diagonal(MODEL, cz.losses.mse, (BATCH[0].astype(jnp.complex64), BATCH[1]))
    # Frozen, a complex leaf is fine (it is not differentiated).
    spec = eqx.tree_at(lambda m: m.layers[0].weight, jax.tree.map(lambda _: True, MODEL), False)
    plain = lambda m, b: cz.losses.mse(  # noqa: E731
        eqx.tree_at(lambda n: n.layers[0].weight, m, replace_fn=jnp.real), b
    )
    cz.hessian_diagonal(complex_model, plain, BATCH, filter_spec=spec)


def test_python_lists_in_the_batch():
    with pytest.raises(ValueError, match="holds no arrays.*jnp.asarray"):
        cz.hessian_diagonal(MODEL, cz.losses.mse, ([[0.0, 1.0, 2.0]], [[1.0, 2.0]]))


@pytest.mark.parametrize("budget", [1e9, 2.0**27])
def test_memory_budget_as_a_float(budget):
    expected = cz.hessian_diagonal(MODEL, cz.losses.mse, BATCH)
    result = cz.hessian_diagonal(MODEL, cz.losses.mse, BATCH, memory_budget=budget)
    assert_diagonal_close(result, expected)
    with pytest.raises(ValueError, match="`memory_budget` must be a whole number"):
        cz.hessian_diagonal(MODEL, cz.losses.mse, BATCH, memory_budget=1.5)
    with pytest.raises(TypeError, match="`memory_budget` must be a number of bytes"):
        cz.hessian_diagonal(MODEL, cz.losses.mse, BATCH, memory_budget="1GB")


def test_summarize_of_an_estimate_and_its_error():
    pair = cz.hutchinson_diagonal(
        MODEL, cz.losses.mse, BATCH, key=jax.random.key(0), num_probes=2, return_stderr=True
    )
    for model in (MODEL, None):
        with pytest.raises(ValueError, match=r"summarise one at a time: `estimate, stderr"):
            cz.analysis.summarize(pair, model)
    cz.analysis.summarize(pair[0], MODEL)


def test_the_spectral_tools_read_the_loss_at_each_call():
    weight = 1.0
    loss = lambda m, b: weight * cz.losses.mse(m, b)  # noqa: E731
    key = jax.random.key(0)
    first = cz.hessian_eigenvalues(MODEL, loss, BATCH, key=key).eigenvalues
    weight = 4.0
    second = cz.hessian_eigenvalues(MODEL, loss, BATCH, key=key).eigenvalues
    np.testing.assert_allclose(second, 4 * first, rtol=1e-8)
    operator = cz.hessian_operator(MODEL, loss, BATCH)
    vector = jax.tree.map(jnp.ones_like, eqx.filter(MODEL, eqx.is_inexact_array))
    weight = 2.0
    again = cz.hessian_operator(MODEL, loss, BATCH)
    np.testing.assert_allclose(
        _flat(again.mv(vector)), 0.5 * _flat(operator.mv(vector)), rtol=1e-10
    )
