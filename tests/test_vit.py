"""ViT family: timm's own modules, the arch table, dense features."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models.vision_transformer import Attention, VisionTransformer

from mimbench.backbones.vit import ARCHS, create_backbone, default_feature_blocks, dense_features
from mimbench.core.errors import ConfigError


def test_state_dict_keys_and_shapes_match_timm():
    ours = create_backbone("vit_base_patch16_224", num_classes=1000)
    reference = timm.create_model("vit_base_patch16_224", pretrained=False)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()}


@pytest.mark.parametrize("arch", ["vit_tiny_patch4_32", "vit_tiny_patch8_64"])
def test_small_variants_run_at_their_input_size(arch):
    size = ARCHS[arch]["img_size"]
    model = create_backbone(arch, num_classes=10)
    assert model(torch.randn(2, 3, size, size)).shape == (2, 10)
    assert model.patch_embed.num_patches == 64


def test_unknown_arch_names_the_choices():
    with pytest.raises(ConfigError, match="vit_base_patch16_224.*resnet18") as info:
        create_backbone("vit_base_patch32_224")
    assert "\n" not in str(info.value)


def test_backbone_is_timms_own_vit_with_timms_attention():
    """No attention of ours in a backbone: homologous attention is MixedAE's, swapped in by its pretraining."""
    model = create_backbone("vit_tiny_patch4_32")
    assert type(model) is VisionTransformer and model.arch == "vit_tiny_patch4_32"
    assert [type(block.attn) for block in model.blocks] == [Attention] * 12
    assert {type(module).__module__.split(".")[0] for module in model.modules()} == {"timm", "torch"}


def test_dense_features_equal_block_outputs():
    torch.manual_seed(0)
    model = create_backbone("vit_tiny_patch8_64").eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = dense_features(model, images, blocks=[1, 4])
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        outputs = []
        for block in model.blocks:
            tokens = block(tokens)
            outputs.append(tokens)
    assert [m.shape for m in maps] == [(2, 192, 8, 8)] * 2
    for feature_map, index in zip(maps, [1, 4]):
        expected = outputs[index][:, 1:].reshape(2, 8, 8, 192).permute(0, 3, 1, 2)
        torch.testing.assert_close(feature_map, expected)


def test_default_feature_blocks_follow_the_protocols():
    assert default_feature_blocks(12) == (3, 5, 7, 11)  # MAE/BEiT UperNet, ViT-B
    assert default_feature_blocks(24) == (7, 11, 15, 23)
    assert default_feature_blocks(32) == (7, 15, 23, 31)
    model = create_backbone("vit_base_patch16_224", img_size=128)
    with torch.no_grad():
        maps = dense_features(model, torch.randn(1, 3, 128, 128))
    assert [m.shape for m in maps] == [(1, 768, 8, 8)] * 4


def test_autocast_dtype_follows_the_hardware(monkeypatch):
    from mimbench.core.runtime import NATIVE_BF16_FLAGS, autocast_dtype, cpu_capability, cpu_has_native_bf16

    assert autocast_dtype("cuda") == torch.bfloat16
    flags = open("/proc/cpuinfo").read().split()
    native = any(flag in flags for flag in NATIVE_BF16_FLAGS) and cpu_capability() == "AVX512"
    assert autocast_dtype("cpu") == (torch.bfloat16 if native else None)
    # oneDNN capped to AVX2 emulates bf16 as an AVX2-only CPU does: auto is fp32 there
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    cpu_has_native_bf16.cache_clear()
    try:
        assert autocast_dtype("cpu") is None
        assert autocast_dtype("cpu", "bf16") == torch.bfloat16
    finally:
        monkeypatch.undo()
        cpu_has_native_bf16.cache_clear()
