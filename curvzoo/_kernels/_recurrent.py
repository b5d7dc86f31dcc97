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
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp

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
    """One unit's new state `(q,)` from its slots `(m,)`; no parameters."""
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
    """The state's dtype: what the cells' arithmetic promotes weights and inputs to."""
    return jnp.result_type(*[cell.weight_hh for cell in cells], xs)


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


# ## One sample


def _readout_factors(chain, loss, head, prediction, y, length, steps):
    """The readout's Hessian as per-step factors: `(cols (T, K, C), weights (T, K))`,
    the weights zero at the steps that reach no loss term."""
    dtype = prediction.dtype
    if chain.readout == "all":
        cols, weights = loss.output_hessian_step_factor(prediction, y)
        if length is not None:
            weights = weights * (jnp.arange(steps) < length).astype(weights.dtype)[:, None]
        return cols, weights
    cols, weights = loss.output_hessian_factor(prediction, y)
    cols, weights = cols[None], weights[None]
    last = steps - 1 if length is None else jnp.clip(length - 1, 0, steps - 1)
    at = (jnp.arange(steps) == last).astype(dtype)
    return jnp.broadcast_to(cols, (steps, *cols.shape[1:])), at[:, None] * weights


def _per_sample(chain: RecurrentChain, quantity: str, model, loss, sample):
    """Everything one sample contributes: per layer the same-slot blocks `K`
    `(m, H, T, T)` and the mixed term `(m, H, H)`; the coefficients; the readout's
    factors; and, with tokens, the embedding's per-step values."""
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
    tokens = xs
    if chain.tokens:
        xs = jnp.take(chain.embedding(model).weight, tokens, axis=0, mode="clip")
    dtype = _state_dtype(cells, xs)
    hessian = quantity == "hessian"

    def predict(states):
        h = states[:, L - 1, :hidden]
        if chain.readout == "all":
            return jax.vmap(head)(h)
        if length is None:
            return head(h[-1])
        return head(jax.lax.dynamic_index_in_dim(h, jnp.clip(length - 1, 0, steps - 1), 0, False))

    def loss_of_perturbation(eps):
        states, _ = _run_stack(kind, cells, xs, eps)
        return loss.sample_loss(predict(states), y, length if chain.readout == "all" else None)

    states, xis = _run_stack(kind, cells, xs)
    prediction = predict(states)
    if hessian:
        adjoints = jax.grad(loss_of_perturbation)(jnp.zeros((steps, L, n), dtype))
    else:
        adjoints = jnp.zeros((steps, L, n), dtype)
    unit_adjoints = adjoints.reshape(steps, L, q, hidden).transpose(0, 1, 3, 2)  # (T,L,H,q)

    def local(xi, lam):
        update = lambda v: _unit_update(kind, v)  # noqa: E731
        jac = jax.jacfwd(update)(xi)  # (q, m)
        hess = jax.hessian(lambda v: jnp.dot(lam, update(v)))(xi)  # (m, m)
        return jac, hess

    D, R = jax.vmap(jax.vmap(jax.vmap(local)))(xis, unit_adjoints)  # (T,L,H,q,m), (T,L,H,m,m)
    if not hessian:
        R = jnp.zeros_like(R)
    h_states = states[:, :, :hidden]  # (T, L, H)
    layer_inputs = [xs] + [h_states[:, layer - 1] for layer in range(1, L)]
    maps = [_maps(kind, cell, inp.shape[1], dtype) for cell, inp in zip(cells, layer_inputs)]
    As = [a for a, _ in maps]
    Cs = [c for _, c in maps]
    # J^l_t = D C (n x n), B^l_t = D A (n x in_l), rows ordered (component, unit).
    J = [jnp.einsum("tacm,amk->tcak", D[:, l], Cs[l]).reshape(steps, n, n) for l in range(L)]
    B = [jnp.einsum("tacm,amk->tcak", D[:, l], As[l]).reshape(steps, n, -1) for l in range(L)]

    cols, weights = _readout_factors(chain, loss, head, prediction, y, length, steps)
    heads = jnp.einsum("tkc,ch->tkh", cols, head.weight)  # V^T col, (T, K, H)
    O_h = jnp.einsum("tk,tkh,tkg->thg", weights, heads, heads)  # (T, H, H)

    # ### Backward sweep over the frontier (blocks: layers), node by node.
    size = L * n

    def embed(block_row, block_col, mat, rows=n, cols_=n):
        full = jnp.zeros((size, size), dtype)
        return full.at[
            block_row * n : block_row * n + rows, block_col * n : block_col * n + cols_
        ].set(mat)

    def node_terms(t_inputs, layer):
        """`P` (as a full matrix) and `Omega` of node `(layer, t)`."""
        Jt, Bt, Rt = t_inputs
        P = jnp.eye(size, dtype=dtype)
        P = P.at[layer * n : (layer + 1) * n, layer * n : (layer + 1) * n].set(Jt)
        # dxi/dF_{k-1}: (H, m, size)
        Cx = jnp.zeros((hidden, m, size), dtype)
        Cx = Cx.at[:, :, layer * n : (layer + 1) * n].set(Cs[layer])
        if layer > 0:
            P = P.at[layer * n : (layer + 1) * n, (layer - 1) * n : (layer - 1) * n + hidden].set(
                Bt
            )
            Cx = Cx.at[:, :, (layer - 1) * n : (layer - 1) * n + hidden].set(As[layer])
        Omega = jnp.einsum("aml,amp,apk->lk", Cx, Rt, Cx)
        return P, Omega

    def backward(Mf, inputs):
        Jt, Bt, Rt, O_prev = inputs  # per layer lists stacked: (L, ...)
        Ms, Qs = [], []
        for layer in reversed(range(L)):
            # Mf is Mf_k for k = (layer, t).
            blk = slice(layer * n, (layer + 1) * n)
            Ms.append(Mf[blk, blk])
            column = Mf[:, blk]  # (size, n)
            Q = column.at[blk].set(Jt[layer].T @ Mf[blk, blk])
            Qs.append(Q.reshape(L, n, n))
            P, Omega = node_terms((Jt[layer], Bt[layer], Rt[layer]), layer)
            Mf = P.T @ Mf @ P + Omega
        top = slice((L - 1) * n, (L - 1) * n + hidden)
        Mf = Mf.at[top, top].add(O_prev)
        return Mf, (jnp.stack(Ms[::-1]), jnp.stack(Qs[::-1]))

    Bs_padded = [
        jnp.zeros((steps, n, hidden), dtype) if l == 0 else B[l] for l in range(L)
    ]  # B^0 acts on the inputs, not on the frontier
    O_prev = jnp.concatenate([jnp.zeros((1, hidden, hidden), dtype), O_h[:-1]])
    Mf_last = jnp.zeros((size, size), dtype)
    top = slice((L - 1) * n, (L - 1) * n + hidden)
    Mf_last = Mf_last.at[top, top].set(O_h[-1])
    _, (M, Q) = jax.lax.scan(
        backward,
        Mf_last,
        (jnp.stack(J, 1), jnp.stack(Bs_padded, 1), R, O_prev),
        reverse=True,
    )
    # M: (T, L, n, n) = M^l_t; Q: (T, L, L, n, n) = Q^l_t[l'] (zero for l' < l).

    # ### Forward sweep: impulse responses of every source, reads before each step.
    e = jnp.einsum("tlac,tlacm->tlam", unit_adjoints, D)  # slot adjoints
    h_prev = jnp.concatenate([jnp.zeros((1, L, hidden), dtype), h_states[:-1]])  # (T, L, H)
    embedding_trained = chain.tokens
    in0 = xs.shape[1]
    U = B[0]  # (T, n, in0): dS^0_t/dx_t
    # rho_x[t][:, j] = sum_a C^0_a^T R^0_t[a] A^0[a, :, j], (T, n, in0)
    rho_x = jnp.einsum("amk,tamp,apj->tkj", Cs[0], R[:, 0], As[0])

    def forward(carry, inputs):
        gamma, gamma_x = carry  # (L_src, T_src, L_blk, n, n), (T_src, L_blk, n, in0)
        t, Jt, Bt, Qt, Rt, Dt, et, Ut, rxt = inputs
        # Reads with the responses at the end of step t - 1 (sources s < t).
        Z = jnp.einsum(
            "lsbkca,lbkda->lsacd",
            gamma.reshape(L, steps, L, n, q, hidden),
            Qt.reshape(L, L, n, q, hidden),
        )
        Y = jnp.stack(
            [
                jnp.einsum("amk,skca->sacm", Cs[l], gamma[l, :, l].reshape(steps, n, q, hidden))
                for l in range(L)
            ]
        )  # (L, T_src, H, q, m)
        G = gamma[jnp.arange(L), :, jnp.arange(L)].reshape(L, steps, n, q, hidden)[:, :, :hidden]
        T1 = jnp.einsum(
            "lsbca,lsacm,lsb->lbam", G, D.transpose(1, 0, 2, 3, 4), h_prev.transpose(1, 0, 2)
        )
        mixed = 2 * jnp.einsum("lam,lbam->lmab", et, T1)
        # X[s, t, j] (s < t): sum_b sum_k gamma_x[s, b][k, j] * (Q^0_t[b] U_t + [b=0] rho)[k, j]
        target_x = jnp.einsum("bkd,dj->bkj", Qt[0], Ut).at[0].add(rxt)
        X = jnp.einsum("sbkj,bkj->sj", gamma_x, target_x)
        # Step t: every block in order, new sources as they appear.
        for l in range(L):
            below = (
                gamma[:, :, l - 1, :hidden] if l > 0 else None
            )  # (L_src, T_src, H, n) of the updated block below
            new = jnp.einsum("kj,lsjc->lskc", Jt[l], gamma[:, :, l])
            if l > 0:
                new = new + jnp.einsum("kh,lshc->lskc", Bt[l], below)
            gamma = gamma.at[:, :, l].set(new)
            gamma = gamma.at[l, t, l].set(jnp.eye(n, dtype=dtype))
            new_x = jnp.einsum("kj,sjc->skc", Jt[l], gamma_x[:, l])
            if l > 0:
                new_x = new_x + jnp.einsum("kh,shc->skc", Bt[l], gamma_x[:, l - 1, :hidden])
            gamma_x = gamma_x.at[:, l].set(new_x)
            if l == 0:
                gamma_x = gamma_x.at[t, 0].set(Ut)
        return (gamma, gamma_x), (Z, Y, mixed, X)

    gamma0 = jnp.zeros((L, steps, L, n, n), dtype)
    gamma_x0 = jnp.zeros((steps, L, n, in0), dtype)
    _, (Z, Y, mixed, X) = jax.lax.scan(
        forward,
        (gamma0, gamma_x0),
        (jnp.arange(steps), jnp.stack(J, 1), jnp.stack(Bs_padded, 1), Q, R, D, e, U, rho_x),
    )
    # Z: (T_t, L, T_s, H, q, q); Y: (T_t, L, T_s, H, q, m); X: (T_t, T_s, in0)
    # mixed: (T, L, m, H, H) -> sum over t
    mixed = jnp.sum(mixed, axis=0)  # (L, m, H_a, H_b)
    before = (jnp.arange(steps)[None, :] < jnp.arange(steps)[:, None]).astype(dtype)  # [t, s]
    # K[l, alpha, a, s, t] for s < t
    Ds = D.transpose(1, 0, 2, 3, 4)  # (L, T, H, q, m)
    Rs = R.transpose(1, 0, 2, 3, 4)  # (L, T, H, m, m)
    first = jnp.einsum("lsacm,tlsacd,ltadm->lmast", Ds, Z, Ds)
    second = jnp.einsum("lsacm,tlsacb,ltabm->lmast", Ds, Y, Rs)
    upper = (first + second) * before.T[None, None, None]
    diagonal = jnp.einsum(
        "ltacm,ltcada,ltadm->lmat",
        Ds,
        M.transpose(1, 0, 2, 3).reshape(L, steps, q, hidden, q, hidden),
        Ds,
    )
    diagonal = diagonal + jnp.einsum("ltamm->lmat", Rs)
    eye = jnp.eye(steps, dtype=dtype)
    K = upper + jnp.swapaxes(upper, -1, -2) + diagonal[..., None] * eye
    if not hessian:
        mixed = jnp.zeros_like(mixed)

    pieces = {
        "K": K,  # (L, m, H, T, T)
        "mixed": mixed,  # (L, m, H, H)
        "h": h_states,  # (T, L, H)
        "h_prev": h_prev,  # (T, L, H)
        "x": xs,  # (T, in0)
        "cols": cols,
        "weights": weights,
    }
    if embedding_trained:
        Xu = X * before[:, :, None]  # [t, s] for s < t
        X_diag = jnp.einsum("tkj,tkd,tdj->tj", U, M[:, 0], U) + jnp.einsum(
            "amj,tamp,apj->tj", As[0], R[:, 0], As[0]
        )
        same = (tokens[:, None] == tokens[None, :]).astype(dtype)  # [t, s]
        # per_step[s, j] = X[s,s,j] + 2 sum_{t > s, tok_t = tok_s} X[s, t, j]
        per_step = X_diag + 2 * jnp.einsum("ts,tsj->sj", same, Xu)
        pieces["embedding"] = per_step
        pieces["tokens"] = tokens
    return pieces


def _stacked(x):  # (G, H, ...) -> (G H, ...)
    return x.reshape(-1, *x.shape[2:])


def _diagonals(chain: RecurrentChain, model, pieces, mask):
    """The chunk's pieces contracted over its samples (each weighted by `mask`) into
    the diagonals of the unscaled sum over samples: per layer a dict for the cell, one
    for the head, and the embedding's table (or `None`)."""
    kind = chain.kind
    cells = chain.cells(model)
    ih, hh = jnp.array(IH_SLOTS[kind]), jnp.array(HH_SLOTS[kind])
    K = pieces["K"] * mask[:, None, None, None, None, None]  # (N, L, m, H, T, T)
    mixed = pieces["mixed"] * mask[:, None, None, None, None]
    h, h_prev = pieces["h"], pieces["h_prev"]  # (N, T, L, H)
    layer_diags = []
    for layer, cell in enumerate(cells):
        v = pieces["x"] if layer == 0 else h[:, :, layer - 1]
        K_ih, K_hh = K[:, layer, ih], K[:, layer, hh]  # (N, G, H, T, T)
        hp = h_prev[:, :, layer]
        diag = {
            "weight_ih": _stacked(jnp.einsum("ngast,nsb,ntb->gab", K_ih, v, v)),
            "weight_hh": _stacked(
                jnp.einsum("ngast,nsb,ntb->gab", K_hh, hp, hp)
                + jnp.sum(mixed[:, layer, hh], axis=0)
            ),
        }
        if kind == "elman" or cell.use_bias:
            diag["bias"] = _stacked(jnp.einsum("ngast->ga", K_ih))
        if kind == "gru" and cell.use_bias:
            diag["bias_n"] = jnp.einsum("nast->a", K[:, layer, 5])
        layer_diags.append(diag)
    # Head: with per-step factors, diag V[c, j] = sum_t h_{t,j}^2 sum_k w_k col_k[c]^2.
    col_sq = jnp.einsum(
        "ntk,ntkc->ntc", pieces["weights"] * mask[:, None, None], pieces["cols"] ** 2
    )
    h_top = h[:, :, -1]
    head_diag = {
        "weight": jnp.einsum("ntc,ntj->cj", col_sq, h_top**2),
        "bias": jnp.sum(col_sq, axis=(0, 1)),
    }
    table = None
    if "embedding" in pieces:
        vocab = chain.embedding(model).weight.shape[0]
        values = pieces["embedding"] * mask[:, None, None]  # (N, T, in)
        tokens = jnp.clip(pieces["tokens"], 0, vocab - 1).reshape(-1)
        table = jax.ops.segment_sum(values.reshape(-1, values.shape[-1]), tokens, vocab)
    return layer_diags, head_diag, table


def _replace(module, values: dict):
    names = list(values)
    return eqx.tree_at(
        lambda mod: [getattr(mod, k) for k in names], module, [values[k] for k in names]
    )


class RecurrentKernel(AbstractSampleKernel):
    """Exact `diag(H)` (or the GGN's diagonal, `quantity="ggn"`) of a curvzoo loss for
    a zoo RNN (see the module docstring)."""

    chain: RecurrentChain = eqx.field(static=True)
    quantity: str = eqx.field(static=True, default="hessian")
    label: ClassVar[str] = "recurrent kernel"

    def pieces(self, params, static, loss, sample):
        return _per_sample(self.chain, self.quantity, eqx.combine(params, static), loss, sample)

    def contract(self, params, static, pieces, samples, mask):
        del samples
        return _diagonals(self.chain, eqx.combine(params, static), pieces, mask)

    def assemble(self, params, static, totals):
        model = eqx.combine(params, static)
        chain = self.chain
        layer_diags, head_diag, table = totals
        full = eqx.tree_at(chain.head, model, _replace(chain.head(model), head_diag))
        for layer, diag in enumerate(layer_diags):
            where = lambda mod, layer=layer: chain.cell(mod, layer)  # noqa: E731
            full = eqx.tree_at(where, full, _replace(where(model), diag))
        if table is not None:
            full = eqx.tree_at(
                lambda mod: chain.embedding(mod).weight, full, table.astype(table.dtype)
            )
        return eqx.filter(full, trained_mask(params))
