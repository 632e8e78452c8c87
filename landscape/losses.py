"""The losses a landscape is drawn on, each a deterministic, differentiable function of the model's weights.

A ``LossFn`` maps a model to a scalar tensor with autograd (the curvature needs its Hessian-vector products);
``loss_measure`` turns it into a surface measure. Determinism: every loss uses one fixed set of images and
reseeds the global generator before each batch (seed + batch index), so MAE's masks, MixedAE's mixing and any
other draw are the SAME at every grid point.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

LossFn = Callable[[nn.Module], torch.Tensor]


def loss_measure(loss_fn: LossFn) -> Callable[[nn.Module], dict[str, float]]:
    """The surface measure ``{"loss": value}`` of a loss, computed without autograd."""
    def measure(model: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            return {"loss": float(loss_fn(model))}
    return measure


def pretraining_loss(batches: Sequence[torch.Tensor], seed: int) -> LossFn:
    """A pretraining method's own loss (``forward(images) -> (loss, parts)``: MAE, RC-MAE against its teacher,
    MixedAE) averaged over fixed batches, with the same masks / mixing at every call."""
    total = sum(len(images) for images in batches)

    def loss(model: nn.Module) -> torch.Tensor:
        value = 0.0
        for index, images in enumerate(batches):
            torch.manual_seed(seed + index)
            batch_loss, _ = model(images)
            value = value + batch_loss * (len(images) / total)
        return value
    return loss
