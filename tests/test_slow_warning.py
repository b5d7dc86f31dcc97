"""`SlowCurvatureWarning` at the documented minute, on every kernel and tool, with the
machine's real rate (nothing patched). Before, a pre-filter that assumed 1e12
operations per second let only runs estimated above about two hours warn: the
own-models page's own example (estimated 23-63 min) and Hutchinson with a billion
probes ran without a word. The warning comes before any work (the suite's
`filterwarnings = error` turns it into an exception here, so nothing runs)."""

import curvzoo as cz
import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import pytest
from curvzoo._dispatch import _costs


_KEY = jr.key(0)
_SMALL = cz.MLP(5, 3, 8, 1, key=_KEY)
_X = jr.normal(jr.key(1), (6, 5))
_LABELS = jnp.arange(6) % 3
_CE = cz.losses.cross_entropy


def test_the_own_models_example_warns():
    """`eqx.nn.MLP` 784-256-256-10 with a plain-function loss: the generic kernel."""
    model = eqx.nn.MLP(784, 10, 256, 2, activation=jnp.tanh, key=_KEY)
    batch = (jnp.ones((128, 784)), jnp.zeros(128, jnp.int32))
    with pytest.raises(cz.SlowCurvatureWarning, match=r"generic .* on this machine"):
        cz.hessian_diagonal(model, lambda m, b: _CE(m, b), batch)


def test_hutchinson_with_a_billion_probes_warns():
    with pytest.raises(cz.SlowCurvatureWarning, match=r"Hutchinson.*Fewer probes"):
        cz.hutchinson_diagonal(_SMALL, _CE, (_X, _LABELS), key=_KEY, num_probes=10**9)


def test_counts_beyond_32_bits_are_refused():
    with pytest.raises(ValueError, match=r"`num_probes` must be at most 2\*\*31 - 1"):
        cz.hutchinson_diagonal(_SMALL, _CE, (_X, _LABELS), key=_KEY, num_probes=10**12)


def test_the_spectral_tools_warn():
    """One Hessian-vector product of this MLP (P = 4.3e6, N = 4096) is about 1e11
    operations, so 200 or 400 products are many minutes on any CPU (48, the default
    Krylov space, is close to a minute on a fast one: not a test of the warning)."""
    model = cz.MLP(64, 10, 2048, 2, key=_KEY)
    batch = (jnp.ones((4096, 64)), jnp.zeros(4096, jnp.int32))
    with pytest.raises(cz.SlowCurvatureWarning, match=r"trace estimate \(200 hessian products"):
        cz.hessian_trace(model, _CE, batch, key=_KEY, num_matvecs=200, sketch_size=0)
    with pytest.raises(cz.SlowCurvatureWarning, match=r"spectral density"):
        cz.spectral_density(model, _CE, batch, key=_KEY, num_probes=4, num_matvecs=50)
    with pytest.raises(cz.SlowCurvatureWarning, match=r"eigenvalues, at the least"):
        cz.hessian_eigenvalues(model, _CE, batch, key=_KEY, krylov_size=400)


def test_time_step_curvature_warns():
    model = cz.RNN(8, 256, 4, "lstm", key=_KEY)
    batch = (jnp.ones((4096, 256, 8)), jnp.zeros(4096, jnp.int32))
    with pytest.raises(cz.SlowCurvatureWarning, match=r"curvature per time step"):
        cz.time_step_curvature(model, _CE, batch)


def test_small_calls_do_not_warn_or_measure(monkeypatch):
    """Below the floor's reach nothing is measured: a small call pays no rate
    measurement."""
    measured = []
    original = _costs._measure_rates
    monkeypatch.setattr(_costs, "_measure_rates", lambda: measured.append(1) or original())
    monkeypatch.setitem(_costs._RATE, "measured", 0)
    cz.hessian_diagonal(_SMALL, _CE, (_X, _LABELS))  # no warning: an error in this suite
    assert not measured


@pytest.mark.parametrize("kernel", sorted(_costs.EFFICIENCY))
def test_the_pre_filter_cannot_pass_over_a_slow_call(kernel):
    """Whatever the work and its mix (products, convolutions, element operations,
    steps), if the estimate at the measured rates is a minute or more, the pre-filter
    does not rule it out (each floor is below the measured rate)."""
    rates = _costs.machine_rates()
    floor = _costs._SLOWEST
    assert rates.matmul > floor.matmul and rates.convolution > floor.convolution
    assert rates.elementwise > floor.elementwise and rates.step < floor.step
    for exponent in range(6, 16):
        size = 10.0**exponent
        for work in (
            _costs.Profile(size, 0.0, 0),
            _costs.Profile(size, 0.0, 0, convolutions=size),
            _costs.Profile(0.0, size, 0),
            _costs.Profile(0.0, 0.0, 0, steps=size / 1e4),
            _costs.Profile(size, size, 0, convolutions=size / 2, steps=size / 1e6),
        ):
            if _costs.estimated_seconds(work, kernel) >= 60.0:
                assert not _costs.surely_faster_than(work, kernel, 60.0)


def test_the_rates_are_measured_even_inside_a_trace():
    """A plan made while `jax.jit` traces (the user's jitted step) measures the machine
    for real: its probes' inputs were JAX arrays made under the trace, which leaked
    out of it (an `UnexpectedTracerError` in the next jitted call)."""
    import jax

    @jax.jit
    def traced(x):
        rates = _costs._measure_rates()
        assert 1e8 < rates.matmul < 1e16 and 0 < rates.step < 1e-2
        return x + 1

    traced(jnp.ones(3))
    assert _costs._measure_rates().matmul > 1e8  # outside again: no leaked tracer
