"""Row `ratios`: on the `mlp2` model and batch, the GGN diagonal and the exact Hessian
diagonal (`cz.ggn_diagonal`, `cz.hessian_diagonal`, default options) against the jitted
gradient, the three calls timed interleaved over `--rounds` rounds (medians), so that
drift on a shared machine does not bias one side. Targets: GGN / gradient <= 1.6,
Hessian / gradient <= 2.0.
"""

import equinox as eqx

from ..models import build, num_params
from ..options import Options
from ..timing import device_kind, interleaved_seconds


ROWS = ("ratios",)
SUMMARY = {
    "ratios": "mlp2, interleaved: GGN / gradient (target <= 1.6), Hessian / gradient "
    "(target <= 2.0)",
}
TARGETS = {"ggn": 1.6, "hessian": 2.0}


def measure(row: str, options: Options) -> dict:
    """The three medians and both ratios. Cost: `rounds` times the three calls, about
    2 s at 200 rounds on 2 CPU cores."""
    import curvzoo as cz

    model, batch = build("mlp2", options.seed)
    loss = cz.losses.cross_entropy
    grad = eqx.filter_jit(eqx.filter_grad(loss))
    medians = interleaved_seconds(
        {
            "gradient": lambda: grad(model, batch),
            "ggn": lambda: cz.ggn_diagonal(model, loss, batch),
            "hessian": lambda: cz.hessian_diagonal(model, loss, batch),
        },
        options.rounds,
    )
    result = {
        "row": "ratios",
        "params": num_params(model),
        "batch": int(batch[0].shape[0]),
        "rounds": options.rounds,
        "gradient_s": medians["gradient"],
    }
    met = True
    for name, bound in TARGETS.items():
        ratio = medians[name] / medians["gradient"]
        result[f"{name}_s"] = medians[name]
        result[f"{name}_over_gradient"] = ratio
        result[f"{name}_target"] = bound
        met = met and ratio <= bound
    result["target"] = " and ".join(
        f"{name.upper() if name == 'ggn' else name.capitalize()} / gradient <= {bound:g}"
        for name, bound in TARGETS.items()
    )
    result["target_met"] = bool(met)
    result["device"] = device_kind()
    return result


def headline(result: dict) -> list[tuple[str, float, str]]:
    """The three times and both ratios."""
    return [
        ("gradient", result["gradient_s"] * 1e3, "ms"),
        ("GGN", result["ggn_s"] * 1e3, "ms"),
        ("Hessian", result["hessian_s"] * 1e3, "ms"),
        ("GGN / gradient", result["ggn_over_gradient"], "x"),
        ("Hessian / gradient", result["hessian_over_gradient"], "x"),
    ]
