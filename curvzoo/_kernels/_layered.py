"""The structured exact kernel for layered models: Hessian backpropagation.

For one sample with per-sample loss `l(f)`, a chain `u_{i+1} = op_i(u_i)` (see
`_layers.py`) and a parameter direction `e_p`, the Hessian's diagonal entry is

    e_p^T H e_p = (J_f e_p)^T H_out (J_f e_p) + sum_k sum_j r_k[j] (J_{z_k} e_p)[j]^2,

summed over activation sites `k` with inputs `z_k`, where
`r_k = sigma''(z_k) * dl/da_k` and `H_out` is the Hessian of `l` in the prediction.
(The products weight x input are bilinear, but no parameter sits on both sides of one
product in a feed-forward chain, so they add nothing to the diagonal.)

The Hessian with respect to any intermediate `u_i`, counting only the sites above it,
is kept as a *state*: a sum of weighted outer products of columns plus a diagonal,

    H_i = sum_cols w_c c c^T + sum_lazy w_k (M_k * s)(M_k * s)^T + diag(rdiag).

At the output it is `H_out = sum_c w_c c c^T` (a loss's factor: `C` columns for `C`
outputs, `C - 1` for cross-entropy). Going down:

- an activation scales every column by `sigma'(z)`, and its residual joins the
  diagonal: `rdiag <- sigma'(z)^2 rdiag + sigma''(z) * dl/da`;
- a dense layer maps columns by `W^T`; the diagonal turns into *lazy* columns, the rows of
  `W` weighted by `rdiag` (shared by all samples, so `diag = s^2 * ((W * W)^T rdiag)` costs
  one matrix-vector product). Lazy columns are made explicit only when they cross the next
  non-elementwise op: residuals two or more layers up are the only full Jacobian products;
- pooling and reshapes map columns by their transpose; max-pooling with disjoint windows
  and reshapes keep a diagonal diagonal, anything else (a convolution, average pooling)
  would turn it into as many columns as the layer has outputs, so the state below is
  marked unavailable.

Each layer with parameters then takes the cheaper exact route:

- dense, reverse: output entry `i` sees weight row `i` only, so
  `diag W[i, j] = sum_n a[n, j]^2 diag(H_z)[n, i]` (and `diag b = sum_n diag(H_z)`): one
  matrix product over the batch with the squared inputs;
- convolution, reverse (state available at its output): each column `c` gives
  `(J^T c)_p`, a weight gradient, so `diag = sum_c w_c (J^T c)^2`, plus the diagonal part
  `sum_j rdiag[j] (J e_p)[j]^2`, which is the weight gradient of the layer applied to the
  squared input with cotangent `rdiag`;
- forward (state unavailable at its output): one tangent per parameter of the layer is
  pushed up through the ops until a boundary whose state is available, collecting
  `r_k * tangent^2` at the activations it passes, then contracted with that state.
"""

import dataclasses
from typing import ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, PyTree

from ._factors import output_factor
from ._ops import Elementwise, Linear, ParamLayer
from ._precision import upcast
from ._samples import AbstractSampleKernel, trained_mask


def _along_first(w: Array, like: Array) -> Array:
    """`w` (`(K,)`) shaped to broadcast along the leading axis of `like`."""
    return w.reshape(w.shape + (1,) * (like.ndim - 1))


@dataclasses.dataclass
class _State:
    """The Hessian of one sample's loss w.r.t. one intermediate (sites above it)."""

    cols: list  # [(columns (K, *shape), weights (K,))]
    lazy: list  # [(rows M (K, *shape), per-sample scale s (*shape), weights (K,))]
    rdiag: Array | None

    def explicit_columns(self) -> list:
        return self.cols + [(rows * scale, w) for rows, scale, w in self.lazy]

    def diagonal(self) -> Array:
        total = 0.0
        for cols, w in self.cols:
            # a weighted sum over the columns' axis (not `tensordot`, whose matrix
            # product over the batch first copies the squares into a transposed layout)
            total = total + jnp.sum(_along_first(w, cols) * cols**2, axis=0)
        for rows, scale, w in self.lazy:
            # `rows` is shared by all samples: one matrix product over the batch
            total = total + scale**2 * jnp.tensordot(w, rows**2, axes=1)
        if self.rdiag is not None:
            total = total + self.rdiag
        return total

    def quadratic(self, tangents: Array) -> Array:
        """`t^T H t` for each of the tangents `(P, *shape)`, as `(P,)`."""
        axes = tuple(range(1, tangents.ndim))
        total = jnp.zeros(tangents.shape[0], tangents.dtype)
        for cols, w in self.cols:
            proj = jnp.tensordot(tangents, cols, axes=(axes, axes))
            total = total + proj**2 @ w
        for rows, scale, w in self.lazy:
            proj = jnp.tensordot(tangents * scale, rows, axes=(axes, axes))
            total = total + proj**2 @ w
        if self.rdiag is not None:
            total = total + jnp.sum(tangents**2 * self.rdiag, axis=axes)
        return total


class _DensePiece(NamedTuple):
    """A dense layer's per-sample piece: its squared input and `diag(H_z)`, contracted
    over the batch later in one matrix product."""

    squared_inputs: Array
    hz: Array


def _linear_pullback(op, model, u):
    """The transpose of `op`'s Jacobian in its input at `u` (params held fixed)."""
    _, vjp = jax.vjp(lambda v: op.apply(model, v), u)
    return lambda cotangent: vjp(cotangent)[0]


def _pull(op, model, state: _State, u: Array, g_out: Array | None) -> _State | None:
    """The state below `op` from the state above it; `None` if not representable.
    `g_out` is the loss's gradient at `op`'s output, or `None` to leave out residuals."""
    if isinstance(op, Elementwise):
        d1, d2 = op.derivatives(u)
        rdiag = None if state.rdiag is None else state.rdiag * d1**2
        if op.has_residual and g_out is not None:
            residual = d2 * g_out
            rdiag = residual if rdiag is None else rdiag + residual
        return _State(
            [(c * d1, w) for c, w in state.cols],
            [(rows, scale * d1, w) for rows, scale, w in state.lazy],
            rdiag,
        )
    pull = _linear_pullback(op, model, u)
    cols = [(jax.vmap(pull)(c), w) for c, w in state.explicit_columns()]
    if state.rdiag is None:
        return _State(cols, [], None)
    if isinstance(op, ParamLayer) and op.dense and u.ndim == 1:
        weight = op.layer(model).weight
        # one weight per row of `W`: `reshape` covers a scalar output (`"scalar"`, a
        # `(1, in)` weight and a `()` output)
        rows = state.rdiag.reshape(weight.shape[0])
        return _State(cols, [(weight, jnp.ones_like(u), rows)], None)
    if isinstance(op, Linear) and op.keeps_diagonal:
        return _State(cols, [], pull(state.rdiag))
    return None


def _split_layer(op: ParamLayer, model):
    return eqx.partition(op.layer(model), eqx.is_inexact_array)


def _reverse_contribution(op, model, state: _State, u: Array) -> PyTree:
    """Diagonal for a non-dense layer from the state at its output."""
    params, static = _split_layer(op, model)
    _, vjp = jax.vjp(lambda p: eqx.combine(p, static)(u), params)
    total = jax.tree.map(jnp.zeros_like, params)
    for cols, w in state.explicit_columns():
        grads = jax.vmap(lambda c: vjp(c)[0])(cols)
        total = jax.tree.map(lambda t, g: t + jnp.tensordot(w, g**2, axes=1), total, grads)
    if state.rdiag is not None:
        _, vjp_sq = jax.vjp(lambda p: eqx.combine(p, static)(u**2), params)
        total = jax.tree.map(jnp.add, total, vjp_sq(state.rdiag)[0])
    return total


def _forward_contribution(index, ops, model, states, us, gs) -> PyTree:
    """Diagonal for layer `index` by one tangent per parameter, pushed up to the first
    boundary whose state is available."""
    op = ops[index]
    params, static = _split_layer(op, model)
    flat, unravel = ravel_pytree(params)

    def tangent(i):
        basis = unravel(jax.nn.one_hot(i, flat.size, dtype=flat.dtype))
        return jax.jvp(lambda p: eqx.combine(p, static)(us[index]), (params,), (basis,))[1]

    tangents = jax.vmap(tangent)(jnp.arange(flat.size))
    total = jnp.zeros(flat.size, flat.dtype)
    j = index + 1
    while states[j] is None:
        above = ops[j]
        if isinstance(above, Elementwise):
            d1, d2 = above.derivatives(us[j])
            if above.has_residual and gs[j + 1] is not None:
                axes = tuple(range(1, tangents.ndim))
                total = total + jnp.sum(tangents**2 * (d2 * gs[j + 1]), axis=axes)
            tangents = tangents * d1
        else:
            _, push = jax.linearize(lambda v: above.apply(model, v), us[j])
            tangents = jax.vmap(push)(tangents)
        j += 1
    return unravel(total + states[j].quadratic(tangents))


def _per_sample(model, ops, trainable, loss, quantity, x, y):
    """One sample's pieces: for a dense layer `(input**2, diag(H_z))`, otherwise its
    diagonal as a layer-shaped PyTree (of the per-sample loss, unscaled)."""
    us = [x]
    for op in ops:
        us.append(op.apply(model, us[-1]))
    prediction = us[-1]
    lowest = min(trainable)

    # The loss's gradients at every op's output, for the residuals (Hessian only).
    gs = [None] * len(us)
    if quantity == "hessian":
        gs[-1] = jax.grad(loss.per_sample)(prediction, y)
        for i in reversed(range(lowest + 1, len(ops))):
            gs[i] = _linear_pullback(ops[i], model, us[i])(gs[i + 1])

    cols, weights = output_factor(quantity, loss, prediction, y)
    states = [None] * len(us)
    states[-1] = _State([(cols, weights)], [], None)
    for i in reversed(range(lowest + 1, len(ops))):
        if states[i + 1] is None:
            break
        states[i] = _pull(ops[i], model, states[i + 1], us[i], gs[i + 1])

    pieces = []
    for index in trainable:
        op, state = ops[index], states[index + 1]
        if state is not None and op.dense and us[index].ndim == 1:
            pieces.append(_DensePiece(us[index] ** 2, state.diagonal()))
        elif state is not None:
            pieces.append(_reverse_contribution(op, model, state, us[index]))
        else:
            pieces.append(_forward_contribution(index, ops, model, states, us, gs))
    return pieces


class LayeredKernel(AbstractSampleKernel):
    """Exact `diag(H)` of a curvzoo loss for a layered model, by Hessian
    backpropagation (see the module docstring); with `quantity="ggn"` or
    `"gradients"` the same without residuals, from that quantity's output columns
    (`_factors.py`).

    Cost, per sample: a forward and a backward pass, the loss Hessian's `K` columns
    (`C - 1` for cross-entropy over `C` classes, `C` for MSE and BCE) pulled down
    through every layer (`K` extra backward passes, as matrix products),
    one matrix-vector product with `W * W` per activation for residuals one layer up,
    a full Jacobian product (`d^3` for width `d`) per residual two or more dense layers
    up, and for a convolution either `C` weight gradients (reverse) or one tangent per
    parameter pushed through the layers above until the next available state
    (forward). The batch contraction of a dense layer is one matrix product over the
    chunk. Memory: one chunk's states and tangents; nothing grows with the batch.
    """

    ops: tuple = eqx.field(static=True)
    trainable: tuple = eqx.field(static=True)  # indices of the ops with trained arrays
    quantity: str = eqx.field(static=True)
    label: ClassVar[str] = "structured kernel"

    def pieces(self, params, static, loss, sample):
        x, y = sample[0], sample[1]
        model = eqx.combine(params, static)
        return _per_sample(model, self.ops, self.trainable, loss, self.quantity, x, y)

    def contract(self, params, static, pieces, samples, mask):
        model = eqx.combine(params, static)
        sums = []
        for index, piece in zip(self.trainable, pieces):
            if isinstance(piece, _DensePiece):  # the chunk in one matrix product
                params, static = _split_layer(self.ops[index], model)
                # in the pieces' (accumulation) precision: the product is linear in the
                # layer's parameters, so their values do not enter, only their dtype
                params = upcast(params, piece.hz.dtype)
                layer_of = lambda p, static=static: eqx.combine(p, static)  # noqa: E731
                _, vjp = jax.vjp(lambda p: jax.vmap(layer_of(p))(piece.squared_inputs), params)
                sums.append(vjp(piece.hz * _along_first(mask, piece.hz))[0])
            else:
                sums.append(jax.tree.map(lambda leaf: jnp.tensordot(mask, leaf, axes=1), piece))
        return sums

    def assemble(self, params, static, totals):
        model = eqx.combine(params, static)
        # With per-sample totals the leaves carry a leading sample axis; tree_at does
        # not mind.
        layers = [_split_layer(self.ops[i], model)[1] for i in self.trainable]
        diagonals = [eqx.combine(total, static) for total, static in zip(totals, layers)]
        full = eqx.tree_at(
            lambda m: [self.ops[i].layer(m) for i in self.trainable], model, diagonals
        )
        return eqx.filter(full, trained_mask(params))


def trainable_ops(ops: tuple, mask_tree) -> tuple:
    """The indices of the ops whose layer holds a trained array (`mask_tree`: bools
    shaped like the model)."""
    return tuple(
        i
        for i, op in enumerate(ops)
        if isinstance(op, ParamLayer) and any(jax.tree.leaves(op.layer(mask_tree)))
    )
