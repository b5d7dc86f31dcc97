"""Optimal Brain Damage against magnitude pruning, on handwritten digits.

A zoo MLP (64-64-64-10, tanh) is trained on scikit-learn's bundled 8x8 digits (no
download). Then its weight matrices are pruned, globally and without retraining, by two
criteria:

- magnitude: remove the weights with the smallest `|w|`;
- Optimal Brain Damage (LeCun, Denker and Solla 1990): remove the weights with the
  smallest saliency `0.5 * diag(H) * w**2`, the second-order estimate of how much the
  training loss rises when the weight is set to zero, with the exact Hessian diagonal
  from `model.hessian_diagonal` (and, as a variant, the GGN diagonal, which is never
  negative).

The recipe prints held-out accuracy at sparsities from 0 to 95% for each criterion and
plots it to `--out/obd_pruning.png` (numbers in `obd_pruning.json`).

Run `python recipes/obd_pruning.py` (about 10 seconds on 2 CPU cores), or `--quick` for CI.
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


# ## Data: scikit-learn's bundled digits


def digits(seed: int, test_fraction: float = 0.3):
    """Inputs scaled to `[0, 1]` and integer labels, split at random into train and test."""
    from sklearn.datasets import load_digits

    data = load_digits()
    inputs = np.asarray(data.data, np.float32) / 16.0
    labels = np.asarray(data.target, np.int32)
    order = np.random.default_rng(seed).permutation(len(labels))
    split = int(len(labels) * (1 - test_fraction))
    train, test = order[:split], order[split:]
    return (jnp.asarray(inputs[train]), jnp.asarray(labels[train])), (
        jnp.asarray(inputs[test]),
        jnp.asarray(labels[test]),
    )


def train(model, batch, num_steps: int):
    loss = cz.losses.cross_entropy
    optimiser = optax.adam(3e-3)
    state = optimiser.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, state):
        grads = eqx.filter_grad(loss)(model, batch)
        updates, state = optimiser.update(grads, state)
        return eqx.apply_updates(model, updates), state

    for _ in range(num_steps):
        model, state = step(model, state)
    return model


@eqx.filter_jit
def accuracy(model, batch):
    inputs, labels = batch
    return jnp.mean(jnp.argmax(jax.vmap(model)(inputs), axis=-1) == labels)


# ## Pruning


def weights_of(tree):
    """The weight matrices of an MLP-shaped tree (biases are not pruned)."""
    return [layer.weight for layer in tree.layers]


def prune(model, scores, sparsity: float):
    """Zero the fraction `sparsity` of all weight entries with the lowest `scores`
    (one global ranking over every weight matrix)."""
    flat = jnp.concatenate([s.reshape(-1) for s in scores])
    count = int(round(sparsity * flat.size))
    if count == 0:
        return model
    threshold_index = jnp.argsort(flat)[:count]
    keep = jnp.ones(flat.size, bool).at[threshold_index].set(False)
    masks, offset = [], 0
    for s in scores:
        masks.append(keep[offset : offset + s.size].reshape(s.shape))
        offset += s.size
    pruned = [w * m for w, m in zip(weights_of(model), masks)]
    return eqx.tree_at(weights_of, model, pruned)


def main(quick: bool = False, seed: int = 0, out: str = "obd_pruning_output") -> dict:
    train_batch, test_batch = digits(seed)
    model = cz.MLP(64, 10, 64, 2, activation=jnp.tanh, key=jr.key(seed))
    model = train(model, train_batch, 200 if quick else 1500)
    loss = cz.losses.cross_entropy
    print(
        f"trained: train loss {float(loss(model, train_batch)):.4f}, "
        f"test accuracy {float(accuracy(model, test_batch)):.4f}"
    )

    hessian = model.hessian_diagonal(loss, train_batch)
    ggn = model.ggn_diagonal(loss, train_batch)
    weights = weights_of(model)
    criteria = {
        "magnitude": [jnp.abs(w) for w in weights],
        "OBD (Hessian)": [0.5 * h * w**2 for h, w in zip(weights_of(hessian), weights)],
        "OBD (GGN)": [0.5 * g * w**2 for g, w in zip(weights_of(ggn), weights)],
    }
    negative = float(
        np.mean(np.concatenate([np.asarray(h).ravel() < 0 for h in weights_of(hessian)]))
    )
    print(f"negative Hessian-diagonal entries among the weights: {100 * negative:.1f}%")

    sparsities = [0.0, 0.5, 0.8, 0.9, 0.95] if quick else [
        0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95
    ]  # fmt: skip
    table = {name: [] for name in criteria}
    for sparsity in sparsities:
        for name, scores in criteria.items():
            table[name].append(float(accuracy(prune(model, scores, sparsity), test_batch)))

    names = list(criteria)
    print("\nheld-out accuracy after pruning (no retraining):\n")
    print(f"{'sparsity':>9}" + "".join(f"{name:>16}" for name in names))
    for i, sparsity in enumerate(sparsities):
        print(f"{sparsity:>9.2f}" + "".join(f"{table[name][i]:>16.4f}" for name in names))
    wins = [
        s for i, s in enumerate(sparsities) if table["OBD (Hessian)"][i] > table["magnitude"][i]
    ]
    print(f"\nOBD (Hessian) beats magnitude at sparsities {wins}")

    directory = pathlib.Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    result = {"sparsities": sparsities, "accuracy": table, "negative_fraction": negative}
    (directory / "obd_pruning.json").write_text(json.dumps(result, indent=1))
    plot(sparsities, table, directory / "obd_pruning.png")
    print(f"wrote {directory / 'obd_pruning.json'} and {directory / 'obd_pruning.png'}")
    return result


def plot(sparsities, table, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), constrained_layout=True)
    for name, values in table.items():
        ax.plot(sparsities, values, marker="o", ms=4, label=name)
    ax.set_xlabel("fraction of weights removed")
    ax.set_ylabel("held-out accuracy (no retraining)")
    ax.set_title("Pruning an MLP on the digits: OBD against magnitude")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="fewer steps and sparsities (CI)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the data split, the model and the training"
    )
    parser.add_argument(
        "--out", default="obd_pruning_output", help="directory for the figure and the JSON results"
    )
    args = parser.parse_args()
    main(quick=args.quick, seed=args.seed, out=args.out)
