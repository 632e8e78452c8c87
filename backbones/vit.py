"""ViT backbones, and :func:`create_backbone`, the one builder for every backbone by arch name.

Every ViT here is a plain ``timm.models.vision_transformer.VisionTransformer`` with timm's own modules; its
state-dict keys are timm's, so timm checkpoints load without renaming and our checkpoints load into timm. The
hierarchical backbones (ResNet, MPViT, ...) are registered in :mod:`mimbench.backbones.registry`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from mimbench.backbones.contract import ViTContract, default_feature_blocks
from mimbench.backbones.registry import HIERARCHICAL_ARCHS
from mimbench.core.errors import ConfigError

__all__ = ["ARCHS", "backbone_archs", "count_parameters", "create_backbone", "default_feature_blocks",
           "dense_features"]

# Architectures by timm-style name. The tiny ones train on a CPU in minutes (64 tokens each); the mini one is
# ViT-Ti/4 at half its depth, the landscape study's model (its Hessian-vector products in minutes on 2 CPU cores).
# ViT-H/14 is the official MAE ViT-H; ViT-H/16 completes the patch-16 family.
ARCHS: dict[str, dict[str, Any]] = {
    "vit_mini_patch4_32": dict(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3),
    "vit_tiny_patch4_32": dict(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3),
    "vit_tiny_patch8_64": dict(img_size=64, patch_size=8, embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16_224": dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16_224": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16_224": dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit_huge_patch16_224": dict(img_size=224, patch_size=16, embed_dim=1280, depth=32, num_heads=16),
    "vit_huge_patch14_224": dict(img_size=224, patch_size=14, embed_dim=1280, depth=32, num_heads=16),
}


def backbone_archs() -> list[str]:
    """Every arch :func:`create_backbone` builds: the ViTs, then the hierarchical backbones."""
    return [*ARCHS, *HIERARCHICAL_ARCHS]


def create_backbone(
    arch: str,
    *,
    num_classes: int = 0,
    global_pool: str | None = None,
    img_size: int | tuple[int, int] | None = None,
    drop_path_rate: float = 0.0,
    **timm_kwargs: Any,
) -> nn.Module:
    """Build ``arch``: a ViT of :data:`ARCHS` (a timm VisionTransformer) or a hierarchical backbone of
    :data:`~mimbench.backbones.registry.HIERARCHICAL_ARCHS`. The model's ``arch`` attribute names it.

    ``num_classes=0`` gives a headless backbone. ``global_pool`` is the family's default where None (a ViT's class
    token; ``'avg'`` is the MAE fine-tuning head: mean of patch tokens + ``fc_norm``). ``img_size`` sets a ViT's
    patch grid; a hierarchical backbone is fully convolutional and takes any size, so it ignores it.
    """
    pool = {} if global_pool is None else {"global_pool": global_pool}
    if arch in HIERARCHICAL_ARCHS:
        model = HIERARCHICAL_ARCHS[arch](num_classes=num_classes, drop_path_rate=drop_path_rate, **pool,
                                         **timm_kwargs)
    elif arch in ARCHS:
        kwargs = dict(ARCHS[arch], num_classes=num_classes, drop_path_rate=drop_path_rate, **pool)
        if img_size is not None:
            kwargs["img_size"] = img_size
        model = VisionTransformer(**{**kwargs, **timm_kwargs})
    else:
        raise ConfigError(f"unknown arch {arch!r}; choose one of: {', '.join(backbone_archs())}")
    model.arch = arch
    return model


def dense_features(
    model: VisionTransformer, images: torch.Tensor, blocks: Sequence[int] | None = None
) -> list[torch.Tensor]:
    """Patch-token maps (B, C, H/p, W/p) after each of ``blocks`` (default: the protocol's four): the input of a
    simple feature pyramid, as the ViT's backbone contract gives them."""
    return ViTContract(model, None if blocks is None else tuple(blocks)).features(images)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
