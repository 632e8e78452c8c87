"""ViT family, homologous attention and dense features."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models.vision_transformer import Attention

from mimbench.backbones.vit import (
    ARCHS,
    HomologousAttention,
    create_backbone,
    default_feature_blocks,
    dense_features,
    homologous_softmax,
    set_homologous_attention,
)


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
    with pytest.raises(ValueError, match="vit_base_patch16_224"):
        create_backbone("vit_base_patch32_224")


def make_attention(seed: int = 0) -> HomologousAttention:
    torch.manual_seed(seed)
    attention = HomologousAttention(dim=64, num_heads=4, qkv_bias=True).eval()
    return attention


def test_homologous_attention_with_k_at_least_tokens_equals_standard_attention():
    attention = make_attention()
    standard = Attention(dim=64, num_heads=4, qkv_bias=True).eval()
    standard.load_state_dict(attention.state_dict())
    tokens = torch.randn(3, 17, 64)
    with torch.no_grad():
        expected = standard(tokens)
        for topk in (17, 40):
            attention.topk = topk
            torch.testing.assert_close(attention(tokens), expected, atol=1e-5, rtol=1e-5)


def test_homologous_softmax_keeps_exactly_k_largest_per_row():
    logits = torch.randn(2, 4, 10, 10)
    weights = homologous_softmax(logits, topk=3)
    assert torch.all((weights > 0).sum(-1) == 3)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 10))
    kept = weights > 0
    smallest_kept = logits.masked_fill(~kept, float("inf")).amin(-1)
    largest_dropped = logits.masked_fill(kept, float("-inf")).amax(-1)
    assert torch.all(smallest_kept > largest_dropped)
    # the kept weights are the softmax over the kept logits alone
    top = logits.topk(3, dim=-1)
    torch.testing.assert_close(weights.gather(-1, top.indices), top.values.softmax(-1))


def test_homologous_softmax_ties_still_keep_exactly_k():
    weights = homologous_softmax(torch.zeros(5, 8), topk=2)
    assert torch.all((weights > 0).sum(-1) == 2)
    torch.testing.assert_close(weights.sum(-1), torch.ones(5))


def test_homologous_attention_output_matches_hand_computation():
    attention = make_attention(1)
    attention.topk = 4
    tokens = torch.randn(2, 12, 64)
    q, k, v = attention.qkv(tokens).reshape(2, 12, 3, 4, 16).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-2, -1) / 16 ** 0.5
    threshold = logits.topk(4, dim=-1).values[..., -1:]
    weights = logits.masked_fill(logits < threshold, float("-inf")).softmax(-1)
    expected = attention.proj((weights @ v).transpose(1, 2).reshape(2, 12, 64))
    with torch.no_grad():
        torch.testing.assert_close(attention(tokens), expected.detach(), atol=1e-5, rtol=1e-5)


def test_homologous_attention_only_in_chosen_blocks():
    model = create_backbone("vit_tiny_patch4_32", homologous_topk=16, homologous_blocks=[9, 10, 11])
    assert [block.attn.topk for block in model.blocks] == [None] * 9 + [16] * 3
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        sparse = model.eval()(images)
        set_homologous_attention(model, None)
        dense = model(images)
    assert not torch.allclose(sparse, dense)  # TopK changes the function...
    assert all(block.attn.topk is None for block in model.blocks)  # ...and switches off again


def test_homologous_attention_trains_under_bf16_autocast():
    model = create_backbone("vit_tiny_patch4_32", homologous_topk=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(torch.randn(2, 3, 32, 32)).float().pow(2).mean()
    loss.backward()
    assert torch.isfinite(loss) and model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


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


def test_autocast_dtype_follows_the_hardware():
    from mimbench.core.runtime import NATIVE_BF16_FLAGS, autocast_dtype

    assert autocast_dtype("cuda") == torch.bfloat16
    flags = open("/proc/cpuinfo").read().split()
    native = any(flag in flags for flag in NATIVE_BF16_FLAGS)
    assert autocast_dtype("cpu") == (torch.bfloat16 if native else None)
