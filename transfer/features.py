"""Frozen-backbone features for the linear probe, extracted once and cached on disk.

A feature set is keyed by everything that determines it: the checkpoint's sha256, the dataset, its root and
split, the split seed, the transform, the pooling and the precision it was computed in. A second probe of the
same checkpoint (another regulariser grid, another seed of the classifier) reads the cache and costs seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from tqdm import tqdm

from mimbench.backbones.contract import backbone_contract
from mimbench.core.errors import ConfigError, DatasetError
from mimbench.core.io import atomic_write
from mimbench.core.runtime import autocast

POOLS = ("token", "avg")


def probe_transform(image_size: int) -> Callable:
    """Bicubic resize of the shorter side to the backbone's input size, centre crop, ImageNet normalisation
    (Kornblith et al. 2019's linear-evaluation preprocessing)."""
    return transforms.Compose([
        transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def check_pool(model: nn.Module, pool: str) -> None:
    """Stop before any work when ``pool`` does not apply to the backbone."""
    if pool not in POOLS:
        raise ConfigError(f"unknown pool {pool!r}; choose one of {', '.join(POOLS)}")
    if pool == "token" and backbone_contract(model).kind != "plain":
        raise ConfigError("--pool token: a hierarchical backbone has no class token; use --pool avg")


def pooled_features(model: nn.Module, images: torch.Tensor, pool: str) -> torch.Tensor:
    """One vector per image from a backbone.

    A ViT: ``token`` is the class token after the final norm (MAE's linear probe); ``avg`` the mean of the last
    block's patch tokens, then the final norm with its pretrained affine (global average pool + norm). A
    hierarchical backbone: ``avg`` is the global average pool of its last stage (timm's pre-logits head).
    """
    check_pool(model, pool)
    if backbone_contract(model).kind != "plain":
        return model.forward_head(model.forward_features(images), pre_logits=True)
    if pool == "token":
        return model.forward_features(images)[:, 0]
    (patch_tokens,) = model.forward_intermediates(images, indices=1, norm=False, output_fmt="NLC",
                                                  intermediates_only=True)
    return model.norm(patch_tokens.mean(dim=1))


@torch.no_grad()  # not inference_mode: the probe's classifier trains on these tensors with autograd
def extract_features(model: nn.Module, dataset: Dataset, pool: str, batch_size: int = 128,
                     device: torch.device | str = "cpu", num_workers: int = 2, collate_fn: Callable | None = None,
                     progress: bool = True, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, D) in float32 and targets (N,) or (N, C) of every readable image of ``dataset``, computed
    under autocast to ``dtype`` (None: fp32)."""
    device = torch.device(device)
    model.eval().to(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_fn, pin_memory=device.type == "cuda")
    features, targets = [], []
    for batch in tqdm(loader, desc="features", disable=not progress, leave=False):
        if batch is None:  # every image of the batch was unreadable (each one already reported by path)
            continue
        images, labels = batch
        with autocast(device, dtype):
            pooled = pooled_features(model, images.to(device, non_blocking=True), pool)
        features.append(pooled.float().cpu())
        targets.append(torch.as_tensor(labels))
    if not features:
        raise DatasetError("no readable images in the dataset")
    return torch.cat(features), torch.cat(targets)


def cache_key(**fields: Any) -> str:
    """A short hash of everything that determines a feature set."""
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class FeatureCache:
    """Feature sets as safetensors files under ``root`` (``features`` and ``targets`` plus their description)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def load(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        path = self.path(key)
        if not path.exists():
            return None
        try:
            tensors = load_file(path)
        except Exception:  # a damaged cache entry is recomputed, never trusted
            return None
        return tensors["features"], tensors["targets"]

    def save(self, key: str, features: torch.Tensor, targets: torch.Tensor, description: dict[str, Any]) -> Path:
        metadata = {"description": json.dumps(description, sort_keys=True, default=str)}
        tensors = {"features": features.contiguous(), "targets": targets.contiguous()}
        return atomic_write(self.path(key), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

    def get_or_extract(self, description: dict[str, Any], extract: Callable[[], tuple[torch.Tensor, torch.Tensor]]
                       ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Cached features for ``description``, else ``extract()`` and store them; the bool says cache hit."""
        key = cache_key(**description)
        cached = self.load(key)
        if cached is not None:
            return (*cached, True)
        features, targets = extract()
        self.save(key, features, targets, description)
        return features, targets, False
