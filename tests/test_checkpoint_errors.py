"""Bad checkpoints: each is one CheckpointError line naming the file; nothing is ever executed."""

from __future__ import annotations

import os
import pickle
import random

import pytest
import torch
from timm.layers import resample_abs_pos_embed

from mimbench.backbones.checkpoint import (
    CheckpointError,
    CheckpointMetadata,
    load_backbone,
    save_backbone,
)
from mimbench.backbones.cli import main as cli_main
from mimbench.backbones.vit import create_backbone

TINY = "vit_tiny_patch4_32"


@pytest.fixture(scope="module")
def tiny_state_dict():
    torch.manual_seed(0)
    return create_backbone(TINY).state_dict()


def expect_error(path, match: str, model=None) -> str:
    with pytest.raises(CheckpointError, match=match) as info:
        load_backbone(model if model is not None else create_backbone(TINY), path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    return message


def test_missing_path(tmp_path):
    expect_error(tmp_path / "nowhere.pth", "no such file")


def test_empty_file_and_directory(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    expect_error(tmp_path / "empty.pth", "empty")
    expect_error(tmp_path, "directory")


def test_truncated_torch_file(tmp_path, tiny_state_dict):
    torch.save(tiny_state_dict, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    expect_error(tmp_path / "cut.pth", "truncated or corrupt")


def test_truncated_safetensors(tmp_path, tiny_state_dict):
    path = save_backbone(tmp_path / "full.safetensors", tiny_state_dict, CheckpointMetadata("mae", TINY))
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[:100_000])
    expect_error(tmp_path / "cut.safetensors", "corrupt or truncated safetensors")


def test_random_bytes_and_text(tmp_path):
    (tmp_path / "noise.pth").write_bytes(random.Random(0).randbytes(4096))
    expect_error(tmp_path / "noise.pth", "corrupt")
    (tmp_path / "notes.pth").write_text("this is not a checkpoint\n")
    expect_error(tmp_path / "notes.pth", "corrupt, or not a torch.save")


class RunsCode:
    """Unpickling this object would create a file: the proof of code execution the loader must refuse."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickle_that_would_run_code_is_refused(tmp_path, tiny_state_dict, zip_format):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pth"
    torch.save({"model": tiny_state_dict, "payload": RunsCode(str(marker))}, path,
               _use_new_zipfile_serialization=zip_format)
    expect_error(path, r"refused: unpickling it would call .*system")
    assert not marker.exists()


def test_plain_pickle_is_not_executed(tmp_path):
    marker = tmp_path / "executed"
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump({"model": RunsCode(str(marker))}, f, protocol=4)
    expect_error(tmp_path / "plain.pkl", "corrupt, or not a torch.save")
    assert not marker.exists()


def test_other_architecture(tmp_path):
    torch.save(create_backbone("vit_small_patch16_224").state_dict(), tmp_path / "small.pth")
    message = expect_error(tmp_path / "small.pth", "another architecture than vit_tiny_patch4_32")
    assert "embed_dim 384, depth 12, patch 16" in message


@pytest.mark.parametrize("content", [{}, {"model": {}}, {"state_dict": {}}])
def test_empty_state_dict(tmp_path, content):
    torch.save(content, tmp_path / "empty_dict.pth")
    expect_error(tmp_path / "empty_dict.pth", "empty state dict")


def test_not_a_vit(tmp_path):
    torch.save({"conv1.weight": torch.randn(64, 3, 7, 7), "fc.weight": torch.randn(1000, 2048)},
               tmp_path / "resnet.pth")
    expect_error(tmp_path / "resnet.pth", "no ViT encoder weights")


def test_partial_encoder_fails_loudly_unless_asked(tmp_path, tiny_state_dict):
    partial = {k: v for k, v in tiny_state_dict.items() if not k.startswith("blocks.11.")}
    torch.save(partial, tmp_path / "partial.pth")
    expect_error(tmp_path / "partial.pth", r"provides only 9\d\.\d% of the vit_tiny_patch4_32 encoder")
    report = load_backbone(create_backbone(TINY), tmp_path / "partial.pth", strict=False)
    assert len(report.missing) == 12 and all(k.startswith("blocks.11.") for k in report.missing)
    assert report.encoder_fraction == pytest.approx(138 / 150)


def test_cli_reports_one_line_and_exit_code(tmp_path, capsys):
    (tmp_path / "bad.pth").write_bytes(b"\x00" * 64)
    assert cli_main(["inspect", str(tmp_path / "bad.pth"), "--arch", TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(tmp_path / "bad.pth") in err and "\n" not in err


# ------------------------------------------------------------------------------------ position embeddings


def test_pos_embed_same_grid_is_identity(tmp_path, tiny_state_dict):
    torch.save(tiny_state_dict, tmp_path / "same.pth")
    model = create_backbone(TINY)
    report = load_backbone(model, tmp_path / "same.pth")
    assert report.resized == {}
    assert torch.equal(model.pos_embed, tiny_state_dict["pos_embed"])


def test_pos_embed_resampled_to_larger_grid_keeps_class_token(tmp_path, tiny_state_dict):
    torch.save(tiny_state_dict, tmp_path / "grid8.pth")
    model = create_backbone(TINY, img_size=64)  # 16x16 grid instead of 8x8
    report = load_backbone(model, tmp_path / "grid8.pth")
    source = tiny_state_dict["pos_embed"]
    assert report.resized == {"pos_embed": ([1, 65, 192], [1, 257, 192])}
    assert model.pos_embed.shape == (1, 257, 192)
    assert torch.equal(model.pos_embed[:, :1], source[:, :1])  # class token untouched
    expected = resample_abs_pos_embed(source, [16, 16], [8, 8], num_prefix_tokens=1, interpolation="bicubic")
    torch.testing.assert_close(model.pos_embed.detach(), expected)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 192)


def test_bicubic_resampling_keeps_a_constant_field_constant(tmp_path, tiny_state_dict):
    weights = dict(tiny_state_dict)
    weights["pos_embed"] = torch.cat([torch.full((1, 1, 192), -3.0), torch.full((1, 64, 192), 0.25)], dim=1)
    torch.save(weights, tmp_path / "constant.pth")
    model = create_backbone(TINY, img_size=48)  # 12x12 grid
    load_backbone(model, tmp_path / "constant.pth")
    torch.testing.assert_close(model.pos_embed[0, 1:], torch.full((144, 192), 0.25))
    assert torch.all(model.pos_embed[0, 0] == -3.0)
