"""Row `scaling`: the GRU row (input 8, 10 classes, batch 32) over a grid of hidden
sizes and sequence lengths (by default hidden 32-256, T = 8-128): the structured kernel
against the generic kernel, whose time is extrapolated.

The generic kernel's cost is `P` identical Hessian-vector products after one
linearisation, so its time is extrapolated from a timed prefix of them written in
plain JAX, the way the kernel evaluates them (no private part of curvzoo is used): one
`jax.linearize(jax.grad(f))` of the loss in the raveled parameters (forward-over-
reverse), then `jax.vmap` over a chunk of `--scaling-basis` (256) one-hot basis vectors,
split into sub-chunks where 256 lanes would not fit curvzoo's default 128 MiB memory
budget, as the kernel splits them. With `t` the prefix's time for `k` products and `g`
the jitted gradient's (standing in for the one linearisation), the generic kernel's
time is taken as `g + (t - g) P / k`. At hidden 64, T = 16, prefixes of 78, 156 and 234
products took 2.7 ms per product (linear in `k`), extrapolating to 40 s against 37-38 s
for the full kernel on the same, loaded machine.

Where a cell would take longer than `--scaling-cap` seconds, it is measured on less
work and scaled up. The prediction scales the cell before it (the structured kernel's
time grows like `T^2 H^3`, a product's like `T H^2`); the grid's first cell is first
timed on one sample and on one sub-chunk of products, which predicts the rest.

- The structured kernel runs on the first `b` samples of the batch, times `32 / b`, as
  its work is a sum of per-sample terms, compiled ahead (`eqx.filter_jit(...).lower`)
  and called once instead of a warm-up and a timed call. On the GRU at hidden 64,
  T = 16 and hidden 128, T = 32 (a loaded machine), batches of 2-8 samples, scaled up,
  came within 5-21% of the full batch, and one sample up to 50% over: an overestimate
  where a call's fixed costs are not yet small next to one sample's work. At hidden
  256, T = 128 one sample takes about a minute.
- The generic kernel's prefix is shortened to fewer products `k` (whole sub-chunks), at
  the full batch, as the products are identical (the batch is not scaled down there: a
  product's cost has a part that does not shrink with the batch).

The table says how each number was obtained.
"""

import equinox as eqx

from ..hvp import hvp_diagonal_prefix, kernel_chunk
from ..models import build, num_params, RECURRENT_BATCH
from ..options import Options
from ..timing import compiled_once_seconds, device_kind, median_seconds


ROWS = ("scaling",)
SUMMARY = {
    "scaling": "GRU grid over hidden and T: structured vs generic extrapolated from "
    "plain-JAX Hessian-vector products (slow: minutes)",
}
_CELL = "gru"
MIN_BATCH = 1
GRADIENT_REPEATS = 3
# Growth exponents of the predicted time in T and in the hidden size.
_STRUCTURED_GROWTH = (2.0, 3.0)
_PRODUCT_GROWTH = (1.0, 2.0)


def _predict(grid: list[dict], key: str, growth: tuple[float, float], hidden: int, steps: int):
    """`key` in cell `(hidden, steps)`, scaled from the last measured cell of the same
    hidden size, or else from the last cell of the same `T`; `None` for the first
    cell."""
    same_hidden = [cell for cell in grid if cell["hidden"] == hidden]
    same_steps = [cell for cell in grid if cell["steps"] == steps]
    if same_hidden:
        cell = same_hidden[-1]
    elif same_steps:
        cell = same_steps[-1]
    else:
        return None
    by_steps, by_hidden = growth
    return cell[key] * (steps / cell["steps"]) ** by_steps * (hidden / cell["hidden"]) ** by_hidden


def _batch_for(predicted: float | None, cap: float) -> int:
    """The full batch if the prediction fits `cap`; else the largest power of two below
    it whose share of the prediction fits, and at least `MIN_BATCH`."""
    full = RECURRENT_BATCH
    if predicted is None or predicted <= cap:
        return full
    size = MIN_BATCH
    while size * 2 < full and predicted * size * 2 / full <= cap:
        size *= 2
    return size


def _count_for(per_product: float | None, cap: float, basis: int, chunk: int) -> int:
    """`basis` products if they fit `cap`; else as many whole sub-chunks of `chunk` as
    fit (at least one)."""
    if per_product is None or per_product * basis <= cap:
        return basis
    fits = int(cap / per_product)
    if fits <= chunk:
        return max(1, min(fits, chunk))
    return fits // chunk * chunk


def _structured(model, loss, hidden: int, steps: int, seed: int, predicted, cap: float):
    """`(seconds at the full batch, samples timed, compiled ahead)` of the structured
    kernel. Within `cap`, timed in full once after a warm-up call; past it, on as few
    samples as the prediction needs, compiled ahead and called once. Without a
    prediction (the first cell), one sample is timed first, which gives one (an
    overestimate for small cells, whose fixed costs weigh more on one sample)."""
    full = RECURRENT_BATCH

    def timed(size: int) -> float:
        _, part = build(_CELL, seed, steps=steps, hidden=hidden, batch_size=size)
        if size == full:
            call = lambda: model.hessian_diagonal(loss, part, method="structured")
            return median_seconds(call, 1)
        call = lambda model, part: model.hessian_diagonal(loss, part, method="structured")
        return compiled_once_seconds(call, model, part) * full / size

    probe = None
    if predicted is None:
        predicted = probe = timed(MIN_BATCH)
    size = _batch_for(predicted, cap)
    if size == MIN_BATCH and probe is not None:
        return probe, size
    return timed(size), size


def _products(model, loss, batch, gradient: float, per_product, basis: int, cap: float):
    """`(seconds per product, products timed, vmap chunk, kernel's chunk, prefix
    seconds)`: a prefix of the generic kernel's products at the full batch, as many as
    the prediction allows. Without a prediction, one sub-chunk is timed first."""
    chunk_all = kernel_chunk(model, loss, batch)

    def timed(count: int):
        run, chunk = hvp_diagonal_prefix(model, loss, batch, count)
        prefix = median_seconds(run, 1)
        return max(prefix - gradient, 0.0) / count, count, chunk, chunk_all, prefix

    if per_product is None:
        probe = timed(min(basis, chunk_all))
        if probe[1] == basis or probe[0] * basis > cap:
            return probe
        per_product = probe[0]
    return timed(_count_for(per_product, cap, basis, chunk_all))


def measure_cell(hidden: int, steps: int, options: Options, grid: list[dict]) -> dict:
    """One grid cell: the gradient and the structured kernel timed (once, after a
    warm-up call), the generic kernel extrapolated from a prefix of its products."""
    import curvzoo as cz

    loss = cz.losses.cross_entropy
    seed, cap = options.seed, options.scaling_cap
    model, batch = build(_CELL, seed, steps=steps, hidden=hidden)
    size = num_params(model)
    grad = eqx.filter_jit(eqx.filter_grad(loss))
    gradient = median_seconds(lambda: grad(model, batch), GRADIENT_REPEATS)
    predicted = _predict(grid, "structured_s", _STRUCTURED_GROWTH, hidden, steps)
    structured, structured_batch = _structured(model, loss, hidden, steps, seed, predicted, cap)
    per_product = _predict(grid, "product_s", _PRODUCT_GROWTH, hidden, steps)
    basis = min(options.scaling_basis, size)
    product, count, chunk, chunk_all, prefix = _products(
        model, loss, batch, gradient, per_product, basis, cap
    )
    generic = gradient + product * size
    return {
        "hidden": hidden,
        "steps": steps,
        "params": size,
        "gradient_s": gradient,
        "structured_s": structured,
        "structured_batch": structured_batch,
        "prefix_s": prefix,
        "products": count,
        "products_chunk": chunk,
        "kernel_chunk": chunk_all,
        "product_s": product,
        "generic_extrapolated_s": generic,
        "generic_over_structured": generic / structured,
    }


def measure(row: str, options: Options) -> dict:
    """Every cell of the grid, smallest first. Cost: per cell, up to about twice
    `options.scaling_cap` seconds for each kernel, more where one sample alone takes
    longer, plus compilation: an estimated 10-15 minutes for the default grid on 2 CPU
    cores, from the cells' measured times (the structured kernel at hidden 256,
    T = 128 alone would take about 30 minutes in full; one sample takes about one)."""
    import sys

    grid = []
    for hidden in options.scaling_hidden:
        for steps in options.scaling_steps:
            grid.append(measure_cell(hidden, steps, options, grid))
            print(f"  hidden {hidden} T {steps}: done", file=sys.stderr, flush=True)
    return {
        "row": "scaling",
        "grid": grid,
        "batch": RECURRENT_BATCH,
        "basis": options.scaling_basis,
        "cap_s": options.scaling_cap,
        "device": device_kind(),
    }


def headline(result: dict) -> list[tuple[str, float, str]]:
    """The structured kernel's time per cell (the generic one is extrapolated the same
    way in both trees, from plain JAX, so it does not compare the trees)."""
    return [
        (f"structured h{cell['hidden']} T{cell['steps']}", cell["structured_s"], "s")
        for cell in result["grid"]
    ]
