"""The progress display: a `tqdm` bar when tqdm is installed, else one line rewritten at
most four times a second; either way the result is the same, bit for bit."""

import io

import curvzoo as cz
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from curvzoo._run import _progress

from .helpers import tree_allclose


RNG = np.random.default_rng(3)
MODEL = cz.MLP(3, 3, 4, 1, key=jax.random.key(0))
BATCH = (jnp.asarray(RNG.normal(size=(5, 3))), jnp.asarray(RNG.integers(0, 3, size=5)))


def _generic(**kwargs):
    return cz.hessian_diagonal(
        MODEL, cz.losses.cross_entropy, BATCH, method="generic", chunk_size=2, **kwargs
    )


def test_tqdm_bar(capsys):
    pytest.importorskip("tqdm")
    quiet = _generic()
    jax.effects_barrier()
    capsys.readouterr()
    loud = _generic(progress=True)
    jax.effects_barrier()
    err = capsys.readouterr().err
    assert tree_allclose(loud, quiet, rtol=0)
    chunks = cz.plan(MODEL, cz.losses.cross_entropy, BATCH, method="generic", chunk_size=2)
    assert f"{chunks.num_chunks}/{chunks.num_chunks}" in err and "100%" in err


def test_the_line_is_throttled(monkeypatch):
    """However many chunks, the line is written a few times a second at most: at most
    one write per interval, plus the first and the last."""
    stream = io.StringIO()
    monkeypatch.setattr(_progress.sys, "stderr", stream)
    monkeypatch.setattr(_progress, "_tqdm", lambda: None)
    clock = iter(np.arange(0.0, 10.0, 0.001))  # 1 ms per chunk
    monkeypatch.setattr(_progress.time, "perf_counter", lambda: float(next(clock)))
    for index in range(2000):
        _progress._show("chunks", np.asarray(index), 2000)
    writes = stream.getvalue().count("\r")
    assert writes <= 2000 * 0.001 / _progress.INTERVAL + 2
    assert stream.getvalue().endswith("\n") and "2000/2000 (100.0%)" in stream.getvalue()
    assert "s left" in stream.getvalue()
