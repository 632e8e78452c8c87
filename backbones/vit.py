"""ViT backbones: timm's VisionTransformer with MixedAE's homologous attention and dense-feature access.

Every model here is a plain ``timm.models.vision_transformer.VisionTransformer``; its state-dict keys are
timm's, so timm checkpoints load without renaming and our checkpoints load into timm.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from timm.models.vision_transformer import Attention, VisionTransformer

# Architectures by timm-style name. The tiny ones train on a CPU in minutes (64 tokens each).
# ViT-H/14 is the official MAE ViT-H; ViT-H/16 completes the patch-16 family.
ARCHS: dict[str, dict[str, Any]] = {
    "vit_tiny_patch4_32": dict(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3),
    "vit_tiny_patch8_64": dict(img_size=64, patch_size=8, embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16_224": dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16_224": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16_224": dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit_huge_patch16_224": dict(img_size=224, patch_size=16, embed_dim=1280, depth=32, num_heads=16),
    "vit_huge_patch14_224": dict(img_size=224, patch_size=14, embed_dim=1280, depth=32, num_heads=16),
}


def homologous_softmax(logits: torch.Tensor, topk: int) -> torch.Tensor:
    """softmax(TopK(logits)) over the last dim: each query keeps exactly its ``topk`` largest logits.

    MixedAE (Chen et al., CVPR 2023, eq. "A_HomoAtt"): in a mixed image the largest attention logits of a patch
    are most likely its homologous (same-source) patches, so attention outside the TopK is cut to zero.
    Indices come from ``topk`` and are scattered, so ties never keep more than ``topk`` entries.
    """
    topk = min(topk, logits.shape[-1])
    top_logits, top_index = logits.topk(topk, dim=-1)
    kept = torch.full_like(logits, float("-inf")).scatter(-1, top_index, top_logits)
    return kept.softmax(dim=-1)


class HomologousAttention(Attention):
    """timm's multi-head self-attention with optional TopK sparsification (same parameters, same keys).

    ``topk=None`` is timm's attention unchanged (fused kernel where available); an integer ``topk`` applies
    :func:`homologous_softmax` to qkᵀ/√D. Only MixedAE pretraining turns it on.
    """

    topk: int | None = None

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        if self.topk is None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if attn_mask is not None or is_causal:
            raise ValueError("homologous attention does not take an attention mask")
        batch, tokens, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = homologous_softmax((q * self.scale) @ k.transpose(-2, -1), self.topk)
        x = self.attn_drop(attn) @ v
        x = x.transpose(1, 2).reshape(batch, tokens, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


def set_homologous_attention(
    model: VisionTransformer, topk: int | None, blocks: Sequence[int] | None = None
) -> None:
    """Turn homologous attention on (``topk`` tokens per query) or off (``None``) in ``blocks`` (default: all)."""
    indices = range(len(model.blocks)) if blocks is None else blocks
    for index in indices:
        attention = model.blocks[index].attn
        if not isinstance(attention, HomologousAttention):
            raise TypeError(f"block {index} has {type(attention).__name__}, not HomologousAttention")
        attention.topk = topk


def create_backbone(
    arch: str,
    *,
    num_classes: int = 0,
    global_pool: str = "token",
    img_size: int | tuple[int, int] | None = None,
    drop_path_rate: float = 0.0,
    homologous_topk: int | None = None,
    homologous_blocks: Sequence[int] | None = None,
    **timm_kwargs: Any,
) -> VisionTransformer:
    """Build ``arch`` (a name in :data:`ARCHS`) as a timm VisionTransformer.

    ``num_classes=0`` gives a headless backbone. ``global_pool='avg'`` is the MAE fine-tuning head (mean of
    patch tokens + ``fc_norm``). ``homologous_topk`` turns on homologous attention in ``homologous_blocks``.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of: {', '.join(ARCHS)}")
    kwargs = dict(ARCHS[arch], num_classes=num_classes, global_pool=global_pool, drop_path_rate=drop_path_rate)
    if img_size is not None:
        kwargs["img_size"] = img_size
    kwargs.update(timm_kwargs)
    model = VisionTransformer(attn_layer=HomologousAttention, **kwargs)
    model.arch = arch
    if homologous_topk is not None:
        set_homologous_attention(model, homologous_topk, homologous_blocks)
    return model


# Blocks (0-based) whose outputs feed a feature pyramid, as in the MAE/BEiT UperNet configs
# (ViT-B: 4, 6, 8, 12 counted from 1; ViT-L: 8, 12, 16, 24).
FEATURE_BLOCKS_BY_DEPTH: dict[int, tuple[int, ...]] = {12: (3, 5, 7, 11), 24: (7, 11, 15, 23)}


def default_feature_blocks(depth: int) -> tuple[int, ...]:
    """Four blocks for a feature pyramid: the protocol's choice where one exists, else every quarter of depth."""
    if depth in FEATURE_BLOCKS_BY_DEPTH:
        return FEATURE_BLOCKS_BY_DEPTH[depth]
    quarter = depth // 4
    return tuple(quarter * (i + 1) - 1 for i in range(4))


def dense_features(
    model: VisionTransformer, images: torch.Tensor, blocks: Sequence[int] | None = None, norm: bool = False
) -> list[torch.Tensor]:
    """Patch-token maps (B, C, H/p, W/p) after each of ``blocks``: the input of a simple feature pyramid.

    A thin wrapper over timm's ``forward_intermediates`` so adapters never copy the model's forward.
    """
    indices = list(blocks) if blocks is not None else list(default_feature_blocks(len(model.blocks)))
    return model.forward_intermediates(images, indices=indices, norm=norm, output_fmt="NCHW", intermediates_only=True)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
