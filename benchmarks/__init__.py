"""Benchmarks of curvzoo, through its public API only.

Run from the repository root: `python -m benchmarks` for every row, `--rows mlp2,gemm`
for some, `--json results.json` to also save the figures. Each row runs in its own
process, so that its peak resident memory (`ru_maxrss`) is its own; within a row, the
compared calls are timed in the same process, as the median of `--repeats` calls after
a warm-up call (compilation excluded), or interleaved over `--rounds` rounds. Models
are float32 with tanh activations and cross-entropy unless a row says otherwise.

`--ab REF` compares a baseline commit with the working tree: each row runs on a
temporary `git worktree` of `REF` and on the working tree, alternately, `--ab-rounds`
times, each run in its own process that imports `curvzoo` from its tree (checked), with
the same benchmark code; one table gives both medians and new/old per figure. Use rows
whose API exists in both trees.

This folder is not part of the installed package.
"""
