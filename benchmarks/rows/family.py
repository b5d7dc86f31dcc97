"""Rows `ggn`, `hutch-mlp2`, `hutch-gru`: the curvature relatives.

- `ggn`: the `mlp2` model and batch: the GGN diagonal (with and without the default
  `check_finite`, and by per-sample vector-Jacobian products, `method="generic"`), the
  empirical Fisher and a one-draw Fisher, each against the jitted gradient. Target: GGN
  (with the defaults) within 2x the gradient's time.
- `hutch-mlp2`, `hutch-gru`: Hutchinson with 16 probes, with and without the GGN
  control variate, on the `mlp2` and `gru` models; error is the relative L1 error
  `sum|estimate - exact| / sum|exact|` against the exact diagonal, averaged over
  5 keys. Two settings: cross-entropy at initialisation with random labels (reported),
  and least squares (MSE) on targets from a second, random network of the same kind
  plus noise of standard deviation 0.1, after 50 Adam steps (learning rate 1e-3).
  Target (least squares): the control variate cuts the error to a third or less.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from ..models import build, fitted_regression, num_params
from ..options import Options
from ..timing import device_kind, median_seconds, peak_rss_bytes


ROWS = ("ggn", "hutch-mlp2", "hutch-gru")
SUMMARY = {
    "ggn": "mlp2: GGN, empirical and Monte-Carlo Fisher vs gradient (target GGN <= 2x)",
    "hutch-mlp2": "mlp2: Hutchinson's error with and without the GGN control variate",
    "hutch-gru": "gru: Hutchinson's error with and without the GGN control variate",
}
GGN_TARGET = 2.0
GRADIENT_REPEATS = 20
HUTCHINSON_PROBES = 16
HUTCHINSON_KEYS = 5
HUTCHINSON_TARGET = 1 / 3


def measure_ggn(options: Options) -> dict:
    """The GGN family on the `mlp2` model, each against the gradient. Cost: a few
    seconds, most of it the per-sample VJP variant."""
    import curvzoo as cz

    model, batch = build("mlp2", options.seed)
    loss = cz.losses.cross_entropy
    grad = eqx.filter_jit(eqx.filter_grad(loss))
    key = jax.random.key(options.seed)
    result = {"row": "ggn", "params": num_params(model), "batch": int(batch[0].shape[0])}
    result["gradient_s"] = median_seconds(
        lambda: grad(model, batch), max(options.repeats, GRADIENT_REPEATS)
    )
    timed = {
        "ggn_s": lambda: model.ggn_diagonal(loss, batch),
        "ggn_unchecked_s": lambda: model.ggn_diagonal(loss, batch, check_finite=False),
        "ggn_generic_s": lambda: model.ggn_diagonal(loss, batch, method="generic"),
        "empirical_fisher_s": lambda: model.empirical_fisher_diagonal(loss, batch),
        "fisher_s": lambda: model.fisher_diagonal(loss, batch, key=key),
    }
    for name, fn in timed.items():
        result[name] = median_seconds(fn, options.repeats)
    result["peak_rss_bytes"] = peak_rss_bytes()
    result["ggn_over_gradient"] = result["ggn_s"] / result["gradient_s"]
    result["target"] = f"GGN / gradient <= {GGN_TARGET:g}"
    result["target_met"] = bool(result["ggn_over_gradient"] <= GGN_TARGET)
    result["device"] = device_kind()
    return result


def _relative_error(estimate, exact) -> float:
    flat = ravel_pytree(estimate)[0]
    return float(jnp.sum(jnp.abs(flat - exact)) / jnp.sum(jnp.abs(exact)))


def measure_hutchinson(row: str, options: Options) -> dict:
    """Hutchinson's error and time with and without the control variate, in both
    settings. Cost: 50 Adam steps, the exact diagonal, 20 estimates of 16 probes and
    their timings: about half a minute for `hutch-gru` on 2 CPU cores."""
    import curvzoo as cz

    seed = options.seed
    base = row.split("-")[1]
    model, batch = build(base, seed)
    fitted, fitted_batch, _ = fitted_regression(base, seed)
    settings = {
        "ce-init": (model, batch, cz.losses.cross_entropy),
        "mse-fitted": (fitted, fitted_batch, cz.losses.mse),
    }
    repeats = max(1, options.repeats // 2)
    result = {"row": row, "params": num_params(model), "settings": {}}
    for name, (model, batch, loss) in settings.items():
        exact = ravel_pytree(model.hessian_diagonal(loss, batch))[0]
        figures = {"loss": float(loss(model, batch))}
        for control_variate in (None, "ggn"):
            label = "cv" if control_variate else "plain"

            def estimate(key, cv=control_variate, model=model, batch=batch, loss=loss):
                return model.hutchinson_diagonal(
                    loss, batch, key=key, num_probes=HUTCHINSON_PROBES, control_variate=cv
                )

            errors = [
                _relative_error(estimate(jax.random.key(seed + k)), exact)
                for k in range(HUTCHINSON_KEYS)
            ]
            figures[f"{label}_error"] = sum(errors) / len(errors)
            figures[f"{label}_s"] = median_seconds(
                lambda estimate=estimate: estimate(jax.random.key(seed)), repeats
            )
        figures["exact_s"] = median_seconds(
            lambda model=model, batch=batch, loss=loss: model.hessian_diagonal(loss, batch),
            repeats,
        )
        figures["cv_over_plain"] = figures["cv_error"] / figures["plain_error"]
        result["settings"][name] = figures
    ratio = result["settings"]["mse-fitted"]["cv_over_plain"]
    result["target"] = f"mse-fitted error with / without <= 1/{1 / HUTCHINSON_TARGET:g}"
    result["target_met"] = bool(ratio <= HUTCHINSON_TARGET)
    result["device"] = device_kind()
    return result


def measure(row: str, options: Options) -> dict:
    if row == "ggn":
        return measure_ggn(options)
    return measure_hutchinson(row, options)


def headline(result: dict) -> list[tuple[str, float, str]]:
    """The figures an A/B comparison reports for this row."""
    if result["row"] == "ggn":
        names = {
            "gradient_s": "gradient",
            "ggn_s": "GGN structured",
            "ggn_unchecked_s": "GGN, no finite check",
            "ggn_generic_s": "GGN by VJPs",
            "empirical_fisher_s": "empirical Fisher",
            "fisher_s": "Fisher, 1 draw",
        }
        return [(label, result[key] * 1e3, "ms") for key, label in names.items()]
    figures = []
    for name, f in result["settings"].items():
        figures += [
            (f"{name} plain", f["plain_s"] * 1e3, "ms"),
            (f"{name} cv", f["cv_s"] * 1e3, "ms"),
            (f"{name} exact", f["exact_s"] * 1e3, "ms"),
            (f"{name} error cv", f["cv_error"], ""),
        ]
    return figures
