import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from .._analysis import parameter_groups
from .._dispatch._structures import Recurrent, structure
from .._kernels._recurrent import RecurrentChain
from ._base import AbstractModel


class ElmanCell(eqx.Module):
    """One step of an Elman (vanilla) recurrent cell:
    `h_t = tanh(weight_ih @ x_t + weight_hh @ h_{t-1} + bias)`.

    The input and recurrent matrices are separate leaves, shaped like those of
    `equinox.nn.GRUCell` and `equinox.nn.LSTMCell` (one gate instead of three or four),
    and initialised the same way: uniform in `[-1/sqrt(hidden_size), 1/sqrt(hidden_size)]`.
    """

    weight_ih: Float[Array, "hidden_size input_size"]
    weight_hh: Float[Array, "hidden_size hidden_size"]
    bias: Float[Array, " hidden_size"]
    input_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)

    def __init__(self, input_size: int, hidden_size: int, *, dtype=None, key: PRNGKeyArray):
        """**Arguments:**

        - `input_size`: the size of one step's input.
        - `hidden_size`: the size of the state.
        - `dtype`: the parameters' dtype; defaults to JAX's default float dtype.
        - `key`: a `jax.random.key` for the initialisation. (Keyword only.)
        """
        dtype = jnp.zeros(()).dtype if dtype is None else dtype
        k_ih, k_hh, k_b = jr.split(key, 3)
        lim = math.sqrt(1 / hidden_size)

        def uniform(k, shape):
            return jr.uniform(k, shape, dtype, minval=-lim, maxval=lim)

        self.weight_ih = uniform(k_ih, (hidden_size, input_size))
        self.weight_hh = uniform(k_hh, (hidden_size, hidden_size))
        self.bias = uniform(k_b, (hidden_size,))
        self.input_size = input_size
        self.hidden_size = hidden_size

    def __call__(
        self, input: Float[Array, " input_size"], hidden: Float[Array, " hidden_size"]
    ) -> Float[Array, " hidden_size"]:
        """**Arguments:**

        - `input`: one step's input, shape `(input_size,)`.
        - `hidden`: the previous state, shape `(hidden_size,)`.

        **Returns:**

        The next state, shape `(hidden_size,)`.
        """
        return jnp.tanh(self.weight_ih @ input + self.weight_hh @ hidden + self.bias)


_CELLS = {"elman": ElmanCell, "gru": eqx.nn.GRUCell, "lstm": eqx.nn.LSTMCell}
_READOUTS = ("last", "all")


_GATE_NAMES = {
    "elman": (None,),
    "gru": ("reset", "update", "new"),
    "lstm": ("input", "forget", "cell", "output"),
}


class RNN(AbstractModel):
    """A recurrent network on one sequence: a cell run from a zero state with
    `jax.lax.scan`, and a dense readout (`equinox.nn.Linear`) of the last state or of
    every state.

    Cells: `"elman"` ([`curvzoo.ElmanCell`][]), `"gru"` (`equinox.nn.GRUCell`, gates
    stacked as reset, update, new) and `"lstm"` (`equinox.nn.LSTMCell`, gates stacked as
    input, forget, cell, output; the readout sees the `h` part of the state).

    **Example:**

    ```python
    model = curvzoo.RNN(8, 64, 10, cell="gru", key=jax.random.key(0))
    logits = model(xs)              # xs: (T, 8) -> logits: (10,)
    ```
    """

    cell: ElmanCell | eqx.nn.GRUCell | eqx.nn.LSTMCell
    head: eqx.nn.Linear
    readout: str = eqx.field(static=True)
    in_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)
    out_size: int = eqx.field(static=True)

    def __init__(
        self,
        in_size: int,
        hidden_size: int,
        out_size: int,
        cell: str = "gru",
        readout: str = "last",
        *,
        dtype=None,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `in_size`: the size of one step's input.
        - `hidden_size`: the size of the recurrent state.
        - `out_size`: the size of the readout.
        - `cell`: `"elman"`, `"gru"` (default) or `"lstm"`.
        - `readout`: `"last"` (default) reads out the last state, giving an output of
            shape `(out_size,)`; `"all"` reads out every state, giving `(T, out_size)`.
        - `dtype`: the parameters' dtype; defaults to JAX's default float dtype.
        - `key`: a `jax.random.key` for the initialisation. (Keyword only.)
        """
        for name, value in (
            ("in_size", in_size),
            ("hidden_size", hidden_size),
            ("out_size", out_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
        if cell not in _CELLS:
            raise ValueError(f"`cell` must be one of {tuple(_CELLS)}, got {cell!r}.")
        if readout not in _READOUTS:
            raise ValueError(f"`readout` must be one of {_READOUTS}, got {readout!r}.")
        k_cell, k_head = jr.split(key)
        self.cell = _CELLS[cell](in_size, hidden_size, dtype=dtype, key=k_cell)
        self.head = eqx.nn.Linear(hidden_size, out_size, dtype=dtype, key=k_head)
        self.readout = readout
        self.in_size = in_size
        self.hidden_size = hidden_size
        self.out_size = out_size

    def __call__(
        self, xs: Float[Array, "steps in_size"]
    ) -> Float[Array, " out_size"] | Float[Array, "steps out_size"]:
        """**Arguments:**

        - `xs`: one sequence, shape `(T, in_size)`.

        **Returns:**

        The readout of the last state, shape `(out_size,)`, or with `readout="all"` of
        every state, shape `(T, out_size)`.
        """
        if xs.ndim != 2 or xs.shape[1] != self.in_size or xs.shape[0] == 0:
            raise ValueError(
                f"RNN expects one sequence of shape (T, {self.in_size}) with T >= 1, got "
                f"{xs.shape}; batch with `jax.vmap`."
            )
        h0 = jnp.zeros(self.hidden_size, self.head.weight.dtype)
        is_lstm = isinstance(self.cell, eqx.nn.LSTMCell)
        state0 = (h0, h0) if is_lstm else h0

        def step(state, x):
            state = self.cell(x, state)
            h = state[0] if is_lstm else state
            return state, (h if self.readout == "all" else None)

        state, hs = jax.lax.scan(step, state0, xs)
        if self.readout == "all":
            return jax.vmap(self.head)(hs)
        return self.head(state[0] if is_lstm else state)

    def parameter_groups(self, tree: "RNN") -> dict[str, Array]:
        """Named groups of the entries of a PyTree shaped like this model (a diagonal,
        say), for [`curvzoo.analysis.summarize`][].

        The cell's stacked matrices are split by gate: `input.<gate>` (rows of
        `weight_ih`), `recurrent.<gate>` (rows of `weight_hh`) and `bias.<gate>`, with
        gates `reset`, `update`, `new` for the GRU (its `bias_n` joins `bias.new`) and
        `input`, `forget`, `cell`, `output` for the LSTM; the Elman cell has one gate,
        so its groups are `input`, `recurrent` and `bias`. The readout gives
        `readout.weight` and `readout.bias`. Frozen leaves (`None`) are left out.

        **Returns:** a dict from group name to a 1-D array of that group's entries.
        """
        kind = _KINDS[type(self.cell)]
        gates = _GATE_NAMES[kind]
        cell = tree.cell
        groups: dict[str, list] = {}

        def add(prefix, leaf):
            if leaf is None:
                return
            for gate, block in zip(gates, jnp.split(leaf, len(gates))):
                name = prefix if gate is None else f"{prefix}.{gate}"
                groups.setdefault(name, []).append(block.reshape(-1))

        add("input", cell.weight_ih)
        add("recurrent", cell.weight_hh)
        add("bias", cell.bias)
        if kind == "gru" and cell.bias_n is not None:
            groups.setdefault("bias.new", []).append(cell.bias_n.reshape(-1))
        for name in ("weight", "bias"):
            leaf = getattr(tree.head, name)
            if leaf is not None:
                groups[f"readout.{name}"] = [leaf.reshape(-1)]
        return {name: jnp.concatenate(parts) for name, parts in groups.items()}


_KINDS = {ElmanCell: "elman", eqx.nn.GRUCell: "gru", eqx.nn.LSTMCell: "lstm"}


@structure.register(RNN)
def _structure(model: RNN, example) -> Recurrent:
    del example
    kind = _KINDS[type(model.cell)]
    return Recurrent(RecurrentChain(kind, lambda m: m.cell, lambda m: m.head, model.readout))


@parameter_groups.register(RNN)
def _groups(model: RNN, tree) -> dict:
    return model.parameter_groups(tree)
