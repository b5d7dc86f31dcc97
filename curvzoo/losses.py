"""Losses that know their per-sample structure: `loss(model, batch) -> scalar`."""

from ._losses import (
    AbstractElementwiseLoss as AbstractElementwiseLoss,
    AbstractLoss as AbstractLoss,
    AbstractStepwiseLoss as AbstractStepwiseLoss,
    BCEWithLogits as BCEWithLogits,
    binary_cross_entropy_with_logits as binary_cross_entropy_with_logits,
    cross_entropy as cross_entropy,
    CrossEntropy as CrossEntropy,
    MSE as MSE,
    mse as mse,
)
