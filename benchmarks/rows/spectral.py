"""Row `spectral`: curvzoo's spectral tools against the textbook methods.

Three problems, float32, cross-entropy:

- `mlp2`: the `mlp2` model and batch (MLP 784-256-256-10, batch 128) at
  initialisation, random labels;
- `gru`: the zoo GRU at the main job's size (64 units, T = 25, batch 128), input 8,
  10 classes on the last state, at initialisation, random labels;
- `mlp2-t`: `mlp2` after 200 full-batch Adam steps (learning rate 1e-3) on the labels
  of a second, random MLP of the same shape: the spectrum of a trained classifier, a
  few outliers above the bulk.

On each:

1. The top eigenvalue of the Hessian to a relative residual
   `|H v - lambda v| <= 1e-4 |lambda|`: `curvzoo.hessian_eigenvalues` (thick-restart
   Lanczos) against power iteration with the same stopping rule, and against power
   iteration with PyHessian's rule (stop when the eigenvalue changes by less than
   1e-4, relatively), whose true residual is reported too. Power iteration takes the
   same linearised Hessian-vector product inside one compiled loop, so the comparison
   is of the algorithms. Products counted (Lanczos' include one for the final
   residual); `reached`: the method's own rule met (power iteration gives up after
   4000 products).
2. The trace: exact, as the sum of the exact diagonal (`curvzoo.hessian_diagonal`),
   against Hutchinson's estimate with 100 probes (the sum of
   `curvzoo.hutchinson_diagonal`) and `curvzoo.hessian_trace` with 99 products, as
   Hutch++ (33 sketch, 33 for its span, 33 probes) and with `sketch_size=0` (plain
   Hutchinson): time, relative error `|estimate - exact| / |exact|` and the reported
   `stderr / |exact|`, both averaged over 5 keys.

Times are medians of `--repeats` calls after a warm-up call (compilation excluded).
Reported (no target).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jax.flatten_util import ravel_pytree

from ..models import adam_steps, build, num_params
from ..options import Options
from ..timing import device_kind, median_seconds


ROWS = ("spectral",)
SUMMARY = {
    "spectral": "top Hessian eigenvalue (Lanczos vs power iteration) and trace (exact, "
    "Hutchinson, Hutch++) on mlp2, a GRU and a trained mlp2 (slow: minutes)",
}
TOL = 1e-4
MAX_POWER = 4000
TRAIN_STEPS = 200
KEYS = 5
HUTCHINSON_PROBES = 100
TRACE_MATVECS = 99


def _problems(seed: int):
    """`(name, model, batch)` of the three problems (see the module docstring)."""
    import curvzoo as cz

    model, batch = build("mlp2", seed)
    yield "mlp2", model, batch
    yield "gru", *build("gru", seed, steps=25, hidden=64, batch_size=128)
    teacher, _ = build("mlp2", seed + 1)
    inputs = batch[0]
    taught = (inputs, jnp.argmax(jax.vmap(teacher)(inputs), axis=-1))
    yield "mlp2-t", adam_steps(model, cz.losses.cross_entropy, taught, TRAIN_STEPS), taught


@eqx.filter_jit
def power_iteration(model, loss, batch, key, tol: float, max_steps: int, pyhessian_rule: bool):
    """Power iteration on the Hessian of `loss(model, batch)`, one linearised product
    per step, from a normal start vector drawn with `key`. Stops when
    `|H v - lambda v| <= tol |lambda|` (or, with `pyhessian_rule`, when `lambda` changes
    by less than `tol` relatively, as PyHessian's `eigenvalues`), or after `max_steps`
    products.

    **Returns:** `(lambda, products, |H v - lambda v| / |lambda|)`.
    """
    params, static = eqx.partition(model, eqx.is_inexact_array)
    flat, unravel = ravel_pytree(params)
    gradient = jax.grad(lambda v: loss(eqx.combine(unravel(v), static), batch))
    _, hvp = jax.linearize(gradient, flat)

    def rayleigh(vector, image):
        value = jnp.vdot(vector, image)
        return value, jnp.linalg.norm(image - value * vector) / jnp.abs(value)

    def step(state):
        _, image, value, _, steps = state
        vector = image / jnp.linalg.norm(image)
        image = hvp(vector)
        new_value, relative = rayleigh(vector, image)
        if pyhessian_rule:
            done = jnp.abs(new_value - value) / (jnp.abs(value) + 1e-6) < tol
        else:
            done = relative <= tol
        return vector, image, new_value, done, steps + 1

    start = jr.normal(key, flat.shape, flat.dtype)
    vector = start / jnp.linalg.norm(start)
    image = hvp(vector)
    value, _ = rayleigh(vector, image)
    state = (vector, image, value, jnp.asarray(False), jnp.asarray(1))
    vector, image, value, _, steps = jax.lax.while_loop(
        lambda s: ~s[3] & (s[4] < max_steps), step, state
    )
    return value, steps, rayleigh(vector, image)[1]


def _top_eigenvalue(model, loss, batch, key, repeats: int) -> dict:
    """`{method: figures}` for Lanczos and both power iterations."""
    import curvzoo as cz

    def lanczos():
        return cz.hessian_eigenvalues(model, loss, batch, key=key, tol=TOL)

    pairs = lanczos()
    value = float(pairs.eigenvalues[0])
    methods = {
        "lanczos": {
            "eigenvalue": value,
            "products": int(pairs.num_matvecs),
            "relative_residual": float(pairs.residuals[0]) / abs(value),
            "converged": bool(pairs.converged),
            "seconds": median_seconds(lanczos, repeats),
        }
    }
    for name, rule in (("power", False), ("power-pyhessian", True)):

        def power(rule=rule):
            return power_iteration(model, loss, batch, key, TOL, MAX_POWER, rule)

        value, steps, relative = power()
        methods[name] = {
            "eigenvalue": float(value),
            "products": int(steps),
            "relative_residual": float(relative),
            "converged": bool(steps < MAX_POWER if rule else relative <= TOL),
            "seconds": median_seconds(power, repeats),
        }
    return methods


def _trace(model, loss, batch, seed: int, repeats: int) -> dict:
    """The exact trace and `{estimator: figures}` for the three estimators."""
    import curvzoo as cz

    def exact_trace():
        return cz.analysis.trace(cz.hessian_diagonal(model, loss, batch))["total"]

    exact = float(exact_trace())

    def hutchinson(key):
        diagonal = cz.hutchinson_diagonal(model, loss, batch, key=key, num_probes=HUTCHINSON_PROBES)
        return sum(jnp.sum(leaf) for leaf in jax.tree.leaves(diagonal)), None

    def hessian_trace(key, sketch_size=None):
        estimate = cz.hessian_trace(
            model, loss, batch, key=key, num_matvecs=TRACE_MATVECS, sketch_size=sketch_size
        )
        return estimate.trace, estimate.stderr

    estimators = {}
    for name, estimator, products in (
        ("hutchinson", hutchinson, HUTCHINSON_PROBES),
        ("hutch++", hessian_trace, TRACE_MATVECS),
        ("sketch-0", lambda key: hessian_trace(key, sketch_size=0), TRACE_MATVECS),
    ):
        runs = [estimator(jr.key(seed + k)) for k in range(KEYS)]
        errors = [abs(float(trace) - exact) / abs(exact) for trace, _ in runs]
        stderrs = [float(stderr) / abs(exact) for _, stderr in runs if stderr is not None]
        estimators[name] = {
            "products": products,
            "mean_trace": sum(float(trace) for trace, _ in runs) / KEYS,
            "relative_error": sum(errors) / KEYS,
            "relative_stderr": sum(stderrs) / KEYS if stderrs else None,
            "seconds": median_seconds(lambda e=estimator: e(jr.key(seed)), repeats),
        }
    return {
        "exact": exact,
        "exact_s": median_seconds(exact_trace, repeats),
        "estimators": estimators,
    }


def measure(row: str, options: Options) -> dict:
    """Both comparisons on the three problems. Cost: three to five minutes on 2 CPU
    cores at 7 repeats, most of it the trace estimators (every call of which takes
    about a second)."""
    import curvzoo as cz

    loss = cz.losses.cross_entropy
    # The start vectors' key: at the default seed, that of the figures quoted in
    # `curvzoo.hessian_eigenvalues`' docstring.
    key = jr.key(options.seed + 1)
    problems = []
    for name, model, batch in _problems(options.seed):
        problems.append(
            {
                "name": name,
                "params": num_params(model),
                "eigenvalue": _top_eigenvalue(model, loss, batch, key, options.repeats),
                "trace": _trace(model, loss, batch, options.seed, options.repeats),
            }
        )
    return {
        "row": row,
        "tol": TOL,
        "keys": KEYS,
        "repeats": options.repeats,
        "problems": problems,
        "target": "(reported)",
        "target_met": None,
        "device": device_kind(),
    }


def headline(result: dict) -> list[tuple[str, float, str]]:
    """The figures an A/B comparison reports for this row."""
    figures = []
    for p in result["problems"]:
        eigen, trace = p["eigenvalue"], p["trace"]["estimators"]
        figures += [
            (f"{p['name']} Lanczos", eigen["lanczos"]["seconds"] * 1e3, "ms"),
            (f"{p['name']} Lanczos products", eigen["lanczos"]["products"], ""),
            (f"{p['name']} power", eigen["power"]["seconds"] * 1e3, "ms"),
            (f"{p['name']} Hutch++", trace["hutch++"]["seconds"] * 1e3, "ms"),
            (f"{p['name']} Hutch++ error", trace["hutch++"]["relative_error"], ""),
        ]
    return figures


_EIGEN_LABELS = {
    "lanczos": "Lanczos (curvzoo)",
    "power": "power, same rule",
    "power-pyhessian": "power, PyHessian rule",
}
_TRACE_LABELS = {
    "hutchinson": "Hutchinson, 100 probes",
    "hutch++": "hessian_trace, Hutch++, 99",
    "sketch-0": "hessian_trace, sketch_size=0, 99",
}


def format_result(result: dict, verdict: str) -> str:
    """The row as text: the eigenvalue table, then the trace table."""
    header = (
        f"{'problem':<8} {'P':>7}  {'method':<22} {'eigenvalue':>11} {'products':>8} "
        f"{'rel. resid.':>11} {'ms':>8}  reached"
    )
    lines = [
        f"spectral: top Hessian eigenvalue to a relative residual of {result['tol']:g} "
        f"(medians of {result['repeats']} calls)",
        header,
        "-" * len(header),
    ]
    for p in result["problems"]:
        for method, f in p["eigenvalue"].items():
            lines.append(
                f"{p['name']:<8} {p['params']:>7}  {_EIGEN_LABELS[method]:<22} "
                f"{f['eigenvalue']:11.6f} {f['products']:>8} {f['relative_residual']:11.2e} "
                f"{f['seconds'] * 1e3:8.1f}  {'yes' if f['converged'] else 'no'}"
            )
    header = (
        f"{'problem':<8} {'method':<32} {'trace':>10} {'ms':>8} {'rel. error':>10} "
        f"{'stderr':>8} {'products':>8}"
    )
    lines += [
        "",
        f"spectral: trace of the Hessian (rel. error: mean |error| / |trace|, stderr: mean "
        f"reported stderr / |trace|, over {result['keys']} keys; trace: their mean)",
        header,
        "-" * len(header),
    ]
    for p in result["problems"]:
        trace = p["trace"]
        lines.append(
            f"{p['name']:<8} {'exact diagonal, summed':<32} {trace['exact']:10.5f} "
            f"{trace['exact_s'] * 1e3:8.1f} {'-':>10} {'-':>8} {'-':>8}"
        )
        for method, f in trace["estimators"].items():
            stderr = "-" if f["relative_stderr"] is None else f"{f['relative_stderr']:.2e}"
            lines.append(
                f"{p['name']:<8} {_TRACE_LABELS[method]:<32} {f['mean_trace']:10.5f} "
                f"{f['seconds'] * 1e3:8.1f} {f['relative_error']:10.2e} {stderr:>8} "
                f"{f['products']:>8}"
            )
    lines.append(f"  target {result['target']}: {verdict}")
    return "\n".join(lines)
