"""Curvature of a recurrent network during training, layer by layer and gate by gate.

The main job of curvzoo, on two tasks (`--task`):

- `adding` (default): a zoo RNN (GRU by default; `--cell elman|lstm`) learns the adding
  problem, generated here: each step carries a value in `[0, 1]` and a marker, two steps
  are marked (one in each half of the sequence), and the target is the sum of the two
  marked values.
- `lm`: a 2-layer GRU language model over characters, trained on the documentation
  that ships with Python itself (`pydoc_data.topics`: about 460 KB of prose and code, no
  download). Lines of different lengths are padded into batches with their lengths,
  and the model predicts every next character; the loss is the mean over valid
  characters.

At several checkpoints during training the recipe computes, on a fixed evaluation batch,
the exact Hessian diagonal of the loss (`model.hessian_diagonal`, the recurrent
structured kernel) and the exact GGN diagonal (`model.ggn_diagonal`), and summarises
both per layer, gate and kind of weight (embedding, input, recurrent, bias, readout)
with `curvzoo.analysis`; and the curvature per time step
(`curvzoo.time_step_curvature`): how the loss's sensitivity to each step's state is
spread over the sequence.

At the end it prints the per-group table of the final Hessian diagonal and the curvature
of every group over training, and writes into `--out`:

- `rnn_curvature.json` (`rnn_curvature_lm.json` for the language model): every
  checkpoint's loss, summaries and curvature per step (plain numbers);
- `rnn_curvature.png` (`rnn_curvature_lm.png`): median |diag H| per group over
  training, the GGN's beside it, each kind's share of the trace, the evaluation loss and
  the curvature per step.

Run `python recipes/rnn_curvature.py` (adding problem: 64 units, 25 steps per sequence,
2000 Adam steps, 8 checkpoints) or `python recipes/rnn_curvature.py --task lm` (2 layers
of 64 units, lines of up to 32 characters, 2000 Adam steps, 8 checkpoints); `--quick`
for a smaller model and fewer steps (CI runs it). Each checkpoint's exact Hessian
diagonal takes under a second on 2 CPU cores at the default shapes, once compiled; the
recipe compiles it before training and says how long that took.
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
import numpy as np
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


# ## Characters of Python's documentation

BEGIN, OTHER = 0, 1  # token ids: the start of a line, and any character not printable ASCII
VOCAB = 2 + 95  # and the printable ASCII characters 32..126


def encode(line: str) -> list[int]:
    return [2 + ord(c) - 32 if 32 <= ord(c) < 127 else OTHER for c in line]


def documentation_lines(min_length: int, max_length: int) -> list[str]:
    """The non-empty lines of `pydoc_data.topics` (the text behind `help()`), stripped,
    of `min_length` to `max_length` characters, in a fixed order."""
    from pydoc_data.topics import topics

    lines = []
    for name in sorted(topics):
        for line in topics[name].splitlines():
            line = line.strip()
            if min_length <= len(line) <= max_length:
                lines.append(line)
    return lines


def pad_lines(lines: list[str], steps: int):
    """Next-character prediction on padded lines: inputs `(N, T)` (the start token, then
    the line's characters but the last), targets `(N, T)` (the line's characters) and
    lengths `(N,)`; padding is token 0 on both sides, masked by the lengths."""
    inputs = np.zeros((len(lines), steps), np.int32)
    targets = np.zeros((len(lines), steps), np.int32)
    for index, line in enumerate(lines):
        ids = encode(line)
        inputs[index, : len(ids)] = [BEGIN] + ids[:-1]
        targets[index, : len(ids)] = ids
    lengths = np.array([len(line) for line in lines], np.int32)
    return jnp.asarray(inputs), jnp.asarray(targets), jnp.asarray(lengths)


# ## Training with checkpoints

LEARNING_RATE = 3e-3  # Adam's, for both tasks


def checkpoint_steps(num_steps: int, count: int) -> list[int]:
    """`count` checkpoints from 0 to `num_steps`, denser early (where curvature moves)."""
    fractions = [(i / (count - 1)) ** 2 for i in range(count)]
    return sorted({round(f * num_steps) for f in fractions})


def curvature_at(model, batch, loss, key, scale: float = 1.0):
    """Exact Hessian and GGN diagonals (times `scale`) and their summaries, the top
    eigenvalue of each (sharpness, by Lanczos), the curvature per time step, and
    timings. The recurrent kernel computes both diagonals (`method="structured"`): exact,
    and for a per-step readout over many classes the fast path for the GGN too."""
    start = time.perf_counter()
    hessian = jax.block_until_ready(model.hessian_diagonal(loss, batch, method="structured"))
    hessian_seconds = time.perf_counter() - start
    start = time.perf_counter()
    ggn = jax.block_until_ready(model.ggn_diagonal(loss, batch, method="structured"))
    ggn_seconds = time.perf_counter() - start
    hessian, ggn = (jax.tree.map(lambda d: scale * d, tree) for tree in (hessian, ggn))
    start = time.perf_counter()
    sharpness = {}
    for operator in ("hessian", "ggn"):
        top = cz.hessian_eigenvalues(model, loss, batch, key=key, operator=operator)
        sharpness[operator] = {
            "eigenvalue": float(top.eigenvalues[0]) * scale,
            "residual": float(top.residuals[0]) * scale,
            "matvecs": int(top.num_matvecs),
        }
    sharpness_seconds = time.perf_counter() - start
    per_step = cz.time_step_curvature(model, loss, batch) * scale  # (T, layers * H)
    layers = per_step.reshape(per_step.shape[0], model.num_layers, -1)
    return {
        "hessian": cz.analysis.summarize(hessian, model, top_k=5),
        "ggn": cz.analysis.summarize(ggn, model, top_k=5),
        "sharpness": sharpness,
        "ggn_trace": cz.analysis.trace(ggn)["total"],
        # The state's curvature at each step, summed over units, per layer.
        "time_steps": np.asarray(layers.sum(axis=-1)).T.tolist(),
        "hessian_seconds": hessian_seconds,
        "ggn_seconds": ggn_seconds,
        "sharpness_seconds": sharpness_seconds,
    }


def time_step_map(model, batch, loss) -> list[list[float | None]]:
    """The curvature per time step of each sequence alone: the
    diagonal of the Hessian of its own loss (for lines of characters, its mean per
    character) with respect to each step's state, summed over units and layers;
    `(N, T)`, `None` at padded steps."""
    values = np.asarray(cz.time_step_curvature(model, loss, batch, per_sample=True).sum(axis=-1))
    rows = values.tolist()
    if len(batch) == 3:  # (inputs, targets, lengths)
        lengths = np.asarray(batch[2])
        rows = [
            [v / int(n) if t < n else None for t, v in enumerate(row)]
            for row, n in zip(rows, lengths)
        ]
    return rows


def _train(model, train_loss, loss, eval_batch, sample_batch, key, schedule, scale=1.0):
    """Adam (`schedule`: `(num_steps, checkpoints, learning_rate)`) on
    `train_loss(model, sample_batch(key))`, with the curvature of `loss` (times `scale`)
    on `eval_batch` at every checkpoint, and at the last one the curvature per time step
    of every sequence alone. The kernels are compiled on the evaluation batch
    first, so that each checkpoint's timings are the kernels' own."""
    num_steps, checkpoints, learning_rate = schedule
    key, key_lanczos = jr.split(key)
    start = time.perf_counter()
    curvature_at(model, eval_batch, loss, key_lanczos, scale)
    print(f"compiled the curvature kernels in {time.perf_counter() - start:.1f} s", flush=True)
    optimiser = optax.adam(learning_rate)
    state = optimiser.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, state, key):
        value, grads = eqx.filter_value_and_grad(train_loss)(model, sample_batch(key))
        updates, state = optimiser.update(grads, state)
        return eqx.apply_updates(model, updates), state, value

    marks = checkpoint_steps(num_steps, checkpoints)
    records = []
    start = time.perf_counter()
    for i in range(num_steps + 1):
        if i in marks:
            record = {"step": i, "eval_loss": float(loss(model, eval_batch)) * scale}
            record.update(curvature_at(model, eval_batch, loss, key_lanczos, scale))
            records.append(record)
            print(
                f"[{time.perf_counter() - start:6.1f} s] checkpoint {len(records)}/{len(marks)}"
                f" at step {i:5d}: eval loss {record['eval_loss']:.4f}, Hessian diagonal "
                f"{record['hessian_seconds']:.2f} s, GGN diagonal {record['ggn_seconds']:.2f} s,"
                f" top eigenvalues {record['sharpness_seconds']:.2f} s",
                flush=True,
            )
        if i < num_steps:
            model, state, _ = step(model, state, jr.fold_in(key, i))
    heatmap = time_step_map(model, eval_batch, loss)
    return model, records, heatmap


HEATMAP_SHOWN = 24  # sequences shown in the heatmap of curvature per time step


def train(cell: str, hidden: int, steps: int, num_steps: int, checkpoints: int, seed: int):
    """The adding problem: a fixed evaluation batch of 128 sequences, training batches
    of 64, MSE. Returns the model, the checkpoints' records, the curvature per time step
    of each evaluation sequence at the end, and the evaluation batch's markers."""
    key_model, key_eval, key_train = jr.split(jr.key(seed), 3)
    model = cz.RNN(2, hidden, 1, cell=cell, key=key_model)
    eval_batch = adding_problem(key_eval, 128, steps)
    loss = cz.losses.mse

    def sample_batch(key):
        return adding_problem(key, 64, steps)

    schedule = (num_steps, checkpoints, LEARNING_RATE)
    model, records, heatmap = _train(
        model, loss, loss, eval_batch, sample_batch, key_train, schedule
    )
    return model, records, heatmap, np.asarray(eval_batch[0][..., 1])


def train_lm(hidden: int, steps: int, eval_size: int, num_steps: int, checkpoints: int, seed: int):
    """The language model: a 2-layer GRU over characters (embedding 16), lines of 4 to
    `steps` characters, a fixed evaluation batch of `eval_size` lines held out from
    training, training batches of 64 lines, the mean loss per character. The curvature
    is that of the evaluation batch's mean per character: the sum's, over its number of
    characters."""
    key_model, key_split, key_train = jr.split(jr.key(seed), 3)
    lines = documentation_lines(4, steps)
    order = np.asarray(jr.permutation(key_split, len(lines)))
    eval_batch = pad_lines([lines[i] for i in order[:eval_size]], steps)
    inputs, targets, lengths = pad_lines([lines[i] for i in order[eval_size:]], steps)
    model = cz.RNN(16, hidden, VOCAB, "gru", "all", num_layers=2, vocab_size=VOCAB, key=key_model)

    def sample_batch(key):
        rows = jr.randint(key, (64,), 0, inputs.shape[0])
        return inputs[rows], targets[rows], lengths[rows]

    schedule = (num_steps, checkpoints, LEARNING_RATE)
    characters = int(jnp.sum(eval_batch[2]))
    model, records, heatmap = _train(
        model, cz.losses.cross_entropy, cz.losses.CrossEntropy(reduction="sum"), eval_batch,
        sample_batch, key_train, schedule, scale=1.0 / characters,
    )  # fmt: skip
    return model, records, heatmap, None


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


def spectral_table(records: list[dict]) -> str:
    """Per checkpoint: the top eigenvalue of the Hessian and of the GGN (with the
    products Lanczos took), against 2 / lr, and both exact traces."""
    lines = [
        f"{'step':>6} {'loss':>9} {'top eig H':>10} {'(HVPs)':>6} {'top eig GGN':>11} "
        f"{'(GVPs)':>6} {'2/lr':>7} {'trace H':>10} {'trace GGN':>10}"
    ]
    lines.append("-" * len(lines[0]))
    for r in records:
        h, g = r["sharpness"]["hessian"], r["sharpness"]["ggn"]
        lines.append(
            f"{r['step']:>6} {r['eval_loss']:>9.4f} {h['eigenvalue']:>10.4g} {h['matvecs']:>6} "
            f"{g['eigenvalue']:>11.4g} {g['matvecs']:>6} {2 / LEARNING_RATE:>7.4g} "
            f"{r['hessian']['trace']:>10.4g} {r['ggn_trace']:>10.4g}"
        )
    return "\n".join(lines)


def marked_steps_report(heatmap, marked) -> str:
    """Do the adding problem's two marked steps stand out in the curvature per time
    step of each sequence alone? How often the step of largest curvature is a marked
    one, and the jump of curvature from the step before each marked step to it."""
    values = np.abs(np.array(heatmap))
    marked = np.asarray(marked, bool)
    top_is_marked = marked[np.arange(len(values)), values.argmax(axis=1)]
    rows, steps = np.nonzero(marked[:, 1:])
    jumps = values[rows, steps + 1] / values[rows, steps]
    return (
        f"the step of largest curvature is a marked step in {int(top_is_marked.sum())} of "
        f"{len(values)} sequences; from the step before a marked step to it, the curvature "
        f"grows {np.median(jumps):.1f}x (median; quartiles {np.quantile(jumps, 0.25):.1f}x "
        f"to {np.quantile(jumps, 0.75):.1f}x)"
    )


# Kind of weight -> (line style, marker): both differ between kinds, so that the input
# and recurrent groups of one gate (one colour) are told apart in the legend too.
_KINDS = {
    "input": ("--", "s"),
    "recurrent": ("-", "o"),
    "bias": (":", "^"),
    "readout": ("-.", "D"),
    "embedding": ("-.", "v"),
}
_FIXED_COLOURS = {"readout.weight": "black", "readout.bias": "grey", "embedding": "tab:brown"}


def _split(group: str) -> tuple[str, str, int | None]:
    """`(kind, gate, layer)` of a group name such as `recurrent.update.layer2`."""
    parts = group.split(".")
    layer = None
    if parts[-1].startswith("layer"):
        layer = int(parts.pop()[5:])
    return parts[0], ".".join(parts[1:]), layer


def _plot_groups(ax, records, which, groups, colours, title):
    steps = [r["step"] for r in records]
    for group in groups:
        kind, gate, _ = _split(group)
        colour = _FIXED_COLOURS.get(group, colours.get(gate, "black"))
        values = [r[which]["groups"][group]["median_abs"] for r in records]
        style, marker = _KINDS[kind]
        ax.plot(steps, values, style, color=colour, marker=marker, ms=4, label=group)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("median |diagonal entry|")
    ax.set_title(title)


def _plot_shares(ax, records):
    steps = [r["step"] for r in records]
    for kind in records[0]["hessian"]["kinds"]:
        shares = [r["hessian"]["kinds"][kind]["trace_share"] for r in records]
        style, marker = _KINDS[kind]
        ax.plot(steps, shares, style, marker=marker, ms=4, label=kind)
    ax.set_xlabel("training step")
    ax.set_ylabel("share of the Hessian's trace")
    ax.set_title("trace share per kind of weight")
    ax.legend(fontsize=8)


def _plot_hessian_and_ggn(ax, records, values, title, prefix="", extra=None):
    """`values(record, which)` for the Hessian and the GGN over training, log scale;
    `extra(ax)` draws more before the legend."""
    steps = [r["step"] for r in records]
    for which, name, style in (("hessian", "Hessian", "k-o"), ("ggn", "GGN", "C1--s")):
        ax.plot(steps, [values(r, which) for r in records], style, ms=4, label=prefix + name)
    if extra is not None:
        extra(ax)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_title(title)
    ax.legend(fontsize=8)


def _plot_sharpness(ax, records):
    """Top eigenvalue of the Hessian and of the GGN over training, against 2 / lr."""
    _plot_hessian_and_ggn(
        ax, records, lambda r, which: r["sharpness"][which]["eigenvalue"],
        "sharpness (Lanczos, relative residual 1e-4)", prefix="top eigenvalue, ",
        extra=lambda ax: ax.axhline(2 / LEARNING_RATE, color="tab:red", lw=1,
                                    label="2 / learning rate"),
    )  # fmt: skip


def _plot_traces(ax, records):
    """The exact traces of the Hessian and of the GGN over training."""
    _plot_hessian_and_ggn(
        ax, records,
        lambda r, which: r["hessian"]["trace"] if which == "hessian" else r["ggn_trace"],
        "trace (exact, from the diagonals)",
    )  # fmt: skip


def _plot_time_steps(ax, records, note):
    """The state's curvature per step, per layer, at the first and last checkpoint."""
    for record, style in ((records[0], ":"), (records[-1], "-")):
        for layer, values in enumerate(record["time_steps"]):
            label = f"step {record['step']}" + (
                f", layer {layer + 1}" if len(record["time_steps"]) > 1 else ""
            )
            ax.plot(np.arange(len(values)), np.abs(values), style, color=f"C{layer}", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("time step t")
    ax.set_ylabel("sum over units of |d2 loss / d h_t^2|")
    ax.set_title(f"curvature per time step ({note})")
    ax.legend(fontsize=7)


def _plot_heatmap(ax, rows, title, marked=None):
    """|curvature per time step| of one sequence per row, log colour scale; `marked`
    `(rows, T)` 0/1 draws a white dot on each marked step."""
    from matplotlib.colors import LogNorm

    values = np.array([[np.nan if v is None else abs(v) for v in row] for row in rows])
    values = values[:HEATMAP_SHOWN]
    finite = values[np.isfinite(values) & (values > 0)]
    image = ax.imshow(
        values, aspect="auto", interpolation="nearest", cmap="viridis",
        norm=LogNorm(vmin=max(finite.min(), finite.max() * 1e-6), vmax=finite.max()),
    )  # fmt: skip
    if marked is not None:
        rows_at, steps_at = np.nonzero(np.asarray(marked)[:HEATMAP_SHOWN])
        ax.plot(steps_at, rows_at, "o", mfc="none", mec="white", ms=6, label="marked step")
        ax.legend(fontsize=7, loc="upper right")
    ax.figure.colorbar(image, ax=ax)
    ax.set_xlabel("time step t")
    ax.set_ylabel("sequence")
    ax.set_title(title)


def plot(records: list[dict], heatmap, marked, path: pathlib.Path, cell: str) -> None:
    """The adding problem. Top: median |diagonal| per group over training (colour: gate;
    line style and marker: kind of weight) for the Hessian and the GGN; each kind's share
    of the Hessian's trace; the evaluation loss. Bottom: sharpness of both against
    2 / lr; both traces; the curvature per time step (mean over sequences); and at the
    last checkpoint, per sequence, with the marked steps circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(records[0]["hessian"]["groups"])
    gates = sorted({_split(g)[1] for g in groups if not g.startswith("readout")})
    colours = dict(zip(gates, plt.get_cmap("tab10").colors))
    fig, axes = plt.subplots(2, 4, figsize=(22, 9.5), constrained_layout=True)
    name = cell.upper()
    _plot_groups(axes[0, 0], records, "hessian", groups, colours, f"{name}: exact Hessian diagonal")
    _plot_groups(axes[0, 1], records, "ggn", groups, colours, f"{name}: GGN diagonal")
    axes[0, 1].legend(fontsize=7, ncol=2, loc="best")
    _plot_shares(axes[0, 2], records)
    axes[0, 3].plot([r["step"] for r in records], [r["eval_loss"] for r in records], "k-o", ms=3)
    axes[0, 3].set_yscale("log")
    axes[0, 3].set_xlabel("training step")
    axes[0, 3].set_title("evaluation loss (MSE)")
    _plot_sharpness(axes[1, 0], records)
    _plot_traces(axes[1, 1], records)
    _plot_time_steps(axes[1, 2], records, "mean over sequences")
    _plot_heatmap(
        axes[1, 3], heatmap, f"curvature per time step at step {records[-1]['step']}", marked
    )
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_lm(records: list[dict], heatmap, path: pathlib.Path) -> None:
    """The language model. Per layer, median |diagonal| per group over training for the
    Hessian (top) and the GGN (middle), the embedding and the readout with the second
    layer; each kind's share of the trace; the evaluation loss; the curvature per time
    step of each layer's state; the ratio of the Hessian's to the GGN's medians. Bottom:
    sharpness against 2 / lr, both traces, and the curvature per time step of each held
    out line at the last checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(records[0]["hessian"]["groups"])
    gates = sorted({_split(g)[1] for g in groups if _split(g)[2] is not None})
    colours = dict(zip(gates, plt.get_cmap("tab10").colors))
    first = [g for g in groups if _split(g)[2] == 1]
    rest = [g for g in groups if _split(g)[2] != 1]
    fig = plt.figure(figsize=(22, 14), constrained_layout=True)
    grid = fig.add_gridspec(3, 4)
    axes = [[fig.add_subplot(grid[row, col]) for col in range(4)] for row in range(2)]
    for row, (which, name) in enumerate((("hessian", "exact Hessian"), ("ggn", "GGN"))):
        _plot_groups(axes[row][0], records, which, first, colours, f"{name} diagonal: layer 1")
        _plot_groups(
            axes[row][1], records, which, rest, colours,
            f"{name} diagonal: layer 2, embedding, readout",
        )  # fmt: skip
    axes[0][1].legend(fontsize=7, ncol=2, loc="best")
    axes[1][0].legend(fontsize=7, ncol=2, loc="best")
    _plot_shares(axes[0][2], records)
    steps = [r["step"] for r in records]
    axes[1][2].plot(steps, [r["eval_loss"] / np.log(2) for r in records], "k-o", ms=3)
    axes[1][2].set_xlabel("training step")
    axes[1][2].set_ylabel("bits per character")
    axes[1][2].set_title("evaluation loss (held-out lines)")
    _plot_time_steps(axes[0][3], records, "per character")
    for group in [g for g in groups if _split(g)[0] in ("recurrent", "input")]:
        kind, gate, layer = _split(group)
        values = [
            r["hessian"]["groups"][group]["median_abs"] / r["ggn"]["groups"][group]["median_abs"]
            for r in records
        ]
        style, marker = _KINDS[kind]
        axes[1][3].plot(
            steps, values, style, color=colours.get(gate), alpha=0.5 + 0.5 * (layer == 2),
            marker=marker, ms=4, label=group,
        )  # fmt: skip
    axes[1][3].set_yscale("log")
    axes[1][3].axhline(1.0, color="grey", lw=0.8)
    axes[1][3].set_xlabel("training step")
    axes[1][3].set_title("median |diag H| / median |diag GGN|")
    axes[1][3].legend(fontsize=6, ncol=2)
    _plot_sharpness(fig.add_subplot(grid[2, 0]), records)
    _plot_traces(fig.add_subplot(grid[2, 1]), records)
    _plot_heatmap(
        fig.add_subplot(grid[2, 2:]), heatmap,
        f"curvature per character of each held-out line at step {records[-1]['step']}",
    )  # fmt: skip
    fig.savefig(path, dpi=90)
    plt.close(fig)


TASKS = ("adding", "lm")


def main(
    cell: str = "gru",
    quick: bool = False,
    seed: int = 0,
    out: str = "rnn_curvature_output",
    num_steps: int | None = None,
    task: str = "adding",
) -> dict:
    if task not in TASKS:
        raise ValueError(f"`task` (`--task`) must be one of {TASKS}, got {task!r}.")
    if task == "adding":
        hidden, steps, default_steps, checkpoints = (16, 10, 300, 4) if quick else (64, 25, 2000, 8)
    else:
        hidden, steps, default_steps, checkpoints = (16, 16, 300, 4) if quick else (64, 32, 2000, 8)
        eval_size = 16 if quick else 32
    num_steps = default_steps if num_steps is None else num_steps
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"`num_steps` (`--steps`) must be an integer >= 1, got {num_steps!r}.")
    if cell not in ("elman", "gru", "lstm"):
        raise ValueError(f"`cell` must be 'elman', 'gru' or 'lstm', got {cell!r}.")
    if task == "adding":
        print(
            f"{cell.upper()} with {hidden} units on the adding problem (T = {steps}), "
            f"{num_steps} Adam steps, {checkpoints} checkpoints",
            flush=True,
        )
        model, records, heatmap, marked = train(cell, hidden, steps, num_steps, checkpoints, seed)
        name = "rnn_curvature"
    else:
        print(
            f"2-layer GRU language model (embedding 16, {hidden} units per layer) on the lines "
            f"of Python's documentation (4 to {steps} characters, padded to T = {steps}, "
            f"{eval_size} held out), {num_steps} Adam steps, {checkpoints} checkpoints",
            flush=True,
        )
        model, records, heatmap, marked = train_lm(
            hidden, steps, eval_size, num_steps, checkpoints, seed
        )
        name = "rnn_curvature_lm"

    final = records[-1]["hessian"]
    table = cz.analysis.format_summary(final)
    print(f"\nExact Hessian diagonal at step {records[-1]['step']}, per gate group:\n")
    print(table)
    print("\nMedian |diag H| per group over training:\n")
    print(group_table(records, "hessian"))
    print("\nMedian |diag GGN| per group over training:\n")
    print(group_table(records, "ggn"))
    print("\nSharpness and trace over training (Lanczos to a relative residual of 1e-4):\n")
    print(spectral_table(records))
    print("\nCurvature per time step (the state's, summed over units) at the last checkpoint:\n")
    for layer, values in enumerate(records[-1]["time_steps"]):
        shown = " ".join(f"{v:.1e}" for v in values)
        print(f"layer {layer + 1}: {shown}")
    if marked is not None:
        print(f"\nEach sequence alone: {marked_steps_report(heatmap, marked)}.")

    directory = pathlib.Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    result = {
        "task": task,
        "cell": cell if task == "adding" else "gru",
        "hidden": hidden,
        "steps": steps,
        "num_steps": num_steps,
        "seed": seed,
        "checkpoints": records,
        "time_steps_per_sequence": heatmap,
    }
    (directory / f"{name}.json").write_text(json.dumps(result, indent=1))
    if task == "adding":
        plot(records, heatmap, marked, directory / f"{name}.png", cell)
    else:
        plot_lm(records, heatmap, directory / f"{name}.png")
    print(f"\nwrote {directory / (name + '.json')} and {directory / (name + '.png')}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--task", default="adding", choices=list(TASKS),
        help="adding: a zoo RNN on the adding problem; lm: a 2-layer GRU character model "
        "(default: adding)",
    )  # fmt: skip
    parser.add_argument(
        "--cell", default="gru", choices=["elman", "gru", "lstm"],
        help="the adding problem's cell (default: gru; the character model is a GRU)",
    )  # fmt: skip
    parser.add_argument(
        "--quick", action="store_true", help="a small model and few steps (CI: seconds)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the model, the data and Lanczos (default: 0)"
    )
    parser.add_argument(
        "--steps", type=int, default=None,
        help="Adam steps (default: 2000, or 300 with --quick)",
    )  # fmt: skip
    parser.add_argument(
        "--out", default="rnn_curvature_output",
        help="directory for the JSON file of every checkpoint and the figure "
        "(default: rnn_curvature_output)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.steps is not None and args.steps < 1:
        parser.error(f"argument --steps: must be at least 1, got {args.steps}")
    main(
        cell=args.cell, quick=args.quick, seed=args.seed, out=args.out, num_steps=args.steps,
        task=args.task,
    )  # fmt: skip
