"""Diagonal second-order optimizers from `curvzoo.optim`, against Adam.

Three optax transformations from `curvzoo.optim` train the same model as Adam:

- `diagonal_newton`: the gradient divided by the magnitude of the exact Hessian
  diagonal (`curvzoo.hessian_diagonal`), here with AdaHessian's running means and a
  trust radius;
- `adahessian`: AdaHessian (Yao et al. 2021), with one Hutchinson probe per step;
- `sophia`: Sophia-G (Liu et al. 2023), with the Fisher diagonal at labels drawn from
  the model (`curvzoo.fisher_diagonal`), refreshed every 10 steps, and a clipped step.

Each is built with `loss=`, so that its `update` computes the curvature from
`model=`, `batch=` and `key=`, jitted into the training step with the gradient.

The problem is a small regression, generated here: a zoo MLP (1-32-32-1, tanh) fits
`sin(3x)` plus noise. The recipe first shows why a diagonal Newton step overshoots at
initialisation (the curvature along the step, from one Hessian-vector product, against
what the diagonal predicts), then prints the training loss of each optimizer after the
first few steps and at checkpoints, with each one's highest loss after the start, and
plots the curves to `--out/diagonal_newton.png`.

Run `python recipes/diagonal_newton.py` (about 15 seconds on 2 CPU cores), or `--quick`
for CI.
"""

import argparse
import json
import pathlib

import curvzoo as cz
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax


# ## The problem


def regression_data(key, size: int = 256):
    k_x, k_noise = jr.split(key)
    x = jr.uniform(k_x, (size, 1), minval=-2.0, maxval=2.0)
    y = jnp.sin(3 * x) + 0.1 * jr.normal(k_noise, (size, 1))
    return x, y


LOSS = cz.losses.mse


# ## The optimizers
#
# Learning rates and settings were picked on this problem from a small grid (learning
# rates 0.01-1, `eps` 1e-4-0.1, trust radii 0.05-1, `gamma` 0.01-0.1); the page lists
# what the alternatives did.

OPTIMIZERS = {
    "adam": ("Adam", lambda: optax.with_extra_args_support(optax.adam(1e-2))),
    "newton": (
        "diagonal Newton",
        lambda: cz.optim.diagonal_newton(
            0.1, eps=1e-2, trust_radius=0.1, b1=0.9, b2=0.999, loss=LOSS
        ),
    ),
    "adahessian": ("AdaHessian (1 probe)", lambda: cz.optim.adahessian(0.1, eps=1e-2, loss=LOSS)),
    "sophia": ("Sophia-G", lambda: cz.optim.sophia(1e-2, gamma=0.05, loss=LOSS)),
}
SETTINGS = {
    "adam": "lr 0.01",
    "newton": "lr 0.1, eps 0.01, trust radius 0.1, b1 0.9, b2 0.999",
    "adahessian": "lr 0.1, eps 0.01, b1 0.9, b2 0.999",
    "sophia": "lr 0.01, gamma 0.05, k 10, b1 0.965, b2 0.99",
}


def run(kind: str, model, batch, num_steps: int, seed: int) -> list[float]:
    """Train with `OPTIMIZERS[kind]`; the loss before every step and after the last."""
    optimiser = OPTIMIZERS[kind][1]()
    state = optimiser.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, state, key):
        value, grads = eqx.filter_value_and_grad(LOSS)(model, batch)
        updates, state = optimiser.update(grads, state, model=model, batch=batch, key=key)
        return eqx.apply_updates(model, updates), state, value

    losses = []
    key = jr.key(seed + 1)
    for i in range(num_steps):
        model, state, value = step(model, state, jr.fold_in(key, i))
        losses.append(float(value))
    losses.append(float(LOSS(model, batch)))
    return losses


# ## Why a diagonal Newton step overshoots
#
# Each entry's step `-g_i / |d_i|` minimises the loss along its own coordinate. Along
# the whole step `p` the curvature is `p^T H p`, which one Hessian-vector product gives;
# the diagonal alone predicts `sum |d| p^2`. Where they differ by a large factor, the
# coordinates are coupled and their steps add up.


def overshoot(model, batch, eps: float, learning_rate: float, trust_radius: float) -> dict:
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def f(p):
        return LOSS(eqx.combine(p, static), batch)

    grads = jax.grad(f)(params)
    diagonal = cz.hessian_diagonal(model, LOSS, batch)
    step = jax.tree.map(lambda g, d: -g / (jnp.abs(d) + eps), grads, diagonal)
    curvature = jax.jvp(jax.grad(f), (params,), (step,))[1]

    def dot(a, b):
        return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    def moved(scale, clip=None):
        def one(p, s):
            s = scale * s
            return p + (s if clip is None else jnp.clip(s, -clip, clip))

        return float(f(jax.tree.map(one, params, step)))

    flat = jnp.concatenate([jnp.ravel(d) for d in jax.tree.leaves(diagonal)])
    slope, along = float(dot(grads, step)), float(dot(step, curvature))
    return {
        "parameters": int(flat.size),
        "negative_fraction": float(jnp.mean(flat < 0)),
        "below_eps_fraction": float(jnp.mean(jnp.abs(flat) < eps)),
        "pHp": along,
        "diagonal_pHp": float(dot(jax.tree.map(jnp.abs, diagonal), jax.tree.map(jnp.square, step))),
        "best_scale": -slope / along,
        "loss": float(f(params)),
        "loss_after_step": moved(learning_rate),
        "loss_after_clipped_step": moved(learning_rate, learning_rate * trust_radius),
    }


# ## Main


def main(quick: bool = False, seed: int = 0, out: str = "diagonal_newton_output") -> dict:
    num_steps = 150 if quick else 1500
    batch = regression_data(jr.key(seed))
    model = cz.MLP(1, 1, 32, 2, activation=jnp.tanh, key=jr.key(seed + 2))

    check = overshoot(model, batch, eps=1e-2, learning_rate=0.1, trust_radius=0.1)
    print(
        f"at initialisation ({check['parameters']} parameters): "
        f"{check['negative_fraction']:.0%} of the Hessian diagonal is negative, "
        f"{check['below_eps_fraction']:.0%} below eps = 0.01 in magnitude.\n"
        f"along the damped Newton step p = -g / (|d| + 0.01): p^T H p = {check['pHp']:.4g}, "
        f"the diagonal predicts sum |d| p^2 = {check['diagonal_pHp']:.4g} "
        f"({check['pHp'] / check['diagonal_pHp']:.0f}x less);\n"
        f"the best step along p is {check['best_scale']:.3g} p. "
        f"Loss {check['loss']:.3f} -> {check['loss_after_step']:.3f} after 0.1 p, "
        f"-> {check['loss_after_clipped_step']:.3f} with each entry clipped to 0.1 * 0.1.\n"
    )

    curves = {kind: run(kind, model, batch, num_steps, seed) for kind in OPTIMIZERS}
    names = {kind: name for kind, (name, _) in OPTIMIZERS.items()}
    marks = sorted({0, 1, 2, 3, 5, 10, num_steps // 10, num_steps // 4, num_steps // 2, num_steps})
    width = 22
    print(f"training loss (MSE) after each number of steps, {num_steps} steps:")
    for kind in OPTIMIZERS:
        print(f"  {names[kind]}: {SETTINGS[kind]}")
    print()
    print(f"{'step':>8}" + "".join(f"{names[k]:>{width}}" for k in curves))
    for i in marks:
        print(f"{i:>8}" + "".join(f"{curves[k][i]:>{width}.5f}" for k in curves))
    highest = {k: max(range(1, len(c)), key=c.__getitem__) for k, c in curves.items()}
    print(
        f"{'highest':>8}"
        + "".join(f"{f'{curves[k][i]:.5f} @ {i}':>{width}}" for k, i in highest.items())
    )

    directory = pathlib.Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    result = {"settings": SETTINGS, "overshoot": check, "losses": curves}
    (directory / "diagonal_newton.json").write_text(json.dumps(result))
    plot(curves, names, directory / "diagonal_newton.png")
    print(f"\nwrote {directory / 'diagonal_newton.json'} and {directory / 'diagonal_newton.png'}")
    return result


def plot(curves, names, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (whole, start) = plt.subplots(
        1, 2, figsize=(10, 4.2), width_ratios=(2, 1), constrained_layout=True
    )
    for kind, losses in curves.items():
        whole.plot(losses, label=names[kind], lw=1.2)
        start.plot(losses[:21], marker=".", label=names[kind], lw=1.2)
    for ax in (whole, start):
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    whole.set_ylabel("training loss (MSE)")
    whole.set_title("Fitting sin(3x) with an MLP")
    start.set_title("The first 20 steps")
    whole.legend()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="150 steps instead of 1500, for CI")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the data, the model and the probes"
    )
    parser.add_argument(
        "--out",
        default="diagonal_newton_output",
        help="directory for diagonal_newton.json and diagonal_newton.png",
    )
    args = parser.parse_args()
    main(quick=args.quick, seed=args.seed, out=args.out)
