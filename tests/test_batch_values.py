"""Every function that takes a curvzoo loss's batch checks its values the same way,
eagerly, with the loss's own error: lengths in `[1, T]`, token ids in
`[0, vocab_size)`, lengths as an array. (Before, only the loss itself and
`time_step_curvature` checked lengths, and nothing checked token ids: the diagonals
and the spectral tools returned numbers of no model, 3% to 80% off.) And the relation
of the batch's diagonal to the per-sample ones with lengths: a length-weighted mean."""

import curvzoo as cz
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from .helpers import tree_allclose


STEPS, VOCAB = 5, 7
_KEY = jr.key(3)
_MODEL = cz.RNN(3, 4, 3, "gru", readout="all", vocab_size=VOCAB, key=jr.key(0))
_TOKENS = jr.randint(jr.key(1), (4, STEPS), 0, VOCAB)
_TARGETS = jr.randint(jr.key(2), (4, STEPS), 0, 3)
_CE = cz.losses.cross_entropy

# Every public function that takes `(model, loss, batch)`, called as a user would.
FUNCTIONS = {
    "hessian_diagonal": lambda b: cz.hessian_diagonal(_MODEL, _CE, b),
    "hessian_diagonal(generic)": lambda b: cz.hessian_diagonal(_MODEL, _CE, b, method="generic"),
    "per_sample": lambda b: cz.hessian_diagonal(_MODEL, _CE, b, per_sample=True),
    "method": lambda b: _MODEL.hessian_diagonal(_CE, b),
    "ggn_diagonal": lambda b: cz.ggn_diagonal(_MODEL, _CE, b),
    "empirical_fisher_diagonal": lambda b: cz.empirical_fisher_diagonal(_MODEL, _CE, b),
    "fisher_diagonal": lambda b: cz.fisher_diagonal(_MODEL, _CE, b, key=_KEY),
    "hutchinson_diagonal": lambda b: cz.hutchinson_diagonal(
        _MODEL, _CE, b, key=_KEY, num_probes=2, control_variate="ggn"
    ),
    "plan": lambda b: cz.plan(_MODEL, _CE, b),
    "time_step_curvature": lambda b: cz.time_step_curvature(_MODEL, _CE, b),
    "hessian_eigenvalues": lambda b: cz.hessian_eigenvalues(_MODEL, _CE, b, key=_KEY),
    "hessian_trace": lambda b: cz.hessian_trace(_MODEL, _CE, b, key=_KEY, num_matvecs=6),
    "spectral_density": lambda b: cz.spectral_density(_MODEL, _CE, b, key=_KEY, num_matvecs=6),
    "hessian_operator": lambda b: cz.hessian_operator(_MODEL, _CE, b),
    "ggn_operator": lambda b: cz.ggn_operator(_MODEL, _CE, b),
    "loss": lambda b: _CE(_MODEL, b),
}

BAD = {
    "too long": ((_TOKENS, _TARGETS, jnp.array([6, 3, 2, 1])), ValueError, r"lie in \[1, 5\]"),
    "far too long": ((_TOKENS, _TARGETS, jnp.array([50, 3, 2, 1])), ValueError, r"\[1, 5\]"),
    "zero": ((_TOKENS, _TARGETS, jnp.array([0, 3, 2, 1])), ValueError, r"lie in \[1, 5\]"),
    "negative": ((_TOKENS, _TARGETS, jnp.array([-1, 3, 2, 1])), ValueError, r"lie in \[1, 5\]"),
    "a list": ((_TOKENS, _TARGETS, [5, 3, 2, 1]), TypeError, r"jnp.asarray\(lengths\)"),
    "token 9": ((_TOKENS.at[0, 0].set(9), _TARGETS), ValueError, r"token ids must lie in \[0, 7\)"),
    "token -1": ((_TOKENS.at[2, 4].set(-1), _TARGETS), ValueError, r"token ids must lie in"),
    "token 9 with lengths": (
        (_TOKENS.at[1, 1].set(9), _TARGETS, jnp.array([5, 3, 2, 1])),
        ValueError,
        "token ids",
    ),
}


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("function", FUNCTIONS)
def test_bad_batch_values_raise_everywhere(function, bad):
    batch, error, match = BAD[bad]
    with pytest.raises(error, match=match):
        jax.block_until_ready(FUNCTIONS[function](batch))


def test_checked_again_after_a_good_call():
    """A good batch's arrays are remembered; a new bad one is still caught."""
    good = (_TOKENS, _TARGETS, jnp.array([5, 3, 2, 1]))
    cz.ggn_diagonal(_MODEL, _CE, good)
    cz.ggn_diagonal(_MODEL, _CE, good)
    with pytest.raises(ValueError, match="lie in"):
        cz.ggn_diagonal(_MODEL, _CE, (_TOKENS, _TARGETS, jnp.array([5, 3, 2, 6])))
    with pytest.raises(ValueError, match="token ids"):
        cz.ggn_diagonal(_MODEL, _CE, (_TOKENS.at[3, 3].set(7), _TARGETS, good[2]))


def test_padded_token_ids_are_still_checked():
    """Token ids at padded steps must also be valid ids: the model reads them (the
    state after the length is not used, but the embedding lookup happens)."""
    tokens = _TOKENS.at[3, 4].set(VOCAB)  # sequence 3 has length 1: step 4 is padding
    with pytest.raises(ValueError, match="token ids"):
        cz.hessian_diagonal(_MODEL, _CE, (tokens, _TARGETS, jnp.array([5, 3, 2, 1])))


@pytest.mark.parametrize("readout", ["all", "last"])
def test_batch_diagonal_is_the_length_weighted_mean_of_the_per_sample_ones(readout):
    """With `reduction="mean"` and a per-step readout, the loss is the mean over valid
    steps, so the batch's diagonal is `sum_n (length_n / sum(lengths)) * d_n`, with `d_n`
    sequence n's own (per-sample) diagonal; with a last-state readout every sequence
    has one term and it is the plain mean."""
    model = cz.RNN(3, 4, 3, "gru", readout=readout, vocab_size=VOCAB, key=jr.key(4))
    lengths = jnp.array([5, 3, 2, 1])
    targets = _TARGETS if readout == "all" else _TARGETS[:, 0]
    batch = (_TOKENS, targets, lengths)
    functions = (cz.hessian_diagonal, cz.ggn_diagonal, cz.empirical_fisher_diagonal)
    for function in functions if readout == "all" else functions[:1]:
        whole = function(model, _CE, batch)
        each = function(model, _CE, batch, per_sample=True)
        n = np.asarray(lengths, float)
        weights = n / n.sum() if readout == "all" else np.full(4, 0.25)
        weighted = jax.tree.map(lambda d: jnp.tensordot(jnp.asarray(weights), d, axes=1), each)
        assert tree_allclose(whole, weighted, rtol=1e-10)
        if readout == "all":  # the plain mean is not it (the docs said so before)
            plain = jax.tree.map(lambda d: jnp.mean(d, axis=0), each)
            assert not tree_allclose(whole, plain, rtol=1e-3)
