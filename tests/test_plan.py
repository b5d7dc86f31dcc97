"""`curvzoo.plan`: the kernel a call takes, why, and its estimates; built once per
request (shapes, dtypes, static parts, options) and given the same checks as the
functions."""

import curvzoo as cz
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest


RNG = np.random.default_rng(2)
MLP = cz.MLP(3, 2, 4, 1, key=jax.random.key(0))
GRU = cz.RNN(2, 3, 2, cell="gru", key=jax.random.key(1))
X = jnp.asarray(RNG.normal(size=(5, 3)))
Y = jnp.asarray(RNG.integers(0, 2, size=5))
XS = jnp.asarray(RNG.normal(size=(5, 4, 2)))
T = jnp.asarray(RNG.normal(size=(5, 2)))


@pytest.mark.parametrize(
    "quantity,kernel",
    [
        ("hessian", "layered"),
        ("ggn", "layered"),
        ("empirical_fisher", "layered"),
        ("fisher", "layered"),
        ("hutchinson", "hutchinson"),
    ],
)
def test_the_plan_of_each_quantity(quantity, kernel):
    plan = cz.plan(MLP, cz.losses.cross_entropy, (X, Y), quantity=quantity, chunk_size=2)
    assert plan.quantity == quantity and plan.kernel == kernel and plan.reason is None
    assert plan.num_params == 26 and plan.batch_size == 5
    lanes = 1 if quantity == "hutchinson" else 5
    assert plan.chunk * plan.num_chunks >= lanes and plan.chunk <= 2
    assert plan.multiply_adds > 0 and plan.memory_bytes > 0 and plan.seconds > 0
    assert isinstance(plan, cz.Plan)


def test_the_plan_says_why_a_faster_kernel_does_not_apply():
    plan = cz.plan(MLP, lambda m, b: cz.losses.cross_entropy(m, b), (X, Y))
    assert plan.kernel == "generic" and "custom callable" in plan.reason
    text = repr(plan)
    for piece in (
        "Hessian diagonal of curvzoo.MLP",
        "P = 26",
        "generic",
        "because",
        "custom callable",
    ):
        assert piece in text
    generic = cz.plan(GRU, cz.losses.cross_entropy, (XS, Y), quantity="ggn", method="generic")
    assert generic.kernel == "vjp" and generic.reason is None
    assert cz.plan(GRU, cz.losses.cross_entropy, (XS, Y)).kernel == "recurrent"
    hutch = cz.plan(MLP, cz.losses.cross_entropy, (X, Y), quantity="hutchinson",
                    control_variate="ggn", num_probes=4)  # fmt: skip
    assert "exact GGN diagonal" in repr(hutch)


@pytest.mark.parametrize("readout,classes", [("last", 2), ("all", 40)])
def test_the_control_variate_takes_the_ggn_kernel_that_ggn_diagonal_takes(readout, classes):
    """Hutchinson's exact GGN is chosen as `ggn_diagonal` chooses it: for a recurrent
    model, the recurrent kernel only where its estimate beats the vector-Jacobian
    products (many outputs at every step), not wherever it applies."""
    model = cz.RNN(2, 3, classes, cell="gru", readout=readout, key=jax.random.key(1))
    labels = jnp.asarray(RNG.integers(0, classes, size=(5, 4) if readout == "all" else 5))
    batch = (XS, labels)
    ggn = cz.plan(model, cz.losses.cross_entropy, batch, quantity="ggn")
    assert ggn.kernel == ("vjp" if readout == "last" else "recurrent")
    hutch = cz.plan(model, cz.losses.cross_entropy, batch, quantity="hutchinson",
                    control_variate="ggn", num_probes=4)  # fmt: skip
    label = {"vjp": "vector-Jacobian products", "recurrent": "recurrent kernel"}[ggn.kernel]
    assert hutch.extra == f"the exact GGN diagonal ({label})"


def test_the_plan_is_what_the_call_runs(monkeypatch):
    """The function builds its plan through the same path: the plan is built once per
    request, and a second call with the same shapes (new values) builds nothing."""
    from curvzoo._run import _execute

    built = []
    original = _execute.build_plan
    monkeypatch.setattr(_execute, "build_plan", lambda r: built.append(r) or original(r))
    spec = jax.tree.map(lambda _: True, MLP)
    spec = eqx.tree_at(lambda m: m.layers[0].bias, spec, False)
    plan = cz.plan(MLP, cz.losses.mse, (X, jnp.zeros((5, 2))), filter_spec=spec, memory_budget=777)
    cz.hessian_diagonal(MLP, cz.losses.mse, (X, jnp.ones((5, 2))), filter_spec=spec,
                        memory_budget=777)  # fmt: skip
    other = cz.MLP(3, 2, 4, 1, key=jax.random.key(9))
    cz.hessian_diagonal(other, cz.losses.mse, (2 * X, jnp.ones((5, 2))), filter_spec=spec,
                        memory_budget=777)  # fmt: skip
    assert len(built) == 1
    assert plan.memory_budget == 777 and plan.num_params == 22


def test_plan_checks_its_arguments_as_the_functions_do():
    with pytest.raises(ValueError, match="`quantity` must be one of"):
        cz.plan(MLP, cz.losses.mse, (X, T), quantity="fim")
    with pytest.raises(TypeError, match="`model` must be an Equinox module"):
        cz.plan(lambda x: x, cz.losses.mse, (X, T))
    with pytest.raises(ValueError, match="must share their leading"):
        cz.plan(MLP, cz.losses.cross_entropy, (X, Y[:4]))
    with pytest.raises(ValueError, match="`method` must be one of"):
        cz.plan(MLP, cz.losses.cross_entropy, (X, Y), method="fast")
    with pytest.raises(ValueError, match="`method='structured'`.*custom callable"):
        cz.plan(MLP, lambda m, b: cz.losses.mse(m, b), (X, T), method="structured")
    with pytest.raises(TypeError, match="`loss` for `ggn_diagonal` must be a curvzoo loss"):
        cz.plan(MLP, lambda m, b: cz.losses.mse(m, b), (X, T), quantity="ggn")
    with pytest.raises(ValueError, match="`num_probes` must be >= 1"):
        cz.plan(MLP, cz.losses.mse, (X, T), quantity="hutchinson", num_probes=0)
    with pytest.raises(ValueError, match="`control_variate` must be None or 'ggn'"):
        cz.plan(MLP, cz.losses.mse, (X, T), quantity="hutchinson", control_variate="gn")
    with pytest.raises(ValueError, match="`filter_spec` leaves nothing to differentiate"):
        cz.plan(MLP, cz.losses.mse, (X, T), filter_spec=lambda leaf: False)


def test_hutchinson_chunks_are_bounded_by_work_and_pad_little():
    """A probe over a large batch is already matrix-sized work: the plan runs a few at a
    time (about 5e8 operations a chunk), choosing the size that pads the fewest probes;
    cheap probes still run together."""
    model = cz.MLP(784, 10, 256, 2, key=jax.random.key(0), dtype=jnp.float32)
    batch = (jnp.zeros((128, 784), jnp.float32), jnp.zeros(128, jnp.int32))
    ce = cz.losses.cross_entropy
    plain = cz.plan(model, ce, batch, quantity="hutchinson", num_probes=16)
    per_probe = (plain.multiply_adds + plain.element_ops) / 16
    assert 1e8 < per_probe < 1.7e8
    assert (plain.chunk, plain.num_chunks) == (4, 4)
    cv = cz.plan(model, ce, batch, quantity="hutchinson", num_probes=16, control_variate="ggn")
    assert cv.chunk * cv.num_chunks == 16 and cv.chunk < 4  # no padded probe
    cheap = cz.plan(MLP, ce, (X, Y), quantity="hutchinson", num_probes=16)
    assert (cheap.chunk, cheap.num_chunks) == (16, 1)


def test_the_plans_split_is_the_split_that_runs():
    """The kernels split their lanes again from the plan's chunk: the same split, so the
    plan describes what runs (and a mesh's multiple is kept)."""
    from curvzoo._kernels._lanes import even_chunks

    for lanes in range(1, 120):
        for chunk in range(1, 40):
            for multiple in (1, 2, 4):
                split = even_chunks(lanes, chunk, multiple)
                assert even_chunks(lanes, split[0], multiple) == split
                assert split[0] * split[1] >= lanes and split[1] - 1 < lanes
                assert split[0] <= chunk or (multiple > 1 and split[0] % multiple == 0)
