"""Shared helpers: references computed without curvzoo's kernels, tiny zoo models, and
batches drawn with numpy.

Compilation is most of the suite's time, so: every reference is one module-level
`eqx.filter_jit` function (compiled once per shapes, dtypes and loss, however many tests
use it), batches come from numpy (no eager JAX operation, so nothing to compile), and
tests share a few shapes (`BATCH_SIZE`, `SEQUENCE_LENGTH`, the models of `MODELS`).
"""

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


def flat(tree) -> np.ndarray:
    """The leaves of `tree` raveled and concatenated, in numpy (no compilation)."""
    leaves = [np.ravel(np.asarray(leaf, dtype=np.float64)) for leaf in jax.tree.leaves(tree)]
    return np.concatenate(leaves) if leaves else np.zeros(0)


def split(model, filter_spec=eqx.is_inexact_array):
    """`(params, static)`: the trained floating-point arrays, and everything else."""
    params, static = eqx.partition(model, filter_spec)
    params, rest = eqx.partition(params, eqx.is_inexact_array)
    return params, eqx.combine(static, rest)


# ## References, each compiled once per shapes


@eqx.filter_jit
def _dense_hessian(params, static, loss, batch):
    flat_params, unravel = ravel_pytree(params)

    def f(vector):
        return loss(eqx.combine(unravel(vector), static), batch)

    return jax.hessian(f)(flat_params)


def dense_hessian(model, loss, batch, filter_spec=eqx.is_inexact_array) -> np.ndarray:
    """`jax.hessian` of the loss in the raveled trained parameters (`P x P`)."""
    return np.asarray(_dense_hessian(*split(model, filter_spec), loss, batch))


@eqx.filter_jit
def _hessian_diagonal(params, static, loss, batch):
    return ravel_pytree(params)[1](jnp.diag(_dense_hessian(params, static, loss, batch)))


def reference_hessian_diagonal(model, loss, batch, filter_spec=eqx.is_inexact_array):
    """`jnp.diag(jax.hessian(...))` of the raveled trainable parameters: independent of
    curvzoo's kernels, and only usable for tiny models."""
    return _hessian_diagonal(*split(model, filter_spec), loss, batch)


@eqx.filter_jit
def _per_sample_hessian_diagonals(params, static, loss, batch):
    def one(sample):
        return _hessian_diagonal(params, static, loss, jax.tree.map(lambda v: v[None], sample))

    return jax.vmap(one)(batch)


def reference_per_sample_hessian_diagonal(model, loss, batch, filter_spec=eqx.is_inexact_array):
    """Sample `n`'s `jnp.diag(jax.hessian(...))` of `loss(model, batch_n)` (the batch of
    sample `n` alone), stacked on a leading axis."""
    return _per_sample_hessian_diagonals(*split(model, filter_spec), loss, batch)


@eqx.filter_jit
def _ggn_factors(params, static, loss, batch):
    """`(J, H, predictions)`: `J` `(N, C, P)` the Jacobian of each sample's prediction in
    the raveled parameters by `jax.jacfwd`, `H` `(N, C, C)` the Hessian of the per-sample
    loss in it by `jax.hessian`: independent of curvzoo's kernels and of the loss's
    closed-form factors."""
    flat_params, unravel = ravel_pytree(params)
    inputs, targets = batch

    def predict(vector):
        return jax.vmap(eqx.combine(unravel(vector), static))(inputs)

    predictions = predict(flat_params)
    num = predictions.shape[0]
    jac = jax.jacfwd(predict)(flat_params).reshape(num, -1, flat_params.size)

    def output_hessian(prediction, target):
        def per_sample(z):
            return loss.per_sample(z.reshape(prediction.shape), target)

        return jax.hessian(per_sample)(prediction.reshape(-1))

    return jac, jax.vmap(output_hessian)(predictions, targets), predictions


def _ggn_pieces(params, static, loss, batch):
    """Per sample, `diag(J_n^T H_n J_n)`; and the loss's factors `scale(N)`, `scale(1)`."""
    jac, hess, predictions = _ggn_factors(params, static, loss, batch)
    pieces = jnp.einsum("nip,nij,njp->np", jac, hess, jac)
    num, shape = predictions.shape[0], predictions.shape[1:]
    unravel = ravel_pytree(params)[1]
    return jax.vmap(unravel)(pieces), loss.scale(num, shape), loss.scale(1, shape)


def dense_ggn(model, loss, batch, filter_spec=eqx.is_inexact_array) -> np.ndarray:
    """`scale * sum_n J_n^T H_n J_n` (`P x P`), from the factors above."""
    jac, hess, predictions = _ggn_factors(*split(model, filter_spec), loss, batch)
    scale = loss.scale(predictions.shape[0], predictions.shape[1:])
    return scale * np.einsum("nip,nij,njq->pq", *(np.asarray(a) for a in (jac, hess, jac)))


def reference_ggn_diagonal(model, loss, batch, filter_spec=eqx.is_inexact_array):
    """`diag(J^T H_out J)`, scaled by the loss's reduction, with `J` built densely by
    `jax.jacfwd` and `H_out` by `jax.hessian` of the per-sample loss: independent of
    curvzoo's kernels and of the loss's closed-form factors."""
    pieces, scale, _ = _ggn_pieces(*split(model, filter_spec), loss, batch)
    return jax.tree.map(lambda leaf: scale * np.sum(np.asarray(leaf), 0), pieces)


def reference_per_sample_ggn_diagonal(model, loss, batch, filter_spec=eqx.is_inexact_array):
    """Sample `n`'s GGN diagonal, of `loss(model, batch_n)`, stacked."""
    pieces, _, one = _ggn_pieces(*split(model, filter_spec), loss, batch)
    return jax.tree.map(lambda leaf: one * np.asarray(leaf), pieces)


@eqx.filter_jit
def _squared_gradients(params, static, loss, batch):
    def sample_gradient(x, y):
        return jax.grad(lambda p: loss.per_sample(eqx.combine(p, static)(x), y))(params)

    return jax.tree.map(jnp.square, jax.vmap(sample_gradient)(*batch))


def reference_squared_gradients(model, loss, batch, filter_spec=eqx.is_inexact_array):
    """Per-sample gradients of `loss.per_sample` by `jax.vmap(jax.grad)`, squared:
    leaves with a leading batch axis."""
    return _squared_gradients(*split(model, filter_spec), loss, batch)


@eqx.filter_jit
def _rademacher_probes(key, num_probes: int, size: int, dtype):
    keys = jr.split(key, num_probes)
    return jax.vmap(lambda k: jr.rademacher(k, (size,), dtype=dtype))(keys)


def reference_hutchinson(
    model, loss, batch, *, key, num_probes, filter_spec=eqx.is_inexact_array,
    control_variate=None,
):  # fmt: skip
    """Hutchinson's estimate written out by hand, with the probes the documentation of
    `curvzoo.hutchinson_diagonal` promises (probe `i` is `jax.random.rademacher` of
    `jax.random.split(key, num_probes)[i]` over the raveled trained parameters): the
    mean of `z * (A z)` and its standard error, for the dense `A = H` from
    `jax.hessian`, or `A = H - G` (`G` from `jax.jacfwd`) with `diag(G)` added back.
    Returns `(estimate, stderr)`, each shaped like the trained parameters."""
    params, static = split(model, filter_spec)
    flat_params, unravel = ravel_pytree(params)
    matrix = dense_hessian(model, loss, batch, filter_spec)
    ggn = None
    if control_variate == "ggn":
        ggn = dense_ggn(model, loss, batch, filter_spec)
        matrix = matrix - ggn
    probes = np.asarray(_rademacher_probes(key, num_probes, flat_params.size, flat_params.dtype))
    samples = probes * (probes @ matrix)
    estimate = samples.mean(0)
    stderr = samples.std(0, ddof=1) / np.sqrt(num_probes) if num_probes > 1 else 0 * estimate
    if ggn is not None:
        estimate = estimate + np.diag(ggn)
    dtype = flat_params.dtype
    return unravel(jnp.asarray(estimate, dtype)), unravel(jnp.asarray(stderr, dtype))


def assert_diagonal_close(result, expected, rtol=1e-10):
    """Relative agreement: every entry within `rtol` of itself, or of the largest entry
    for entries near zero."""
    assert jax.tree.structure(result) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(result), jax.tree.leaves(expected)):
        assert np.shape(a) == np.shape(b), (np.shape(a), np.shape(b))
    flat_r, flat_e = flat(result), flat(expected)
    scale = float(np.max(np.abs(flat_e)))
    assert scale > 0, "reference diagonal is identically zero: the test would be vacuous"
    np.testing.assert_allclose(flat_r, flat_e, rtol=rtol, atol=rtol * scale)


# ## Tiny zoo models and their batches

# (name, factory(key)). Sizes keep `jax.hessian` cheap.
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


def rng(key) -> np.random.Generator:
    """A numpy generator seeded by a JAX key (or an integer)."""
    if isinstance(key, (int, np.integer)):
        return np.random.default_rng(int(key))
    return np.random.default_rng(np.asarray(jr.key_data(key)).ravel().tolist())


def _input_shape(model) -> tuple:
    if isinstance(model, cz.MLP):
        return (model.in_size,)
    if isinstance(model, cz.RNN):
        return (SEQUENCE_LENGTH, model.in_size)
    if isinstance(model, cz.CNN):
        return (model.in_channels, *model.image_size)
    raise TypeError(model)


def make_inputs(model, key, batch_size=BATCH_SIZE):
    """Standard normal inputs for a zoo model, drawn with numpy."""
    return jnp.asarray(rng(key).standard_normal((batch_size, *_input_shape(model))))


def make_targets(model, inputs, loss_name, key):
    """Targets for `loss_name` of the shape of `jax.vmap(model)(inputs)` (found without
    running the model): labels, standard normal values, or probabilities."""
    shape = jax.eval_shape(jax.vmap(model), inputs).shape
    generator = rng(key)
    if loss_name == "ce":
        return jnp.asarray(generator.integers(0, shape[-1], shape[:-1]))
    if loss_name == "mse":
        return jnp.asarray(generator.standard_normal(shape))
    if loss_name == "bce":
        return jnp.asarray(generator.uniform(size=shape))
    raise ValueError(loss_name)


def make_batch(model, loss_name, key, batch_size=BATCH_SIZE):
    k_in, k_out = rng(key).integers(0, 2**31, 2)
    inputs = make_inputs(model, k_in, batch_size)
    return inputs, make_targets(model, inputs, loss_name, k_out)


# ## Instruments


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


def run_on_four_cpu_devices(script: str) -> str:
    """Run `script` in a fresh Python with four CPU devices (a device count is fixed when
    JAX starts, so it takes its own process); assert it succeeds; return its output."""
    import os
    import pathlib
    import subprocess
    import sys

    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    env["JAX_PLATFORMS"] = "cpu"
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        cwd=pathlib.Path(__file__).parent.parent,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout
