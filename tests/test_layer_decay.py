"""Layer-wise lr decay: the scale per block, no weight decay where none belongs, equal to timm's groups."""

from __future__ import annotations

import pytest
import torch.nn as nn
from timm.optim import param_groups_layer_decay

from mimbench.backbones.layer_decay import layer_decay_param_groups, vit_layer_id
from mimbench.backbones.vit import create_backbone

DECAY = 0.65


def per_parameter(groups: list[dict]) -> dict[str, tuple[float, float]]:
    model_names = {}
    for group in groups:
        for name in group["param_names"]:
            model_names[name] = (group["lr_scale"], group["weight_decay"])
    return model_names


def test_scale_per_block_and_no_decay_set():
    model = create_backbone("vit_tiny_patch4_32", num_classes=10, global_pool="avg")
    settings = per_parameter(layer_decay_param_groups(model, depth=12, weight_decay=0.05, layer_decay=DECAY))
    assert settings["patch_embed.proj.weight"] == (pytest.approx(DECAY ** 13), 0.05)
    assert settings["pos_embed"] == (pytest.approx(DECAY ** 13), 0.0)
    assert settings["cls_token"] == (pytest.approx(DECAY ** 13), 0.0)
    for index in range(12):
        assert settings[f"blocks.{index}.attn.qkv.weight"] == (pytest.approx(DECAY ** (12 - index)), 0.05)
        assert settings[f"blocks.{index}.attn.qkv.bias"][1] == 0.0
        assert settings[f"blocks.{index}.norm1.weight"][1] == 0.0
    assert settings["head.weight"] == (1.0, 0.05)
    assert settings["head.bias"] == (1.0, 0.0)
    assert settings["fc_norm.weight"] == (1.0, 0.0)
    assert set(settings) == {name for name, _ in model.named_parameters()}


def test_equal_to_timm_param_groups_except_the_final_norm():
    """timm puts the final ``norm`` one layer below the head; MAE's rule (ours) gives it the head's scale."""
    model = create_backbone("vit_tiny_patch4_32", num_classes=10)
    ours = per_parameter(layer_decay_param_groups(model, depth=12, weight_decay=0.05, layer_decay=DECAY))
    timm_groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=DECAY,
                                           no_weight_decay_list=model.no_weight_decay())
    theirs = {}
    named = {id(p): n for n, p in model.named_parameters()}
    for group in timm_groups:
        for param in group["params"]:
            theirs[named[id(param)]] = (group["lr_scale"], group["weight_decay"])
    assert ours.keys() == theirs.keys()
    for name in ours:
        if name.startswith("norm."):
            assert ours[name][0] == 1.0 and theirs[name][0] == pytest.approx(DECAY)
        else:
            assert ours[name] == pytest.approx(theirs[name]), name


def test_wrapped_backbone_is_grouped_like_a_bare_one():
    class Detector(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Module()
            self.backbone.net = create_backbone("vit_tiny_patch4_32")
            self.box_head = nn.Linear(192, 4)

    settings = per_parameter(layer_decay_param_groups(Detector(), depth=12, weight_decay=0.1, layer_decay=0.7))
    assert settings["backbone.net.blocks.3.mlp.fc1.weight"] == (pytest.approx(0.7 ** 9), 0.1)
    assert settings["backbone.net.pos_embed"] == (pytest.approx(0.7 ** 13), 0.0)
    assert settings["box_head.weight"] == (1.0, 0.1)


def test_layer_ids():
    assert vit_layer_id("cls_token", 12) == 0
    assert vit_layer_id("blocks.0.norm1.weight", 12) == 1
    assert vit_layer_id("encoder.blocks.11.mlp.fc2.bias", 12) == 12
    assert vit_layer_id("norm.weight", 12) == 13
    assert vit_layer_id("decode_head.conv_seg.weight", 12) == 13
