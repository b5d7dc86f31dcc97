"""Curvature of a recurrent network during training, gate by gate.

The main job of curvzoo. A zoo RNN (GRU by default; `--cell elman|lstm`) learns the
adding problem, generated here: each step carries a value in `[0, 1]` and a marker, two
steps are marked (one in each half of the sequence), and the target is the sum of the two
marked values. At several checkpoints during training the recipe computes the exact
Hessian diagonal of the loss on a fixed evaluation batch (`model.hessian_diagonal`, the
recurrent structured kernel where it is the cheaper one) and the exact GGN diagonal
(`model.ggn_diagonal`), and summarises both per gate and per kind of weight (input,
recurrent, bias, readout) with `curvzoo.analysis`.

At the end it prints the per-gate table of the final Hessian diagonal and the curvature
of every group over training, and writes into `--out`:

- `rnn_curvature.json`: every checkpoint's loss and summaries (plain numbers);
- `rnn_curvature.png`: median |diag H| per gate group over training, the GGN's beside
  it, and each kind's share of the trace.

Run `python recipes/rnn_curvature.py` (64 units, 25 steps per sequence, 2000 Adam
steps, 8 checkpoints: 35-50 seconds on 2 CPU cores), or with `--quick` for a smaller
model and fewer steps (about 10 seconds; CI runs it).
"""

import argparse
import json
import pathlib
import time

import curvzoo as cz
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax


# ## The adding problem


def adding_problem(key, batch_size: int, steps: int):
    """Inputs `(batch, steps, 2)`: a value in `[0, 1]` and a 0/1 marker per step, with one
    marked step in each half; targets `(batch, 1)`: the sum of the two marked values."""
    k_values, k_first, k_second = jr.split(key, 3)
    values = jr.uniform(k_values, (batch_size, steps))
    half = steps // 2
    first = jr.randint(k_first, (batch_size,), 0, half)
    second = jr.randint(k_second, (batch_size,), half, steps)
    markers = jax.nn.one_hot(first, steps) + jax.nn.one_hot(second, steps)
    inputs = jnp.stack([values, markers], axis=-1)
    targets = jnp.sum(values * markers, axis=-1, keepdims=True)
    return inputs, targets


# ## Training with checkpoints


def checkpoint_steps(num_steps: int, count: int) -> list[int]:
    """`count` checkpoints from 0 to `num_steps`, denser early (where curvature moves)."""
    fractions = [(i / (count - 1)) ** 2 for i in range(count)]
    return sorted({round(f * num_steps) for f in fractions})


def curvature_at(model, batch, loss):
    """Exact Hessian and GGN diagonals and their summaries, with timings."""
    start = time.perf_counter()
    hessian = jax.block_until_ready(model.hessian_diagonal(loss, batch))
    hessian_seconds = time.perf_counter() - start
    start = time.perf_counter()
    ggn = jax.block_until_ready(model.ggn_diagonal(loss, batch))
    ggn_seconds = time.perf_counter() - start
    return {
        "hessian": cz.analysis.summarize(hessian, model, top_k=5),
        "ggn": cz.analysis.summarize(ggn, model, top_k=5),
        "hessian_seconds": hessian_seconds,
        "ggn_seconds": ggn_seconds,
    }


def train(cell: str, hidden: int, steps: int, num_steps: int, checkpoints: int, seed: int):
    key_model, key_eval, key_train = jr.split(jr.key(seed), 3)
    model = cz.RNN(2, hidden, 1, cell=cell, key=key_model)
    loss = cz.losses.mse
    eval_batch = adding_problem(key_eval, 128, steps)
    optimiser = optax.adam(3e-3)
    state = optimiser.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, state, key):
        batch = adding_problem(key, 64, steps)
        value, grads = eqx.filter_value_and_grad(loss)(model, batch)
        updates, state = optimiser.update(grads, state)
        return eqx.apply_updates(model, updates), state, value

    marks = checkpoint_steps(num_steps, checkpoints)
    records = []
    start = time.perf_counter()
    for i in range(num_steps + 1):
        if i in marks:
            record = {"step": i, "eval_loss": float(loss(model, eval_batch))}
            record.update(curvature_at(model, eval_batch, loss))
            records.append(record)
            print(
                f"[{time.perf_counter() - start:6.1f} s] checkpoint {len(records)}/{len(marks)}"
                f" at step {i:5d}: eval loss {record['eval_loss']:.4f}, Hessian diagonal "
                f"{record['hessian_seconds']:.2f} s, GGN diagonal {record['ggn_seconds']:.2f} s",
                flush=True,
            )
        if i < num_steps:
            model, state, _ = step(model, state, jr.fold_in(key_train, i))
    return model, records


# ## Reporting


def group_table(records: list[dict], which: str) -> str:
    """Median |diagonal| of every group (rows) at every checkpoint (columns)."""
    groups = list(records[0][which]["groups"])
    width = max(len(g) for g in groups) + 2
    lines = [f"{'group':<{width}}" + "".join(f"{'step ' + str(r['step']):>12}" for r in records)]
    lines.append("-" * len(lines[0]))
    for group in groups:
        cells = "".join(f"{r[which]['groups'][group]['median_abs']:>12.3e}" for r in records)
        lines.append(f"{group:<{width}}{cells}")
    return "\n".join(lines)


_STYLES = {"input": "--", "recurrent": "-", "bias": ":", "readout": "-."}
_READOUT_COLOURS = {"readout.weight": "black", "readout.bias": "grey"}


def plot(records: list[dict], path: pathlib.Path, cell: str) -> None:
    """Median |diagonal| per group over training (colour: gate; line style: kind of
    weight), for the Hessian and the GGN; each kind's share of the Hessian's trace; and
    the evaluation loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    groups = list(records[0]["hessian"]["groups"])
    gates = sorted({g.partition(".")[2] for g in groups if not g.startswith("readout")})
    colours = dict(zip(gates, plt.get_cmap("tab10").colors))
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.8), constrained_layout=True)
    for ax, which, title in (
        (axes[0], "hessian", "exact Hessian diagonal"),
        (axes[1], "ggn", "GGN diagonal"),
    ):
        for group in groups:
            kind, _, gate = group.partition(".")
            colour = _READOUT_COLOURS[group] if kind == "readout" else colours[gate]
            values = [r[which]["groups"][group]["median_abs"] for r in records]
            ax.plot(steps, values, _STYLES[kind], color=colour, marker="o", ms=3, label=group)
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel("median |diagonal entry|")
        ax.set_title(f"{cell.upper()}: {title} per group")
    axes[1].legend(fontsize=7, ncol=2, loc="best")
    for kind in records[0]["hessian"]["kinds"]:
        shares = [r["hessian"]["kinds"][kind]["trace_share"] for r in records]
        axes[2].plot(steps, shares, _STYLES[kind], marker="o", ms=3, label=kind)
    axes[2].set_xlabel("training step")
    axes[2].set_ylabel("share of the Hessian's trace")
    axes[2].set_title("trace share per kind of weight")
    axes[2].legend(fontsize=8)
    axes[3].plot(steps, [r["eval_loss"] for r in records], "k-o", ms=3)
    axes[3].set_yscale("log")
    axes[3].set_xlabel("training step")
    axes[3].set_title("evaluation loss (MSE)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(
    cell: str = "gru",
    quick: bool = False,
    seed: int = 0,
    out: str = "rnn_curvature_output",
    num_steps: int | None = None,
) -> dict:
    hidden, steps, default_steps, checkpoints = (16, 10, 300, 4) if quick else (64, 25, 2000, 8)
    num_steps = default_steps if num_steps is None else num_steps
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"`num_steps` (`--steps`) must be an integer >= 1, got {num_steps!r}.")
    if cell not in ("elman", "gru", "lstm"):
        raise ValueError(f"`cell` must be 'elman', 'gru' or 'lstm', got {cell!r}.")
    print(
        f"{cell.upper()} with {hidden} units on the adding problem (T = {steps}), "
        f"{num_steps} Adam steps, {checkpoints} checkpoints",
        flush=True,
    )
    model, records = train(cell, hidden, steps, num_steps, checkpoints, seed)

    final = records[-1]["hessian"]
    table = cz.analysis.format_summary(final)
    print(f"\nExact Hessian diagonal at step {records[-1]['step']}, per gate group:\n")
    print(table)
    print("\nMedian |diag H| per group over training:\n")
    print(group_table(records, "hessian"))
    print("\nMedian |diag GGN| per group over training:\n")
    print(group_table(records, "ggn"))

    directory = pathlib.Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    result = {
        "cell": cell,
        "hidden": hidden,
        "steps": steps,
        "num_steps": num_steps,
        "seed": seed,
        "checkpoints": records,
    }
    (directory / "rnn_curvature.json").write_text(json.dumps(result, indent=1))
    plot(records, directory / "rnn_curvature.png", cell)
    print(f"\nwrote {directory / 'rnn_curvature.json'} and {directory / 'rnn_curvature.png'}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell", default="gru", choices=["elman", "gru", "lstm"])
    parser.add_argument("--quick", action="store_true", help="small model, few steps (CI)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="Adam steps")
    parser.add_argument("--out", default="rnn_curvature_output", help="output directory")
    args = parser.parse_args()
    main(cell=args.cell, quick=args.quick, seed=args.seed, out=args.out, num_steps=args.steps)
