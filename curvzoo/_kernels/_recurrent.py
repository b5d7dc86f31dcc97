r"""The structured exact kernel for recurrent networks (Elman, GRU, LSTM; stacked layers,
token embeddings, sequences of different lengths).

## The model, written as sites and unit updates

One sequence of `T` steps through `L` stacked layers. Layer `l` has a state `S^l_t`
(the `H` hidden units; for the LSTM the `2H` values `(h, c)`, so `q = 2` values per
unit), `S^l_{-1} = 0`, and reads an input `x^l_t`: the step's input `x_t` (or the
embedding row of its token) for the first layer, the `h` part of `S^{l-1}_t` above it.
Each node `(l, t)` has *node inputs* `xi^l_t = (xi_{t,a,alpha})`, for every unit `a` a
vector of `m` slots, affine in the parameters, in `x^l_t` and in `S^l_{t-1}`:

- Elman (`m = 1`): `xi = W_ih x + W_hh h_{t-1} + b`;
- GRU (`m = 7`): three input gates `W_ih x + b`, three recurrent gates `W_hh h_{t-1}`
  (plus `b_n` on the third), and `h_{t-1}[a]` itself;
- LSTM (`m = 5`): four gates `W_ih x + W_hh h_{t-1} + b`, and `c_{t-1}[a]`.

So `xi^l_t = A^l x^l_t + C^l S^l_{t-1} + const` with constant maps `A` (the rows of
`W_ih`) and `C` (the rows of `W_hh`, and the identity slots). The *unit update*
`S_t[a] = U(xi_{t,a})` is the same parameter-free function for every unit (`tanh`; the
GRU's gates and interpolation; the LSTM's gates and cell). Every weight entry
`(slot alpha, unit a, column b)` of layer `l` feeds one slot of one unit at every step,
with coefficient `v_{t,b}`: `x^l_{t,b}`, `h^l_{t-1,b}` or `1`.

## The diagonal

Let `Lambda(delta)` be the loss with perturbations `delta_{t,a,alpha}` added to the slots
of layer `l` and `K_{a,alpha}[s,t] = d^2 Lambda / d delta_{s,a,alpha} d delta_{t,a,alpha}`
its same-slot blocks. For an entry with coefficient `v` (`eps` its change),
`delta_t = eps * v_t(eps)`, so

    diag = sum_{s,t} v_s v_t K[s,t] + sum_t e_t * d^2 delta_t / d eps^2,

with `e_t = dLambda/d delta_t` (backpropagation through time). The second term is zero
for inputs and biases (a layer's input does not depend on its own weights); for
`W_hh[(alpha, a), b]`, whose coefficient `h_{t-1,b}` depends on the entry itself,
`d^2 delta_t / d eps^2 = 2 dv_t/d eps`, giving
`2 sum_{s<t} e_t (dh_{t-1,b}/d delta_s) h_{s-1,b}`.

`K` follows from one formula: the loss's Hessian is the sum, over the nonlinear nodes
(the unit updates and the loss), of the node's adjoint-weighted Hessian between the
Jacobians of its inputs. With `D^l_t[a] = dU/dxi` (`q x m`),
`R^l_t[a] = sum_c lambda_{t,a,c} d^2 U_c / dxi^2` (`m x m`, `lambda^l_t = dLambda/dS^l_t`
the state adjoints), `J^l_t = D C = dS^l_t/dS^l_{t-1}` and `B^l_t = D A = dS^l_t / dx^l_t`:

- *The frontier.* Nodes run in the order `(t, l)`: step by step, layer by layer. After
  node `k = (l, t)` the values that the rest of the computation reads are the frontier
  `F_k = (S^0_t, .., S^l_t, S^{l+1}_{t-1}, .., S^{L-1}_{t-1})`. Node `k` changes block `l`
  only, from block `l` (through `J`) and block `l - 1` (through `B`): its Jacobian
  `P_k` is the identity but for that block row, so the Jacobian of a step is block
  lower-bidiagonal, not a full `L n x L n` matrix.
- *The backward sweep.* `Mf_k`, the Hessian of the loss with respect to a perturbation
  of `F_k` (everything after node `k` counted), follows from
  `Mf_{k-1} = P_k^T Mf_k P_k + Omega_k + O_{k-1}`: `Omega_k = Cx^T blockdiag(R) Cx`
  with `Cx = dxi/dF_{k-1}` (blocks `A` and `C`), and the readout's `O = V^T H_out V` on
  the top layer's `h` after the node that computes it. Per node it is one block row and
  column, `4 L n^3` multiply-adds; `M^l_t = Mf_{(l,t)}[l, l]` is the Hessian with
  respect to a perturbation of the state `S^l_t` alone.
- *The impulse responses.* A slot perturbation at `(l, s, a)` moves the state as
  `D^l_s[a]` moves `S^l_s[a]`, so everything downstream sees it through unit `a`'s
  state, shared by all slots and columns. Its effect on the frontier is carried
  forward, `Gamma^{l'}_{(l,s)} = dS^{l'}/dS^l_s` for the blocks `l' >= l` (node
  `(l', t)` maps it through `J^{l'}_t` and adds `B^{l'}_t` times the block below).
- *The reads.* For `s < t`, differentiating `dLambda/d delta_t` along the frontier
  before node `(l, t)` gives
  `K_{a,alpha}[s,t] = D_s[a]_alpha^T (sum_{l' >= l} Gamma^{l'}_{t-1}[:, a]^T Q^l_t[l'][:, a]
  D_t[a]_alpha + Gamma^l_{t-1}[:, a]^T C_a^T R_t[a]_{:,alpha})`, where
  `Q^l_t[l] = J^{lT}_t M^l_t` and `Q^l_t[l'] = Mf_{(l,t)}[l', l]` above it; and
  `K_{a,alpha}[t,t] = D_t[a]_alpha^T M^l_t[a, a] D_t[a]_alpha + R_t[a]_{alpha alpha}`.

Token embeddings: the entry `(v, j)` of the table moves the first layer's input
`x_{t,j}` at the steps where token `v` occurs, through every unit (`A[:, :, j]`), so its
diagonal is `sum_{s,t: tok_s = tok_t = v} X[s,t,j]` with `X` the same-column Hessian
with respect to the inputs: the impulse responses of sources `U_s = B^0_s` (`n x in`)
read against `Q^0_t U_t` and the local `C^T R A`. Sequences of different lengths: the
readout's Hessian sits at step `length - 1` (`"last"`) or at the valid steps (`"all"`);
states at or past the length reach no loss term, so their adjoints, `M` and `K` are zero.
The GGN diagonal is the same computation without the node Hessians (`R = 0`, no
`Omega`, no mixed term).

## Cost and memory, per sample

`T` steps, `L` layers of `H` units, state size `n = q H` per layer: the impulse
responses of layer `l`'s sources reach `L - l` blocks, `T^2 / 2` source-step pairs of
`n^3` multiply-adds each (plus `n^2 H` for each block above), so about
`L^2 T^2 n^3 / 2` in all, against `L^3 T^2 n^3 / 2` for one flat state of size `L n`;
the backward sweep `4 L^2 T n^3`; the reads `(L + m) T^2 n^2 / 2`. Against
`P ~ m H (in + L H)` Hessian-vector products of `~T m L H (in + H)` each for the generic
kernel, that is `~L^2 T^2 H^3` against `~L^2 T H^4`. Memory per sample:
`T (L n)^2` for the stored sweep and `T L^2 n^2` for the impulse responses,
`T^2 H m L` for `K`; samples are processed in chunks that fit `memory_budget`.
"""

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array

from ._precision import parameter_dtype
from ._samples import AbstractSampleKernel, trained_mask


# ## Cells as node inputs and unit updates


@dataclasses.dataclass(frozen=True)
class RecurrentChain:
    """A recurrent model: `num_layers` cells of one kind, stacked and run from zero
    states, an optional embedding of token ids in front, and a dense `head` on the top
    layer's last state (`readout="last"`, at step `length - 1` with lengths) or on
    every state (`"all"`). `cells`, `head` and `embedding` read the modules off the
    model (module-level functions, so that equal chains compare equal)."""

    kind: str  # "elman", "gru" or "lstm"
    readout: str  # "last" or "all"
    num_layers: int
    tokens: bool
    cell: Callable[[Any, int], Any]  # cell(model, layer)
    head: Callable[[Any], Any]
    embedding: Callable[[Any], Any]

    def cells(self, model) -> tuple:
        return tuple(self.cell(model, layer) for layer in range(self.num_layers))

    def parts(self, model) -> tuple:
        """The modules whose arrays the kernel differentiates (every trained array of
        the model must be in one)."""
        parts = (*self.cells(model), self.head(model))
        return (self.embedding(model), *parts) if self.tokens else parts


SLOTS = {"elman": 1, "gru": 7, "lstm": 5}
STATE_PER_UNIT = {"elman": 1, "gru": 1, "lstm": 2}
# Which slot each gate's row of W_ih / W_hh / bias feeds.
IH_SLOTS = {"elman": (0,), "gru": (0, 1, 2), "lstm": (0, 1, 2, 3)}
HH_SLOTS = {"elman": (0,), "gru": (3, 4, 5), "lstm": (0, 1, 2, 3)}


def _node_inputs(kind, cell, x, state):
    """`xi_t` as `(H, m)` from one step's input and the flat previous state."""
    hidden = cell.hidden_size
    if kind == "elman":
        return (cell.weight_ih @ x + cell.weight_hh @ state + cell.bias)[:, None]
    if kind == "gru":
        ig = cell.weight_ih @ x
        hg = cell.weight_hh @ state
        if cell.use_bias:
            ig = ig + cell.bias
            hg = hg.at[2 * hidden :].add(cell.bias_n)
        return jnp.concatenate(
            [ig.reshape(3, hidden), hg.reshape(3, hidden), state[None]], axis=0
        ).T
    h, c = state[:hidden], state[hidden:]
    lin = cell.weight_ih @ x + cell.weight_hh @ h
    if cell.use_bias:
        lin = lin + cell.bias
    return jnp.concatenate([lin.reshape(4, hidden), c[None]], axis=0).T


def _unit_update(kind, xi):
    """One unit's new state `(q,)` from its slots `(m,)`; no parameters.

    The slots are taken apart by one `split` (whose transpose, in the node Hessians'
    reverse pass, is one concatenation), not by indexing each (whose transposes are a
    pad per slot summed by `add_any`, which XLA keeps live all at once: 19.9 against
    10.2 MiB for a GRU of 16 units, T = 16, N = 32)."""
    xi = [part[0] for part in jnp.split(xi, xi.shape[0])] if xi.shape[0] > 1 else xi
    if kind == "elman":
        return jnp.tanh(xi[:1])
    if kind == "gru":
        reset = jax.nn.sigmoid(xi[0] + xi[3])
        update = jax.nn.sigmoid(xi[1] + xi[4])
        new = jnp.tanh(xi[2] + reset * xi[5])
        return (new + update * (xi[6] - new))[None]
    i, f, o = jax.nn.sigmoid(xi[0]), jax.nn.sigmoid(xi[1]), jax.nn.sigmoid(xi[3])
    g = jnp.tanh(xi[2])
    c = f * xi[4] + i * g
    return jnp.stack([o * jnp.tanh(c), c])


def _flat_state(unit_states):
    """`(H, q)` unit states to the flat state `(q H,)`, ordered `(component, unit)`."""
    return unit_states.T.reshape(-1)


def _state_dtype(cells, xs):
    """The state's dtype, as the zoo `RNN` computes it: the cells' precision (their
    floating-point arrays'), to which it casts its inputs; the inputs' where the cells
    hold no floating-point array."""
    dtype = parameter_dtype(cells)
    return jnp.result_type(xs) if dtype is None else dtype


def _run_stack(kind, cells, xs, perturbation=None):
    """States `(T, L, n)` and node inputs `(T, L, H, m)` of the stacked cells on the
    first layer's inputs `xs` `(T, in)`, optionally with `perturbation` `(T, L, n)`
    added to each new state."""
    hidden = cells[0].hidden_size
    n = STATE_PER_UNIT[kind] * hidden
    dtype = _state_dtype(cells, xs)
    if perturbation is None:
        perturbation = jnp.zeros((xs.shape[0], len(cells), n), dtype)

    def step(states, inputs):
        x, eps = inputs
        new, xis = [], []
        for layer, cell in enumerate(cells):
            xi = _node_inputs(kind, cell, x, states[layer])
            state = _flat_state(jax.vmap(lambda v: _unit_update(kind, v))(xi)) + eps[layer]
            new.append(state)
            xis.append(xi)
            x = state[:hidden]
        new = jnp.stack(new)
        return new, (new, jnp.stack(xis))

    _, (states, xis) = jax.lax.scan(step, jnp.zeros((len(cells), n), dtype), (xs, perturbation))
    return states, xis


def _run(kind, cell, xs, perturbation=None):
    """One layer: states `(T, n)` and node inputs `(T, H, m)`."""
    if perturbation is not None:
        perturbation = perturbation[:, None]
    states, xis = _run_stack(kind, (cell,), xs, perturbation)
    return states[:, 0], xis[:, 0]


def _maps(kind, cell, in_size, dtype):
    """The constant maps of the node inputs: `A` `(H, m, in)` from the layer's input and
    `C` `(H, m, n)` from its previous state."""
    n = STATE_PER_UNIT[kind] * cell.hidden_size
    zero_x, zero_s = jnp.zeros(in_size, dtype), jnp.zeros(n, dtype)
    A = jax.jacfwd(lambda x: _node_inputs(kind, cell, x, zero_s))(zero_x)
    C = jax.jacfwd(lambda s: _node_inputs(kind, cell, zero_x, s))(zero_s)
    return A, C


# ## One sample: the forward pass and the local derivatives


REC_SLOTS = {"elman": (0,), "gru": (3, 4, 5, 6), "lstm": (0, 1, 2, 3, 4)}  # slots C reaches
# Phases of the forward sweep: in phase p the impulse responses of the first
# `bounds[p + 1]` source steps are carried, so little of the work is on sources that do
# not exist yet (`P / (P + 1)` of it is useful), at the cost of one compiled loop each:
# `PHASES` for one layer, fewer for stacked layers, whose loop bodies are longer, and
# one per `STEPS_PER_PHASE` steps at most (short sequences cost little either way).
PHASES = 8
STEPS_PER_PHASE = 4


class _Setup(NamedTuple):
    """One sample's forward pass and local derivatives (per layer: lists)."""

    D: list  # (T, H, q, m): dU/dxi
    R: list  # (T, H, m, m): adjoint-weighted d2U/dxi2 (zero for the GGN)
    e: list  # (T, H, m): slot adjoints
    J: list  # (T, n, n): dS_t/dS_{t-1}
    B: list  # (T, n, in_l): dS_t/dx_t (the layer's input)
    A: list  # (H, m, in_l): the input map
    C: list  # (H, m, n): the recurrent map
    v: list  # (T, in_l): the layer's inputs
    hp: list  # (T, H): the layer's previous h
    O: Array  # (T, H, H): the readout's Hessian at each step, in the top layer's h
    cols: Array  # (T, K, C) and
    weights: Array  # (T, K): the readout's Hessian factor per step
    h_top: Array  # (T, H)
    tokens: Array | None  # (T,)


def _readout_factors(chain, loss, prediction, y, length, steps):
    """The readout's Hessian as per-step factors: `(cols (T, K, C), weights (T, K))`,
    the weights zero at the steps that reach no loss term."""
    if chain.readout == "all":
        cols, weights = loss.output_hessian_step_factor(prediction, y)
        if length is not None:
            weights = weights * (jnp.arange(steps) < length).astype(weights.dtype)[:, None]
        return cols, weights
    cols, weights = loss.output_hessian_factor(prediction, y)
    last = steps - 1 if length is None else jnp.clip(length - 1, 0, steps - 1)
    at = (jnp.arange(steps) == last).astype(weights.dtype)
    return jnp.broadcast_to(cols[None], (steps, *cols.shape)), at[:, None] * weights[None]


def _setup(chain: RecurrentChain, hessian: bool, model, loss, sample) -> _Setup:
    xs, y = sample[0], sample[1]
    length = sample[2] if len(sample) > 2 else None
    kind = chain.kind
    cells = chain.cells(model)
    head = chain.head(model)
    L = len(cells)
    hidden = cells[0].hidden_size
    q, m = STATE_PER_UNIT[kind], SLOTS[kind]
    n = q * hidden
    steps = xs.shape[0]
    tokens = None
    if chain.tokens:
        tokens = xs
        xs = jnp.take(chain.embedding(model).weight, tokens, axis=0, mode="clip")
    dtype = _state_dtype(cells, xs)
    xs = xs.astype(dtype)  # products of inputs (their squares among them) in the model's precision
    last = None if length is None else jnp.clip(length - 1, 0, steps - 1)

    def predict(states):
        h = states[:, L - 1, :hidden]
        if chain.readout == "all":
            return jax.vmap(head)(h)
        return head(h[-1] if last is None else jax.lax.dynamic_index_in_dim(h, last, 0, False))

    def loss_of_perturbation(eps):
        states, xis = _run_stack(kind, cells, xs, eps)
        prediction = predict(states)
        masked = length if chain.readout == "all" else None
        return loss.sample_loss(prediction, y, masked), (states, xis, prediction)

    zero = jnp.zeros((steps, L, n), dtype)
    if hessian:
        adjoints, (states, xis, prediction) = jax.grad(loss_of_perturbation, has_aux=True)(zero)
    else:
        states, xis = _run_stack(kind, cells, xs)
        prediction = predict(states)
        adjoints = zero
    unit_adjoints = adjoints.reshape(steps, L, q, hidden).transpose(0, 1, 3, 2)  # (T,L,H,q)
    update = lambda v: _unit_update(kind, v)  # noqa: E731

    def local(xi, lam):
        jac = jax.jacfwd(update)(xi)  # (q, m)
        if not hessian:
            return jac, jnp.zeros((m, m), xi.dtype)
        return jac, jax.hessian(lambda v: jnp.dot(lam, update(v)))(xi)

    D, R = jax.vmap(jax.vmap(jax.vmap(local)))(xis, unit_adjoints)  # (T,L,H,q,m), (T,L,H,m,m)
    e = jnp.einsum("tlac,tlacm->tlam", unit_adjoints, D)
    h_states = states[:, :, :hidden]
    h_prev = jnp.concatenate([jnp.zeros((1, L, hidden), dtype), h_states[:-1]])
    inputs = [xs] + [h_states[:, layer - 1] for layer in range(1, L)]
    maps = [_maps(kind, cell, inp.shape[1], dtype) for cell, inp in zip(cells, inputs)]
    As, Cs = [a for a, _ in maps], [c for _, c in maps]
    Ds = [D[:, layer] for layer in range(L)]
    J = [jnp.einsum("tacm,amk->tcak", Ds[l], Cs[l]).reshape(steps, n, n) for l in range(L)]
    B = [jnp.einsum("tacm,amk->tcak", Ds[l], As[l]).reshape(steps, n, -1) for l in range(L)]
    cols, weights = _readout_factors(chain, loss, prediction, y, length, steps)
    heads = jnp.einsum("tkc,ch->tkh", cols, head.weight)  # V^T col, (T, K, H)
    O = jnp.einsum("tk,tkh,tkg->thg", weights, heads, heads)
    return _Setup(
        D=Ds, R=[R[:, layer] for layer in range(L)], e=[e[:, layer] for layer in range(L)],
        J=J, B=B, A=As, C=Cs, v=inputs, hp=[h_prev[:, layer] for layer in range(L)], O=O,
        cols=cols, weights=weights, h_top=h_states[:, L - 1], tokens=tokens,
    )  # fmt: skip


# ## The backward sweep over the frontier


def _omega(kind, C, A, layer: int, t_R):
    """The node's Hessian in its frontier inputs: `(C^T R C, A^T R A, A^T R C)` over
    the slots that `C` (`(H, r, n)`) and `A` (`(H, g, H)`) reach (the last two for
    layers above the first); each one matrix product over `(unit, slot)`."""
    rec, ih = jnp.array(REC_SLOTS[kind]), jnp.array(IH_SLOTS[kind])
    R_c = t_R[:, :, rec]  # (H, m, r)
    RC = jnp.einsum("arp,apj->arj", R_c[:, rec], C)
    cc = jnp.einsum("ark,arj->kj", C, RC)
    if layer == 0:
        return cc, None, None
    aa = jnp.einsum("agk,agj->kj", A, jnp.einsum("agp,apj->agj", t_R[:, ih][:, :, ih], A))
    ac = jnp.einsum("agk,agj->kj", A, jnp.einsum("agr,arj->agj", R_c[:, ih], C))
    return cc, aa, ac


def _backward_sweep(kind, s: _Setup, hessian: bool) -> tuple[list, list]:
    """Per layer `l`: `(T, L - l, n, n)`, the column block `l` of the frontier Hessian
    after node `(l, t)` over blocks `l..L-1` (its block `l` is `M^l_t`), and `(T, n, n)`,
    `Q^l_t = (M^l_t J^l_t)^T`, what the responses at `t - 1` are read against."""
    L = len(s.D)
    steps, n, _ = s.J[0].shape
    hidden = s.O.shape[1]
    dtype = s.O.dtype
    top = L - 1
    O_prev = jnp.concatenate([jnp.zeros((1, hidden, hidden), dtype), s.O[:-1]])
    C_rec = [s.C[l][:, jnp.array(REC_SLOTS[kind])] for l in range(L)]
    A_ih = [s.A[l][:, jnp.array(IH_SLOTS[kind])] for l in range(L)]

    def step(Mf, inputs):
        Jt, Bt, Rt, O_before = inputs
        emitted, pulled = [None] * L, [None] * L
        for l in reversed(range(L)):
            emitted[l] = Mf[l:, :, l, :]
            col = Mf[:, :, l, :]  # columns: Mf P
            if l > 0:
                Mf = Mf.at[:, :, l - 1, :hidden].add(jnp.einsum("ikj,jh->ikh", col, Bt[l]))
            col_J = jnp.einsum("ikj,jm->ikm", col, Jt[l])
            pulled[l] = col_J[l].T
            Mf = Mf.at[:, :, l, :].set(col_J)
            row = Mf[l]  # rows: P^T (Mf P)
            if l > 0:
                Mf = Mf.at[l - 1, :hidden].add(jnp.einsum("jh,jim->him", Bt[l], row))
            Mf = Mf.at[l].set(jnp.einsum("jk,jim->kim", Jt[l], row))
            if hessian:
                cc, aa, ac = _omega(kind, C_rec[l], A_ih[l], l, Rt[l])
                Mf = Mf.at[l, :, l, :].add(cc)
                if l > 0:
                    Mf = Mf.at[l - 1, :hidden, l - 1, :hidden].add(aa)
                    Mf = Mf.at[l - 1, :hidden, l, :].add(ac)
                    Mf = Mf.at[l, :, l - 1, :hidden].add(ac.T)
        Mf = Mf.at[top, :hidden, top, :hidden].add(O_before)
        return Mf, (tuple(emitted), tuple(pulled))

    Mf = jnp.zeros((L, n, L, n), dtype).at[top, :hidden, top, :hidden].set(s.O[-1])
    B_above = [jnp.zeros((steps, n, hidden), dtype)] + [s.B[l] for l in range(1, L)]
    _, (columns, pulled) = jax.lax.scan(
        step, Mf, (jnp.stack(s.J, 1), jnp.stack(B_above, 1), jnp.stack(s.R, 1), O_prev),
        reverse=True,
    )  # fmt: skip
    return list(columns), list(pulled)


# ## The forward sweep: impulse responses, read as they go


def _phases(steps: int, layers: int) -> list[int]:
    count = max(1, min(max(3, PHASES // layers), -(-steps // STEPS_PER_PHASE)))
    return sorted({round(steps * (p + 1) / count) for p in range(count)})


def _forward_sweep(kind, s: _Setup, columns: list, pulled: list, hessian: bool, embedding: bool):
    """The off-diagonal (`s < t`) part of every same-slot block `K`, contracted with the
    coefficients as it is read, plus the mixed term: per layer the accumulated
    `(ih (G, H, in), hh (G, H, H), slots (m, H))`, and the embedding's per-step values
    `(T, in)` (or `None`).

    The responses are stored transposed, block `b` as `(source layer, source unit,
    source step, source component, row of block b)`: the update at a step is one tall
    matrix product `G @ J^T` (and `G_below @ B^T`), and every read is a product over
    contiguous rows, batched over units. All reads of layer `l`'s sources at step `t`
    use the responses at `t - 1`, before the update: against `Q^l_t = (M^l_t J^l_t)^T`
    on block `l`, the frontier Hessian on the blocks above, `C` for node `(l, t)`'s own
    Hessian, and for the mixed term."""
    L = len(s.D)
    steps, n, _ = s.J[0].shape
    hidden = s.O.shape[1]
    q, m = STATE_PER_UNIT[kind], SLOTS[kind]
    dtype = s.O.dtype
    ih, hh, rec = (jnp.array(x) for x in (IH_SLOTS[kind], HH_SLOTS[kind], REC_SLOTS[kind]))
    gates = len(HH_SLOTS[kind])
    # C's rows for the slots it reaches, per unit: (H, n, r).
    C_rec = [s.C[l][:, rec].transpose(0, 2, 1) for l in range(L)]
    in0 = s.v[0].shape[1]
    # rho_x[t][:, j] = sum_a C_a^T R_t[a] A[a, :, j]: node (0, t)'s Hessian pairing its
    # recurrent inputs with input column j.
    rho_x = jnp.einsum("amk,tamp,apj->tkj", s.C[0], s.R[0], s.A[0]) if embedding else None
    # A new source: unit a's state components, `(H, q, n)` rows of the identity.
    fresh = jnp.eye(n, dtype=dtype).reshape(q, hidden, n).transpose(1, 0, 2)[None, :, None]

    def by_unit(mat):  # (n, n) read against rows k, columns (d, a) -> (H, n, q)
        return mat.reshape(n, q, hidden).transpose(2, 0, 1)

    def step_fn(S):
        D_src = [s.D[l][:S].transpose(1, 0, 2, 3) for l in range(L)]  # (H, S, q, m)
        v_src = [s.v[l][:S] for l in range(L)]
        hp_src = [s.hp[l][:S] for l in range(L)]
        tok_src = None if s.tokens is None else s.tokens[:S]

        def body(carry, inputs):
            G, Gx, acc = carry
            t, per_layer, x_inputs = inputs
            acc = list(acc)
            emb_t = None
            for l in range(L):
                Jt, Bt, Dt, Rt, et, vt, hpt, cols_t, Q_t = per_layer[l]
                own = G[l][l]  # (H, S, q, n): layer l's sources in block l, at t - 1
                # Reads: block l against Q and C (node (l, t)'s own Hessian), the
                # blocks above against the frontier Hessian.
                target = jnp.concatenate([by_unit(Q_t), C_rec[l]], axis=2)  # (H, n, q + r)
                read = jnp.einsum("asck,akj->ascj", own, target)
                Z, Y = read[..., :q], read[..., q:]
                for b in range(l + 1, L):
                    Z = Z + jnp.einsum("asck,akd->ascd", G[b][l], by_unit(cols_t[b - l]))
                first = jnp.einsum("ascd,adm->ascm", Z, Dt)
                second = jnp.einsum("ascj,ajm->ascm", Y, Rt[:, rec])
                K = jnp.einsum("ascm,ascm->mas", D_src[l], first + second)  # (m, H, S)
                ih_acc, hh_acc, slot_acc = acc[l]
                ih_acc = ih_acc + 2 * jnp.einsum("gas,sb->gab", K[ih], v_src[l]) * vt
                hh_acc = hh_acc + 2 * jnp.einsum("gas,sb->gab", K[hh], hp_src[l]) * hpt
                if hessian:  # the mixed term of W_hh: responses of h, weighted
                    # sum over (s, c) of G[a, s, c, b] hp[s, b] D[a, s, c, g]: one fused
                    # reduction (a product over units would be one tiny product each).
                    weighted = (own[..., :hidden] * hp_src[l][None, :, None, :])[:, :, :, None]
                    T1 = jnp.sum(weighted * D_src[l][..., hh][..., None], axis=(1, 2))
                    hh_acc = hh_acc + 2 * jnp.einsum("ag,agb->gab", et[:, hh], T1)
                slot_acc = slot_acc + 2 * jnp.sum(K, axis=-1)
                acc[l] = (ih_acc, hh_acc, slot_acc)
                if embedding and l == 0:
                    Ut, rho_t, tok_t = x_inputs
                    x_read = jnp.einsum("sjk,kj->sj", Gx[0], rho_t + Q_t @ Ut)
                    for b in range(1, L):
                        x_read = x_read + jnp.einsum("sjk,kj->sj", Gx[b], cols_t[b] @ Ut)
                    same = (tok_src == tok_t).astype(dtype)
                    emb_t = 2 * jnp.einsum("s,sj->j", same, x_read)
                # The update of block l: every source's response, through J and B.
                new = jnp.einsum("...k,jk->...j", G[l], Jt)
                if l > 0:
                    below = jnp.einsum("...h,jh->...j", G[l - 1][..., :hidden], Bt)
                    new = new.at[:l].add(below)
                # New sources: node (l, t)'s own state.
                new = jax.lax.dynamic_update_slice(new, fresh, (l, 0, t, 0, 0))
                G = G[:l] + (new,) + G[l + 1 :]
                if embedding:
                    new_x = jnp.einsum("sjk,ik->sji", Gx[l], Jt)
                    if l > 0:
                        new_x = new_x + jnp.einsum("sjh,ih->sji", Gx[l - 1][..., :hidden], Bt)
                    if l == 0:
                        new_x = jax.lax.dynamic_update_slice(new_x, x_inputs[0].T[None], (t, 0, 0))
                    Gx = Gx[:l] + (new_x,) + Gx[l + 1 :]
            return (G, Gx, tuple(acc)), emb_t

        return body

    acc = tuple(
        (
            jnp.zeros((len(IH_SLOTS[kind]), hidden, s.v[l].shape[1]), dtype),
            jnp.zeros((gates, hidden, hidden), dtype),
            jnp.zeros((m, hidden), dtype),
        )
        for l in range(L)
    )
    G = tuple(jnp.zeros((b + 1, hidden, 0, q, n), dtype) for b in range(L))
    Gx = tuple(jnp.zeros((0, in0, n), dtype) for _ in range(L)) if embedding else ()
    emb = []
    start = 0
    for stop in _phases(steps, L):
        pad = stop - G[0].shape[2]
        G = tuple(jnp.pad(g, ((0, 0), (0, 0), (0, pad), (0, 0), (0, 0))) for g in G)
        Gx = tuple(jnp.pad(g, ((0, pad), (0, 0), (0, 0))) for g in Gx)
        span = slice(start, stop)
        per_layer = tuple(
            (s.J[l][span], s.B[l][span], s.D[l][span], s.R[l][span], s.e[l][span],
             s.v[l][span], s.hp[l][span], columns[l][span], pulled[l][span])
            for l in range(L)
        )  # fmt: skip
        x_inputs = (s.B[0][span], rho_x[span], s.tokens[span]) if embedding else (None, None, None)
        (G, Gx, acc), emb_part = jax.lax.scan(
            step_fn(stop), (G, Gx, acc), (jnp.arange(start, stop), per_layer, x_inputs)
        )
        emb.append(emb_part)
        start = stop
    emb = jnp.concatenate(emb) if embedding else None
    return [tuple(a) for a in acc], emb


# ## One sample's diagonal


def _same_unit(M, q, hidden):
    """`M[(c, a), (d, a)]` of `(T, n, n)` matrices as `(T, H, q, q)`."""
    steps = M.shape[0]
    blocks = M.reshape(steps, q, hidden, q, hidden)
    return jnp.diagonal(blocks, axis1=2, axis2=4).transpose(0, 3, 1, 2)


def _per_sample(chain: RecurrentChain, quantity: str, model, loss, sample, embedding: bool):
    """One sample's diagonal, unscaled: per layer `(ih, hh, slots)` sums, the head's
    `(weight, bias)`, and the embedding's per-step values with the tokens."""
    kind = chain.kind
    hessian = quantity == "hessian"
    s = _setup(chain, hessian, model, loss, sample)
    columns, pulled = _backward_sweep(kind, s, hessian)
    layers, emb = _forward_sweep(kind, s, columns, pulled, hessian, embedding and chain.tokens)
    hidden = s.O.shape[1]
    q = STATE_PER_UNIT[kind]
    ih, hh = jnp.array(IH_SLOTS[kind]), jnp.array(HH_SLOTS[kind])
    out_layers = []
    for l, (ih_acc, hh_acc, slot_acc) in enumerate(layers):
        # The diagonal s = t: D^T M D over the same unit, and the node's own Hessian.
        M_aa = _same_unit(columns[l][:, 0], q, hidden)  # (T, H, q, q)
        K_tt = jnp.einsum("tacm,tacd,tadm->mat", s.D[l], M_aa, s.D[l])
        K_tt = K_tt + jnp.einsum("tamm->mat", s.R[l])
        ih_acc = ih_acc + jnp.einsum("gat,tb->gab", K_tt[ih], s.v[l] ** 2)
        hh_acc = hh_acc + jnp.einsum("gat,tb->gab", K_tt[hh], s.hp[l] ** 2)
        slot_acc = slot_acc + jnp.sum(K_tt, axis=-1)
        out_layers.append((ih_acc, hh_acc, slot_acc))
    col_sq = jnp.einsum("tk,tkc->tc", s.weights, s.cols**2)  # (T, C)
    head = (jnp.einsum("tc,tj->cj", col_sq, s.h_top**2), jnp.sum(col_sq, axis=0))
    result = {"layers": out_layers, "head": head}
    if emb is not None:
        U = s.B[0]  # (T, n, in)
        M0 = columns[0][:, 0]
        x_tt = jnp.einsum("tkj,tkd,tdj->tj", U, M0, U)
        x_tt = x_tt + jnp.einsum("amj,tamp,apj->tj", s.A[0], s.R[0], s.A[0])
        result["embedding"] = (emb + x_tt, s.tokens)
    return result


# ## Curvature per time step


SITES = ("state", "preactivation")


def time_step_curvature(chain: RecurrentChain, quantity: str, site: str, model, loss, sample):
    """One sample's curvature per time step, unscaled, `(T, size)`: the diagonal of the
    Hessian (or GGN) of its loss with respect to a perturbation added to every layer's
    state after each step (`site="state"`: `diag M^l_t`, the backward sweep's own
    blocks), or to every gate's pre-activation at each step (`"preactivation"`:
    `D_t^T M^l_t D_t + R_t` on the input slots). Layers are concatenated, first layer
    first; a layer's state is `(h,)` or, for the LSTM, `(h, c)`."""
    kind = chain.kind
    hessian = quantity == "hessian"
    s = _setup(chain, hessian, model, loss, sample)
    columns, _ = _backward_sweep(kind, s, hessian)
    hidden = s.O.shape[1]
    q = STATE_PER_UNIT[kind]
    parts = []
    for layer in range(len(s.D)):
        M = columns[layer][:, 0]  # (T, n, n)
        if site == "state":
            parts.append(jnp.diagonal(M, axis1=1, axis2=2))
            continue
        ih = jnp.array(IH_SLOTS[kind])
        M_aa = _same_unit(M, q, hidden)  # (T, H, q, q)
        D = s.D[layer][..., ih]  # (T, H, q, G)
        K_tt = jnp.einsum("tacg,tacd,tadg->tga", D, M_aa, D)
        K_tt = K_tt + jnp.einsum("tagg->tga", s.R[layer][:, :, ih][:, :, :, ih])
        parts.append(K_tt.reshape(K_tt.shape[0], -1))
    return jnp.concatenate(parts, axis=1)


# ## The kernel


def _stacked(x):  # (G, H, ...) -> (G H, ...)
    return x.reshape(-1, *x.shape[2:])


def _replace(module, values: dict):
    names = list(values)
    return eqx.tree_at(
        lambda mod: [getattr(mod, k) for k in names], module, [values[k] for k in names]
    )


def _embedding_trained(chain: RecurrentChain, params) -> bool:
    return (
        chain.tokens
        and chain.embedding(params) is not None
        and (chain.embedding(params).weight is not None)
    )


class RecurrentKernel(AbstractSampleKernel):
    """Exact `diag(H)` (or, with `quantity="ggn"`, the GGN's diagonal) of a curvzoo loss
    for a zoo RNN (see the module docstring)."""

    chain: RecurrentChain = eqx.field(static=True)
    quantity: str = eqx.field(static=True, default="hessian")
    label: ClassVar[str] = "recurrent kernel"

    def pieces(self, params, static, loss, sample):
        model = eqx.combine(params, static)
        embedding = _embedding_trained(self.chain, params)
        return _per_sample(self.chain, self.quantity, model, loss, sample, embedding)

    def contract(self, params, static, pieces, samples, mask):
        del samples
        model = eqx.combine(params, static)
        chain = self.chain
        kind = chain.kind
        ih = jnp.array(IH_SLOTS[kind])
        weigh = lambda leaf: jnp.tensordot(mask.astype(leaf.dtype), leaf, axes=1)  # noqa: E731
        layers = []
        for layer, sums in enumerate(pieces["layers"]):
            ih_acc, hh_acc, slot_acc = (weigh(leaf) for leaf in sums)
            cell = chain.cell(model, layer)
            diag = {"weight_ih": _stacked(ih_acc), "weight_hh": _stacked(hh_acc)}
            if kind == "elman" or cell.use_bias:
                diag["bias"] = _stacked(slot_acc[ih])
            if kind == "gru" and cell.use_bias:
                diag["bias_n"] = slot_acc[5]
            layers.append(diag)
        weight, bias = (weigh(leaf) for leaf in pieces["head"])
        totals = {"layers": layers, "head": {"weight": weight, "bias": bias}}
        if "embedding" in pieces:
            values, tokens = pieces["embedding"]
            vocab = chain.embedding(model).weight.shape[0]
            values = values * mask[:, None, None].astype(values.dtype)
            ids = jnp.clip(tokens, 0, vocab - 1).reshape(-1)
            totals["embedding"] = jax.ops.segment_sum(
                values.reshape(-1, values.shape[-1]), ids, vocab
            )
        return totals

    def assemble(self, params, static, totals):
        model = eqx.combine(params, static)
        chain = self.chain
        full = eqx.tree_at(chain.head, model, _replace(chain.head(model), totals["head"]))
        for layer, diag in enumerate(totals["layers"]):
            where = lambda mod, layer=layer: chain.cell(mod, layer)  # noqa: E731
            full = eqx.tree_at(where, full, _replace(where(model), diag))
        if "embedding" in totals:
            full = eqx.tree_at(lambda mod: chain.embedding(mod).weight, full, totals["embedding"])
        return eqx.filter(full, trained_mask(params))
