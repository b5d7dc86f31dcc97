"""Losses that know their per-sample structure.

A curvzoo loss is called as `loss(model, batch) -> scalar`, like any user loss, but it
also exposes the pieces that fast kernels need: the per-sample loss as a function of
the model's prediction (`per_sample`), and the constant that the reduction multiplies
the sum over samples by (`scale`). For every curvzoo loss

    loss(model, (x, y)) == loss.scale(N, prediction_shape)
                           * sum_n loss.per_sample(model(x[n]), y[n]).

## Sequences of different lengths

A batch may be a triple `(inputs, targets, lengths)`, with `lengths` an integer array
`(N,)`: sequence `n` holds `lengths[n]` steps, in `[1, T]`, and the steps after them are
padding. The model is called as `model(x[n], lengths[n])` (the zoo `RNN` reads its
last-state readout at step `length - 1`). Where one sample's prediction has a step axis
(two or more axes, steps first: per-step targets `(N, T, ...)`), the steps at or past
the length are left out of the loss, and with `reduction="mean"` the loss is the mean
over the valid steps of all sequences (and over each step's elements): the sum of the
valid per-step losses divided by `sum(lengths)` (times the elements of one step),

    loss(model, (x, y, lengths)) == loss.scale(N, prediction_shape, lengths)
        * sum_n loss.sample_loss(model(x[n], lengths[n]), y[n], lengths[n]).

Every valid step weighs the same, whatever the length of its sequence: a language
model's mean per-token loss (whose exponential is the perplexity), as
`torch.nn.CrossEntropyLoss(ignore_index=...)` and the masked means of JAX training loops
(`sum(loss * mask) / sum(mask)`) compute it. With every length equal to `T` it is the
loss without lengths.
"""

import abc
import dataclasses
import inspect
import math
import weakref

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, PyTree, Scalar

from ._run._devices import host_value


_REDUCTIONS = ("mean", "sum")
# Filled in at the end of this module: each loss class's `Capabilities`, and the base
# classes whose closed forms are written in terms of `per_sample`.
_CAPABILITIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_BASES: tuple | None = None


def split_batch(batch: PyTree) -> tuple[PyTree, PyTree]:
    """Split a curvzoo loss's batch into `(inputs, targets)`, with a clear error (the
    lengths of a triple `(inputs, targets, lengths)` are dropped: see `batch_parts`)."""
    inputs, targets, _ = batch_parts(batch)
    return inputs, targets


def reduction_factor(loss, batch_size: int, prediction_shape: tuple, lengths, per_sample: bool):
    """The factor that multiplies a curvzoo `loss`'s sum of per-sample losses for a
    batch of `batch_size` samples (`prediction_shape` one sample's) and `lengths`
    (`(N,)` or `None`): for the batch, or with `per_sample` for each sample alone, a
    `(N,)` array (a sequence's own mean is over its own valid steps)."""
    shape = tuple(prediction_shape)
    if not per_sample:
        return loss.scale(batch_size, shape, lengths)
    if lengths is None:
        return loss.scale(1, shape)
    return jax.vmap(lambda length: jnp.asarray(loss.scale(1, shape, length[None])))(
        jnp.asarray(lengths)
    )


def batch_parts(batch: PyTree) -> tuple[PyTree, PyTree, PyTree | None]:
    """Split a curvzoo loss's batch into `(inputs, targets, lengths)`, `lengths` `None`
    for a pair `(inputs, targets)`; a clear error for anything else."""
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
        raise ValueError(
            "`batch` for a curvzoo loss must be a pair `(inputs, targets)` (or a triple "
            "`(inputs, targets, lengths)` for sequences of different lengths) whose leaves "
            f"have a leading batch axis; got {type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            + "."
        )
    lengths = batch[2] if len(batch) == 3 else None
    if lengths is not None and not isinstance(
        lengths, (jax.Array, np.ndarray, jax.ShapeDtypeStruct, jax.core.Tracer)
    ):
        raise TypeError(
            "`batch` lengths (its third element) must be an integer array of shape (N,), one "
            f"length per sequence; got a {type(lengths).__name__}. Convert it with "
            "`jnp.asarray(lengths)`."
        )
    return batch[0], batch[1], lengths


def has_steps(prediction_shape: tuple[int, ...]) -> bool:
    """Whether one sample's prediction of this shape has a step axis, for lengths to
    mask: a prediction of two or more axes has its steps on the leading one (`(T, C)`
    logits, `(T, out)` regression outputs)."""
    return len(prediction_shape) >= 2


def steps_of(inputs: PyTree) -> int | None:
    """The padded length `T` of a batch of sequences: the second axis of its (first)
    input array, or `None` if it has none."""
    leaves = jax.tree.leaves(inputs)
    if not leaves or jnp.ndim(leaves[0]) < 2:
        return None
    return int(jnp.shape(leaves[0])[1])


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_takes_length(model) -> None:
    """A batch with lengths calls `model(x, length)`: the model must take a second
    argument."""
    try:
        inspect.signature(model).bind(None, None)
    except TypeError:
        raise ValueError(
            "`batch` for a curvzoo loss must be a pair `(inputs, targets)` for this model: a "
            "triple `(inputs, targets, lengths)` calls `model(x, length)` on every sequence, "
            f"and {type(model).__name__} takes no length (the zoo `RNN` does)."
        ) from None
    except ValueError:  # no signature to read: let the call decide
        pass


def _check_lengths_array(shape, dtype, input_leaves) -> None:
    """Lengths are one integer per sequence (checked before the model sees them)."""
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(
            "`batch` lengths (its third element) must be integers, one per sequence; got "
            f"dtype {dtype}."
        )
    size = jnp.shape(input_leaves[0])[0] if input_leaves and jnp.ndim(input_leaves[0]) else None
    if len(shape) != 1 or (size is not None and shape[0] != size):
        raise ValueError(
            f"`batch` lengths (its third element) must have shape ({size},), one length per "
            f"sequence, got {tuple(shape)}."
        )


def _check_one_array(predictions) -> None:
    """A curvzoo loss scores one array per example: a model returning a tuple, a dict or
    another PyTree is refused, naming `model`."""
    if isinstance(predictions, (jax.ShapeDtypeStruct, jax.Array, jax.core.Tracer)):
        return
    structure = jax.tree.structure(predictions)
    raise ValueError(
        "`model` must return one array per example for a curvzoo loss; it returns "
        f"{type(predictions).__name__} {structure}. Wrap it so that it returns the prediction "
        "alone (a model returning `(prediction, state)` with an `eqx.nn.State` is unwrapped "
        "when the state comes with `args=`), or write the loss yourself as "
        "`loss(model, batch) -> scalar`."
    )


def _check_inputs(model, inputs) -> None:
    """The model's own check of concrete input values (`check_input_values`: the zoo
    `RNN`'s token ids in `[0, vocab_size)`), where it has one; nothing under a trace."""
    checker = getattr(model, "check_input_values", None)
    if callable(checker) and all(_is_concrete(leaf) for leaf in jax.tree.leaves(inputs)):
        checker(inputs)


def _valid_targets(prediction_shape: tuple, targets, lengths) -> np.ndarray:
    """The targets at valid steps only (all of them without lengths or steps), with the
    targets' trailing axes: padded steps may hold any value (a padding label, say)."""
    targets = host_value(targets)
    if lengths is None or not has_steps(tuple(prediction_shape[1:])):
        return targets
    valid = np.arange(targets.shape[1])[None, :] < host_value(lengths)[:, None]
    return targets[valid][None]


class AbstractLoss(eqx.Module):
    """Base class of curvzoo losses.

    A subclass says how one sample's prediction and target give that sample's loss
    (`per_sample`, summed over the sample's elements) and how many elements a sample
    holds (`elements_per_sample`, the denominator of `reduction="mean"`). Everything
    else is shared: the call `loss(model, batch)`, the shape checks and the reduction.

    `curvzoo.fisher_diagonal` also needs a method `sample_targets(key, prediction)`
    that draws one sample's targets from the model's predictive distribution, the one
    whose negative log-likelihood the loss is; the curvzoo losses define it.

    **Sequences of different lengths.** A batch `(inputs, targets, lengths)`, with
    `lengths` an integer array `(N,)` of values in `[1, T]`, calls the model as
    `model(x, length)` on every sequence (the zoo `RNN` reads its last-state readout at
    step `length - 1`). Where one sample's prediction has a step axis (two or more axes,
    steps first: per-step targets `(N, T, ...)`), the steps at or past the length are
    left out (`sample_loss`), and `reduction="mean"` is the mean over the *valid steps*
    of the whole batch: the sum of their losses over `sum(lengths)` (times one step's
    elements). Every valid step weighs the same whatever its sequence's length, as in a
    language model's mean per-token loss (whose exponential is the perplexity),
    `torch.nn.CrossEntropyLoss(ignore_index=...)`, and the `sum(loss * mask) /
    sum(mask)` of JAX training loops; with every length `T` it is the loss without
    lengths. Targets at padded steps are neither used nor checked (a padding label such
    as `-1` is fine).
    """

    reduction: eqx.AbstractVar[str]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if _BASES is not None:
            _CAPABILITIES[cls] = _work_out(cls)

    def __check_init__(self):
        if self.reduction not in _REDUCTIONS:
            raise ValueError(f"`reduction` must be one of {_REDUCTIONS}, got {self.reduction!r}.")

    @abc.abstractmethod
    def per_sample(self, prediction: Array, target: Array) -> Scalar:
        """The loss of one sample, summed over its elements (no reduction)."""

    @abc.abstractmethod
    def elements_per_sample(self, prediction_shape: tuple[int, ...]) -> int:
        """How many terms one sample contributes to the `"mean"` denominator."""

    @abc.abstractmethod
    def check_shapes(
        self, prediction_shape: tuple[int, ...], target_shape: tuple[int, ...], target_dtype
    ) -> None:
        """Raise a `ValueError` naming `batch` if targets do not fit the predictions.

        Shapes include the leading batch axis.
        """

    def output_hessian_factor(self, prediction: Array, target: Array) -> tuple[Array, Array]:
        """The Hessian of `per_sample` in the prediction as weighted outer products:
        `H = sum_k weights[k] * outer(columns[k], columns[k])`.

        **Returns:** `(columns, weights)` with shapes `(K, *prediction.shape)` and `(K,)`.

        This default takes an eigendecomposition of `jax.hessian(per_sample)`; the
        curvzoo losses override it with closed forms.
        """
        size = prediction.size

        def flat_loss(z):
            return self.per_sample(z.reshape(prediction.shape), target)

        hessian = jax.hessian(flat_loss)(prediction.reshape(-1))
        eigenvalues, eigenvectors = jnp.linalg.eigh(hessian)
        return eigenvectors.T.reshape(size, *prediction.shape), eigenvalues

    def check_values(self, prediction_shape: tuple[int, ...], targets: np.ndarray) -> None:
        """Check concrete target values (not tracers); the default accepts anything."""
        del prediction_shape, targets

    def scale(
        self, batch_size: int, prediction_shape: tuple[int, ...], lengths: Array | None = None
    ) -> float | Array:
        """The factor that multiplies the sum of per-sample losses.

        `1` for `reduction="sum"`, `1 / (batch_size * elements_per_sample)` for `"mean"`.
        `prediction_shape` is one sample's prediction shape. With `lengths` (`(N,)`,
        `N = batch_size`) and a prediction with a step axis, `"mean"` is over the valid
        steps, `1 / (sum(lengths) * elements of one step)`, an array (see the module
        docstring); for one sample, `1 / (length * elements of one step)`.
        """
        if self.reduction == "sum":
            return 1.0
        if lengths is None or not has_steps(tuple(prediction_shape)):
            return 1.0 / (batch_size * self.elements_per_sample(prediction_shape))
        per_step = self.elements_per_sample(tuple(prediction_shape[1:]))
        return 1.0 / (jnp.sum(jnp.asarray(lengths)) * per_step)

    def sample_loss(self, prediction: Array, target: Array, length: Array | None = None) -> Scalar:
        """One sample's loss, `per_sample(prediction, target)`, with the steps at or past
        `length` left out where the prediction has a step axis (its leading axis, when
        it has two or more): the sum of `per_sample` over the valid steps, which is the
        masked loss for a loss that is a sum over steps (an `AbstractStepwiseLoss`, as
        every curvzoo loss is)."""
        if length is None or not has_steps(prediction.shape):
            return self.per_sample(prediction, target)
        terms = jax.vmap(self.per_sample)(prediction, target)
        valid = jnp.arange(prediction.shape[0]) < length
        return jnp.sum(jnp.where(valid, terms, jnp.zeros_like(terms)))

    def step_mask(self, prediction: Array, length: Array | None) -> Array | None:
        """`1` on the entries of one sample's `prediction` that belong to steps before
        `length`, `0` on the padded ones, shaped to broadcast against it; `None` where
        nothing is masked (no length, or no step axis). The masked loss's Hessian factor
        is the unmasked factor's columns times this mask; its gradient, the gradient
        times it."""
        if length is None or not has_steps(prediction.shape):
            return None
        valid = (jnp.arange(prediction.shape[0]) < length).astype(prediction.dtype)
        return valid.reshape(-1, *(1,) * (prediction.ndim - 1))

    def predict(self, model, inputs: PyTree, lengths: Array | None = None) -> PyTree:
        """The model applied to every sample: `jax.vmap(model)(inputs)`, or with
        `lengths`, `jax.vmap(model)(inputs, lengths)`: one array for a model the loss can
        score (anything else is refused with an error naming `model`)."""
        if lengths is None:
            return jax.vmap(model)(inputs)
        return jax.vmap(model)(inputs, lengths)

    def predictions(self, model, inputs: PyTree, lengths: Array | None = None) -> PyTree:
        """`predict(model, inputs)`, or with lengths `predict(model, inputs, lengths)`
        (so a subclass's `predict(model, inputs)` keeps working without lengths)."""
        if lengths is None:
            return self.predict(model, inputs)
        _check_takes_length(model)
        return self.predict(model, inputs, lengths)

    def __call__(self, model, batch: PyTree) -> Scalar:
        """**Arguments:**

        - `model`: a callable on one example, such as any zoo model.
        - `batch`: a pair `(inputs, targets)` with a leading batch axis `N` on every
            leaf, or a triple `(inputs, targets, lengths)` for sequences of different
            lengths (see `curvzoo.losses`).

        **Returns:**

        The reduced loss, a scalar.
        """
        inputs, targets, lengths = batch_parts(batch)
        targets = jnp.asarray(targets)
        if lengths is None:
            predictions = self.predict(model, inputs)
            _check_one_array(predictions)
            self.check_shapes(predictions.shape, targets.shape, targets.dtype)
            _check_inputs(model, inputs)
            losses = jax.vmap(self.per_sample)(predictions, targets)
            return self.scale(predictions.shape[0], predictions.shape[1:]) * jnp.sum(losses)
        lengths = jnp.asarray(lengths)
        _check_lengths_array(lengths.shape, lengths.dtype, jax.tree.leaves(inputs))
        predictions = self.predictions(model, inputs, lengths)
        _check_one_array(predictions)
        self.check_shapes(predictions.shape, targets.shape, targets.dtype)
        self.check_lengths(predictions.shape, steps_of(inputs))
        if _is_concrete(lengths):
            self.check_length_values(host_value(lengths), steps_of(inputs))
        _check_inputs(model, inputs)
        losses = jax.vmap(self.sample_loss)(predictions, targets, lengths)
        scale = self.scale(predictions.shape[0], predictions.shape[1:], lengths)
        return scale * jnp.sum(losses)

    def prediction_shape(self, model, batch: PyTree) -> tuple[int, ...]:
        """The shape of the batch of predictions, with the targets' (and lengths')
        shapes checked against it. Traces the model (no compute)."""
        inputs, targets, lengths = batch_parts(batch)
        if lengths is not None:
            _check_lengths_array(
                jnp.shape(lengths), jnp.result_type(lengths), jax.tree.leaves(inputs)
            )
        predictions = eqx.filter_eval_shape(
            lambda loss, m, x, n: loss.predictions(m, x, n), self, model, inputs, lengths
        )
        _check_one_array(predictions)
        self.check_shapes(predictions.shape, jnp.shape(targets), jnp.result_type(targets))
        if lengths is not None:
            self.check_lengths(predictions.shape, steps_of(inputs))
        return tuple(predictions.shape)

    def check_lengths(self, prediction_shape: tuple[int, ...], steps: int | None) -> None:
        """Raise a `ValueError` naming `batch` where the lengths of a batch
        `(inputs, targets, lengths)` do not fit the model's predictions: inputs with a
        step axis, per-step predictions (and so targets) with the inputs' `T` steps, and
        a loss that is a sum over steps. Shapes include the batch axis."""
        if steps is None:
            raise ValueError(
                "`batch` has lengths but its inputs have no step axis: a batch of sequences "
                "has inputs of shape (N, T, ...), or (N, T) for token ids."
            )
        if not has_steps(tuple(prediction_shape[1:])):
            return
        if prediction_shape[1] != steps:
            raise ValueError(
                f"with lengths, per-step predictions must have the inputs' T = {steps} steps "
                f"on their first axis after the batch axis (and so must the `batch` "
                f"targets); the predictions have shape {tuple(prediction_shape)}."
            )
        if AbstractStepwiseLoss not in type(self).__mro__:
            raise ValueError(
                f"`loss` ({type(self).__name__}) cannot leave the padded steps of a `batch` "
                "with lengths out: that needs a loss that is a sum over steps, a subclass "
                "of `curvzoo.losses.AbstractStepwiseLoss`."
            )

    def check_length_values(self, lengths: np.ndarray, steps: int | None) -> None:
        """Check concrete lengths (not tracers): every one in `[1, T]`."""
        low, high = (int(lengths.min()), int(lengths.max())) if lengths.size else (1, 1)
        if low < 1 or (steps is not None and high > steps):
            raise ValueError(
                f"`batch` lengths (its third element) must lie in [1, {steps}] (T, the "
                f"padded length of the inputs), got values from {low} to {high}."
            )

    def check_batch_values(
        self, prediction_shape: tuple[int, ...], batch: PyTree, model=None
    ) -> None:
        """Check the concrete values of `batch` (parts that are tracers are skipped):
        the lengths, the targets (`check_values`, at valid steps only), and the inputs
        where `model` has a method `check_input_values` (the zoo `RNN`'s token ids)."""
        inputs, targets, lengths = batch_parts(batch)
        if lengths is not None and _is_concrete(lengths):
            lengths = host_value(lengths)
            self.check_length_values(lengths, steps_of(inputs))
        elif lengths is not None:
            return  # lengths unknown: which target steps count is unknown too
        if _is_concrete(targets):
            valid = _valid_targets(prediction_shape, targets, lengths)
            self.check_values(prediction_shape, valid)
        _check_inputs(model, inputs)


class AbstractStepwiseLoss(AbstractLoss):
    """A loss that is a sum of independent per-step terms when the prediction has a
    leading step axis, and so exposes each step's Hessian. The recurrent structured
    kernel needs this (a readout on every state is scored step by step)."""

    @abc.abstractmethod
    def output_hessian_step_factor(
        self, prediction: Float[Array, "steps size"], target: Array
    ) -> tuple[Array, Array]:
        """The Hessian of each step's term in that step's prediction, as weighted outer
        products.

        **Arguments:** `prediction` of shape `(T, C)`; `target` with the matching
        leading axis `T`.

        **Returns:** `(columns, weights)` with shapes `(T, K, C)` and `(T, K)`.
        """


def _softmax_factor(probs: Float[Array, "*steps classes"]) -> Array:
    """A factor of the softmax cross-entropy's Hessian with the fewest columns:
    `diag(p) - p p^T = A A^T` with `A` of shape `(..., C - 1, C)` (columns stacked on
    the second-to-last axis), one column fewer than the obvious `sqrt(p_k) (e_k - p)`.

    With `q = sqrt(p)` (a unit vector), `diag(p) - p p^T = D (I - q q^T) D` for
    `D = diag(q)`. The Householder reflection `R = I - v v^T / (1 + q_m)`, `v = q + e_m`,
    `m` the largest entry of `q` (so that `1 + q_m` is at least `1 + 1 / sqrt(C)`), maps
    `q` to `-e_m`; its other `C - 1` columns are an orthonormal basis of the complement
    of `q`, so `I - q q^T` is the sum of their outer products and `A`'s columns are
    `D r_j`, `j != m`. Every kernel pushes one column fewer through the network: 10%
    less of its largest term for 10 classes, half for 2.
    """
    num_classes = probs.shape[-1]
    eye = jnp.eye(num_classes, dtype=probs.dtype)
    root = jnp.sqrt(probs)
    if num_classes == 1:  # a constant loss: one zero column keeps every shape non-empty
        return root[..., None, :] * (eye - probs[..., None, :])
    largest = jnp.argmax(root, axis=-1)
    v = root + jax.nn.one_hot(largest, num_classes, dtype=probs.dtype)
    scale = 1 + jnp.max(root, axis=-1)
    reflection = eye - v[..., :, None] * v[..., None, :] / scale[..., None, None]
    # every row but row `largest` (the reflection is symmetric: rows are columns)
    index = jnp.arange(num_classes - 1)
    keep = index + (index >= largest[..., None])
    rows = jnp.take_along_axis(reflection, keep[..., :, None], axis=-2)
    return rows * root[..., None, :]


class CrossEntropy(AbstractStepwiseLoss):
    """Softmax cross-entropy on logits with integer class labels.

    One sample's prediction holds logits over `C` classes on its last axis, `(C,)`, or
    `(T, C)` for a per-step readout; its label is an integer array of the prediction's
    shape without the class axis, `()` or `(T,)`, with values in `[0, C)`.

    `reduction="mean"` is the mean over samples and, for per-step predictions, over
    steps too: the sum of all per-step losses divided by `N * T` (with lengths, by
    `sum(lengths)`: the mean over valid steps, see `AbstractLoss`). `"sum"` is their
    sum.

    Label values are checked by the curvature functions when they are concrete; inside
    `jax.jit` they cannot be, and out-of-range labels are clipped to `[0, C)`.

    **Example:**

    ```python
    loss = curvzoo.losses.CrossEntropy(reduction="sum")
    value = loss(model, (x, labels))
    ```
    """

    reduction: str = eqx.field(static=True)

    def __init__(self, reduction: str = "mean"):
        """**Arguments:**

        - `reduction`: `"mean"` (default) or `"sum"`, as described above.
        """
        self.reduction = reduction

    def per_sample(
        self, prediction: Float[Array, "*steps classes"], target: Int[Array, "*steps"]
    ) -> Scalar:
        log_norm = jax.nn.logsumexp(prediction, axis=-1)
        picked = jnp.take_along_axis(
            prediction, target[..., None].astype(jnp.int32), axis=-1, mode="clip"
        )[..., 0]
        return jnp.sum(log_norm - picked)

    def elements_per_sample(self, prediction_shape: tuple[int, ...]) -> int:
        return math.prod(prediction_shape[:-1])

    def output_hessian_factor(self, prediction: Array, target: Array) -> tuple[Array, Array]:
        """Per step, `diag(p) - p p^T = A A^T` with the `C - 1` columns of
        `_softmax_factor`; steps are independent, so the factor is block-diagonal."""
        del target
        num_classes = prediction.shape[-1]
        probs = jax.nn.softmax(prediction.reshape(-1, num_classes), axis=-1)
        steps = probs.shape[0]
        block = _softmax_factor(probs)  # (T, K, C)
        rank = block.shape[1]
        # columns[(t, k), s, :] = [s == t] * block[t, k, :]
        columns = jnp.einsum("ts,tkc->tksc", jnp.eye(steps, dtype=probs.dtype), block)
        columns = columns.reshape(steps * rank, *prediction.shape)
        return columns, jnp.ones(steps * rank, probs.dtype)

    def output_hessian_step_factor(self, prediction: Array, target: Array) -> tuple[Array, Array]:
        del target
        probs = jax.nn.softmax(prediction, axis=-1)
        columns = _softmax_factor(probs)
        return columns, jnp.ones(columns.shape[:-1], probs.dtype)

    def sample_targets(
        self, key: Array, prediction: Float[Array, "*steps classes"]
    ) -> Int[Array, "*steps"]:
        """Labels drawn from the model's predictive distribution, `softmax(prediction)`
        (for the Monte-Carlo Fisher)."""
        return jax.random.categorical(key, prediction, axis=-1).astype(jnp.int32)

    def check_shapes(self, prediction_shape, target_shape, target_dtype) -> None:
        if len(prediction_shape) < 2:
            raise ValueError(
                "CrossEntropy needs logits with a class axis: one sample's prediction "
                f"must have shape (C,) or (T, C); the batch of predictions has shape "
                f"{tuple(prediction_shape)}."
            )
        expected = tuple(prediction_shape[:-1])
        if tuple(target_shape) != expected:
            raise ValueError(
                f"`batch` labels for CrossEntropy must have shape {expected} (the "
                f"predictions' shape {tuple(prediction_shape)} without the class axis), "
                f"got {tuple(target_shape)}."
            )
        if not jnp.issubdtype(target_dtype, jnp.integer):
            raise ValueError(
                f"`batch` labels for CrossEntropy must be integers, got dtype {target_dtype}."
            )

    def check_values(self, prediction_shape, targets) -> None:
        num_classes = prediction_shape[-1]
        if targets.size and (targets.min() < 0 or targets.max() >= num_classes):
            raise ValueError(
                f"`batch` labels for CrossEntropy must lie in [0, {num_classes}), got "
                f"values from {targets.min()} to {targets.max()}."
            )


class AbstractElementwiseLoss(AbstractStepwiseLoss):
    """A loss that is a sum of independent per-element terms `l(z, y)` of a prediction
    and a target of the same shape; its Hessian in the prediction is diagonal,
    `d^2 l / dz^2` per element (`element_curvature`)."""

    @abc.abstractmethod
    def element_curvature(self, prediction: Array) -> Array:
        """`d^2 l / dz^2` for every element, shaped like `prediction`."""

    def elements_per_sample(self, prediction_shape: tuple[int, ...]) -> int:
        return math.prod(prediction_shape)

    def output_hessian_factor(self, prediction: Array, target: Array) -> tuple[Array, Array]:
        """Unit columns weighted by `element_curvature`."""
        del target
        size = prediction.size
        columns = jnp.eye(size, dtype=prediction.dtype).reshape(size, *prediction.shape)
        return columns, self.element_curvature(prediction).reshape(-1)

    def output_hessian_step_factor(self, prediction: Array, target: Array) -> tuple[Array, Array]:
        del target
        steps, size = prediction.shape
        columns = jnp.broadcast_to(jnp.eye(size, dtype=prediction.dtype), (steps, size, size))
        return columns, self.element_curvature(prediction)

    def check_shapes(self, prediction_shape, target_shape, target_dtype) -> None:
        del target_dtype
        if tuple(target_shape) != tuple(prediction_shape):
            raise ValueError(
                f"`batch` targets for {type(self).__name__} must have the predictions' "
                f"shape {tuple(prediction_shape)}, got {tuple(target_shape)}."
            )


class MSE(AbstractElementwiseLoss):
    """Squared error between prediction and a target of the same shape.

    `reduction="mean"` is the mean over all elements of `(prediction - target)**2`,
    as `torch.nn.MSELoss()` and `optax.squared_error(prediction, target).mean()`;
    `"sum"` is the sum over all elements (no factor 1/2 in either).
    """

    reduction: str = eqx.field(static=True)

    def __init__(self, reduction: str = "mean"):
        """**Arguments:**

        - `reduction`: `"mean"` (default) or `"sum"`, as described above.
        """
        self.reduction = reduction

    def per_sample(self, prediction: Float[Array, "*shape"], target: ArrayLike) -> Scalar:
        return jnp.sum((prediction - target) ** 2)

    def element_curvature(self, prediction: Array) -> Array:
        return jnp.full_like(prediction, 2.0)

    def sample_targets(self, key: Array, prediction: Float[Array, "*shape"]) -> Array:
        """Targets drawn from `Normal(prediction, 1/2)`, the Gaussian whose negative
        log-likelihood is this loss up to a constant (for the Monte-Carlo Fisher: with
        variance 1/2, `E[grad grad^T] = 2 I`, the loss's Hessian)."""
        noise = jax.random.normal(key, prediction.shape, prediction.dtype)
        return prediction + jnp.sqrt(jnp.asarray(0.5, prediction.dtype)) * noise


class BCEWithLogits(AbstractElementwiseLoss):
    """Binary cross-entropy on logits, with targets in `[0, 1]` of the logits' shape.

    Per element, `softplus(z) - y * z`, the numerically stable form of
    `-y log sigmoid(z) - (1 - y) log(1 - sigmoid(z))`. `reduction="mean"` is the mean
    over all elements, as `torch.nn.BCEWithLogitsLoss()`; `"sum"` is their sum.
    """

    reduction: str = eqx.field(static=True)

    def __init__(self, reduction: str = "mean"):
        """**Arguments:**

        - `reduction`: `"mean"` (default) or `"sum"`, as described above.
        """
        self.reduction = reduction

    def per_sample(self, prediction: Float[Array, "*shape"], target: ArrayLike) -> Scalar:
        return jnp.sum(jax.nn.softplus(prediction) - target * prediction)

    def element_curvature(self, prediction: Array) -> Array:
        prob = jax.nn.sigmoid(prediction)
        return prob * (1 - prob)

    def sample_targets(self, key: Array, prediction: Float[Array, "*shape"]) -> Array:
        """Targets in `{0, 1}` drawn from `Bernoulli(sigmoid(prediction))` (for the
        Monte-Carlo Fisher)."""
        draws = jax.random.bernoulli(key, jax.nn.sigmoid(prediction))
        return draws.astype(prediction.dtype)

    def check_values(self, prediction_shape, targets) -> None:
        del prediction_shape
        if targets.size and (targets.min() < 0 or targets.max() > 1):
            raise ValueError(
                "`batch` targets for BCEWithLogits must lie in [0, 1], got values from "
                f"{targets.min()} to {targets.max()}."
            )


cross_entropy = CrossEntropy()
"""`CrossEntropy(reduction="mean")`: the mean over samples (and steps) of softmax
cross-entropy on logits with integer labels."""

mse = MSE()
"""`MSE(reduction="mean")`: the mean over all elements of `(prediction - target)**2`."""

binary_cross_entropy_with_logits = BCEWithLogits()
"""`BCEWithLogits(reduction="mean")`: the mean over all elements of binary
cross-entropy on logits."""


# ## What the fast kernels may read from a loss class, worked out once per class
#
# The structured kernels and the GGN family do not call `loss(model, batch)`: they
# rebuild it from `predict`, `per_sample`, `scale` and the closed-form curvature
# (`output_hessian_factor`, `element_curvature`, `output_hessian_step_factor`). That is
# only the loss itself when those pieces belong together: a subclass that overrides
# `__call__`, or `per_sample` while inheriting a closed form written for its parent's
# `per_sample`, must not be rebuilt. Each class's verdict is worked out when the class
# is created, so that dispatch is a lookup.


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What the fast kernels may read from one loss class; each field is `None` where
    they may, or the reason they may not."""

    structured: dict  # quantity ("hessian", "ggn", "gradients") -> reason
    stepwise: str | None  # the recurrent kernel's per-step factor
    own_call: str | None  # `__call__` is the per-sample form (the GGN family)
    factor: str | None  # the loss-Hessian factor belongs to `per_sample`
    sampler: str | None  # `sample_targets` exists and belongs to `per_sample`


# The closed-form pieces each quantity reads.
_PIECES = {
    "hessian": ("element_curvature", "output_hessian_factor", "output_hessian_step_factor"),
    "ggn": ("output_hessian_factor",),
    "gradients": (),
}


def _defining_class(cls: type, name: str) -> type | None:
    for klass in cls.__mro__:
        if name in vars(klass):
            return klass
    return None


def _inherited(cls: type, name: str) -> str | None:
    """Why `cls`'s method `name` may not belong to its `per_sample`: it comes from a
    class whose `per_sample` a subclass has overridden. `None` if it belongs."""
    where = _defining_class(cls, name)
    # `__mro__`, not `issubclass`: during class creation `abc`'s subclass check of the
    # new class still reads its parent's cache.
    if where is None or where in _BASES or _defining_class(cls, "per_sample") in where.__mro__:
        return None
    return (
        f"`loss` ({cls.__name__}) overrides `per_sample` but inherits `{name}` from "
        f"{where.__name__}, which may not match it"
    )


def _factor_mismatch(cls: type, quantity: str) -> str | None:
    names = _PIECES[quantity]
    if quantity == "ggn" and _defining_class(cls, names[0]) is AbstractElementwiseLoss:
        names = ("element_curvature",)  # the factor is built from it
    for name in names:
        reason = _inherited(cls, name)
        if reason is not None:
            return reason
    return None


def _work_out(cls: type) -> Capabilities:
    overridden = [
        name for name in ("__call__", "predict") if _defining_class(cls, name) is not AbstractLoss
    ]
    structured = {}
    for quantity in _PIECES:
        if overridden:
            structured[quantity] = (
                f"`loss` ({cls.__name__}) overrides `{overridden[0]}`, which the structured "
                "kernels do not call"
            )
        else:
            structured[quantity] = _factor_mismatch(cls, quantity)
    own_call = None
    if "__call__" in overridden:
        own_call = (
            f"`loss` ({cls.__name__}) overrides `__call__`; {{name}} works from the loss's "
            "per-sample form, `scale * sum of per_sample(predict(model, inputs))`, which "
            "`__call__` then need not compute."
        )
    stepwise = None
    if AbstractStepwiseLoss not in cls.__mro__:
        stepwise = (
            f"`loss` ({cls.__name__}) defines no per-step Hessian factor (it is not an "
            "`AbstractStepwiseLoss`), which the recurrent kernel needs"
        )
    sampler = _inherited(cls, "sample_targets")
    if sampler is None and not callable(getattr(cls, "sample_targets", None)):
        sampler = (
            f"`loss` ({cls.__name__}) for {{name}} needs a method "
            "`sample_targets(key, prediction)` that draws one sample's targets from the "
            "model's predictive distribution; the curvzoo losses define it."
        )
    return Capabilities(structured, stepwise, own_call, _factor_mismatch(cls, "ggn"), sampler)


def capabilities(loss: AbstractLoss) -> Capabilities:
    """The capabilities of `loss`'s class (a lookup)."""
    return _CAPABILITIES[type(loss)]


_BASES = (AbstractLoss, AbstractElementwiseLoss)


def _register_existing(cls: type) -> None:
    for sub in cls.__subclasses__():
        _CAPABILITIES[sub] = _work_out(sub)
        _register_existing(sub)


_register_existing(AbstractLoss)
