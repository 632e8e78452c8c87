"""COCO adapter: Mask R-CNN on our backbones through Detectron2 — ViTDet for a ViT, FPN for a hierarchical backbone;
loading, evaluation, the task contract (presets, config.yaml replay, the run-directory rule), short training runs."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
import torch.nn as nn
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling.backbone import FPN
from detectron2.structures import Boxes, BoxMode, Instances
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mimbench.backbones.checkpoint import CheckpointError, CheckpointMetadata, backbone_from_checkpoint, save_backbone
from mimbench.backbones.vit import create_backbone
from mimbench.core.config import Embedded, RunSpec
from mimbench.core.errors import ConfigError, DatasetError
from mimbench.core.io import file_sha256
from mimbench.core.rundir import RunLock, read_config
from mimbench.core.runtime import autocast_dtype, precision_name
from mimbench.results import read_results
from mimbench.transfer import coco
from mimbench.transfer.coco import (
    EMBEDDED_CPU,
    PRESETS,
    VITDET_B_100EP,
    CocoConfig,
    ContractBackbone,
    build_detector,
    default_out,
    effective_recipe,
    evaluate,
    hold_run_dir,
    load_encoder,
    mask_format,
    optimizer_for,
    parse_args,
    prepare,
    register_splits,
    store_metrics,
)
from mimbench.transfer.coco_data import (
    CocoSplit,
    coco_layout,
    dataset_name,
    subset_document,
    write_coco_subset,
    write_embedded_coco,
)
from mimbench.transfer.run import main
from mimbench.transfer.scenes import CATEGORIES, make_scene

TINY = "vit_tiny_patch4_32"
RESNET = "resnet18"  # the hierarchical test backbone


def embedded_args(root: Path) -> list[str]:
    """What ``--embedded`` stands for, on a set generated under ``root``."""
    return ["--data-root", str(root), "--preset", "embedded_cpu"]


def only_record(store: Path):
    records, malformed = read_results(store)
    assert malformed == [] and len(records) == 1
    return records[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny_mae.safetensors"
    return save_backbone(path, create_backbone(TINY), CheckpointMetadata(method="mae", arch=TINY, epochs=3.0))


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> Path:
    return write_embedded_coco(tmp_path_factory.mktemp("coco") / "data", image_size=64)


@pytest.fixture(scope="module")
def resnet_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "resnet18.safetensors"
    return save_backbone(path, create_backbone(RESNET), CheckpointMetadata(method="supervised", arch=RESNET))


def test_detector_backbone_equals_the_checkpoint(checkpoint):
    model = build_detector(TINY, PRESETS["embedded_cpu"], num_classes=len(CATEGORIES))
    report = load_encoder(model.backbone.net, str(checkpoint), TINY)
    assert report.encoder_fraction == 1.0
    reference = create_backbone(TINY)
    reference.load_state_dict(save_backbone_weights(checkpoint))
    net = model.backbone.net.state_dict()
    compared = [k for k in net if ".rel_pos_" not in k]
    assert len(compared) == len(reference.state_dict()) - 3  # all but the class token and the final norm
    for key in compared:
        torch.testing.assert_close(net[key], reference.state_dict()[key], rtol=0, atol=0)
    # The relative position tables are ViTDet's own, zero at the start; 2 per block.
    assert sum(".rel_pos_" in k for k in net) == 2 * 12 and all(net[k].abs().sum() == 0 for k in net if "rel_pos" in k)
    # The pyramid gives strides 4, 8 and the max-pooled 16 for a patch-4 ViT.
    assert model.backbone.output_shape()["p2"].stride == 4 and model.backbone.output_shape()["p4"].stride == 16


def save_backbone_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(path))


def test_wrong_checkpoints_fail_loudly(tmp_path, checkpoint):
    model = build_detector(TINY, PRESETS["embedded_cpu"], num_classes=4)
    other = save_backbone(tmp_path / "small.safetensors", create_backbone("vit_tiny_patch8_64", embed_dim=96,
                                                                          num_heads=3),
                          CheckpointMetadata(method="mae", arch="vit_tiny_patch8_64"))
    with pytest.raises(CheckpointError, match="another architecture"):
        load_encoder(model.backbone.net, str(other), TINY)
    weights = {k: v for k, v in save_backbone_weights(checkpoint).items() if not k.startswith("blocks.11.")}
    partial = save_backbone(tmp_path / "partial.safetensors", weights, CheckpointMetadata(method="mae", arch=TINY))
    with pytest.raises(CheckpointError, match=r"provides only 9\d\.\d% of the"):
        load_encoder(model.backbone.net, str(partial), TINY)
    with pytest.raises(ConfigError, match="cannot give the pyramid strides"):
        build_detector(TINY, PRESETS["vitdet_b_100ep"], num_classes=80)  # patch 4 cannot reach stride 32


def test_vitdet_preset_is_the_paper_protocol():
    preset = PRESETS["vitdet_b_100ep"]
    assert (preset.image_size, preset.total_batch_size, preset.iterations) == (1024, 64, 184375)
    assert (preset.lr, preset.weight_decay, preset.layer_decay, preset.drop_path) == (1e-4, 0.1, 0.7, 0.1)
    model = build_detector("vit_base_patch16_224", preset, num_classes=80)
    net = model.backbone.net
    assert [i for i, block in enumerate(net.blocks) if block.window_size == 0] == [2, 5, 8, 11]
    assert [s.stride for s in model.backbone.output_shape().values()] == [4, 8, 16, 32, 64]
    # Another batch keeps the 100 epochs and scales the lr linearly (here 16 images: 4x the iterations).
    scaled = effective_recipe(CocoConfig(batch_size=16))
    assert scaled.iterations == 4 * 184375 and scaled.lr == pytest.approx(2.5e-5)
    assert scaled.lr_steps == (4 * 163889, 4 * 177546)
    # A shorter run keeps the schedule's shape; the recipe's own fields are taken as given, and checked.
    short = effective_recipe(CocoConfig(recipe=EMBEDDED_CPU, max_iter=10))
    assert (short.iterations, short.warmup_iters, short.lr_steps, short.checkpoint_period) == (10, 1, (8, 9), 10)
    with pytest.raises(ConfigError, match=r"a schedule of 100 iterations cannot drop the lr at \[240, 280\]"):
        effective_recipe(CocoConfig(recipe=dataclasses.replace(EMBEDDED_CPU, iterations=100)))


def test_presets_derive_from_the_vitdet_base_and_the_command_line_resolves_them(tmp_path, checkpoint, embedded,
                                                                                monkeypatch):
    changed = {f.name for f in dataclasses.fields(EMBEDDED_CPU)
               if getattr(EMBEDDED_CPU, f.name) != getattr(VITDET_B_100EP, f.name)}
    assert {"weight_decay", "eval_period"}.isdisjoint(changed) and {"image_size", "iterations"} <= changed
    ckpt = ["--ckpt", str(checkpoint)]
    default = parse_args([*ckpt, "--data-root", "d"])
    assert (default.preset, default.recipe, default.run.precision) == ("vitdet_b_100ep", VITDET_B_100EP, "auto")
    # Every leaf is a flag of its own name; --no-amp is --precision fp32.
    config = parse_args([*ckpt, *embedded_args(embedded), "--max-iter", "7", "--window-size", "4", "--no-amp",
                         "--num-workers", "0", "--seed", "3"])
    assert (config.preset, config.max_iter, config.recipe.window_size, config.recipe.image_size) == \
        ("embedded_cpu", 7, 4, 64)
    assert (config.run.precision, config.num_workers, config.run.seed, config.run.data_root) == \
        ("fp32", 0, 3, str(embedded))
    # --embedded: generate the set if absent (at its root, or at --data-root), then that root with the embedded
    # preset, nothing else.
    assert parse_args([*ckpt, "--embedded", "--data-root", str(embedded)]) == \
        parse_args([*ckpt, *embedded_args(embedded)])
    monkeypatch.setattr(coco, "EMBEDDED", Embedded(str(embedded), "embedded_cpu", write_embedded_coco))
    assert parse_args([*ckpt, "--embedded"]) == parse_args([*ckpt, *embedded_args(embedded)])
    # --config FILE replays a resolved configuration; flags override it.
    prepared = prepare(config)
    assert (prepared.run.arch, prepared.run.out) == (TINY, str(default_out(config, file_sha256(checkpoint))))
    hold_run_dir(dataclasses.replace(prepared, run=dataclasses.replace(prepared.run, out=str(tmp_path)))).release()
    assert read_config(tmp_path / "config.yaml")["recipe"]["window_size"] == 4
    replayed = parse_args(["--config", str(tmp_path / "config.yaml")])
    assert replayed == dataclasses.replace(prepared, run=dataclasses.replace(prepared.run, out=str(tmp_path)))
    assert parse_args(["--config", str(tmp_path / "config.yaml"), "--lr", "0.5"]).recipe.lr == 0.5


def test_embedded_set_has_exact_masks_and_tight_boxes(embedded):
    splits = coco_layout(embedded)
    coco = COCO(str(splits["val2017"].json_file))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CATEGORIES)
    assert len(coco.getImgIds()) == 64 and len(list(splits["val2017"].image_root.glob("*.png"))) == 64
    first_val_scene = 320 + 1  # val scenes follow the 320 train scenes
    scene = make_scene(first_val_scene, size=64)
    annotations = coco.loadAnns(coco.getAnnIds(imgIds=[1]))
    assert [a["category_id"] - 1 for a in annotations] == scene.categories
    for annotation, mask in zip(annotations, scene.masks):
        np.testing.assert_array_equal(coco.annToMask(annotation).astype(bool), mask)
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        assert annotation["bbox"] == [cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1]
        assert annotation["area"] == mask.sum()
    train_images = {p.read_bytes() for p in splits["train2017"].image_root.glob("*.png")}
    assert not train_images & {p.read_bytes() for p in splits["val2017"].image_root.glob("*.png")}
    # The set names itself (records, run folders); its RLE masks are read as bitmasks, COCO's polygons as such.
    assert dataset_name(embedded) == "coco-embedded" and dataset_name(embedded / "annotations") == "coco"
    register_splits(CocoConfig(run=RunSpec(data_root=str(embedded))))
    assert mask_format(DatasetCatalog.get(f"coco-embedded@{embedded.resolve()}_val2017")) == "bitmask"
    polygon = {"segmentation": [[0, 0, 4, 0, 4, 4]], "iscrowd": 0}
    crowd = {"segmentation": {"size": [4, 4], "counts": "04"}, "iscrowd": 1}
    assert mask_format([{"annotations": [polygon, crowd]}]) == "polygon"


def test_missing_layout_names_the_expected_files(tmp_path):
    with pytest.raises(DatasetError, match=r"instances_\{train,val\}2017\.json.*--embedded"):
        coco_layout(tmp_path / "nowhere")
    (tmp_path / "annotations").mkdir()
    with pytest.raises(DatasetError, match=r"lacks .*instances_train2017\.json, .*train2017.*expected"):
        coco_layout(tmp_path)


class GroundTruthAsPredictions(nn.Module):
    """A 'detector' that answers each image with its annotations, optionally perturbed."""

    def __init__(self, dataset: list[dict], shift: float = 0.0, drop_every: int = 0, empty: bool = False) -> None:
        super().__init__()
        self.by_file = {record["file_name"]: record for record in dataset}
        self.shift, self.drop_every, self.empty = shift, drop_every, empty

    def forward(self, inputs: list[dict]) -> list[dict]:
        outputs = []
        for item in inputs:
            record = self.by_file[item["file_name"]]
            kept = [a for i, a in enumerate(record["annotations"])
                    if not self.empty and not (self.drop_every and i % self.drop_every == 1)]
            height, width = record["height"], record["width"]
            boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in kept]
            instances = Instances((height, width))
            instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4) + self.shift)
            instances.scores = torch.linspace(1.0, 0.5, len(kept))
            instances.pred_classes = torch.tensor([a["category_id"] for a in kept], dtype=torch.int64)
            masks = [mask_util.decode(a["segmentation"]) for a in kept]
            instances.pred_masks = torch.from_numpy(np.stack(masks).astype(bool)) if masks else \
                torch.zeros((0, height, width), dtype=torch.bool)
            outputs.append({"instances": instances})
        return outputs


@pytest.mark.slow  # an end-to-end run of several seconds: `make test` only
def test_ground_truth_as_predictions_scores_100_and_a_perturbation_matches_pycocotools(tmp_path, embedded):
    config = CocoConfig(run=RunSpec(ckpt="unused", data_root=str(embedded)))
    _, val_name = register_splits(config)
    dataset = copy.deepcopy(DatasetCatalog.get(val_name))
    preset = PRESETS["embedded_cpu"]

    perfect = store_metrics(evaluate(GroundTruthAsPredictions(dataset), val_name, preset, tmp_path / "gt", 0))
    for task in ("bbox", "segm"):
        for name in ("AP", "AP50", "AP75"):
            assert perfect[f"{name}_{task}"] == pytest.approx(100.0)

    # Boxes shifted by 3 px and every other detection dropped from images with several objects.
    out = tmp_path / "perturbed"
    perturbed = store_metrics(evaluate(GroundTruthAsPredictions(dataset, shift=3.0, drop_every=2), val_name, preset,
                                       out, 0))
    predictions = json.loads((out / "inference" / "coco_instances_results.json").read_text())
    ground_truth = COCO(str(coco_layout(embedded)["val2017"].json_file))
    for task in ("bbox", "segm"):
        evaluation = COCOeval(ground_truth, ground_truth.loadRes(predictions), task)
        evaluation.evaluate(), evaluation.accumulate(), evaluation.summarize()
        assert perturbed[f"AP_{task}"] == pytest.approx(100 * evaluation.stats[0], abs=1e-3)
        assert perturbed[f"AP50_{task}"] == pytest.approx(100 * evaluation.stats[1], abs=1e-3)
    assert perturbed["AP_bbox"] < 90 and perturbed["AP_segm"] < 100  # the perturbation costs AP

    # No prediction at all: Detectron2 reports NaN; the record has AP 0 for boxes and masks alike, nothing else
    nothing = store_metrics(evaluate(GroundTruthAsPredictions(dataset, empty=True), val_name, preset,
                                     tmp_path / "empty", 0))
    assert nothing == {"AP_bbox": 0.0, "AP_segm": 0.0}


def test_subset_json_holds_the_lowest_image_ids_and_exactly_their_annotations(tmp_path, embedded):
    source = coco_layout(embedded)["val2017"]
    document = json.loads(source.json_file.read_text())
    document["images"].reverse()  # the file's order must not matter: the lowest ids are kept
    document["licenses"] = [{"id": 1, "name": "test"}]
    shuffled = tmp_path / "instances_val2017.json"
    shuffled.write_text(json.dumps(document))
    subset = write_coco_subset(CocoSplit("val2017", shuffled, source.image_root), 5, tmp_path / "subset")
    assert subset.json_file == tmp_path / "subset" / "instances_val2017_first5.json"
    assert subset.image_root == source.image_root  # images are read where they are
    written = json.loads(subset.json_file.read_text())
    assert sorted(image["id"] for image in written["images"]) == [1, 2, 3, 4, 5]
    expected = [a for a in document["annotations"] if a["image_id"] <= 5]
    assert written["annotations"] == expected and len(expected) >= 5
    assert written["categories"] == document["categories"] and len(written["categories"]) == len(CATEGORIES)
    assert (written["info"], written["licenses"]) == (document["info"], document["licenses"])
    assert not list((tmp_path / "subset").glob(".*tmp*"))  # written through a temporary file, renamed
    assert len(subset_document(document, 10**6)["images"]) == 64  # more than there are: all of them
    for bad in (0, -1):
        with pytest.raises(DatasetError, match=f"--subset {bad}: give a positive number"):
            subset_document(document, bad)


def test_subset_is_registered_under_its_own_names_and_evaluated_alone(tmp_path, embedded):
    # --data-root: the subset jsons go under the run's folder, never next to the data
    config = CocoConfig(run=RunSpec(ckpt="unused", data_root=str(embedded)), subset=3)
    train_name, val_name = register_splits(config, tmp_path / "subset")
    assert train_name.endswith("_train2017_first3") and val_name.endswith("_val2017_first3")
    assert str(embedded.resolve()) in val_name
    assert [d["image_id"] for d in DatasetCatalog.get(train_name)] == [1, 2, 3]
    val = DatasetCatalog.get(val_name)
    assert [d["image_id"] for d in val] == [1, 2, 3]
    assert MetadataCatalog.get(val_name).json_file == str(tmp_path / "subset" / "instances_val2017_first3.json")
    assert sorted(p.name for p in (tmp_path / "subset").iterdir()) == ["instances_train2017_first3.json",
                                                                       "instances_val2017_first3.json"]
    assert sorted(p.name for p in (embedded / "annotations").iterdir()) == ["instances_train2017.json",
                                                                            "instances_val2017.json"]
    full_train, full_val = register_splits(CocoConfig(run=RunSpec(ckpt="unused", data_root=str(embedded))))
    assert len(DatasetCatalog.get(full_val)) == 64 and full_val != val_name
    # COCOEvaluator scores against the subset's json: its ground truth answers it perfectly (against all 64
    # images it would miss 61 of them).
    metrics = store_metrics(evaluate(GroundTruthAsPredictions(copy.deepcopy(val)), val_name,
                                     PRESETS["embedded_cpu"], tmp_path / "eval", 0))
    assert metrics["AP_bbox"] == pytest.approx(100.0) and metrics["AP_segm"] == pytest.approx(100.0)
    predictions = json.loads((tmp_path / "eval" / "inference" / "coco_instances_results.json").read_text())
    assert {p["image_id"] for p in predictions} == {1, 2, 3}
    with pytest.raises(ConfigError, match="--subset 0: give a positive number of images"):
        register_splits(CocoConfig(run=RunSpec(ckpt="unused", data_root=str(embedded)), subset=0),
                        tmp_path / "subset")


@pytest.mark.slow
def test_subset_run_is_tagged_and_bad_subsets_are_refused(tmp_path, checkpoint, embedded, one_thread, capsys):
    store = tmp_path / "results.jsonl"
    assert main(["coco", "--ckpt", str(checkpoint), *embedded_args(embedded), "--subset", "4", "--out",
                 str(tmp_path / "run"), "--max-iter", "4", "--num-workers", "0", "--visualize", "0",
                 "--results", str(store)]) == 0
    record = only_record(store)
    assert record.tags == {"subset": "first4"} and record.config["subset"] == 4
    assert (tmp_path / "run" / "subset" / "instances_val2017_first4.json").is_file()
    out = default_out(CocoConfig(run=RunSpec(ckpt="x.pth", data_root=str(embedded)), preset="p", subset=50),
                      "ab" * 32)
    assert out == Path("runs/transfer/coco-embedded/p/x-abababab-first50")
    for bad in ("0", "-5"):
        assert main(["coco", "--ckpt", str(checkpoint), *embedded_args(embedded),
                     "--subset", bad, "--out", str(tmp_path / "bad")]) == 1
        assert f"error: --subset {bad}: give a positive number of images (the first N by image id)\n" in \
            capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_entry_point_requires_data_choice_and_reports_missing_layout(tmp_path, capsys, checkpoint):
    with pytest.raises(SystemExit) as exit_info:
        main(["coco", "--ckpt", str(checkpoint)])
    assert exit_info.value.code == 2 and "--data-root DIR" in capsys.readouterr().err
    assert main(["coco", "--ckpt", str(checkpoint), "--data-root", str(tmp_path / "coco")]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: COCO data root") and "instances_{train,val}2017.json" in error


# Measured on the 2-core CPU (random-init tiny ViT, one thread, ~1.5 s per iteration; a chance-level detector
# scores ~0): box AP50 9.4 after 40 iterations, 5.4 after resuming to 60; 39.1 after the preset's 300
# iterations from the demo's 3-epoch MAE encoder.
@pytest.mark.slow
def test_short_training_learns_and_resumes(tmp_path, checkpoint, embedded, one_thread, capsys):
    store = tmp_path / "results.jsonl"
    argv = ["coco", "--ckpt", str(checkpoint), *embedded_args(embedded), "--out", str(tmp_path / "run"),
            "--max-iter", "40", "--num-workers", "0", "--results", str(store), "--visualize", "2"]
    assert main(argv) == 0
    curve = json.loads((tmp_path / "run" / "loss_curve.json").read_text())
    assert [point["iteration"] for point in curve] == list(range(4, 40, 5))  # the embedded preset logs every 5

    capsys.readouterr()
    assert main(argv) == 1  # the folder holds a run: continued only with --resume
    assert "holds a run already; pass --resume" in capsys.readouterr().err
    assert main([*argv, "--max-iter", "60", "--resume"]) == 0  # a resume may extend the run
    curve = json.loads((tmp_path / "run" / "loss_curve.json").read_text())
    assert [point["iteration"] for point in curve] == list(range(4, 60, 5))  # continued at 40, not from 0
    assert curve[-1]["total_loss"] < curve[0]["total_loss"]
    records, malformed = read_results(store)
    assert malformed == [] and len(records) == 2
    first, second = records
    assert first.metrics["AP50_bbox"] > 2.0 and second.metrics["AP50_bbox"] > 2.0

    record = records[-1]
    assert (record.task, record.dataset, record.protocol, record.metric) == \
        ("detection", "coco-embedded", "mask-rcnn", "AP_bbox")
    assert {"AP_bbox", "AP50_bbox", "AP75_bbox", "AP_segm", "AP50_segm", "AP75_segm"} <= set(record.metrics)
    assert record.checkpoint_sha256 == file_sha256(checkpoint) and record.method == "mae" and record.arch == TINY
    assert record.config["resolved_recipe"]["iterations"] == 60 and first.config["resolved_recipe"]["iterations"] == 40
    # --precision auto: bf16 autocast on a CPU with native bf16, else fp32; the record says which.
    assert record.precision == record.compute["precision"] == \
        precision_name(autocast_dtype(torch.device("cpu"), "auto"))
    assert len(list((tmp_path / "run" / "visualizations").glob("*.png"))) == 2

    # --eval-only reads the finished run (its lock, its config.yaml unchanged): the same numbers.
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert main([*argv, "--eval-only"]) == 0
    again = read_results(store)[0][-1]
    assert again.metrics == pytest.approx(second.metrics) and again.precision == "fp32"
    assert (tmp_path / "run" / "config.yaml").read_text() == saved


@pytest.mark.slow
def test_two_gloo_processes_through_detectron2s_launcher(tmp_path, embedded, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two workers on two cores
    store = tmp_path / "results.jsonl"
    foreign = tmp_path / "timm_vit.pth"  # a plain timm state dict: no metadata, so --method names the method
    torch.save(create_backbone(TINY).state_dict(), foreign)
    argv = ["coco", "--ckpt", str(foreign), "--method", "mae", *embedded_args(embedded), "--out",
            str(tmp_path / "ddp"), "--max-iter", "4", "--num-gpus", "2", "--num-workers", "0", "--visualize", "0",
            "--results", str(store)]
    assert main(argv) == 0
    record = only_record(store)  # one record, written by rank 0
    assert record.config["processes"] == 2 and record.config["resolved_recipe"]["total_batch_size"] == 4
    assert (record.method, record.arch, record.pretrain_epochs) == ("mae", TINY, None)
    assert (tmp_path / "ddp" / "model_final.pth").is_file()


@pytest.mark.slow
def test_two_gloo_processes_train_a_hierarchical_backbone_whose_upper_stages_feed_no_level(
        tmp_path, resnet_checkpoint, embedded, monkeypatch):
    # The embedded pyramid reads ResNet-18's stages 1-2 only: DDP must not wait for gradients of stages 3-4.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    store = tmp_path / "results.jsonl"
    assert main(["coco", "--ckpt", str(resnet_checkpoint), *embedded_args(embedded), "--out", str(tmp_path / "ddp"),
                 "--max-iter", "4", "--num-gpus", "2", "--num-workers", "0", "--visualize", "0",
                 "--results", str(store)]) == 0
    record = only_record(store)
    assert (record.arch, record.config["processes"]) == (RESNET, 2)
    assert [point["iteration"] for point in json.loads((tmp_path / "ddp" / "loss_curve.json").read_text())] == [3]


# ----------------------------------------------------------------------------------- a hierarchical backbone


def test_hierarchical_backbone_feeds_detectron2s_fpn_from_its_contract(resnet_checkpoint):
    backbone, _ = backbone_from_checkpoint(str(resnet_checkpoint), arch=RESNET)
    weights = {k: v.clone() for k, v in backbone.state_dict().items()}
    model = build_detector(RESNET, VITDET_B_100EP, num_classes=80, backbone=backbone)
    assert isinstance(model.backbone, FPN) and isinstance(model.backbone.bottom_up, ContractBackbone)
    # The bottom-up levels are the contract's: ResNet-18's four stages, their channels and strides.
    bottom_up = model.backbone.bottom_up.output_shape()
    assert [(name, s.channels, s.stride) for name, s in bottom_up.items()] == \
        [("stage1", 64, 4), ("stage2", 128, 8), ("stage3", 256, 16), ("stage4", 512, 32)]
    # The standard FPN's levels (mask_rcnn_fpn.py: p2-p6), and the heads read them all.
    assert {name: s.stride for name, s in model.backbone.output_shape().items()} == \
        {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
    assert model.proposal_generator.in_features == ["p2", "p3", "p4", "p5", "p6"]
    assert model.roi_heads.box_in_features == ["p2", "p3", "p4", "p5"]
    # Every checkpoint tensor is in the detector; batch norm is frozen (its statistics are the checkpoint's).
    net = model.backbone.bottom_up.net
    assert not [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert isinstance(net.bn1, FrozenBatchNorm2d)
    loaded = net.state_dict()
    for key, value in weights.items():
        if not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)
    # The embedded preset's two-level pyramid takes the stages at strides 4 and 8, the max-pooled 16 on top.
    small = build_detector(RESNET, EMBEDDED_CPU, num_classes=4)
    assert small.backbone.in_features == ("stage1", "stage2")
    assert {name: s.stride for name, s in small.backbone.output_shape().items()} == {"p2": 4, "p3": 8, "p4": 16}
    with pytest.raises(ConfigError, match=r"resnet18 has levels at strides \[4, 8, 16, 32\], not all of"):
        build_detector(RESNET, dataclasses.replace(EMBEDDED_CPU, pyramid_strides=(2, 4)), num_classes=4)


def test_layer_decay_follows_the_backbone_contract_inside_the_detector():
    model = build_detector(RESNET, VITDET_B_100EP, num_classes=80)
    optimizer = optimizer_for(model, RESNET, VITDET_B_100EP, lr=1.0)
    lr_of = {name: group["lr"] for group in optimizer.param_groups for p in group["params"]
             for name, q in model.named_parameters() if q is p}
    decay = VITDET_B_100EP.layer_decay
    assert lr_of["backbone.bottom_up.net.conv1.weight"] == pytest.approx(decay ** 5)  # the stem: layer 0 of 4
    assert lr_of["backbone.bottom_up.net.layer1.0.conv1.weight"] == pytest.approx(decay ** 4)
    assert lr_of["backbone.bottom_up.net.layer4.1.conv2.weight"] == pytest.approx(decay)
    # Pyramid and heads get the full lr, also where a name ends like the stem's (conv1.weight).
    for name in ("backbone.fpn_lateral2.weight", "proposal_generator.rpn_head.conv.conv1.weight",
                 "roi_heads.box_head.conv1.weight", "roi_heads.mask_head.mask_fcn1.weight"):
        assert lr_of[name] == 1.0, name
    assert len(lr_of) == sum(p.requires_grad for p in model.parameters())


# Measured on the 2-core CPU (random-init ResNet-18, one thread; the run and its replay take ~70 s): box AP50 16.0
# after 40 iterations (a chance-level detector scores ~0).
@pytest.mark.slow
def test_resnet18_mask_rcnn_fpn_end_to_end_and_its_config_replays(tmp_path, resnet_checkpoint, embedded,
                                                                   one_thread):
    store = tmp_path / "results.jsonl"
    first = tmp_path / "run"
    assert main(["coco", "--ckpt", str(resnet_checkpoint), *embedded_args(embedded), "--max-iter", "40",
                 "--precision", "fp32", "--num-workers", "0", "--visualize", "0", "--out", str(first),
                 "--results", str(store)]) == 0
    record = only_record(store)
    assert (record.task, record.dataset, record.protocol, record.arch, record.method) == \
        ("detection", "coco-embedded", "mask-rcnn", RESNET, "supervised")
    assert record.precision == "fp32" and record.value == record.metrics["AP_bbox"]
    assert record.metrics["AP50_bbox"] > 2.0  # it learns: the classifier starts telling the shapes apart
    # The record's AP values are pycocotools' on the detector's predictions.
    predictions = json.loads((first / "inference" / "coco_instances_results.json").read_text())
    ground_truth = COCO(str(coco_layout(embedded)["val2017"].json_file))
    for task in ("bbox", "segm"):
        evaluation = COCOeval(ground_truth, ground_truth.loadRes(predictions), task)
        evaluation.evaluate(), evaluation.accumulate(), evaluation.summarize()
        for index, name in enumerate(("AP", "AP50", "AP75")):
            assert record.metrics[f"{name}_{task}"] == pytest.approx(100 * evaluation.stats[index], abs=1e-3)

    # The run's config.yaml replays it into another folder: the same record numbers, the same loss curve.
    saved = read_config(first / "config.yaml")
    assert (saved["run"]["arch"], saved["run"]["out"], saved["preset"]) == (RESNET, str(first), "embedded_cpu")
    second = tmp_path / "again"
    assert main(["coco", "--config", str(first / "config.yaml"), "--out", str(second)]) == 0
    records, _ = read_results(store)
    assert len(records) == 2 and records[1].metrics == records[0].metrics
    assert (second / "loss_curve.json").read_text() == (first / "loss_curve.json").read_text()
    assert read_config(second / "config.yaml") == {**saved, "run": {**saved["run"], "out": str(second)}}


# ------------------------------------------------------------------------------- the run-directory rule


def test_bad_checkpoints_fail_with_the_loaders_line_before_anything_else(tmp_path, embedded, capsys):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(os.urandom(4096))
    for ckpt, problem in ((tmp_path / "missing.pth", "no such file"), (garbage, "corrupt")):
        out = tmp_path / f"out-{ckpt.stem}"
        capsys.readouterr()
        assert main(["coco", "--ckpt", str(ckpt), *embedded_args(embedded), "--out", str(out)]) == 1
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {ckpt}: ") and problem in lines[0], lines
        assert not out.exists()  # nothing written, no lock taken
    # An explicit --arch does not skip the check.
    assert main(["coco", "--ckpt", str(garbage), "--arch", TINY, *embedded_args(embedded)]) == 1
    assert capsys.readouterr().err.startswith(f"error: {garbage}: corrupt")


def test_a_locked_run_directory_is_refused_naming_its_holder(tmp_path, checkpoint, embedded, capsys):
    out = tmp_path / "run"
    with RunLock(out):
        assert main(["coco", "--ckpt", str(checkpoint), *embedded_args(embedded), "--out", str(out)]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"error: {out} is in use by another run (pid {os.getpid()} on ")
    assert not (out / "config.yaml").exists()


def test_a_resume_with_other_model_or_data_settings_is_refused_naming_the_fields(tmp_path, checkpoint,
                                                                                  resnet_checkpoint, embedded,
                                                                                  capsys):
    out = tmp_path / "run"
    argv = ["coco", "--ckpt", str(checkpoint), *embedded_args(embedded), "--out", str(out)]
    # A run directory as a first run leaves it: its config.yaml and a checkpoint.
    hold_run_dir(prepare(parse_args(argv[1:]))).release()
    (out / "last_checkpoint").write_text("model_0000009.pth")
    for extra, field in ((["--arch", RESNET, "--ckpt", str(resnet_checkpoint)], "run.arch: 'vit_tiny_patch4_32' -> "
                                                                                "'resnet18'"),
                         (["--preset", "vitdet_b_100ep"], "preset: 'embedded_cpu' -> 'vitdet_b_100ep'"),
                         (["--window-size", "4"], "recipe.window_size: 8 -> 4")):
        capsys.readouterr()
        assert main([*argv, *extra, "--resume"]) == 1
        error = capsys.readouterr().err
        assert error.startswith(f"error: {out} holds a run with other settings (") and field in error, error
        assert "num_workers" not in error
    assert read_config(out / "config.yaml")["preset"] == "embedded_cpu"  # left as the run wrote it
    # Harmless fields may differ: the check passes (here the lock is then taken and released at once).
    config = prepare(parse_args([*argv[1:], "--resume", "--num-workers", "0", "--visualize", "0", "--max-iter", "5"]))
    hold_run_dir(config).release()
    assert read_config(out / "config.yaml")["max_iter"] == 5
    # --eval-only reads the run: a detector trained with other settings is refused, naming them.
    (out / "model_final.pth").write_bytes(b"")
    assert main([*argv, "--eval-only", "--window-size", "4"]) == 1
    assert "--eval-only: " in capsys.readouterr().err


def test_a_hierarchical_backbone_builds_from_a_yacs_config_through_detectron2s_registry(one_thread):
    """Detectron2's own way (``build_resnet_fpn_backbone``): MODEL.BACKBONE.NAME picks our builder, which puts the
    contract's levels, by name, channels and stride, under Detectron2's FPN."""
    from detectron2.config import get_cfg
    from detectron2.modeling import build_backbone

    cfg = get_cfg()
    cfg.MODEL.BACKBONE.NAME = "build_contract_fpn_backbone"
    cfg.MODEL.MIMBENCH_ARCH = "resnet18"
    cfg.MODEL.FPN.IN_FEATURES = ["stage1", "stage2", "stage3", "stage4"]
    fpn = build_backbone(cfg)
    shapes = fpn.output_shape()
    assert {name: (shape.channels, shape.stride) for name, shape in shapes.items()} == {
        f"p{k}": (256, 2 ** k) for k in range(2, 7)}
    levels = fpn.bottom_up.output_shape()
    assert (levels["stage3"].channels, levels["stage3"].stride, levels["stage4"].stride) == (256, 16, 32)
    maps = fpn(torch.randn(1, 3, 64, 64))
    assert {name: tuple(value.shape) for name, value in maps.items()} == {
        f"p{k}": (1, 256, 64 // 2 ** k, 64 // 2 ** k) for k in range(2, 7)}
