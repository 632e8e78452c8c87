"""MAE and RC-MAE math, and every method's loss going down on the embedded photos."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from mimbench.core.config import RunSpec
from mimbench.pretrain.data import EmbeddedPhotos, write_embedded_photos
from mimbench.pretrain.engine import BASE, PretrainConfig, build_method
from mimbench.pretrain.mae import MAEConfig, MaskedAutoencoder, gather_tokens, patchify, random_masking, unpatchify
from mimbench.pretrain.rcmae import RCMAEConfig, ReconstructionConsistentMAE, teacher_momentum

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
    model = ReconstructionConsistentMAE(RCMAEConfig(**SMALL)).train()
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
    logs = model.after_optimizer_step(step=250, total_steps=1000)
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
        if hasattr(model, "after_optimizer_step"):
            model.after_optimizer_step(step + 1, 50)
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
