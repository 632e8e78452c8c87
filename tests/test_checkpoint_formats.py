"""Every supported checkpoint layout, written from a timm ViT, loads to outputs equal to timm's (1e-5); full
pretraining checkpoints (official MAE, the RC-MAE release, ours) load into our pretraining models, every key used.

The writers below lay the weights out the way each public codebase saves them (key names and containers
taken from their save code); they are written independently of the loader's own renaming.
"""

from __future__ import annotations

import argparse
import re

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

from mimbench.backbones.checkpoint import (
    CheckpointError,
    CheckpointMetadata,
    backbone_from_checkpoint,
    load_backbone,
    load_pretraining_checkpoint,
    save_backbone,
)
from mimbench.backbones.vit import create_backbone
from mimbench.pretrain.mae import MAEConfig, MaskedAutoencoder
from mimbench.pretrain.rcmae import RCMAEConfig, ReconstructionConsistentMAE

TINY = "vit_tiny_patch4_32"


def timm_vit(seed: int, **kwargs) -> torch.nn.Module:
    """timm's own ViT-Ti at 32x32 / patch 4 with every parameter perturbed (so swapped norms would show)."""
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, **kwargs)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


def decoder_weights(width: int = 128) -> dict[str, torch.Tensor]:
    """A stand-in MAE decoder, as official MAE stores it beside the encoder."""
    weights = {
        "mask_token": torch.randn(1, 1, width),
        "decoder_embed.weight": torch.randn(width, 192),
        "decoder_embed.bias": torch.randn(width),
        "decoder_pos_embed": torch.randn(1, 65, width),
        "decoder_norm.weight": torch.randn(width),
        "decoder_norm.bias": torch.randn(width),
        "decoder_pred.weight": torch.randn(48, width),
        "decoder_pred.bias": torch.randn(48),
    }
    weights["decoder_blocks.0.attn.qkv.weight"] = torch.randn(3 * width, width)
    return weights


def assert_same_outputs(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.eval().forward_features(images), reference.forward_features(images),
                                   atol=1e-5, rtol=0)


def encoder_only(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}


def to_openmmlab(weights: dict[str, torch.Tensor], attention: str) -> dict[str, torch.Tensor]:
    """timm names -> MMPretrain (``attention='qkv'``) or mmseg (``'in_proj'``, nn.MultiheadAttention) names."""
    out = {}
    for key, value in weights.items():
        block = re.match(r"blocks\.(\d+)\.(.+)", key)
        if block is None:
            key = {"norm.weight": "ln1.weight", "norm.bias": "ln1.bias"}.get(key, key)
            out[key.replace("patch_embed.proj.", "patch_embed.projection.")] = value
            continue
        index, rest = block.groups()
        rest = {
            "norm1.weight": "ln1.weight", "norm1.bias": "ln1.bias",
            "norm2.weight": "ln2.weight", "norm2.bias": "ln2.bias",
            "mlp.fc1.weight": "ffn.layers.0.0.weight", "mlp.fc1.bias": "ffn.layers.0.0.bias",
            "mlp.fc2.weight": "ffn.layers.1.weight", "mlp.fc2.bias": "ffn.layers.1.bias",
            "ls1.gamma": "attn.gamma1.weight", "ls2.gamma": "ffn.gamma2.weight",
        }.get(rest, rest)
        if attention == "in_proj":
            rest = {
                "attn.qkv.weight": "attn.attn.in_proj_weight", "attn.qkv.bias": "attn.attn.in_proj_bias",
                "attn.proj.weight": "attn.attn.out_proj.weight", "attn.proj.bias": "attn.attn.out_proj.bias",
            }.get(rest, rest)
        out[f"layers.{index}.{rest}"] = value
    return out


def prefixed(prefix: str, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in weights.items()}


def test_own_safetensors_with_metadata(tmp_path):
    reference = timm_vit(0, num_classes=0)
    metadata = CheckpointMetadata(method="mae", arch=TINY, epochs=300, data="imagenet-1k", git_commit="abc1234",
                                  extra={"gpu_days": 0.5})
    path = save_backbone(tmp_path / "mae.safetensors", reference, metadata)
    model, report = backbone_from_checkpoint(path)  # arch from metadata
    assert report.metadata == metadata
    assert report.encoder_fraction == 1.0 and not report.missing and not report.unexpected
    assert_same_outputs(model, reference)
    assert set(load_file(path)) == set(reference.state_dict())  # plain safetensors, readable by anyone


def test_own_torch_file_and_plain_timm_state_dict(tmp_path):
    reference = timm_vit(1)  # with timm's 1000-class head
    torch.save(reference.state_dict(), tmp_path / "timm.pth")
    model, report = backbone_from_checkpoint(tmp_path / "timm.pth")  # arch inferred from shapes
    assert model.arch == TINY
    assert report.unexpected == ["head.weight", "head.bias"]  # our backbone is headless
    assert_same_outputs(model, reference)

    classifier = create_backbone(TINY, num_classes=1000)
    load_backbone(classifier, tmp_path / "timm.pth")
    torch.testing.assert_close(classifier.head.weight, reference.head.weight)


def test_official_mae_training_checkpoint(tmp_path):
    reference = timm_vit(2, num_classes=0)
    model_weights = {**encoder_only(reference), **decoder_weights()}
    torch.save({
        "model": model_weights,
        "optimizer": {"state": {}, "param_groups": [{"lr": 1.5e-4, "weight_decay": 0.05, "params": [0]}]},
        "epoch": 399,
        "scaler": {"scale": 65536.0, "growth_factor": 2.0},
        "args": argparse.Namespace(model="mae_vit_base_patch16", mask_ratio=0.75, norm_pix_loss=True),
    }, tmp_path / "checkpoint-399.pth")
    model, report = backbone_from_checkpoint(tmp_path / "checkpoint-399.pth")
    assert_same_outputs(model, reference)
    assert "mask_token" in report.set_aside and "decoder_pred.weight" in report.set_aside
    assert report.encoder_fraction == 1.0


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_rcmae_teacher_by_default(tmp_path, which):
    student, teacher = timm_vit(3, num_classes=0), timm_vit(4, num_classes=0)
    student_weights = {**encoder_only(student), **decoder_weights()}
    teacher_weights = {**encoder_only(teacher), **decoder_weights()}
    torch.save({
        "student": prefixed("module.", student_weights),  # DDP-wrapped student
        "teacher": teacher_weights,
        "student_without_ddp": student_weights,
        "teacher_without_ddp": teacher_weights,
        "epoch": 1599,
        "args": argparse.Namespace(ema_op="per_iter", tau=0.996),
    }, tmp_path / "rc_mae.pth")
    kwargs = {} if which == "teacher" else {"which": "student"}
    model, report = backbone_from_checkpoint(tmp_path / "rc_mae.pth", **kwargs)
    assert_same_outputs(model, teacher if which == "teacher" else student)
    assert which in report.source_format


def test_mmpretrain_classifier_with_layer_scale(tmp_path):
    reference = timm_vit(5, num_classes=0, init_values=0.1)
    state_dict = prefixed("backbone.", to_openmmlab(encoder_only(reference), attention="qkv"))
    state_dict["head.layers.head.weight"] = torch.randn(1000, 192)
    torch.save({"meta": {"mmpretrain_version": "1.2.0", "epoch": 300}, "state_dict": state_dict},
               tmp_path / "mmpretrain.pth")
    model = create_backbone(TINY, init_values=0.1)
    report = load_backbone(model, tmp_path / "mmpretrain.pth")
    assert "OpenMMLab" in report.source_format and "head.layers.head.weight" in report.set_aside
    assert_same_outputs(model, reference)


def test_mmseg_segmentor_checkpoint(tmp_path):
    reference = timm_vit(6, num_classes=0)
    state_dict = prefixed("backbone.", to_openmmlab(encoder_only(reference), attention="in_proj"))
    state_dict["decode_head.conv_seg.weight"] = torch.randn(150, 512, 1, 1)
    state_dict["auxiliary_head.conv_seg.weight"] = torch.randn(150, 256, 1, 1)
    torch.save({"meta": {"CLASSES": ["wall"]}, "state_dict": state_dict}, tmp_path / "upernet.pth")
    model, report = backbone_from_checkpoint(tmp_path / "upernet.pth")
    assert_same_outputs(model, reference)
    assert "decode_head.conv_seg.weight" in report.set_aside


def test_dino_checkpoint_teacher_and_ddp_student(tmp_path):
    student, teacher = timm_vit(7, num_classes=0), timm_vit(8, num_classes=0)
    head = {"head.mlp.0.weight": torch.randn(2048, 192), "head.last_layer.weight_v": torch.randn(65536, 256)}
    torch.save({
        "student": prefixed("module.", {**prefixed("backbone.", encoder_only(student)), **head}),
        "teacher": {**prefixed("backbone.", encoder_only(teacher)), **head},
        "optimizer": {"state": {}, "param_groups": [{"lr": np.float64(5e-4), "params": [0]}]},
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_tiny", patch_size=4),
        "dino_loss": {"center": torch.zeros(1, 65536)},
    }, tmp_path / "dino.pth")
    teacher_model, report = backbone_from_checkpoint(tmp_path / "dino.pth")
    assert_same_outputs(teacher_model, teacher)
    assert "head.mlp.0.weight" in report.set_aside
    student_model, _ = backbone_from_checkpoint(tmp_path / "dino.pth", which="student")
    assert_same_outputs(student_model, student)


def test_ibot_with_layer_scale_and_masked_embed(tmp_path):
    reference = timm_vit(9, num_classes=0, init_values=0.1)
    weights = {re.sub(r"\.ls([12])\.gamma$", r".gamma_\1", k): v for k, v in encoder_only(reference).items()}
    torch.save({
        "student": prefixed("module.backbone.", {**weights, "masked_embed": torch.randn(1, 192)}),
        "teacher": prefixed("backbone.", weights),
        "ibot_loss": {"center": torch.zeros(1, 8192)},
    }, tmp_path / "ibot.pth")
    model = create_backbone(TINY, init_values=0.1)
    load_backbone(model, tmp_path / "ibot.pth")
    assert_same_outputs(model, reference)
    student = create_backbone(TINY, init_values=0.1)
    report = load_backbone(student, tmp_path / "ibot.pth", which="student")
    assert "masked_embed" in report.set_aside


def test_vit_base_from_official_mae_release(tmp_path):
    """The paper's ViT-B/16 in the official release layout (``{'model': encoder}``)."""
    torch.manual_seed(10)
    reference = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).eval()
    torch.save({"model": reference.state_dict()}, tmp_path / "mae_pretrain_vit_base.pth")
    model, report = backbone_from_checkpoint(tmp_path / "mae_pretrain_vit_base.pth")
    assert model.arch == "vit_base_patch16_224" and report.encoder_fraction == 1.0
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), reference(images), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------- full pretraining checkpoints

# A tiny MAE: vit_tiny_patch4_32 with a 2-block, 128-wide, 4-head decoder.
TINY_MAE = dict(arch=TINY, decoder_dim=128, decoder_depth=2, decoder_heads=4)


def full_decoder_weights(width: int = 128, depth: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """MAE's decoder as models_mae.py names it (timm 0.3.2 blocks), every tensor random; decoder_pos_embed too, so
    a loader that recomputed it instead of reading it would show."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {"mask_token": (1, 1, width), "decoder_embed.weight": (width, 192), "decoder_embed.bias": (width,),
              "decoder_pos_embed": (1, 65, width)}
    for i in range(depth):
        for name, shape in (("norm1.weight", (width,)), ("norm1.bias", (width,)),
                            ("attn.qkv.weight", (3 * width, width)), ("attn.qkv.bias", (3 * width,)),
                            ("attn.proj.weight", (width, width)), ("attn.proj.bias", (width,)),
                            ("norm2.weight", (width,)), ("norm2.bias", (width,)),
                            ("mlp.fc1.weight", (4 * width, width)), ("mlp.fc1.bias", (4 * width,)),
                            ("mlp.fc2.weight", (width, 4 * width)), ("mlp.fc2.bias", (width,))):
            shapes[f"decoder_blocks.{i}.{name}"] = shape
    shapes.update({"decoder_norm.weight": (width,), "decoder_norm.bias": (width,),
                   "decoder_pred.weight": (48, width), "decoder_pred.bias": (48,)})
    return {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}


def official_full(seed: int) -> dict[str, torch.Tensor]:
    """One official MAE model's state dict: the encoder's keys at the top level (timm's names), the decoder's beside."""
    return {**encoder_only(timm_vit(seed, num_classes=0)), **full_decoder_weights(seed=seed)}


def assert_holds(model: torch.nn.Module, weights: dict[str, torch.Tensor], prefix: str = "") -> None:
    """``model``'s tensors under ``prefix`` are exactly ``weights``: MAE's encoder keys under ``encoder.``."""
    ours = {k.removeprefix(prefix): v for k, v in model.state_dict().items() if k.startswith(prefix)}
    encoder_roots = ("cls_token", "pos_embed", "patch_embed", "blocks", "norm")
    theirs = {("encoder." + k if k.split(".")[0] in encoder_roots else k): v for k, v in weights.items()}
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key


def test_official_mae_full_checkpoint_loads_every_key(tmp_path):
    weights = official_full(10)
    torch.save({"model": weights, "optimizer": {"state": {}, "param_groups": []}, "epoch": 1599,
                "scaler": {"scale": 65536.0}, "args": argparse.Namespace(model="mae_vit_base_patch16")},
               tmp_path / "mae_pretrain_vit_tiny_full.pth")
    model = MaskedAutoencoder(MAEConfig(**TINY_MAE))
    report = load_pretraining_checkpoint(model, tmp_path / "mae_pretrain_vit_tiny_full.pth")
    assert_holds(model, weights)
    assert torch.equal(model.decoder_pos_embed, weights["decoder_pos_embed"])  # read, not recomputed
    assert len(report.loaded) == len(weights) == len(model.state_dict()) and not report.missing
    assert "full checkpoint" in report.source_format and "'model'" in report.source_format


def test_rcmae_release_checkpoint_loads_student_and_teacher(tmp_path):
    """run_pretrain.py's save_model_distill: ``student`` (DDP-wrapped), ``teacher``, and both without DDP."""
    student, teacher = official_full(11), official_full(12)
    torch.save({"student": prefixed("module.", student), "teacher": teacher, "student_without_ddp": student,
                "teacher_without_ddp": teacher, "optimizer": {"state": {}, "param_groups": []}, "epoch": 1599,
                "args": argparse.Namespace(model="rc_vit_base_patch16")}, tmp_path / "rc_mae.pth")
    model = ReconstructionConsistentMAE(RCMAEConfig(**TINY_MAE))
    report = load_pretraining_checkpoint(model, tmp_path / "rc_mae.pth")
    assert_holds(model, student, "student.")
    assert_holds(model, teacher, "teacher.")
    assert len(report.loaded) == len(model.state_dict()) == 2 * len(student)
    for which, expected in (("teacher", teacher), ("student", student)):  # a plain MAE takes one of them
        mae = MaskedAutoencoder(MAEConfig(**TINY_MAE))
        load_pretraining_checkpoint(mae, tmp_path / "rc_mae.pth", which=which)
        assert_holds(mae, expected)


def test_one_autoencoder_starts_both_halves_of_rcmae(tmp_path):
    """As RC-MAE's teacher starts as a copy of its student."""
    weights = official_full(13)
    torch.save({"model": weights}, tmp_path / "mae_full.pth")
    model = ReconstructionConsistentMAE(RCMAEConfig(**TINY_MAE))
    load_pretraining_checkpoint(model, tmp_path / "mae_full.pth")
    assert_holds(model, weights, "student.")
    assert_holds(model, weights, "teacher.")


def test_our_training_state_round_trips(tmp_path):
    torch.manual_seed(0)
    source = ReconstructionConsistentMAE(RCMAEConfig(**TINY_MAE))
    with torch.no_grad():
        for param in source.parameters():
            param.add_(torch.randn_like(param))
    torch.save({"model": source.state_dict(), "optimizer": {"state": {}, "param_groups": []}, "step": 20},
               tmp_path / "step_00000020.pth")
    model = ReconstructionConsistentMAE(RCMAEConfig(**TINY_MAE))
    load_pretraining_checkpoint(model, tmp_path / "step_00000020.pth")
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.parametrize("change, problem", [
    ("encoder only", "holds no decoder (no mask_token): an encoder-only checkpoint"),
    ("another decoder width", "mask_token is [1, 1, 64] in the file, [1, 1, 128] in the model (another"),
    ("a tensor left out", "does not fit this MaskedAutoencoder: missing decoder_blocks.1.mlp.fc2.bias"),
    ("an extra tensor", "does not fit this MaskedAutoencoder: not in the model decoder_blocks.2.norm1.weight"),
])
def test_a_full_checkpoint_that_does_not_fit_is_one_error(tmp_path, change, problem):
    weights = official_full(14)
    if change == "encoder only":
        weights = encoder_only(timm_vit(14, num_classes=0))
    elif change == "another decoder width":
        weights = {**encoder_only(timm_vit(14, num_classes=0)), **full_decoder_weights(width=64)}
    elif change == "a tensor left out":
        del weights["decoder_blocks.1.mlp.fc2.bias"]
    else:
        weights["decoder_blocks.2.norm1.weight"] = torch.ones(128)
    torch.save({"model": weights}, tmp_path / "full.pth")
    model = MaskedAutoencoder(MAEConfig(**TINY_MAE))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'full.pth'}: {problem}")):
        load_pretraining_checkpoint(model, tmp_path / "full.pth")
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())  # nothing half-loaded
