"""The backbone contract: what every downstream adapter may ask of a backbone, whatever its family.

- ``feature_info``: the output levels, each with a name, channels and stride;
- ``features(images)``: one (B, C, H/stride, W/stride) map per level;
- ``layer_id(name)`` and ``num_layers``: a layer index per parameter for layer-wise lr decay (0 the stem or
  embeddings, ``num_layers + 1`` everything after the backbone: necks and heads); names are matched anywhere in
  a parameter's path, so a backbone wrapped by an adapter (``backbone.net.blocks.3.attn.qkv.weight``) is grouped
  like a bare one;
- ``no_weight_decay(name, param)``: the parameters that get no weight decay.

Two kinds exist. A **plain** backbone (the ViT) has one stride-``patch`` map; its levels are the outputs of four
blocks at that stride, and an adapter builds a simple feature pyramid from them (ViTDet's protocol; MAE's
UperNet). A **hierarchical** backbone (MPViT, ResNet, ...) has four stages at strides 4, 8, 16, 32 and feeds an
FPN or UperNet directly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

# Names of ViT parameters that sit before the first block (layer 0) and those that get no weight decay.
VIT_EMBEDDING_NAMES = ("cls_token", "reg_token", "dist_token", "mask_token", "pos_embed", "patch_embed", "norm_pre")
VIT_NO_WEIGHT_DECAY_NAMES = ("cls_token", "reg_token", "dist_token", "mask_token", "pos_embed")
# Blocks (0-based) whose outputs feed a feature pyramid, as in the MAE/BEiT UperNet configs
# (ViT-B: 4, 6, 8, 12 counted from 1; ViT-L: 8, 12, 16, 24).
FEATURE_BLOCKS_BY_DEPTH: dict[int, tuple[int, ...]] = {12: (3, 5, 7, 11), 24: (7, 11, 15, 23)}


@dataclass(frozen=True)
class FeatureLevel:
    name: str
    channels: int
    stride: int


def default_feature_blocks(depth: int) -> tuple[int, ...]:
    """Four blocks for a feature pyramid: the protocol's choice where one exists, else every quarter of depth."""
    if depth in FEATURE_BLOCKS_BY_DEPTH:
        return FEATURE_BLOCKS_BY_DEPTH[depth]
    quarter = depth // 4
    return tuple(quarter * (i + 1) - 1 for i in range(4))


class LayerRules(Protocol):
    """What layer-wise lr decay reads from a contract (or from an adapter's view of one, e.g. its own prefix)."""

    num_layers: int

    def layer_id(self, param_name: str) -> int: ...

    def no_weight_decay(self, param_name: str, param: torch.Tensor) -> bool: ...


class BackboneContract:
    """The contract of one model; get it with :func:`backbone_contract`."""

    kind: str  # "plain" | "hierarchical"
    num_layers: int

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @property
    def feature_info(self) -> list[FeatureLevel]:
        raise NotImplementedError

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def layer_id(self, param_name: str) -> int:
        raise NotImplementedError

    def no_weight_decay(self, param_name: str, param: torch.Tensor) -> bool:
        """Norms, biases (every tensor of one dim) and the family's named tensors are not decayed."""
        return param.ndim <= 1


class ViTLayers:
    """A ViT's per-parameter rules (layer ids, no weight decay), which need only its depth: they also group a ViT
    that is not timm's but names its parameters alike (Detectron2's ViTDet: ``blocks.i``, ``pos_embed``)."""

    def __init__(self, depth: int) -> None:
        self.num_layers = depth

    def layer_id(self, param_name: str) -> int:
        """0 for the patch/position embeddings and tokens, ``i + 1`` for ``blocks.i``, ``depth + 1`` otherwise
        (BEiT/MAE's rule, MAE ``util/lr_decay.py``)."""
        block = re.search(r"(?:^|\.)blocks\.(\d+)\.", param_name)
        if block is not None:
            return int(block.group(1)) + 1
        if any(part in VIT_EMBEDDING_NAMES for part in param_name.split(".")):
            return 0
        return self.num_layers + 1

    def no_weight_decay(self, param_name: str, param: torch.Tensor) -> bool:
        return param.ndim <= 1 or any(part in VIT_NO_WEIGHT_DECAY_NAMES for part in param_name.split("."))


class ViTContract(ViTLayers, BackboneContract):
    kind = "plain"

    def __init__(self, model: VisionTransformer, blocks: tuple[int, ...] | None = None) -> None:
        BackboneContract.__init__(self, model)
        ViTLayers.__init__(self, len(model.blocks))
        self.blocks = tuple(blocks) if blocks is not None else default_feature_blocks(self.num_layers)

    @property
    def feature_info(self) -> list[FeatureLevel]:
        stride = self.model.patch_embed.patch_size[0]
        return [FeatureLevel(f"block{index}", self.model.embed_dim, stride) for index in self.blocks]

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Patch-token maps after each feature block (timm's ``forward_intermediates``)."""
        return self.model.forward_intermediates(images, indices=list(self.blocks), norm=False, output_fmt="NCHW",
                                                intermediates_only=True)


class HierarchicalContract(BackboneContract):
    """A backbone with timm's ``feature_info`` (ResNet, ConvNeXt, MPViT, ...): its stages at strides 4-32, a layer id
    per stage (the stem 0, stage k k+1, anything after the last stage ``num_layers + 1``).

    A level's ``module`` names its stage; a level may also carry ``modules``, every module of that stage, where a
    stage is registered in parts (MPViT's ``patch_embed_stages.k`` and ``mhca_stages.k``)."""

    kind = "hierarchical"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        info = [level for level in model.feature_info if level["reduction"] >= 4]
        self.levels = info[-4:]
        self.num_layers = len(self.levels)
        self._stage_modules = [tuple(level.get("modules", (level["module"],))) for level in self.levels]
        # Backbone parameters outside the stages, by registration order: before the last stage's end the stem
        # (layer 0), after it a head or final norm (num_layers + 1). Stage parameters are matched first.
        names = [name for name, _ in model.named_parameters()]
        last_stage_end = max(i for i, name in enumerate(names)
                             if any(name.startswith(module + ".") for module in self._stage_modules[-1]))
        self._outside_stages = {name: 0 if i < last_stage_end else self.num_layers + 1 for i, name in enumerate(names)}

    @property
    def feature_info(self) -> list[FeatureLevel]:
        return [FeatureLevel(f"stage{k + 1}", level["num_chs"], level["reduction"]) for k, level in
                enumerate(self.levels)]

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        indices = [self.model.feature_info.index(level) for level in self.levels]
        return self.model.forward_intermediates(images, indices=indices, intermediates_only=True)

    def layer_id(self, param_name: str) -> int:
        for stage, modules in enumerate(self._stage_modules):
            if any(re.search(rf"(?:^|\.){re.escape(module)}\.", param_name) for module in modules):
                return stage + 1
        # The longest dotted suffix that names a backbone parameter (the name may be wrapped by an adapter).
        suffixes = (param_name[m.end():] for m in re.finditer(r"(?:^|\.)", param_name))
        own = next((suffix for suffix in suffixes if suffix in self._outside_stages), None)
        return self.num_layers + 1 if own is None else self._outside_stages[own]  # None: a neck or a head


def backbone_contract(model: nn.Module) -> BackboneContract:
    """The contract of ``model``: a timm ViT is plain, a model with timm's ``feature_info`` stages hierarchical."""
    if isinstance(model, VisionTransformer):
        return ViTContract(model)
    if isinstance(getattr(model, "feature_info", None), list):
        return HierarchicalContract(model)
    raise TypeError(f"{type(model).__name__} has no backbone contract (neither a timm ViT nor timm feature_info)")
