"""MAE and RC-MAE math as the official releases do it (initialisation, position embeddings, mask count, decoder
per arch, RC-MAE's teacher schedules, the loss of an official full checkpoint), and every method's loss going
down on the embedded photos."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mimbench.backbones.checkpoint import load_pretraining_checkpoint
from mimbench.backbones.vit import ARCHS
from mimbench.core.config import RunSpec
from mimbench.pretrain.data import EmbeddedPhotos, write_embedded_photos
from mimbench.pretrain.engine import BASE, PretrainConfig, build_method, weight_decay_groups
from mimbench.pretrain.mae import (
    MAEConfig,
    MaskedAutoencoder,
    gather_tokens,
    num_visible,
    patchify,
    random_masking,
    sincos_pos_embed,
    unpatchify,
)
from mimbench.pretrain.mixedae import MixedAEConfig
from mimbench.pretrain.rcmae import MicroBatch, RCMAEConfig, ReconstructionConsistentMAE, teacher_momentum

SMALL = dict(arch="vit_tiny_patch4_32", decoder_dim=64, decoder_depth=1, decoder_heads=4)


def small_method(method: str, **extra) -> torch.nn.Module:
    """The engine's factory, as a run builds the method: tiny ViT, a 1 x 64 decoder (+ ``extra`` options)."""
    options = dict(decoder_dim=64, decoder_depth=1, decoder_heads=4, **extra)
    return build_method(PretrainConfig(run=RunSpec(method=method, arch="vit_tiny_patch4_32"),
                                       recipe=dataclasses.replace(BASE, method_options=options)))


def test_random_masking_keeps_exactly_the_configured_share():
    keep_index, mask, restore_index = random_masking(16, 64, 0.75)
    assert keep_index.shape == (16, 16)
    assert torch.all(mask.sum(1) == 48)
    # the kept positions are exactly the unmasked ones
    kept = torch.zeros(16, 64).scatter(1, keep_index, 1.0)
    assert torch.equal(kept, 1 - mask)


def test_unmasking_restores_the_order():
    tokens = torch.arange(64.0).view(1, 64, 1).expand(4, 64, 3)
    keep_index, mask, restore_index = random_masking(4, 64, 0.75)
    shuffle_index = restore_index.argsort(dim=1)
    shuffled = gather_tokens(tokens, shuffle_index)
    assert torch.equal(shuffled[:, :16], gather_tokens(tokens, keep_index))
    assert torch.equal(gather_tokens(shuffled, restore_index), tokens)


def test_patchify_round_trip_and_layout():
    images = torch.randn(2, 3, 32, 32)
    patches = patchify(images, 4)
    assert patches.shape == (2, 64, 48)
    assert torch.equal(patches[0, 1].view(4, 4, 3), images[0, :, 0:4, 4:8].permute(1, 2, 0))
    assert torch.equal(unpatchify(patches, 4), images)


def test_loss_counts_masked_patches_only():
    torch.manual_seed(0)
    model = MaskedAutoencoder(MAEConfig(**SMALL))
    images = torch.randn(2, 3, 32, 32)
    _, mask, _ = random_masking(2, 64, 0.75)
    prediction = torch.randn(2, 64, 48)
    changed = prediction.clone()
    changed[mask == 0] += 100.0  # wrong only where the encoder saw the patch
    assert model.reconstruction_loss(images, prediction, mask) == model.reconstruction_loss(images, changed, mask)
    changed[mask == 1] += 1.0
    assert model.reconstruction_loss(images, changed, mask) != model.reconstruction_loss(images, prediction, mask)


def test_encoder_sees_only_visible_patches():
    model = MaskedAutoencoder(MAEConfig(**SMALL))
    keep_index, _, _ = random_masking(3, 64, 0.75)
    assert model.encode(torch.randn(3, 3, 32, 32), keep_index).shape == (3, 1 + 16, 192)


def test_teacher_momentum_is_a_cosine_over_all_steps():
    assert teacher_momentum(0, 1000, 0.996, 1.0) == pytest.approx(0.996)
    assert teacher_momentum(500, 1000, 0.996, 1.0) == pytest.approx(0.998)
    assert teacher_momentum(1000, 1000, 0.996, 1.0) == pytest.approx(1.0)
    # the global step, not the step within an epoch: step 750 of 1000 is past the middle
    assert teacher_momentum(750, 1000, 0.996, 1.0) == pytest.approx(1.0 - 0.004 * (math.cos(0.75 * math.pi) + 1) / 2)


def test_ema_update_matches_the_formula_and_teacher_gets_no_gradient():
    torch.manual_seed(0)
    model = ReconstructionConsistentMAE(RCMAEConfig(**SMALL, teacher_schedule="cosine")).train()
    assert not model.teacher.training
    with torch.no_grad():
        for param in model.student.parameters():
            param.add_(torch.randn_like(param))
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    student = model.student.state_dict()
    loss, parts = model(torch.randn(2, 3, 32, 32))
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert set(parts) == {"loss_recon", "loss_consistency"} and parts["loss_consistency"] > 0
    logs = model.after_micro_batch(MicroBatch(index_in_epoch=499, per_epoch=500, accumulation=2, epochs=4, step=250,
                                              total_steps=1000, stepped=True))
    momentum = logs["teacher_momentum"]
    assert momentum == pytest.approx(teacher_momentum(250, 1000, 0.996, 1.0))
    after = model.teacher.state_dict()
    for key in ["encoder.blocks.0.attn.qkv.weight", "decoder_pred.weight", "mask_token"]:
        torch.testing.assert_close(after[key], momentum * before[key] + (1 - momentum) * student[key])


def test_teacher_sees_the_students_mask(monkeypatch):
    torch.manual_seed(0)
    model = ReconstructionConsistentMAE(RCMAEConfig(**SMALL))
    seen = []
    for name, part in (("student", model.student), ("teacher", model.teacher)):
        original = part.encode

        def spy(images, keep_index, original=original, name=name):
            seen.append((name, keep_index.clone()))
            return original(images, keep_index)

        monkeypatch.setattr(part, "encode", spy)
    model(torch.randn(2, 3, 32, 32))
    assert [name for name, _ in seen] == ["student", "teacher"]
    assert torch.equal(seen[0][1], seen[1][1])


def test_rcmae_exports_the_teacher():
    model = ReconstructionConsistentMAE(RCMAEConfig(**SMALL))
    assert model.export_encoder() is model.teacher.encoder


@pytest.fixture(scope="module")
def photos_root(tmp_path_factory):
    """The embedded photo set as --embedded writes it."""
    return write_embedded_photos(tmp_path_factory.mktemp("datasets") / "photos-embedded")


@pytest.mark.slow  # trains: 50 steps per method
@pytest.mark.parametrize(("method", "extra"), [("mae", {}), ("rcmae", {}), ("mixedae", {}),
                                              ("mixedae", dict(mixtures_per_group=4))])  # MixedAE-Full's mixing
def test_loss_decreases_on_the_embedded_photos(method, extra, photos_root):
    torch.manual_seed(0)
    model = small_method(method, **extra)
    photos = EmbeddedPhotos(photos_root, img_size=32, samples_per_epoch=16, seed=0)
    images = torch.stack([photos[i][0] for i in range(16)])  # (image, index if its file was unreadable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                                  betas=(0.9, 0.95))
    losses = []
    for step in range(50):
        loss, _ = model(images)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if hasattr(model, "after_micro_batch"):
            model.after_micro_batch(MicroBatch(index_in_epoch=step, per_epoch=50, accumulation=1, epochs=1,
                                               step=step + 1, total_steps=50, stepped=True))
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (method, first, last)


@pytest.mark.parametrize("method", ["mae", "rcmae", "mixedae"])
def test_every_trainable_parameter_gets_a_gradient(method):
    """DDP (without find_unused_parameters) needs every trainable parameter in the graph of each step."""
    model = small_method(method)
    loss, _ = model(torch.randn(4, 3, 32, 32))
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


# ------------------------------------------------------------------------------------- as the releases do it


def assert_xavier_uniform(tensor: torch.Tensor, fan_in: int, fan_out: int, name: str) -> None:
    """U(−b, b) with b = √(6 / (fan_in + fan_out)): the values fill the support up to b, and their std is b/√3."""
    bound = math.sqrt(6 / (fan_in + fan_out))
    assert_uniform(tensor, bound, name)


def assert_uniform(tensor: torch.Tensor, bound: float, name: str) -> None:
    largest = tensor.abs().max().item()
    assert 0.95 * bound <= largest <= bound, (name, largest, bound)  # n ≥ 192 draws reach 0.95 b (p > 0.9999)
    if tensor.numel() >= 3000:  # the sample std within 8% (≥ 3 standard errors)
        assert tensor.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.08), name


@pytest.mark.parametrize("method", ["mae", "rcmae", "mixedae"])
def test_initialisation_is_the_releases(method):
    """MAE's models_mae.py ``initialize_weights``: every Linear weight of encoder and decoder xavier-uniform with a
    zero bias, the patch embedding's weight xavier-uniform as a (D, 3·p·p) matrix while its bias keeps Conv2d's
    default U(±1/√(3·p·p)), LayerNorms 1 / 0. RC-MAE's student (its teacher is a copy) and MixedAE build on it."""
    torch.manual_seed(0)
    model = small_method(method)
    autoencoder = model.student if method == "rcmae" else model
    linear = 0
    for name, module in autoencoder.named_modules():
        if isinstance(module, nn.Linear):
            fan_out, fan_in = module.weight.shape
            assert_xavier_uniform(module.weight, fan_in, fan_out, name)
            assert torch.all(module.bias == 0), name
            linear += 1
        elif isinstance(module, nn.LayerNorm):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0), name
    assert linear == 12 * 4 + 1 * 4 + 2  # encoder blocks (qkv, proj, fc1, fc2), the decoder block, embed and pred
    patch = autoencoder.encoder.patch_embed.proj
    assert_xavier_uniform(patch.weight, fan_in=3 * 4 * 4, fan_out=192, name="patch_embed")
    assert_uniform(patch.bias, 1 / math.sqrt(3 * 4 * 4), "patch_embed bias")
    if method == "rcmae":
        teacher = model.teacher.state_dict()
        assert all(torch.equal(value, teacher[key]) for key, value in model.student.state_dict().items())


def test_vit_b_initialisation_has_the_releases_scale():
    """ViT-B as MAE initialises it (the issue's figures: qkv std 0.026, attention proj and patch embedding 0.036,
    class and mask token 0.02), not timm's (trunc-normal 0.02, class token 1e-6)."""
    torch.manual_seed(0)
    model = MaskedAutoencoder(MAEConfig(arch="vit_base_patch16_224"))
    block = model.encoder.blocks[0]
    assert block.attn.qkv.weight.std().item() == pytest.approx(math.sqrt(2 / (768 + 3 * 768)), rel=0.01)  # 0.0255
    assert block.attn.proj.weight.std().item() == pytest.approx(math.sqrt(2 / (2 * 768)), rel=0.01)  # 0.0361
    patch = model.encoder.patch_embed.proj.weight
    assert patch.std().item() == pytest.approx(math.sqrt(2 / (768 + 3 * 16 * 16)), rel=0.01)  # 0.0361
    for token in (model.encoder.cls_token, model.mask_token):  # 768 and 512 draws: the std within 15%
        assert token.std().item() == pytest.approx(0.02, rel=0.15)


@pytest.mark.parametrize("method", ["mae", "rcmae", "mixedae"])
def test_weight_decay_groups_are_the_releases(method):
    """timm's ``add_weight_decay`` with no skip list (MAE main_pretrain.py, RC-MAE run_pretrain.py), written out by
    module type: Linear and Conv2d weights and the tokens (class, mask; MixedAE's segment embeddings) decayed,
    biases and LayerNorms not, frozen tensors (sin-cos position embeddings, RC-MAE's teacher) in no group."""
    model = small_method(method)
    decayed, undecayed = set(), set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if not param.requires_grad:
                continue
            if (isinstance(module, (nn.Linear, nn.Conv2d)) and name == "weight") or name in (
                    "cls_token", "mask_token", "segment_embed"):
                decayed.add(full)
            else:
                undecayed.add(full)
    names = {id(param): name for name, param in model.named_parameters()}
    groups = weight_decay_groups(model, 0.05)
    assert [group["weight_decay"] for group in groups] == [0.0, 0.05]
    assert [{names[id(p)] for p in group["params"]} for group in groups] == [undecayed, decayed]
    assert {n.rsplit(".", 1)[-1] for n in decayed} >= {"cls_token", "mask_token"}
    frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
    prefix = "student." if method == "rcmae" else ""
    assert {prefix + "encoder.pos_embed", prefix + "decoder_pos_embed"} <= frozen


def test_decoder_per_arch_is_the_releases():
    """MAE's models_mae.py (ViT-B/L/H: 512 wide, 8 blocks, 16 heads), RC-MAE's models_rc.py (ViT-S: 256 / 4 / 8,
    ViT-Ti: 128 / 2 / 4), for every method; a size given keeps its value, the rest comes from the table."""
    expected = {
        "vit_mini_patch4_32": (128, 2, 4), "vit_tiny_patch4_32": (128, 2, 4), "vit_tiny_patch8_64": (128, 2, 4),
        "vit_small_patch16_224": (256, 4, 8),
        "vit_base_patch16_224": (512, 8, 16), "vit_large_patch16_224": (512, 8, 16),
        "vit_huge_patch16_224": (512, 8, 16), "vit_huge_patch14_224": (512, 8, 16),
    }
    assert set(expected) == set(ARCHS)
    for config_class in (MAEConfig, RCMAEConfig, MixedAEConfig):
        for arch, shape in expected.items():
            config = config_class(arch=arch)
            assert (config.decoder_dim, config.decoder_depth, config.decoder_heads) == shape, (config_class, arch)
    given = MAEConfig(arch="vit_small_patch16_224", decoder_dim=64)
    assert (given.decoder_dim, given.decoder_depth, given.decoder_heads) == (64, 4, 8)
    model = MaskedAutoencoder(MAEConfig(arch="vit_tiny_patch4_32"))
    assert (model.decoder_embed.out_features, len(model.decoder_blocks), model.decoder_blocks[0].attn.num_heads) == (
        128, 2, 4)


def test_visible_patch_count_rounds_down_as_mae():
    """models_mae.py ``random_masking``: len_keep = int(L · (1 − ratio)); rounding would keep 59 and 20 at 0.7, 0.9."""
    for ratio, kept in ((0.7, 58), (0.75, 49), (0.9, 19)):
        assert num_visible(196, ratio) == kept
        keep_index, mask, _ = random_masking(3, 196, ratio)
        assert keep_index.shape == (3, kept) and torch.all(mask.sum(1) == 196 - kept)


def mae_pos_embed_entry(row: int, col: int, channel: int, dim: int) -> float:
    """One entry of MAE's util/pos_embed.py ``get_2d_sincos_pos_embed``, evaluated directly: the first half of the
    channels from the first meshgrid component (``np.meshgrid(grid_w, grid_h)``: the column), the second half from
    the row; each half [sin | cos] of position · ω_k, ω_k = 1 / 10000^(k / (dim/4))."""
    half, quarter = dim // 2, dim // 4
    position = col if channel < half else row
    k = channel % half
    omega = 1 / 10000 ** ((k % quarter) / quarter)
    return math.sin(position * omega) if k < quarter else math.cos(position * omega)


def mae_pos_embed(side: int, dim: int) -> torch.Tensor:
    """(1, 1 + side², dim): a zero row for the class token, then the patches row by row, rounded to float32."""
    rows = [[0.0] * dim] + [[mae_pos_embed_entry(i // side, i % side, c, dim) for c in range(dim)]
                            for i in range(side * side)]
    return torch.tensor(rows, dtype=torch.float64).float().unsqueeze(0)


def test_position_embedding_is_maes_formula():
    """Bit for bit (float64, then float32, as MAE's numpy code), channel order included."""
    for side, dim in ((8, 192), (8, 128), (14, 64)):
        assert torch.equal(sincos_pos_embed((side, side), dim), mae_pos_embed(side, dim)), (side, dim)
    model = MaskedAutoencoder(MAEConfig(arch="vit_tiny_patch4_32"))
    assert torch.equal(model.encoder.pos_embed, mae_pos_embed(8, 192))
    assert torch.equal(model.decoder_pos_embed, mae_pos_embed(8, 128))
    assert "decoder_pos_embed" in model.state_dict()  # so a full checkpoint's is loaded, not recomputed


# ------------------------------------------------------------------------------ the official model's loss


def official_layer_norm(x: torch.Tensor, weights: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], weights[prefix + "weight"], weights[prefix + "bias"], eps=1e-6)


def official_block(x: torch.Tensor, weights: dict[str, torch.Tensor], prefix: str, heads: int) -> torch.Tensor:
    """timm's (0.3.2) ViT block as MAE uses it: pre-norm attention and MLP (exact GELU), residual each."""
    batch, tokens, width = x.shape
    h = official_layer_norm(x, weights, prefix + "norm1.")
    qkv = F.linear(h, weights[prefix + "attn.qkv.weight"], weights[prefix + "attn.qkv.bias"])
    q, k, v = qkv.reshape(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    attention = ((q * (width // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
    h = (attention @ v).transpose(1, 2).reshape(batch, tokens, width)
    x = x + F.linear(h, weights[prefix + "attn.proj.weight"], weights[prefix + "attn.proj.bias"])
    h = official_layer_norm(x, weights, prefix + "norm2.")
    h = F.gelu(F.linear(h, weights[prefix + "mlp.fc1.weight"], weights[prefix + "mlp.fc1.bias"]))
    return x + F.linear(h, weights[prefix + "mlp.fc2.weight"], weights[prefix + "mlp.fc2.bias"])


def official_mae_loss(weights: dict[str, torch.Tensor], images: torch.Tensor, noise: torch.Tensor, mask_ratio: float,
                      patch: int, heads: int, decoder_heads: int) -> torch.Tensor:
    """The official model's loss (norm_pix_loss), written out step by step from models_mae.py's forward_encoder,
    forward_decoder and forward_loss over its state dict (official key names), with ``noise`` as its masking draws
    (``torch.rand(N, L)``). This, not the official code, is the reference: the official repository is not run here."""
    x = F.conv2d(images, weights["patch_embed.proj.weight"], weights["patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2) + weights["pos_embed"][:, 1:]
    batch, length, width = x.shape
    len_keep = int(length * (1 - mask_ratio))
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    x = torch.gather(x, 1, ids_shuffle[:, :len_keep, None].repeat(1, 1, width))
    mask = torch.ones(batch, length)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    x = torch.cat([(weights["cls_token"] + weights["pos_embed"][:, :1]).expand(batch, -1, -1), x], dim=1)
    depth = 1 + max(int(key.split(".")[1]) for key in weights if key.startswith("blocks."))
    for i in range(depth):
        x = official_block(x, weights, f"blocks.{i}.", heads)
    x = F.linear(official_layer_norm(x, weights, "norm."), weights["decoder_embed.weight"],
                 weights["decoder_embed.bias"])
    mask_tokens = weights["mask_token"].repeat(batch, length + 1 - x.shape[1], 1)
    rest = torch.gather(torch.cat([x[:, 1:], mask_tokens], dim=1), 1, ids_restore[..., None].repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1], rest], dim=1) + weights["decoder_pos_embed"]
    decoder_depth = 1 + max(int(key.split(".")[1]) for key in weights if key.startswith("decoder_blocks."))
    for i in range(decoder_depth):
        x = official_block(x, weights, f"decoder_blocks.{i}.", decoder_heads)
    x = official_layer_norm(x, weights, "decoder_norm.")
    prediction = F.linear(x, weights["decoder_pred.weight"], weights["decoder_pred.bias"])[:, 1:]
    side = images.shape[2] // patch
    target = images.reshape(batch, 3, side, patch, side, patch)
    target = torch.einsum("nchpwq->nhwpqc", target).reshape(batch, side * side, patch * patch * 3)
    target = (target - target.mean(dim=-1, keepdim=True)) / (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
    loss = ((prediction - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


def official_checkpoint_weights(seed: int) -> dict[str, torch.Tensor]:
    """A tiny MAE (vit_tiny_patch4_32, decoder 128 x 2) as official MAE saves it: encoder at the top level beside the
    decoder, every tensor perturbed (so swapped or unused weights would show), position embeddings by MAE's formula."""
    torch.manual_seed(seed)
    weights = {}
    for key, value in MaskedAutoencoder(MAEConfig(arch="vit_tiny_patch4_32")).state_dict().items():
        weights[key.removeprefix("encoder.")] = value + 0.05 * torch.randn_like(value)
    weights["pos_embed"], weights["decoder_pos_embed"] = mae_pos_embed(8, 192), mae_pos_embed(8, 128)
    return weights


def test_reference_loss_formula_by_hand():
    """The loss formula on a tiny case: a zero prediction of norm-pix targets scores, per masked patch,
    mean(t²) = (n − 1)/n · v/(v + 1e-6) (n = 48 pixel values, v the patch's unbiased variance)."""
    model = MaskedAutoencoder(MAEConfig(arch="vit_tiny_patch4_32"))
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(1, 64)
    mask[0, [0, 5, 63]] = 1
    variance = patchify(images, 4).var(dim=-1)[0, [0, 5, 63]]
    expected = (47 / 48 * variance / (variance + 1e-6)).mean()
    assert model.reconstruction_loss(images, torch.zeros(1, 64, 48), mask).item() == pytest.approx(expected.item())


def test_loss_on_an_official_full_checkpoint_equals_the_official_models(tmp_path):
    """Same weights (an official-layout full checkpoint through our loader), same images, same mask draws: our
    MaskedAutoencoder's loss equals :func:`official_mae_loss`'s."""
    weights = official_checkpoint_weights(seed=5)
    torch.save({"model": weights}, tmp_path / "mae_full.pth")
    model = MaskedAutoencoder(MAEConfig(arch="vit_tiny_patch4_32"))
    report = load_pretraining_checkpoint(model, tmp_path / "mae_full.pth")
    assert len(report.loaded) == len(weights) == len(model.state_dict())
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(7)
    noise = torch.rand(4, 64)  # the draws of both random_masking and the release's masking
    torch.manual_seed(7)
    ours, _ = model(images)
    theirs = official_mae_loss(weights, images, noise, 0.75, patch=4, heads=3, decoder_heads=4)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    torch.manual_seed(8)
    assert model(images)[0].item() != pytest.approx(theirs.item(), rel=1e-5)  # another mask: another loss


@pytest.mark.parametrize("release_accumulation", [1, 2])
def test_release_teacher_per_optimizer_step_is_the_releases_on_any_number_of_processes(release_accumulation):
    """The release moves the teacher after every micro-batch at its script's accumulation R (8 GPUs); on another
    process count our accumulation a differs, and each micro-batch applies m^(R/a): at every step boundary the
    teacher is the release's, m^R of itself plus the rest of the student after that step (to float precision)."""
    torch.manual_seed(0)
    students = [torch.randn(5) for _ in range(4)]  # the student after each of 4 optimizer steps
    teacher0 = torch.randn(5)

    def run(accumulation: int) -> list[torch.Tensor]:
        model = ReconstructionConsistentMAE(RCMAEConfig(**SMALL, release_accumulation=release_accumulation))
        teacher, boundaries = teacher0.clone(), []
        for step, student in enumerate(students, 1):
            for micro in range(accumulation):
                stepped = micro == accumulation - 1
                momentum = model.momentum(MicroBatch(
                    index_in_epoch=0, per_epoch=4 * accumulation, accumulation=accumulation, epochs=1600, step=step,
                    total_steps=4, stepped=stepped))
                # the release's order: a micro-batch that closes a step updates after the step, towards its
                # student; the others before the next step, towards the same student
                teacher = momentum * teacher + (1 - momentum) * student
            boundaries.append(teacher)
        return boundaries

    m = teacher_momentum(0, 1600 * 4, 0.996, 1.0)
    release, expected = teacher0.clone(), []
    for student in students:  # the release's own count of updates per step
        for _ in range(release_accumulation):
            release = m * release + (1 - m) * student
        expected.append(release)
    for accumulation in (1, 2, 4):  # e.g. 16, 8 and 4 GPUs at the release's 4096 per step
        for got, want in zip(run(accumulation), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_release_teacher_schedule_moves_after_every_micro_batch():
    """``release``: an update after every micro-batch, m by the index within the epoch; ``cosine``: after each
    optimizer step only, m by the step over the run."""
    release = ReconstructionConsistentMAE(RCMAEConfig(**SMALL))
    cosine = ReconstructionConsistentMAE(RCMAEConfig(**SMALL, teacher_schedule="cosine"))
    inside = MicroBatch(index_in_epoch=3, per_epoch=10, accumulation=2, epochs=100, step=51, total_steps=500,
                        stepped=False)
    closing = dataclasses.replace(inside, index_in_epoch=4, step=52, stepped=True)
    assert release.momentum(inside) == pytest.approx(teacher_momentum(3, 1000, 0.996, 1.0))
    assert release.momentum(closing) == pytest.approx(teacher_momentum(4, 1000, 0.996, 1.0))
    assert cosine.momentum(inside) is None and cosine.after_micro_batch(inside) == {}
    assert cosine.momentum(closing) == pytest.approx(teacher_momentum(52, 500, 0.996, 1.0))
    # over a 1600-epoch run the release's momentum stays at 0.996 to 1e-8 through every epoch
    last = MicroBatch(index_in_epoch=1250, per_epoch=1251, accumulation=2, epochs=1600, step=1, total_steps=1,
                      stepped=True)
    assert 0.996 <= release.momentum(last) < 0.996 + 1e-8
    with pytest.raises(ValueError, match="teacher_schedule must be one of release, cosine"):
        RCMAEConfig(**SMALL, teacher_schedule="paper")
