"""Benchmarks: exact Hessian diagonals against the gradient, side by side.

Run `python -m curvzoo.bench` for every row, or `--rows mlp2,small` for some;
`--json results.json` also writes the table as JSON. Each row runs in its own
subprocess, so that its peak resident memory (`ru_maxrss`) is its own; within a row,
the gradient and the diagonal kernels are timed in the same process, one after the
other, as the median of `--repeats` calls after a warm-up (compilation excluded).

Rows (float32, cross-entropy, tanh):

- `mlp2`: MLP 784-256-256-10, batch 128. Target: structured within 4x the gradient.
- `mlp4`: MLP 784-256-256-256-256-10, batch 128. Target: within 20x the gradient.
- `cnn`: the zoo CNN, channels (8, 16), kernel 3, 1x28x28 input, 10 classes, batch 128.
  Target: within 50x the gradient, peak memory under 2 GiB.
- `small`: MLP 64-64-64-10 (P = 8970), batch 128, where the generic kernel is timed
  too. Target: structured at least 200x faster than generic.
- `gru`, `lstm`, `elman`: the zoo RNN with that cell, input 8, hidden 64, 10 classes on
  the last state, T = 16, batch 32; structured against generic, both timed in full.
  Target (GRU): structured at least 20x faster than generic.
- `scaling`: the GRU row for T in {8, 16, 32, 64} and hidden in {32, 64, 128}. The
  generic kernel's time is extrapolated from a timed run over its first 256 basis vectors
  (its cost is `P` identical Hessian-vector products, so it is linear in `P`; at T = 16,
  hidden 64 the extrapolation is within 10% of the full run).
- `ggn`: the `mlp2` model and batch: the GGN diagonal (structured, with and without
  the default `check_finite`, and by per-sample vector-Jacobian products), the
  empirical Fisher and a one-draw Fisher, each against the gradient. Target: GGN (with
  the defaults) within 2x the gradient's time.
- `hutch-mlp2`, `hutch-gru`: Hutchinson with 16 probes, with and without the GGN
  control variate, on the `mlp2` and `gru` models; error is the relative L1 error
  `sum|estimate - exact| / sum|exact|` against the exact diagonal, averaged over
  5 keys. Two settings: cross-entropy at initialisation with random labels (reported),
  and least squares (MSE) on targets from a second, random network of the same kind
  plus noise of standard deviation 0.1, after 50 Adam steps (learning rate 1e-3).
  Target (least squares): the control variate cuts the error to a third or less.
- `mem-default`, `mem-16mib`: peak resident memory of the generic kernel on an MLP
  128-256-256-10 (P = 101386), batch 32, at the default memory budget (128 MiB) and at
  16 MiB, each in its own process. Target: under 1 GiB at the default budget; memory
  follows the budget, not `P` (a `jnp.eye(P)` basis would need 41 GB in float32).
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


ROWS = (
    "mlp2", "mlp4", "cnn", "small", "gru", "lstm", "elman", "scaling",
    "ggn", "hutch-mlp2", "hutch-gru", "mem-default", "mem-16mib",
)  # fmt: skip
FAMILY = ("ggn", "hutch-mlp2", "hutch-gru")
MEMORY = {"mem-default": None, "mem-16mib": 16 * 2**20}
MEMORY_TARGET = 2**30
GGN_TARGET = 2.0
HUTCHINSON_PROBES = 16
HUTCHINSON_KEYS = 5
HUTCHINSON_TARGET = 1 / 3
TARGETS = {
    "mlp2": ("structured / gradient", "<=", 4.0),
    "mlp4": ("structured / gradient", "<=", 20.0),
    "cnn": ("structured / gradient", "<=", 50.0),
    "small": ("generic / structured", ">=", 200.0),
    "gru": ("generic / structured", ">=", 20.0),
}
RECURRENT = ("gru", "lstm", "elman")
SCALING_STEPS = (8, 16, 32, 64)
SCALING_HIDDEN = (32, 64, 128)
SCALING_BASIS = 256
MEMORY_TARGETS = {"cnn": 2 * 2**30}


def _build(row: str, seed: int, steps: int = 16, hidden: int = 64):
    import jax
    import jax.random as jr

    import curvzoo as cz

    key_model, key_x, key_y = jr.split(jr.key(seed), 3)
    batch_size = 128
    if row in RECURRENT:
        model = cz.RNN(8, hidden, 10, cell=row, key=key_model)
        x = jr.normal(key_x, (32, steps, 8))
        return model, (x, jr.randint(key_y, (32,), 0, 10))
    if row == "mlp2":
        model = cz.MLP(784, 10, 256, 2, activation=jax.nn.tanh, key=key_model)
        x = jr.normal(key_x, (batch_size, 784))
    elif row == "mlp4":
        model = cz.MLP(784, 10, 256, 4, activation=jax.nn.tanh, key=key_model)
        x = jr.normal(key_x, (batch_size, 784))
    elif row == "cnn":
        model = cz.CNN(1, 10, 28, channels=(8, 16), kernel_size=3, key=key_model)
        x = jr.normal(key_x, (batch_size, 1, 28, 28))
    elif row == "small":
        model = cz.MLP(64, 10, 64, 2, activation=jax.nn.tanh, key=key_model)
        x = jr.normal(key_x, (batch_size, 64))
    else:
        raise ValueError(f"unknown row {row!r}; rows are {ROWS}")
    y = jr.randint(key_y, (batch_size,), 0, 10)
    return model, (x, y)


def _median_seconds(fn, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn())  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _scaling(seed: int) -> dict:
    """The GRU grid: structured timed, generic extrapolated from a prefix of its basis."""
    import equinox as eqx
    import jax

    import curvzoo as cz
    from curvzoo._kernels._generic import generic_hessian_diagonal
    from curvzoo._run._checks import split_trainable
    from curvzoo._run._memory import DEFAULT_MEMORY_BUDGET

    loss = cz.losses.cross_entropy
    grid = []
    for hidden in SCALING_HIDDEN:
        for steps in SCALING_STEPS:
            model, batch = _build("gru", seed, steps=steps, hidden=hidden)
            params, static = split_trainable(model, eqx.is_inexact_array)
            num_params = sum(leaf.size for leaf in jax.tree.leaves(params))
            structured = _median_seconds(
                lambda: model.hessian_diagonal(loss, batch, method="structured"), 1
            )
            prefix = _median_seconds(
                lambda: generic_hessian_diagonal(
                    params, static, loss, batch, None, DEFAULT_MEMORY_BUDGET, SCALING_BASIS
                ),
                1,
            )
            generic = prefix * num_params / SCALING_BASIS
            grid.append(
                {
                    "hidden": hidden,
                    "steps": steps,
                    "params": int(num_params),
                    "structured_s": structured,
                    "generic_extrapolated_s": generic,
                    "generic_over_structured": generic / structured,
                }
            )
            print(f"  hidden {hidden} T {steps}: done", file=sys.stderr, flush=True)
    return {"row": "scaling", "grid": grid, "device": str(jax.devices()[0].device_kind)}


def _ggn_row(repeats: int, seed: int) -> dict:
    """The GGN family on the `mlp2` model, each against the gradient."""
    import equinox as eqx
    import jax

    import curvzoo as cz

    model, batch = _build("mlp2", seed)
    loss = cz.losses.cross_entropy
    grad = eqx.filter_jit(eqx.filter_grad(loss))
    key = jax.random.key(seed)
    result = {"row": "ggn", "params": _num_params(model), "batch": int(batch[0].shape[0])}
    result["gradient_s"] = _median_seconds(lambda: grad(model, batch), max(repeats, 20))
    timed = {
        "ggn_s": lambda: model.ggn_diagonal(loss, batch),
        "ggn_unchecked_s": lambda: model.ggn_diagonal(loss, batch, check_finite=False),
        "ggn_generic_s": lambda: model.ggn_diagonal(loss, batch, method="generic"),
        "empirical_fisher_s": lambda: model.empirical_fisher_diagonal(loss, batch),
        "fisher_s": lambda: model.fisher_diagonal(loss, batch, key=key),
    }
    for name, fn in timed.items():
        result[name] = _median_seconds(fn, repeats)
    result["peak_rss_bytes"] = _peak_rss_bytes()
    result["ggn_over_gradient"] = result["ggn_s"] / result["gradient_s"]
    result["target"] = f"GGN / gradient <= {GGN_TARGET:g}"
    result["target_met"] = bool(result["ggn_over_gradient"] <= GGN_TARGET)
    result["device"] = str(jax.devices()[0].device_kind)
    return result


def _fitted_regression(row: str, seed: int):
    """The row's model after 50 Adam steps of least squares on a second network's
    outputs plus noise; returns the model, the batch and the final loss."""
    import equinox as eqx
    import jax
    import jax.random as jr
    import optax

    import curvzoo as cz

    model, (inputs, _) = _build(row, seed)
    teacher, _ = _build(row, seed + 1)
    targets = jax.vmap(teacher)(inputs)
    targets = targets + 0.1 * jr.normal(jr.key(seed + 2), targets.shape)
    batch = (inputs, targets)
    loss = cz.losses.mse
    optimiser = optax.adam(1e-3)
    state = optimiser.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, state):
        value, grads = eqx.filter_value_and_grad(loss)(model, batch)
        updates, state = optimiser.update(grads, state)
        return eqx.apply_updates(model, updates), state, value

    for _ in range(50):
        model, state, value = step(model, state)
    return model, batch, float(loss(model, batch))


def _hutchinson_row(row: str, repeats: int, seed: int) -> dict:
    """Hutchinson's error and time with and without the control variate."""
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    import curvzoo as cz

    base = row.split("-")[1]
    model, batch = _build(base, seed)
    fitted, fitted_batch, _ = _fitted_regression(base, seed)
    settings = {
        "ce-init": (model, batch, cz.losses.cross_entropy),
        "mse-fitted": (fitted, fitted_batch, cz.losses.mse),
    }
    result = {"row": row, "params": _num_params(model), "settings": {}}
    for name, (model, batch, loss) in settings.items():
        exact = ravel_pytree(model.hessian_diagonal(loss, batch))[0]
        figures = {"loss": float(loss(model, batch))}
        for control_variate in (None, "ggn"):
            label = "cv" if control_variate else "plain"
            errors = []
            for k in range(HUTCHINSON_KEYS):
                estimate = model.hutchinson_diagonal(
                    loss, batch, key=jax.random.key(seed + k), num_probes=HUTCHINSON_PROBES,
                    control_variate=control_variate,
                )  # fmt: skip
                flat = ravel_pytree(estimate)[0]
                errors.append(float(jnp.sum(jnp.abs(flat - exact)) / jnp.sum(jnp.abs(exact))))
            figures[f"{label}_error"] = sum(errors) / len(errors)
            figures[f"{label}_s"] = _median_seconds(
                lambda cv=control_variate: model.hutchinson_diagonal(
                    loss, batch, key=jax.random.key(seed), num_probes=HUTCHINSON_PROBES,
                    control_variate=cv,
                ),
                max(1, repeats // 2),
            )  # fmt: skip
        figures["exact_s"] = _median_seconds(
            lambda: model.hessian_diagonal(loss, batch), max(1, repeats // 2)
        )
        figures["cv_over_plain"] = figures["cv_error"] / figures["plain_error"]
        result["settings"][name] = figures
    ratio = result["settings"]["mse-fitted"]["cv_over_plain"]
    result["target"] = f"mse-fitted error with / without <= 1/{1 / HUTCHINSON_TARGET:g}"
    result["target_met"] = bool(ratio <= HUTCHINSON_TARGET)
    result["device"] = str(jax.devices()[0].device_kind)
    return result


def _memory_row(row: str, seed: int) -> dict:
    """Peak RSS of the generic kernel at one budget, with its chunk and time."""
    import time as _time

    import equinox as eqx
    import jax
    import jax.random as jr
    from jax.flatten_util import ravel_pytree

    import curvzoo as cz
    from curvzoo._run._checks import split_trainable
    from curvzoo._run._memory import bytes_per_lane, DEFAULT_MEMORY_BUDGET

    key_model, key_x, key_y = jr.split(jr.key(seed), 3)
    model = cz.MLP(128, 10, 256, 2, activation=jax.nn.tanh, key=key_model)
    batch = (jr.normal(key_x, (32, 128)), jr.randint(key_y, (32,), 0, 10))
    loss = cz.losses.cross_entropy
    budget = MEMORY[row]
    params, static = split_trainable(model, eqx.is_inexact_array)
    num_params = _num_params(model)
    flat, unravel = ravel_pytree(params)

    def hvp_lane(v):
        def f(u):
            return loss(eqx.combine(unravel(u), static), batch)

        return jax.jvp(jax.grad(f), (flat,), (v,))[1]

    lane = bytes_per_lane(hvp_lane, flat)
    effective = DEFAULT_MEMORY_BUDGET if budget is None else budget
    rss_before = _peak_rss_bytes()
    start = _time.perf_counter()
    jax.block_until_ready(
        model.hessian_diagonal(loss, batch, method="generic", memory_budget=budget)
    )
    seconds = _time.perf_counter() - start
    peak = _peak_rss_bytes()
    return {
        "row": row,
        "params": num_params,
        "budget_bytes": effective,
        "lane_bytes_estimate": lane,
        "chunk": max(1, min(num_params, effective // max(lane, 1))),
        "seconds_with_compilation": seconds,
        "rss_before_bytes": rss_before,
        "peak_rss_bytes": peak,
        "eye_bytes": num_params**2 * 4,
        "target": "peak RSS < 1 GiB" if budget is None else "(reported)",
        "target_met": bool(peak < MEMORY_TARGET) if budget is None else None,
        "device": str(jax.devices()[0].device_kind),
    }


def _num_params(model) -> int:
    import equinox as eqx
    import jax

    return int(sum(leaf.size for leaf in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))))


def _worker(row: str, repeats: int, seed: int) -> dict:
    """Measure one row in this process and return its figures."""
    import equinox as eqx
    import jax

    import curvzoo as cz

    if row == "scaling":
        return _scaling(seed)
    if row == "ggn":
        return _ggn_row(repeats, seed)
    if row.startswith("hutch-"):
        return _hutchinson_row(row, repeats, seed)
    if row in MEMORY:
        return _memory_row(row, seed)
    model, batch = _build(row, seed)
    loss = cz.losses.cross_entropy
    num_params = sum(leaf.size for leaf in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array)))
    grad = eqx.filter_jit(eqx.filter_grad(loss))
    result = {"row": row, "params": int(num_params), "batch": int(batch[0].shape[0])}
    result["gradient_s"] = _median_seconds(lambda: grad(model, batch), max(repeats, 20))
    rss_before = _peak_rss_bytes()
    result["structured_s"] = _median_seconds(
        lambda: model.hessian_diagonal(loss, batch, method="structured"), repeats
    )
    result["structured_peak_rss_bytes"] = _peak_rss_bytes()
    result["rss_before_structured_bytes"] = rss_before
    result["structured_over_gradient"] = result["structured_s"] / result["gradient_s"]
    if row == "small" or row in RECURRENT:
        generic_repeats = max(1, repeats // 2) if row == "small" else 1
        result["generic_s"] = _median_seconds(
            lambda: model.hessian_diagonal(loss, batch, method="generic"), generic_repeats
        )
        result["generic_over_gradient"] = result["generic_s"] / result["gradient_s"]
        result["generic_over_structured"] = result["generic_s"] / result["structured_s"]
    result["device"] = str(jax.devices()[0].device_kind)
    if row not in TARGETS:
        result["target"] = "(reported)"
        result["target_met"] = None
        return result
    name, relation, bound = TARGETS[row]
    value = result["generic_over_structured" if "generic" in name else "structured_over_gradient"]
    met = value <= bound if relation == "<=" else value >= bound
    if row in MEMORY_TARGETS:
        met = met and result["structured_peak_rss_bytes"] < MEMORY_TARGETS[row]
    result["target"] = f"{name} {relation} {bound:g}" + (
        f", peak < {MEMORY_TARGETS[row] / 2**30:g} GiB" if row in MEMORY_TARGETS else ""
    )
    result["target_met"] = bool(met)
    return result


def _format_table(results: list[dict]) -> str:
    header = (
        f"{'row':<6} {'P':>8} {'grad ms':>9} {'struct ms':>10} {'struct/grad':>12} "
        f"{'generic ms':>11} {'gen/struct':>11} {'peak RSS MiB':>13}  target"
    )
    main = [r for r in results if r["row"] != "scaling" and r["row"] not in FAMILY + tuple(MEMORY)]
    lines = [header, "-" * len(header)] if main else []
    for r in main:
        generic = f"{r['generic_s'] * 1e3:11.1f}" if "generic_s" in r else f"{'-':>11}"
        ratio = f"{r['generic_over_structured']:11.0f}" if "generic_s" in r else f"{'-':>11}"
        lines.append(
            f"{r['row']:<6} {r['params']:>8} {r['gradient_s'] * 1e3:9.2f} "
            f"{r['structured_s'] * 1e3:10.2f} {r['structured_over_gradient']:12.1f} "
            f"{generic} {ratio} {r['structured_peak_rss_bytes'] / 2**20:13.0f}  "
            f"{r['target']}: {_verdict(r)}"
        )
    for r in results:
        if r["row"] == "scaling":
            lines += ["", _format_scaling(r["grid"])]
    family = [r for r in results if r["row"] in FAMILY]
    if family:
        lines += ["", _format_family(family)]
    memory = [r for r in results if r["row"] in MEMORY]
    if memory:
        lines += ["", _format_memory(memory)]
    return "\n".join(lines).strip("\n")


def _format_memory(results: list[dict]) -> str:
    first = results[0]
    lines = [
        f"generic kernel, MLP 128-256-256-10 (P = {first['params']}), batch 32; "
        f"a jnp.eye(P) basis alone: {first['eye_bytes'] / 2**30:.1f} GiB",
        f"{'row':<12} {'budget MiB':>10} {'chunk':>7} {'s (with compile)':>17} "
        f"{'RSS before MiB':>15} {'peak RSS MiB':>13}  target",
    ]
    lines.append("-" * len(lines[-1]))
    for r in results:
        lines.append(
            f"{r['row']:<12} {r['budget_bytes'] / 2**20:>10.0f} {r['chunk']:>7} "
            f"{r['seconds_with_compilation']:>17.1f} {r['rss_before_bytes'] / 2**20:>15.0f} "
            f"{r['peak_rss_bytes'] / 2**20:>13.0f}  {r['target']}: {_verdict(r)}"
        )
    return "\n".join(lines)


def _verdict(result: dict) -> str:
    return {True: "met", False: "MISSED", None: "-"}[result["target_met"]]


def _format_family(results: list[dict]) -> str:
    lines = []
    for r in results:
        if r["row"] == "ggn":
            g = r["gradient_s"]
            lines += [
                f"ggn (mlp2, P = {r['params']}, batch {r['batch']}): gradient "
                f"{g * 1e3:.2f} ms; peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB",
                f"  GGN structured      {r['ggn_s'] * 1e3:8.2f} ms  {r['ggn_s'] / g:6.2f}x grad",
                f"  GGN, no finite check {r['ggn_unchecked_s'] * 1e3:7.2f} ms  "
                f"{r['ggn_unchecked_s'] / g:6.2f}x grad",
                f"  GGN by VJPs         {r['ggn_generic_s'] * 1e3:8.2f} ms  "
                f"{r['ggn_generic_s'] / g:6.2f}x grad",
                f"  empirical Fisher    {r['empirical_fisher_s'] * 1e3:8.2f} ms  "
                f"{r['empirical_fisher_s'] / g:6.2f}x grad",
                f"  Fisher, 1 draw      {r['fisher_s'] * 1e3:8.2f} ms  "
                f"{r['fisher_s'] / g:6.2f}x grad",
                f"  target {r['target']}: {_verdict(r)}",
                "",
            ]
    hutchinson = [r for r in results if r["row"].startswith("hutch-")]
    if hutchinson:
        header = (
            f"{'row':<11} {'setting':<11} {'loss':>9} {'error':>8} {'error cv':>9} "
            f"{'cv/plain':>9} {'ms':>8} {'ms cv':>8} {'exact ms':>9}"
        )
        lines += [
            f"Hutchinson, {HUTCHINSON_PROBES} probes: relative L1 error, mean of "
            f"{HUTCHINSON_KEYS} keys",
            header,
            "-" * len(header),
        ]
        for r in hutchinson:
            for name, f in r["settings"].items():
                lines.append(
                    f"{r['row']:<11} {name:<11} {f['loss']:9.2e} {f['plain_error']:8.3f} "
                    f"{f['cv_error']:9.4f} {f['cv_over_plain']:9.3f} {f['plain_s'] * 1e3:8.1f} "
                    f"{f['cv_s'] * 1e3:8.1f} {f['exact_s'] * 1e3:9.1f}"
                )
            lines.append(f"  target {r['target']}: {_verdict(r)}")
    return "\n".join(lines).rstrip()


def _format_scaling(grid: list[dict]) -> str:
    lines = [
        "GRU, input 8, 10 classes, batch 32: generic (extrapolated) / structured",
        f"{'hidden':>8} " + " ".join(f"{'T=' + str(t):>16}" for t in SCALING_STEPS),
    ]
    for hidden in SCALING_HIDDEN:
        cells = []
        for steps in SCALING_STEPS:
            (g,) = [x for x in grid if x["hidden"] == hidden and x["steps"] == steps]
            cells.append(f"{g['generic_over_structured']:6.1f}x ({g['structured_s']:5.2f} s)")
        lines.append(f"{hidden:>8} " + " ".join(f"{c:>16}" for c in cells))
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(
        prog="python -m curvzoo.bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per kernel")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.worker:
        print(json.dumps(_worker(args.worker, args.repeats, args.seed)))
        return []
    rows = [row.strip() for row in args.rows.split(",") if row.strip()]
    unknown = [row for row in rows if row not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; rows are {', '.join(ROWS)}")
    results = []
    for row in rows:
        command = [
            sys.executable, "-m", "curvzoo.bench", "--worker", row,
            "--repeats", str(args.repeats), "--seed", str(args.seed),
        ]  # fmt: skip
        print(f"measuring {row} ...", file=sys.stderr, flush=True)
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            sys.stderr.write(done.stderr)
            raise SystemExit(f"row {row} failed")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(_format_table(results))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2)
    return results


if __name__ == "__main__":
    main()
