"""MixedAE: mixing math, homologous contrastive loss, homologous attention in the encoder, training, export."""

from __future__ import annotations

import math

import pytest
import torch

import mimbench.backbones.vit as vit
from mimbench.backbones.vit import HomologousAttention, create_backbone
from mimbench.pretrain.mae import gather_tokens
from mimbench.pretrain.mixedae import (
    MixedAEConfig,
    MixedAutoencoder,
    homologous_accuracy,
    homologous_contrastive_loss,
    mix,
    mixing_mask,
    source_layout,
    unmix,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


TINY = dict(arch="vit_tiny_patch4_32", decoder_dim=128, decoder_depth=2, decoder_heads=4)


def tiny_model(seed: int = 0, **overrides) -> MixedAutoencoder:
    torch.manual_seed(seed)
    return MixedAutoencoder(MixedAEConfig(**{**TINY, **overrides}))


def structured_images(count: int, seed: int = 0) -> torch.Tensor:
    """Colour gradients with stripes of random frequency and phase: smooth, varied, learnable."""
    generator = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    params = torch.rand(count, 6, generator=generator)
    images = []
    for a, b, freq, phase, angle, tint in params.tolist():
        stripes = torch.sin(2 * math.pi * (1 + 4 * freq) * (xs * math.cos(3 * angle) + ys * math.sin(3 * angle))
                            + 6 * phase)
        images.append(torch.stack([a * xs + stripes, b * ys - stripes, tint * stripes + xs * ys]))
    return torch.stack(images)


# ------------------------------------------------------------------------------------------ mixing math


@pytest.mark.parametrize("num_sources", [2, 4])
def test_mixing_mask_gives_every_position_one_source_in_equal_shares(num_sources):
    torch.manual_seed(0)
    source_ids = mixing_mask(groups=5, num_sources=num_sources, num_patches=64)
    assert source_ids.shape == (5, 64) and source_ids.dtype == torch.long
    assert source_ids.min() == 0 and source_ids.max() == num_sources - 1  # one valid source per position
    counts = torch.stack([(source_ids == s).sum(dim=1) for s in range(num_sources)], dim=1)
    assert (counts == 64 // num_sources).all()
    assert not (source_ids[0] == source_ids[1]).all()  # arrangements are random, not one fixed pattern


def test_mixing_mask_rejects_unequal_shares():
    with pytest.raises(ValueError, match="equally"):
        mixing_mask(groups=1, num_sources=3, num_patches=64)


def test_mix_takes_each_position_from_its_source_and_unmix_recovers_each_image():
    torch.manual_seed(0)
    groups, sources, patches, dim = 3, 4, 16, 5
    tokens = torch.randn(groups * sources, patches, dim)
    source_ids = mixing_mask(groups, sources, patches)
    mixed = mix(tokens, source_ids)
    for g in range(groups):
        for n in range(patches):
            torch.testing.assert_close(mixed[g, n], tokens[g * sources + source_ids[g, n], n], rtol=0, atol=0)

    keep_index, hidden, restore_index = source_layout(source_ids, sources)
    for g in range(groups):
        for s in range(sources):
            occupied = (source_ids[g] == s).nonzero().squeeze(1)
            assert keep_index[g * sources + s].tolist() == occupied.tolist()
            assert hidden[g * sources + s].tolist() == (source_ids[g] != s).float().tolist()
    own = unmix(mixed, keep_index, sources)
    torch.testing.assert_close(own, gather_tokens(tokens, keep_index), rtol=0, atol=0)

    # restore_index puts [own tokens, fillers] back in position order, as MAE's decoder uses it.
    fillers = torch.zeros(groups * sources, patches - own.shape[1], dim)
    restored = gather_tokens(torch.cat([own, fillers], dim=1), restore_index)
    visible = (1 - hidden).bool()
    torch.testing.assert_close(restored[visible], tokens[visible], rtol=0, atol=0)
    assert (restored[~visible] == 0).all()


# --------------------------------------------------------------------------------- homologous contrastive


def test_homologous_contrastive_loss_matches_a_hand_computed_value():
    features = torch.tensor([[[1.0, 0.0], [0.6, 0.8], [0.0, 2.0], [-1.0, 0.5]]])
    source_ids = torch.tensor([[0, 0, 1, 1]])
    temperature = 0.5
    unit = [torch.tensor(v) / math.hypot(*v) for v in features[0].tolist()]
    cos = [[float(unit[i] @ unit[j]) for j in range(4)] for i in range(4)]
    partner = {0: 1, 1: 0, 2: 3, 3: 2}  # the only other patch of the same source
    expected = 0.0
    for anchor in range(4):
        denominator = sum(math.exp(cos[anchor][other] / temperature) for other in range(4) if other != anchor)
        expected -= math.log(math.exp(cos[anchor][partner[anchor]] / temperature) / denominator)
    expected /= 4
    loss = homologous_contrastive_loss(features, source_ids, temperature)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_homologous_contrastive_loss_averages_over_all_positives():
    """Three patches per source: each anchor's loss is the mean over its two positives."""
    torch.manual_seed(0)
    features, source_ids = torch.randn(1, 6, 3), torch.tensor([[0, 1, 0, 1, 1, 0]])
    z = torch.nn.functional.normalize(features[0], dim=-1)
    similarity = z @ z.T / 0.2
    expected = 0.0
    for anchor in range(6):
        others = [j for j in range(6) if j != anchor]
        log_denominator = torch.logsumexp(similarity[anchor, others], dim=0)
        positives = [j for j in others if source_ids[0, j] == source_ids[0, anchor]]
        expected += -sum(similarity[anchor, j] - log_denominator for j in positives) / len(positives)
    loss = homologous_contrastive_loss(features, source_ids, 0.2)
    assert loss.item() == pytest.approx(expected.item() / 6, rel=1e-5)


def test_homologous_contrastive_loss_rewards_features_that_separate_sources():
    torch.manual_seed(0)
    source_ids = mixing_mask(groups=2, num_sources=4, num_patches=16)
    separated = torch.nn.functional.one_hot(source_ids, 4).float() + 0.01 * torch.randn(2, 16, 4)
    shuffled_ids = source_ids[:, torch.randperm(16)]
    good = homologous_contrastive_loss(separated, source_ids, 0.25)
    bad = homologous_contrastive_loss(separated, shuffled_ids, 0.25)
    assert good < bad
    # Perfect separation: every positive carries 1/3 of the mass (3 positives, negatives ~exp(-4) each).
    assert good.item() == pytest.approx(math.log(3 + 12 * math.exp(-1 / 0.25)), abs=0.02)


@pytest.mark.parametrize("key_sign, expected", [(1.0, 1.0), (-1.0, 0.0)])
def test_homologous_accuracy_is_the_share_of_topk_keys_from_the_same_source(key_sign, expected):
    """q = x and k = ±x on tokens that are one-hot by source: the TopK keys of every patch are all its
    homologous patches (k = x), or none of them (k = -x puts them last)."""
    attention = HomologousAttention(dim=8, num_heads=1, qkv_bias=True)
    with torch.no_grad():
        eye = torch.eye(8)
        attention.qkv.weight.copy_(torch.cat([eye, key_sign * eye, eye]))
        attention.qkv.bias.zero_()
    torch.manual_seed(0)
    source_ids = mixing_mask(groups=2, num_sources=4, num_patches=16)
    patches = 10 * torch.nn.functional.one_hot(source_ids, 8).float()
    tokens = torch.cat([torch.zeros(2, 1, 8), patches], dim=1)
    assert homologous_accuracy(attention, tokens, source_ids, topk=4).item() == expected


# ------------------------------------------------------------------------------------------- the model


def test_homologous_attention_keeps_exactly_k_keys_in_the_chosen_blocks(monkeypatch):
    model = tiny_model(homologous_blocks=(9, 10, 11))
    assert model.topk == 16  # round(0.25 * 64)
    assert [block.attn.topk for block in model.encoder.blocks] == [None] * 9 + [16] * 3
    kept = []

    def recording_softmax(logits, topk):
        attention = vit_homologous_softmax(logits, topk)
        kept.append((attention > 0).sum(dim=-1))
        return attention

    vit_homologous_softmax = vit.homologous_softmax
    monkeypatch.setattr(vit, "homologous_softmax", recording_softmax)
    model(structured_images(8))
    assert len(kept) == 3  # one call per homologous block, none elsewhere
    for counts in kept:
        assert counts.shape == (2, 3, 65)  # 2 mixed images, 3 heads, class token + 64 patch queries
        assert (counts == 16).all()


def test_homologous_topk_and_ratio_are_configurable():
    model = tiny_model(mixing_ratio=0.5, homologous_topk=20)
    assert model.num_sources == 2 and model.topk == 20
    assert all(block.attn.topk == 20 for block in model.encoder.blocks)


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.75, 1.0])
def test_mixing_ratio_must_be_an_inverse_integer_up_to_one_half(ratio):
    with pytest.raises(ValueError, match="mixing_ratio"):
        MixedAEConfig(**TINY, mixing_ratio=ratio)


def test_batch_not_divisible_by_the_number_of_sources_raises():
    model = tiny_model()
    with pytest.raises(ValueError, match="multiple of 4, got 6"):
        model(structured_images(6))
    with pytest.raises(ValueError, match="multiple of 4"):
        model.visualize(structured_images(2))


def test_forward_parts_visualize_and_reconstruction_targets():
    model = tiny_model()
    images = structured_images(8)
    torch.manual_seed(1)
    loss, parts = model(images)
    assert set(parts) == {"loss_recon", "loss_homocon", "homo_acc"}
    assert all(p.ndim == 0 and not p.requires_grad for p in parts.values())
    expected = parts["loss_recon"] + model.config.contrastive_weight * parts["loss_homocon"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert 0 <= parts["homo_acc"] <= 1

    torch.manual_seed(2)
    shown = model.visualize(images)
    assert set(shown) == {"original", "input", "reconstruction"}
    assert all(t.shape == (8, 3, 32, 32) for t in shown.values())
    # Each source shows 1/4 of its patches: its own positions are the original, the rest is blank.
    occupied = (shown["input"] != 0).any(dim=1).float().unfold(1, 4, 4).unfold(2, 4, 4).amax((-1, -2))
    assert (occupied.flatten(1).sum(dim=1) == 16).all()
    torch.testing.assert_close(shown["input"] * (shown["input"] != 0), images * (shown["input"] != 0))


def test_mixedae_loss_decreases_on_a_fixed_batch():
    model = tiny_model()
    images = structured_images(8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    losses = []
    for step in range(40):
        loss, parts = model(images)
        if step == 0:
            first_recon = parts["loss_recon"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert parts["loss_recon"] < 0.8 * first_recon
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)


def test_exported_encoder_loads_strictly_into_a_standard_backbone():
    model = tiny_model()
    exported = model.export_encoder()
    assert all(block.attn.topk is None for block in exported.blocks)
    assert all(block.attn.topk == 16 for block in model.encoder.blocks)  # training model untouched
    assert not any("segment" in key for key in exported.state_dict())
    backbone = create_backbone("vit_tiny_patch4_32")
    backbone.load_state_dict(exported.state_dict(), strict=True)
    assert all(block.attn.topk is None for block in backbone.blocks)
    images = structured_images(2)
    with torch.no_grad():
        torch.testing.assert_close(backbone.eval()(images), exported.eval()(images))
