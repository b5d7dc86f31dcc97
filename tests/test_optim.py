"""curvzoo.optim: each preconditioner against a hand-written update, both ways of
giving the curvature, jit, state, frozen leaves and bad inputs."""

import curvzoo as cz
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

from .helpers import tree_allclose


# ## Hand-written references, on a dict of arrays with a convolution-shaped leaf

SHAPES = {"w": (3,), "kernel": (2, 3, 2, 2)}


def _arrays(seed, *, positive=False):
    """Three steps of gradients or curvatures (with negative and near-zero entries
    unless `positive`), as numpy dicts."""
    rng = np.random.default_rng(seed)
    steps = []
    for _ in range(3):
        step = {name: rng.normal(size=shape) for name, shape in SHAPES.items()}
        step["w"][0] = 1e-9  # a near-zero entry, where eps and the clip matter
        steps.append({k: np.abs(v) if positive else v for k, v in step.items()})
    return steps


GRADS = _arrays(0)
CURVATURES = _arrays(1)
PARAMS = {
    name: np.linspace(-1.0, 1.0, np.prod(shape)).reshape(shape) for name, shape in SHAPES.items()
}


def _run(optimiser, grads=GRADS, curvatures=CURVATURES, params=PARAMS):
    """The updates of `optimiser` over the steps, with the curvature as an extra
    argument and the parameters held fixed."""
    tree = lambda d: jax.tree.map(jnp.asarray, d)  # noqa: E731
    state = optimiser.init(tree(params))
    out = []
    for g, c in zip(grads, curvatures):
        updates, state = optimiser.update(tree(g), state, tree(params), curvature=tree(c))
        out.append(updates)
    return out, state


def _close(updates, expected):
    for got, want in zip(updates, expected):
        assert tree_allclose(got, jax.tree.map(jnp.asarray, want), rtol=1e-12, atol=1e-15)


def test_diagonal_newton_first_step():
    """With both moments bias-corrected, the first update is `-lr * g / (|d| + eps)`."""
    optimiser = cz.optim.diagonal_newton(0.5, eps=1e-2, b1=0.9, b2=0.999)
    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    grads = {"w": jnp.array([0.3, -0.6, 0.9])}
    curvature = {"w": jnp.array([2.0, -4.0, 0.5])}
    updates, _ = optimiser.update(grads, optimiser.init(params), params, curvature=curvature)
    expected = -0.5 * grads["w"] / (jnp.abs(curvature["w"]) + 1e-2)
    assert jnp.allclose(updates["w"], expected, rtol=1e-12)


@pytest.mark.parametrize(
    "b1, b2, trust_radius", [(0.0, 0.0, None), (0.9, 0.999, None), (0.5, 0.8, 0.7)]
)
def test_diagonal_newton_matches_hand_written(b1, b2, trust_radius):
    lr, eps = 0.3, 1e-3
    updates, state = _run(
        cz.optim.diagonal_newton(lr, eps=eps, trust_radius=trust_radius, b1=b1, b2=b2)
    )
    expected = []
    m = {k: 0.0 for k in SHAPES}
    v = {k: 0.0 for k in SHAPES}
    for t, (g, d) in enumerate(zip(GRADS, CURVATURES), start=1):
        step = {}
        for k in SHAPES:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * d[k] ** 2
            s = (m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**t)) + eps)
            if trust_radius is not None:
                s = np.clip(s, -trust_radius, trust_radius)
            step[k] = -lr * s
        expected.append(step)
    _close(updates, expected)
    if trust_radius is not None:  # the clip is active somewhere, or the case is vacuous
        largest = max(float(jnp.max(jnp.abs(u[k]))) for u in updates for k in SHAPES)
        assert np.isclose(largest, lr * trust_radius)
    newton_state = state[0]
    assert isinstance(newton_state, cz.optim.DiagonalNewtonState)
    assert int(newton_state.count) == 3


@pytest.mark.parametrize("spatial_average, power", [(True, 1.0), (False, 0.5), (True, 0.3)])
def test_adahessian_matches_hand_written(spatial_average, power):
    lr, b1, b2, eps, decay = 0.15, 0.9, 0.99, 1e-4, 0.01
    optimiser = cz.optim.adahessian(
        lr, b1=b1, b2=b2, eps=eps, hessian_power=power, spatial_average=spatial_average,
        weight_decay=decay,
    )  # fmt: skip
    updates, _ = _run(optimiser)
    expected = []
    m = {k: 0.0 for k in SHAPES}
    v = {k: 0.0 for k in SHAPES}
    for t, (g, d) in enumerate(zip(GRADS, CURVATURES), start=1):
        step = {}
        for k in SHAPES:
            magnitude = np.abs(d[k])
            if spatial_average and magnitude.ndim == 4:  # the mean over each 2x2 filter
                magnitude = np.repeat(magnitude.mean(axis=(2, 3))[:, :, None, None], 4, axis=-1)
                magnitude = magnitude.reshape(d[k].shape)
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * magnitude**2
            s = (m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**t)) ** power + eps)
            step[k] = -lr * (s + decay * PARAMS[k])
        expected.append(step)
    _close(updates, expected)


def test_adahessian_spatial_average_shares_one_value_per_filter():
    optimiser = cz.optim.scale_by_adahessian(b1=0.0, b2=0.0, eps=1e-300)
    grads = {"kernel": jnp.ones((2, 3, 2, 2)), "bias": jnp.ones((2, 1, 1))}
    curvature = {
        "kernel": jnp.arange(24.0).reshape(2, 3, 2, 2) - 11.5,
        "bias": jnp.array([[[-2.0]], [[4.0]]]),
    }
    updates, _ = optimiser.update(grads, optimiser.init(grads), curvature=curvature)
    means = jnp.abs(curvature["kernel"]).mean(axis=(2, 3), keepdims=True)
    assert jnp.allclose(updates["kernel"], jnp.broadcast_to(1 / means, (2, 3, 2, 2)))
    assert jnp.allclose(updates["bias"], 1 / jnp.abs(curvature["bias"]))  # axes of size 1


@pytest.mark.parametrize("k", [1, 2])
def test_sophia_matches_hand_written(k):
    lr, b1, b2, gamma, eps, decay = 0.05, 0.9, 0.8, 0.5, 1e-12, 0.1
    grads, curvatures = GRADS * 2, CURVATURES * 2  # six steps; refreshes at 1, 3, 5 for k=2
    optimiser = cz.optim.sophia(lr, b1=b1, b2=b2, gamma=gamma, eps=eps, k=k, weight_decay=decay)
    updates, state = _run(optimiser, grads, curvatures)
    expected = []
    m = {key: 0.0 for key in SHAPES}
    h = {key: 0.0 for key in SHAPES}
    for t, (g, d) in enumerate(zip(grads, curvatures), start=1):
        step = {}
        for key in SHAPES:
            m[key] = b1 * m[key] + (1 - b1) * g[key]
            if t % k == 1 % k:
                h[key] = b2 * h[key] + (1 - b2) * d[key]
            ratio = np.clip(m[key] / np.maximum(gamma * h[key], eps), -1, 1)
            step[key] = -lr * ratio - lr * decay * PARAMS[key]
        expected.append(step)
    _close(updates, expected)
    sophia_state = state[0]
    assert isinstance(sophia_state, cz.optim.SophiaState)
    assert tree_allclose(sophia_state.hessian, jax.tree.map(jnp.asarray, h), rtol=1e-12)
    # Negative curvature and tiny steps both occur, so the clip is tested both ways.
    ratios = [np.abs(u["w"] + lr * decay * PARAMS["w"]) for u in updates]
    assert np.isclose(np.max(ratios), lr) and np.min(ratios) < 0.5 * lr


# ## Both routes, on a tiny float64 MLP


def _problem(key=jr.key(0)):
    k_model, k_x, k_y = jr.split(key, 3)
    model = cz.MLP(2, 2, 3, 1, key=k_model)
    x = jr.normal(k_x, (5, 2))
    y = jr.randint(k_y, (5,), 0, 2)
    return model, (x, y)


LOSS = cz.losses.cross_entropy

# (optimiser, how `curvzoo` computes the same curvature from a model, batch and key)
ROUTES = {
    "newton": (
        lambda **kw: cz.optim.diagonal_newton(0.1, b1=0.5, b2=0.5, **kw),
        lambda model, batch, key, spec: cz.hessian_diagonal(model, LOSS, batch, filter_spec=spec),
    ),
    "adahessian": (
        lambda **kw: cz.optim.adahessian(0.1, num_probes=2, **kw),
        lambda model, batch, key, spec: cz.hutchinson_diagonal(
            model, LOSS, batch, key=key, num_probes=2, filter_spec=spec
        ),
    ),
    "sophia-gnb": (
        lambda **kw: cz.optim.sophia(0.1, k=2, gamma=0.5, **kw),
        lambda model, batch, key, spec: cz.fisher_diagonal(
            model, LOSS, batch, key=key, filter_spec=spec
        ),
    ),
    "sophia-ggn": (
        lambda **kw: cz.optim.sophia(0.1, k=2, gamma=0.5, estimator="ggn", **kw),
        lambda model, batch, key, spec: cz.ggn_diagonal(model, LOSS, batch, filter_spec=spec),
    ),
    "sophia-hutchinson": (
        lambda **kw: cz.optim.sophia(
            0.1,
            k=2,
            gamma=0.5,
            estimator="hutchinson",
            curvature_options={"num_probes": 2},
            **kw,
        ),
        lambda model, batch, key, spec: cz.hutchinson_diagonal(
            model, LOSS, batch, key=key, num_probes=2, filter_spec=spec
        ),
    ),
    # estimator objects, as `curvzoo.diagonal` takes them
    "sophia-object-ggn": (
        lambda **kw: cz.optim.sophia(0.1, k=2, gamma=0.5, estimator=cz.GGN(), **kw),
        lambda model, batch, key, spec: cz.ggn_diagonal(model, LOSS, batch, filter_spec=spec),
    ),
    "sophia-object-hutchinson-cv": (
        lambda **kw: cz.optim.sophia(
            0.1, k=2, gamma=0.5, estimator=cz.Hutchinson(2, cz.GGN()), **kw
        ),
        lambda model, batch, key, spec: cz.hutchinson_diagonal(
            model, LOSS, batch, key=key, num_probes=2, control_variate="ggn", filter_spec=spec
        ),
    ),
}


def _train(optimiser, model, batch, *, computed, spec=eqx.is_inexact_array, jit, steps=3):
    """Parameters after `steps` steps: the optimiser computes the curvature itself
    (`computed`), or is given `curvature=` computed here with `ROUTES`' function."""
    diff = lambda m: eqx.filter(m, spec)  # noqa: E731
    state = optimiser.init(diff(model))

    def step(model, state, key, compute=None):
        grads = eqx.filter_grad(lambda d, s: LOSS(eqx.combine(d, s), batch))(
            *eqx.partition(model, spec)
        )
        if compute is None:
            updates, state = optimiser.update(grads, state, model=model, batch=batch, key=key)
        else:
            curvature = compute(model, batch, key, spec)
            updates, state = optimiser.update(grads, state, curvature=curvature)
        return eqx.apply_updates(model, updates), state

    step = eqx.filter_jit(step) if jit else step
    for i in range(steps):
        key = jr.fold_in(jr.key(7), i)
        if computed is True:
            model, state = step(model, state, key)
        else:
            model, state = step(model, state, key, computed)
    return model, state


@pytest.mark.parametrize("name", list(ROUTES))
def test_routes_agree_and_jit(name):
    """The curvature computed by the optimiser (jitted) equals the curvature passed as
    `curvature=` (eager), step after step, and the parameters move."""
    make, compute = ROUTES[name]
    model, batch = _problem()
    by_model, state = _train(make(loss=LOSS), model, batch, computed=True, jit=True)
    by_argument, _ = _train(make(), model, batch, computed=compute, jit=False)
    params = lambda m: eqx.filter(m, eqx.is_inexact_array)  # noqa: E731
    assert tree_allclose(params(by_model), params(by_argument), rtol=1e-10, atol=1e-14)
    assert not tree_allclose(params(by_model), params(model))
    assert int(state[0].count) == 3


@pytest.mark.parametrize("name", ["newton", "sophia-gnb"])
def test_frozen_leaves(name):
    """A leaf without an update (`None`, frozen) gets no curvature and no update; the
    curvature is computed for the trained leaves only."""
    make, compute = ROUTES[name]
    model, batch = _problem()
    spec = jax.tree.map(eqx.is_inexact_array, model)
    spec = eqx.tree_at(lambda s: s.layers[0].weight, spec, False)
    by_model, state = _train(make(loss=LOSS), model, batch, computed=True, spec=spec, jit=True)
    by_argument, _ = _train(make(), model, batch, computed=compute, spec=spec, jit=False)
    assert by_model.layers[0].weight is model.layers[0].weight or jnp.array_equal(
        by_model.layers[0].weight, model.layers[0].weight
    )
    assert state[0].mu.layers[0].weight is None
    params = lambda m: eqx.filter(m, eqx.is_inexact_array)  # noqa: E731
    assert tree_allclose(params(by_model), params(by_argument), rtol=1e-10, atol=1e-14)


def test_state_structure_and_dtypes():
    """NamedTuple states: an int32 step count and moments shaped like the parameters,
    in their dtype even when the curvature is float64; `None` stays `None`."""
    params = {"a": jnp.ones((2, 3), jnp.float32), "frozen": None}
    grads = {"a": jnp.full((2, 3), 0.5, jnp.float32), "frozen": None}
    curvature = {"a": jnp.full((2, 3), 2.0, jnp.float64), "frozen": None}
    transforms = {
        cz.optim.DiagonalNewtonState: cz.optim.scale_by_diagonal_newton(b1=0.9, b2=0.9),
        cz.optim.AdaHessianState: cz.optim.scale_by_adahessian(),
        cz.optim.SophiaState: cz.optim.scale_by_sophia(),
    }
    for state_type, transform in transforms.items():
        state = transform.init(params)
        assert type(state) is state_type
        assert state.count.shape == () and state.count.dtype == jnp.int32
        for moment in state[1:]:
            assert jax.tree.structure(moment) == jax.tree.structure(params)
            assert moment["a"].dtype == jnp.float32 and not moment["a"].any()
        updates, state = jax.jit(transform.update)(grads, state, curvature=curvature)
        assert updates["frozen"] is None and updates["a"].dtype == jnp.float32
        assert int(state.count) == 1
        assert all(moment["a"].dtype == jnp.float32 for moment in state[1:])


def test_other_extra_arguments_are_ignored_in_a_chain():
    optimiser = optax.chain(
        optax.clip_by_global_norm(1.0), cz.optim.scale_by_diagonal_newton(), optax.scale(-1.0)
    )
    params = {"a": jnp.array([1.0, 2.0])}
    updates, _ = optimiser.update(
        {"a": jnp.array([0.3, 0.4])}, optimiser.init(params), params,
        curvature={"a": jnp.array([2.0, -4.0])}, value=jnp.array(1.0),
    )  # fmt: skip
    assert jnp.allclose(updates["a"], -jnp.array([0.3, 0.4]) / (jnp.array([2.0, 4.0]) + 1e-4))


def test_inject_hyperparams():
    """Numeric settings, `k` and the weight decay included, can be injected (they are
    then traced in `update`, and not range-checked there)."""
    optimiser = optax.inject_hyperparams(cz.optim.sophia)(learning_rate=0.1, gamma=0.5, k=2)
    params = {"a": jnp.array([1.0, 2.0])}
    update = jax.jit(optimiser.update)
    state = optimiser.init(params)
    for curvature in (1.0, 1e9):  # the second is not read: no refresh at step 2
        grads = {"a": jnp.array([0.3, -0.4])}
        updates, state = update(grads, state, params, curvature={"a": jnp.full(2, curvature)})
        # h = 0.01 after the first refresh, so |m| / (0.5 h) > 1 and the step is clipped.
        assert jnp.allclose(updates["a"], jnp.array([-0.1, 0.1]))
    assert float(state.hyperparams["gamma"]) == 0.5


# ## Bad inputs

BUILDERS = {
    "newton": cz.optim.diagonal_newton,
    "adahessian": cz.optim.adahessian,
    "sophia": cz.optim.sophia,
}


@pytest.mark.parametrize(
    "name, kwargs, error, argument",
    [
        *[
            (name, {"learning_rate": "fast"}, TypeError, "learning_rate")
            for name in ("newton", "adahessian", "sophia")
        ],
        *[(name, {"b1": 1.0}, ValueError, "b1") for name in ("newton", "adahessian", "sophia")],
        *[(name, {"b2": -0.1}, ValueError, "b2") for name in ("newton", "adahessian", "sophia")],
        *[(name, {"eps": 0.0}, ValueError, "eps") for name in ("newton", "adahessian", "sophia")],
        *[(name, {"eps": True}, TypeError, "eps") for name in ("newton", "adahessian", "sophia")],
        *[(name, {"loss": 3}, TypeError, "loss") for name in ("newton", "adahessian", "sophia")],
        ("newton", {"loss": cz.losses.MSE}, TypeError, "loss"),  # the class, not an instance
        ("newton", {"trust_radius": 0.0}, ValueError, "trust_radius"),
        ("newton", {"trust_radius": "1"}, TypeError, "trust_radius"),
        ("newton", {"b1": float("nan")}, ValueError, "b1"),
        ("adahessian", {"hessian_power": 0.0}, ValueError, "hessian_power"),
        ("adahessian", {"hessian_power": 1.5}, ValueError, "hessian_power"),
        ("adahessian", {"spatial_average": 1}, TypeError, "spatial_average"),
        ("adahessian", {"num_probes": 0}, ValueError, "num_probes"),
        ("adahessian", {"num_probes": 1.0}, TypeError, "num_probes"),
        ("adahessian", {"weight_decay": None}, TypeError, "weight_decay"),
        ("sophia", {"gamma": -1.0}, ValueError, "gamma"),
        ("sophia", {"k": 0}, ValueError, "k"),
        ("sophia", {"k": 2.5}, TypeError, "k"),
        ("sophia", {"estimator": "adam"}, ValueError, "estimator"),
        ("sophia", {"loss": lambda model, batch: 0.0}, TypeError, "estimator='gnb'"),
        ("sophia", {"weight_decay": "0.1"}, TypeError, "weight_decay"),
        ("newton", {"curvature_options": ["memory_budget"]}, TypeError, "curvature_options"),
        ("newton", {"curvature_options": {"filter_spec": None}}, ValueError, "filter_spec"),
        ("adahessian", {"curvature_options": {"key": None}}, ValueError, "key"),
        ("sophia", {"curvature_options": {"num_probes": 3}}, ValueError, "num_probes"),
        ("sophia", {"curvature_options": {"per_sample": True}}, ValueError, "per_sample"),
        ("adahessian", {"curvature_options": {"return_stderr": 1}}, ValueError, "return_stderr"),
        (
            "sophia",
            {"estimator": "hutchinson", "curvature_options": {"num_probes": 0}},
            ValueError,
            "num_probes",
        ),
        ("newton", {"curvature_options": {"chunk": 3}}, ValueError, "chunk"),
        ("sophia", {"estimator": cz.GGN}, ValueError, "estimator"),
        (
            "sophia",
            {"estimator": cz.Hutchinson(2), "curvature_options": {"num_probes": 3}},
            TypeError,
            "curvature_options",
        ),
        (
            "sophia",
            {"estimator": cz.GGN(), "loss": lambda model, batch: 0.0},
            TypeError,
            r"estimator=GGN\(\)",
        ),
    ],
)
def test_bad_settings(name, kwargs, error, argument):
    kwargs = {"learning_rate": 0.1, **kwargs}
    with pytest.raises(error, match=f"`{argument}`"):
        BUILDERS[name](**kwargs)


def _update_args():
    model, batch = _problem()
    grads = eqx.filter_grad(LOSS)(model, batch)
    return model, batch, grads


@pytest.mark.parametrize(
    "name, built_with_loss, extra, error, pattern",
    [
        ("newton", False, {}, TypeError, "pass `curvature=`"),
        ("newton", True, {}, TypeError, "pass `curvature=`"),
        ("newton", True, {"model": "M"}, TypeError, "needs `batch=`"),
        ("newton", True, {"batch": "B"}, TypeError, "needs `model=`"),
        ("newton", False, {"model": "M", "batch": "B"}, TypeError, "built without `loss`"),
        ("newton", True, {"model": "M", "batch": "B", "curvature": "C"}, TypeError, "not both"),
        ("adahessian", True, {"model": "M", "batch": "B"}, TypeError, "needs `key=`"),
        ("sophia", True, {"model": "M", "batch": "B"}, TypeError, "needs `key=`"),
        ("newton", True, {"model": {"a": 1}, "batch": "B"}, TypeError, "`model` must be"),
        ("newton", False, {"curvature": "wrong"}, ValueError, "`curvature` must be a PyTree"),
        ("newton", False, {"curvature": "shape"}, ValueError, r"`curvature`.*it has shape"),
        ("newton", False, {"curvature": "leaf"}, TypeError, r"`curvature`.*holds str"),
        ("newton", True, {"model": "other", "batch": "B"}, ValueError, "`updates` must have"),
    ],
)
def test_bad_update_arguments(name, built_with_loss, extra, error, pattern):
    model, batch, grads = _update_args()
    optimiser = BUILDERS[name](0.1, loss=LOSS if built_with_loss else None)
    state = optimiser.init(eqx.filter(model, eqx.is_inexact_array))
    fill = {
        "M": model,
        "B": batch,
        "C": grads,
        "wrong": {"weight": grads.layers[0].weight},
        "shape": jax.tree.map(lambda g: jnp.zeros(g.shape + (1,)), grads),
        "leaf": jax.tree.map(lambda g: "x", grads),
        "other": cz.MLP(2, 2, 3, 2, key=jr.key(1)),  # `grads` does not fit its structure
    }
    extra = {k: fill.get(v, v) if isinstance(v, str) else v for k, v in extra.items()}
    if name != "newton" and "key" not in extra:
        extra.setdefault("key", None)
    with pytest.raises(error, match=pattern):
        optimiser.update(grads, state, **extra)
