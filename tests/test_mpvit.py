"""MPViT (backbones/mpvit.py): the published sizes' parameter counts and GFLOPs, the levels of its contract, the
attention against its formula, layer ids per stage, and official checkpoint layouts through the loader."""

from __future__ import annotations

import argparse
import re

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from mimbench.backbones.checkpoint import (
    CheckpointError,
    CheckpointMetadata,
    backbone_from_checkpoint,
    infer_arch,
    load_backbone,
    save_backbone,
)
from mimbench.backbones.contract import FeatureLevel, backbone_contract
from mimbench.backbones.layer_decay import layer_decay_param_groups
from mimbench.backbones.mpvit import CRPE_WINDOWS, MPViT, official_key
from mimbench.backbones.vit import backbone_archs, count_parameters, create_backbone

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

NANO = "mpvit_nano_cpu"
# The official models' parameter counts with the 1000-class head (their model docstrings, and the paper's Table 1
# rounded: 5.8M, 10.5M, 22.8M, 74.8M), and fvcore's GFLOPs at 224² (the same docstrings: 1.65, 2.97, 4.80, 16.45;
# the paper rounds to 1.6, 2.9, 4.7, 16.4). torch's counter skips what fvcore adds for norms, hence the 3%.
PUBLISHED = {
    "mpvit_tiny": (5_843_736, 1.654),
    "mpvit_xsmall": (10_573_448, 2.971),
    "mpvit_small": (22_892_400, 4.800),
    "mpvit_base": (74_845_976, 16.445),
}


def perturbed(arch: str = NANO, seed: int = 0, **kwargs) -> nn.Module:
    """An MPViT with every parameter and batch-norm statistic perturbed, so a swapped or default tensor shows."""
    torch.manual_seed(seed)
    model = create_backbone(arch, **kwargs)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                tensor.add_(torch.rand_like(tensor) if name.endswith("running_var") else 0.1 * torch.randn_like(tensor))
    return model.eval()


@pytest.mark.parametrize("arch", sorted(PUBLISHED))
def test_published_sizes_have_the_official_parameter_counts_and_gflops(arch):
    params, gflops = PUBLISHED[arch]
    with torch.device("meta"):
        model = create_backbone(arch, num_classes=1000)
        with FlopCounterMode(display=False) as counter:
            model(torch.empty(1, 3, 224, 224))
    assert arch in backbone_archs() and model.arch == arch
    assert count_parameters(model) == params
    assert counter.get_total_flops() / 2 / 1e9 == pytest.approx(gflops, rel=0.03)


def test_nano_levels_strides_and_features_at_64():
    model = perturbed()
    contract = backbone_contract(model)
    assert contract.kind == "hierarchical" and contract.num_layers == 4
    assert contract.feature_info == [FeatureLevel("stage1", 48, 4), FeatureLevel("stage2", 64, 8),
                                     FeatureLevel("stage3", 64, 16), FeatureLevel("stage4", 64, 32)]
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = contract.features(images)
        last = model.forward_features(images)
        pooled = model(images)
    assert [tuple(m.shape) for m in maps] == [(2, 48, 16, 16), (2, 64, 8, 8), (2, 64, 4, 4), (2, 64, 2, 2)]
    assert torch.equal(maps[-1], last)
    assert torch.allclose(pooled, last.mean(dim=(2, 3)), atol=1e-6)  # headless: the global average pool
    assert create_backbone("mpvit_small").feature_info[0]["num_chs"] == 128  # the official detectron2 widths


def test_factorised_attention_equals_its_formula():
    model = perturbed()
    encoder = model.mhca_stages[1].mhca_blks[0]
    attention = encoder.MHCA_layers[0].factoratt_crpe
    tokens, size = torch.randn(2, 16, 48), (4, 4)
    q, k, v = attention.qkv(tokens).reshape(2, 16, 3, 8, 6).permute(2, 0, 3, 1, 4)
    factorised = torch.einsum("bhnk,bhnv->bhkv", k.softmax(dim=2), v)
    image = v.permute(0, 1, 3, 2).reshape(2, 48, 4, 4)  # heads' channels in head order
    convolved, start = [], 0
    for conv, (window, heads) in zip(encoder.crpe.conv_list, CRPE_WINDOWS.items()):
        assert conv.kernel_size == (window, window)
        convolved.append(conv(image[:, start:start + heads * 6]))
        start += heads * 6
    crpe = q * torch.cat(convolved, 1).reshape(2, 8, 6, 16).transpose(2, 3)
    expected = (6 ** -0.5) * torch.einsum("bhnk,bhkv->bhnv", q, factorised) + crpe
    expected = attention.proj(expected.transpose(1, 2).reshape(2, 16, 48))
    with torch.no_grad():
        assert torch.allclose(attention(tokens, size), expected, atol=1e-5)


def test_layer_ids_per_stage_and_weight_decay_as_the_official_recipe():
    model = create_backbone("mpvit_tiny", num_classes=1000)
    contract = backbone_contract(model)
    ids = {name: contract.layer_id(name) for name, _ in model.named_parameters()}
    assert ids["stem.0.conv.weight"] == 0 and ids["stem.1.bn.bias"] == 0
    for stage in range(4):
        assert ids[f"patch_embed_stages.{stage}.patch_embeds.0.patch_conv.dwconv.weight"] == stage + 1
        assert ids[f"mhca_stages.{stage}.aggregate.conv.weight"] == stage + 1
    assert ids["cls_head.weight"] == 5
    assert contract.layer_id("backbone.bottom_up.mhca_stages.2.InvRes.dwconv.weight") == 3  # wrapped
    # timm's create_optimizer (the official main.py): no decay for 1-d tensors (norms, biases), decay elsewhere
    decayed = {name for name, p in model.named_parameters() if not contract.no_weight_decay(name, p)}
    assert "mhca_stages.0.mhca_blks.0.cpe.proj.weight" in decayed
    assert "mhca_stages.0.mhca_blks.0.cpe.proj.bias" not in decayed
    assert "mhca_stages.0.mhca_blks.0.MHCA_layers.0.norm1.weight" not in decayed


def test_drop_path_grows_linearly_over_all_blocks():
    model = create_backbone("mpvit_tiny", drop_path_rate=0.7)  # 8 blocks: 0.0, 0.1, ..., 0.7
    rates = [[round(getattr(block.drop_path, "drop_prob", 0.0), 6) for block in stage.mhca_blks[-1].MHCA_layers]
             for stage in model.mhca_stages]
    assert rates == [[0.0], [0.1, 0.2], [0.3, 0.4, 0.5, 0.6], [0.7]]


# ------------------------------------------------------------------------------------ official checkpoints


def official_state_dict(model: MPViT) -> dict[str, torch.Tensor]:
    """The official key layout, built from ours: the same names but the head's (``cls_head.cls.*``), plus every
    block's copies of its path's shared position encodings (``MHCA_layers.L.cpe``, ``MHCA_layers.L.crpe``,
    ``MHCA_layers.L.factoratt_crpe.crpe``)."""
    state = {re.sub(r"^cls_head\.", "cls_head.cls.", k): v.clone() for k, v in model.state_dict().items()}
    copies = {}
    for key, value in state.items():
        path = key.split(".mhca_blks.")
        if len(path) == 2 and path[1].split(".")[1] in ("cpe", "crpe"):
            encoder, module = f"{path[0]}.mhca_blks.{path[1].split('.')[0]}", ".".join(path[1].split(".")[1:])
            layers = len(model.get_submodule(f"{encoder}.MHCA_layers"))
            for layer in range(layers):
                copies[f"{encoder}.MHCA_layers.{layer}.{module}"] = value.clone()
                if module.startswith("crpe."):
                    copies[f"{encoder}.MHCA_layers.{layer}.factoratt_crpe.{module}"] = value.clone()
    assert all(official_key(key) in state for key in copies)
    return {**state, **copies}


def test_classification_release_loads_with_every_key_and_identical_outputs(tmp_path):
    reference = perturbed(NANO, seed=1, num_classes=10)
    official = official_state_dict(reference)
    assert len(official) > len(reference.state_dict())
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in official.items()}
    path = tmp_path / "mpvit_nano_cpu.pth"
    torch.save({"model": official, "model_ema": ema, "optimizer": {"state": {}}, "lr_scheduler": {},
                "epoch": 299, "args": argparse.Namespace(model="mpvit")}, path)
    assert infer_arch(path) == NANO
    model, report = backbone_from_checkpoint(path, num_classes=10)
    assert report.missing == [] and report.unexpected == [] and report.set_aside == []
    assert sorted(report.loaded) == sorted(reference.state_dict())  # every key used, the copies folded
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(images), reference(images))  # "model", not "model_ema"


@pytest.mark.parametrize("prefix", ["backbone.bottom_up.backbone.", "backbone."])  # Detectron2, mmseg
def test_dense_prediction_conversions_load_under_their_prefix(tmp_path, prefix):
    reference = perturbed(NANO, seed=2)
    official = official_state_dict(reference)
    path = tmp_path / "converted.pth"
    torch.save({"state_dict": {prefix + k: v for k, v in official.items()}, "meta": {}}, path)
    model, report = backbone_from_checkpoint(path)
    assert model.arch == NANO and report.missing == [] and report.unexpected == []
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(backbone_contract(model.eval()).features(images),
                                                     backbone_contract(reference).features(images)))


def test_official_copies_that_disagree_and_other_sizes_are_one_line(tmp_path):
    official = official_state_dict(perturbed(NANO))
    bad = dict(official)
    key = next(k for k in bad if ".MHCA_layers.0.cpe.proj.weight" in k)
    bad[key] = bad[key] + 1
    path = tmp_path / "bad.pth"
    torch.save({"model": bad}, path)
    with pytest.raises(CheckpointError, match="should repeat the shared"):
        load_backbone(create_backbone(NANO), path)
    small = tmp_path / "nano.safetensors"
    save_backbone(small, perturbed(NANO), CheckpointMetadata(method="supervised", arch=NANO))
    with pytest.raises(CheckpointError, match="another architecture than mpvit_tiny"):
        load_backbone(create_backbone("mpvit_tiny"), small)
    model, report = backbone_from_checkpoint(small)
    assert model.arch == NANO and report.metadata.method == "supervised"


def test_layer_decay_groups_per_stage():
    model = create_backbone("mpvit_tiny", num_classes=10)
    groups = layer_decay_param_groups(model, backbone_contract(model), weight_decay=0.05, layer_decay=0.5)
    scale_of = {name: group["lr_scale"] for group in groups for name in group["param_names"]}
    decay_of = {name: group["weight_decay"] for group in groups for name in group["param_names"]}
    assert scale_of["stem.0.conv.weight"] == 0.5 ** 5 and scale_of["cls_head.weight"] == 1.0
    for stage in range(4):  # a stage's patch embeddings decay with its encoders
        assert scale_of[f"patch_embed_stages.{stage}.patch_embeds.0.patch_conv.pwconv.weight"] == 0.5 ** (4 - stage)
        assert scale_of[f"mhca_stages.{stage}.mhca_blks.0.MHCA_layers.0.factoratt_crpe.qkv.weight"] == \
            0.5 ** (4 - stage)
    assert sorted(set(scale_of.values())) == [0.5 ** k for k in range(5, -1, -1)]
    assert decay_of["mhca_stages.1.aggregate.conv.weight"] == 0.05
    assert decay_of["mhca_stages.1.aggregate.bn.weight"] == 0.0


def test_a_checkpoint_pretrained_at_32_pixels_is_transferred_at_32(tmp_path):
    """Our supervised MPViT records its recipe's img_size: the loader makes it the model's input size, which the
    linear probe and fine-tuning read; a checkpoint that records none keeps the family's 224."""
    from mimbench.transfer.finetune import input_size

    weights = create_backbone("mpvit_nano_cpu")
    recorded = CheckpointMetadata(method="supervised", arch="mpvit_nano_cpu",
                                  extra={"config": {"recipe": {"img_size": 32}}})
    model, _ = backbone_from_checkpoint(save_backbone(tmp_path / "32.safetensors", weights, recorded))
    assert input_size(model) == 32 and model.pretrained_cfg["crop_pct"] == weights.pretrained_cfg["crop_pct"]
    plain = save_backbone(tmp_path / "plain.safetensors", weights, CheckpointMetadata("supervised", "mpvit_nano_cpu"))
    assert input_size(backbone_from_checkpoint(plain)[0]) == 224
    assert input_size(create_backbone("mpvit_nano_cpu")) == 224  # the registry's model is not changed
