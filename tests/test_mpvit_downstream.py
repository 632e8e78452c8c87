"""The CPU-sized MPViT through every task family on the embedded sets (few iterations): COCO Mask R-CNN + FPN,
ADE20K UperNet, the digits linear probe; and the MPViT presets of the paper."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mimbench.backbones.checkpoint import CheckpointMetadata, save_backbone
from mimbench.backbones.vit import count_parameters, create_backbone
from mimbench.core.errors import ConfigError
from mimbench.results import read_results
from mimbench.transfer import ade20k, coco
from mimbench.transfer.coco_data import write_embedded_coco
from mimbench.transfer.run import main

NANO = "mpvit_nano_cpu"
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "mpvit_nano.safetensors"
    return save_backbone(path, create_backbone(NANO), CheckpointMetadata(method="supervised", arch=NANO))


def only_record(store: Path):
    """The store's one record, which carries the backbone's size: its headless parameter count and its GFLOPs."""
    records, malformed = read_results(store)
    assert malformed == [] and len(records) == 1
    assert records[0].params == count_parameters(create_backbone(NANO)) == 303_744
    assert records[0].gflops == pytest.approx(0.1841, abs=1e-4)  # at 224², as the tables count MPViTs
    return records[0]


def test_the_papers_dense_presets():
    one_x, three_x = coco.PRESETS["mpvit_maskrcnn_1x"], coco.PRESETS["mpvit_maskrcnn_3x_ms"]
    assert (one_x.iterations, one_x.lr_steps, one_x.total_batch_size, one_x.lr, one_x.weight_decay) == \
        (90_000, (60_000, 80_000), 16, 1e-4, 0.05)
    assert (one_x.clip_grad, one_x.min_sizes, one_x.augmentation) == (1.0, (800,), "resize")
    assert (three_x.iterations, three_x.lr_steps, three_x.augmentation) == (270_000, (210_000, 250_000), "detr")
    assert three_x.min_sizes == tuple(range(480, 801, 32)) and three_x.detr_crop == (384, 600)
    seg = ade20k.PRESETS["mpvit_upernet_160k"]
    assert (seg.lr, seg.weight_decay, seg.max_iters, seg.batch_size, seg.warmup_iters) == \
        (6e-5, 0.01, 160_000, 16, 1500)
    assert (seg.crop_size, seg.layer_decay, seg.head_channels, seg.test_mode) == (512, 1.0, 512, "whole")


def test_the_dense_presets_drop_path_goes_by_the_backbones_size():
    """The papers' per-size drop path (COCO T/XS 0.1, S 0.2, B 0.4; ADE20K S 0.2, B 0.4), a flag's value over it,
    one line for a backbone the preset has none for."""
    for name in ("mpvit_maskrcnn_1x", "mpvit_maskrcnn_3x_ms"):
        rates = {arch: coco.resolve_drop_path(coco.PRESETS[name], arch).drop_path
                 for arch in ("mpvit_tiny", "mpvit_xsmall", "mpvit_small", "mpvit_base")}
        assert rates == {"mpvit_tiny": 0.1, "mpvit_xsmall": 0.1, "mpvit_small": 0.2, "mpvit_base": 0.4}, name
    segmentation = ade20k.PRESETS["mpvit_upernet_160k"]
    assert [ade20k.resolve_drop_path(segmentation, arch).drop_path_rate for arch in ("mpvit_small", "mpvit_base")] \
        == [0.2, 0.4]
    given = dataclasses.replace(coco.PRESETS["mpvit_maskrcnn_1x"], drop_path=0.3)
    assert coco.resolve_drop_path(given, "mpvit_base").drop_path == 0.3
    assert coco.resolve_drop_path(coco.PRESETS["embedded_cpu"], "mpvit_base").drop_path == 0.0
    with pytest.raises(ConfigError, match="give --drop-path-rate"):
        ade20k.resolve_drop_path(segmentation, "resnet18")


@pytest.mark.slow
def test_mpvit_mask_rcnn_fpn_end_to_end(tmp_path, checkpoint):
    data = write_embedded_coco(tmp_path / "coco", image_size=64)
    store = tmp_path / "results.jsonl"
    assert main(["coco", "--ckpt", str(checkpoint), "--data-root", str(data), "--preset", "embedded_cpu",
                 "--max-iter", "40", "--precision", "fp32", "--num-workers", "0", "--visualize", "0",
                 "--out", str(tmp_path / "run"), "--results", str(store)]) == 0
    record = only_record(store)
    assert (record.task, record.protocol, record.arch, record.method) == ("detection", "mask-rcnn", NANO,
                                                                          "supervised")
    curve = json.loads((tmp_path / "run" / "loss_curve.json").read_text())
    assert curve[-1]["total_loss"] < curve[0]["total_loss"]
    # pycocotools' AP50 in points after 40 iterations: 0.34 on AVX2 kernels (above 0.5 on AVX-512); a detector
    # whose boxes never overlap an object by half scores 0
    assert record.metrics["AP50_bbox"] > 0.1


@pytest.mark.slow
def test_mpvit_upernet_end_to_end(tmp_path, checkpoint):
    root = ade20k.make_embedded_ade20k(tmp_path / "scenes", ade20k.EmbeddedSet(size=64, train=8, val=4))
    store, out = tmp_path / "results.jsonl", tmp_path / "run"
    assert main(["ade20k", "--ckpt", str(checkpoint), "--data-root", str(root), "--out", str(out), "--results",
                 str(store), "--preset", "embedded_cpu", "--crop-size", "64", "--resize-scale", "256", "64",
                 "--head-channels", "32", "--aux-channels", "16", "--overlays", "0", "--batch-size", "2",
                 "--max-iters", "6", "--warmup-iters", "1", "--precision", "fp32"]) == 0
    record = only_record(store)
    assert (record.task, record.protocol, record.arch, record.method) == ("segmentation", "upernet", NANO,
                                                                          "supervised")
    losses = json.loads((out / "train_loss.json").read_text())
    assert len(losses) == 6 and all(np.isfinite(losses)) and 0 < record.metrics["aAcc"] <= 100


@pytest.mark.slow
def test_mpvit_linear_probe_on_digits(tmp_path, checkpoint):
    store = tmp_path / "results.jsonl"
    assert main(["digits", "--ckpt", str(checkpoint), "--per-class", "10", "--precision", "fp32",
                 "--results", str(store), "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run")]) == 0
    record = only_record(store)
    assert (record.arch, record.method, record.protocol) == (NANO, "supervised", "linear")
    assert record.value > 30  # random-init MPViT features of 100 training digits; chance is 10%


def test_the_classic_fpn_augmentations_and_full_model_gradient_clipping():
    names = lambda augmentations: [type(a).__name__ for a in augmentations]  # noqa: E731
    assert names(coco.train_augmentations(coco.PRESETS["embedded_cpu"])) == ["RandomFlip", "ResizeScale",
                                                                              "FixedSizeCrop"]  # LSJ as before
    assert names(coco.train_augmentations(coco.PRESETS["mpvit_maskrcnn_1x"])) == ["RandomFlip", "ResizeShortestEdge"]
    flip, either = coco.train_augmentations(coco.PRESETS["mpvit_maskrcnn_3x_ms"])
    assert names(either.first.augs) == ["ResizeShortestEdge", "RandomCrop", "ResizeShortestEdge"]
    assert names(either.second.augs) == ["ResizeShortestEdge"]
    np.random.seed(0)
    shorter = set()
    for _ in range(40):
        aug_input = coco.T.AugInput(np.zeros((300, 450, 3), np.uint8))
        either(aug_input)
        height, width = aug_input.image.shape[:2]
        shorter.add(min(height, width))
        assert max(height, width) <= 1333
    assert shorter <= set(range(480, 801, 32)) and len(shorter) > 3  # the multi-scale choices, after either branch

    layer = torch.nn.Linear(4, 1, bias=False)
    optimizer = torch.optim.SGD(layer.parameters(), lr=1.0)
    layer.weight.grad = torch.full_like(layer.weight, 3.0)  # norm 6
    before = layer.weight.detach().clone()
    coco.clip_gradients(optimizer, 1.0)
    optimizer.step()
    assert torch.linalg.norm(layer.weight.grad).item() == pytest.approx(1.0)
    assert torch.linalg.norm(before - layer.weight.detach()).item() == pytest.approx(1.0)
