"""The MPViT and RC-MAE tables: the papers' reference rows as transcribed, our MPViT rows by protocol, the
supervised method in the main table."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest

from mimbench.results import Result
from mimbench.tables import render
from mimbench.tables.assemble import build_tables
from mimbench.tables.rows import REFERENCE_DIR


def by_name(tables):
    return {table.name: table for table in tables}


def coco(protocol: str, box: float, mask: float, arch: str = "mpvit_small", seed: int = 0) -> Result:
    return Result("detection", "coco", "mask-rcnn", "AP_bbox", box, {"AP_bbox": box, "AP_segm": mask},
                  method="supervised", arch=arch, pretrain_epochs=300.0, seed=seed, protocol_id=protocol)


def test_mpvit_paper_rows_are_the_csv_and_ours_go_by_protocol():
    records = [coco("mpvit-maskrcnn-1x", 46.0, 42.0), coco("mpvit-maskrcnn-1x", 47.0, 42.0, seed=1),
               coco("mpvit-maskrcnn-3x-ms", 48.0, 43.5),
               Result("segmentation", "ade20k", "upernet", "mIoU", 47.5, {"mIoU": 47.5}, method="supervised",
                      arch="mpvit_small", pretrain_epochs=300.0, protocol_id="mpvit-upernet-160k-ss"),
               Result("segmentation", "ade20k", "upernet", "mIoU", 30.0, {"mIoU": 30.0}, method="supervised",
                      arch="mpvit_small", pretrain_epochs=300.0, protocol_id="ade20k-embedded-cpu")]
    table = by_name(build_tables(records))["mpvit"]
    frame = table.frame.map(render.text)
    paper = pd.read_csv(REFERENCE_DIR / "mpvit_cvpr2022_mpvit.csv")
    assert list(frame["Arch"]) == [*paper["model"], "mpvit_small"]
    assert list(frame["Source"]) == ["paper"] * 4 + ["ours"]
    assert list(frame.loc[2, ["Params (M)", "GFLOPs", "ImageNet top-1", "COCO 1x AP^bb", "ADE20K mIoU"]]) == \
        ["22.8", "4.7", "83.0", "46.4", "48.3"]
    ours = frame.iloc[-1]
    assert ours["Params (M)"] == "22.9" and ours["GFLOPs"] == "4.8"  # 22,892,400; torch's counter
    assert ours["COCO 1x AP^bb"] == "46.5 ± 0.7 [n=2]" and ours["COCO 3x AP^bb"] == "48.0"
    assert ours["COCO 3x AP^mk"] == "43.5" and ours["ADE20K mIoU"] == "47.5"  # not the embedded run's 30.0
    assert any("CVPR 2022" in note for note in table.notes)


def test_rcmae_reference_rows_and_the_supervised_row_in_the_main_table():
    imagenet = Result("classification", "imagenet", "finetune", "top1", 81.8, {"top1": 81.8}, method="supervised",
                      arch="vit_base_patch16_224", pretrain_epochs=300.0, protocol_id="mae-finetune")
    tables = by_name(build_tables([imagenet]))
    rcmae = tables["rcmae"].frame.map(render.text)
    assert list(rcmae["Method"]) == ["MAE", "RC-MAE"] * 3 + ["Supervised"]  # ours: MAE's fine-tuning protocol
    assert rcmae.iloc[-1]["ImageNet top-1 (fine-tune)"] == "81.8"
    # The ViT-L rows' fine-tuning is the RC-MAE release's own recipe: a column of its own, not MAE's.
    assert rcmae.loc[5, "ImageNet top-1 (fine-tune) [rcmae-release-vitl-finetune]"] == "86.1"
    assert rcmae.loc[5, "ImageNet top-1 (fine-tune)"] == "-"
    assert list(rcmae.loc[3, ["Arch", "Pre-train epochs", "ImageNet top-1 (fine-tune)", "ImageNet top-1 (linear)",
                              "COCO AP^bb (Mask R-CNN FPN)", "COCO AP^mk (Mask R-CNN FPN)"]]) == \
        ["ViT-B/16", "1600", "83.6", "68.4", "51.0", "45.4"]
    assert "Li et al. 2021" in tables["rcmae"].caption
    main = tables["main"].frame
    assert main[main["Source"] == "ours"]["Method"].tolist() == ["Supervised"]
    without = [t.name for t in build_tables([imagenet], reference=False)]
    assert without == ["main", "transfer", "rcmae", "other"]


def test_mpvit_rows_take_the_records_backbone_size_with_the_papers_head():
    """A record's params are the backbone's alone; the table counts the 1000-class head as the paper does."""
    sized = dataclasses.replace(coco("mpvit-maskrcnn-1x", 46.0, 42.0, arch="mpvit_tiny"), params=10_000_000,
                                gflops=3.33)
    frame = by_name(build_tables([sized, coco("mpvit-maskrcnn-1x", 46.0, 42.0, arch="mpvit_xsmall")]))["mpvit"]
    ours = frame.frame.map(render.text).set_index("Arch").loc[["mpvit_tiny", "mpvit_xsmall"]]
    assert list(ours["Params (M)"]) == ["10.2", "10.6"]  # 10,000,000 + 217,000; the tested constant
    assert list(ours["GFLOPs"]) == ["3.3", "3.0"]


@pytest.mark.parametrize("name", ["mpvit", "rcmae"])
def test_latex_of_the_new_tables_has_one_cell_per_column(name):
    table = by_name(build_tables([coco("mpvit-maskrcnn-1x", 46.0, 42.0)]))[name]
    tex = render.latex(table)
    body = tex[tex.index(r"\toprule"):tex.index(r"\bottomrule")]
    rows = [line for line in body.splitlines() if line.endswith(r"\\")]
    assert len(rows) == len(table.frame) + 1
    assert all(line.count("&") == len(table.frame.columns) - 1 for line in rows)


@pytest.mark.slow  # an end-to-end run of several seconds: `make test` only
def test_the_tables_mpvit_sizes_are_the_models_own_counts():
    from mimbench.backbones.cli import forward_gflops
    from mimbench.tables.layout import MPVIT_HEAD_PARAMS, MPVIT_SIZES

    for arch, (params, gflops) in MPVIT_SIZES.items():
        counted_params, counted_gflops = forward_gflops(arch, num_classes=1000)
        assert counted_params == params and counted_gflops == pytest.approx(gflops, abs=5e-3), arch
        assert params - forward_gflops(arch)[0] == MPVIT_HEAD_PARAMS[arch], arch
