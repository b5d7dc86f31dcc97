"""The convenience optimisers' tail: decoupled weight decay, then the learning rate."""

import optax


def with_learning_rate(
    scale: optax.GradientTransformationExtraArgs, learning_rate, weight_decay=0.0
) -> optax.GradientTransformationExtraArgs:
    """`scale`, then `optax.add_decayed_weights(weight_decay)` unless it is a Python 0,
    then `optax.scale_by_learning_rate(learning_rate)`, as `optax.adamw` chains Adam.
    An array (as `optax.inject_hyperparams` passes it, concrete in `init` and traced in
    `update`) always chains the decay, so that both build the same chain."""
    decay = () if _is_zero(weight_decay) else (optax.add_decayed_weights(weight_decay),)
    return optax.chain(scale, *decay, optax.scale_by_learning_rate(learning_rate))


def _is_zero(value) -> bool:
    return isinstance(value, (int, float)) and value == 0
