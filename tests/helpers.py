"""Shared helpers: reference computations, tiny zoo models and matching batches."""

import contextlib
import itertools

import curvzoo as cz
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax.flatten_util import ravel_pytree


def tree_allclose(x, y, *, rtol=1e-10, atol=0.0):
    """Same structure, and every pair of leaves close (arrays) or equal (others)."""
    if jax.tree.structure(x) != jax.tree.structure(y):
        return False
    for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
        if eqx.is_array(a):
            if a.shape != b.shape or a.dtype != b.dtype:
                return False
            if not np.allclose(a, b, rtol=rtol, atol=atol):
                return False
        elif a != b:
            return False
    return True


def reference_hessian_diagonal(model, loss, batch, filter_spec=eqx.is_inexact_array):
    """`jnp.diag(jax.hessian(...))` of the raveled trainable parameters: independent of
    curvzoo's kernels, and only usable for tiny models."""
    params, static = eqx.partition(model, filter_spec)
    params, rest = eqx.partition(params, eqx.is_inexact_array)
    static = eqx.combine(static, rest)
    flat, unravel = ravel_pytree(params)

    def f(vector):
        return loss(eqx.combine(unravel(vector), static), batch)

    return unravel(jnp.diag(jax.jit(jax.hessian(f))(flat)))


def _split(model, filter_spec=eqx.is_inexact_array):
    params, static = eqx.partition(model, filter_spec)
    params, rest = eqx.partition(params, eqx.is_inexact_array)
    return params, eqx.combine(static, rest)


def reference_ggn_diagonal(model, loss, batch, filter_spec=eqx.is_inexact_array):
    """`diag(J^T H_out J)`, scaled by the loss's reduction, with `J` built densely by
    `jax.jacfwd` and `H_out` by `jax.hessian` of the per-sample loss: independent of
    curvzoo's kernels and of the loss's closed-form factors."""
    params, static = _split(model, filter_spec)
    flat, unravel = ravel_pytree(params)
    inputs, targets = batch

    @jax.jit
    def diagonal(flat):
        def predict(vector):
            return jax.vmap(eqx.combine(unravel(vector), static))(inputs)

        predictions = predict(flat)
        num = predictions.shape[0]
        jac = jax.jacfwd(predict)(flat).reshape(num, -1, flat.size)

        def output_hessian(prediction, target):
            def per_sample(z):
                return loss.per_sample(z.reshape(prediction.shape), target)

            return jax.hessian(per_sample)(prediction.reshape(-1))

        hess = jax.vmap(output_hessian)(predictions, targets)
        ggn = jnp.einsum("nip,nij,njq->pq", jac, hess, jac)
        return loss.scale(num, predictions.shape[1:]) * jnp.diag(ggn)

    return unravel(diagonal(flat))


def reference_squared_gradients(model, loss, batch):
    """Per-sample gradients of `loss.per_sample` by `jax.vmap(jax.grad)`, squared:
    leaves with a leading batch axis."""
    params, static = _split(model)

    def sample_gradient(x, y):
        return jax.grad(lambda p: loss.per_sample(eqx.combine(p, static)(x), y))(params)

    grads = jax.jit(jax.vmap(sample_gradient))(*batch)
    return jax.tree.map(jnp.square, grads)


def assert_diagonal_close(result, expected, rtol=1e-10):
    """Relative agreement: every entry within `rtol` of itself, or of the largest entry
    for entries near zero."""
    assert jax.tree.structure(result) == jax.tree.structure(expected)
    flat_r = ravel_pytree(result)[0]
    flat_e = ravel_pytree(expected)[0]
    scale = float(jnp.max(jnp.abs(flat_e)))
    assert scale > 0, "reference diagonal is identically zero: the test would be vacuous"
    np.testing.assert_allclose(flat_r, flat_e, rtol=rtol, atol=rtol * scale)


# Tiny zoo models: (name, factory(key)). Sizes keep `jax.hessian` cheap.
MODELS = [
    *[(f"mlp{depth}", lambda key, d=depth: cz.MLP(3, 3, 4, d, key=key)) for depth in range(4)],
    *[
        (f"rnn-{cell}-{readout}", lambda key, c=cell, r=readout: cz.RNN(2, 3, 3, c, r, key=key))
        for cell in ("elman", "gru", "lstm")
        for readout in ("last", "all")
    ],
    ("cnn", lambda key: cz.CNN(1, 3, 10, channels=(2, 2), key=key)),
]

LOSS_CLASSES = {"ce": cz.losses.CrossEntropy, "mse": cz.losses.MSE, "bce": cz.losses.BCEWithLogits}


def with_reductions(*axes):
    """Every combination of the values in `axes`, each with one reduction appended:
    `"mean"` where the values' indices sum to an even number, `"sum"` otherwise. Along
    any axis the reduction alternates, so every value of every axis meets both
    reductions (given two or more values on the other axes) at half the cost of the full
    product: the reduction is a scalar factor, not a new code path per model."""
    cases = []
    for indices in itertools.product(*(range(len(axis)) for axis in axes)):
        values = [axis[i] for axis, i in zip(axes, indices)]
        cases.append((*values, "mean" if sum(indices) % 2 == 0 else "sum"))
    return cases


BATCH_SIZE = 5
SEQUENCE_LENGTH = 4


def make_inputs(model, key, batch_size=BATCH_SIZE):
    if isinstance(model, cz.MLP):
        return jr.normal(key, (batch_size, model.in_size))
    if isinstance(model, cz.RNN):
        return jr.normal(key, (batch_size, SEQUENCE_LENGTH, model.in_size))
    if isinstance(model, cz.CNN):
        return jr.normal(key, (batch_size, model.in_channels, *model.image_size))
    raise TypeError(model)


def make_targets(model, inputs, loss_name, key):
    predictions = jax.vmap(model)(inputs)
    if loss_name == "ce":
        return jr.randint(key, predictions.shape[:-1], 0, predictions.shape[-1])
    if loss_name == "mse":
        return jr.normal(key, predictions.shape)
    if loss_name == "bce":
        return jr.uniform(key, predictions.shape)
    raise ValueError(loss_name)


def make_batch(model, loss_name, key, batch_size=BATCH_SIZE):
    k_in, k_out = jr.split(key)
    inputs = make_inputs(model, k_in, batch_size)
    return inputs, make_targets(model, inputs, loss_name, k_out)


def spy_kernels(monkeypatch) -> list:
    """Record which kernel each curvature call runs: the returned list gains
    `"generic"`, `"structured"`, `"recurrent"` or `"outer"` (vector-Jacobian products
    for the GGN family) per call, read off the plan that the call runs."""
    from curvzoo._run import _execute

    names = {
        "generic": "generic",
        "layered": "structured",
        "recurrent": "recurrent",
        "vjp": "outer",
    }
    calls = []
    original = _execute.prepare

    def spy(*args, **kwargs):
        prepared = original(*args, **kwargs)
        calls.append(names[prepared.plan.kernel])
        return prepared

    monkeypatch.setattr(_execute, "prepare", spy)
    return calls


@contextlib.contextmanager
def count_compilations():
    """Count XLA compilations inside the block: `with count_compilations() as n:`, then
    `n[0]`."""
    count = [0]

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            count[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield count
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
