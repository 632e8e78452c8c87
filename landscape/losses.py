"""The losses a landscape is drawn on, each a deterministic, differentiable function of the model's weights.

A ``LossFn`` maps a model to a scalar tensor with autograd (the curvature needs its Hessian-vector products);
``loss_measure`` turns it into a surface measure. Determinism: every loss uses one fixed set of images and
reseeds the global generator before each batch (seed + batch index), so MAE's masks, MixedAE's mixing and any
other draw are the SAME at every grid point.

- ``pretrain``: each method's own loss (MAE, RC-MAE against its fixed teacher, MixedAE; a supervised ViT's
  cross-entropy of its own head on its labelled training images, without the augmentation and label smoothing
  it trained with, which are noise around that loss);
- ``linear``: the cross-entropy of a logistic probe fitted at the centre, then fixed (`linear_probe_loss`);
- ``recon``: MAE's reconstruction loss of any encoder, supervised included, through a decoder fitted at the
  centre (`fit_decoder`): a fresh MAE decoder of the arch's table (`mae.DECODERS`), initialised from the seed,
  trained with AdamW (lr ``decoder_lr``, β = (0.9, 0.95) as MAE, no weight decay) for ``decoder_steps`` full-batch
  steps on the frozen centre encoder, on the landscape's own images and masks (the loss below, exactly), then
  fixed while the encoder moves. Every model sees the same images (the pretraining photos) and masks.
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
from mimbench.pretrain.mae import MAEConfig, MaskedAutoencoder
from mimbench.pretrain.supervised import SupervisedConfig, image_folder, read_supervised_checkpoint
from mimbench.transfer.features import pooled_features, probe_transform
from mimbench.transfer.logistic import LinearClassifier, fit_logistic

LossFn = Callable[[nn.Module], torch.Tensor]
Batch = torch.Tensor | tuple[torch.Tensor, ...]  # a method's inputs: images, or (images, labels)


def loss_measure(loss_fn: LossFn) -> Callable[[nn.Module], dict[str, float]]:
    """The surface measure ``{"loss": value}`` of a loss, computed without autograd."""
    def measure(model: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            return {"loss": float(loss_fn(model))}
    return measure


def pretraining_loss(batches: Sequence[Batch], seed: int) -> LossFn:
    """A pretraining method's own loss (``forward(*batch) -> (loss, parts)``: MAE, RC-MAE against its teacher,
    MixedAE on images; `SupervisedObjective` on images and labels) averaged over fixed batches, with the same
    masks / mixing at every call."""
    batches = [batch if isinstance(batch, tuple) else (batch,) for batch in batches]
    total = sum(len(batch[0]) for batch in batches)

    def loss(model: nn.Module) -> torch.Tensor:
        value = 0.0
        for index, batch in enumerate(batches):
            torch.manual_seed(seed + index)
            batch_loss, _ = model(*batch)
            value = value + batch_loss * (len(batch[0]) / total)
        return value
    return loss


# ------------------------------------------------------------------------------ models from pretraining runs


class SupervisedObjective(nn.Module):
    """A supervised classifier as a pretraining method: ``forward(images, labels) -> (cross-entropy, {})``, and its
    backbone without the head as the exported encoder."""

    fixed_position_embedding = False  # a ViT trained with labels learns its position embedding: it moves

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return F.cross_entropy(self.classifier(images), labels), {}

    def export_encoder(self) -> nn.Module:
        encoder = copy.deepcopy(self.classifier)
        encoder.reset_classifier(0)
        return encoder


Pretrained = tuple[nn.Module, PretrainConfig | SupervisedConfig, Path]


def read_pretraining_model(path: str | os.PathLike) -> Pretrained:
    """The whole pretraining model (encoder, decoder, RC-MAE's teacher; a supervised run's classifier as a
    `SupervisedObjective`) of a run folder's newest resumable checkpoint (``<run>/checkpoints/step_*.pth``) or of
    one such file, with the run's config and the file read."""
    path = Path(path)
    if path.is_dir():
        found = checkpoint_paths(path)
        if not found:
            raise CheckpointError(path, "holds no resumable checkpoint (checkpoints/step_*.pth); the pretraining "
                                        "loss needs the whole model, not only the exported encoder")
        path = found[-1]
    state, _ = read_checkpoint(path)
    supervised = read_supervised_checkpoint(state, path) if isinstance(state, dict) and "model" in state else None
    if supervised is not None:
        classifier, config = supervised
        return SupervisedObjective(classifier).eval(), config, path
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(path, "is not a resumable pretraining checkpoint (no model and config)")
    config = from_dict(PretrainConfig, json.loads(state["config"]), f"{path} config")
    model = build_method(config)
    model.load_state_dict(state["model"])
    return model.eval(), config, path


def photo_batches(data_root: str | os.PathLike | None, img_size: int, seed: int, count: int, batch_size: int
                  ) -> list[torch.Tensor]:
    """The first ``count`` samples of epoch 0 of a pretraining image set (its seeded crops), in batches."""
    dataset = build_pretrain_dataset(data_root, img_size, seed=seed, samples_per_epoch=max(count, 1))
    dataset.set_epoch(0)
    images = torch.stack([dataset[i][0] for i in range(min(count, len(dataset)))])
    return list(images.split(batch_size))


def labelled_batches(data_root: str | os.PathLike, img_size: int, seed: int, count: int, batch_size: int
                     ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` training images of a labelled set (ImageNet's layout), a seeded draw across its classes, each
    resized and centre-cropped as for evaluation, with their labels, in batches."""
    folder = image_folder(Path(data_root), "train")
    order = torch.randperm(len(folder), generator=torch.Generator().manual_seed(seed))[:count].tolist()
    transform = probe_transform(img_size)
    samples = [folder[i] for i in order]
    images = torch.stack([transform(image.convert("RGB")) for image, _ in samples])
    labels = torch.as_tensor([label for _, label in samples])
    return list(zip(images.split(batch_size), labels.split(batch_size)))


def pretraining_batches(config: PretrainConfig | SupervisedConfig, count: int, batch_size: int,
                        data_root: str | None = None) -> list[Batch]:
    """A run's own data for its pretraining loss: the first ``count`` samples of epoch 0 (``data_root`` replaces
    the run's images); a supervised run's labelled training images (always its own)."""
    img_size = ARCHS[config.recipe.arch]["img_size"]
    if isinstance(config, SupervisedConfig):
        return labelled_batches(config.run.data_root, img_size, config.run.seed, count, batch_size)
    return photo_batches(data_root or config.run.data_root, img_size, config.run.seed, count, batch_size)


def probe_encoder(model: nn.Module) -> nn.Module:
    """A trainable copy of the method's exported encoder (RC-MAE's is its frozen teacher) for the linear-probe and
    reconstruction landscapes; an MAE-style encoder's fixed sin-cos position embedding stays frozen, so the
    directions leave it at zero."""
    encoder = copy.deepcopy(model.export_encoder()).requires_grad_(True)
    if getattr(model, "fixed_position_embedding", True) and hasattr(encoder, "pos_embed"):
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


def fit_decoder(encoder: nn.Module, arch: str, batches: Sequence[torch.Tensor], seed: int, steps: int, lr: float
                ) -> tuple[MaskedAutoencoder, LossFn, list[float]]:
    """An MAE around a copy of ``encoder`` whose fresh decoder (the arch's, `mae.DECODERS`; initialised after
    ``torch.manual_seed(seed)``) is fitted to the frozen encoder: ``steps`` AdamW steps (lr ``lr``, β = (0.9, 0.95),
    no weight decay) on the full reconstruction loss of ``batches`` with the landscape's own masks. Returns the
    model with the decoder frozen and the encoder's parameters trainable as in ``encoder``, the loss (the same
    function the decoder was fitted to) and the loss before every step and after the last."""
    torch.manual_seed(seed)
    model = MaskedAutoencoder(MAEConfig(arch=arch)).eval().to(batches[0].device)
    model.encoder.load_state_dict(encoder.state_dict())
    trainable = {f"encoder.{name}" for name, p in encoder.named_parameters() if p.requires_grad}
    model.encoder.requires_grad_(False)
    decoder = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(decoder, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    loss = pretraining_loss(batches, seed)
    history = []
    for _ in range(steps):
        value = loss(model)
        history.append(float(value.detach()))
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
    with torch.no_grad():
        history.append(float(loss(model)))
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in trainable)
    return model, loss, history
