"""Layer-wise learning-rate decay for ViT fine-tuning, shared by every fine-tuning adapter.

Block ``i`` gets lr scale ``decay ** (depth + 1 - (i + 1))``: embeddings (layer 0) the smallest, everything
after the last block (final norm, heads, necks, detection/segmentation heads) scale 1 — BEiT/MAE's rule
(Bao et al. 2022; He et al. 2022, ``util/lr_decay.py``). Norms, biases, position embeddings and the class
token get no weight decay. Names are matched anywhere in a parameter's path, so a ViT wrapped by an adapter
(``backbone.net.blocks.3.attn.qkv.weight``) is grouped like a bare one.
"""

from __future__ import annotations

import re
from collections.abc import Collection

import torch.nn as nn

EMBEDDING_NAMES = ("cls_token", "reg_token", "dist_token", "mask_token", "pos_embed", "patch_embed", "norm_pre")
NO_WEIGHT_DECAY_NAMES = ("cls_token", "reg_token", "dist_token", "mask_token", "pos_embed")


def vit_layer_id(param_name: str, depth: int) -> int:
    """0 for the patch/position embeddings and tokens, ``i + 1`` for ``blocks.i``, ``depth + 1`` otherwise."""
    block = re.search(r"(?:^|\.)blocks\.(\d+)\.", param_name)
    if block is not None:
        return int(block.group(1)) + 1
    parts = param_name.split(".")
    if any(part in EMBEDDING_NAMES for part in parts):
        return 0
    return depth + 1


def layer_decay_param_groups(
    model: nn.Module,
    depth: int,
    weight_decay: float,
    layer_decay: float,
    no_weight_decay_names: Collection[str] = NO_WEIGHT_DECAY_NAMES,
) -> list[dict]:
    """Optimizer param groups with ``lr_scale`` (read by timm's schedulers and ours) and ``weight_decay``.

    Each group also lists its ``param_names`` so a run can log exactly what was decayed.
    """
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer_id = vit_layer_id(name, depth)
        decays = param.ndim > 1 and not any(part in no_weight_decay_names for part in name.split("."))
        group = groups.setdefault(
            (layer_id, decays),
            {
                "params": [],
                "param_names": [],
                "lr_scale": layer_decay ** (depth + 1 - layer_id),
                "weight_decay": weight_decay if decays else 0.0,
            },
        )
        group["params"].append(param)
        group["param_names"].append(name)
    return [groups[key] for key in sorted(groups)]
