"""Summaries of a diagonal PyTree: per leaf, per named group, the trace and the top
entries, as plain data (dicts, lists and floats) and as an aligned table."""

import functools
from typing import Any

import equinox as eqx
import jax
import numpy as np
from jaxtyping import PyTree

from ._estimators import Estimate


def statistics(values: Any) -> dict:
    """Statistics of a set of diagonal entries (any array; flattened).

    **Returns:** a dict with `count`, `median_abs` (median of `|d|`), `max`, `min`,
    `fraction_negative` and `sum`, all Python numbers (`nan` for an empty set).
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.size == 0:
        nan = float("nan")
        return dict(count=0, median_abs=nan, max=nan, min=nan, fraction_negative=nan, sum=0.0)
    return dict(
        count=int(values.size),
        median_abs=float(np.median(np.abs(values))),
        max=float(values.max()),
        min=float(values.min()),
        fraction_negative=float(np.mean(values < 0)),
        sum=float(values.sum()),
    )


@functools.singledispatch
def parameter_groups(model, tree: PyTree) -> dict | None:
    """Named groups of the entries of `tree` (shaped like `model`): a dict from group
    name to a 1-D array, registered per model type (the zoo `RNN` splits its gates);
    `None` for a model type without groups, whose leaves are then the groups."""
    del model, tree
    return None


def _named_leaves(diagonal: PyTree) -> list[tuple[str, np.ndarray]]:
    leaves = jax.tree_util.tree_flatten_with_path(eqx.filter(diagonal, eqx.is_array))[0]
    return [(jax.tree_util.keystr(path), np.asarray(leaf)) for path, leaf in leaves]


def _check_matches(named: list, model: eqx.Module) -> None:
    """Every leaf of the diagonal must sit where `model` has an array of its shape."""
    shapes = {name: leaf.shape for name, leaf in _named_leaves(model)}
    for name, leaf in named:
        if name not in shapes:
            raise ValueError(
                f"`diagonal` has a leaf at `{name}` where `model` has no array; pass the "
                "diagonal of this model (one PyTree shaped like it)."
            )
        if leaf.shape != shapes[name]:
            hint = (
                "; for per-sample diagonals summarise one sample at a time, "
                "`jax.tree.map(lambda d: d[n], diagonal)`"
                if leaf.shape[1:] == shapes[name]
                else ""
            )
            raise ValueError(
                f"`diagonal{name}` has shape {leaf.shape} but `model{name}` has shape "
                f"{shapes[name]}{hint}."
            )


def _check_not_a_pair(diagonal: PyTree) -> None:
    """An `(estimate, stderr)` pair, as `hutchinson_diagonal(..., return_stderr=True)`
    returns, is two diagonals: say so rather than summarising them as one."""
    if isinstance(diagonal, Estimate):
        raise ValueError(
            "`diagonal` is an `Estimate`, a value and its standard error (what "
            "`return_stderr=True` returns); summarise one at a time: "
            "`estimate, stderr = ...; summarize(estimate, model)`, or "
            "`summarize(result.value, model)`."
        )
    if (
        isinstance(diagonal, tuple)
        and len(diagonal) == 2
        and isinstance(diagonal[0], eqx.Module)
        and jax.tree.structure(diagonal[0]) == jax.tree.structure(diagonal[1])
    ):
        raise ValueError(
            "`diagonal` is a pair of two model-shaped trees, like the `(estimate, stderr)` "
            "that `hutchinson_diagonal(..., return_stderr=True)` returns; summarise one at "
            "a time: `estimate, stderr = ...; summarize(estimate, model)`."
        )


def _with_share(stats: dict, trace: float) -> dict:
    # `None` (JSON null) rather than NaN where the trace is zero.
    stats["trace_share"] = stats["sum"] / trace if trace else None
    return stats


def summarize(diagonal: PyTree, model: eqx.Module | None = None, *, top_k: int = 10) -> dict:
    """Summarise a diagonal (or any PyTree of per-parameter numbers) shaped like a model.

    **Arguments:**

    - `diagonal`: the result of a curvature function, such as
        `model.hessian_diagonal(loss, batch)`; `None` leaves (frozen) are skipped.
    - `model`: the model it belongs to (each leaf of `diagonal` must have the shape of
        the model's leaf at the same place, else a `ValueError`). A zoo `RNN` splits
        its stacked gate matrices into named groups (GRU: reset, update, new; LSTM:
        input, forget, cell, output) and kinds (input, recurrent and bias weights of the
        cell, and the readout), via its `parameter_groups` method; without a model, or
        for other models, every leaf is its own group.
    - `top_k`: how many of the largest entries (by absolute value) to list.

    **Returns:** a dict of plain data:

    - `"trace"`: the sum of all entries;
    - `"leaves"`: `{path: stats}` per leaf, with `stats` as in
        [`curvzoo.analysis.statistics`][] plus `"shape"` and `"trace_share"` (the leaf's
        sum over the trace; can be negative or above 1 where entries are negative;
        `None` where the trace is zero);
    - `"groups"`: `{name: stats}` per named group, with `"trace_share"`;
    - `"kinds"`: `{kind: stats}` for the part of each group name before its first dot
        (for an RNN: `input`, `recurrent`, `bias`, `readout`);
    - `"top"`: a list of `{"leaf", "index", "value"}`, the `top_k` largest entries by
        absolute value.

    **Example:**

    ```python
    diag = model.hessian_diagonal(curvzoo.losses.cross_entropy, (x, y))
    summary = curvzoo.analysis.summarize(diag, model)
    print(curvzoo.analysis.format_summary(summary))
    summary["groups"]["recurrent.update"]["median_abs"]
    ```
    """
    _check_not_a_pair(diagonal)
    named = _named_leaves(diagonal)
    if not named:
        raise ValueError("`diagonal` holds no arrays to summarise.")
    if model is not None:
        _check_matches(named, model)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"`top_k` must be an integer >= 0, got {top_k!r}.")
    trace = float(sum(leaf.sum(dtype=np.float64) for _, leaf in named))
    leaves = {}
    for name, leaf in named:
        leaves[name] = _with_share(statistics(leaf), trace)
        leaves[name]["shape"] = tuple(leaf.shape)
    grouped = None if model is None else parameter_groups(model, diagonal)
    if grouped is None:
        grouped = {name.lstrip("."): leaf for name, leaf in named}
    groups = {name: _with_share(statistics(values), trace) for name, values in grouped.items()}
    by_kind: dict[str, list] = {}
    for name, values in grouped.items():
        by_kind.setdefault(name.split(".")[0], []).append(np.asarray(values).reshape(-1))
    kinds = {
        kind: _with_share(statistics(np.concatenate(parts)), trace)
        for kind, parts in by_kind.items()
    }
    flat = [
        (name, index, float(value)) for name, leaf in named for index, value in _top(leaf, top_k)
    ]
    flat.sort(key=lambda item: -abs(item[2]))
    top = [dict(leaf=name, index=index, value=value) for name, index, value in flat[:top_k]]
    return dict(trace=trace, leaves=leaves, groups=groups, kinds=kinds, top=top)


def trace(diagonal: PyTree, model: eqx.Module | None = None) -> dict:
    """The exact trace of a curvature matrix from its exact diagonal, in total and split
    by leaf, by group and by kind as [`curvzoo.analysis.summarize`][] splits it.

    The trace of the Hessian is the sum of its eigenvalues and of its diagonal, so
    `trace(curvzoo.hessian_diagonal(model, loss, batch), model)` is exact, where
    [`curvzoo.hessian_trace`][] estimates it from products (for models whose diagonal
    is costly).

    **Arguments:**

    - `diagonal`: a diagonal shaped like a model, such as the result of
        [`curvzoo.hessian_diagonal`][] or [`curvzoo.ggn_diagonal`][]; `None` leaves
        (frozen) are skipped.
    - `model`: the model it belongs to, for the named groups of a zoo `RNN` (its gates
        and kinds of weight) and the shape check of [`curvzoo.analysis.summarize`][];
        without it every leaf is its own group.

    **Returns:** a dict of floats: `"total"`, the trace; `"leaves"`, `{path: trace of
    that leaf's diagonal block}`; `"groups"`, `{name: trace}` per named group; `"kinds"`,
    `{kind: trace}` (for an RNN: `input`, `recurrent`, `bias`, `readout`). The parts of
    each split add up to the total.

    **Example:**

    ```python
    traces = curvzoo.analysis.trace(model.hessian_diagonal(loss, batch), model)
    traces["total"], traces["groups"]["recurrent.update"]
    ```
    """
    summary = summarize(diagonal, model, top_k=0)
    return dict(
        total=summary["trace"],
        **{
            part: {name: stats["sum"] for name, stats in summary[part].items()}
            for part in ("leaves", "groups", "kinds")
        },
    )


def _top(leaf: np.ndarray, k: int):
    """The `k` entries of `leaf` with the largest absolute values, as `(index, value)`."""
    if k == 0 or leaf.size == 0:
        return []
    flat = leaf.reshape(-1)
    k = min(k, flat.size)
    order = np.argpartition(-np.abs(flat), k - 1)[:k]
    return [(tuple(int(i) for i in np.unravel_index(j, leaf.shape)), flat[j]) for j in order]


_COLUMNS = (  # (label, key, width, format)
    ("count", "count", 8, "d"),
    ("median |d|", "median_abs", 12, ".3e"),
    ("max", "max", 12, ".3e"),
    ("min", "min", 12, ".3e"),
    ("neg frac", "fraction_negative", 9, ".3f"),
    ("trace share", "trace_share", 12, ".4f"),
)


def _table(title: str, rows: dict) -> list[str]:
    width = max([len(title)] + [len(name) for name in rows]) + 2
    header = f"{title:<{width}}" + "".join(f"{label:>{w}}" for label, _, w, _ in _COLUMNS)
    lines = [header, "-" * len(header)]
    for name, stats in rows.items():
        cells = "".join(
            f"{stats[key]:>{w}{spec}}" if stats[key] is not None else f"{'-':>{w}}"
            for _, key, w, spec in _COLUMNS
        )
        lines.append(f"{name:<{width}}{cells}")
    return lines


def format_summary(summary: dict, *, leaves: bool = False) -> str:
    """An aligned text table of a [`curvzoo.analysis.summarize`][] result: the trace,
    the groups, the kinds (where there is more than one), optionally every leaf, and
    the top entries."""
    lines = [f"trace {summary['trace']:.6g}", ""]
    lines += _table("group", summary["groups"])
    if len(summary["kinds"]) > 1 and summary["kinds"].keys() != summary["groups"].keys():
        lines += [""] + _table("kind", summary["kinds"])
    if leaves:
        lines += [""] + _table("leaf", summary["leaves"])
    if summary["top"]:
        lines += ["", "largest entries (by |d|):"]
        for entry in summary["top"]:
            lines.append(f"  {entry['leaf']}{list(entry['index'])}  {entry['value']:.4e}")
    return "\n".join(lines)
