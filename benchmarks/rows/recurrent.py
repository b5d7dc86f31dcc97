"""Rows of the recurrent kernel at the machine's rate, and of a stacked token model.

- `rate-gru`: GRU, input 8, hidden 128, T = 32, batch 16, 10 classes on the last state;
- `rate-lstm`: LSTM, input 8, hidden 64 (state `n = 128`), T = 32, batch 16, 10 classes;
- `rate-main`: the main job's shape, GRU, input 2, hidden 64, T = 25, batch 128, one
  output (MSE), as in `recipes/rnn_curvature.py`.

  Each times the exact Hessian diagonal (`method="structured"`, the median of `--repeats`
  calls after a warm-up call; compilation, timed separately, excluded) and counts its
  useful work once, whatever the scheme: the impulse responses of every source step to
  every later step, `T^2 / 2` pairs of `n^3` multiply-adds per sample, which is
  `N T^2 n^3` floating-point operations (`n` the state size: `H`, or `2H` for the LSTM).
  Beside it, in the same process, the rate of a batched matrix product of `N` `(n x n)`
  by `(n x T n)` matrices (`benchmarks.gemm.batched_gemm_rate`). Target: the kernel's
  rate at least half the product's.
- `stacked-lm`: the main job's language model, a 2-layer GRU over character tokens
  (embedding 16, hidden 64, 96 classes at every step), 32 sequences of lengths 16 to 32
  padded to T = 32: the structured kernel against the generic kernel, whose time is
  extrapolated from a timed prefix of its Hessian-vector products as in the `scaling`
  row; and, for the cost of depth, a 1-layer GRU of hidden 128 on the same tokens (one
  flat state of the two layers' size). Reported.
"""

import equinox as eqx
import jax
import jax.random as jr

from ..cases import RATE_SHAPES  # (cell, input, hidden, steps, batch, outputs)
from ..gemm import batched_gemm_rate
from ..hvp import hvp_diagonal_prefix, kernel_chunk
from ..models import num_params
from ..options import Options
from ..timing import device_kind, median_seconds


ROWS = ("rate-gru", "rate-lstm", "rate-main", "stacked-lm")
SUMMARY = {
    "rate-gru": "recurrent kernel, GRU H=128 T=32 N=16: N T^2 n^3 flops against the batched "
    "GEMM rate (target >= 50%)",
    "rate-lstm": "recurrent kernel, LSTM H=64 (n=128) T=32 N=16, against the batched GEMM rate "
    "(target >= 50%)",
    "rate-main": "recurrent kernel, the main job's GRU H=64 T=25 N=128, against the batched GEMM "
    "rate (target >= 50%)",
    "stacked-lm": "2-layer GRU token model with lengths: structured vs generic (extrapolated); "
    "1-layer H=128 beside it (slow: a minute)",
}
RATE_TARGET = 0.5
GEMM_REPEATS = 20
LM = dict(vocab=96, embedding=16, hidden=64, steps=32, batch=32, min_length=16)
GENERIC_BASIS = 512


def _timed_first(fn) -> float:
    import time

    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def rate(row: str, options: Options) -> dict:
    import curvzoo as cz

    cell, inputs, hidden, steps, size, outputs = RATE_SHAPES[row]
    key_model, key_x, key_y = jr.split(jr.key(options.seed), 3)
    model = cz.RNN(inputs, hidden, outputs, cell, key=key_model)
    x = jr.normal(key_x, (size, steps, inputs), dtype="float32")
    if outputs == 1:
        loss, y = cz.losses.mse, jr.normal(key_y, (size, 1), dtype="float32")
    else:
        loss, y = cz.losses.cross_entropy, jr.randint(key_y, (size,), 0, outputs)

    def call():
        return model.hessian_diagonal(loss, (x, y), method="structured")

    n = hidden * (2 if cell == "lstm" else 1)
    first = _timed_first(call)
    seconds = median_seconds(call, options.repeats)
    useful = size * steps**2 * n**3
    gemm = batched_gemm_rate(n, steps, size, repeats=GEMM_REPEATS, seed=options.seed)
    kernel_rate = useful / seconds / 1e9
    fraction = kernel_rate / gemm
    return {
        "row": row,
        "cell": cell,
        "hidden": hidden,
        "n": n,
        "steps": steps,
        "batch": size,
        "params": num_params(model),
        "first_call_s": first,
        "structured_s": seconds,
        "useful_flops": useful,
        "kernel_gflops_per_s": kernel_rate,
        "gemm_gflops_per_s": gemm,
        "fraction_of_gemm": fraction,
        "target": f"kernel rate >= {RATE_TARGET:g} x batched GEMM rate",
        "target_met": bool(fraction >= RATE_TARGET),
        "device": device_kind(),
    }


def language_model(layers: int, hidden: int, seed: int):
    """`(model, (tokens, targets, lengths))`: the `stacked-lm` row's GRU token model with
    `layers` layers of `hidden` units, and its batch (`LM`)."""
    import curvzoo as cz

    key_model, key_x, key_y, key_len = jr.split(jr.key(seed), 4)
    model = cz.RNN(
        LM["embedding"], hidden, LM["vocab"], "gru", "all", num_layers=layers,
        vocab_size=LM["vocab"], key=key_model,
    )  # fmt: skip
    shape = (LM["batch"], LM["steps"])
    tokens = jr.randint(key_x, shape, 0, LM["vocab"])
    targets = jr.randint(key_y, shape, 0, LM["vocab"])
    lengths = jr.randint(key_len, (LM["batch"],), LM["min_length"], LM["steps"] + 1)
    return model, (tokens, targets, lengths)


def stacked(options: Options) -> dict:
    import curvzoo as cz

    loss = cz.losses.CrossEntropy(reduction="sum")
    result = {"row": "stacked-lm", **LM}
    for name, layers, hidden in (("stacked", 2, LM["hidden"]), ("flat", 1, 2 * LM["hidden"])):
        model, batch = language_model(layers, hidden, options.seed)

        def call(model=model, batch=batch):
            return model.hessian_diagonal(loss, batch, method="structured")

        result[f"{name}_params"] = num_params(model)
        result[f"{name}_first_call_s"] = _timed_first(call)
        result[f"{name}_s"] = median_seconds(call, max(1, options.repeats // 2))
        result[f"{name}_plan_multiply_adds"] = cz.plan(model, loss, batch).multiply_adds
    model, batch = language_model(2, LM["hidden"], options.seed)
    grad = eqx.filter_jit(eqx.filter_grad(loss))
    gradient = median_seconds(lambda: grad(model, batch), options.repeats)
    count = min(GENERIC_BASIS, kernel_chunk(model, loss, batch))
    run, chunk = hvp_diagonal_prefix(model, loss, batch, count)
    prefix = median_seconds(run, 1)
    per_product = max(prefix - gradient, 0.0) / count
    size = result["stacked_params"]
    result.update(
        gradient_s=gradient,
        generic_products_timed=count,
        generic_chunk=chunk,
        generic_prefix_s=prefix,
        generic_extrapolated_s=gradient + per_product * size,
        generic_over_structured=(gradient + per_product * size) / result["stacked_s"],
        target="(reported)",
        target_met=None,
        device=device_kind(),
    )
    return result


def measure(row: str, options: Options) -> dict:
    """Measure one of this module's rows (see the module docstring)."""
    if row in RATE_SHAPES:
        return rate(row, options)
    return stacked(options)


def headline(result: dict) -> list[tuple[str, float, str]]:
    """The figures an A/B comparison reports for this row."""
    if result["row"] in RATE_SHAPES:
        return [
            ("structured", result["structured_s"] * 1e3, "ms"),
            ("kernel rate", result["kernel_gflops_per_s"], "GFLOP/s"),
            ("batched GEMM", result["gemm_gflops_per_s"], "GFLOP/s"),
        ]
    return [
        ("stacked structured", result["stacked_s"] * 1e3, "ms"),
        ("flat H=128", result["flat_s"] * 1e3, "ms"),
        ("generic (extrapolated)", result["generic_extrapolated_s"], "s"),
    ]


def format_result(result: dict, verdict: str) -> str:
    """The row as text: the rate against the GEMM reference, or the stacked model's
    timings."""
    row = result["row"]
    if row in RATE_SHAPES:
        return (
            f"{row:<10} {result['cell'].upper()} H={result['hidden']} (n={result['n']}) "
            f"T={result['steps']} N={result['batch']}: structured "
            f"{result['structured_s'] * 1e3:7.1f} ms (first call {result['first_call_s']:.1f} s); "
            f"N T^2 n^3 = {result['useful_flops'] / 1e9:.2f} GFLOP -> "
            f"{result['kernel_gflops_per_s']:6.1f} GFLOP/s; batched GEMM "
            f"{result['gemm_gflops_per_s']:6.1f} GFLOP/s; "
            f"{100 * result['fraction_of_gemm']:5.1f}%  {result['target']}: {verdict}"
        )
    return "\n".join(
        [
            f"stacked-lm: GRU over {result['vocab']} tokens (embedding {result['embedding']}), "
            f"{result['batch']} sequences of lengths {result['min_length']}-{result['steps']} "
            f"(T = {result['steps']}), {result['vocab']} classes at every step",
            f"  2 layers x H={result['hidden']} (P = {result['stacked_params']:,}): structured "
            f"{result['stacked_s'] * 1e3:.0f} ms (first call {result['stacked_first_call_s']:.1f} s"
            f"), plan {result['stacked_plan_multiply_adds']:.3g} multiply-adds",
            f"  1 layer  x H={2 * result['hidden']} (P = {result['flat_params']:,}): structured "
            f"{result['flat_s'] * 1e3:.0f} ms (first call {result['flat_first_call_s']:.1f} s), "
            f"plan {result['flat_plan_multiply_adds']:.3g} multiply-adds",
            f"  generic (2 layers): {result['generic_products_timed']} of "
            f"{result['stacked_params']:,} Hessian-vector products timed in "
            f"{result['generic_prefix_s']:.2f} s (gradient {result['gradient_s'] * 1e3:.1f} ms),"
            f" extrapolated {result['generic_extrapolated_s']:.0f} s: "
            f"{result['generic_over_structured']:.0f}x the structured kernel",
        ]
    )
