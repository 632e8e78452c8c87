"""pretrain/run.py as a user meets it: presets and replayable configs, the run-directory rule, unreadable images."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from mimbench.backbones.checkpoint import read_checkpoint
from mimbench.core.config import RunSpec, to_dict
from mimbench.core.rundir import read_config
from mimbench.pretrain.data import write_embedded_photos
from mimbench.pretrain.engine import PRESETS, PretrainConfig, checkpoint_paths, resolve
from mimbench.pretrain.run import main, parse_args

ROOT = Path(__file__).resolve().parents[1]
# Two optimizer steps of a tiny model: 16 crops per epoch, batch 8, one epoch.
TINY = ["--preset", "embedded_cpu", "--arch", "vit_tiny_patch4_32", "--batch-size", "8", "--samples-per-epoch", "16",
        "--epochs", "1", "--warmup-epochs", "1", "--num-workers", "0", "--decoder-dim", "64", "--decoder-depth", "1",
        "--keep-checkpoints", "1", "--precision", "fp32"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return write_embedded_photos(tmp_path_factory.mktemp("datasets") / "photos-embedded")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, photos) -> tuple[Path, list[str]]:
    """A finished tiny RC-MAE run (not the default method, so a replay must take it from the file) and its flags."""
    args = ["--method", "rcmae", "--data-root", str(photos), *TINY]
    out = tmp_path_factory.mktemp("runs") / "rcmae"
    assert main([*args, "--out", str(out)]) == 0
    return out, args


def error_line(capsys) -> str:
    """stderr as exactly one ``error:`` line."""
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def losses(out: Path) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars("pretrain/loss")]


def write_images(folder: Path, count: int, bad: int = 0) -> Path:
    """``count`` small valid images and, sorted after them, ``bad`` files with an image name and garbage bytes."""
    folder.mkdir(parents=True)
    pixels = np.random.default_rng(0).integers(0, 256, (count, 36, 36, 3), dtype=np.uint8)
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(folder / f"a{i:03d}.png")
    for i in range(bad):
        (folder / f"fake{i}.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    return folder


# ------------------------------------------------------------------------------------------------ configs


@pytest.mark.slow
def test_the_resolved_config_is_written_and_replays_bit_for_bit(finished, tmp_path):
    out, _ = finished
    saved = read_config(out / "config.yaml")
    assert saved["preset"] == "embedded_cpu" and saved["run"]["method"] == "rcmae"
    assert saved["recipe"]["arch"] == "vit_tiny_patch4_32" and saved["run"]["arch"] is None  # folded into the recipe
    options = saved["recipe"]["method_options"]
    assert options["decoder_dim"] == 64 and options["decoder_heads"] == 4  # the flag, and the preset's
    assert options["mask_ratio"] == 0.75 and options["consistency_weight"] == 1.0  # every option spelled out

    replay = tmp_path / "replay"  # --resume into a folder with nothing to resume simply starts
    assert main(["--config", str(out / "config.yaml"), "--out", str(replay), "--resume"]) == 0
    assert len(losses(out)) == 2 and losses(replay) == losses(out)
    expected, got = load_file(out / "encoder.safetensors"), load_file(replay / "encoder.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    again = read_config(replay / "config.yaml")
    assert again["run"].pop("out") == str(replay) and saved["run"].pop("out") == str(out)
    assert again["run"].pop("resume") is True and saved["run"].pop("resume") is False
    assert again == saved


@pytest.mark.slow
def test_config_file_preset_and_flags_resolve_in_that_order(finished):
    out, _ = finished
    path = str(out / "config.yaml")
    assert json.loads(json.dumps(to_dict(parse_args(["--config", path])))) == read_config(path)
    assert parse_args(["--config", path, "--consistency-weight", "2"]).recipe.method_options["consistency_weight"] == 2
    with_preset = parse_args(["--config", path, "--preset", "in1k_vit_b", "--epochs", "5"])
    assert with_preset.recipe.arch == "vit_base_patch16_224" and with_preset.recipe.warmup_epochs == 40
    assert with_preset.recipe.epochs == 5 and with_preset.run.method == "rcmae"
    assert with_preset.run.data_root == read_config(path)["run"]["data_root"]


def test_trainer_called_directly_equals_the_cli(photos):
    cli = parse_args(["--data-root", str(photos), "--preset", "embedded_cpu", "--out", "runs/x"])
    direct = resolve(PretrainConfig(run=RunSpec(method="mae", data_root=str(photos), out="runs/x"),
                                    preset="embedded_cpu", recipe=PRESETS["embedded_cpu"]))
    assert cli == direct
    assert {k: direct.recipe.method_options[k] for k in ("decoder_dim", "decoder_depth", "decoder_heads")} == {
        "decoder_dim": 128, "decoder_depth": 2, "decoder_heads": 4}
    assert (direct.recipe.arch, direct.recipe.epochs, direct.recipe.base_lr) == ("vit_tiny_patch4_32", 10, 6e-4)

    # The paper's preset is the default; the decoder follows the arch (the releases' table), whatever the preset.
    base = parse_args(["--data-root", str(photos), "--arch", "vit_tiny_patch4_32"])
    assert base.preset == "in1k_vit_b" and base.recipe.arch == "vit_tiny_patch4_32"
    assert (base.recipe.epochs, base.recipe.warmup_epochs, base.recipe.base_lr, base.recipe.weight_decay,
            base.recipe.batch_size, base.recipe.total_batch_size) == (300, 40, 1.5e-4, 0.05, 64, 4096)
    assert base.recipe.method_options["decoder_dim"] == 128 and base.recipe.method_options["decoder_depth"] == 2
    vit_b = parse_args(["--data-root", str(photos)]).recipe.method_options
    assert (vit_b["decoder_dim"], vit_b["decoder_depth"], vit_b["decoder_heads"]) == (512, 8, 16)


def printed_config(capsys, argv: list[str]) -> dict:
    assert main([*argv, "--print-config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_print_config_shows_the_releases_recipes(tmp_path, capsys, monkeypatch):
    """--preset mae_vitb_1600 --print-config: MAE's PRETRAIN.md recipe (batch 4096, blr 1.5e-4, warmup 40, norm-pix)
    for 1600 epochs, and the method it is for; RC-MAE's from its scripts (256 per GPU, teacher as released)."""
    monkeypatch.chdir(tmp_path)
    mae = printed_config(capsys, ["--preset", "mae_vitb_1600"])
    recipe = mae["recipe"]
    assert mae["run"]["method"] == "mae" and mae["preset"] == "mae_vitb_1600"
    assert (recipe["arch"], recipe["epochs"], recipe["total_batch_size"], recipe["batch_size"], recipe["base_lr"],
            recipe["warmup_epochs"], recipe["weight_decay"]) == ("vit_base_patch16_224", 1600, 4096, 64, 1.5e-4, 40,
                                                                 0.05)
    assert recipe["method_options"] == {
        "decoder_dim": 512, "decoder_depth": 8, "decoder_heads": 16, "norm_pix_loss": True, "drop_path_rate": 0.0,
        "mask_ratio": 0.75}
    assert printed_config(capsys, ["--preset", "mae_vitl_1600"])["recipe"]["arch"] == "vit_large_patch16_224"
    rcmae = printed_config(capsys, ["--preset", "rcmae_vitl_1600"])
    options = rcmae["recipe"]["method_options"]
    assert rcmae["run"]["method"] == "rcmae" and rcmae["recipe"]["arch"] == "vit_large_patch16_224"
    assert (rcmae["recipe"]["batch_size"], rcmae["recipe"]["total_batch_size"], rcmae["recipe"]["epochs"]) == (
        256, 4096, 1600)
    assert (options["teacher_schedule"], options["momentum_start"], options["consistency_weight"],
            options["norm_pix_loss"], options["mask_ratio"]) == ("release", 0.996, 1.0, True, 0.75)
    assert printed_config(capsys, ["--preset", "rcmae_vitb_1600", "--epochs", "800"])["recipe"]["epochs"] == 800
    assert not list(tmp_path.iterdir())  # printed, nothing run or written


def test_a_release_preset_with_another_method_is_one_line(tmp_path, capsys):
    assert main(["--preset", "rcmae_vitb_1600", "--method", "mae", "--data-root", str(tmp_path),
                 "--out", str(tmp_path / "o")]) == 1
    assert "preset 'rcmae_vitb_1600' is the rcmae release's recipe, not mae's; run it with --method rcmae" in (
        error_line(capsys))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("content, expected", [
    (None, "no such config file"),
    ("run: [unclosed", "not readable YAML"),
    ("run: {method: mae}\ncolour: blue\n", "unknown field(s) colour"),
    ("run: {method: simclr, data_root: /data}\n", "unknown method 'simclr'"),
    ("run: {method: mae, data_root: /data}\nrecipe: {arch: vit_gigantic}\n", "unknown arch 'vit_gigantic'"),
])
def test_a_bad_config_file_is_one_line(tmp_path, capsys, content, expected):
    path = tmp_path / "config.yaml"
    if content is not None:
        path.write_text(content)
    assert main(["--config", str(path), "--out", str(tmp_path / "o")]) == 1
    assert expected in error_line(capsys)


def test_embedded_into_a_folder_of_other_images_is_one_line(tmp_path, capsys):
    """--embedded --data-root DIR writes the set at DIR, so DIR must be new, empty or the set already."""
    folder = write_images(tmp_path / "holiday", 2)
    assert main(["--embedded", "--data-root", str(folder), "--out", str(tmp_path / "o")]) == 1
    err = error_line(capsys)
    assert str(folder) in err and "not the embedded photo set" in err
    assert sorted(p.name for p in folder.iterdir()) == ["a000.png", "a001.png"]  # left as it was


@pytest.mark.slow
def test_embedded_writes_the_photo_set_once_and_runs_on_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["--embedded", *TINY[2:], "--out", "o"]) == 0
    root = tmp_path / "runs" / "datasets" / "photos-embedded"
    assert len(list(root.glob("*.png"))) == len(json.loads((root / "manifest.json").read_text())["photos"]) >= 15
    saved = read_config(tmp_path / "o" / "config.yaml")
    assert saved["run"]["data_root"] == "runs/datasets/photos-embedded" and saved["preset"] == "embedded_cpu"
    _, metadata = read_checkpoint(tmp_path / "o" / "encoder.safetensors")
    assert metadata.data == "embedded:scikit-image photos (16 crops/epoch)"


# ------------------------------------------------------------------------------------------ run directories


def test_a_second_run_into_a_held_folder_stops_naming_the_holder(photos, tmp_path, capsys):
    out = tmp_path / "busy"
    # The holder keeps the lock until the test closes its stdin (however long the second run takes to get there).
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from mimbench.core.rundir import RunLock; "
         f"RunLock({str(out)!r}).acquire(); print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["--data-root", str(photos), *TINY, "--out", str(out)]) == 1
    finally:
        holder.kill()
        holder.wait()
    err = error_line(capsys)
    assert f"pid {holder.pid} on " in err and "in use by another run" in err
    assert not checkpoint_paths(out) and not (out / "config.yaml").exists()


@pytest.mark.slow
def test_an_existing_run_continues_only_with_resume(finished, capsys):
    out, args = finished
    exported = (out / "encoder.safetensors").stat().st_mtime_ns
    assert main([*args, "--out", str(out)]) == 1
    assert "holds a run already; pass --resume" in error_line(capsys)
    assert (out / "encoder.safetensors").stat().st_mtime_ns == exported


@pytest.mark.slow
@pytest.mark.parametrize("change, named", [
    (["--arch", "vit_tiny_patch8_64"], "recipe.arch: 'vit_tiny_patch4_32' -> 'vit_tiny_patch8_64'"),
    (["--decoder-dim", "32"], "recipe.method_options.decoder_dim: 64 -> 32"),
    (["--mask-ratio", "0.5"], "recipe.method_options.mask_ratio: 0.75 -> 0.5"),
    (["--method", "mae"], "run.method: 'rcmae' -> 'mae'"),
    (["--seed", "1"], "run.seed: 0 -> 1"),
    (["--precision", "bf16"], "run.precision: 'fp32' -> 'bf16'"),
    (["--batch-size", "4"], "recipe.batch_size: 8 -> 4"),
    (["--epochs", "2"], "recipe.epochs: 1 -> 2"),
    (["--samples-per-epoch", "24"], "recipe.samples_per_epoch: 16 -> 24"),
])
def test_resuming_with_other_model_or_data_settings_stops_naming_them(finished, capsys, change, named):
    out, args = finished
    assert main([*args, *change, "--num-workers", "1", "--out", str(out), "--resume"]) == 1
    err = error_line(capsys)
    assert named in err and "num_workers" not in err and "size mismatch" not in err


@pytest.mark.slow
def test_resuming_another_data_root_stops_naming_it(finished, tmp_path, capsys):
    out, args = finished
    other = write_images(tmp_path / "other", 16)
    assert main([*args, "--data-root", str(other), "--out", str(out), "--resume"]) == 1
    assert f"run.data_root: {args[args.index('--data-root') + 1]!r} -> {str(other)!r}" in error_line(capsys)


@pytest.mark.slow
def test_resuming_with_harmless_changes_continues(finished, tmp_path):
    original, args = finished
    out = tmp_path / "copy"
    shutil.copytree(original, out)
    harmless = ["--num-workers", "1", "--save-every-steps", "7", "--keep-checkpoints", "3", "--compile", "off",
                "--device", "cpu", "--max-bad-image-share", "0.2"]
    assert main([*args, *harmless, "--out", str(out), "--resume"]) == 0
    expected, got = load_file(original / "encoder.safetensors"), load_file(out / "encoder.safetensors")
    assert all(torch.equal(got[key], expected[key]) for key in expected)  # the finished run, exported again
    assert read_config(out / "config.yaml")["recipe"]["num_workers"] == 1  # the new settings are recorded


# ----------------------------------------------------------------------------------------- unreadable files


@pytest.mark.slow
def test_one_unreadable_file_is_skipped_with_a_warning_and_counted(tmp_path):
    """127 images and a fake.jpg (0.8% < the default 1%), two epochs read by two DataLoader worker processes: the
    command as a user runs it, so the workers' warnings reach its stderr."""
    folder = write_images(tmp_path / "images", 127, bad=1)
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, str(ROOT / "pretrain" / "run.py"), "--data-root", str(folder), *TINY, "--batch-size", "16",
         "--epochs", "2", "--num-workers", "2", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"{folder / 'fake0.jpg'}: cannot read image" in done.stderr
    assert "epoch 1: 1 unreadable image file(s) skipped so far, 0.781% of 128" in done.stdout
    state, _ = read_checkpoint(checkpoint_paths(out)[-1])
    assert state["step"] == 16 and state["unreadable"] == [127]  # counted once over two epochs
    assert json.loads((out / "cost.json").read_text())["unreadable_images"] == 1
    _, metadata = read_checkpoint(out / "encoder.safetensors")
    assert metadata.extra["cost"]["unreadable_images"] == 1 and metadata.data == str(folder)


@pytest.mark.slow
def test_too_many_unreadable_files_stop_the_run_naming_the_limit(tmp_path, capfd):
    folder = write_images(tmp_path / "images", 12, bad=4)
    common = ["--data-root", str(folder), *TINY, "--epochs", "2"]
    with pytest.warns(UserWarning, match="fake.\\.jpg: cannot read image"):
        assert main([*common, "--out", str(tmp_path / "strict")]) == 1
    err = capfd.readouterr().err.strip()
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("error: ") and "of the 16 images" in last and "--max-bad-image-share 0.01 (1.0%)" in last

    with pytest.warns(UserWarning) as warned:
        assert main([*common, "--max-bad-image-share", "0.3", "--out", str(tmp_path / "lenient")]) == 0
    assert {Path(str(warning.message).split(":")[0]).name for warning in warned} == {f"fake{i}.jpg" for i in range(4)}
    assert json.loads((tmp_path / "lenient" / "cost.json").read_text())["unreadable_images"] == 4
