"""MPViT, the multi-path vision transformer (Lee et al., "MPViT: Multi-Path Vision Transformer for Dense
Prediction", CVPR 2022, arXiv 2112.11010), written from the paper.

A convolutional stem (two 3×3 stride-2 conv-BN-Hardswish) brings the image to stride 4. Each of four stages then
- embeds its input along ``num_paths`` paths: a chain of depthwise-separable 3×3 conv-BN-Hardswish embeddings,
  path k taking path k−1's output, so the paths see receptive fields 3, 5, 7 at one token count (the first
  embedding of stages 2-4 has stride 2);
- runs one transformer encoder per path: a convolutional position encoding (a depthwise 3×3 conv added to the
  tokens before every block) and CoaT's factorised attention with convolutional relative position encoding
  (softmax over the keys, ``q (softmax(k)^T v)`` plus ``q ⊙ dwconv(v)`` with window 3/5/7 over 2/3/3 of the 8
  heads), then an MLP;
- adds a local path, an inverted residual block (1×1 conv-BN-Hardswish, depthwise 3×3-BN-Hardswish, 1×1 conv-BN)
  on the first embedding;
- aggregates: concatenates the local path and every encoder's output and mixes them with a 1×1 conv-BN-Hardswish
  to the next stage's width (the last stage keeps its own).
A linear head classifies the global average pool of the last stage.

Parameter names follow the official release (``stem.N.{conv,bn}``, ``patch_embed_stages.S.patch_embeds.P.
patch_conv.{dwconv,pwconv,bn}``, ``mhca_stages.S.mhca_blks.P.MHCA_layers.L.factoratt_crpe.{qkv,proj}``,
``mhca_stages.S.{InvRes,aggregate}``), so its checkpoints load with two renamings (:func:`official_key`): the
position encodings of a path are one module shared by all its blocks, registered once, at the path
(``mhca_blks.P.{cpe,crpe}``), while the official state dicts repeat them under every block
(``MHCA_layers.L.cpe``, ``MHCA_layers.L.crpe``, ``MHCA_layers.L.factoratt_crpe.crpe``); and the head is the
linear layer ``cls_head`` itself (timm's form, officially ``cls_head.cls``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, trunc_normal_

from mimbench.core.errors import ConfigError

# Window size -> number of heads of the convolutional relative position encoding (CoaT's choice, 8 heads).
CRPE_WINDOWS = {3: 2, 5: 3, 7: 3}


@dataclass(frozen=True)
class MPViTSize:
    num_paths: tuple[int, int, int, int]
    num_layers: tuple[int, int, int, int]
    embed_dims: tuple[int, int, int, int]
    mlp_ratio: int
    num_heads: int = 8


# The published sizes (paper Table 1; the official model definitions give the same numbers).
SIZES: dict[str, MPViTSize] = {
    "mpvit_tiny": MPViTSize((2, 3, 3, 3), (1, 2, 4, 1), (64, 96, 176, 216), 2),
    "mpvit_xsmall": MPViTSize((2, 3, 3, 3), (1, 2, 4, 1), (64, 128, 192, 256), 4),
    "mpvit_small": MPViTSize((2, 3, 3, 3), (1, 3, 6, 3), (64, 128, 216, 288), 4),
    "mpvit_base": MPViTSize((2, 3, 3, 3), (1, 3, 8, 3), (128, 224, 368, 480), 4),
    # A CPU-sized MPViT for the demo and tests: every part of the architecture, two paths, one block per stage.
    "mpvit_nano_cpu": MPViTSize((2, 2, 2, 2), (1, 1, 1, 1), (32, 48, 64, 64), 2),
}


def _normal_fan_out(conv: nn.Conv2d, per_group: bool) -> None:
    """He-normal init over the fan-out (the official convs: over all outputs, or per group in the local path)."""
    fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (fan_out // conv.groups if per_group else fan_out)))


class ConvBN(nn.Module):
    """Conv (no bias) - BatchNorm - optional Hardswish."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 1, stride: int = 1, act: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride, kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        self.act = nn.Hardswish() if act else nn.Identity()
        _normal_fan_out(self.conv, per_group=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class SeparableConvBN(nn.Module):
    """Depthwise conv - pointwise conv - BatchNorm - Hardswish: one path's patch embedding."""

    def __init__(self, dim: int, stride: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, stride, 1, groups=dim, bias=False)
        self.pwconv = nn.Conv2d(dim, dim, 1, bias=False)
        self.bn = nn.BatchNorm2d(dim)
        self.act = nn.Hardswish()
        for conv in (self.dwconv, self.pwconv):
            _normal_fan_out(conv, per_group=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.pwconv(self.dwconv(x))))


class PatchEmbedding(nn.Module):
    def __init__(self, dim: int, stride: int) -> None:
        super().__init__()
        self.patch_conv = SeparableConvBN(dim, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_conv(x)


class MultiScalePatchEmbedding(nn.Module):
    """The stage's embeddings in a chain: path k embeds path k−1's tokens (receptive fields 3, 5, 7)."""

    def __init__(self, dim: int, num_paths: int, downsample: bool) -> None:
        super().__init__()
        self.patch_embeds = nn.ModuleList(
            PatchEmbedding(dim, 2 if downsample and path == 0 else 1) for path in range(num_paths))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        paths = []
        for embed in self.patch_embeds:
            x = embed(x)
            paths.append(x)
        return paths


class ConvPositionEncoding(nn.Module):
    """Tokens plus a depthwise 3×3 conv of their image (CPVT's conditional position encoding)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        batch, _, dim = x.shape
        image = x.transpose(1, 2).reshape(batch, dim, *size)
        return (self.proj(image) + image).flatten(2).transpose(1, 2)


class ConvRelativePositionEncoding(nn.Module):
    """``q ⊙ dwconv(v)``, the depthwise window differing between groups of heads (CoaT)."""

    def __init__(self, head_dim: int, windows: dict[int, int]) -> None:
        super().__init__()
        self.splits = [heads * head_dim for heads in windows.values()]
        self.conv_list = nn.ModuleList(
            nn.Conv2d(channels, channels, window, padding=window // 2, groups=channels)
            for window, channels in zip(windows, self.splits))

    def forward(self, q: torch.Tensor, v: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        batch, heads, tokens, head_dim = v.shape
        image = v.transpose(2, 3).reshape(batch, heads * head_dim, *size)
        parts = [conv(part) for conv, part in zip(self.conv_list, torch.split(image, self.splits, dim=1))]
        encoded = torch.cat(parts, dim=1).reshape(batch, heads, head_dim, tokens).transpose(2, 3)
        return q * encoded


class FactorisedAttention(nn.Module):
    """Linear-cost attention ``scale · q (softmax_N(k)^T v)`` plus the relative position encoding."""

    def __init__(self, dim: int, num_heads: int, crpe: ConvRelativePositionEncoding) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self._crpe = [crpe]  # shared with the path's other blocks; registered once, on the encoder

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        context = k.softmax(dim=2).transpose(2, 3) @ v
        out = self.scale * (q @ context) + self._crpe[0](q, v, size)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderBlock(nn.Module):
    """Position encoding, then pre-norm factorised attention and MLP, each with a residual and drop path."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, drop_path: float,
                 cpe: ConvPositionEncoding, crpe: ConvRelativePositionEncoding) -> None:
        super().__init__()
        self._cpe = [cpe]
        self.factoratt_crpe = FactorisedAttention(dim, num_heads, crpe)
        self.mlp = Mlp(dim, dim * mlp_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = self._cpe[0](x, size)
        x = x + self.drop_path(self.factoratt_crpe(self.norm1(x), size))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PathEncoder(nn.Module):
    """One path's transformer: its blocks share one position encoding and one relative position encoding."""

    def __init__(self, dim: int, num_layers: int, num_heads: int, mlp_ratio: int, drop_paths: Sequence[float]) -> None:
        super().__init__()
        self.cpe = ConvPositionEncoding(dim)
        self.crpe = ConvRelativePositionEncoding(dim // num_heads, CRPE_WINDOWS)
        self.MHCA_layers = nn.ModuleList(
            EncoderBlock(dim, num_heads, mlp_ratio, drop_paths[layer], self.cpe, self.crpe)
            for layer in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, dim, height, width = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        for block in self.MHCA_layers:
            tokens = block(tokens, (height, width))
        return tokens.transpose(1, 2).reshape(batch, dim, height, width)


class InvertedResidual(nn.Module):
    """The local path: 1×1 conv-BN-Hardswish, depthwise 3×3-BN-Hardswish, 1×1 conv-BN, plus the input."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(dim, dim, act=True)
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim, bias=False)
        self.norm = nn.BatchNorm2d(dim)
        self.act = nn.Hardswish()
        self.conv2 = ConvBN(dim, dim)
        for conv in (self.conv1.conv, self.dwconv, self.conv2.conv):
            _normal_fan_out(conv, per_group=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.act(self.norm(self.dwconv(self.conv1(x)))))


class MultiPathStage(nn.Module):
    """Per path an encoder, the local path on the first embedding, and their aggregation to ``out_dim``."""

    def __init__(self, dim: int, out_dim: int, num_paths: int, num_layers: int, num_heads: int, mlp_ratio: int,
                 drop_paths: Sequence[float]) -> None:
        super().__init__()
        self.mhca_blks = nn.ModuleList(
            PathEncoder(dim, num_layers, num_heads, mlp_ratio, drop_paths) for _ in range(num_paths))
        self.InvRes = InvertedResidual(dim)
        self.aggregate = ConvBN(dim * (num_paths + 1), out_dim, act=True)

    def forward(self, paths: list[torch.Tensor]) -> torch.Tensor:
        outputs = [self.InvRes(paths[0])] + [encoder(x) for encoder, x in zip(self.mhca_blks, paths)]
        return self.aggregate(torch.cat(outputs, dim=1))


class MPViT(nn.Module):
    """MPViT of one :class:`MPViTSize`. ``num_classes=0``: headless, ``forward`` gives the pooled features.

    ``feature_info`` (timm's form) lists the four stage outputs at strides 4, 8, 16, 32 — the aggregated stage
    output, whose width is the next stage's (the official detection/segmentation backbones' channels). A stage's
    ``modules`` are its patch embeddings and its encoders, so both get the stage's layer id.
    """

    def __init__(self, size: MPViTSize, num_classes: int = 1000, drop_path_rate: float = 0.0, in_chans: int = 3,
                 global_pool: str = "avg") -> None:
        super().__init__()
        if global_pool != "avg":
            raise ConfigError(f"MPViT pools its last stage's average; it has no {global_pool!r} pooling")
        dims = size.embed_dims
        out_dims = (*dims[1:], dims[-1])
        # Drop path grows linearly over all blocks of all stages; every path of a stage uses its stage's share.
        rates = torch.linspace(0, drop_path_rate, sum(size.num_layers), device="cpu").tolist()  # also under meta
        starts = [sum(size.num_layers[:stage]) for stage in range(4)]
        self.num_classes = num_classes
        self.num_features = out_dims[-1]
        self.stem = nn.Sequential(ConvBN(in_chans, dims[0] // 2, 3, 2, act=True), ConvBN(dims[0] // 2, dims[0], 3, 2,
                                                                                             act=True))
        self.patch_embed_stages = nn.ModuleList(
            MultiScalePatchEmbedding(dims[stage], size.num_paths[stage], downsample=stage > 0) for stage in range(4))
        self.mhca_stages = nn.ModuleList(
            MultiPathStage(dims[stage], out_dims[stage], size.num_paths[stage], size.num_layers[stage],
                           size.num_heads, size.mlp_ratio,
                           rates[starts[stage]:starts[stage] + size.num_layers[stage]])
            for stage in range(4))
        # The official ``cls_head.cls`` (a module around the linear layer): here the linear layer itself, a direct
        # child as timm's heads are (see official_key).
        self.cls_head = nn.Linear(out_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [
            dict(num_chs=out_dims[stage], reduction=4 * 2 ** stage, module=f"mhca_stages.{stage}",
                 modules=(f"patch_embed_stages.{stage}", f"mhca_stages.{stage}"))
            for stage in range(4)]
        # timm's description of the input (the official release's: 224², ImageNet mean/std, crop 0.9, bicubic).
        self.pretrained_cfg = dict(input_size=(3, 224, 224), crop_pct=0.9, interpolation="bicubic",
                                   mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, classifier="cls_head")
        self.apply(self._init_linear_and_norm)

    @staticmethod
    def _init_linear_and_norm(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None,
                              intermediates_only: bool = False
                              ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """The outputs of the stages ``indices`` (timm's convention: an int takes the last n, None all four)."""
        if indices is None:
            wanted = list(range(4))
        elif isinstance(indices, int):
            wanted = list(range(4 - indices, 4))
        else:
            wanted = [index % 4 for index in indices]
        intermediates = []
        x = self.stem(x)
        for stage, (embed, encode) in enumerate(zip(self.patch_embed_stages, self.mhca_stages)):
            x = encode(embed(x))
            if stage in wanted:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for embed, encode in zip(self.patch_embed_stages, self.mhca_stages):
            x = encode(embed(x))
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return pooled if pre_logits else self.cls_head(pooled)

    def get_classifier(self) -> nn.Module:
        return self.cls_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def mpvit_builder(name: str) -> Callable[..., MPViT]:
    """A registry entry: ``num_classes``, ``drop_path_rate``, ``in_chans``; other timm options do not apply."""
    return partial(MPViT, SIZES[name])


# The official state dicts repeat a path's shared position encodings under each block, and hold the head's linear
# layer one level down (cls_head.cls).
_SHARED_COPY = re.compile(r"^(.*\.mhca_blks\.\d+\.)MHCA_layers\.\d+\.(?:factoratt_crpe\.)?(cpe|crpe)\.(.+)$")
_HEAD = re.compile(r"^cls_head\.cls\.(weight|bias)$")


def official_key(key: str) -> str | None:
    """Our key for an official key that differs from ours (a block's copy of its path's shared position encoding,
    or the head's ``cls_head.cls.*``), else None. Every other official key is ours as it is."""
    if (match := _SHARED_COPY.match(key)) is not None:
        return f"{match.group(1)}{match.group(2)}.{match.group(3)}"
    if (match := _HEAD.match(key)) is not None:
        return f"cls_head.{match.group(1)}"
    return None
