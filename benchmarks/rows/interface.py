"""Rows of the loss interface and users' own models.

- `freshness`: the per-call cost of reading a callable loss afresh (it is traced at
  every call, so that what it closes over is current): the same Hessian diagonal with a
  curvzoo loss (not traced) and with a new lambda at every call, on an MLP 3-4-2
  (compute negligible) and on `mlp2`; then the resident memory of the process after
  1,000 calls, each with a new lambda, against after the first 50. Target: within
  50 MiB.
- `own-models`: a user's `eqx.nn.MLP(784, 10, 256, 2)` (tanh) against the same
  `cz.MLP`, batch 128, Hessian and GGN diagonals, interleaved. Target: at most 1.5x.
- `progress`: `progress=True` against `False` on the generic kernel of the `small` MLP
  (P = 8970) in chunks of 16 basis vectors (561 chunks, one report each), interleaved.
  Target: under 1% slower.
- `probe-cost`: what one Hutchinson probe costs on `mlp2`, in jitted gradients: the time
  of 16 probes (with and without the GGN control variate) over 16 gradients.
"""

import equinox as eqx
import jax

from ..models import build, build_tiny, num_params
from ..options import Options
from ..timing import device_kind, interleaved_seconds, median_seconds, peak_rss_bytes


ROWS = ("freshness", "own-models", "progress", "probe-cost")
SUMMARY = {
    "freshness": "per-call cost of tracing a callable loss; RSS over 1,000 fresh lambdas "
    "(target: within 50 MiB of after 50)",
    "own-models": "eqx.nn.MLP(784, 10, 256, 2) against the same cz.MLP (target <= 1.5x)",
    "progress": "progress=True on 561 chunks of the generic kernel (target < 1% slower)",
    "probe-cost": "one Hutchinson probe on mlp2, in gradients",
}
MEMORY_TARGET = 50 * 2**20
OWN_MODEL_TARGET = 1.5
PROGRESS_TARGET = 0.01


def _rss_after_fresh_lambdas(model, batch, calls: int, probe: int) -> tuple[int, int]:
    import curvzoo as cz

    loss = cz.losses.cross_entropy
    after_probe = 0
    for index in range(calls):
        jax.block_until_ready(cz.hessian_diagonal(model, lambda m, b: loss(m, b), batch))
        if index + 1 == probe:
            after_probe = peak_rss_bytes()
    return after_probe, peak_rss_bytes()


class _ModuleLoss(eqx.Module):
    """The same loss as an Equinox module: taken as `equinox.filter_jit` takes it, not
    traced again at each call."""

    def __call__(self, model, batch):
        import curvzoo as cz

        return cz.losses.cross_entropy(model, batch)


def freshness(options: Options) -> dict:
    """What tracing a callable loss at every call costs: the same loss as a fresh lambda
    and as an Equinox module (not traced per call), through the same kernel (the generic
    Hessian diagonal on a 26-parameter MLP; Hutchinson's estimate, 4 probes, on `mlp2`,
    where a callable loss would send the Hessian diagonal to the generic kernel), timed
    interleaved; and resident memory over 1,000 fresh lambdas."""
    import curvzoo as cz

    loss = cz.losses.cross_entropy
    module = _ModuleLoss()
    result = {"row": "freshness", "models": []}
    key = jax.random.key(options.seed)

    def tiny_call(model, loss_fn, batch):
        return cz.hessian_diagonal(model, loss_fn, batch)

    def probes_call(model, loss_fn, batch):
        return cz.hutchinson_diagonal(model, loss_fn, batch, key=key, num_probes=4)

    for name, (model, batch), call, function in (
        ("mlp 3-4-2", build_tiny(options.seed), tiny_call, "hessian_diagonal"),
        ("mlp2", build("mlp2", options.seed), probes_call, "hutchinson, 4 probes"),
    ):
        medians = interleaved_seconds(
            {
                "module loss": lambda: call(model, module, batch),
                "fresh lambda": lambda: call(model, lambda m, b: loss(m, b), batch),
            },
            max(20, options.rounds // 4),
        )
        result["models"].append(
            {
                "model": name,
                "function": function,
                "params": num_params(model),
                "module_s": medians["module loss"],
                "lambda_s": medians["fresh lambda"],
                "tracing_s": medians["fresh lambda"] - medians["module loss"],
            }
        )
    after_50, after_1000 = _rss_after_fresh_lambdas(*build_tiny(options.seed), 1000, 50)
    result.update(
        rss_after_50_bytes=after_50,
        rss_after_1000_bytes=after_1000,
        target=f"RSS after 1,000 fresh lambdas within {MEMORY_TARGET / 2**20:g} MiB of after 50",
        target_met=bool(after_1000 - after_50 <= MEMORY_TARGET),
        device=device_kind(),
    )
    return result


def own_models(options: Options) -> dict:
    import curvzoo as cz

    zoo, batch = build("mlp2", options.seed)
    theirs = eqx.nn.MLP(784, 10, 256, 2, activation=jax.nn.tanh, key=jax.random.key(options.seed))
    loss = cz.losses.cross_entropy
    fns = {}
    for label, model in (("cz.MLP", zoo), ("eqx.nn.MLP", theirs)):
        for function in ("hessian_diagonal", "ggn_diagonal"):
            call = getattr(cz, function)
            fns[f"{label} {function}"] = lambda call=call, model=model: call(model, loss, batch)
    medians = interleaved_seconds(fns, max(20, options.rounds // 4))
    ratios = {
        function: medians[f"eqx.nn.MLP {function}"] / medians[f"cz.MLP {function}"]
        for function in ("hessian_diagonal", "ggn_diagonal")
    }
    return {
        "row": "own-models",
        "params": num_params(zoo),
        "seconds": medians,
        "ratios": ratios,
        "kernel": cz.plan(theirs, loss, batch).kernel,
        "target": f"eqx.nn.MLP / cz.MLP <= {OWN_MODEL_TARGET:g}",
        "target_met": bool(max(ratios.values()) <= OWN_MODEL_TARGET),
        "device": device_kind(),
    }


def progress(options: Options) -> dict:
    import curvzoo as cz

    model, batch = build("small", options.seed)
    loss = cz.losses.cross_entropy
    plan = cz.plan(model, loss, batch, method="generic", chunk_size=16)

    def call(flag):
        return cz.hessian_diagonal(
            model, loss, batch, method="generic", chunk_size=16, progress=flag
        )

    medians = interleaved_seconds(
        {"quiet": lambda: call(False), "progress": lambda: call(True)}, max(3, options.repeats)
    )
    ratio = medians["progress"] / medians["quiet"] - 1
    return {
        "row": "progress",
        "params": num_params(model),
        "chunks": plan.num_chunks,
        "quiet_s": medians["quiet"],
        "progress_s": medians["progress"],
        "overhead": ratio,
        "target": f"progress=True at most {PROGRESS_TARGET:.0%} slower",
        "target_met": bool(ratio <= PROGRESS_TARGET),
        "device": device_kind(),
    }


def probe_cost(options: Options) -> dict:
    import curvzoo as cz

    model, batch = build("mlp2", options.seed)
    loss = cz.losses.cross_entropy
    grad = eqx.filter_jit(eqx.filter_grad(loss))
    key = jax.random.key(options.seed)
    gradient = median_seconds(lambda: grad(model, batch), max(options.repeats, 20))
    result = {"row": "probe-cost", "params": num_params(model), "gradient_s": gradient}
    for label, variate in (("plain", None), ("cv", "ggn")):
        seconds = median_seconds(
            lambda variate=variate: cz.hutchinson_diagonal(
                model, loss, batch, key=key, num_probes=16, control_variate=variate
            ),
            options.repeats,
        )
        result[f"{label}_s"] = seconds
        result[f"{label}_per_probe_gradients"] = seconds / 16 / gradient
    result.update(target="(reported)", target_met=None, device=device_kind())
    return result


def measure(row: str, options: Options) -> dict:
    return {
        "freshness": freshness,
        "own-models": own_models,
        "progress": progress,
        "probe-cost": probe_cost,
    }[row](options)


def headline(result: dict) -> list[tuple[str, float, str]]:
    row = result["row"]
    if row == "freshness":
        figures = [(f"{m['model']} tracing", m["tracing_s"] * 1e3, "ms") for m in result["models"]]
        growth = (result["rss_after_1000_bytes"] - result["rss_after_50_bytes"]) / 2**20
        return figures + [("RSS growth over 950 calls", growth, "MiB")]
    if row == "own-models":
        return [(f"{name} ratio", value, "x") for name, value in result["ratios"].items()]
    if row == "progress":
        return [("progress overhead", 100 * result["overhead"], "%")]
    return [("probe / gradient", result["plain_per_probe_gradients"], "x")]


def format_result(result: dict, verdict: str) -> str:
    row = result["row"]
    if row == "freshness":
        lines = ["freshness: a callable loss traced at every call (medians, interleaved)"]
        for m in result["models"]:
            lines.append(
                f"  {m['model']:<10} P = {m['params']:>7}, {m['function']}: "
                f"module loss {m['module_s'] * 1e3:7.3f} ms, "
                f"fresh lambda {m['lambda_s'] * 1e3:7.3f} ms, "
                f"tracing {m['tracing_s'] * 1e3:6.3f} ms"
            )
        lines.append(
            f"  RSS after 50 fresh lambdas {result['rss_after_50_bytes'] / 2**20:.0f} MiB, "
            f"after 1,000 {result['rss_after_1000_bytes'] / 2**20:.0f} MiB"
        )
    elif row == "own-models":
        s = result["seconds"]
        lines = [f"own-models (mlp2 shape, P = {result['params']}, batch 128; eqx.nn.MLP takes "
                 f"the {result['kernel']} kernel)"]  # fmt: skip
        for function in ("hessian_diagonal", "ggn_diagonal"):
            lines.append(
                f"  {function:<17} cz.MLP {s[f'cz.MLP {function}'] * 1e3:7.2f} ms  eqx.nn.MLP "
                f"{s[f'eqx.nn.MLP {function}'] * 1e3:7.2f} ms  {result['ratios'][function]:5.2f}x"
            )
    elif row == "progress":
        lines = [
            f"progress (small MLP, P = {result['params']}, generic kernel, {result['chunks']} "
            f"chunks): quiet {result['quiet_s'] * 1e3:.1f} ms, progress=True "
            f"{result['progress_s'] * 1e3:.1f} ms ({100 * result['overhead']:+.2f}%)"
        ]
    else:
        lines = [
            f"probe-cost (mlp2): gradient {result['gradient_s'] * 1e3:.2f} ms; one probe "
            f"{result['plain_per_probe_gradients']:.2f} gradients, with the control variate "
            f"{result['cv_per_probe_gradients']:.2f} (16 probes, its exact GGN included)"
        ]
    lines.append(f"  target {result['target']}: {verdict}")
    return "\n".join(lines)
