"""Rows `mlp2`, `mlp4`, `cnn`, `small`, `gru`, `lstm`, `elman`: the exact Hessian
diagonal's structured kernel (and, where it is affordable, the generic one) against
the jitted gradient, timed one after the other in the same process.

- `mlp2`: MLP 784-256-256-10, batch 128. Target: structured within 4x the gradient.
- `mlp4`: MLP 784-256-256-256-256-10, batch 128. Target: within 20x the gradient.
- `cnn`: the zoo CNN, channels (8, 16), kernel 3, 1x28x28 input, 10 classes, batch 128.
  Target: within 50x the gradient, peak memory under 2 GiB.
- `small`: MLP 64-64-64-10 (P = 8970), batch 128, where the generic kernel is timed
  too. Target: structured at least 200x faster than generic.
- `gru`, `lstm`, `elman`: the zoo RNN with that cell, input 8, hidden 64, 10 classes on
  the last state, T = 16, batch 32; structured against generic, both timed in full.
  Target (GRU): structured at least 20x faster than generic.
"""

import equinox as eqx

from ..models import build, num_params, RECURRENT
from ..options import Options
from ..timing import device_kind, median_seconds, peak_rss_bytes


ROWS = ("mlp2", "mlp4", "cnn", "small", "gru", "lstm", "elman")
SUMMARY = {
    "mlp2": "MLP 784-256-256-10, batch 128: structured vs gradient (target <= 4x)",
    "mlp4": "MLP 784-256x4-10, batch 128: structured vs gradient (target <= 20x)",
    "cnn": "CNN (8, 16) on 1x28x28, batch 128: structured vs gradient (<= 50x, < 2 GiB)",
    "small": "MLP 64-64-64-10, batch 128: generic vs structured (target >= 200x)",
    "gru": "GRU 8-64-10, T = 16, batch 32: generic vs structured (target >= 20x)",
    "lstm": "LSTM 8-64-10, T = 16, batch 32: generic vs structured (reported)",
    "elman": "Elman 8-64-10, T = 16, batch 32: generic vs structured (reported)",
}
TARGETS = {
    "mlp2": ("structured / gradient", "<=", 4.0),
    "mlp4": ("structured / gradient", "<=", 20.0),
    "cnn": ("structured / gradient", "<=", 50.0),
    "small": ("generic / structured", ">=", 200.0),
    "gru": ("generic / structured", ">=", 20.0),
}
MEMORY_TARGETS = {"cnn": 2 * 2**30}
GRADIENT_REPEATS = 20


def measure(row: str, options: Options) -> dict:
    """Time the gradient, the structured kernel and (for `small` and the recurrent
    rows) the generic kernel on the row's model; peak memory after the structured
    kernel. Cost: the generic kernel takes about 2-35 s per call on 2 CPU cores."""
    import curvzoo as cz

    model, batch = build(row, options.seed)
    loss = cz.losses.cross_entropy
    repeats = options.repeats
    grad = eqx.filter_jit(eqx.filter_grad(loss))
    result = {"row": row, "params": num_params(model), "batch": int(batch[0].shape[0])}
    result["gradient_s"] = median_seconds(
        lambda: grad(model, batch), max(repeats, GRADIENT_REPEATS)
    )
    rss_before = peak_rss_bytes()
    result["structured_s"] = median_seconds(
        lambda: model.hessian_diagonal(loss, batch, method="structured"), repeats
    )
    result["structured_peak_rss_bytes"] = peak_rss_bytes()
    result["rss_before_structured_bytes"] = rss_before
    result["structured_over_gradient"] = result["structured_s"] / result["gradient_s"]
    if row == "small" or row in RECURRENT:
        generic_repeats = max(1, repeats // 2) if row == "small" else 1
        result["generic_s"] = median_seconds(
            lambda: model.hessian_diagonal(loss, batch, method="generic"), generic_repeats
        )
        result["generic_over_gradient"] = result["generic_s"] / result["gradient_s"]
        result["generic_over_structured"] = result["generic_s"] / result["structured_s"]
    result["device"] = device_kind()
    if row not in TARGETS:
        result["target"] = "(reported)"
        result["target_met"] = None
        return result
    name, relation, bound = TARGETS[row]
    value = result["generic_over_structured" if "generic" in name else "structured_over_gradient"]
    met = value <= bound if relation == "<=" else value >= bound
    target = f"{name} {relation} {bound:g}"
    if row in MEMORY_TARGETS:
        met = met and result["structured_peak_rss_bytes"] < MEMORY_TARGETS[row]
        target += f", peak < {MEMORY_TARGETS[row] / 2**30:g} GiB"
    result["target"] = target
    result["target_met"] = bool(met)
    return result


def headline(result: dict) -> list[tuple[str, float, str]]:
    """The figures an A/B comparison reports for this row."""
    figures = [
        ("gradient", result["gradient_s"] * 1e3, "ms"),
        ("structured", result["structured_s"] * 1e3, "ms"),
    ]
    if "generic_s" in result:
        figures.append(("generic", result["generic_s"] * 1e3, "ms"))
    figures.append(("peak RSS", result["structured_peak_rss_bytes"] / 2**20, "MiB"))
    return figures
