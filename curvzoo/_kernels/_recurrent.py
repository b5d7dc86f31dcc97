r"""The structured exact kernel for recurrent networks (Elman, GRU, LSTM).

## The model, written as sites and unit updates

One sequence `x_0 .. x_{T-1}`, a state `S_t` (the `H` hidden units; for the LSTM the `2H`
values `(h, c)`, so `q = 2` values per unit), `S_{-1} = 0`. Each step has *node inputs*
`xi_t = (xi_{t,a,alpha})`, for every unit `a` a vector of `m` slots, affine in the
parameters and in the previous state:

- Elman (`m = 1`): `xi = W_ih x_t + W_hh h_{t-1} + b`;
- GRU (`m = 7`): three input gates `W_ih x_t + b`, three recurrent gates `W_hh h_{t-1}`
  (plus `b_n` on the third), and `h_{t-1}[a]` itself;
- LSTM (`m = 5`): four gates `W_ih x_t + W_hh h_{t-1} + b`, and `c_{t-1}[a]`.

The *unit update* `S_t[a] = U(xi_{t,a})` is the same parameter-free function for every
unit (`tanh`; the GRU's gates and interpolation; the LSTM's gates and cell). Every weight
entry `(slot alpha, unit a, column b)` feeds one slot of one unit at every step, with
coefficient `v_{t,b}`: `x_{t,b}`, `h_{t-1,b}` or `1`.

## The diagonal

Let `Lambda(delta)` be the loss with perturbations `delta_{t,a,alpha}` added to the slots
and `K_{a,alpha}[s,t] = d^2 Lambda / d delta_{s,a,alpha} d delta_{t,a,alpha}` its
same-slot blocks. For an entry with coefficient `v` (ε is its change),
`delta_t = eps * v_t(eps)`, so

    diag = sum_{s,t} v_s v_t K[s,t] + sum_t e_t * d^2 delta_t / d eps^2,

with `e_t = dLambda/d delta_t` (backpropagation through time). The second term is zero for
inputs and biases; for `W_hh[(alpha, a), b]`, whose coefficient `h_{t-1,b}` depends on the
entry itself, `d^2 delta_t / d eps^2 = 2 dv_t/d eps` and it is
`2 sum_{s<t} e_t (dh_{t-1,b}/d delta_s) h_{s-1,b}`.

`K` follows from the one formula: the loss's Hessian is the sum, over the nonlinear
nodes (the unit updates and the loss), of the node's adjoint-weighted Hessian between
the Jacobians of its inputs. With `D_t[a] = dU/dxi` (`q x m`),
`R_t[a] = sum_c lambda_{t,a,c} d^2 U_c / dxi^2` (`m x m`, `lambda` the state adjoints),
`C = dxi_t/dS_{t-1}` (a constant linear map) and `J_t = D_t C = dS_t/dS_{t-1}`:

- a slot perturbation at `(s, a)` moves the state as `D_s[a]` moves `S_s[a]`, so everything
  downstream of step `s` sees it through unit `a`'s state, shared by all slots and columns:
  the *impulse responses* `Gamma_{t,s} = dS_t/dS_s = J_t .. J_{s+1}`;
- node `u` contributes `Omega_u = C^T blockdiag(R_u) C` in terms of `S_{u-1}`, and the
  readout `O_v = V^T H_out V` in terms of `S_v`; the Hessian with respect to a perturbation
  of `S_t`, counting what lies after it, is
  `M_t = Omega_{t+1} + O_t + J_{t+1}^T M_{t+1} J_{t+1}` (one backward sweep);
- for `s <= t`, the same-unit block of the state Hessian is
  `Hs[s,t,a] = Gamma_{t,s}[:, a]^T M_t[:, a]` (`q x q`);
- `K_{a,alpha}[s,t] = D_s[a]_alpha^T Hs[s,t,a] D_t[a]_alpha + L[s,t] + L[t,s]
  + [s=t] R_s[a]_{alpha alpha}`, where
  `L[s,t] = [s<t] D_s[a]_alpha^T Gamma_{t-1,s}[:, a]^T C_a^T R_t[a]_{:,alpha}`
  pairs the perturbation at `s` with the slot at `t` inside node `(t, a)`.

## Cost and memory, per sample

`T` steps, `H` units, state size `n = q H`: the backward sweep for `M` costs `2 T n^3`, the
impulse responses `T^2 n^3` (computed for all sources at every step, so half of it is on
zeros), the same-unit blocks `T^2 q^2 n H`, `K` `T^2 H m q^2`, the mixed terms `T^2 H^2 q m`.
Against `P ~ m H (in + H)` Hessian-vector products of `~T m H (in + H)` each for the generic
kernel, that is `~T^2 H^3` against `~T H^4`. Memory per sample: `T n^2` for the impulse
responses and for `M`, `T^2 H (q^2 + q m + m)` for the blocks, `K` and mixed terms;
samples are processed in chunks that fit `memory_budget`.
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
    """A recurrent model: `cell` run from a zero state, then a dense `head` on the last
    state (`readout="last"`) or on every state (`"all"`)."""

    kind: str  # "elman", "gru" or "lstm"
    cell: Callable[[Any], Any]
    head: Callable[[Any], Any]
    readout: str

    def parts(self, model) -> tuple:
        """The modules whose arrays the kernel differentiates (every trained array of
        the model must be in one)."""
        return (self.cell(model), self.head(model))


_SLOTS = {"elman": 1, "gru": 7, "lstm": 5}
_STATE_PER_UNIT = {"elman": 1, "gru": 1, "lstm": 2}
# Which slot each gate's row of W_ih / W_hh / bias feeds.
_IH_SLOTS = {"elman": (0,), "gru": (0, 1, 2), "lstm": (0, 1, 2, 3)}
_HH_SLOTS = {"elman": (0,), "gru": (3, 4, 5), "lstm": (0, 1, 2, 3)}


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


def _state_dtype(cell, xs):
    """The state's dtype: what the cell's arithmetic promotes its weights and inputs to."""
    return jnp.result_type(cell.weight_hh, xs)


def _run(kind, cell, xs, perturbation=None):
    """States `(T, n)` and node inputs `(T, H, m)`, optionally with `perturbation`
    `(T, n)` added to each new state."""
    hidden = cell.hidden_size
    n = _STATE_PER_UNIT[kind] * hidden
    dtype = _state_dtype(cell, xs)
    state0 = jnp.zeros(n, dtype)

    def step(state, inputs):
        x, eps = inputs
        xi = _node_inputs(kind, cell, x, state)
        new = _flat_state(jax.vmap(lambda v: _unit_update(kind, v))(xi)) + eps
        return new, (new, xi)

    if perturbation is None:
        perturbation = jnp.zeros((xs.shape[0], n), dtype)
    _, (states, xis) = jax.lax.scan(step, state0, (xs, perturbation))
    return states, xis


def _readout(head, readout, states, hidden):
    h = states[:, :hidden]
    return jax.vmap(head)(h) if readout == "all" else head(h[-1])


# ## One sample


def _per_sample(chain: RecurrentChain, model, loss, xs, y):
    kind = chain.kind
    cell, head = chain.cell(model), chain.head(model)
    hidden = cell.hidden_size
    q, m = _STATE_PER_UNIT[kind], _SLOTS[kind]
    n = q * hidden
    steps = xs.shape[0]
    dtype = _state_dtype(cell, xs)

    def loss_of_perturbation(eps):
        states, _ = _run(kind, cell, xs, eps)
        return loss.per_sample(_readout(head, chain.readout, states, hidden), y)

    zero = jnp.zeros((steps, n), dtype)
    states, xis = _run(kind, cell, xs)
    prediction = _readout(head, chain.readout, states, hidden)
    adjoints = jax.grad(loss_of_perturbation)(zero)  # lambda_t = dLambda/dS_t, (T, n)
    unit_adjoints = adjoints.reshape(steps, q, hidden).transpose(0, 2, 1)  # (T, H, q)

    def local(xi, lam):
        update = lambda v: _unit_update(kind, v)  # noqa: E731
        jac = jax.jacfwd(update)(xi)  # (q, m)
        hess = jax.hessian(lambda v: jnp.dot(lam, update(v)))(xi)  # (m, m)
        return jac, hess

    D, R = jax.vmap(jax.vmap(local))(xis, unit_adjoints)  # (T, H, q, m), (T, H, m, m)
    # C = dxi/dS_{t-1}, a constant linear map, as (H, m, n).
    C = jax.jacfwd(lambda s: _node_inputs(kind, cell, jnp.zeros_like(xs[0]), s))(
        jnp.zeros(n, dtype)
    )
    # J_t = dS_t/dS_{t-1}: row (c, a) is sum_alpha D_t[a, c, alpha] C[a, alpha, :].
    J = jnp.einsum("tacm,amk->tcak", D, C).reshape(steps, n, n)
    # Omega_u = C^T blockdiag(R_u) C, in terms of S_{u-1}.
    Omega = jnp.einsum("aml,tamp,apk->tlk", C, R, C)

    # Readout Hessians O_v (in terms of S_v), from the loss's per-step factor.
    per_step = prediction.reshape(-1, head.out_features)
    cols, weights = loss.output_hessian_step_factor(
        per_step, y.reshape(per_step.shape[0], *y.shape[prediction.ndim - 1 :])
    )
    heads = jnp.einsum("tkc,ch->tkh", cols, head.weight)  # V^T col, (T_out, K, H)
    O_h = jnp.einsum("tk,tkh,tkg->thg", weights, heads, heads)  # (T_out, H, H)
    O = jnp.zeros((steps, n, n), dtype)
    if chain.readout == "all":
        O = O.at[:, :hidden, :hidden].set(O_h)
    else:
        O = O.at[-1, :hidden, :hidden].set(O_h[0])
    Omega_next = jnp.concatenate([Omega[1:], jnp.zeros((1, n, n), dtype)])
    J_next = jnp.concatenate([J[1:], jnp.zeros((1, n, n), dtype)])

    # Backward sweep: M_t = Omega_{t+1} + O_t + J_{t+1}^T M_{t+1} J_{t+1}.
    def backward(M_after, inputs):
        omega, out, jac = inputs
        M = omega + out + jac.T @ M_after @ jac
        return M, M

    _, M = jax.lax.scan(backward, jnp.zeros((n, n), dtype), (Omega_next, O, J_next), reverse=True)

    # Site adjoints e_{t,a,alpha} = sum_c lambda_{t,a,c} D_t[a, c, alpha].
    e = jnp.einsum("tac,tacm->tam", unit_adjoints, D)
    h_prev = jnp.concatenate([jnp.zeros((1, hidden), dtype), states[:-1, :hidden]])
    hh_mask = jnp.zeros(m, dtype).at[jnp.array(_HH_SLOTS[kind])].set(1)
    R_next = jnp.concatenate([R[1:], jnp.zeros((1, hidden, m, m), dtype)])
    e_next = jnp.concatenate([e[1:], jnp.zeros((1, hidden, m), dtype)])

    # Forward sweep over t with the impulse responses Gamma[s] = dS_t/dS_s, (T_s, n, q, H):
    # same-unit state blocks, the node-local cross terms L and the W_hh mixed term.
    def forward(carry, inputs):
        gamma, mixed = carry
        t, jac, M_t, R_t1, e_t1 = inputs
        gamma = jnp.einsum("kl,slca->skca", jac, gamma)
        gamma = gamma.at[t].set(jnp.eye(n, dtype=dtype).reshape(n, q, hidden))
        # Hs[s, t, a, c, d] = sum_k Gamma[s][k, c, a] M_t[k, (d, a)]
        blocks = jnp.einsum("skca,kda->sacd", gamma, M_t.reshape(n, q, hidden))
        # rho_{t+1,a,alpha} = C_a^T R_{t+1}[a][:, alpha], (H, m, n)
        rho = jnp.einsum("apk,apm->amk", C, R_t1)
        cross = jnp.einsum("skca,amk->sacm", gamma, rho)  # (T_s, H, q, m)
        # 2 sum_s e_{t+1,a,alpha} sum_c Gamma[s][(h, b), c, a] D_s[a, c, alpha] h_{s-1,b}
        responses = jnp.einsum("sbca,sacm->sbam", gamma[:, :hidden], D)
        mixed = mixed + 2 * jnp.einsum("am,sbam,sb->mab", e_t1 * hh_mask, responses, h_prev)
        return (gamma, mixed), (blocks, cross)

    gamma0 = jnp.zeros((steps, n, q, hidden), dtype)
    mixed0 = jnp.zeros((m, hidden, hidden), dtype)
    (_, mixed), (blocks, cross) = jax.lax.scan(
        forward, (gamma0, mixed0), (jnp.arange(steps), J, M, R_next, e_next)
    )
    # blocks[t, s] = Hs[s, t] for s <= t (zero above); cross[t, s] pairs s with slot t+1.
    eye = jnp.eye(steps, dtype=dtype)
    upper = jnp.einsum("sacm,tsacd,tadm->mast", D, blocks, D)  # s <= t part
    on_diagonal = jnp.einsum("mass->mas", upper)[..., None] * eye
    K = upper + jnp.swapaxes(upper, -1, -2) - on_diagonal
    local = jnp.einsum("sacm,tsacm->mast", D, cross)  # pairs (s, t+1), s <= t
    local = jnp.pad(local, ((0, 0), (0, 0), (0, 0), (1, 0)))[..., :steps]
    K = K + local + jnp.swapaxes(local, -1, -2)
    K = K + jnp.einsum("tamm->mat", R)[..., None] * eye
    return K, mixed, h_prev, states[:, :hidden], cols, weights


def _diagonals(chain: RecurrentChain, model, pieces, xs):
    """Batch contraction of the per-sample pieces into the cell's and head's diagonals
    (of the unscaled sum over samples)."""
    K, mixed, h_prev, hs, cols, weights = pieces
    kind = chain.kind
    cell = chain.cell(model)
    ih, hh = jnp.array(_IH_SLOTS[kind]), jnp.array(_HH_SLOTS[kind])
    K_ih, K_hh = K[:, ih], K[:, hh]  # (N, G, H, T, T)

    def stacked(x):  # (G, H, ...) -> (G H, ...)
        return x.reshape(-1, *x.shape[2:])

    cell_diag = {
        "weight_ih": stacked(jnp.einsum("ngast,nsb,ntb->gab", K_ih, xs, xs)),
        "weight_hh": stacked(
            jnp.einsum("ngast,nsb,ntb->gab", K_hh, h_prev, h_prev) + jnp.sum(mixed[:, hh], axis=0)
        ),
    }
    if kind == "elman" or cell.use_bias:
        cell_diag["bias"] = stacked(jnp.einsum("ngast->ga", K_ih))
    if kind == "gru" and cell.use_bias:
        cell_diag["bias_n"] = jnp.einsum("nast->a", K[:, 5])
    # Head: with per-step factors, diag V[c, j] = sum_t h_{t,j}^2 sum_k w_k col_k[c]^2.
    col_sq = jnp.einsum("ntk,ntkc->ntc", weights, cols**2)  # (N, T_out, C)
    h_out = hs if chain.readout == "all" else hs[:, -1:]
    head_diag = {
        "weight": jnp.einsum("ntc,ntj->cj", col_sq, h_out**2),
        "bias": jnp.sum(col_sq, axis=(0, 1)),
    }
    return cell_diag, head_diag


def _replace(module, values: dict):
    names = list(values)
    return eqx.tree_at(
        lambda mod: [getattr(mod, k) for k in names], module, [values[k] for k in names]
    )


class RecurrentKernel(AbstractSampleKernel):
    """Exact `diag(H)` of a curvzoo loss for a zoo RNN (see the module docstring)."""

    chain: RecurrentChain = eqx.field(static=True)
    label: ClassVar[str] = "recurrent kernel"

    def pieces(self, params, static, loss, sample):
        x, y = sample[0], sample[1]
        return _per_sample(self.chain, eqx.combine(params, static), loss, x, y)

    def contract(self, params, static, pieces, samples, mask):
        K, mixed, h_prev, hs, cols, weights = pieces
        weighted = (K * mask[:, None, None, None, None], mixed * mask[:, None, None, None],
                    h_prev, hs, cols, weights * mask[:, None, None])  # fmt: skip
        return _diagonals(self.chain, eqx.combine(params, static), weighted, samples[0])

    def assemble(self, params, static, totals):
        model = eqx.combine(params, static)
        chain = self.chain
        cell_diag, head_diag = totals
        full = eqx.tree_at(
            lambda mod: (chain.cell(mod), chain.head(mod)),
            model,
            (_replace(chain.cell(model), cell_diag), _replace(chain.head(model), head_diag)),
        )
        return eqx.filter(full, trained_mask(params))
