"""MixedAE: mixing math, homologous attention and contrastive loss, the encoder's swap, training, export."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from timm.models.vision_transformer import Attention, VisionTransformer

import mimbench.pretrain.mixedae as mixedae
from mimbench.backbones.checkpoint import CheckpointMetadata, backbone_from_checkpoint, save_backbone
from mimbench.backbones.vit import create_backbone
from mimbench.pretrain.mae import gather_tokens
from mimbench.pretrain.mixedae import (
    HomologousAttention,
    MixedAEConfig,
    MixedAutoencoder,
    complementary_masks,
    homologous_accuracy,
    homologous_contrastive_loss,
    homologous_softmax,
    mix,
    mixing_mask,
    source_layout,
    topk_keys,
    unmix,
    use_homologous_attention,
    with_standard_attention,
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


# ---------------------------------------------------------------------------------- homologous attention


def make_attention(seed: int = 0) -> Attention:
    torch.manual_seed(seed)
    return Attention(dim=64, num_heads=4, qkv_bias=True).eval()


def test_homologous_attention_with_k_at_least_tokens_equals_standard_attention():
    standard = make_attention()
    tokens = torch.randn(3, 17, 64)
    with torch.no_grad():
        expected = standard(tokens)
        for topk in (17, 40):
            attention = HomologousAttention(copy.deepcopy(standard), topk).eval()
            torch.testing.assert_close(attention(tokens), expected, atol=1e-5, rtol=1e-5)


def test_homologous_attention_takes_over_timms_modules_and_keys():
    standard = make_attention()
    attention = HomologousAttention(standard, topk=4)
    assert list(attention.state_dict()) == list(standard.state_dict())
    assert all(a is b for a, b in zip(attention.parameters(), standard.parameters()))  # the same tensors
    assert attention.standard is standard and "standard" not in dict(attention.named_children())


def test_dense_homologous_attention_is_timms_attention_bit_for_bit():
    """``sparse=False`` (homo_acc's block when no block is homologous) must not change the encoder's numbers."""
    standard = make_attention(2)
    attention = HomologousAttention(copy.deepcopy(standard), topk=5, sparse=False).eval()
    attention.record = True
    tokens = torch.randn(2, 12, 64)
    with torch.no_grad():
        assert torch.equal(attention(tokens), standard(tokens))
    assert attention.kept_index.shape == (2, 4, 12, 5)


def test_homologous_softmax_keeps_exactly_k_largest_per_row():
    logits = torch.randn(2, 4, 10, 10)
    weights, kept_index = homologous_softmax(logits, topk=3)
    assert torch.all((weights > 0).sum(-1) == 3)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 10))
    kept = weights > 0
    smallest_kept = logits.masked_fill(~kept, float("inf")).amin(-1)
    largest_dropped = logits.masked_fill(kept, float("-inf")).amax(-1)
    assert torch.all(smallest_kept > largest_dropped)
    # the kept weights are the softmax over the kept logits alone, at the returned indices
    top = logits.topk(3, dim=-1)
    assert torch.equal(kept_index.sort(-1).values, top.indices.sort(-1).values)
    torch.testing.assert_close(weights.gather(-1, top.indices), top.values.softmax(-1))


def test_homologous_softmax_ties_still_keep_exactly_k():
    weights, kept_index = homologous_softmax(torch.zeros(5, 8), topk=2)
    assert torch.all((weights > 0).sum(-1) == 2)
    torch.testing.assert_close(weights.sum(-1), torch.ones(5))
    assert torch.equal((weights > 0).nonzero()[:, 1].view(5, 2).sort().values, kept_index.sort().values)


def test_homologous_attention_output_matches_hand_computation():
    attention = HomologousAttention(make_attention(1), topk=4)
    attention.record = True
    tokens = torch.randn(2, 12, 64)
    q, k, v = attention.qkv(tokens).reshape(2, 12, 3, 4, 16).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-2, -1) / 16 ** 0.5
    threshold = logits.topk(4, dim=-1).values[..., -1:]
    weights = logits.masked_fill(logits < threshold, float("-inf")).softmax(-1)
    expected = attention.proj((weights @ v).transpose(1, 2).reshape(2, 12, 64))
    with torch.no_grad():
        torch.testing.assert_close(attention(tokens), expected.detach(), atol=1e-5, rtol=1e-5)
    # what it recorded is what it kept
    kept = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, attention.kept_index, True)
    assert torch.equal(kept, weights > 0)


def test_homologous_attention_only_in_chosen_blocks():
    model = create_backbone("vit_tiny_patch4_32").eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        dense = model(images)
        use_homologous_attention(model, topk=16, blocks=[9, 10, 11])
        assert [type(block.attn) for block in model.blocks] == [Attention] * 9 + [HomologousAttention] * 3
        assert all(block.attn.topk == 16 for block in model.blocks[9:])
        sparse = model(images)
        standard = with_standard_attention(model)
        assert torch.equal(standard(images), dense)  # timm's attention back: the function it was
    assert not torch.allclose(sparse, dense)  # TopK changes the function
    assert [type(block.attn) for block in standard.blocks] == [Attention] * 12


def test_homologous_attention_trains_under_bf16_autocast():
    model = create_backbone("vit_tiny_patch4_32")
    use_homologous_attention(model, topk=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(torch.randn(2, 3, 32, 32)).float().pow(2).mean()
    loss.backward()
    assert torch.isfinite(loss) and model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


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


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("key_sign, expected", [(1.0, 1.0), (-1.0, 0.0)])
def test_homologous_accuracy_is_the_share_of_topk_keys_from_the_same_source(key_sign, expected, sparse):
    """q = x and k = ±x on tokens that are one-hot by source: the TopK keys of every patch are all its
    homologous patches (k = x), or none of them (k = -x puts them last)."""
    attention = HomologousAttention(Attention(dim=8, num_heads=1, qkv_bias=True), topk=4, sparse=sparse)
    attention.record = True
    with torch.no_grad():
        eye = torch.eye(8)
        attention.qkv.weight.copy_(torch.cat([eye, key_sign * eye, eye]))
        attention.qkv.bias.zero_()
    torch.manual_seed(0)
    source_ids = mixing_mask(groups=2, num_sources=4, num_patches=16)
    patches = 10 * torch.nn.functional.one_hot(source_ids, 8).float()
    tokens = torch.cat([torch.zeros(2, 1, 8), patches], dim=1)
    with torch.no_grad():
        attention(tokens)
    assert attention.kept_index.shape == (2, 1, 17, 4)
    assert homologous_accuracy(attention.kept_index, source_ids).item() == expected


# ------------------------------------------------------------------------------------------- the model


def test_homologous_attention_keeps_exactly_k_keys_in_the_chosen_blocks(monkeypatch):
    model = tiny_model(homologous_blocks=(9, 10, 11))
    assert model.topk == 16  # round(0.25 * 64)
    assert [type(block.attn) for block in model.encoder.blocks] == [Attention] * 9 + [HomologousAttention] * 3
    assert [block.attn.topk for block in model.encoder.blocks[9:]] == [16] * 3
    kept = []

    def recording_softmax(logits, topk, always_kept):
        assert always_kept == 0  # the class token competes for the K keys by default
        attention, kept_index = original_softmax(logits, topk, always_kept)
        kept.append((attention > 0).sum(dim=-1))
        return attention, kept_index

    original_softmax = mixedae.homologous_softmax
    monkeypatch.setattr(mixedae, "homologous_softmax", recording_softmax)
    model(structured_images(8))
    assert len(kept) == 3  # one call per homologous block, none elsewhere
    for counts in kept:
        assert counts.shape == (2, 3, 65)  # 2 mixed images, 3 heads, class token + 64 patch queries
        assert (counts == 16).all()


def test_homologous_topk_and_ratio_are_configurable():
    model = tiny_model(mixing_ratio=0.5, homologous_topk=20)
    assert model.num_sources == 2 and model.topk == 20
    assert all(block.attn.topk == 20 and block.attn.sparse for block in model.encoder.blocks)


@pytest.mark.parametrize("blocks", [None, (4, 7), ()])
def test_homo_acc_equals_a_direct_computation_from_q_and_k(monkeypatch, blocks):
    """homo_acc reads the indices the attention recorded; recompute them from each block's q and k by hand:
    homo_acc/block<i> per homologous block, homo_acc the deepest one's. With no homologous block, the last block's
    standard attention says what TopK would keep."""
    model = tiny_model(homologous_blocks=blocks)
    images = structured_images(8)
    torch.manual_seed(3)
    source_ids = model.sample_mixing_mask(images)
    monkeypatch.setattr(model, "sample_mixing_mask", lambda _: source_ids)
    recorded = {None: tuple(range(12)), (4, 7): (4, 7), (): (11,)}[blocks]
    inputs = {}
    for index in recorded:  # the test's own view of each block's input
        model.encoder.blocks[index].attn.register_forward_pre_hook(
            lambda _, args, index=index: inputs.setdefault(index, args[0].detach()))
    _, parts = model(images)
    assert set(parts) == {"loss_recon", "loss_homocon", "homo_acc", *(f"homo_acc/block{i}" for i in recorded)}
    key_sources = torch.cat([torch.full((2, 1), -1), source_ids], dim=1)  # the class token has no source
    for index in recorded:
        with torch.no_grad():
            qkv = model.encoder.blocks[index].attn.qkv(inputs[index])
            q, k, _ = qkv.reshape(2, 65, 3, 3, 64).permute(2, 0, 3, 1, 4)
            top_keys = (q @ k.transpose(-2, -1) / 8.0)[:, :, 1:].topk(16, dim=-1).indices  # (G, heads, N, K)
        top_sources = key_sources[:, None, None, :].expand(-1, 3, 64, -1).gather(-1, top_keys)
        homologous = top_sources == source_ids[:, None, :, None]
        # 1/8 scales exactly: the same TopK
        assert parts[f"homo_acc/block{index}"].item() == homologous.float().mean().item(), index
        assert 0 < parts[f"homo_acc/block{index}"] < 1
        assert model.encoder.blocks[index].attn.kept_index is None  # read once, not held until the next step
    assert torch.equal(parts["homo_acc"], parts[f"homo_acc/block{recorded[-1]}"])
    if len(recorded) > 1:  # each block its own value
        assert len({parts[f"homo_acc/block{i}"].item() for i in recorded}) > 1


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
    assert set(parts) == {"loss_recon", "loss_homocon", "homo_acc", *(f"homo_acc/block{i}" for i in range(12))}
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


@pytest.mark.slow  # trains: 40 steps
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


def test_exported_encoder_is_a_plain_timm_vit_that_loads_strictly_into_a_backbone(tmp_path):
    model = tiny_model()
    exported = model.export_encoder()
    assert type(exported) is VisionTransformer
    assert not any(isinstance(module, HomologousAttention) for module in exported.modules())
    assert [type(block.attn) for block in exported.blocks] == [Attention] * 12
    assert all(isinstance(block.attn, HomologousAttention) for block in model.encoder.blocks)  # training untouched
    assert exported.blocks[0].attn.qkv.weight is not model.encoder.blocks[0].attn.qkv.weight  # a copy
    assert list(exported.state_dict()) == [k.removeprefix("encoder.") for k in model.state_dict()
                                           if k.startswith("encoder.")]
    assert not any("segment" in key for key in exported.state_dict())
    backbone = create_backbone("vit_tiny_patch4_32")
    backbone.load_state_dict(exported.state_dict(), strict=True)
    images = structured_images(2)
    with torch.no_grad():
        assert torch.equal(backbone.eval()(images), exported.eval()(images))
    # through the project's export format too
    metadata = CheckpointMetadata("mixedae", "vit_tiny_patch4_32")
    path = save_backbone(tmp_path / "mixedae.safetensors", exported, metadata)
    loaded, report = backbone_from_checkpoint(path)
    assert report.encoder_fraction == 1.0 and [type(block.attn) for block in loaded.blocks] == [Attention] * 12


# ------------------------------------------------------------------------------ complementary mixtures (Full)


@pytest.mark.parametrize("num_sources", [2, 4])
def test_complementary_mixtures_encode_every_source_position_exactly_once(num_sources):
    torch.manual_seed(0)
    base = mixing_mask(3, num_sources, 16)
    full = complementary_masks(base, num_sources, num_sources).reshape(3, num_sources, 16)
    assert torch.equal(full[:, 0], base)  # mixture 0 is MixedAE's
    assert torch.equal(full[:, 1], (base + 1) % num_sources)
    # Every (source, position) appears in exactly one mixture of its group, each mixture has equal shares.
    slots = torch.arange(num_sources)
    occupied = full[:, :, None, :] == slots[None, None, :, None]  # (G, m, S, N)
    assert (occupied.sum(dim=1) == 1).all()
    assert (occupied.sum(dim=-1) == 16 // num_sources).all()
    # Fewer mixtures: the first ones of the full set.
    assert torch.equal(complementary_masks(base, num_sources, 2).reshape(3, 2, 16), full[:, :2])


def test_mix_of_several_mixtures_takes_each_position_from_its_groups_source():
    tokens = torch.arange(8 * 16).float().reshape(8, 16, 1).expand(-1, -1, 3)  # value = image*16 + position
    torch.manual_seed(0)
    source_ids = complementary_masks(mixing_mask(2, 4, 16), 4, 3)  # G = 2, m = 3
    mixed = mix(tokens, source_ids, mixtures=3)
    assert mixed.shape == (6, 16, 3)
    group = torch.arange(6)[:, None] // 3
    expected = (group * 4 + source_ids) * 16 + torch.arange(16)
    assert torch.equal(mixed[..., 0], expected.float())


@pytest.mark.parametrize("mixtures", [1, 2, 4])
def test_each_mixture_reconstructs_exactly_the_hidden_positions_of_each_source(monkeypatch, mixtures):
    model = tiny_model(mixtures_per_group=mixtures)
    images = structured_images(8)
    seen = {}
    real_loss = model.reconstruction_loss

    def spy(targets, prediction, mask):
        seen.update(targets=targets, prediction=prediction, mask=mask)
        return real_loss(targets, prediction, mask)

    monkeypatch.setattr(model, "reconstruction_loss", spy)
    torch.manual_seed(1)
    source_ids = model.sample_mixing_mask(images)
    torch.manual_seed(1)
    loss, parts = model(images)
    assert source_ids.shape == (2 * mixtures, 64)
    rows = 2 * mixtures * 4
    assert seen["prediction"].shape == (rows, 64, 4 * 4 * 3) and seen["mask"].shape == (rows, 64)
    # Row (g, j, s): the target is image g·S + s, the mask is where source s is absent from mixture j.
    image_of_row = [g * 4 + s for g in range(2) for _ in range(mixtures) for s in range(4)]
    assert torch.equal(seen["targets"], images[image_of_row])
    hidden = source_ids.repeat_interleave(4, dim=0) != torch.arange(4).repeat(2 * mixtures)[:, None]
    assert torch.equal(seen["mask"], hidden.float())
    if mixtures == 4:  # every source is hidden at every position in exactly 3 of its 4 mixtures
        assert (seen["mask"].reshape(2, 4, 4, 64).sum(dim=1) == 3).all()
    assert torch.isfinite(loss) and 0 <= parts["homo_acc"] <= 1
    assert model.visualize(images)["input"].shape == (8, 3, 32, 32)


def test_mixtures_per_group_range_is_checked():
    with pytest.raises(ValueError, match=r"mixtures_per_group must be in \[1, 1/mixing_ratio = 4\], not 5"):
        MixedAEConfig(mixtures_per_group=5)
    with pytest.raises(ValueError, match="mixtures_per_group"):
        MixedAEConfig(mixtures_per_group=0)
    with pytest.raises(ValueError, match=r"= 2\], not 3"):
        MixedAEConfig(mixing_ratio=0.5, mixtures_per_group=3)


def test_one_mixture_per_group_draws_and_computes_what_mixedae_does():
    plain, single = tiny_model(), tiny_model(mixtures_per_group=1)
    images = structured_images(8)
    torch.manual_seed(3)
    expected = plain(images)[0]
    torch.manual_seed(3)
    assert torch.equal(single(images)[0], expected)
    # m = 2 draws the same random assignment, so its first mixture is m = 1's
    double = tiny_model(mixtures_per_group=2)
    torch.manual_seed(3)
    first = plain.sample_mixing_mask(images)
    torch.manual_seed(3)
    assert torch.equal(double.sample_mixing_mask(images)[::2], first)


# ------------------------------------------------------------------------------------ every open choice a switch


def run_once(model: MixedAutoencoder, seed: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    return model(structured_images(8))


def with_default_weights(model: MixedAutoencoder) -> MixedAutoencoder:
    """``model`` with the default model's weights wherever the names agree (the switch's own parts keep theirs)."""
    model.load_state_dict(tiny_model().state_dict(), strict=False)
    return model


SWITCHES = {  # each alternative -> the parameters it adds (+) or removes (-) against the default model
    "segment_embedding=False": (dict(segment_embedding=False), {"-segment_embed"}),
    "segment_embedding_at=decoder": (dict(segment_embedding_at="decoder"), set()),
    "homologous_last_blocks=2": (dict(homologous_last_blocks=2), set()),
    "homologous_blocks=()": (dict(homologous_blocks=()), set()),
    "homologous_topk_factor=2": (dict(homologous_topk_factor=2.0), set()),
    "homologous_topk=8": (dict(homologous_topk=8), set()),
    "topk_counts_cls=False": (dict(topk_counts_cls=False), set()),
    "temperature=0.1": (dict(temperature=0.1), set()),
    "contrastive_weight=1": (dict(contrastive_weight=1.0), set()),
    "homocon_features=projection": (dict(homocon_features="projection"), {"+homocon_head.0.weight",
                                    "+homocon_head.0.bias", "+homocon_head.2.weight", "+homocon_head.2.bias"}),
    "decoder_cls=per_source": (dict(decoder_cls="per_source"), {"+source_cls_token"}),
    "lr_batch=mixtures": (dict(lr_batch="mixtures"), set()),
}


@pytest.mark.parametrize("name", list(SWITCHES))
def test_each_switch_changes_only_its_parameters_and_trains(name):
    overrides, changed = SWITCHES[name]
    default_names = {n for n, _ in tiny_model().named_parameters()}
    model = tiny_model(**overrides)
    names = {n for n, _ in model.named_parameters()}
    assert {f"+{n}" for n in names - default_names} | {f"-{n}" for n in default_names - names} == changed
    loss, parts = run_once(model)
    blocks = {f"homo_acc/block{i}" for i in model.recorded_blocks}
    assert set(parts) == {"loss_recon", "loss_homocon", "homo_acc", *blocks} and torch.isfinite(loss)
    expected = parts["loss_recon"] + model.config.contrastive_weight * parts["loss_homocon"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    # The exported encoder is the same plain ViT whatever the switch.
    assert list(model.export_encoder().state_dict()) == list(tiny_model().export_encoder().state_dict())


def test_homocon_switches_change_only_the_contrastive_part():
    _, reference = run_once(tiny_model())
    for overrides in (dict(temperature=0.1), dict(contrastive_weight=1.0), dict(homocon_features="projection")):
        loss, parts = run_once(with_default_weights(tiny_model(**overrides)))
        assert torch.equal(parts["loss_recon"], reference["loss_recon"]), overrides
        assert torch.equal(parts["homo_acc"], reference["homo_acc"]), overrides
    assert run_once(tiny_model(temperature=0.1))[1]["loss_homocon"] != reference["loss_homocon"]
    loss, parts = run_once(tiny_model(contrastive_weight=1.0))
    assert torch.equal(parts["loss_homocon"], reference["loss_homocon"])
    assert loss.item() == pytest.approx((parts["loss_recon"] + parts["loss_homocon"]).item(), rel=1e-6)


def test_segment_embeddings_on_the_decoder_input_leave_the_encoder_alone():
    plain = tiny_model(segment_embedding=False)
    at_decoder = with_default_weights(tiny_model(segment_embedding_at="decoder"))
    plain.load_state_dict(at_decoder.state_dict(), strict=False)
    images, source_ids = structured_images(8), mixing_mask(2, 4, 64)
    latent = at_decoder.forward_encoder(images, source_ids)
    assert torch.equal(latent, plain.forward_encoder(images, source_ids))
    # ... and mark each source's decoder input: source s's tokens move by segment_embed[s].
    prediction, hidden = at_decoder.forward_decoder(latent, source_ids)
    with torch.no_grad():
        at_decoder.segment_embed[1] += 1.0
    moved = at_decoder.forward_decoder(latent, source_ids)[0]
    changed = (moved != prediction).flatten(1).any(dim=1)
    assert changed.tolist() == [s == 1 for _ in range(2) for s in range(4)]


def test_homologous_last_blocks_and_topk_factor_choose_blocks_and_k():
    assert tiny_model(homologous_last_blocks=3).homologous_blocks == (9, 10, 11)
    assert tiny_model(homologous_last_blocks=0).homologous_blocks == ()
    assert tiny_model(homologous_topk_factor=2.0).topk == 32  # 2 · r·N = 2 · 16
    assert tiny_model(homologous_topk=5, homologous_topk_factor=2.0).topk == 5  # absolute K wins
    with pytest.raises(ValueError, match="not both"):
        MixedAEConfig(homologous_blocks=(1,), homologous_last_blocks=1)
    with pytest.raises(ValueError, match="homologous_topk must be in \\[1, 64\\]"):
        tiny_model(homologous_topk=65, topk_counts_cls=False)
    for name, value in (("segment_embedding_at", "both"), ("homocon_features", "mlp"), ("decoder_cls", "x"),
                        ("lr_batch", "images")):
        with pytest.raises(ValueError, match=f"{name} must be one of"):
            MixedAEConfig(**{name: value})


def test_class_token_not_counted_is_always_kept_besides_k_patch_keys():
    logits = torch.randn(2, 3, 5, 9)
    logits[..., 0] = -100.0  # the class token would never make the TopK on its own
    attn, kept = homologous_softmax(logits, topk=3, always_kept=1)
    assert kept.shape == (2, 3, 5, 3) and (kept >= 1).all()
    assert torch.equal((attn > 0).sum(dim=-1), torch.full((2, 3, 5), 4))
    assert (attn[..., 0] > 0).all()
    assert torch.equal(kept.sort(dim=-1).values, topk_keys(logits, 3, 1).sort(dim=-1).values)
    torch.testing.assert_close(attn.sum(dim=-1), torch.ones(2, 3, 5))
    model = tiny_model(topk_counts_cls=False)
    assert all(block.attn.always_kept == 1 for block in model.encoder.blocks)


def test_per_source_class_tokens_feed_each_sources_decoder():
    model = tiny_model(decoder_cls="per_source")
    images, source_ids = structured_images(8), mixing_mask(2, 4, 64)
    latent = model.forward_encoder(images, source_ids)
    assert latent.shape == (2, 4 + 64, 192) and model.prefix == 4
    torch.manual_seed(0)
    prediction, _ = model.forward_decoder(latent, source_ids)
    bumped = latent.clone()
    bumped[:, 2] += 1.0  # the class token of source slot 2 reaches that source's decoder only
    changed = (model.forward_decoder(bumped, source_ids)[0] != prediction).flatten(1).any(dim=1)
    assert changed.tolist() == [s == 2 for _ in range(2) for s in range(4)]


@pytest.mark.parametrize(("overrides", "share"), [({}, 1), (dict(lr_batch="mixtures"), 0.25),
                                                  (dict(lr_batch="mixtures", mixtures_per_group=2), 0.5)])
def test_lr_batch_counts_source_or_mixed_images(overrides, share):
    assert tiny_model(**overrides).lr_batch_share == share


@pytest.mark.parametrize(("overrides", "name"), [({}, "mixedae"), (dict(mixtures_per_group=2), "mixedae-full*"),
                                                 (dict(mixtures_per_group=4), "mixedae-full"),
                                                 (dict(mixtures_per_group=3), "mixedae-m3"),
                                                 (dict(mixing_ratio=0.5, mixtures_per_group=2), "mixedae-full")])
def test_exports_name_the_full_variants_by_their_mixtures(overrides, name):
    assert tiny_model(**overrides).export_method == name


def test_reconstruction_weight_zero_leaves_homocon_alone():
    loss, parts = run_once(tiny_model(reconstruction_weight=0.0))
    assert loss.item() == pytest.approx(0.1 * parts["loss_homocon"].item(), rel=1e-6) and parts["loss_recon"] > 0


def test_ablation_plan_names_the_posters_rows_and_builds_each_variant():
    from mimbench.pretrain.ablations import ablation_plan
    from mimbench.pretrain.run import parse_args

    plan = ablation_plan()
    objective = [run.variant for run in plan if run.ablation == "objective"]
    assert objective == ["L_recon", "L_HomoCon", "L_recon + L_HomoCon"]  # the reference CSV's variants
    assert len({tuple(sorted(run.tags.items())) for run in plan}) == len(plan)
    for run in plan:
        loss, _ = run_once(tiny_model(**run.options))
        assert torch.isfinite(loss), run
        # its flags give pretrain/run.py exactly its options
        parsed = parse_args(["--method", "mixedae", "--data-root", "unused", *run.flags()]).recipe.method_options
        assert {name: parsed[name] for name in run.options} == run.options
    assert plan[1].flags() == ["--reconstruction-weight", "0.0"]
    assert plan[4].flags() == ["--no-segment-embedding"]
