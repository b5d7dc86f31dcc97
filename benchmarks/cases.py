"""The configurations whose plans the benchmark checks: a model, a batch, a loss, and
one curvzoo function with its options, as the other rows call it.

A `Case` is plain data (it travels to its own process as JSON); `build(case, seed)`
makes its model, batch and loss from curvzoo's public zoo, and `call(case, loss)` the
function of `(model, batch, key)` that runs it. The lists:

- `PLAN_CASES`: every kernel configuration the other rows time, at their sizes
  (`plan-accuracy`), plus the README's examples;
- `SLOW_CASES`: the README's main-job GRU with a loss written as a plain function,
  which takes the generic kernel (minutes on 2 CPU cores; `plan-slow`);
- `research_cases(quick, scale)`: the GPU suite's models at research sizes
  (`research`, `--suite gpu`).
"""

import dataclasses

import jax
import jax.numpy as jnp
import jax.random as jr

from . import models


FUNCTIONS = {
    "hessian": "hessian_diagonal",
    "ggn": "ggn_diagonal",
    "empirical_fisher": "empirical_fisher_diagonal",
    "fisher": "fisher_diagonal",
    "hutchinson": "hutchinson_diagonal",
}
KEYED = ("fisher", "hutchinson")
_SHORT = {
    "hessian": "Hessian",
    "ggn": "GGN",
    "empirical_fisher": "emp. Fisher",
    "fisher": "Fisher",
    "hutchinson": "Hutchinson",
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One call to check.

    - `name`: the configuration, as the table prints it (`mlp2`, `rate-main`, ...).
    - `model`: which builder makes the model and batch (see `build`).
    - `function`: the quantity, `cz.plan`'s `quantity=`: `"hessian"`, `"ggn"`,
      `"empirical_fisher"`, `"fisher"` or `"hutchinson"`.
    - `options`: `(name, value)` pairs passed both to the function and to `cz.plan`.
    - `sizes`: `(name, value)` pairs for the builder (`batch`, `hidden`, `steps`, ...).
    - `loss`: `"ce"`, `"ce-sum"`, `"mse"` or `"callable-mse"` (a plain function).
    - `gradient`: also time the jitted gradient in the same process.
    - `row`: the row whose call this is.
    """

    name: str
    model: str
    function: str
    options: tuple = ()
    sizes: tuple = ()
    loss: str = "ce"
    gradient: bool = False
    row: str = ""

    @property
    def label(self) -> str:
        """The function and its options in a few words: `Hessian structured`,
        `Hutchinson 16 cv`, `GGN generic`."""
        o = dict(self.options)
        parts = [_SHORT[self.function]]
        if "method" in o:
            parts.append(o["method"])
        if o.get("per_sample"):
            parts.append("per-sample")
        if "num_probes" in o:
            parts.append(str(o["num_probes"]))
        if o.get("control_variate"):
            parts.append("cv")
        if "chunk_size" in o:
            parts.append(f"chunk {o['chunk_size']}")
        if o.get("memory_budget"):
            parts.append(f"{o['memory_budget'] / 2**20:g} MiB")
        if self.loss == "callable-mse":
            parts.append("callable")
        return " ".join(parts)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Case":
        fields = dict(data)
        for name in ("options", "sizes"):
            fields[name] = tuple(tuple(pair) for pair in fields[name])
        return cls(**fields)


def _case(name, model, function, row, loss="ce", sizes=(), gradient=False, **options):
    return Case(name, model, function, tuple(options.items()), tuple(sizes), loss, gradient, row)


# (cell, input, hidden, steps, batch, outputs) of the `rate-*` rows (`rows/recurrent.py`).
RATE_SHAPES = {
    "rate-gru": ("gru", 8, 128, 32, 16, 10),
    "rate-lstm": ("lstm", 8, 64, 32, 16, 10),
    "rate-main": ("gru", 2, 64, 25, 128, 1),
}


def _rate(name: str, function: str = "hessian", **options) -> Case:
    cell, inputs, hidden, steps, batch, outputs = RATE_SHAPES[name]
    sizes = dict(cell=cell, inputs=inputs, hidden=hidden, steps=steps, batch=batch,
                 outputs=outputs)  # fmt: skip
    return _case(name, "rate", function, name, "mse" if outputs == 1 else "ce",
                 sizes.items(), **options)  # fmt: skip


PLAN_CASES = (
    # kernels.py: the structured kernel on every model row, the generic where it is timed.
    *(_case(r, r, "hessian", r, method="structured") for r in models.FEED_FORWARD),
    _case("small", "small", "hessian", "small", method="generic"),
    *(
        _case(r, r, "hessian", r, method=method)
        for r in models.RECURRENT
        for method in ("structured", "generic")
    ),
    # ratios.py, family.py (ggn): the curvature family on mlp2, default options.
    _case("mlp2", "mlp2", "hessian", "ratios"),
    _case("mlp2", "mlp2", "ggn", "ggn"),
    _case("mlp2", "mlp2", "ggn", "ggn", method="generic"),
    _case("mlp2", "mlp2", "empirical_fisher", "ggn"),
    _case("mlp2", "mlp2", "fisher", "ggn"),
    # family.py (hutch-*), interface.py (probe-cost): 16 probes, with and without the GGN.
    *(
        _case(r, r, "hutchinson", f"hutch-{r}", num_probes=16, control_variate=cv)
        for r in ("mlp2", "gru")
        for cv in (None, "ggn")
    ),
    # per-sample diagonals (no other row times them).
    _case("mlp2", "mlp2", "hessian", "-", per_sample=True),
    _case("gru", "gru", "hessian", "-", per_sample=True),
    _case("mlp2", "mlp2", "empirical_fisher", "-", per_sample=True),
    # memory.py: the generic kernel on P = 101386 at two budgets.
    _case("mem-default", "memory", "hessian", "mem-default", method="generic"),
    _case(
        "mem-16mib", "memory", "hessian", "mem-16mib", method="generic", memory_budget=16 * 2**20
    ),  # fmt: skip
    # interface.py: a user's eqx.nn.MLP; progress's chunks of 16 basis vectors.
    _case("eqx-mlp", "eqx-mlp", "hessian", "own-models"),
    _case("small", "small", "hessian", "progress", method="generic", chunk_size=16),
    # recurrent.py: the recurrent kernel's rate rows (rate-main: the main job's GRU,
    # as recipes/rnn_curvature.py computes it, Hessian and GGN), the stacked model.
    _rate("rate-gru", method="structured"),
    _rate("rate-lstm", method="structured"),
    _rate("rate-main", method="structured"),
    _rate("rate-main", "ggn", method="structured"),
    _case(
        "stacked-lm",
        "lm",
        "hessian",
        "stacked-lm",
        "ce-sum",
        (("layers", 2), ("hidden", 64)),
        method="structured",
    ),  # fmt: skip
    _case(
        "flat-lm",
        "lm",
        "hessian",
        "stacked-lm",
        "ce-sum",
        (("layers", 1), ("hidden", 128)),
        method="structured",
    ),  # fmt: skip
    # The README's examples.
    _case("readme-gru", "readme-gru", "hessian", "README"),
    _case("readme-gru", "readme-gru", "empirical_fisher", "README", per_sample=True),
    _case("readme-lm", "readme-lm", "hessian", "README"),
)

SLOW_CASES = (
    # The README's plan of the main job's GRU with a loss written as a plain function.
    Case("readme-main", "readme-main", "hessian", (), (), "callable-mse", False, "README"),
)


RESEARCH = {
    # name: (model builder, sizes at research scale, sizes of --quick)
    "mlp2": ("mlp2", {"batch": 1024}, {"batch": 64}),
    "cnn": ("cnn", {"batch": 1024}, {"batch": 64}),
    "gru": (
        "gru",
        {"hidden": 256, "steps": 128, "batch": 256},
        {"hidden": 32, "steps": 16, "batch": 16},
    ),  # fmt: skip
    "lstm": (
        "lstm",
        {"hidden": 256, "steps": 128, "batch": 256},
        {"hidden": 32, "steps": 16, "batch": 16},
    ),  # fmt: skip
}


def research_cases(quick: bool = False, scale: float = 1.0) -> tuple[Case, ...]:
    """The GPU suite: the Hessian and GGN diagonals (default options, so `method="auto"`
    picks the kernel) of `mlp2` and the zoo CNN at batch 1024 and of the zoo GRU and
    LSTM (input 8, hidden 256, T = 128, 10 classes) at batch 256, each beside the jitted
    gradient. `quick`: small sizes for a smoke run on a CPU; `scale`: the batch sizes
    times `scale` (at least 1 sample)."""
    found = []
    for name, (model, full, small) in RESEARCH.items():
        sizes = dict(small if quick else full)
        sizes["batch"] = max(1, round(sizes["batch"] * scale))
        for function in ("hessian", "ggn"):
            found.append(
                Case(name, model, function, (), tuple(sizes.items()), "ce", True, "research")
            )
    return tuple(found)


def describe(case: Case) -> str:
    """The model and batch of a case in a few words, for the tables' notes."""
    s = dict(case.sizes)
    if case.model in models.RECURRENT:
        return (f"{case.model.upper()} {models.RECURRENT_INPUT}-{s.get('hidden', 64)}-"
                f"{models.CLASSES}, T = {s.get('steps', 16)}, N = "
                f"{s.get('batch', models.RECURRENT_BATCH)}")  # fmt: skip
    if case.model in models.FEED_FORWARD:
        shape = {
            "mlp2": "MLP 784-256-256-10",
            "mlp4": "MLP 784-256x4-10",
            "cnn": "CNN (8, 16) on 1x28x28",
            "small": "MLP 64-64-64-10",
        }[case.model]
        return f"{shape}, N = {s.get('batch', models.BATCH)}"
    if case.model == "rate":
        return (f"{s['cell'].upper()} {s['inputs']}-{s['hidden']}-{s['outputs']}, T = "
                f"{s['steps']}, N = {s['batch']}")  # fmt: skip
    return {
        "memory": "MLP 128-256-256-10, N = 32",
        "eqx-mlp": "eqx.nn.MLP(784, 10, 256, 2), N = 128",
        "lm": f"GRU token model {s.get('layers')} x {s.get('hidden')}, T = 32, N = 32",
        "readme-gru": "GRU 8-16-10, T = 16, N = 32",
        "readme-lm": "GRU 2 x 64 over 97 tokens, T = 24, N = 8, lengths",
        "readme-main": "GRU 2-64-1, T = 25, N = 128",
    }[case.model]


# ## Building a case


def _loss(name: str):
    import curvzoo as cz

    if name == "callable-mse":

        def mse(model, batch):  # the README's plain function: no per-sample form
            x, y = batch
            return jnp.mean((jax.vmap(model)(x) - y) ** 2)

        return mse
    return {
        "ce": cz.losses.cross_entropy,
        "ce-sum": cz.losses.CrossEntropy(reduction="sum"),
        "mse": cz.losses.mse,
    }[name]


def _readme(kind: str, seed: int):
    import curvzoo as cz

    key_model, key_x, key_y = jr.split(jr.key(seed), 3)
    if kind == "readme-gru":
        model = cz.RNN(in_size=8, hidden_size=16, out_size=10, cell="gru", key=key_model)
        x = jr.normal(key_x, (32, 16, 8))
        return model, (x, jr.randint(key_y, (32,), 0, 10))
    if kind == "readme-lm":
        model = cz.RNN(16, 64, 97, "gru", readout="all", num_layers=2, vocab_size=97,
                       key=key_model)  # fmt: skip
        tokens = jr.randint(key_x, (8, 24), 0, 97)
        lengths = jnp.array([24, 20, 17, 12, 9, 6, 3, 1])
        return model, (tokens, tokens, lengths)
    model = cz.RNN(2, 64, 1, "gru", key=key_model)  # readme-main
    x = jr.normal(key_x, (128, 25, 2), dtype="float32")
    return model, (x, jr.normal(key_y, (128, 1), dtype="float32"))


def build(case: Case, seed: int):
    """`(model, batch, loss)` of `case`."""
    import curvzoo as cz
    import equinox as eqx

    sizes = dict(case.sizes)
    kind = case.model
    if kind in models.FEED_FORWARD + models.RECURRENT:
        shape = {k: sizes[k] for k in ("steps", "hidden") if k in sizes}
        model, batch = models.build(kind, seed, batch_size=sizes.get("batch"), **shape)
    elif kind == "memory":
        model, batch = models.build_memory_model(seed)
    elif kind == "eqx-mlp":
        _, batch = models.build("mlp2", seed)
        model = eqx.nn.MLP(784, 10, 256, 2, activation=jax.nn.tanh, key=jr.key(seed))
    elif kind == "rate":
        key_model, key_x, key_y = jr.split(jr.key(seed), 3)
        model = cz.RNN(sizes["inputs"], sizes["hidden"], sizes["outputs"], sizes["cell"],
                       key=key_model)  # fmt: skip
        x = jr.normal(key_x, (sizes["batch"], sizes["steps"], sizes["inputs"]), dtype="float32")
        if sizes["outputs"] == 1:
            y = jr.normal(key_y, (sizes["batch"], 1), dtype="float32")
        else:
            y = jr.randint(key_y, (sizes["batch"],), 0, sizes["outputs"])
        batch = (x, y)
    elif kind == "lm":
        from .rows.recurrent import language_model

        model, batch = language_model(sizes["layers"], sizes["hidden"], seed)
    elif kind.startswith("readme-"):
        model, batch = _readme(kind, seed)
    else:
        raise ValueError(f"unknown model {kind!r} in case {case.name}")
    return model, batch, _loss(case.loss)


def call(case: Case, loss):
    """The function `(model, batch, key) -> result` that runs `case` (`key` is used by
    the stochastic quantities only)."""
    import curvzoo as cz

    function = getattr(cz, FUNCTIONS[case.function])
    options = dict(case.options)

    def run(model, batch, key):
        if case.function in KEYED:
            return function(model, loss, batch, key=key, **options)
        return function(model, loss, batch, **options)

    return run
