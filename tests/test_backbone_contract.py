"""The backbone contract for both kinds (the tiny ViT, timm's resnet18), and resnet18 through the registry and the
loader: build, export, load back."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn

from mimbench.backbones.checkpoint import (
    CheckpointError,
    CheckpointMetadata,
    backbone_from_checkpoint,
    infer_arch,
    load_backbone,
    save_backbone,
)
from mimbench.backbones.cli import main as cli_main
from mimbench.backbones.contract import FeatureLevel, backbone_contract
from mimbench.backbones.vit import backbone_archs, count_parameters, create_backbone, dense_features

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

RESNET18 = "resnet18"


def resnet18(seed: int = 0) -> nn.Module:
    """resnet18 with every parameter and batch-norm statistic perturbed, so a swapped or default tensor shows."""
    torch.manual_seed(seed)
    model = create_backbone(RESNET18)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                tensor.add_(torch.rand_like(tensor) if name.endswith("running_var") else 0.1 * torch.randn_like(tensor))
    return model.eval()


def stage_outputs(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """resnet18's four stage outputs, computed module by module (not through timm's feature API)."""
    x = model.maxpool(model.act1(model.bn1(model.conv1(images))))
    outputs = []
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        x = stage(x)
        outputs.append(x)
    return outputs


# ------------------------------------------------------------------------------------------- the registry


def test_registry_builds_resnet18_headless_with_timms_parameter_count():
    model = create_backbone(RESNET18)
    assert isinstance(model, timm.models.ResNet) and model.arch == RESNET18
    assert RESNET18 in backbone_archs() and "vit_tiny_patch4_32" in backbone_archs()
    # timm's published 11.69M minus the 512 x 1000 + 1000 = 513,000 parameters of the ImageNet fc
    assert count_parameters(model) == 11_176_512
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 512)  # pooled, headless, at 64²
    classifier = create_backbone(RESNET18, num_classes=10)
    assert count_parameters(classifier) == 11_176_512 + 512 * 10 + 10


# ------------------------------------------------------------------------------------------- the contract


def test_vit_contract_levels_and_features():
    torch.manual_seed(0)
    model = create_backbone("vit_tiny_patch4_32").eval()
    contract = backbone_contract(model)
    assert contract.kind == "plain" and contract.num_layers == 12
    assert contract.feature_info == [FeatureLevel(f"block{i}", 192, 4) for i in (3, 5, 7, 11)]
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        maps = contract.features(images)
        expected = dense_features(model, images)
    assert [tuple(m.shape) for m in maps] == [(2, 192, 8, 8)] * 4
    assert all(torch.equal(a, b) for a, b in zip(maps, expected))


def test_resnet18_contract_levels_and_features_at_64():
    model = resnet18()
    contract = backbone_contract(model)
    assert contract.kind == "hierarchical" and contract.num_layers == 4
    assert contract.feature_info == [FeatureLevel("stage1", 64, 4), FeatureLevel("stage2", 128, 8),
                                     FeatureLevel("stage3", 256, 16), FeatureLevel("stage4", 512, 32)]
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = contract.features(images)
        expected = stage_outputs(model, images)
    assert [tuple(m.shape) for m in maps] == [(2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4), (2, 512, 2, 2)]
    for level, feature_map in zip(contract.feature_info, maps):
        assert feature_map.shape[1] == level.channels and 64 // feature_map.shape[-1] == level.stride
    assert all(torch.equal(a, b) for a, b in zip(maps, expected))


def test_layer_ids_of_both_kinds_also_when_wrapped():
    vit = backbone_contract(create_backbone("vit_tiny_patch4_32"))
    for prefix in ("", "backbone.net."):
        assert vit.layer_id(prefix + "cls_token") == 0 and vit.layer_id(prefix + "patch_embed.proj.weight") == 0
        assert vit.layer_id(prefix + "blocks.3.attn.qkv.weight") == 4
        assert vit.layer_id(prefix + "norm.weight") == 13
    assert vit.layer_id("roi_heads.box_predictor.cls_score.weight") == 13

    resnet = backbone_contract(create_backbone(RESNET18))
    for prefix in ("", "backbone.bottom_up."):
        assert resnet.layer_id(prefix + "conv1.weight") == 0 and resnet.layer_id(prefix + "bn1.bias") == 0
        for stage in range(1, 5):
            assert resnet.layer_id(f"{prefix}layer{stage}.1.conv2.weight") == stage
    assert resnet.layer_id("backbone.fpn_lateral2.weight") == 5  # a neck: after the backbone
    assert resnet.layer_id("decode_head.conv_seg.weight") == 5
    # a classifier registered after the last stage belongs to the head, not to the stem
    assert backbone_contract(create_backbone(RESNET18, num_classes=10)).layer_id("fc.weight") == 5


def test_no_weight_decay_names_of_both_kinds():
    vit = create_backbone("vit_tiny_patch4_32")
    contract = backbone_contract(vit)
    undecayed = {name for name, param in vit.named_parameters() if contract.no_weight_decay(name, param)}
    assert {"cls_token", "pos_embed", "patch_embed.proj.bias", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias",
            "norm.weight", "norm.bias"} <= undecayed
    assert not undecayed & {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.11.mlp.fc2.weight"}
    assert undecayed == {name for name, param in vit.named_parameters() if param.ndim <= 1} | {"cls_token", "pos_embed"}

    resnet = create_backbone(RESNET18)
    contract = backbone_contract(resnet)
    undecayed = {name for name, param in resnet.named_parameters() if contract.no_weight_decay(name, param)}
    assert undecayed == {name for name, _ in resnet.named_parameters() if ".bn" in f".{name}" or "downsample.1" in name}
    assert "conv1.weight" not in undecayed and "layer3.0.downsample.0.weight" not in undecayed


def test_a_model_without_a_contract_is_refused():
    with pytest.raises(TypeError, match="no backbone contract"):
        backbone_contract(nn.Linear(2, 2))


# ---------------------------------------------------------------------------- export and load round trip


def test_resnet18_export_and_load_round_trip(tmp_path):
    reference = resnet18(1)
    metadata = CheckpointMetadata(method="supervised", arch=RESNET18, epochs=1, data="digits")
    path = save_backbone(tmp_path / "resnet18.safetensors", reference, metadata)
    assert infer_arch(path) == RESNET18
    model, report = backbone_from_checkpoint(path)  # arch from the metadata
    assert model.arch == RESNET18 and report.metadata == metadata
    assert report.encoder_fraction == 1.0 and not report.missing and not report.unexpected
    assert report.resized == {}
    expected = reference.state_dict()
    assert model.state_dict().keys() == expected.keys()
    assert all(torch.equal(value, expected[key]) for key, value in model.state_dict().items())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(images), reference(images))

    # the same export into a classifier: only the new head is missing, and that is allowed
    classifier = create_backbone(RESNET18, num_classes=10)
    report = load_backbone(classifier, path)
    assert report.missing == ["fc.weight", "fc.bias"] and report.missing_encoder == []


def test_resnet18_state_dict_under_a_prefix_and_with_a_classifier(tmp_path):
    reference = resnet18(2)
    weights = {f"backbone.bottom_up.{k}": v for k, v in reference.state_dict().items()}
    weights["roi_heads.box_head.fc1.weight"] = torch.randn(4, 4)
    torch.save({"model": weights, "iteration": 10}, tmp_path / "detector.pth")
    model, report = backbone_from_checkpoint(tmp_path / "detector.pth", arch=RESNET18)
    assert report.set_aside == ["roi_heads.box_head.fc1.weight"] and report.encoder_fraction == 1.0
    assert all(torch.equal(value, reference.state_dict()[key]) for key, value in model.state_dict().items())

    torch.manual_seed(3)
    timm_classifier = timm.create_model("resnet18", pretrained=False)  # with timm's 1000-class fc
    torch.save(timm_classifier.state_dict(), tmp_path / "timm.pth")
    _, report = backbone_from_checkpoint(tmp_path / "timm.pth", arch=RESNET18)
    assert report.unexpected == ["fc.weight", "fc.bias"] and report.encoder_fraction == 1.0


def one_line_error(match: str, model: nn.Module, path) -> str:
    with pytest.raises(CheckpointError, match=match) as info:
        load_backbone(model, path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    return message


def test_resnet18_bad_checkpoints_are_one_line(tmp_path):
    weights = resnet18().state_dict()
    torch.save({k: v for k, v in weights.items() if not k.startswith("layer4.")}, tmp_path / "partial.pth")
    one_line_error(r"provides only \d+\.\d% of the resnet18 encoder; missing layer4\.", create_backbone(RESNET18),
                   tmp_path / "partial.pth")

    torch.save({**weights, "conv1.weight": torch.randn(32, 3, 7, 7)}, tmp_path / "narrow.pth")
    message = one_line_error(r"another architecture than resnet18: conv1.weight is \[32, 3, 7, 7\] in the file, "
                             r"\[64, 3, 7, 7\] in the model$", create_backbone(RESNET18), tmp_path / "narrow.pth")
    assert "embed_dim" not in message  # the ViT shape summary is for ViTs only

    torch.save(create_backbone("vit_tiny_patch4_32").state_dict(), tmp_path / "vit.pth")
    one_line_error("no weights of this backbone found", create_backbone(RESNET18), tmp_path / "vit.pth")
    save_backbone(tmp_path / "resnet.safetensors", weights, CheckpointMetadata("supervised", RESNET18))
    one_line_error("no ViT encoder weights", create_backbone("vit_tiny_patch4_32"), tmp_path / "resnet.safetensors")


def test_cli_inspects_a_resnet18_export(tmp_path, capsys):
    path = save_backbone(tmp_path / "r18.safetensors", resnet18(), CheckpointMetadata("supervised", RESNET18))
    assert cli_main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "loaded 120 tensors, 100.0% of encoder weights" in out and "arch=resnet18" in out  # 60 + BN statistics
