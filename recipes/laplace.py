"""A diagonal Laplace approximation for a zoo MLP, with predictive uncertainty.

A zoo MLP (1-20-20-1, tanh) is fitted to noisy `sin(x)` observed on two intervals,
`[-3, -1]` and `[1, 3]`, generated here; the gap between them and the region beyond are
unobserved. The Laplace approximation replaces the posterior over the weights by a
Gaussian at the fitted weights `w*` whose precision is the Hessian of the negative log
posterior; here its diagonal:

    precision = diag(GGN of the negative log-likelihood) + prior_precision,

with the GGN diagonal from `model.ggn_diagonal` (or, with `--curvature hessian`, the
exact Hessian diagonal, clipped at zero). The likelihood is Gaussian with the noise's
standard deviation `sigma`, so its GGN is that of the summed squared error divided by
`2 sigma^2`. The prior precision is chosen by maximising the Laplace approximation of the
marginal likelihood over a grid. The predictive is linearised (the "GLM" predictive,
Immer et al. 2021): `var f(x) = sum_i J_i(x)^2 / precision_i`.

The recipe prints the predictive standard deviation (and the error of the mean against
`sin(x)`) averaged over the data, the gap and the region beyond, and plots mean and two
standard deviations to `--out/laplace.png`.

Run `python recipes/laplace.py` (about 10 seconds on 2 CPU cores), or `--quick` for CI.
"""

import argparse
import json
import pathlib

import curvzoo as cz
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jax.flatten_util import ravel_pytree


SIGMA = 0.1  # the observation noise's standard deviation, known here


def data(key, size: int):
    k_side, k_x, k_noise = jr.split(key, 3)
    side = jnp.where(jr.bernoulli(k_side, 0.5, (size, 1)), 1.0, -1.0)
    x = side * jr.uniform(k_x, (size, 1), minval=1.0, maxval=3.0)
    y = jnp.sin(x) + SIGMA * jr.normal(k_noise, (size, 1))
    return x, y


def fit(model, batch, num_steps: int):
    optimiser = optax.adam(1e-2)
    state = optimiser.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, state):
        grads = eqx.filter_grad(cz.losses.mse)(model, batch)
        updates, state = optimiser.update(grads, state)
        return eqx.apply_updates(model, updates), state

    for _ in range(num_steps):
        model, state = step(model, state)
    return model


def log_evidence(prior_precision, curvature, weights, nll):
    """The Laplace approximation of log p(data | prior precision), up to a constant:
    `-nll - lambda/2 |w|^2 + P/2 log lambda - 1/2 sum log(curvature + lambda)`."""
    return (
        -nll
        - 0.5 * prior_precision * jnp.sum(weights**2)
        + 0.5 * weights.size * jnp.log(prior_precision)
        - 0.5 * jnp.sum(jnp.log(curvature + prior_precision))
    )


def main(
    quick: bool = False, seed: int = 0, curvature: str = "ggn", out: str = "laplace_output"
) -> dict:
    batch = data(jr.key(seed), 80)
    model = cz.MLP(1, 1, 20, 2, activation=jnp.tanh, key=jr.key(seed + 1))
    model = fit(model, batch, 500 if quick else 4000)

    # Negative log-likelihood: sum (f - y)^2 / (2 sigma^2), so its curvature is the
    # summed-MSE curvature divided by 2 sigma^2.
    summed = cz.losses.MSE(reduction="sum")
    if curvature == "ggn":
        diagonal = model.ggn_diagonal(summed, batch)
    else:
        diagonal = jax.tree.map(
            lambda d: jnp.maximum(d, 0.0), model.hessian_diagonal(summed, batch)
        )
    params, static = eqx.partition(model, eqx.is_inexact_array)
    weights, unravel = ravel_pytree(params)
    nll_curvature = ravel_pytree(diagonal)[0] / (2 * SIGMA**2)
    nll = float(summed(model, batch)) / (2 * SIGMA**2)

    grid = jnp.logspace(-3, 3, 61)
    evidence = jax.vmap(lambda lam: log_evidence(lam, nll_curvature, weights, nll))(grid)
    prior_precision = float(grid[jnp.argmax(evidence)])
    posterior_variance = 1.0 / (nll_curvature + prior_precision)

    xs = jnp.linspace(-6, 6, 241)[:, None]

    def predict(vector, x):
        return eqx.combine(unravel(vector), static)(x)[0]

    means = jax.vmap(lambda x: predict(weights, x))(xs)
    jacobians = jax.vmap(jax.grad(predict), (None, 0))(weights, xs)  # (points, P)
    function_variance = jacobians**2 @ posterior_variance
    std = jnp.sqrt(function_variance + SIGMA**2)

    print(
        f"fitted: train MSE {float(cz.losses.mse(model, batch)):.4f}; {curvature} diagonal; "
        f"prior precision {prior_precision:.3g} (maximises the Laplace evidence)"
    )
    print("\npredictive standard deviation (noise included), averaged over each region:\n")
    x = np.asarray(xs[:, 0])
    regions = {
        "data": ((np.abs(x) >= 1) & (np.abs(x) <= 3)),
        "gap": np.abs(x) < 0.8,
        "outside": np.abs(x) > 4,
    }
    report = []
    print(f"{'region':>8} {'x':>20} {'mean std':>9} {'mean |error|':>13}")
    for region, where in regions.items():
        row = dict(
            region=region,
            std=float(np.mean(np.asarray(std)[where])),
            error=float(np.mean(np.abs(np.asarray(means)[where] - np.sin(x[where])))),
        )
        report.append(row)
        span = {"data": "[-3, -1] and [1, 3]", "gap": "(-0.8, 0.8)", "outside": "|x| > 4"}
        print(f"{region:>8} {span[region]:>20} {row['std']:>9.3f} {row['error']:>13.3f}")
    by_region = {row["region"]: row for row in report}
    if by_region["outside"]["std"] < by_region["data"]["std"]:
        print(
            "\nFar from the data the predictive is narrower than on it although the mean "
            "is off:\nthe tanh units saturate, the output hardly depends on the weights "
            "(small Jacobians),\na known limit of a diagonal, linearised Laplace."
        )

    directory = pathlib.Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    result = {
        "curvature": curvature,
        "prior_precision": prior_precision,
        "points": report,
        "x": np.asarray(xs[:, 0]).tolist(),
        "mean": np.asarray(means).tolist(),
        "std": np.asarray(std).tolist(),
    }
    (directory / "laplace.json").write_text(json.dumps(result))
    plot(batch, xs, means, std, directory / "laplace.png", curvature)
    print(f"\nwrote {directory / 'laplace.json'} and {directory / 'laplace.png'}")
    return result


def plot(batch, xs, means, std, path, curvature):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.asarray(xs[:, 0])
    fig, ax = plt.subplots(figsize=(7.2, 4.4), constrained_layout=True)
    ax.fill_between(x, means - 2 * std, means + 2 * std, alpha=0.25, label="mean +- 2 std")
    ax.plot(x, means, label="predictive mean")
    ax.plot(x, np.sin(x), "k--", lw=1, label="sin(x)")
    ax.scatter(np.asarray(batch[0][:, 0]), np.asarray(batch[1][:, 0]), s=8, c="k", label="data")
    ax.set_ylim(-3, 3)
    ax.set_xlabel("x")
    ax.set_title(f"Diagonal Laplace ({curvature.upper()} diagonal), linearised predictive")
    ax.legend(loc="lower left", fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="fewer steps (CI)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the data split, the model and the training"
    )
    parser.add_argument(
        "--curvature",
        default="ggn",
        choices=["ggn", "hessian"],
        help="the diagonal that sets the posterior precision",
    )
    parser.add_argument(
        "--out", default="laplace_output", help="directory for the figure and the JSON results"
    )
    args = parser.parse_args()
    main(quick=args.quick, seed=args.seed, curvature=args.curvature, out=args.out)
