"""Curvature beyond the diagonal: the Hessian and GGN operators, their extreme
eigenpairs (Lanczos), their trace (Hutch++) and spectral density (stochastic Lanczos
quadrature), in float64 against `numpy.linalg.eigh` of the full matrices built with
`jax.hessian` and `jax.jacfwd` on tiny zoo models."""

import sys

import curvzoo as cz
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import numpy as np
import pytest
from curvzoo._spectral._lanczos import orthogonalise
from jax.flatten_util import ravel_pytree

from .helpers import (
    count_compilations,
    dense_ggn,
    dense_hessian,
    make_batch,
    run_on_four_cpu_devices,
    tree_allclose,
)


CE = cz.losses.cross_entropy
MODELS = {
    "mlp": lambda key: cz.MLP(3, 3, 4, 2, key=key),
    "gru": lambda key: cz.RNN(2, 3, 3, cell="gru", key=key),
    "cnn": lambda key: cz.CNN(1, 3, 10, channels=(2, 2), key=key),
}
# One `k` everywhere: the compiled loop depends on it, not on `which` or `tol`.
K = 3
TOL = 1e-12


def _rows(eigenvectors):
    """`(k, P)`: the eigenvectors raveled like the parameters."""
    return np.asarray(jax.vmap(lambda tree: ravel_pytree(tree)[0])(eigenvectors))


def _expected(values, which, k=K):
    order = {"largest": -values, "smallest": values, "magnitude": -np.abs(values)}[which]
    return np.argsort(order, kind="stable")[:k]


def _check_pairs(result, matrix, which, k=K):
    values, vectors = np.linalg.eigh(matrix)
    index = _expected(values, which, k)
    scale = np.max(np.abs(values))
    np.testing.assert_allclose(result.eigenvalues, values[index], rtol=1e-8, atol=1e-8 * scale)
    rows = _rows(result.eigenvectors)
    np.testing.assert_allclose(rows @ rows.T, np.eye(k), atol=1e-10)
    # Up to sign; every wanted eigenvalue here is simple, with gaps above 1e-3.
    overlaps = np.abs(np.sum(rows * vectors[:, index].T, axis=1))
    np.testing.assert_allclose(overlaps, 1.0, atol=1e-8)
    true_residuals = np.linalg.norm(rows @ matrix - result.eigenvalues[:, None] * rows, axis=1)
    np.testing.assert_allclose(result.residuals, true_residuals, atol=1e-13 * scale)
    assert bool(result.converged)
    assert int(result.num_matvecs) <= matrix.shape[0] + k


# ## Eigenpairs against `numpy.linalg.eigh`


@pytest.mark.parametrize("which", ["largest", "smallest"])
@pytest.mark.parametrize("name", list(MODELS))
def test_hessian_eigenpairs_match_eigh(name, which, getkey):
    model = MODELS[name](getkey())
    batch = make_batch(model, "ce", getkey())
    result = cz.hessian_eigenvalues(model, CE, batch, key=getkey(), k=K, which=which, tol=TOL)
    _check_pairs(result, dense_hessian(model, CE, batch), which)
    params = eqx.filter(model, eqx.is_inexact_array)
    expected = jax.tree.map(lambda leaf: (K, *leaf.shape), params)
    assert jax.tree.map(jnp.shape, result.eigenvectors) == expected


def test_largest_in_magnitude(getkey):
    model = MODELS["mlp"](getkey())
    batch = make_batch(model, "ce", getkey())
    result = cz.hessian_eigenvalues(model, CE, batch, key=getkey(), k=K, which="magnitude", tol=TOL)
    _check_pairs(result, dense_hessian(model, CE, batch), "magnitude")


def test_ggn_eigenpairs_match_eigh_of_the_jacobian_reference(getkey):
    model = MODELS["mlp"](getkey())
    batch = make_batch(model, "ce", getkey())
    ggn = dense_ggn(model, CE, batch)
    top = cz.hessian_eigenvalues(model, CE, batch, key=getkey(), k=K, operator="ggn", tol=TOL)
    _check_pairs(top, ggn, "largest")
    # Below its rank (5 samples x 2 for softmax over 3 classes) the GGN is zero; the
    # smallest eigenvalue has multiplicity P - 10, and fresh vectors after the Krylov
    # space is exhausted find three copies.
    assert np.linalg.matrix_rank(ggn) == 10
    bottom = cz.hessian_eigenvalues(
        model, CE, batch, key=getkey(), k=K, which="smallest", operator="ggn", tol=TOL
    )
    norm = np.max(np.linalg.eigvalsh(ggn))
    np.testing.assert_allclose(bottom.eigenvalues, 0.0, atol=1e-12 * norm)
    rows = _rows(bottom.eigenvectors)
    np.testing.assert_allclose(rows @ rows.T, np.eye(K), atol=1e-10)
    np.testing.assert_allclose(np.linalg.norm(rows @ ggn, axis=1), 0.0, atol=1e-12 * norm)
    assert bool(bottom.converged)


def test_ggn_of_a_recurrent_network(getkey):
    model = MODELS["gru"](getkey())
    batch = make_batch(model, "ce", getkey())
    result = cz.hessian_eigenvalues(model, CE, batch, key=getkey(), k=K, operator="ggn", tol=TOL)
    _check_pairs(result, dense_ggn(model, CE, batch), "largest")


def test_orthogonalise_takes_a_second_pass_where_the_first_cancels():
    """A vector all but 1e-10 of it in the span of the basis (stored as the solver
    stores it: orthonormal rows, the unused rows zero). The remainder is orthogonal to
    the basis to rounding (one classical Gram-Schmidt pass leaves ~1e-6 of it along the
    basis; two leave ~1e-16), and the coefficients are those of the vector along the
    rows, against numpy."""
    rng = np.random.default_rng(0)
    size, used, rows = 40, 12, 16
    Q = np.linalg.qr(rng.normal(size=(size, used)))[0].T  # (used, size), orthonormal rows
    basis = np.zeros((rows, size))
    basis[:used] = Q
    w = rng.normal(size=size)
    w -= Q.T @ (Q @ w)
    w /= np.linalg.norm(w)
    coefficients = rng.normal(size=used)
    vector = Q.T @ coefficients + 1e-10 * w

    remainder, column = orthogonalise(jnp.asarray(basis), jnp.asarray(vector))
    remainder, column = np.asarray(remainder), np.asarray(column)

    assert remainder.dtype == np.float64
    norm = np.linalg.norm(remainder)
    np.testing.assert_allclose(norm, 1e-10, rtol=1e-4)  # the vector's own rounding
    assert np.max(np.abs(Q @ remainder)) <= 1e-12 * norm, np.max(np.abs(Q @ remainder)) / norm
    np.testing.assert_allclose(column[:used], Q @ vector, rtol=0, atol=1e-14)
    np.testing.assert_array_equal(column[used:], 0.0)


def test_one_leaf_gives_its_diagonal_block(getkey):
    model = MODELS["gru"](getkey())
    batch = make_batch(model, "ce", getkey())
    spec = jax.tree.map(lambda _: False, model)
    spec = eqx.tree_at(lambda s: s.cell.weight_hh, spec, replace=True)
    block = dense_hessian(model, CE, batch, spec)
    assert block.shape == (model.cell.weight_hh.size,) * 2
    result = cz.hessian_eigenvalues(model, CE, batch, key=getkey(), k=K, tol=TOL, filter_spec=spec)
    _check_pairs(result, block, "largest")
    assert result.eigenvectors.cell.weight_ih is None
    assert result.eigenvectors.cell.weight_hh.shape == (K, *model.cell.weight_hh.shape)


def test_thick_restarts_reach_the_same_pairs(getkey):
    """A basis of 8 vectors for 3 pairs restarts many times on the way."""
    model = MODELS["mlp"](getkey())
    batch = make_batch(model, "ce", getkey())
    small = cz.hessian_eigenvalues(
        model, CE, batch, key=getkey(), k=K, tol=1e-10, krylov_size=8, max_matvecs=2000
    )
    assert int(small.num_matvecs) > 8 + K
    hessian = dense_hessian(model, CE, batch)
    values = np.linalg.eigvalsh(hessian)[::-1][:K]
    np.testing.assert_allclose(small.eigenvalues, values, rtol=1e-10)
    assert bool(small.converged)


def test_an_exhausted_budget_says_so(getkey):
    model = MODELS["mlp"](getkey())
    batch = make_batch(model, "ce", getkey())
    result = cz.hessian_eigenvalues(model, CE, batch, key=getkey(), k=K, tol=TOL, max_matvecs=5)
    assert int(result.num_matvecs) == 5 + K
    assert not bool(result.converged)
    assert np.all(np.asarray(result.residuals) > 0)


def test_eigenvalues_under_jit(getkey):
    model = MODELS["mlp"](getkey())
    batch = make_batch(model, "ce", getkey())
    key = getkey()

    @eqx.filter_jit
    def sharpness(model, batch):
        return cz.hessian_eigenvalues(model, CE, batch, key=key, k=K, tol=TOL).eigenvalues

    eager = cz.hessian_eigenvalues(model, CE, batch, key=key, k=K, tol=TOL).eigenvalues
    np.testing.assert_allclose(sharpness(model, batch), eager, rtol=1e-12)


# ## Operators


def test_operators_match_the_dense_references(getkey):
    model = MODELS["gru"](getkey())
    batch = make_batch(model, "ce", getkey())
    summed = cz.losses.CrossEntropy(reduction="sum")
    hessian = cz.hessian_operator(model, CE, batch)
    ggn = cz.ggn_operator(model, summed, batch)
    assert lx.is_symmetric(hessian) and lx.is_symmetric(ggn)
    assert lx.is_positive_semidefinite(ggn) and not lx.is_positive_semidefinite(hessian)
    np.testing.assert_allclose(hessian.as_matrix(), dense_hessian(model, CE, batch), atol=1e-13)
    np.testing.assert_allclose(ggn.as_matrix(), dense_ggn(model, summed, batch), atol=1e-12)
    vector = jax.tree.map(jnp.ones_like, eqx.filter(model, eqx.is_inexact_array))
    image = hessian.mv(vector)
    assert jax.tree.structure(image) == jax.tree.structure(vector)


def test_operator_restricted_to_a_leaf_and_solved_with_cg(getkey):
    model = MODELS["mlp"](getkey())
    batch = make_batch(model, "ce", getkey())
    spec = jax.tree.map(lambda _: False, model)
    spec = eqx.tree_at(lambda s: s.layers[-1].weight, spec, replace=True)
    ggn = cz.ggn_operator(model, CE, batch, filter_spec=spec)
    matrix = np.asarray(ggn.as_matrix())
    assert matrix.shape == (model.layers[-1].weight.size,) * 2
    # Damped Gauss-Newton step, `(G + I) x = b`, by conjugate gradients.
    identity = lx.IdentityLinearOperator(ggn.in_structure())
    damped = lx.TaggedLinearOperator(ggn + identity, lx.positive_semidefinite_tag)
    rhs = jax.tree.map(lambda leaf: jnp.arange(leaf.size, dtype=leaf.dtype).reshape(leaf.shape),
                       eqx.filter(eqx.filter(model, spec), eqx.is_inexact_array))  # fmt: skip
    solution = lx.linear_solve(damped, rhs, lx.CG(rtol=1e-12, atol=1e-12)).value
    expected = np.linalg.solve(matrix + np.eye(len(matrix)), ravel_pytree(rhs)[0])
    np.testing.assert_allclose(ravel_pytree(solution)[0], expected, rtol=1e-9)


def test_operators_cross_jit_without_recompiling(getkey):
    """The operator is a PyTree: a jitted function of it compiles once per shapes."""

    @eqx.filter_jit
    def quadratic_form(operator, vector):
        pairs = zip(jax.tree.leaves(vector), jax.tree.leaves(operator.mv(vector)))
        return sum(jnp.vdot(a, b) for a, b in pairs)

    def call(model, batch):
        op = cz.hessian_operator(model, CE, batch)
        return quadratic_form(
            op, jax.tree.map(jnp.ones_like, eqx.filter(model, eqx.is_inexact_array))
        )

    model = MODELS["mlp"](getkey())
    batch = make_batch(model, "ce", getkey())
    first = call(model, batch)
    ones = np.ones(dense_hessian(model, CE, batch).shape[0])
    np.testing.assert_allclose(first, ones @ dense_hessian(model, CE, batch) @ ones, rtol=1e-12)
    other = MODELS["mlp"](getkey())
    other_batch = make_batch(other, "ce", getkey())
    with count_compilations() as compilations:
        jax.block_until_ready(call(other, other_batch))
    assert compilations[0] == 0


# ## Trace


def test_hutchpp_with_a_full_sketch_is_exact(getkey):
    model = MODELS["mlp"](getkey())
    batch = make_batch(model, "ce", getkey())
    hessian = dense_hessian(model, CE, batch)
    size = len(hessian)
    result = cz.hessian_trace(model, CE, batch, key=getkey(), num_matvecs=2 * size + 2,
                              sketch_size=size)  # fmt: skip
    np.testing.assert_allclose(result.trace, np.trace(hessian), rtol=1e-10)
    assert float(result.stderr) < 1e-12
    ggn = cz.hessian_trace(model, CE, batch, key=getkey(), num_matvecs=2 * size + 2,
                           sketch_size=size, operator="ggn")  # fmt: skip
    np.testing.assert_allclose(ggn.trace, np.trace(dense_ggn(model, CE, batch)), rtol=1e-10)


@pytest.mark.parametrize("sketch_size", [None, 0])
def test_hutchpp_is_unbiased_with_a_calibrated_stderr(sketch_size):
    """Over 400 keys (one `jax.vmap`ped call: the estimate is a pure function of the
    key): the mean within 4 standard errors of the exact trace, and the reported
    standard error matching the spread of the estimates."""
    model = MODELS["mlp"](jr.key(0))
    batch = make_batch(model, "ce", jr.key(1))
    exact = np.trace(dense_hessian(model, CE, batch))

    def estimate(key):
        return cz.hessian_trace(model, CE, batch, key=key, num_matvecs=12, sketch_size=sketch_size)

    results = jax.vmap(estimate)(jr.split(jr.key(2), 400))
    estimates, stderrs = np.asarray(results.trace), np.asarray(results.stderr)
    spread = estimates.std(ddof=1)
    assert abs(estimates.mean() - exact) < 4 * spread / np.sqrt(len(estimates))
    assert 0.8 < np.sqrt(np.mean(stderrs**2)) / spread < 1.2
    assert np.all(np.asarray(results.num_matvecs) == 12)
    single = estimate(jr.split(jr.key(2), 400)[7])
    np.testing.assert_allclose(single.trace, estimates[7], rtol=1e-12)


def test_analysis_trace_of_the_exact_diagonal_is_the_trace(getkey):
    model = MODELS["mlp"](getkey())
    batch = make_batch(model, "ce", getkey())
    traces = cz.analysis.trace(cz.hessian_diagonal(model, CE, batch), model)
    np.testing.assert_allclose(traces["total"], np.trace(dense_hessian(model, CE, batch)),
                               rtol=1e-10)  # fmt: skip
    for part in ("leaves", "groups", "kinds"):
        np.testing.assert_allclose(sum(traces[part].values()), traces["total"], rtol=1e-10)


# ## Spectral density


def test_density_nodes_weights_and_mean(getkey):
    model = MODELS["mlp"](getkey())
    batch = make_batch(model, "ce", getkey())
    hessian = dense_hessian(model, CE, batch)
    values = np.linalg.eigvalsh(hessian)
    size = len(values)
    # A full Krylov space: every node is an eigenvalue.
    full = cz.spectral_density(model, CE, batch, key=getkey(), num_probes=2, num_matvecs=size)
    distance = np.abs(np.asarray(full.nodes)[..., None] - values).min(axis=-1)
    np.testing.assert_allclose(distance, 0.0, atol=1e-9)
    # Fewer steps: weights sum to 1, the mean is trace / P within its standard error.
    density = cz.spectral_density(model, CE, batch, key=getkey(), num_probes=40, num_matvecs=8)
    assert density.nodes.shape == density.weights.shape == (40, 8)
    assert density.dimension == size and int(density.num_matvecs) == 320
    np.testing.assert_allclose(jnp.sum(density.weights), 1.0, rtol=1e-12)
    assert np.all(np.asarray(density.weights) >= 0)
    np.testing.assert_allclose(jnp.sum(density.weights * density.nodes), density.mean, rtol=1e-12)
    assert abs(float(density.mean) - np.trace(hessian) / size) < 4 * float(density.mean_stderr)
    grid = jnp.linspace(values.min() - 1, values.max() + 1, 4001)
    curve = density.density(grid, width=0.05)
    assert curve.shape == grid.shape and np.all(np.asarray(curve) >= 0)
    np.testing.assert_allclose(jnp.sum(curve) * (grid[1] - grid[0]), 1.0, rtol=1e-6)


def test_density_mean_is_unbiased_over_keys():
    model = MODELS["mlp"](jr.key(0))
    batch = make_batch(model, "ce", jr.key(1))
    hessian = dense_hessian(model, CE, batch)

    def mean(key):
        return cz.spectral_density(model, CE, batch, key=key, num_probes=4, num_matvecs=8).mean

    means = np.asarray(jax.vmap(mean)(jr.split(jr.key(2), 200)))
    expected = np.trace(hessian) / len(hessian)
    assert abs(np.mean(means) - expected) < 4 * np.std(means, ddof=1) / np.sqrt(len(means))


def test_ggn_density_is_non_negative(getkey):
    model = MODELS["gru"](getkey())
    batch = make_batch(model, "ce", getkey())
    density = cz.spectral_density(model, CE, batch, key=getkey(), num_probes=3, operator="ggn")
    norm = np.max(np.linalg.eigvalsh(dense_ggn(model, CE, batch)))
    assert np.all(np.asarray(density.nodes) > -1e-12 * norm)
    assert np.all(np.asarray(density.nodes) < norm * (1 + 1e-10))


# ## Bad input


def _setup():
    model = MODELS["mlp"](jr.key(0))
    return model, make_batch(model, "ce", jr.key(1))


FUNCTIONS = {
    "eigenvalues": lambda m, l, b, **kw: cz.hessian_eigenvalues(
        m, l, b, **{"key": jr.key(0), **kw}
    ),
    "trace": lambda m, l, b, **kw: cz.hessian_trace(
        m, l, b, **{"key": jr.key(0), "num_matvecs": 6, **kw}
    ),
    "density": lambda m, l, b, **kw: cz.spectral_density(
        m, l, b, **{"key": jr.key(0), "num_matvecs": 4, **kw}
    ),
    "hessian_operator": lambda m, l, b, **kw: cz.hessian_operator(m, l, b, **kw),
    "ggn_operator": lambda m, l, b, **kw: cz.ggn_operator(m, l, b, **kw),
}  # fmt: skip
RANDOM = ["eigenvalues", "trace", "density"]


@pytest.mark.parametrize("name", RANDOM)
def test_a_key_is_required(name):
    model, batch = _setup()
    function = {"eigenvalues": cz.hessian_eigenvalues, "trace": cz.hessian_trace,
                "density": cz.spectral_density}[name]  # fmt: skip
    with pytest.raises(TypeError, match="key"):
        function(model, CE, batch, **({"num_matvecs": 6} if name == "trace" else {}))
    for bad in (0, jnp.zeros(3, jnp.uint32), jr.split(jr.key(0), 2), None):
        with pytest.raises(TypeError, match="`key` must be one JAX PRNG key"):
            FUNCTIONS[name](model, CE, batch, key=bad)


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_shared_bad_input(name):
    model, batch = _setup()
    call = FUNCTIONS[name]
    with pytest.raises(TypeError, match="`model` must be an Equinox module"):
        call("model", CE, batch)
    with pytest.raises(TypeError, match="`loss` must be"):
        call(model, "cross_entropy", batch)
    with pytest.raises(ValueError, match="`filter_spec` leaves nothing to differentiate"):
        call(model, CE, batch, filter_spec=lambda leaf: False)
    with pytest.raises(ValueError, match="`filter_spec` must be a callable or a PyTree"):
        call(model, CE, batch, filter_spec=[True, False])
    with pytest.raises(TypeError, match="`filter_spec` must be a callable or a PyTree of bools"):
        call(model, CE, batch, filter_spec=jax.tree.map(lambda _: 1.0, model))
    with pytest.raises(ValueError, match=r"leading \(batch\) axis"):
        call(model, CE, (batch[0], batch[1][:3]))
    nan_model = eqx.tree_at(lambda m: m.layers[1].weight, model,
                            replace_fn=lambda w: w.at[0, 0].set(jnp.nan))  # fmt: skip
    with pytest.raises(ValueError, match=r"`model\.layers\[1\]\.weight` holds 1 non-finite"):
        call(nan_model, CE, batch)
    with pytest.raises(ValueError, match=r"`batch\[0\]` holds 1 non-finite"):
        call(model, CE, (batch[0].at[2, 1].set(jnp.inf), batch[1]))
    # The check can be switched off (NaN then stops no iteration: keep it short).
    call(nan_model, CE, batch, check_finite=False,
         **({"max_matvecs": 4} if name == "eigenvalues" else {}))  # fmt: skip
    with pytest.raises(TypeError, match="`check_finite` must be True or False"):
        call(model, CE, batch, check_finite="yes")
    with pytest.raises(TypeError, match="`mesh` must be a `jax.sharding.Mesh`"):
        call(model, CE, batch, mesh="data")
    if name in RANDOM:
        with pytest.raises(ValueError, match="`operator` must be one of"):
            call(model, CE, batch, operator="fisher")


@pytest.mark.parametrize("name", ["eigenvalues", "trace", "density", "ggn_operator"])
def test_the_ggn_needs_a_curvzoo_loss(name):
    model, batch = _setup()
    call = FUNCTIONS[name]
    options = {} if name == "ggn_operator" else {"operator": "ggn"}

    def custom(model, batch):
        return CE(model, batch)

    with pytest.raises(TypeError, match="`operator='ggn'` needs a curvzoo loss"):
        call(model, custom, batch, **options)

    class OwnCall(cz.losses.CrossEntropy):
        def __call__(self, model, batch):
            return 2 * super().__call__(model, batch)

    with pytest.raises(ValueError, match="overrides `__call__`"):
        call(model, OwnCall(), batch, **options)
    # The Hessian takes any callable loss.
    if name != "ggn_operator":
        call(model, custom, batch)


def test_eigenvalue_options_are_checked():
    model, batch = _setup()
    size = sum(leaf.size for leaf in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array)))
    call = FUNCTIONS["eigenvalues"]
    for k, error, message in [
        (0, ValueError, "`k` must be >= 1"),
        (1.5, TypeError, "`k` must be a positive integer"),
        (size + 1, ValueError, f"`k` must be at most the number of trained parameters, P = {size}"),
    ]:  # fmt: skip
        with pytest.raises(error, match=message):
            call(model, CE, batch, k=k)
    with pytest.raises(ValueError, match="`which` must be one of"):
        call(model, CE, batch, which="top")
    for tol in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="`tol` must be a finite number > 0"):
            call(model, CE, batch, tol=tol)
    with pytest.raises(TypeError, match="`tol` must be a real number"):
        call(model, CE, batch, tol="small")
    with pytest.raises(ValueError, match="`atol` must be a finite number >= 0"):
        call(model, CE, batch, atol=-1e-3)
    with pytest.raises(ValueError, match="`max_matvecs` must be at least `k` = 3"):
        call(model, CE, batch, k=3, max_matvecs=2)
    with pytest.raises(ValueError, match="`krylov_size` must be at least `k \\+ 1` = 4"):
        call(model, CE, batch, k=3, krylov_size=3)
    with pytest.raises(ValueError, match="`max_matvecs` must be >= 1"):
        call(model, CE, batch, max_matvecs=0)


def test_trace_and_density_options_are_checked():
    model, batch = _setup()
    with pytest.raises(ValueError, match="`num_matvecs` = 3 leaves 1 probe"):
        FUNCTIONS["trace"](model, CE, batch, num_matvecs=3)
    with pytest.raises(ValueError, match="`num_matvecs` = 6 leaves 0 probe"):
        FUNCTIONS["trace"](model, CE, batch, num_matvecs=6, sketch_size=3)
    with pytest.raises(ValueError, match="`sketch_size` must be None or an integer >= 0"):
        FUNCTIONS["trace"](model, CE, batch, sketch_size=-1)
    with pytest.raises(ValueError, match="`num_matvecs` must be >= 1"):
        FUNCTIONS["trace"](model, CE, batch, num_matvecs=0)
    with pytest.raises(ValueError, match="`num_matvecs` must be at most the number of trained"):
        FUNCTIONS["density"](model, CE, batch, num_matvecs=10_000)
    with pytest.raises(ValueError, match="`num_probes` must be >= 1"):
        FUNCTIONS["density"](model, CE, batch, num_probes=0)
    density = FUNCTIONS["density"](model, CE, batch)
    with pytest.raises(ValueError, match="`width` must be a finite number > 0"):
        density.density(jnp.linspace(0, 1, 5), width=0.0)
    assert np.isnan(float(density.mean_stderr))  # one probe: no spread to measure


def test_missing_extra_names_the_install_command(monkeypatch):
    model, batch = _setup()
    monkeypatch.setitem(sys.modules, "lineax", None)
    for name in ("hessian_operator", "ggn_operator"):
        with pytest.raises(ImportError, match=r'pip install "curvzoo\[spectral\]"'):
            FUNCTIONS[name](model, CE, batch)
    FUNCTIONS["eigenvalues"](model, CE, batch)  # the rest needs no extra


# ## Determinism, dtype and compilation


BATTERY = {
    "eigenvalues": lambda m, b: cz.hessian_eigenvalues(m, CE, b, key=jr.key(7), k=2),
    "eigenvalues-ggn": lambda m, b: cz.hessian_eigenvalues(
        m, CE, b, key=jr.key(7), k=2, operator="ggn", which="smallest", atol=1e-3
    ),
    "trace": lambda m, b: cz.hessian_trace(m, CE, b, key=jr.key(7), num_matvecs=9),
    "density": lambda m, b: cz.spectral_density(
        m, CE, b, key=jr.key(7), num_probes=2, num_matvecs=6
    ),  # fmt: skip
    "operator": lambda m, b: cz.ggn_operator(m, CE, b).mv(
        jax.tree.map(jnp.ones_like, eqx.filter(m, eqx.is_inexact_array))
    ),
}
BATTERY_MODELS = {
    "mlp": lambda key: cz.MLP(3, 3, 4, 1, key=key),
    "gru": lambda key: cz.RNN(2, 3, 3, cell="gru", key=key),
}


def _float32(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float32) if eqx.is_inexact_array(x) else x, tree)


@pytest.mark.parametrize("model_name", list(BATTERY_MODELS))
@pytest.mark.parametrize("function_name", list(BATTERY))
def test_battery(function_name, model_name, getkey):
    function = BATTERY[function_name]
    model = BATTERY_MODELS[model_name](getkey())
    x, y = make_batch(model, "ce", getkey())
    model, batch = _float32(model), (x.astype(jnp.float32), y)
    before = jax.tree.map(lambda leaf: np.array(leaf) if eqx.is_array(leaf) else leaf, model)

    first = function(model, batch)
    assert tree_allclose(model, before, rtol=0), "the model was modified"
    floats = [leaf for leaf in jax.tree.leaves(first) if jnp.issubdtype(leaf.dtype, jnp.floating)]
    assert floats and all(leaf.dtype == jnp.float32 for leaf in floats)
    assert tree_allclose(function(model, batch), first, rtol=0), "not deterministic"

    other = BATTERY_MODELS[model_name](getkey())
    x2, y2 = make_batch(other, "ce", getkey())
    other, other_batch = _float32(other), (x2.astype(jnp.float32), y2)
    with count_compilations() as compilations:
        jax.block_until_ready(function(other, other_batch))
    assert compilations[0] == 0


# ## Several devices


SCRIPT = r"""
import equinox as eqx
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh
import curvzoo as cz

devices = jax.devices()
assert len(devices) == 4, devices
four = Mesh(np.array(devices), ("data",))
model = cz.MLP(3, 3, 4, 1, key=jr.key(0))
batch = (jr.normal(jr.key(1), (8, 3)), jr.randint(jr.key(2), (8,), 0, 3))
ce = cz.losses.cross_entropy
calls = {
    "eigenvalues": lambda **kw: cz.hessian_eigenvalues(
        model, ce, batch, key=jr.key(3), k=2, tol=1e-12, **kw).eigenvalues,
    "ggn-eigenvalues": lambda **kw: cz.hessian_eigenvalues(
        model, ce, batch, key=jr.key(3), k=2, tol=1e-12, operator="ggn", **kw).eigenvalues,
    "trace": lambda **kw: cz.hessian_trace(model, ce, batch, key=jr.key(4), num_matvecs=9,
                                           **kw).trace,
    "density": lambda **kw: cz.spectral_density(model, ce, batch, key=jr.key(5), num_probes=2,
                                                num_matvecs=5, **kw).nodes,
    "operator": lambda **kw: ravel_pytree(cz.hessian_operator(model, ce, batch, **kw).mv(
        jax.tree.map(jnp.ones_like, eqx.filter(model, eqx.is_inexact_array))))[0],
}
for name, call in calls.items():
    single, split = np.asarray(call()), np.asarray(call(mesh=four))
    np.testing.assert_allclose(split, single, rtol=1e-9, atol=1e-12, err_msg=name)
try:
    cz.hessian_trace(model, ce, (batch[0][:6], batch[1][:6]), key=jr.key(0), num_matvecs=6,
                     mesh=four)
except ValueError as error:
    assert "`batch` has 6 samples" in str(error)
else:
    raise AssertionError("no error for an uneven batch")
print("devices ok")
"""


def test_one_and_four_devices_agree():
    assert "devices ok" in run_on_four_cpu_devices(SCRIPT)
