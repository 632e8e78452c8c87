"""The losses a landscape is drawn on, each a deterministic, differentiable function of the model's weights.

A ``LossFn`` maps a model to a scalar tensor with autograd (the curvature needs its Hessian-vector products);
``loss_measure`` turns it into a surface measure. Determinism: every loss uses one fixed set of images and
reseeds the global generator before each batch (seed + batch index), so MAE's masks, MixedAE's mixing and any
other draw are the SAME at every grid point.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from mimbench.backbones.checkpoint import CheckpointError, read_checkpoint
from mimbench.backbones.vit import ARCHS
from mimbench.core.config import from_dict
from mimbench.pretrain.data import build_pretrain_dataset
from mimbench.pretrain.engine import PretrainConfig, build_method, checkpoint_paths
from mimbench.transfer.features import pooled_features
from mimbench.transfer.logistic import LinearClassifier, fit_logistic

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


# ------------------------------------------------------------------------------ models from pretraining runs


def read_pretraining_model(path: str | os.PathLike) -> tuple[nn.Module, PretrainConfig, Path]:
    """The whole pretraining model (encoder, decoder, RC-MAE's teacher) of a run folder's newest resumable
    checkpoint (``<run>/checkpoints/step_*.pth``) or of one such file, with the run's config and the file read."""
    path = Path(path)
    if path.is_dir():
        found = checkpoint_paths(path)
        if not found:
            raise CheckpointError(path, "holds no resumable checkpoint (checkpoints/step_*.pth); the pretraining "
                                        "loss needs the whole model, not only the exported encoder")
        path = found[-1]
    state, _ = read_checkpoint(path)
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(path, "is not a resumable pretraining checkpoint (no model and config)")
    config = from_dict(PretrainConfig, json.loads(state["config"]), f"{path} config")
    model = build_method(config)
    model.load_state_dict(state["model"])
    return model.eval(), config, path


def pretraining_batches(config: PretrainConfig, count: int, batch_size: int, data_root: str | None = None
                        ) -> list[torch.Tensor]:
    """The first ``count`` samples of epoch 0 of the run's own data (its seeded crops), in batches."""
    dataset = build_pretrain_dataset(data_root or config.run.data_root, ARCHS[config.recipe.arch]["img_size"],
                                     seed=config.run.seed, samples_per_epoch=max(count, 1))
    dataset.set_epoch(0)
    images = torch.stack([dataset[i][0] for i in range(min(count, len(dataset)))])
    return list(images.split(batch_size))


def probe_encoder(model: nn.Module) -> nn.Module:
    """A trainable copy of the method's exported encoder (RC-MAE's is its frozen teacher) for the linear-probe
    landscape; the fixed sin-cos position embedding stays frozen, so the directions leave it at zero."""
    encoder = copy.deepcopy(model.export_encoder()).requires_grad_(True)
    if hasattr(encoder, "pos_embed"):
        encoder.pos_embed.requires_grad_(False)
    return encoder.eval()


def linear_probe_loss(encoder: nn.Module, images: torch.Tensor, targets: torch.Tensor, pool: str,
                      regularisation: float, batch_size: int) -> tuple[LossFn, LinearClassifier]:
    """The common loss of every model: cross-entropy of a logistic probe (`fit_logistic`) fitted on the centre
    weights' features of ``images``, then held fixed while the backbone's weights move."""
    batches = list(zip(images.split(batch_size), targets.split(batch_size)))
    with torch.no_grad():
        features = torch.cat([pooled_features(encoder, x, pool) for x, _ in batches])
    head = fit_logistic(features, targets, regularisation)

    def loss(model: nn.Module) -> torch.Tensor:
        value = 0.0
        for x, y in batches:
            value = value + F.cross_entropy(head.scores(pooled_features(model, x, pool)), y, reduction="sum")
        return value / len(targets)
    return loss, head
