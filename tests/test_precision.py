"""Low precision: bfloat16 and float16 models, float32 inputs to them, integer leaves.

The reference for a low-precision result is the same quantity of the same weights (and
the same inputs, rounded to the model's precision) in float64: the result should carry
the model's dtype and agree to the precision's rounding, not to float64's.
"""

import curvzoo as cz
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest


_LOSS = cz.losses.cross_entropy
# the largest error relative to the largest entry, measured on these models: about
# 4e-3 (structured) and 1.7e-2 (generic) in bfloat16, 7e-4 in float16; bounds 3x that
_TOLERANCE = {jnp.bfloat16: 5e-2, jnp.float16: 3e-3}


def _cast(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, tree)


def _relative_error(result, reference):
    flat = lambda tree: np.concatenate(  # noqa: E731
        [np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)]
    )
    a, b = flat(result), flat(reference)
    return np.abs(a - b).max() / np.abs(b).max()


def _models(dtype):
    key = jr.key(0)
    return {
        "eqx-mlp": eqx.nn.MLP(5, 3, 8, 2, key=key, dtype=dtype),
        "mlp": cz.MLP(5, 3, 8, 2, key=key, dtype=dtype),
        "gru": cz.RNN(5, 4, 3, "gru", key=key, dtype=dtype),
        "lstm": cz.RNN(5, 4, 3, "lstm", key=key, dtype=dtype),
    }


def _batch(name, size=16):
    shape = (size, 5) if "mlp" in name else (size, 4, 5)
    return jr.normal(jr.key(1), shape, jnp.float32), jr.randint(jr.key(2), (size,), 0, 3)


_CASES = [
    (name, dtype)
    for name in ("eqx-mlp", "mlp", "gru", "lstm")
    for dtype in (jnp.bfloat16, jnp.float16)
]


@pytest.mark.parametrize("name,dtype", _CASES, ids=[f"{n}-{jnp.dtype(d).name}" for n, d in _CASES])
def test_low_precision_model(name, dtype):
    """The Hessian diagonal of a low-precision model, both kernels: in its dtype,
    close to float64 of the same weights. The zoo models take float32 inputs (they
    cast them); an Equinox MLP gets inputs in its own dtype (it does not cast). In
    bfloat16, an Equinox MLP and a GRU also go through the GGN and empirical Fisher
    diagonals, Hutchinson and the top eigenvalue (the rest share their code paths)."""
    model = _models(dtype)[name]
    x, y = _batch(name)
    x = x.astype(dtype)
    given = (x, y) if name == "eqx-mlp" else (x.astype(jnp.float32), y)
    exact = _cast(model, jnp.float64), (x.astype(jnp.float64), y)
    everything = dtype == jnp.bfloat16 and name in ("eqx-mlp", "gru")
    functions = [cz.hessian_diagonal]
    if everything:
        functions += [cz.ggn_diagonal, cz.empirical_fisher_diagonal]
    for function in functions:
        reference = function(exact[0], _LOSS, exact[1])
        for method in ("auto", "generic"):
            result = function(model, _LOSS, given, method=method)
            assert {leaf.dtype for leaf in jax.tree.leaves(result)} == {jnp.dtype(dtype)}
            error = _relative_error(result, reference)
            assert error < _TOLERANCE[dtype], (function.__name__, method, error)
    if not everything:
        return
    estimate = cz.hutchinson_diagonal(model, _LOSS, given, key=jr.key(3), num_probes=4)
    assert {leaf.dtype for leaf in jax.tree.leaves(estimate)} == {jnp.dtype(dtype)}
    top = cz.hessian_eigenvalues(model, _LOSS, given, k=1, key=jr.key(4)).eigenvalues[0]
    exact_top = cz.hessian_eigenvalues(exact[0], _LOSS, exact[1], k=1, key=jr.key(4))
    top_exact = float(exact_top.eigenvalues[0])
    assert abs(float(top) - top_exact) < 10 * _TOLERANCE[dtype] * abs(top_exact)


def test_sums_accumulate_in_float32():
    """A bfloat16 sum over many samples and chunks keeps float32's accuracy: the batch
    diagonal of 512 equal samples equals one sample's, in chunks of 1 and 7 (a
    bfloat16 running sum was 49% and 7% off)."""
    model = cz.MLP(5, 3, 8, 1, key=jr.key(0), dtype=jnp.bfloat16)
    x, y = _batch("mlp", size=1)
    one = cz.hessian_diagonal(model, _LOSS, (x, y))
    batch = jnp.repeat(x, 512, 0), jnp.repeat(y, 512, 0)
    for chunk_size in (1, 7):
        many = cz.hessian_diagonal(model, _LOSS, batch, chunk_size=chunk_size)
        for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(many)):
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_rnn_with_an_integer_head_weight(cell):
    """An integer leaf is frozen (`None` in the result) and does not set the model's
    precision: the cells' parameters do."""
    model = cz.RNN(5, 4, 3, cell, key=jr.key(0), dtype=jnp.float64)
    frozen = eqx.tree_at(lambda m: m.head.weight, model, jnp.ones((3, 4), jnp.int32))
    x, y = _batch(cell)
    batch = (x.astype(jnp.float64), y)
    reference = cz.hessian_diagonal(
        eqx.tree_at(lambda m: m.head.weight, model, jnp.ones((3, 4), jnp.float64)),
        _LOSS,
        batch,
        method="generic",
    )
    for method in ("auto", "generic"):
        result = cz.hessian_diagonal(frozen, _LOSS, batch, method=method)
        assert result.head.weight is None
        np.testing.assert_allclose(result.head.bias, reference.head.bias, rtol=1e-12)
        for a, b in zip(jax.tree.leaves(result.cells), jax.tree.leaves(reference.cells)):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
