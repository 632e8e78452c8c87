"""Layer-wise learning-rate decay through the backbone contract, shared by every fine-tuning adapter.

Layer ``l`` of ``L`` gets lr scale ``decay ** (L + 1 - l)``: the stem or embeddings (layer 0) the smallest, ViT
block ``i`` (layer ``i + 1``) or hierarchical stage ``k`` (layer ``k + 1``) in between, everything after the backbone
(final norm, necks, detection/segmentation heads) scale 1 — BEiT/MAE's rule (Bao et al. 2022; He et al. 2022,
``util/lr_decay.py``). The contract also names the parameters without weight decay: norms, biases and, for a ViT,
position embeddings and tokens. A backbone wrapped by an adapter is named by its prefix (``backbone.net.``): the
parameters under it are grouped by the contract, all others (pyramid, heads) are the top layer; without a prefix
the contract matches names anywhere in a path (``backbone.net.blocks.3.attn.qkv.weight`` as ``blocks.3...``).
"""

from __future__ import annotations

import torch.nn as nn

from mimbench.backbones.contract import LayerRules, ViTLayers


def layer_decay_param_groups(
    model: nn.Module, contract: LayerRules | int, weight_decay: float, layer_decay: float,
    backbone_prefix: str | None = None,
) -> list[dict]:
    """Optimizer param groups of ``model``'s trainable parameters with ``lr_scale`` (read by timm's schedulers and
    ours) and ``weight_decay``.

    ``model`` is the module whose parameters are grouped: the backbone itself, or a detector or segmentor wrapping
    it. ``contract`` is the backbone's (``backbone_contract(backbone)``, or any :class:`LayerRules` derived from
    it); a ViT's depth (an int) is accepted too and stands for :class:`ViTLayers` of that depth.
    ``backbone_prefix`` names the backbone's parameters inside ``model`` (see the module docstring). Each group
    also lists its ``param_names`` so a run can log exactly what was decayed.
    """
    rules = ViTLayers(contract) if isinstance(contract, int) else contract
    top = rules.num_layers + 1
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if backbone_prefix is None:
            layer_id = rules.layer_id(name)
        else:
            layer_id = rules.layer_id(name.removeprefix(backbone_prefix)) if name.startswith(backbone_prefix) else top
        decays = not rules.no_weight_decay(name, param)
        group = groups.setdefault(
            (layer_id, decays),
            {
                "params": [],
                "param_names": [],
                "lr_scale": layer_decay ** (top - layer_id),
                "weight_decay": weight_decay if decays else 0.0,
            },
        )
        group["params"].append(param)
        group["param_names"].append(name)
    return [groups[key] for key in sorted(groups)]
