"""Classification transfer end to end on the bundled digits: linear probe, fine-tuning, LARS probe, resume, DDP."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from timm.optim import Lars
from torch.utils.data import Subset

from mimbench.backbones.checkpoint import CheckpointMetadata, save_backbone
from mimbench.backbones.vit import create_backbone
from mimbench.core.errors import TrainingDiverged
from mimbench.core.runtime import Distributed
from mimbench.core.io import file_sha256
from mimbench.results import read_results
from mimbench.transfer.datasets import build_dataset, collate_readable
from mimbench.transfer.features import FeatureCache, cache_key, pooled_features
from mimbench.transfer.finetune import (RECIPES, FinetuneConfig, FinetuneRun, build_classifier, eval_transform,
                                        train_transform)
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


def test_linear_probe_on_digits_end_to_end_with_feature_cache(tmp_path, checkpoint, capsys):
    store, cache = tmp_path / "results.jsonl", tmp_path / "cache"
    argv = ["digits", "--ckpt", str(checkpoint), "--results", str(store), "--cache-dir", str(cache),
            "--tags", "ablation=probe", "variant=avg"]
    assert main(argv) == 0
    assert "features: extracted" in capsys.readouterr().out
    (result,) = records(store)
    assert result.task == "classification" and result.dataset == "digits" and result.protocol == "linear"
    assert result.metric == "top1" and result.value == pytest.approx(result.metrics["top1"], abs=1e-3)
    assert result.value > 60  # random-init ViT features: far above the 10% of chance
    assert result.method == "mae" and result.arch == "vit_tiny_patch4_32" and result.pretrain_epochs == 3.0
    assert result.checkpoint_sha256 == file_sha256(checkpoint) and result.pretrain_gpu_days == 0.0
    assert result.tags == {"ablation": "probe", "variant": "avg"}
    assert result.config["pool"] == "avg" and result.config["regularisation"] in REGULARISATION_GRID
    assert result.config["images"] == {"train": 1150, "val": 288, "test": 359}
    assert result.device.startswith("cpu") and result.date and result.wall_time_s > 0
    assert len(list(cache.glob("*.safetensors"))) == 3

    assert main(argv) == 0  # the second probe reads the cached features
    assert "features: cache" in capsys.readouterr().out
    first, second = records(store)
    assert second.value == first.value and second.config["regularisation"] == first.config["regularisation"]

    assert main([*argv[:-3], "--pool", "token"]) == 0  # another pooling is another feature set
    assert len(list(cache.glob("*.safetensors"))) == 6
    assert records(store)[-1].config["pool"] == "token"


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
    assert main(argv) == 0
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
    assert main(argv) == 0  # the same slice again: its own cached features
    assert "features: cache" in capsys.readouterr().out
    assert main(["digits", "--ckpt", str(checkpoint), "--results", str(store), "--per-class", "0"]) == 1
    assert "--per-class 0: give a positive number of images per class" in capsys.readouterr().err
    assert main(["digits", "--ckpt", str(checkpoint), "--results", str(store), "--per-class", "-3"]) == 1
    assert "--per-class -3: give a positive number" in capsys.readouterr().err
    assert len(records(store)) == 2


def test_per_class_fine_tuning_trains_on_the_train_and_val_slices(tmp_path, checkpoint):
    store = tmp_path / "results.jsonl"
    assert main(["digits", "--ckpt", str(checkpoint), "--protocol", "finetune", "--per-class", "2", "--epochs", "1",
                 "--batch-size", "16", "--base-lr", "0.003", "--results", str(store),
                 "--out", str(tmp_path / "run")]) == 0
    (result,) = records(store)
    assert result.config["images"] == {"trainval": 40, "test": 20}  # train slice + val slice; test slice
    assert result.tags == {"subset": "per_class2"}


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


def test_finetune_on_digits_beats_chance_by_far_with_the_grid(tmp_path, checkpoint):
    store = tmp_path / "results.jsonl"
    assert main(["digits", "--ckpt", str(checkpoint), "--protocol", "finetune", "--results", str(store),
                 "--out", str(tmp_path / "run")]) == 0
    (result,) = records(store)
    assert result.protocol == "finetune" and result.config["recipe"] == "embedded"
    assert result.value > 40  # chance is 10%
    assert set(result.config["grid_val_scores"]) == {"lr0.003_wd0.05", "lr0.01_wd0.05"}
    chosen = max(result.config["grid_val_scores"], key=result.config["grid_val_scores"].get)
    assert chosen == f"lr{result.config['finetune']['base_lr']:g}_wd0.05"
    losses = [epoch["train_loss"] for epoch in result.config["history"]]
    assert len(losses) == RECIPES["embedded"]["epochs"] and losses[-1] < 0.8 * losses[0]
    assert (tmp_path / "run" / "final" / "result.json").exists()


def small_run(checkpoint: Path, out: Path, eval_split: str = "val", **changes) -> FinetuneRun:
    config = FinetuneConfig(**{**RECIPES["embedded"], "epochs": 3, "batch_size": 16, **changes})
    model, _ = build_classifier(str(checkpoint), 10, config)
    train = Subset(build_dataset("digits", None, "train", train_transform(config, 16)), range(64))
    evaluated = Subset(build_dataset("digits", None, eval_split, eval_transform(config, 16)), range(32))
    return FinetuneRun(config, model, train, evaluated, "top1", False, out, Distributed(), collate_fn=collate_readable)


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
    run = small_run(checkpoint, tmp_path, **{**RECIPES["imagenet-linear"], "epochs": 2, "batch_size": 16,
                                             "total_batch_size": None, "num_workers": 0, "image_size": 16,
                                             "eval_crop_ratio": 1.0})
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


def test_two_gloo_processes_fine_tune_and_write_one_record(tmp_path, checkpoint, free_port):
    store = tmp_path / "results.jsonl"
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port),
         str(ROOT / "transfer" / "run.py"), "digits", "--ckpt", str(checkpoint), "--protocol", "finetune",
         "--epochs", "2", "--batch-size", "32", "--base-lr", "0.003", "--results", str(store),
         "--out", str(tmp_path / "ddp")],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True, capture_output=True, timeout=600)
    (result,) = records(store)  # rank 0 alone writes
    assert result.config["processes"] == 2 and result.config["effective_batch"] == 64
    assert result.config["grid_val_scores"] == {}  # an explicit --base-lr is no grid
    assert result.value > 20



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
                 "--image-size", "16", "--num-workers", "0", "--results", str(store), "--out", str(tmp_path / "in")]) == 0
    (result,) = records(store)
    recipe = result.config["finetune"]
    assert result.config["recipe"] == "imagenet" and result.config["grid_val_scores"] == {}
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
    heads = [build_classifier(str(ckpt), 10, FinetuneConfig(seed=seed))[0].head.weight for seed in (0, 0, 1)]
    assert torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], heads[2])
    assert 0 < heads[0].std() < 1e-4  # MAE's trunc-normal std 2e-5
