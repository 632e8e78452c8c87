"""`make demo` at its real size: summary, checkpoint written by the project, read back, verified."""

from __future__ import annotations

from mimbench.backbones.checkpoint import CheckpointMetadata, read_checkpoint, save_backbone
from mimbench.backbones.cli import main
from mimbench.backbones.vit import create_backbone


def test_demo_writes_and_verifies_a_checkpoint(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "vit_huge_patch14_224" in out and "167.29" in out
    assert "100.0% of encoder weights" in out
    assert "max |output difference| after the round trip: 0.0e+00" in out
    tensors, metadata = read_checkpoint(tmp_path / "vit_tiny_patch4_32_init.safetensors")
    assert metadata.arch == "vit_tiny_patch4_32" and metadata.method == "random-init"
    assert len(tensors) == 150


def test_inspect_prints_the_load_report(tmp_path, capsys):
    path = save_backbone(tmp_path / "tiny.safetensors", create_backbone("vit_tiny_patch4_32"),
                         CheckpointMetadata(method="mae", arch="vit_tiny_patch4_32", epochs=1))
    assert main(["inspect", str(path), "--img-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "mimbench mae checkpoint" in out
    assert "resized pos_embed: [1, 65, 192] -> [1, 257, 192]" in out
