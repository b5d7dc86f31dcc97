import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from .._analysis import parameter_groups
from .._dispatch._structures import Recurrent, structure
from .._kernels._precision import in_precision, parameter_dtype
from .._kernels._recurrent import RecurrentChain
from .._run._devices import host_value
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


def _check_size(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")


class RNN(AbstractModel):
    """A recurrent network on one sequence: `num_layers` cells stacked and run from zero
    states with `jax.lax.scan` (each layer's states are the next layer's inputs), and a
    dense readout (`equinox.nn.Linear`) of the top layer's last state or of every one of
    its states.

    Cells: `"elman"` ([`curvzoo.ElmanCell`][]), `"gru"` (`equinox.nn.GRUCell`, gates
    stacked as reset, update, new) and `"lstm"` (`equinox.nn.LSTMCell`, gates stacked as
    input, forget, cell, output; the next layer and the readout see the `h` part of the
    state).

    With `vocab_size=V` the model reads integer token ids, one sequence of shape `(T,)`,
    through an embedding table of shape `(V, in_size)` (`equinox.nn.Embedding`, a
    trained leaf like any other). Token ids are clipped to `[0, V)` inside the model;
    the curvature functions check them first where their values are known, and raise
    on ids out of range (under an outer `jax.jit` they cannot, and ids are clipped).

    Sequences of different lengths are padded to a common `T` and passed with their
    lengths: `model(xs, length)`. With `readout="last"` the readout is that of the state
    at step `length - 1`; with `readout="all"` the output has all `T` steps, and the
    curvzoo losses leave the steps at or past `length` out (a batch
    `(inputs, targets, lengths)`, see `curvzoo.losses`). Inside a compiled function a
    length outside `[1, T]` is clipped to it.

    **Fields:** `embedding` (`None` without `vocab_size`), `cell` (the first layer's
    cell), `upper_cells` (a tuple with the cells of layers 2 to `num_layers`, empty for
    one layer), `head`; `cells` is the tuple of all layers' cells, first layer first.

    **Example:**

    ```python
    model = curvzoo.RNN(8, 64, 10, cell="gru", key=jax.random.key(0))
    logits = model(xs)              # xs: (T, 8) -> logits: (10,)

    lm = curvzoo.RNN(16, 64, 96, cell="gru", readout="all", num_layers=2,
                     vocab_size=96, key=jax.random.key(0))
    logits = lm(tokens, length)     # tokens: (T,) int -> logits: (T, 96)
    ```
    """

    embedding: eqx.nn.Embedding | None
    cell: ElmanCell | eqx.nn.GRUCell | eqx.nn.LSTMCell
    upper_cells: tuple
    head: eqx.nn.Linear
    readout: str = eqx.field(static=True)
    in_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)
    out_size: int = eqx.field(static=True)
    num_layers: int = eqx.field(static=True)
    vocab_size: int | None = eqx.field(static=True)

    def __init__(
        self,
        in_size: int,
        hidden_size: int,
        out_size: int,
        cell: str = "gru",
        readout: str = "last",
        *,
        num_layers: int = 1,
        vocab_size: int | None = None,
        dtype=None,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `in_size`: the size of one step's input (with `vocab_size`, of one token's
            embedding).
        - `hidden_size`: the size of each layer's recurrent state.
        - `out_size`: the size of the readout.
        - `cell`: `"elman"`, `"gru"` (default) or `"lstm"`, for every layer.
        - `readout`: `"last"` (default) reads out the top layer's last state (at step
            `length - 1` when a length is given), giving an output of shape
            `(out_size,)`; `"all"` reads out every state, giving `(T, out_size)`.
        - `num_layers`: how many cells are stacked (default 1); layer `l + 1` reads the
            `h` states of layer `l`.
        - `vocab_size`: if given, the model takes token ids in `[0, vocab_size)` through
            an embedding of size `in_size`; by default it takes float inputs.
        - `dtype`: the parameters' dtype; defaults to JAX's default float dtype.
        - `key`: a `jax.random.key` for the initialisation. (Keyword only.)
        """
        _check_size("in_size", in_size)
        _check_size("hidden_size", hidden_size)
        _check_size("out_size", out_size)
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(
                f"`num_layers` must be an integer >= 1 (the number of stacked cells), got "
                f"{num_layers!r}."
            )
        if vocab_size is not None:
            if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
                raise ValueError(
                    f"`vocab_size` must be None (float inputs) or an integer >= 1, got "
                    f"{vocab_size!r}."
                )
        if cell not in _CELLS:
            raise ValueError(f"`cell` must be one of {tuple(_CELLS)}, got {cell!r}.")
        if readout not in _READOUTS:
            raise ValueError(f"`readout` must be one of {_READOUTS}, got {readout!r}.")
        # The first split as for one layer of float inputs, so such models keep their
        # initialisation; further layers and the embedding take keys of their own.
        k_cell, k_head = jr.split(key)
        k_upper = jr.split(jr.fold_in(key, 1), max(num_layers - 1, 1))
        make = _CELLS[cell]
        self.cell = make(in_size, hidden_size, dtype=dtype, key=k_cell)
        self.upper_cells = tuple(
            make(hidden_size, hidden_size, dtype=dtype, key=k) for k in k_upper[: num_layers - 1]
        )
        self.head = eqx.nn.Linear(hidden_size, out_size, dtype=dtype, key=k_head)
        self.embedding = None
        if vocab_size is not None:
            self.embedding = eqx.nn.Embedding(
                vocab_size, in_size, dtype=dtype, key=jr.fold_in(key, 2)
            )
        self.readout = readout
        self.in_size = in_size
        self.hidden_size = hidden_size
        self.out_size = out_size
        self.num_layers = num_layers
        self.vocab_size = vocab_size

    @property
    def cells(self) -> tuple:
        """Every layer's cell, the first layer's first."""
        return (self.cell, *self.upper_cells)

    def _check_sequence(self, xs) -> None:
        if self.vocab_size is not None:
            if jnp.ndim(xs) != 1 or jnp.shape(xs)[0] == 0:
                raise ValueError(
                    f"this RNN reads token ids (`vocab_size={self.vocab_size}`): one sequence "
                    f"is an integer array of shape (T,) with T >= 1, got shape "
                    f"{jnp.shape(xs)}; batch with `jax.vmap`."
                )
            if not jnp.issubdtype(jnp.result_type(xs), jnp.integer):
                raise TypeError(
                    f"this RNN reads integer token ids (`vocab_size={self.vocab_size}`), got "
                    f"an array of dtype {jnp.result_type(xs)}; for float inputs build the "
                    "model without `vocab_size`."
                )
            return
        if jnp.ndim(xs) != 2 or jnp.shape(xs)[1] != self.in_size or jnp.shape(xs)[0] == 0:
            raise ValueError(
                f"RNN expects one sequence of shape (T, {self.in_size}) with T >= 1, got "
                f"{jnp.shape(xs)}; batch with `jax.vmap`."
            )
        if not jnp.issubdtype(jnp.result_type(xs), jnp.floating):
            raise TypeError(
                f"this RNN reads float inputs of shape (T, {self.in_size}), got dtype "
                f"{jnp.result_type(xs)}; for token ids build it with `vocab_size=`."
            )

    def check_input_values(self, inputs) -> None:
        """Check concrete inputs (a batch, or one sequence): token ids must lie in
        `[0, vocab_size)`. Called by the curvature functions where values are known;
        a `ValueError` names `batch`."""
        if self.vocab_size is None:
            return
        tokens = host_value(inputs)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(
                f"`batch` token ids must lie in [0, {self.vocab_size}) (`vocab_size`), got "
                f"values from {tokens.min()} to {tokens.max()}."
            )

    def step_inputs(self, xs) -> Array:
        """The first layer's inputs, `(T, in_size)`: `xs` itself, or the embeddings of
        the token ids (clipped to `[0, vocab_size)`)."""
        if self.embedding is None:
            return xs
        return jnp.take(self.embedding.weight, xs, axis=0, mode="clip")

    def __call__(
        self,
        xs: Float[Array, "steps in_size"] | Int[Array, " steps"],
        length: Int[ArrayLike, ""] | None = None,
    ) -> Float[Array, " out_size"] | Float[Array, "steps out_size"]:
        """**Arguments:**

        - `xs`: one sequence, shape `(T, in_size)`, or with `vocab_size` token ids of
            shape `(T,)`. Float inputs (and the embeddings) of another dtype are cast to
            the cells' parameters' dtype: the model computes in its own precision.
        - `length`: optionally the sequence's length (an integer in `[1, T]`): the
            steps from `length` on are padding. The readout `"last"` then reads the state
            at step `length - 1`; `"all"` still returns every step (the losses leave the
            padded ones out). States never depend on later steps, so the outputs up to
            `length` are those of the sequence `xs[:length]`.

        **Returns:**

        The readout of the last state, shape `(out_size,)`, or with `readout="all"` of
        every state, shape `(T, out_size)`.
        """
        self._check_sequence(xs)
        if length is not None:
            if jnp.ndim(length) != 0 or not jnp.issubdtype(jnp.result_type(length), jnp.integer):
                raise TypeError(f"`length` must be one integer (a scalar), got {length!r}.")
        # The cells' precision (not the head's, whose weight may be a frozen integer
        # array): float inputs and embeddings are cast to it, so the states keep it.
        dtype = parameter_dtype(self.cells)
        inputs = self.step_inputs(xs)
        dtype = jnp.result_type(inputs) if dtype is None else dtype
        inputs = in_precision(inputs, dtype)
        is_lstm = isinstance(self.cell, eqx.nn.LSTMCell)
        h0 = jnp.zeros(self.hidden_size, dtype)
        state0 = tuple((h0, h0) if is_lstm else h0 for _ in range(self.num_layers))

        def step(states, x):
            new = []
            for layer_cell, state in zip(self.cells, states):
                state = layer_cell(x, state)
                new.append(state)
                x = state[0] if is_lstm else state
            return tuple(new), x

        _, hs = jax.lax.scan(step, state0, inputs)
        if self.readout == "all":
            return jax.vmap(self.head)(hs)
        if length is None:
            return self.head(hs[-1])
        last = jnp.clip(length - 1, 0, hs.shape[0] - 1)
        return self.head(jax.lax.dynamic_index_in_dim(hs, last, keepdims=False))

    def parameter_groups(self, tree: "RNN") -> dict[str, Array]:
        """Named groups of the entries of a PyTree shaped like this model (a diagonal,
        say), for [`curvzoo.analysis.summarize`][].

        The cells' stacked matrices are split by gate: `input.<gate>` (rows of
        `weight_ih`), `recurrent.<gate>` (rows of `weight_hh`) and `bias.<gate>`, with
        gates `reset`, `update`, `new` for the GRU (its `bias_n` joins `bias.new`) and
        `input`, `forget`, `cell`, `output` for the LSTM; the Elman cell has one gate,
        so its groups are `input`, `recurrent` and `bias`. With several layers every
        cell group ends in the layer, counted from 1: `recurrent.update.layer2`. The
        embedding table gives `embedding`, the readout `readout.weight` and
        `readout.bias`. Frozen leaves (`None`) are left out.

        **Returns:** a dict from group name to a 1-D array of that group's entries; the
        part of a name before its first dot is its kind (`embedding`, `input`,
        `recurrent`, `bias`, `readout`).
        """
        kind = _KINDS[type(self.cell)]
        gates = _GATE_NAMES[kind]
        groups: dict[str, list] = {}
        if tree.embedding is not None and tree.embedding.weight is not None:
            groups["embedding"] = [tree.embedding.weight.reshape(-1)]
        for index, cell in enumerate((tree.cell, *tree.upper_cells)):
            suffix = f".layer{index + 1}" if self.num_layers > 1 else ""

            def add(prefix, leaf, suffix=suffix):
                if leaf is None:
                    return
                for gate, block in zip(gates, jnp.split(leaf, len(gates))):
                    name = prefix if gate is None else f"{prefix}.{gate}"
                    groups.setdefault(name + suffix, []).append(block.reshape(-1))

            add("input", cell.weight_ih)
            add("recurrent", cell.weight_hh)
            add("bias", cell.bias)
            if kind == "gru" and cell.bias_n is not None:
                groups.setdefault("bias.new" + suffix, []).append(cell.bias_n.reshape(-1))
        for name in ("weight", "bias"):
            leaf = getattr(tree.head, name)
            if leaf is not None:
                groups[f"readout.{name}"] = [leaf.reshape(-1)]
        return {name: jnp.concatenate(parts) for name, parts in groups.items()}


_KINDS = {ElmanCell: "elman", eqx.nn.GRUCell: "gru", eqx.nn.LSTMCell: "lstm"}


def _cell(model: RNN, layer: int):
    return model.cell if layer == 0 else model.upper_cells[layer - 1]


def _head(model: RNN):
    return model.head


def _embedding(model: RNN):
    return model.embedding


@structure.register(RNN)
def _structure(model: RNN, example) -> Recurrent:
    del example
    chain = RecurrentChain(
        kind=_KINDS[type(model.cell)],
        readout=model.readout,
        num_layers=model.num_layers,
        tokens=model.vocab_size is not None,
        cell=_cell,
        head=_head,
        embedding=_embedding,
    )
    return Recurrent(chain)


@parameter_groups.register(RNN)
def _groups(model: RNN, tree) -> dict:
    return model.parameter_groups(tree)
