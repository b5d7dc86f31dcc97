"""Summaries of diagonal PyTrees: per leaf, per named group (an RNN's gates), the trace
and the largest entries, as plain data and as aligned tables."""

from ._analysis import (
    format_summary as format_summary,
    statistics as statistics,
    summarize as summarize,
    trace as trace,
)
