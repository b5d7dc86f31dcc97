"""Every option path against an independent reference, with sizes whose chunks pad.

Every kernel runs its lanes (samples, basis vectors, probes) through one chunked loop
that pads the last chunk by repeating lane 0 with mask 0. A sum that ignores the mask, a
stack that keeps the padded rows, or an index shifted by one only shows when the chunks
pad, so each test here picks sizes whose chunks do (5 samples or probes in chunks of 2:
three chunks, one padded lane; the MLP's 31 trained entries in chunks of 7 basis vectors:
five chunks, four padded lanes), asserts with `curvzoo.plan` that they do, and checks the
values, with two leaves frozen, against the references of `helpers.py` (float64,
`rtol=1e-10`).
"""

import curvzoo as cz
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from .helpers import (
    assert_diagonal_close,
    BATCH_SIZE,
    flat,
    make_batch,
    reference_ggn_diagonal,
    reference_hessian_diagonal,
    reference_hutchinson,
    reference_per_sample_ggn_diagonal,
    reference_per_sample_hessian_diagonal,
    reference_squared_gradients,
)


CE = cz.losses.cross_entropy
CHUNK = 2  # samples or probes per chunk: 5 = 2 + 2 + (1 and a padded lane)
BASIS_CHUNK = 7  # basis vectors per chunk of the generic kernel
NUM_PROBES = 5


class ArgminCE(cz.losses.CrossEntropy):
    """Cross-entropy whose "draws" are the least likely class: the Fisher then has a
    deterministic value, `scale * sum_n g_n(argmin f_n)^2`, to check to rounding."""

    def sample_targets(self, key, prediction):
        del key
        return jnp.argmin(prediction, axis=-1)


def _frozen(model, where):
    spec = jax.tree.map(eqx.is_inexact_array, model)
    return eqx.tree_at(where, spec, replace_fn=lambda _: False)


# The models (shapes shared with the rest of the suite) and a spec that freezes two of
# their leaves, so that every check also covers frozen leaves (`None` in the result).
MODELS = {
    "mlp": (
        lambda: cz.MLP(3, 3, 4, 2, key=jr.key(11)),
        lambda m: (m.layers[1].weight, m.layers[0].bias),
    ),
    "gru": (
        lambda: cz.RNN(2, 3, 3, "gru", "last", key=jr.key(12)),
        lambda m: (m.cell.weight_hh, m.head.bias),
    ),
    "cnn": (
        lambda: cz.CNN(1, 3, 10, channels=(2, 2), key=jr.key(13)),
        lambda m: (m.convs[0].bias, m.head.bias),
    ),
}


def _setup(name, loss_name="ce"):
    make, where = MODELS[name]
    model = make()
    return model, make_batch(model, loss_name, 7), _frozen(model, where)


def _assert_pads(plan, lanes, count):
    """The plan runs `count` lanes in several chunks, the last of them padded."""
    assert plan.lanes == lanes
    assert plan.num_chunks > 1, plan
    assert plan.num_chunks * plan.chunk > count, plan


def _assert_frozen_are_none(result, where):
    is_none = jax.tree.map(lambda x: x is None, result, is_leaf=lambda x: x is None)
    assert all(jax.tree.leaves(where(is_none))), "a frozen leaf has a value"


# ## Sums over lanes: (quantity, model, method, the kernel it takes). The GGN family's
# `method="generic"` is its vector-Jacobian-product kernel.

SUMS = {
    "hessian-layered-mlp": ("hessian", "mlp", "structured", "layered"),
    "hessian-layered-cnn": ("hessian", "cnn", "structured", "layered"),
    "hessian-recurrent": ("hessian", "gru", "structured", "recurrent"),
    "hessian-generic": ("hessian", "mlp", "generic", "generic"),
    "ggn-layered": ("ggn", "mlp", "auto", "layered"),
    "ggn-recurrent": ("ggn", "gru", "structured", "recurrent"),
    "ggn-vjp": ("ggn", "gru", "generic", "vjp"),
    "empirical-fisher-layered": ("empirical_fisher", "mlp", "auto", "layered"),
    "empirical-fisher-vjp": ("empirical_fisher", "gru", "generic", "vjp"),
    "fisher-layered": ("fisher", "mlp", "auto", "layered"),
    "fisher-vjp": ("fisher", "gru", "generic", "vjp"),
}


def _call(quantity, model, loss, batch, **kwargs):
    if quantity == "hessian":
        return cz.hessian_diagonal(model, loss, batch, **kwargs)
    if quantity == "ggn":
        return cz.ggn_diagonal(model, loss, batch, **kwargs)
    if quantity == "empirical_fisher":
        return cz.empirical_fisher_diagonal(model, loss, batch, **kwargs)
    kwargs.pop("per_sample", None)
    return cz.fisher_diagonal(model, loss, batch, key=jr.key(0), num_samples=2, **kwargs)


def _plan(quantity, model, loss, batch, **kwargs):
    if quantity == "fisher":
        kwargs["num_samples"] = 2
    return cz.plan(model, loss, batch, quantity=quantity, **kwargs)


@eqx.filter_jit
def _least_likely(model, inputs):
    return jnp.argmin(jax.vmap(model)(inputs), axis=-1)


def _reference(quantity, model, loss, batch, spec, per_sample=False):
    if quantity == "hessian":
        if per_sample:
            return reference_per_sample_hessian_diagonal(model, loss, batch, spec)
        return reference_hessian_diagonal(model, loss, batch, spec)
    if quantity == "ggn":
        if per_sample:
            return reference_per_sample_ggn_diagonal(model, loss, batch, spec)
        return reference_ggn_diagonal(model, loss, batch, spec)
    if quantity == "fisher":  # the draws of `ArgminCE` are the least likely classes
        batch = (batch[0], _least_likely(model, batch[0]))
    squared = reference_squared_gradients(model, loss, batch, spec)
    prediction_shape = jax.eval_shape(jax.vmap(model), batch[0]).shape
    size = 1 if per_sample else prediction_shape[0]
    scale = loss.scale(size, prediction_shape[1:])
    if per_sample:
        return jax.tree.map(lambda leaf: scale * np.asarray(leaf), squared)
    return jax.tree.map(lambda leaf: scale * np.asarray(leaf).sum(0), squared)


def _loss(quantity):
    return ArgminCE() if quantity == "fisher" else CE


@pytest.mark.parametrize("name", list(SUMS))
def test_chunk_size_that_pads(name):
    """A sum over padded chunks (each chunk's lanes weighted by the mask, or, for the
    generic kernel, stacked and the padded lanes dropped) equals the reference."""
    quantity, model_name, method, kernel = SUMS[name]
    model, batch, spec = _setup(model_name)
    loss = _loss(quantity)
    chunk = BASIS_CHUNK if kernel == "generic" else CHUNK
    options = dict(method=method, chunk_size=chunk, filter_spec=spec)
    plan = _plan(quantity, model, loss, batch, **options)
    assert plan.kernel == kernel
    if kernel == "generic":
        _assert_pads(plan, "basis vectors", plan.num_params)
    else:
        _assert_pads(plan, "samples", BATCH_SIZE)
    result = _call(quantity, model, loss, batch, **options)
    _assert_frozen_are_none(result, MODELS[model_name][1])
    assert_diagonal_close(result, _reference(quantity, model, loss, batch, spec))


# ## Per-sample diagonals: every row real, none padded

PER_SAMPLE = {
    "hessian-layered": ("hessian", "mlp", "structured", "layered"),
    "hessian-recurrent": ("hessian", "gru", "structured", "recurrent"),
    "hessian-generic": ("hessian", "mlp", "generic", "generic"),
    "ggn-layered": ("ggn", "mlp", "auto", "layered"),
    "ggn-recurrent": ("ggn", "gru", "structured", "recurrent"),
    "ggn-vjp": ("ggn", "gru", "generic", "vjp"),
    "empirical-fisher-layered": ("empirical_fisher", "mlp", "auto", "layered"),
    "empirical-fisher-vjp": ("empirical_fisher", "gru", "generic", "vjp"),
}


@pytest.mark.parametrize("name", list(PER_SAMPLE))
def test_per_sample_with_chunks_that_pad(name):
    """`per_sample=True` stacks the chunks' rows and must drop the padded ones: exactly
    `N` rows, row `n` the diagonal of sample `n` alone."""
    quantity, model_name, method, kernel = PER_SAMPLE[name]
    model, batch, spec = _setup(model_name)
    options = dict(method=method, chunk_size=CHUNK, filter_spec=spec, per_sample=True)
    plan = _plan(quantity, model, CE, batch, **options)
    assert plan.kernel == kernel
    if kernel == "generic":  # each sample's basis vectors in chunks of 2
        _assert_pads(plan, "basis vectors", plan.num_params)
    else:
        _assert_pads(plan, "samples", BATCH_SIZE)
    result = _call(quantity, model, CE, batch, **options)
    for leaf, param in zip(jax.tree.leaves(result), jax.tree.leaves(eqx.filter(model, spec))):
        assert leaf.shape == (BATCH_SIZE, *param.shape)
    _assert_frozen_are_none(result, MODELS[model_name][1])
    expected = _reference(quantity, model, CE, batch, spec, per_sample=True)
    assert_diagonal_close(result, expected)


# ## `memory_budget` sets the chunk


def _budget_of(lanes, quantity, model, loss, batch, **options) -> int:
    """A budget for a chunk of `lanes` lanes: a chunk's fixed working memory and the
    lanes', from the plans of chunks of one and of two lanes (half a lane to spare)."""
    one = _plan(quantity, model, loss, batch, chunk_size=1, **options)
    two = _plan(quantity, model, loss, batch, chunk_size=2, **options).memory_bytes
    lane = two - one.memory_bytes
    assert lane > 0
    return one.memory_bytes - one.shared_bytes + (lanes - 1) * lane + lane // 2


BUDGETS = {
    "hessian-layered": ("hessian", "mlp", "structured", "layered", CHUNK),
    "hessian-recurrent": ("hessian", "gru", "structured", "recurrent", CHUNK),
    "hessian-generic": ("hessian", "mlp", "generic", "generic", BASIS_CHUNK),
    "ggn-recurrent": ("ggn", "gru", "structured", "recurrent", CHUNK),
    "ggn-vjp": ("ggn", "gru", "generic", "vjp", CHUNK),
}


@pytest.mark.parametrize("name", list(BUDGETS))
def test_memory_budget_that_pads(name):
    """A budget of `k` lanes' working memory gives chunks of `k` lanes, padded at the
    end, and the same numbers as the reference."""
    quantity, model_name, method, kernel, lanes = BUDGETS[name]
    model, batch, spec = _setup(model_name)
    options = dict(method=method, filter_spec=spec)
    budget = _budget_of(lanes, quantity, model, CE, batch, **options)
    plan = _plan(quantity, model, CE, batch, memory_budget=budget, **options)
    assert plan.kernel == kernel
    # The chunk's working set, counted on the chunk as it runs, is within the budget. A
    # chunk of vmapped basis vectors grows a little faster than linearly at this tiny
    # size, so the generic kernel may take one lane fewer than the extrapolation.
    assert plan.memory_bytes - plan.shared_bytes <= budget
    assert plan.chunk == lanes or (kernel == "generic" and plan.chunk == lanes - 1)
    count = plan.num_params if kernel == "generic" else BATCH_SIZE
    _assert_pads(plan, "basis vectors" if kernel == "generic" else "samples", count)
    result = _call(quantity, model, CE, batch, memory_budget=budget, **options)
    assert_diagonal_close(result, _reference(quantity, model, CE, batch, spec))


# ## Hutchinson: probes in padded chunks, frozen leaves, the control variate


@pytest.mark.parametrize(
    "model_name,control_variate", [("mlp", None), ("mlp", "ggn"), ("gru", "ggn")]
)
def test_hutchinson_against_the_hand_written_estimate(model_name, control_variate):
    """Five probes in chunks of two (Chan's merge of the chunks' statistics must skip the
    padded probe), two leaves frozen; with the control variate, the exact GGN's samples
    in chunks of two as well (set by `memory_budget`). The estimate and its standard
    error equal the hand-written ones with the same probes."""
    model, batch, spec = _setup(model_name)
    key = jr.key(3)
    options = dict(
        key=key, num_probes=NUM_PROBES, chunk_size=CHUNK, control_variate=control_variate,
        filter_spec=spec,
    )  # fmt: skip
    plan_options = {k: v for k, v in options.items() if k != "key"}
    if control_variate is not None:
        # The GGN's kernel and chunk are not public fields of the plan; its route holds
        # them. The budget is that of two of that kernel's samples.
        route = cz.plan(model, CE, batch, quantity="hutchinson", **plan_options).route
        method = "generic" if route.ggn.name == "vjp" else "structured"
        budget = _budget_of(CHUNK, "ggn", model, CE, batch, filter_spec=spec, method=method)
        options["memory_budget"] = plan_options["memory_budget"] = budget
    plan = cz.plan(model, CE, batch, quantity="hutchinson", **plan_options)
    _assert_pads(plan, "probes", NUM_PROBES)
    if control_variate is not None:
        assert plan.route.ggn_chunk == CHUNK
    estimate, stderr = cz.hutchinson_diagonal(model, CE, batch, return_stderr=True, **options)
    _assert_frozen_are_none(estimate, MODELS[model_name][1])
    expected, expected_stderr = reference_hutchinson(
        model, CE, batch, key=key, num_probes=NUM_PROBES, filter_spec=spec,
        control_variate=control_variate,
    )  # fmt: skip
    assert_diagonal_close(estimate, expected)
    assert_diagonal_close(stderr, expected_stderr)
    # The probes do not depend on the chunk: one chunk of all five gives the same.
    whole = cz.hutchinson_diagonal(
        model, CE, batch, **{**options, "chunk_size": NUM_PROBES, "memory_budget": None}
    )
    np.testing.assert_allclose(flat(whole), flat(estimate), rtol=1e-12, atol=1e-14)
