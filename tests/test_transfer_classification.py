"""Classification transfer end to end on the bundled digits: linear probe, fine-tuning, LARS probe, resume, DDP;
the task contract (presets, config.yaml and its replay, the resume rule, precision, bad checkpoints) and a
hierarchical backbone (timm's resnet18)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import timm
import torch
import yaml
from timm.optim import Lars
from torch.utils.data import Subset

from mimbench.backbones.checkpoint import CheckpointMetadata, save_backbone
from mimbench.backbones.vit import count_parameters, create_backbone
from mimbench.core.config import to_dict
from mimbench.core.errors import TrainingDiverged
from mimbench.core.io import file_sha256
from mimbench.core.runtime import Distributed, loader_workers
from mimbench.results import read_results
from mimbench.transfer import classification, features
from mimbench.transfer.classification import LinearProbe, parse_args
from mimbench.transfer.datasets import build_dataset, collate_readable
from mimbench.transfer.features import FeatureCache, cache_key, pooled_features
from mimbench.transfer.finetune import (
    MAE_FINETUNE,
    PRESETS,
    FinetuneRecipe,
    FinetuneRun,
    build_classifier,
    eval_transform,
    train_transform,
)
from mimbench.transfer.logistic import REGULARISATION_GRID
from mimbench.transfer.run import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    metadata = CheckpointMetadata(method="mae", arch="vit_tiny_patch4_32", epochs=3.0,
                                  extra={"cost": {"gpu_days": 0.0}})
    path = tmp_path_factory.mktemp("ckpt") / "tiny_mae.safetensors"
    return save_backbone(path, create_backbone("vit_tiny_patch4_32"), metadata)


def records(store: Path):
    results, malformed = read_results(store)
    assert malformed == []
    return results


@pytest.mark.slow
def test_linear_probe_on_digits_end_to_end_with_feature_cache(tmp_path, checkpoint, capsys):
    store, cache = tmp_path / "results.jsonl", tmp_path / "cache"
    argv = ["digits", "--ckpt", str(checkpoint), "--results", str(store), "--cache-dir", str(cache),
            "--tags", "ablation=probe", "variant=avg"]
    assert main([*argv, "--out", str(tmp_path / "first")]) == 0
    assert "features: extracted" in capsys.readouterr().out
    (result,) = records(store)
    assert result.task == "classification" and result.dataset == "digits" and result.protocol == "linear"
    assert result.metric == "top1" and result.value == pytest.approx(result.metrics["top1"], abs=1e-3)
    assert result.value > 60  # random-init ViT features: far above the 10% of chance
    assert result.method == "mae" and result.arch == "vit_tiny_patch4_32" and result.pretrain_epochs == 3.0
    assert result.checkpoint_sha256 == file_sha256(checkpoint) and result.pretrain_gpu_days == 0.0
    assert result.tags == {"ablation": "probe", "variant": "avg"}
    assert result.config["probe"]["pool"] == "avg" and result.config["regularisation"] in REGULARISATION_GRID
    assert result.config["recipe"] is None and result.config["run"]["ckpt"] == str(checkpoint)
    assert result.config["images"] == {"train": 1150, "val": 288, "test": 359}
    assert result.device.startswith("cpu") and result.date and result.wall_time_s > 0
    assert result.precision == result.compute["precision"] in ("bf16", "fp32") and result.compute["threads"] >= 1
    assert len(list(cache.glob("*.safetensors"))) == 3

    assert main([*argv, "--out", str(tmp_path / "second")]) == 0  # another run reads the cached features
    assert "features: cache" in capsys.readouterr().out
    first, second = records(store)
    assert second.value == first.value and second.config["regularisation"] == first.config["regularisation"]

    # another pooling is another feature set
    assert main([*argv[:-3], "--pool", "token", "--out", str(tmp_path / "token")]) == 0
    assert len(list(cache.glob("*.safetensors"))) == 6
    assert records(store)[-1].config["probe"]["pool"] == "token"


@pytest.mark.slow
def test_per_class_slice_probes_a_fixed_subset_tagged_and_cached_apart(tmp_path, checkpoint, capsys, monkeypatch):
    store, cache = tmp_path / "results.jsonl", tmp_path / "cache"
    described = []
    get_or_extract = FeatureCache.get_or_extract

    def spy(self, description, extract):
        described.append(dict(description))
        return get_or_extract(self, description, extract)

    monkeypatch.setattr(FeatureCache, "get_or_extract", spy)
    argv = ["digits", "--ckpt", str(checkpoint), "--results", str(store), "--cache-dir", str(cache),
            "--per-class", "5", "--tags", "variant=avg"]
    assert main([*argv, "--out", str(tmp_path / "first")]) == 0
    assert "features: extracted" in capsys.readouterr().out
    (result,) = records(store)
    assert result.config["per_class"] == 5
    assert result.config["images"] == {"train": 50, "val": 50, "test": 50}  # 10 digits x 5 in every split
    assert result.tags == {"variant": "avg", "subset": "per_class5"}
    assert len(list(cache.glob("*.safetensors"))) == 3
    # The key holds per_class: the same split's full features (same fields, no per_class) are another entry.
    assert [d["per_class"] for d in described] == [5, 5, 5]
    for description in described:
        full = {k: v for k, v in description.items() if k != "per_class"}
        assert cache_key(**description) != cache_key(**full)
        assert FeatureCache(cache).load(cache_key(**full)) is None
    assert main([*argv, "--out", str(tmp_path / "second")]) == 0  # the same slice again: its own cached features
    assert "features: cache" in capsys.readouterr().out
    assert main(["digits", "--ckpt", str(checkpoint), "--results", str(store), "--per-class", "0"]) == 1
    assert "--per-class 0: give a positive number of images per class" in capsys.readouterr().err
    assert main(["digits", "--ckpt", str(checkpoint), "--results", str(store), "--per-class", "-3"]) == 1
    assert "--per-class -3: give a positive number" in capsys.readouterr().err
    assert len(records(store)) == 2


@pytest.mark.slow
def test_per_class_fine_tuning_trains_on_the_train_and_val_slices(tmp_path, checkpoint):
    store = tmp_path / "results.jsonl"
    assert main(["digits", "--ckpt", str(checkpoint), "--protocol", "finetune", "--per-class", "2", "--epochs", "1",
                 "--batch-size", "16", "--base-lr", "0.003", "--results", str(store),
                 "--out", str(tmp_path / "run")]) == 0
    (result,) = records(store)
    assert result.config["images"] == {"trainval": 40, "test": 20}  # train slice + val slice; test slice
    assert result.tags == {"subset": "per_class2"}
    # the backbone's size: the headless ViT's parameters, GFLOPs of one 32² forward (multiply-add = 1)
    assert result.params == count_parameters(create_backbone("vit_tiny_patch4_32")) == 5_360_832
    assert result.gflops == pytest.approx(0.3651, abs=1e-4)


def test_pooled_features_are_the_class_token_or_the_normalised_mean():
    torch.manual_seed(0)
    model = create_backbone("vit_tiny_patch4_32").eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(images)
        torch.testing.assert_close(pooled_features(model, images, "token"), tokens[:, 0])
        hidden = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        hidden = model.blocks(hidden)
        torch.testing.assert_close(pooled_features(model, images, "avg"), model.norm(hidden[:, 1:].mean(1)))
    with pytest.raises(ValueError, match="unknown pool"):
        pooled_features(model, images, "max")


def test_feature_cache_keys_and_damaged_entries(tmp_path):
    cache = FeatureCache(tmp_path)
    description = dict(checkpoint_sha256="abc", dataset="digits", split="train", pool="avg")
    calls = []

    def extract():
        calls.append(1)
        return torch.ones(4, 2), torch.arange(4)

    assert cache.get_or_extract(description, extract)[2] is False
    features, targets, hit = cache.get_or_extract(description, extract)
    assert hit and len(calls) == 1 and torch.equal(targets, torch.arange(4))
    assert cache_key(**description) != cache_key(**{**description, "split": "val"})
    cache.path(cache_key(**description)).write_bytes(b"damaged")
    assert cache.get_or_extract(description, extract)[2] is False and len(calls) == 2


@pytest.mark.slow
def test_finetune_on_digits_beats_chance_by_far_with_the_grid(tmp_path, checkpoint):
    store = tmp_path / "results.jsonl"
    assert main(["digits", "--ckpt", str(checkpoint), "--protocol", "finetune", "--results", str(store),
                 "--out", str(tmp_path / "run")]) == 0
    (result,) = records(store)
    assert result.protocol == "finetune" and result.config["preset"] == "embedded"
    assert result.config["recipe"] == json.loads(json.dumps(asdict(PRESETS["embedded"])))
    assert result.value > 40  # chance is 10%
    assert set(result.config["grid_val_scores"]) == {"lr0.003_wd0.05", "lr0.01_wd0.05"}
    chosen = max(result.config["grid_val_scores"], key=result.config["grid_val_scores"].get)
    assert chosen == f"lr{result.config['finetune']['base_lr']:g}_wd0.05"
    losses = [epoch["train_loss"] for epoch in result.config["history"]]
    assert len(losses) == PRESETS["embedded"].epochs and losses[-1] < 0.8 * losses[0]
    assert (tmp_path / "run" / "final" / "result.json").exists()


def small_run(checkpoint: Path, out: Path, eval_split: str = "val", base: FinetuneRecipe = PRESETS["embedded"],
              **changes) -> FinetuneRun:
    recipe = replace(base, **{"epochs": 3, "batch_size": 16, **changes})
    model, _ = build_classifier(str(checkpoint), 10, recipe, seed=0)
    train = Subset(build_dataset("digits", None, "train", train_transform(recipe, 16)), range(64))
    evaluated = Subset(build_dataset("digits", None, eval_split, eval_transform(recipe, 16)), range(32))
    return FinetuneRun(recipe, model, train, evaluated, "top1", False, out, Distributed(), num_classes=10,
                       collate_fn=collate_readable)


@pytest.mark.slow
def test_finetune_resumes_exactly_after_an_interruption(tmp_path, checkpoint):
    torch.manual_seed(0)
    straight = small_run(checkpoint, tmp_path / "straight")
    straight.train(progress=False)

    torch.manual_seed(0)
    interrupted = small_run(checkpoint, tmp_path / "interrupted")
    train_epoch = interrupted.train_epoch

    def stop_in_epoch_two(progress):
        if interrupted.epoch == 1:
            raise KeyboardInterrupt
        return train_epoch(progress)

    interrupted.train_epoch = stop_in_epoch_two
    with pytest.raises(KeyboardInterrupt):
        interrupted.train(progress=False)
    assert torch.load(tmp_path / "interrupted" / "checkpoint.pth", weights_only=True)["epoch"] == 1

    torch.manual_seed(123)  # a fresh process: another head initialisation, replaced by the checkpoint
    resumed = small_run(checkpoint, tmp_path / "interrupted")
    result = resumed.train(progress=False)
    assert [h["epoch"] for h in result["history"]] == [1, 2, 3]
    for key, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert resumed.train(progress=False) == result  # a finished run is read back, not repeated
    with pytest.raises(ValueError, match="another configuration"):
        small_run(checkpoint, tmp_path / "interrupted", epochs=4).train(progress=False)


def test_nan_loss_stops_and_keeps_the_last_good_epoch(tmp_path, checkpoint):
    run = small_run(checkpoint, tmp_path)
    loss = run.loss
    run.loss = lambda logits, targets: loss(logits, targets) * (float("nan") if run.epoch == 1 else 1.0)
    with pytest.raises(TrainingDiverged, match="epoch 2"):
        run.train(progress=False)
    state = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert state["epoch"] == 1 and len(state["history"]) == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_lars_probe_trains_only_the_head_with_mae_lars_steps(tmp_path, checkpoint):
    run = small_run(checkpoint, tmp_path, base=PRESETS["imagenet-linear"], epochs=2, total_batch_size=None,
                    num_workers=0, image_size=16, eval_crop_ratio=1.0)
    assert isinstance(run.optimizer, Lars)
    assert isinstance(run.model.head[0], torch.nn.BatchNorm1d) and run.model.head[0].weight is None
    # One step by hand: MAE's LARS scales a matrix's update by 0.001 * |w| / |g| and leaves the bias plain SGD.
    linear = run.model.head[1]
    weight, bias = linear.weight.detach().clone(), linear.bias.detach().clone()
    images, targets = next(iter(run.loader))
    run.model.train()
    run.loss(run.model(images), targets).backward()
    grad_w, grad_b = linear.weight.grad.clone(), linear.bias.grad.clone()
    for group in run.optimizer.param_groups:
        group["lr"] = 0.5
    run.optimizer.step()
    trust = 0.001 * weight.norm() / grad_w.norm()
    torch.testing.assert_close(linear.weight.detach(), weight - 0.5 * trust * grad_w)
    torch.testing.assert_close(linear.bias.detach(), bias - 0.5 * grad_b)
    run.optimizer.zero_grad()

    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    run.train(progress=False)
    changed = {k for k, v in run.model.state_dict().items() if not torch.equal(before[k], v)}
    assert {"head.1.weight", "head.1.bias", "head.0.running_mean"} <= changed
    assert all(k.startswith("head.") for k in changed)  # the backbone is frozen, its norms included


def test_missing_dataset_names_layout_and_source(tmp_path, checkpoint, capsys):
    assert main(["cifar10", "--ckpt", str(checkpoint), "--data-root", str(tmp_path / "nowhere"),
                 "--results", str(tmp_path / "r.jsonl")]) == 1
    err = capsys.readouterr().err
    assert "CIFAR-10" in err and "cifar-10-batches-py" in err and "toronto.edu" in err
    assert main(["flowers", "--ckpt", str(checkpoint)]) == 1
    assert "Flowers" in capsys.readouterr().err
    assert not (tmp_path / "r.jsonl").exists()


def test_bad_flags_say_what_is_wrong(checkpoint, capsys):
    with pytest.raises(SystemExit):
        main(["digits", "--ckpt", str(checkpoint), "--layer-decay", "0.5"])  # a fine-tuning flag for the probe
    assert "--layer-decay" in capsys.readouterr().err


@pytest.mark.slow
def test_two_gloo_processes_fine_tune_and_write_one_record(tmp_path, checkpoint, torchrun):
    store = tmp_path / "results.jsonl"
    torchrun(str(ROOT / "transfer" / "run.py"), "digits", "--ckpt", str(checkpoint), "--protocol", "finetune",
             "--epochs", "2", "--batch-size", "32", "--base-lr", "0.003", "--results", str(store),
             "--out", str(tmp_path / "ddp"))
    (result,) = records(store)  # rank 0 alone writes
    assert result.config["processes"] == 2 and result.config["effective_batch"] == 64
    assert result.config["grid_val_scores"] == {}  # an explicit --base-lr is no grid
    assert result.value > 20


@pytest.mark.slow
def test_imagenet_recipe_runs_with_timm_augmentation_mixup_and_accumulation(tmp_path, checkpoint):
    """MAE's ImageNet recipe end to end on a tiny ImageNet-style folder: RandAugment, random erasing, mixup /
    cutmix with the soft-target loss, accumulation up to the total batch, the official val as test."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for wnid in ("n01440764", "n01443537"):
        for split, count in (("train", 10), ("val", 3)):
            for index in range(count):
                path = tmp_path / "imagenet" / split / wnid / f"{wnid}_{index}.JPEG"
                path.parent.mkdir(parents=True, exist_ok=True)
                pixels = torch.randint(0, 256, (24, 24, 3), generator=generator, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(path)
    store = tmp_path / "results.jsonl"
    assert main(["imagenet", "--ckpt", str(checkpoint), "--protocol", "finetune", "--data-root",
                 str(tmp_path / "imagenet"), "--epochs", "2", "--batch-size", "4", "--total-batch-size", "8",
                 "--image-size", "16", "--num-workers", "0", "--results", str(store),
                 "--out", str(tmp_path / "in")]) == 0
    (result,) = records(store)
    recipe = result.config["finetune"]
    assert result.config["preset"] == "imagenet" and result.config["grid_val_scores"] == {}
    assert (recipe["mixup"], recipe["cutmix"], recipe["random_erasing"]) == (0.8, 1.0, 0.25)
    assert recipe["randaugment"] == "rand-m9-mstd0.5-inc1" and recipe["layer_decay"] == 0.65
    assert result.config["effective_batch"] == 8  # batch 4 x 2 accumulation steps
    losses = [epoch["train_loss"] for epoch in result.config["history"]]
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses)
    assert 0 <= result.value <= 100 and result.metric == "top1"


def test_the_fresh_head_is_drawn_from_the_seed(tmp_path):
    """A fine-tune with a fixed seed repeats exactly: the head, the only random init, comes from the seed."""
    ckpt = save_backbone(tmp_path / "tiny.safetensors", create_backbone("vit_tiny_patch4_32"),
                         CheckpointMetadata(method="mae", arch="vit_tiny_patch4_32"))
    heads = [build_classifier(str(ckpt), 10, FinetuneRecipe(), seed)[0].head.weight for seed in (0, 0, 1)]
    assert torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], heads[2])
    assert 0 < heads[0].std() < 1e-4  # MAE's trunc-normal std 2e-5


# ----------------------------------------------------------------------------------------- the task contract

# The recipes as they were before they became presets (a dict of overrides on the fine-tuning defaults of that
# time): every preset must still train with exactly these numbers.
OLD_DEFAULTS = dict(epochs=100, warmup_epochs=5, batch_size=64, total_batch_size=None, base_lr=5e-4, min_lr=1e-6,
                    weight_decay=0.05, layer_decay=0.65, drop_path=0.1, global_pool="avg", image_size=None,
                    eval_crop_ratio=0.875, min_crop_scale=0.08, hflip=0.5, label_smoothing=0.1, mixup=0.0,
                    cutmix=0.0, randaugment=None, random_erasing=0.0, frozen_backbone=False, optimizer="adamw",
                    num_workers=4, steps=None, lr_batch_scaling=True, wd_over_lr=False)
OLD_RECIPES = {
    "transfer": dict(lr_grid=(2.5e-4, 5e-4, 1e-3), wd_grid=(0.05, 0.3)),
    "imagenet": dict(batch_size=128, total_batch_size=1024, randaugment="rand-m9-mstd0.5-inc1", mixup=0.8, cutmix=1.0,
                     random_erasing=0.25, num_workers=10),
    "imagenet-linear": dict(epochs=90, warmup_epochs=10, batch_size=512, total_batch_size=16384, base_lr=0.1,
                            min_lr=0.0,  # MAE's probe decays to 0 (main_linprobe.py), not fine-tuning's 1e-6
                            weight_decay=0.0, layer_decay=1.0, drop_path=0.0, global_pool="token",
                            label_smoothing=0.0, frozen_backbone=True, optimizer="lars", num_workers=10),
    "embedded": dict(epochs=5, warmup_epochs=1, base_lr=1e-2, layer_decay=0.75, drop_path=0.0, min_crop_scale=0.8,
                     hflip=0.0, image_size=16, eval_crop_ratio=1.0, num_workers=0, lr_grid=(3e-3, 1e-2),
                     wd_grid=(0.05,)),
}


def test_presets_keep_the_recipes_numbers_and_derive_from_mae():
    # the per-size ImageNet recipes are tested against MAE's and RC-MAE's releases in test_official_configs.py
    assert set(PRESETS) == set(OLD_RECIPES) | {"ericsson", "imagenet-vitl", "imagenet-vith", "imagenet-rcmae-vitl",
                                               "imagenet-linear-50ep"}
    assert PRESETS["imagenet"] == MAE_FINETUNE == FinetuneRecipe()
    for name, overrides in OLD_RECIPES.items():
        assert asdict(PRESETS[name]) == {"lr_grid": (), "wd_grid": (), **OLD_DEFAULTS, **overrides}, name


def parsed(*argv: str):
    return parse_args(["digits", "--ckpt", "x.pth", *argv])


def test_the_default_preset_follows_dataset_and_protocol():
    linear = parsed()
    assert linear.protocol == "linear" and linear.preset is None and linear.recipe is None
    assert linear.probe == LinearProbe() and linear.run.ckpt == "x.pth" and linear.run.precision == "auto"
    tuned = parsed("--protocol", "finetune")
    assert tuned.preset == "embedded" and tuned.recipe == PRESETS["embedded"] and tuned.probe is None
    assert parse_args(["cifar10", "--ckpt", "x", "--protocol", "finetune"]).preset == "transfer"
    assert parse_args(["imagenet", "--ckpt", "x", "--protocol", "finetune"]).recipe == PRESETS["imagenet"]
    assert parse_args(["imagenet", "--ckpt", "x", "--protocol", "linear-lars"]).preset == "imagenet-linear"
    for flag in ("--preset", "--recipe"):  # --recipe names a preset as it always did
        config = parsed("--protocol", "finetune", flag, "transfer", "--epochs", "3")
        assert config.preset == "transfer" and config.recipe == replace(PRESETS["transfer"], epochs=3)


def test_flags_reach_the_protocol_that_runs():
    assert parsed("--batch-size", "16", "--num-workers", "0").probe == LinearProbe(batch_size=16, num_workers=0)
    tuned = parsed("--protocol", "finetune", "--batch-size", "16", "--precision", "fp32", "--seed", "3",
                   "--resume", "--lr-grid", "1e-3", "2e-3", "--tags", "a=b")
    assert (tuned.recipe.batch_size, tuned.recipe.lr_grid, tuned.recipe.wd_grid) == (16, (1e-3, 2e-3), (0.05,))
    assert (tuned.run.precision, tuned.run.seed, tuned.run.resume, tuned.run.tags) == ("fp32", 3, True, ["a=b"])
    # An explicit --base-lr is that one lr (no grid over it), as the chain's `--base-lr 1e-2` always meant.
    single = parsed("--protocol", "finetune", "--base-lr", "1e-2")
    assert (single.recipe.base_lr, single.recipe.lr_grid, single.recipe.wd_grid) == (1e-2, (), (0.05,))
    assert parsed("--protocol", "finetune", "--weight-decay", "0.1").recipe.wd_grid == ()


@pytest.mark.parametrize("argv, named", [
    (["--layer-decay", "0.5"], "--layer-decay"),  # a fine-tuning option for the probe
    (["--preset", "transfer"], "--preset"),
    (["--protocol", "finetune", "--pool", "token"], "--pool"),  # a probe option for fine-tuning
    (["--protocol", "finetune", "--base-lr", "1e-3", "--lr-grid", "1e-3"], "pass one"),
])
def test_options_of_the_other_protocol_are_refused(argv, named, capsys):
    with pytest.raises(SystemExit):
        parsed(*argv)
    assert named in capsys.readouterr().err


def test_a_config_file_is_overridden_by_preset_and_flags(tmp_path):
    saved = to_dict(parsed("--protocol", "finetune", "--epochs", "2", "--seed", "5"))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(json.loads(json.dumps(saved))))
    replayed = parse_args(["--config", str(path)])  # the dataset, protocol and recipe come from the file
    assert to_dict(replayed) == saved and replayed.recipe.lr_grid == (3e-3, 1e-2)
    assert parse_args(["--config", str(path), "--epochs", "4"]).recipe == replace(PRESETS["embedded"], epochs=4)
    assert parse_args(["--config", str(path), "--preset", "transfer"]).recipe == PRESETS["transfer"]
    assert parse_args(["--config", str(path), "--protocol", "linear"]).recipe is None
    path.write_text("recipe: {epochs: 2, warmup: 1}\n")
    assert main(["digits", "--config", str(path)]) == 1  # an unknown field: one line


def bad_checkpoints(folder: Path, good: Path) -> dict[str, Path]:
    folder.mkdir()
    (folder / "empty.pth").write_bytes(b"")
    (folder / "garbage.pth").write_bytes(os.urandom(4096))
    (folder / "truncated.safetensors").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    torch.save({"conv.weight": torch.zeros(2, 2)}, folder / "foreign.pth")  # no backbone in it
    (folder / "a_directory.pth").mkdir()
    return {"missing": folder / "missing.pth", **{path.stem.split("_")[-1]: path for path in folder.iterdir()}}


@pytest.mark.parametrize("protocol", ["linear", "finetune"])
def test_every_bad_checkpoint_is_one_line_before_any_hashing(tmp_path, checkpoint, capsys, monkeypatch, protocol):
    def never(path):
        raise AssertionError(f"hashed {path} before the checkpoint was checked")

    monkeypatch.setattr(classification, "file_sha256", never)
    kinds = bad_checkpoints(tmp_path / "bad", checkpoint)
    assert set(kinds) == {"missing", "empty", "garbage", "truncated", "foreign", "directory"}
    for kind, path in kinds.items():
        out = tmp_path / f"run_{kind}"
        assert main(["digits", "--ckpt", str(path), "--protocol", protocol, "--out", str(out)]) == 1, kind
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {path}: "), (kind, lines)
        assert not out.exists()


def probe_argv(checkpoint: Path, folder: Path, *extra: str) -> list[str]:
    return ["digits", "--ckpt", str(checkpoint), "--per-class", "5", "--results", str(folder / "results.jsonl"),
            "--cache-dir", str(folder / "cache"), "--out", str(folder / "run"), *extra]


@pytest.mark.slow  # an end-to-end run of several seconds: `make test` only
def test_the_run_directory_holds_config_and_record_and_follows_the_resume_rule(tmp_path, checkpoint, capsys):
    argv = probe_argv(checkpoint, tmp_path, "--precision", "fp32")
    assert main(argv) == 0
    (record,) = records(tmp_path / "results.jsonl")
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert {key: record.config[key] for key in saved} == saved and saved["run"]["precision"] == "fp32"
    assert saved["probe"] == {"pool": "avg", "batch_size": 128, "num_workers": loader_workers()}
    assert saved["per_class"] == 5
    assert json.loads((tmp_path / "run" / "record.json").read_text())["metrics"] == record.metrics
    assert record.precision == "fp32" == record.compute["precision"] and "cpu_capability" in record.compute
    capsys.readouterr()

    assert main(argv) == 1  # a finished run is not overwritten
    assert "holds a run already; pass --resume" in capsys.readouterr().err
    # Resumed with harmless changes only: its record is reported again, not recomputed nor stored twice.
    assert main([*argv, "--resume", "--num-workers", "0", "--tags", "x=y"]) == 0
    assert f"top1 {record.value:.2f}, finished before" in capsys.readouterr().out
    assert len(records(tmp_path / "results.jsonl")) == 1
    assert main([*argv, "--resume", "--pool", "token", "--seed", "1"]) == 1  # these change the numbers
    err = capsys.readouterr().err
    assert "probe.pool: 'avg' -> 'token'" in err and "run.seed: 0 -> 1" in err and len(err.splitlines()) == 1
    assert main([*argv[:-2], "--resume", "--precision", "bf16"]) == 1
    assert "run.precision: 'fp32' -> 'bf16'" in capsys.readouterr().err

    # bf16 is another feature set: the cache keys the precision.
    assert main(probe_argv(checkpoint, tmp_path, "--precision", "bf16", "--out", str(tmp_path / "bf16"))) == 0
    assert records(tmp_path / "results.jsonl")[-1].precision == "bf16"
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 6


@pytest.mark.slow  # an end-to-end run of several seconds: `make test` only
def test_precision_fp32_never_autocasts(tmp_path, checkpoint, monkeypatch):
    used = []
    autocast = features.autocast
    monkeypatch.setattr(features, "autocast", lambda device, dtype: used.append(dtype) or autocast(device, dtype))
    assert main(probe_argv(checkpoint, tmp_path, "--precision", "fp32")) == 0
    assert used and set(used) == {None}


@pytest.mark.slow
def test_a_replayed_config_reproduces_the_probe_and_a_fine_tune(tmp_path, checkpoint):
    store = tmp_path / "results.jsonl"
    runs = {"linear": ["--per-class", "5"],
            "finetune": ["--protocol", "finetune", "--per-class", "2", "--epochs", "2", "--batch-size", "8"]}
    for name, extra in runs.items():
        first, replay = tmp_path / name, tmp_path / f"{name}_replay"
        assert main(["digits", "--ckpt", str(checkpoint), "--results", str(store), "--cache-dir",
                     str(tmp_path / f"cache_{name}"), "--out", str(first), *extra]) == 0
        # The replay extracts its features again (another cache) and trains again (another folder).
        assert main(["digits", "--config", str(first / "config.yaml"), "--out", str(replay),
                     "--cache-dir", str(tmp_path / f"cache_{name}_replay")]) == 0
        original, replayed = records(store)[-2:]
        assert replayed.metrics == original.metrics and replayed.precision == original.precision
        assert replayed.config["preset"] == original.config["preset"]
        for key in ("regularisation", "history", "grid_val_scores", "finetune"):
            assert replayed.config.get(key) == original.config.get(key), key
    assert records(store)[-1].config["grid_val_scores"] != {}  # the embedded grid ran, and ran again


@pytest.mark.slow
def test_an_interrupted_fine_tune_resumes_only_when_asked(tmp_path, checkpoint, monkeypatch, capsys):
    argv = ["digits", "--ckpt", str(checkpoint), "--protocol", "finetune", "--per-class", "2", "--epochs", "2",
            "--batch-size", "8", "--base-lr", "1e-2", "--results", str(tmp_path / "r.jsonl"), "--out",
            str(tmp_path / "run")]
    train_epoch = FinetuneRun.train_epoch

    def stop_in_epoch_two(self, progress):
        if self.epoch == 1:
            raise KeyboardInterrupt
        return train_epoch(self, progress)

    monkeypatch.setattr(FinetuneRun, "train_epoch", stop_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    monkeypatch.setattr(FinetuneRun, "train_epoch", train_epoch)
    assert (tmp_path / "run" / "final" / "checkpoint.pth").is_file()
    capsys.readouterr()
    assert main(argv) == 1
    assert "holds a run already; pass --resume" in capsys.readouterr().err
    assert main([*argv, "--resume", "--epochs", "3"]) == 1
    assert "recipe.epochs: 2 -> 3" in capsys.readouterr().err
    assert main([*argv, "--resume", "--num-workers", "1"]) == 0
    (result,) = records(tmp_path / "r.jsonl")
    assert [epoch["epoch"] for epoch in result.config["history"]] == [1, 2]


# ------------------------------------------------------------------------------- a hierarchical backbone


@pytest.fixture(scope="module")
def resnet_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("resnet") / "resnet18.safetensors"
    return save_backbone(path, timm.create_model("resnet18", num_classes=0),
                         CheckpointMetadata(method="supervised", arch="resnet18"))


def test_pooled_features_of_a_hierarchical_backbone_average_its_last_stage():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=0).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        last_stage = model.forward_intermediates(images, intermediates_only=True)[-1]
        assert last_stage.shape == (2, 512, 2, 2)
        torch.testing.assert_close(pooled_features(model, images, "avg"), last_stage.mean(dim=(2, 3)))
    with pytest.raises(ValueError, match="no class token"):
        pooled_features(model, images, "token")


@pytest.mark.slow
def test_resnet18_linear_probe_on_digits_end_to_end(tmp_path, resnet_checkpoint, capsys):
    store = tmp_path / "results.jsonl"
    assert main(["digits", "--ckpt", str(resnet_checkpoint), "--per-class", "10", "--precision", "fp32",
                 "--results", str(store), "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run")]) == 0
    (result,) = records(store)
    assert result.arch == "resnet18" and result.method == "supervised" and result.protocol == "linear"
    assert result.config["image_size"] == 224 and result.config["images"] == {"train": 100, "val": 100, "test": 100}
    assert result.value > 40  # random-init ResNet-18 features of 100 training digits; chance is 10%
    assert main(["digits", "--ckpt", str(resnet_checkpoint), "--pool", "token", "--out", str(tmp_path / "tok")]) == 1
    assert "no class token" in capsys.readouterr().err and not (tmp_path / "tok").exists()


@pytest.mark.slow
def test_resnet18_fine_tunes_with_layer_decay_by_stage(tmp_path, resnet_checkpoint):
    store = tmp_path / "results.jsonl"
    assert main(["digits", "--ckpt", str(resnet_checkpoint), "--protocol", "finetune", "--per-class", "3",
                 "--epochs", "2", "--batch-size", "8", "--base-lr", "1e-2", "--results", str(store),
                 "--out", str(tmp_path / "run")]) == 0
    (result,) = records(store)
    assert result.arch == "resnet18" and result.config["finetune"]["image_size"] == 16
    assert len(result.config["history"]) == 2 and 0 <= result.value <= 100

    recipe = PRESETS["embedded"]
    model, _ = build_classifier(str(resnet_checkpoint), 10, recipe, seed=0)
    train = Subset(build_dataset("digits", None, "train", train_transform(recipe, 16)), range(64))
    run = FinetuneRun(recipe, model, train, train, "top1", False, tmp_path / "direct", Distributed(), num_classes=10)
    scales = {name: group["lr_scale"] for group in run.optimizer.param_groups for name in group["param_names"]}
    assert scales["fc.weight"] == 1.0 and scales["conv1.weight"] == pytest.approx(0.75 ** 5)
    assert scales["layer1.0.conv1.weight"] == pytest.approx(0.75 ** 4)
    assert scales["layer4.1.conv2.weight"] == pytest.approx(0.75)


# ------------------------------------------------------------------------------------- Ericsson et al.'s protocol


def test_ericsson_recipe_is_their_finetune_py():
    recipe = PRESETS["ericsson"]
    assert (recipe.optimizer, recipe.steps, recipe.batch_size, recipe.total_batch_size) == ("sgd-nesterov", 5000, 64,
                                                                                            None)
    assert (recipe.warmup_epochs, recipe.min_lr, recipe.lr_batch_scaling, recipe.layer_decay) == (0, 0.0, False, 1.0)
    # lr = logspace(-4, -1, 4) descending; wd = w / lr for w in [0, logspace(-6, -3, 4)]
    assert recipe.lr_grid == pytest.approx(torch.logspace(-4, -1, 4).flip(0).tolist())
    assert recipe.wd_grid == pytest.approx([0.0, *torch.logspace(-6, -3, 4).tolist()]) and recipe.wd_over_lr
    assert (recipe.min_crop_scale, recipe.hflip, recipe.eval_crop_ratio) == (0.08, 0.5, 1.0)
    assert (recipe.label_smoothing, recipe.mixup, recipe.cutmix, recipe.randaugment, recipe.random_erasing) == (
        0.0, 0.0, 0.0, None, 0.0)


@pytest.mark.slow  # an end-to-end run of several seconds: `make test` only
def test_a_step_budget_runs_exactly_its_steps_on_sgd_nesterov_with_a_cosine_to_zero(tmp_path, checkpoint):
    run = small_run(checkpoint, tmp_path / "run", base=PRESETS["ericsson"], steps=10, batch_size=16, image_size=16,
                    base_lr=0.01, weight_decay=1e-3)
    assert run.steps_per_epoch == 4 and run.epochs == 3  # 64 images / 16: the third epoch is cut at step 10
    assert run.peak_lr == 0.01  # not scaled by the batch
    (group,) = run.optimizer.param_groups
    assert isinstance(run.optimizer, torch.optim.SGD) and group["nesterov"] and group["momentum"] == 0.9
    assert group["weight_decay"] == 1e-3 and len(group["params"]) == len(list(run.model.parameters()))
    lrs = []
    step = run.optimizer.step

    def recording_step(*args, **kwargs):
        lrs.append(run.optimizer.param_groups[0]["lr"])
        return step(*args, **kwargs)

    run.optimizer.step = recording_step
    result = run.train(progress=False)
    # torch's CosineAnnealingLR over 10 steps, as their code steps it: lr_t = lr (1 + cos(pi t / 10)) / 2
    assert lrs == pytest.approx([0.01 * (1 + math.cos(math.pi * t / 10)) / 2 for t in range(10)], rel=1e-12)
    assert len(result["history"]) == 3


@pytest.mark.slow
def test_ericsson_recipe_on_digits_runs_its_grid_and_is_scored_on_test(tmp_path, resnet_checkpoint):
    store = tmp_path / "results.jsonl"
    # Their grid's shape at test size: two lrs x two weight decays (w / lr), 40 steps of batch 32 instead of 5000 of
    # 64, on a ResNet-18 from scratch (their protocol's backbone; the step-budget test above runs it on a ViT).
    assert main(["digits", "--ckpt", str(resnet_checkpoint), "--protocol", "finetune", "--preset", "ericsson",
                 "--steps", "40", "--batch-size", "32", "--image-size", "16", "--hflip", "0", "--lr-grid", "0.1",
                 "0.05", "--wd-grid", "0", "1e-4", "--num-workers", "0", "--results", str(store),
                 "--out", str(tmp_path / "run")]) == 0
    (result,) = records(store)
    assert result.config["preset"] == "ericsson" and result.config["recipe"]["optimizer"] == "sgd-nesterov"
    assert set(result.config["grid_val_scores"]) == {"lr0.1_wd0", "lr0.1_wd0.001", "lr0.05_wd0", "lr0.05_wd0.002"}
    chosen = max(result.config["grid_val_scores"], key=result.config["grid_val_scores"].get)
    final = result.config["finetune"]
    assert chosen == f"lr{final['base_lr']:g}_wd{final['weight_decay']:g}"
    # Scored on test by the final trainval run, and it learns: chance is 10% (measured: test 50.1, val 61.1 in bf16).
    final_result = json.loads((tmp_path / "run" / "final" / "result.json").read_text())
    assert result.value == pytest.approx(final_result["score"], abs=1e-4) and final_result["config"]["steps"] == 40
    assert result.value > 30 and max(result.config["grid_val_scores"].values()) > 30
    assert final_result["config"]["weight_decay"] == final["weight_decay"]
