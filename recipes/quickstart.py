"""Quickstart: the exact Hessian diagonal of every zoo model.

Builds each model of the zoo (an MLP, Elman/GRU/LSTM recurrent networks, a small CNN) on
generated data, computes the exact diagonal of its loss Hessian with
`model.hessian_diagonal(loss, batch)`, and prints a per-leaf summary: the number of
entries, the median and largest absolute curvature, the fraction of negative entries
and the leaf's share of the trace.

Run it with `python recipes/quickstart.py` (add `--quick` for smaller models).
"""

import argparse
import time

import curvzoo as cz
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np


# ## Generated data for each kind of model


def classification_batch(model, key, batch_size, num_classes):
    """Inputs from a standard normal and labels from a random linear teacher."""
    k_in, k_teacher = jr.split(key)
    if isinstance(model, cz.MLP):
        inputs = jr.normal(k_in, (batch_size, model.in_size))
    elif isinstance(model, cz.RNN):
        inputs = jr.normal(k_in, (batch_size, 12, model.in_size))
    else:
        inputs = jr.normal(k_in, (batch_size, model.in_channels, *model.image_size))
    flat = inputs.reshape(batch_size, -1)
    teacher = jr.normal(k_teacher, (flat.shape[1], num_classes))
    labels = jnp.argmax(flat @ teacher, axis=-1)
    return inputs, labels


# ## A per-leaf summary of a diagonal PyTree


def leaf_summary(diagonal):
    """One row per leaf, computed on the host with numpy (a few small reductions per
    leaf: not worth compiling for each leaf's shape)."""
    rows = []
    paths_and_leaves = [
        (path, np.asarray(leaf)) for path, leaf in jax.tree_util.tree_flatten_with_path(diagonal)[0]
    ]
    trace = sum(float(np.sum(leaf)) for _, leaf in paths_and_leaves)
    for path, leaf in paths_and_leaves:
        rows.append(
            (
                jax.tree_util.keystr(path),
                str(tuple(leaf.shape)),
                float(np.median(np.abs(leaf))),
                float(np.max(np.abs(leaf))),
                float(np.mean(leaf < 0)),
                float(np.sum(leaf)) / trace if trace else float("nan"),
            )
        )
    return rows, trace


def print_summary(name, rows, trace, seconds, num_params):
    print(f"\n{name}: P = {num_params}, trace = {trace:.4g}, {seconds:.2f} s (with compilation)")
    header = ("leaf", "shape", "median |d|", "max |d|", "neg frac", "trace share")
    widths = (-22, 12, 12, 12, 10, 13)
    print("  " + "".join(f"{h:<{-w}}" if w < 0 else f"{h:>{w}}" for h, w in zip(header, widths)))
    for leaf, shape, median, largest, negative, share in rows:
        print(
            f"  {leaf:<22}{shape:>12}{median:>12.3e}{largest:>12.3e}{negative:>10.2f}{share:>13.3f}"
        )


# ## The models, their diagonals, and the summaries


def main(quick: bool = False, seed: int = 0, batch_size: int = 64):
    key = jr.key(seed)
    width = 16 if quick else 32
    num_classes = 4
    keys = jr.split(key, 6)
    models = {
        "MLP (tanh, depth 2)": cz.MLP(10, num_classes, width, 2, key=keys[0]),
        "RNN (Elman)": cz.RNN(3, width // 2, num_classes, cell="elman", key=keys[1]),
        "RNN (GRU)": cz.RNN(3, width // 2, num_classes, cell="gru", key=keys[2]),
        "RNN (LSTM)": cz.RNN(3, width // 2, num_classes, cell="lstm", key=keys[3]),
        "CNN (max pool)": cz.CNN(1, num_classes, 12, channels=(4, 8), key=keys[4]),
    }
    loss = cz.losses.cross_entropy
    for (name, model), k in zip(models.items(), jr.split(keys[5], len(models))):
        batch = classification_batch(model, k, batch_size, num_classes)
        start = time.perf_counter()
        diagonal = jax.block_until_ready(model.hessian_diagonal(loss, batch))
        seconds = time.perf_counter() - start
        num_params = sum(x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array)))
        rows, trace = leaf_summary(diagonal)
        print_summary(name, rows, trace, seconds, num_params)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller models (CI)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the models and the data (default: 0)"
    )
    args = parser.parse_args()
    main(quick=args.quick, seed=args.seed)
