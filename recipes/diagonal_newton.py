"""A diagonal second-order optimizer as an optax transformation, against Adam.

`diagonal_newton` preconditions a momentum of the gradient with a running root mean
square of a Hessian diagonal, as AdaHessian does (Yao et al. 2021):

    m <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) d^2,
    update = -lr * m_hat / (sqrt(v_hat) + eps),

where `d` is a Hessian diagonal passed to `update` as the extra argument `curvature`.
Here `d` comes from `curvzoo.hutchinson_diagonal` with one Rademacher probe per step
(AdaHessian), or from the exact `model.hessian_diagonal`. Both are jitted into the
training step with the gradient.

The problem is a small regression, generated here: a zoo MLP (1-32-32-1, tanh) fits
`sin(3x)` plus noise. The recipe prints the training loss of Adam and of both diagonal
variants at a few steps, and plots the curves to `--out/diagonal_newton.png`.

Run `python recipes/diagonal_newton.py` (about 10 seconds on 2 CPU cores), or `--quick` for CI.
"""

import argparse
import json
import pathlib
from typing import NamedTuple

import curvzoo as cz
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax


# ## The optax transformation


class DiagonalNewtonState(NamedTuple):
    count: jax.Array
    momentum: optax.Updates
    curvature: optax.Updates


def scale_by_diagonal_curvature(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-2
) -> optax.GradientTransformationExtraArgs:
    """Divide a momentum of the updates by a running RMS of a curvature diagonal.

    `update(updates, state, params, *, curvature)` takes `curvature`, a PyTree like
    `updates` (a Hessian diagonal from curvzoo, say); both moments are bias-corrected
    as in Adam. `eps` damps the step where the curvature is small: with one
    Hutchinson probe an entry's estimate can be near zero by chance, and `1e-4` (the
    AdaHessian paper's value) let the first steps blow up here, so the default is
    `1e-2`.
    """

    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return DiagonalNewtonState(jnp.zeros((), jnp.int32), zeros, zeros)

    def update(updates, state, params=None, *, curvature, **extra):
        del params, extra
        count = state.count + 1
        momentum = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.momentum, updates)
        second = jax.tree.map(lambda v, d: b2 * v + (1 - b2) * d**2, state.curvature, curvature)
        m_hat = 1 - b1**count
        v_hat = 1 - b2**count
        scaled = jax.tree.map(
            lambda m, v: (m / m_hat) / (jnp.sqrt(v / v_hat) + eps), momentum, second
        )
        return scaled, DiagonalNewtonState(count, momentum, second)

    return optax.GradientTransformationExtraArgs(init, update)


def diagonal_newton(learning_rate: float, **kwargs) -> optax.GradientTransformationExtraArgs:
    """`scale_by_diagonal_curvature(**kwargs)` followed by a step of `-learning_rate`."""
    return optax.chain(
        scale_by_diagonal_curvature(**kwargs), optax.scale_by_learning_rate(learning_rate)
    )


# ## The problem and the training loops


def regression_data(key, size: int = 256):
    k_x, k_noise = jr.split(key)
    x = jr.uniform(k_x, (size, 1), minval=-2.0, maxval=2.0)
    y = jnp.sin(3 * x) + 0.1 * jr.normal(k_noise, (size, 1))
    return x, y


def run(kind: str, model, batch, num_steps: int, learning_rate: float, seed: int) -> list[float]:
    """Train with `kind` in {"adam", "hutchinson", "exact"}; losses at every step."""
    loss = cz.losses.mse
    params = eqx.filter(model, eqx.is_inexact_array)
    optimiser = optax.adam(learning_rate) if kind == "adam" else diagonal_newton(learning_rate)
    state = optimiser.init(params)

    @eqx.filter_jit
    def step(model, state, key):
        value, grads = eqx.filter_value_and_grad(loss)(model, batch)
        if kind == "adam":
            updates, state = optimiser.update(grads, state, model)
        else:
            if kind == "hutchinson":
                curvature = cz.hutchinson_diagonal(model, loss, batch, key=key, num_probes=1)
            else:
                curvature = model.hessian_diagonal(loss, batch)
            updates, state = optimiser.update(grads, state, model, curvature=curvature)
        return eqx.apply_updates(model, updates), state, value

    losses = []
    key = jr.key(seed + 1)
    for i in range(num_steps):
        model, state, value = step(model, state, jr.fold_in(key, i))
        losses.append(float(value))
    return losses


LEARNING_RATES = {"adam": 1e-2, "hutchinson": 0.1, "exact": 0.1}


def main(quick: bool = False, seed: int = 0, out: str = "diagonal_newton_output") -> dict:
    num_steps = 150 if quick else 1500
    batch = regression_data(jr.key(seed))
    model = cz.MLP(1, 1, 32, 2, activation=jnp.tanh, key=jr.key(seed + 2))
    curves = {
        kind: run(kind, model, batch, num_steps, rate, seed)
        for kind, rate in LEARNING_RATES.items()
    }
    marks = sorted({0, num_steps // 10, num_steps // 4, num_steps // 2, num_steps - 1})
    names = {
        "adam": "Adam",
        "hutchinson": "AdaHessian (1 probe)",
        "exact": "exact diagonal",
    }
    print(f"training loss (MSE), {num_steps} steps, learning rates {LEARNING_RATES}:\n")
    print(f"{'step':>6}" + "".join(f"{names[k]:>22}" for k in curves))
    for i in marks:
        print(f"{i:>6}" + "".join(f"{curves[k][i]:>22.5f}" for k in curves))

    directory = pathlib.Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    result = {"learning_rates": LEARNING_RATES, "losses": curves}
    (directory / "diagonal_newton.json").write_text(json.dumps(result))
    plot(curves, names, directory / "diagonal_newton.png")
    print(f"\nwrote {directory / 'diagonal_newton.json'} and {directory / 'diagonal_newton.png'}")
    return result


def plot(curves, names, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), constrained_layout=True)
    for kind, losses in curves.items():
        ax.plot(losses, label=f"{names[kind]} (lr {LEARNING_RATES[kind]:g})")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (MSE)")
    ax.set_title("Fitting sin(3x) with an MLP")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (CI)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="diagonal_newton_output", help="output directory")
    args = parser.parse_args()
    main(quick=args.quick, seed=args.seed, out=args.out)
