"""The rows, one module per family. Each module has `ROWS`, `SUMMARY` (a line per row),
`measure(row, options)` (run in a worker process) and `headline(result)` (the figures an
A/B run compares)."""

from . import (
    family,
    gemm,
    interface,
    kernels,
    memory,
    overhead,
    plans,
    ratios,
    recurrent,
    scaling,
    spectral,
)


_MODULES = (
    kernels,
    scaling,
    family,
    memory,
    overhead,
    ratios,
    gemm,
    interface,
    recurrent,
    spectral,
    plans,
)
ROWS = tuple(row for module in _MODULES for row in module.ROWS)


def _module(row: str):
    for module in _MODULES:
        if row in module.ROWS:
            return module
    raise ValueError(f"unknown row {row!r}; rows are {', '.join(ROWS)}")


def measure(row: str, options) -> dict:
    """Measure `row` in this process; the figures as a JSON-ready dict."""
    return _module(row).measure(row, options)


def headline(result: dict) -> list[tuple[str, float, str]]:
    """`(label, value, unit)` for the main figures of a row's result."""
    return _module(result["row"]).headline(result)


def summary(row: str) -> str:
    """One line on what the row measures and its target (for `--help`)."""
    return _module(row).SUMMARY[row]
