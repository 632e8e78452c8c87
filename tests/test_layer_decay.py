"""Layer-wise lr decay through the backbone contract: the scale per block or stage, no weight decay where none
belongs, equal to timm's groups; a ViT's depth (the form callers used before the contract) groups identically."""

from __future__ import annotations

import pytest
import torch.nn as nn
from timm.optim import param_groups_layer_decay

from mimbench.backbones.contract import ViTLayers, backbone_contract
from mimbench.backbones.layer_decay import layer_decay_param_groups
from mimbench.backbones.vit import create_backbone

DECAY = 0.65


def per_parameter(groups: list[dict]) -> dict[str, tuple[float, float]]:
    model_names = {}
    for group in groups:
        for name in group["param_names"]:
            model_names[name] = (group["lr_scale"], group["weight_decay"])
    return model_names


def groups_as_data(groups: list[dict]) -> list[tuple[float, float, list[str]]]:
    return [(group["lr_scale"], group["weight_decay"], group["param_names"]) for group in groups]


def test_scale_per_block_and_no_decay_set():
    model = create_backbone("vit_tiny_patch4_32", num_classes=10, global_pool="avg")
    settings = per_parameter(layer_decay_param_groups(model, backbone_contract(model), 0.05, DECAY))
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
    ours = per_parameter(layer_decay_param_groups(model, backbone_contract(model), 0.05, DECAY))
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


class Detector(nn.Module):
    """A backbone wrapped as Detectron2 wraps ViTDet's (``backbone.net``), with a pyramid and a head of its own."""

    def __init__(self, arch: str = "vit_tiny_patch4_32", channels: int = 192):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.net = create_backbone(arch)
        self.backbone.simfp_2 = nn.Conv2d(channels, 96, 1)
        self.box_head = nn.Linear(channels, 4)


def test_wrapped_backbone_is_grouped_like_a_bare_one():
    detector = Detector()
    settings = per_parameter(layer_decay_param_groups(detector, backbone_contract(detector.backbone.net), 0.1, 0.7))
    assert settings["backbone.net.blocks.3.mlp.fc1.weight"] == (0.7 ** 9, 0.1)
    assert settings["backbone.net.blocks.3.attn.qkv.weight"] == (0.7 ** 9, 0.1)
    assert settings["backbone.net.blocks.3.attn.qkv.bias"] == (0.7 ** 9, 0.0)
    assert settings["backbone.net.pos_embed"] == (0.7 ** 13, 0.0)
    assert settings["backbone.simfp_2.weight"] == (1.0, 0.1) and settings["backbone.simfp_2.bias"] == (1.0, 0.0)
    assert settings["box_head.weight"] == (1.0, 0.1)
    bare = create_backbone("vit_tiny_patch4_32")
    alone = per_parameter(layer_decay_param_groups(bare, backbone_contract(bare), 0.1, 0.7))
    assert {name.removeprefix("backbone.net."): value for name, value in settings.items()
            if name.startswith("backbone.net.")} == alone


def test_a_vit_depth_groups_exactly_as_its_contract():
    """Adapters still pass ``len(vit.blocks)`` (Detectron2's ViTDet is no timm model): the same groups, in the same
    order, with the same lr scales, as through the contract."""
    detector = Detector()
    by_depth = layer_decay_param_groups(detector, 12, 0.05, DECAY)
    by_contract = layer_decay_param_groups(detector, backbone_contract(detector.backbone.net), 0.05, DECAY)
    assert groups_as_data(by_depth) == groups_as_data(by_contract)
    assert [g["lr_scale"] for g in by_depth] == [DECAY ** (13 - layer) for layer in range(14) for _ in (0, 1)]
    assert all(a is b for g, h in zip(by_depth, by_contract) for a, b in zip(g["params"], h["params"]))


def test_hierarchical_backbone_decays_by_stage():
    detector = Detector("resnet18", channels=512)
    contract = backbone_contract(detector.backbone.net)
    assert contract.num_layers == 4
    settings = per_parameter(layer_decay_param_groups(detector, contract, 0.05, DECAY))
    assert settings["backbone.net.conv1.weight"] == (DECAY ** 5, 0.05)  # the stem: layer 0
    assert settings["backbone.net.bn1.weight"] == (DECAY ** 5, 0.0)
    for stage in range(1, 5):
        assert settings[f"backbone.net.layer{stage}.0.conv1.weight"] == (DECAY ** (5 - stage), 0.05)
        assert settings[f"backbone.net.layer{stage}.0.bn1.bias"] == (DECAY ** (5 - stage), 0.0)
    assert settings["backbone.simfp_2.weight"] == (1.0, 0.05) and settings["box_head.bias"] == (1.0, 0.0)
    assert len(settings) == len(list(detector.parameters()))


def test_layer_ids():
    layers = ViTLayers(12)
    assert layers.layer_id("cls_token") == 0
    assert layers.layer_id("blocks.0.norm1.weight") == 1
    assert layers.layer_id("encoder.blocks.11.mlp.fc2.bias") == 12
    assert layers.layer_id("norm.weight") == 13
    assert layers.layer_id("decode_head.conv_seg.weight") == 13
    model = create_backbone("vit_tiny_patch4_32")
    assert all(backbone_contract(model).layer_id(name) == layers.layer_id(name) for name, _ in model.named_parameters())


def test_a_backbone_prefix_keeps_head_names_out_of_the_stem():
    """A detector's RPN has a ``conv1`` too: under a prefix only the backbone's own ``conv1`` is the stem."""
    resnet = create_backbone("resnet18")
    detector = nn.Module()
    detector.backbone = nn.Module()
    detector.backbone.net = resnet
    detector.rpn = nn.Module()
    detector.rpn.conv1 = nn.Conv2d(4, 4, 3)
    contract = backbone_contract(resnet)
    top = contract.num_layers + 1
    scales = per_parameter(layer_decay_param_groups(detector, contract, 0.05, DECAY, backbone_prefix="backbone.net."))
    assert scales["backbone.net.conv1.weight"] == (DECAY ** top, 0.05)  # the stem: layer 0
    assert scales["backbone.net.layer3.0.conv1.weight"] == (DECAY ** (top - 3), 0.05)
    assert scales["rpn.conv1.weight"] == (1.0, 0.05) and scales["rpn.conv1.bias"] == (1.0, 0.0)
    unprefixed = per_parameter(layer_decay_param_groups(detector, contract, 0.05, DECAY))
    assert unprefixed["rpn.conv1.weight"] == (DECAY ** top, 0.05)  # what the prefix is for
