"""`progress=True`: a progress line on standard error, and the same result as without."""

import curvzoo as cz
import jax
import jax.random as jr
import pytest

from .helpers import make_batch, tree_allclose


CALLS = {
    "generic": (
        lambda m, b, **kw: cz.hessian_diagonal(
            m, cz.losses.cross_entropy, b, method="generic", chunk_size=7, **kw
        ),
        "Hessian diagonal (generic): chunks of entries",
    ),
    "structured": (
        lambda m, b, **kw: cz.hessian_diagonal(
            m, cz.losses.cross_entropy, b, method="structured", chunk_size=2, **kw
        ),
        "structured kernel: chunks of samples",
    ),
    "hutchinson": (
        lambda m, b, **kw: cz.hutchinson_diagonal(
            m, cz.losses.cross_entropy, b, key=jr.key(0), num_probes=5, chunk_size=2, **kw
        ),
        "Hutchinson: chunks of probes",
    ),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_progress_line(name, capsys, getkey, monkeypatch):
    from curvzoo._run import _progress

    monkeypatch.setattr(_progress, "_tqdm", lambda: None)  # the line, not a tqdm bar
    call, label = CALLS[name]
    model = cz.MLP(3, 3, 4, 1, key=getkey())
    batch = make_batch(model, "ce", getkey())
    quiet = call(model, batch)
    jax.effects_barrier()
    assert capsys.readouterr().err == ""
    loud = call(model, batch, progress=True)
    jax.effects_barrier()
    err = capsys.readouterr().err
    assert tree_allclose(loud, quiet, rtol=0)
    entries = sum(leaf.size for leaf in jax.tree.leaves(quiet))
    # chunks of 7 entries, of 2 of the 5 samples, of 2 of the 5 probes
    total = {"generic": -(-entries // 7), "structured": 3, "hutchinson": 3}[name]
    assert f"{label}: {total}/{total} (100.0%)" in err
    assert err.endswith("\n")


def test_progress_must_be_a_bool(getkey):
    model = cz.MLP(3, 3, 4, 1, key=getkey())
    with pytest.raises(TypeError, match="`progress` must be True or False"):
        cz.ggn_diagonal(
            model, cz.losses.cross_entropy, make_batch(model, "ce", getkey()), progress=1
        )
