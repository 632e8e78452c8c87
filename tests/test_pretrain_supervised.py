"""Supervised pretraining (pretrain/supervised.py) on the embedded digits: the loss falls, val top-1 beats the
trivial baseline, a run stopped mid-epoch resumes exactly, the export is a headless backbone marked supervised."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from mimbench.backbones.checkpoint import backbone_from_checkpoint
from mimbench.backbones.cli import forward_gflops
from mimbench.backbones.vit import count_parameters, create_backbone
from mimbench.pretrain import run as pretrain_run
from mimbench.pretrain.engine import checkpoint_paths
from mimbench.pretrain.supervised import (
    DROP_PATH,
    PRESETS,
    SupervisedConfig,
    SupervisedTrainer,
    parse_args,
    trivial_baseline,
    write_embedded_digits,
)
from mimbench.results import read_results

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return write_embedded_digits(tmp_path_factory.mktemp("digits") / "set")


def small_digits(digits: Path, root: Path, per_class: int) -> Path:
    """The first ``per_class`` training images of each digit (val kept whole)."""
    shutil.copytree(digits / "val", root / "val")
    for folder in sorted((digits / "train").iterdir()):
        (root / "train" / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:per_class]:
            shutil.copy(image, root / "train" / folder.name / image.name)
    return root


def config(root: Path, out: Path, **recipe) -> SupervisedConfig:
    base = SupervisedConfig()
    return dataclasses.replace(base, preset="embedded_cpu", run=dataclasses.replace(
        base.run, data_root=str(root), out=str(out), device="cpu", precision="fp32",
        results=str(out.parent / "results.jsonl")),
        recipe=dataclasses.replace(PRESETS["embedded_cpu"], **recipe))


class Stop(Exception):
    pass


def test_the_recipe_is_deits_and_drop_path_is_per_arch(digits):
    parsed = parse_args(["--data-root", str(digits), "--arch", "mpvit_small"])
    recipe = parsed.recipe
    assert (recipe.epochs, recipe.warmup_epochs, recipe.base_lr, recipe.weight_decay) == (300, 5, 5e-4, 0.05)
    assert (recipe.label_smoothing, recipe.mixup, recipe.cutmix, recipe.random_erasing) == (0.1, 0.8, 1.0, 0.25)
    assert recipe.auto_augment == "rand-m9-mstd0.5-inc1" and recipe.repeated_augmentation == 3
    assert (recipe.batch_size, recipe.total_batch_size) == (128, 1024)  # DeiT's 8 GPUs, by accumulation on fewer
    assert recipe.arch == "mpvit_small" and recipe.drop_path_rate == DROP_PATH["mpvit_small"] == 0.05
    assert parse_args(["--data-root", str(digits), "--arch", "mpvit_base"]).recipe.drop_path_rate == 0.3


@pytest.mark.slow
def test_loss_falls_and_top1_beats_the_trivial_baseline(digits, tmp_path):
    trainer = SupervisedTrainer(config(digits, tmp_path / "run", epochs=4))
    losses = []
    original = trainer.criterion

    def recorded(logits, targets):
        loss = original(logits, targets)
        losses.append(loss.item())
        return loss

    trainer.criterion = recorded
    path = trainer.train()
    baseline = trivial_baseline(trainer.val_set)
    assert baseline < 12 and trainer.top1[-1] > 2 * baseline  # 10 classes: the largest is 11.7% of val
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.05
    (record,), _ = read_results(tmp_path / "results.jsonl")
    assert (record.task, record.dataset, record.protocol, record.method, record.arch) == (
        "classification", "digits-embedded", "supervised", "supervised", "mpvit_nano_cpu")
    assert record.value == trainer.top1[-1] and record.config["preset"] == "embedded_cpu"
    model, report = backbone_from_checkpoint(path)
    assert model.arch == "mpvit_nano_cpu" and report.metadata.method == "supervised"
    assert record.params == report.metadata.extra["params"] == count_parameters(model) == 303_744
    assert record.gflops == report.metadata.extra["gflops"] == round(forward_gflops("mpvit_nano_cpu")[1], 4)
    assert report.missing == [] and not any(k.startswith("cls_head") for k in report.loaded)


@pytest.mark.slow
def test_a_run_stopped_mid_epoch_resumes_exactly(digits, tmp_path):
    root = small_digits(digits, tmp_path / "small", per_class=16)  # 160 images: 5 steps of 32 per epoch
    settings = dict(epochs=2, batch_size=32, save_every_steps=3, mixup=0.8, cutmix=1.0, repeated_augmentation=2)
    whole = SupervisedTrainer(config(root, tmp_path / "whole", **settings))
    whole.train()

    stopped = SupervisedTrainer(config(root, tmp_path / "parts", **settings))
    save = stopped.save

    def save_then_stop():
        save()
        if stopped.step == 6:  # mid second epoch
            raise Stop

    stopped.save = save_then_stop
    with pytest.raises(Stop):
        stopped.train()
    resumed = SupervisedTrainer(dataclasses.replace(
        config(root, tmp_path / "parts", **settings),
        run=dataclasses.replace(config(root, tmp_path / "parts").run, resume=True)))
    resumed.train()
    assert resumed.step == whole.step == 10
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.top1 == whole.top1
    # the engine's resumable checkpoint: the classifier's own state dict (what the landscape study loads), the run's
    # config and the top-1 so far
    state = torch.load(checkpoint_paths(tmp_path / "parts")[-1], weights_only=False)
    assert list(state["model"]) == list(create_backbone("mpvit_nano_cpu", num_classes=10).state_dict())
    assert json.loads(state["config"])["run"]["method"] == "supervised" and state["top1"] == whole.top1


def test_an_unreadable_image_is_skipped_with_its_neighbour_standing_in(digits, tmp_path):
    root = small_digits(digits, tmp_path / "small", per_class=1)
    broken = sorted((root / "train" / "3").iterdir())[0]
    broken.write_bytes(b"not a png")
    trainer = SupervisedTrainer(config(root, tmp_path / "run", batch_size=8))
    order = [trainer.dataset.folder.samples[int(i)][0] for i in trainer.dataset.order]
    index = order.index(str(broken))
    with pytest.warns(UserWarning, match="cannot read image"):
        image, label, unreadable = trainer.dataset[index]
    assert unreadable == index and label == trainer.dataset.folder.samples[
        int(trainer.dataset.order[(index + 1) % len(order)])][1]
    assert trainer.dataset[(index + 1) % len(order)][2] == -1 and image.shape == (3, 32, 32)


def test_the_pretrain_entry_point_takes_supervised_and_a_bad_root_is_one_line(tmp_path, capsys):
    assert pretrain_run.main(["--method", "supervised", "--data-root", str(tmp_path), "--out",
                              str(tmp_path / "out"), "--device", "cpu"]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "ImageNet's layout" in error[0]


def test_a_supervised_preset_reaches_its_own_parser(tmp_path):
    """--preset names a supervised preset through pretrain/run.py (not only the MAE family's): the ViT preset with
    its own lr, whole-digit crops, no flips and no mixing."""
    argv = ["--method", "supervised", "--preset", "embedded_cpu_vit", "--data-root", str(tmp_path)]
    assert pretrain_run.chosen_method(argv) == "supervised"
    config = parse_args(argv)
    assert config.recipe.arch == "vit_tiny_patch4_32" and config.recipe.base_lr == pytest.approx(4e-3)
    assert (config.recipe.crop_scale, config.recipe.hflip, config.recipe.mixup) == ((0.6, 1.0), 0.0, 0.0)
    with pytest.raises(SystemExit):  # an engine preset is not a supervised one: argparse names the choices
        parse_args(["--method", "supervised", "--preset", "mae_vitb_1600"])
