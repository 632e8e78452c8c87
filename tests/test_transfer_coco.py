"""COCO adapter: ViTDet Mask R-CNN on our backbones through Detectron2 — loading, evaluation, a short training run."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
import torch.nn as nn
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, BoxMode, Instances
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mimbench.backbones.checkpoint import CheckpointError, CheckpointMetadata, save_backbone
from mimbench.backbones.vit import create_backbone
from mimbench.core.io import file_sha256
from mimbench.results import read_results
from mimbench.transfer.coco import (PRESETS, CocoConfig, CocoRunError, build_detector, default_out, evaluate,
                                    load_encoder, register_splits, resolve_preset, run_coco, store_metrics)
from mimbench.transfer.coco_data import (CocoDataError, CocoSplit, coco_layout, subset_document, write_coco_subset,
                                         write_embedded_coco)
from mimbench.transfer.run import main
from mimbench.transfer.scenes import CATEGORIES, make_scene

TINY = "vit_tiny_patch4_32"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny_mae.safetensors"
    return save_backbone(path, create_backbone(TINY), CheckpointMetadata(method="mae", arch=TINY, epochs=3.0))


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> Path:
    return write_embedded_coco(tmp_path_factory.mktemp("coco") / "data", image_size=64)


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
    with pytest.raises(CocoRunError, match="cannot give the pyramid strides"):
        build_detector(TINY, PRESETS["vitdet_b_100ep"], num_classes=80)  # patch 4 cannot reach stride 32


def test_vitdet_preset_is_the_paper_protocol():
    preset = PRESETS["vitdet_b_100ep"]
    assert (preset.image_size, preset.batch_size, preset.max_iter) == (1024, 64, 184375)
    assert (preset.lr, preset.weight_decay, preset.layer_decay, preset.drop_path) == (1e-4, 0.1, 0.7, 0.1)
    model = build_detector("vit_base_patch16_224", preset, num_classes=80)
    net = model.backbone.net
    assert [i for i, block in enumerate(net.blocks) if block.window_size == 0] == [2, 5, 8, 11]
    assert [s.stride for s in model.backbone.output_shape().values()] == [4, 8, 16, 32, 64]
    # Another batch keeps the 100 epochs and scales the lr linearly (here 16 images: 4x the iterations).
    _, scaled = resolve_preset(CocoConfig(ckpt="x", data_root="y", batch_size=16))
    assert scaled.max_iter == 4 * 184375 and scaled.lr == pytest.approx(2.5e-5)
    assert scaled.lr_steps == (4 * 163889, 4 * 177546)


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


def test_missing_layout_names_the_expected_files(tmp_path):
    with pytest.raises(CocoDataError, match=r"instances_\{train,val\}2017\.json.*--embedded"):
        coco_layout(tmp_path / "nowhere")
    (tmp_path / "annotations").mkdir()
    with pytest.raises(CocoDataError, match=r"lacks .*instances_train2017\.json, .*train2017.*expected"):
        coco_layout(tmp_path)


class GroundTruthAsPredictions(nn.Module):
    """A 'detector' that answers each image with its annotations, optionally perturbed."""

    def __init__(self, dataset: list[dict], shift: float = 0.0, drop_every: int = 0) -> None:
        super().__init__()
        self.by_file = {record["file_name"]: record for record in dataset}
        self.shift, self.drop_every = shift, drop_every

    def forward(self, inputs: list[dict]) -> list[dict]:
        outputs = []
        for item in inputs:
            record = self.by_file[item["file_name"]]
            kept = [a for i, a in enumerate(record["annotations"])
                    if not (self.drop_every and i % self.drop_every == 1)]
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


def test_ground_truth_as_predictions_scores_100_and_a_perturbation_matches_pycocotools(tmp_path, embedded):
    config = CocoConfig(ckpt="unused", embedded=True, embedded_root=str(embedded))
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
        with pytest.raises(CocoDataError, match=f"--subset {bad}: give a positive number"):
            subset_document(document, bad)


def test_subset_is_registered_under_its_own_names_and_evaluated_alone(tmp_path, embedded):
    # --data-root: the subset jsons go under the run's folder, never next to the data
    config = CocoConfig(ckpt="unused", data_root=str(embedded), subset=3)
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
    full_train, full_val = register_splits(CocoConfig(ckpt="unused", data_root=str(embedded)))
    assert len(DatasetCatalog.get(full_val)) == 64 and full_val != val_name
    # COCOEvaluator scores against the subset's json: its ground truth answers it perfectly (against all 64
    # images it would miss 61 of them).
    metrics = store_metrics(evaluate(GroundTruthAsPredictions(copy.deepcopy(val)), val_name,
                                     PRESETS["embedded_cpu"], tmp_path / "eval", 0))
    assert metrics["AP_bbox"] == pytest.approx(100.0) and metrics["AP_segm"] == pytest.approx(100.0)
    predictions = json.loads((tmp_path / "eval" / "inference" / "coco_instances_results.json").read_text())
    assert {p["image_id"] for p in predictions} == {1, 2, 3}
    with pytest.raises(CocoRunError, match="--subset 0: give a positive number of images"):
        register_splits(CocoConfig(ckpt="unused", data_root=str(embedded), subset=0), tmp_path / "subset")


def test_subset_run_is_tagged_and_bad_subsets_are_refused(tmp_path, checkpoint, embedded, one_thread, capsys):
    store = tmp_path / "results.jsonl"
    result = run_coco(CocoConfig(ckpt=str(checkpoint), embedded=True, embedded_root=str(embedded), subset=4,
                                 out=str(tmp_path / "run"), max_iter=4, num_workers=0, visualize=0,
                                 results=str(store)))
    (record,) = read_results(store)[0]
    assert record.tags == {"subset": "first4"} == result.tags and record.config["subset"] == 4
    assert (tmp_path / "run" / "subset" / "instances_val2017_first4.json").is_file()
    assert default_out(CocoConfig(ckpt="x.pth", data_root="d", subset=50), "p", "ab" * 32).name == \
        "x-abababab-first50"
    for bad in ("0", "-5"):
        assert main(["coco", "--ckpt", str(checkpoint), "--embedded", "--embedded-root", str(embedded),
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
def test_short_training_learns_and_resumes(tmp_path, checkpoint, embedded, one_thread):
    store = tmp_path / "results.jsonl"
    config = CocoConfig(ckpt=str(checkpoint), embedded=True, embedded_root=str(embedded), out=str(tmp_path / "run"),
                        max_iter=40, num_workers=0, results=str(store), visualize=2)
    first = run_coco(config)
    curve = json.loads((tmp_path / "run" / "loss_curve.json").read_text())
    assert [point["iteration"] for point in curve] == list(range(4, 40, 5))  # the embedded preset logs every 5

    with pytest.raises(CocoRunError, match="holds a run already"):
        run_coco(config)
    second = run_coco(CocoConfig(**{**config.__dict__, "max_iter": 60, "resume": True}))
    curve = json.loads((tmp_path / "run" / "loss_curve.json").read_text())
    assert [point["iteration"] for point in curve] == list(range(4, 60, 5))  # continued at 40, not from 0
    assert curve[-1]["total_loss"] < curve[0]["total_loss"]
    assert first.metrics["AP50_bbox"] > 2.0 and second.metrics["AP50_bbox"] > 2.0

    records, malformed = read_results(store)
    assert malformed == [] and len(records) == 2
    record = records[-1]
    assert (record.task, record.dataset, record.protocol, record.metric) == \
        ("detection", "coco-embedded", "mask-rcnn", "AP_bbox")
    assert {"AP_bbox", "AP50_bbox", "AP75_bbox", "AP_segm", "AP50_segm", "AP75_segm"} <= set(record.metrics)
    assert record.checkpoint_sha256 == file_sha256(checkpoint) and record.method == "mae" and record.arch == TINY
    assert record.config["preset"]["max_iter"] == 60 and first.config["preset"]["max_iter"] == 40
    assert len(list((tmp_path / "run" / "visualizations").glob("*.png"))) == 2

    # --eval-only scores the trained detector again: the same numbers.
    again = run_coco(CocoConfig(**{**config.__dict__, "eval_only": True}))
    assert again.metrics == pytest.approx(second.metrics)


def test_two_gloo_processes_through_detectron2s_launcher(tmp_path, embedded, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two workers on two cores
    store = tmp_path / "results.jsonl"
    foreign = tmp_path / "timm_vit.pth"  # a plain timm state dict: no metadata, so --method names the method
    torch.save(create_backbone(TINY).state_dict(), foreign)
    argv = ["coco", "--ckpt", str(foreign), "--method", "mae", "--embedded", "--embedded-root", str(embedded), "--out",
            str(tmp_path / "ddp"), "--max-iter", "4", "--num-gpus", "2", "--num-workers", "0", "--visualize", "0",
            "--results", str(store)]
    assert main(argv) == 0
    records, _ = read_results(store)
    (record,) = records  # one record, written by rank 0
    assert record.config["processes"] == 2 and record.config["preset"]["batch_size"] == 4
    assert (record.method, record.arch, record.pretrain_epochs) == ("mae", TINY, None)
    assert (tmp_path / "ddp" / "model_final.pth").is_file()
