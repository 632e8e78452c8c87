"""tables/: the paper's tables from the results store, checked against the poster's printed numbers."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pandas as pd
import pytest

from mimbench.results import Result, append_result
from mimbench.tables import layout, render
from mimbench.tables.assemble import build_tables
from mimbench.tables.build import main
from mimbench.tables.rows import REFERENCE_DIR, Cell

# The poster's tables as it prints them (typed from the MixedAE poster text), 83.1^{+0.4} written 83.1^+0.4.
POSTER_MAIN = """
DeiT          300  19.6  81.8      46.9      48.8      68.7      52.7      42.5      65.9      45.5
MoCov3        600  54.8  82.8      46.8      47.2      66.9      50.8      41.1      63.6      44.1
DINO          1600 120.5 82.8      46.9      49.5      69.1      53.6      42.9      66.0      46.3
BEiT          300  32.1  82.9      44.7      39.3      57.7      42.4      34.8      55.2      36.8
MAE           300  16.4  82.7      46.1      47.2      65.8      51.3      41.1      62.9      44.4
MixMIM        300  40.2  83.2      -         -         -         -         -         -         -
CIM-RevDet    300  42.7  83.1      -         -         -         -         -         -         -
CIM-ResPix    300  42.7  83.3      -         -         -         -         -         -         -
MixedAE       300  16.9  83.1^+0.4 47.0^+0.9 47.8^+0.6 66.6^+0.8 52.0^+0.7 41.6^+0.5 63.6^+0.7 45.0^+0.6
MixedAE-Full* 300  30.8  83.7^+1.0 47.4^+1.3 48.9^+1.7 67.6^+1.8 53.3^+2.0 42.5^+1.4 64.8^+1.9 45.9^+1.5
MixedAE-Full  300  62.3  83.8^+1.1 48.9^+2.8 51.0^+3.8 69.7^+3.9 55.2^+3.9 44.1^+3.0 67.0^+4.1 47.9^+3.5
BEiT          800  85.5  83.2      45.6      40.8      59.4      44.1      36.0      56.8      38.2
MAE           800  43.7  83.3      47.2      49.4      68.1      53.9      42.9      65.5      46.6
MixedAE       800  45.0  83.5^+0.2 48.7^+1.5 50.3^+0.9 69.1^+1.0 54.8^+0.9 43.5^+0.6 66.2^+0.7 47.4^+0.8
MAE           1600 87.4  83.6      48.1      50.6      69.4      55.0      43.8      66.6      47.5
iBOT          1600 172.1 83.8      49.6      51.2      70.1      55.2      44.3      67.4      48.0
MixedAE       1600 90.1  83.9^+0.3 49.8^+1.7 51.5^+0.9 70.2^+0.8 55.9^+0.9 44.5^+0.7 67.5^+0.9 48.2^+0.7
"""
EFFECTIVE = {"MoCov3", "DINO", "iBOT"}  # printed with †† after their epochs
POSTER_TRANSFER = """
MoCov2  79.9 84.4 75.2 96.5 71.3 69.5 94.4 76.8 79.8 55.8 71.7 77.7
SimCLR  78.7 82.9 79.8 96.2 79.1 70.2 94.3 82.2 83.2 61.1 78.2 80.5
BYOL    79.5 89.4 84.6 97.0 84.0 73.6 94.5 85.5 89.6 64.0 82.7 84.0
SwAV    83.1 89.9 86.8 96.8 84.4 75.2 95.5 87.2 89.1 66.2 84.7 85.3
SDR     82.6 89.0 87.5 97.4 84.4 75.6 97.0 86.1 89.3 66.1 85.3 85.5
MoCov3  76.6 91.2 86.6 98.3 88.3 72.6 95.5 86.4 92.0 65.6 84.5 85.2
DINO    69.4 91.2 81.3 98.4 88.9 77.6 96.9 87.3 93.5 64.7 86.3 85.1
BEiT    66.3 80.2 78.6 96.1 80.0 69.9 92.9 83.2 85.3 57.1 76.7 78.7
MAE     78.2 91.2 88.4 97.0 82.5 75.3 96.6 84.7 92.6 65.4 86.0 85.3
MixedAE 82.1 91.5 88.8 97.9 85.9 78.7 97.1 87.4 93.6 66.2 86.4 86.9^+1.6
"""
POSTER_ABLATION = {"L_recon": ("82.4", "45.0"), "L_HomoCon": ("7.8", "8.3"), "L_recon + L_HomoCon": ("82.7", "46.4")}

MAIN_HEADERS = [c.header for c in layout.MAIN_COLUMNS]
TRANSFER_HEADERS = [c.header for c in layout.transfer_columns()] + [layout.AVERAGE.header]


def parse(poster: str) -> list[list[str]]:
    """Rows of printed cells, each delta as our Markdown prints it: 83.1^+0.4 -> "83.1 (+0.4)"."""
    return [[re.sub(r"\^([+-][\d.]+)$", r" (\1)", entry) for entry in line.split()]
            for line in poster.strip().splitlines()]


def as_text(frame: pd.DataFrame) -> list[list[str]]:
    return frame.map(render.text).values.tolist()


def by_name(tables):
    return {table.name: table for table in tables}


def paper_as_our_results() -> list[Result]:
    """The reference CSVs turned into records, as if our own runs had measured the paper's numbers."""
    results = []
    for row in pd.read_csv(REFERENCE_DIR / "mixedae_cvpr2023_main.csv").to_dict("records"):
        setting = {"method": row["method"], "arch": "vit_base_patch16", "pretrain_epochs": float(row["epochs"]),
                   "pretrain_gpu_days": row["gpu_days"], "seed": 0}
        results.append(Result("classification", "imagenet", "finetune", "top1", row["imagenet_top1"],
                              {"top1": row["imagenet_top1"]}, protocol_id="mae-finetune", **setting))
        if pd.notna(row["ade20k_miou"]):
            results.append(Result("segmentation", "ade20k", "upernet", "mIoU", row["ade20k_miou"],
                                  {"mIoU": row["ade20k_miou"], "mAcc": 60.0}, protocol_id="upernet-160k-ss",
                                  **setting))
            coco = {c.metric: row[c.key] for c in layout.MAIN_COLUMNS if c.task == "detection"}
            results.append(Result("detection", "coco", "mask-rcnn", "AP_bbox", coco["AP_bbox"], coco,
                                  protocol_id="vitdet-100ep", **setting))
    for row in pd.read_csv(REFERENCE_DIR / "mixedae_cvpr2023_transfer.csv").to_dict("records"):
        for dataset, _ in layout.TRANSFER_DATASETS:
            results.append(Result("classification", dataset, "finetune", "top1", row[dataset], method=row["method"],
                                  arch="resnet50" if row["group"] == "SSL ResNets" else "vit_base_patch16"))
    for row in pd.read_csv(REFERENCE_DIR / "mixedae_cvpr2023_ablations.csv").to_dict("records"):
        tags = {"ablation": row["ablation"], "variant": row["variant"]}
        results.append(Result("classification", "imagenet", "finetune", "top1", row["imagenet_top1"],
                              method="mixedae", arch="vit_base_patch16", pretrain_epochs=300, tags=tags,
                              protocol_id="mae-finetune"))
        results.append(Result("segmentation", "ade20k", "upernet", "mIoU", row["ade20k_miou"],
                              {"mIoU": row["ade20k_miou"]}, method="mixedae", arch="vit_base_patch16",
                              pretrain_epochs=300, tags=tags, protocol_id="upernet-160k-ss"))
    return results


# --- golden: the poster, exactly -------------------------------------------------------------------------------


def test_reference_rows_print_the_poster_exactly():
    """The poster does not say how its numbers were measured: every one of them is in an "[unstated]" column, none
    in the columns of our protocols."""
    tables = by_name(build_tables([]))
    main_table = tables["main"].frame
    unstated = [f"{header} [unstated]" for header in MAIN_HEADERS]
    main_rows = as_text(main_table[["Method", "Pre-train epochs", "Pre-train GPU-days", *unstated]])
    expected = [[method, epochs + "††" * (method in EFFECTIVE), *rest]
                for method, epochs, *rest in parse(POSTER_MAIN)]
    assert main_rows == expected
    assert main_table[MAIN_HEADERS].isna().all().all()  # nothing beside our protocols' numbers
    assert set(main_table["Source"]) == {"paper"}
    assert as_text(tables["transfer"].frame[["Method", *TRANSFER_HEADERS]]) == parse(POSTER_TRANSFER)
    assert list(tables["transfer"].frame["Protocol"]) == ["ericsson-finetune"] * 5 + ["unstated"] * 5
    ablation = tables["ablation_objective"].frame
    assert as_text(ablation[["Variant", "ImageNet top-1 [unstated]", "ADE20K mIoU [unstated]"]]) == [
        [variant, *values] for variant, values in POSTER_ABLATION.items()]


def test_the_papers_numbers_as_our_results_rebuild_every_printed_value_and_delta():
    tables = by_name(build_tables(paper_as_our_results(), reference=False))
    main_table = tables["main"].frame
    assert set(main_table["Source"]) == {"ours"}
    rebuilt = {(row["Method"], row["Pre-train epochs"]): row for _, row in main_table.iterrows()}
    assert len(rebuilt) == len(parse(POSTER_MAIN))
    for method, epochs, gpu_days, *printed in parse(POSTER_MAIN):
        row = rebuilt[method, epochs]
        assert render.text(row["Pre-train GPU-days"]) == gpu_days
        for header, poster_cell in zip(MAIN_HEADERS, printed, strict=True):
            ours = render.text(row[header])
            if method == "MAE" or "(" in poster_cell or poster_cell == "-":
                assert ours == poster_cell, (method, epochs, header)
            else:  # ours carry a delta on every non-MAE row with an MAE of the same epochs; the poster only on MixedAE
                assert ours.split(" (")[0] == poster_cell, (method, epochs, header)
    # Our average is the plain mean of the 11 printed (rounded) values; the paper averaged unrounded ones and
    # rounded the result. Each rounding moves a number by at most 0.05, so the two may differ by up to 0.1:
    # MoCov2, SwAV, DINO and BEiT are 6/110 = 0.055 off, so the 0.05 the issue asks for cannot hold for them.
    transfer = {row["Method"]: row for _, row in tables["transfer"].frame.iterrows()}
    for method, *printed in parse(POSTER_TRANSFER):
        row = transfer[method]
        assert [render.text(row[h]) for h in TRANSFER_HEADERS[:-1]] == printed[:-1]
        average, _, delta = printed[-1].partition(" (")
        assert abs(row["Avg."].mean - float(average)) <= 0.05 + 0.05 + 1e-9, method
        if delta:
            assert render.signed(row["Avg."].delta) == delta.rstrip(")")
    assert transfer["MAE"]["Avg."].delta is None
    ablation = {row["Variant"]: row for _, row in tables["ablation_objective"].frame.iterrows()}
    for variant, (acc, miou) in POSTER_ABLATION.items():
        assert [render.text(ablation[variant][h]) for h in ("ImageNet top-1", "ADE20K mIoU")] == [acc, miou]
    assert tables["other"].frame.empty


def test_deltas_are_signed_with_one_decimal():
    assert [render.signed(d) for d in (0.4, -1.2, 0.0, -0.04, 83.1 - 82.7, 0.05)] == \
        ["+0.4", "-1.2", "+0.0", "+0.0", "+0.4", "+0.1"]
    assert render.cell_text(Cell(83.1, delta=0.4)) == "83.1 (+0.4)"
    assert render.cell_text(Cell(83.1, delta=0.4), "tex") == "83.1$^{+0.4}$"


# --- aggregation and placement ---------------------------------------------------------------------------------


def imagenet(top1: float, method: str = "mixedae", seed: int = 0, epochs: float = 300, **extra) -> Result:
    return Result("classification", "imagenet", "finetune", "top1", top1, {"top1": top1}, method=method,
                  arch="vit_tiny", pretrain_epochs=epochs, seed=seed, **{"protocol_id": "mae-finetune", **extra})


def test_seeds_of_one_setting_aggregate_into_mean_std_and_n():
    runs = [(83.0, 1.0), (83.2, 1.0), (83.7, 2.0)]  # (top-1, GPU-days) of three seeds
    records = [imagenet(top1, seed=seed, pretrain_gpu_days=cost) for seed, (top1, cost) in enumerate(runs)]
    records += [imagenet(82.0, "mae", seed=s, epochs=299.7) for s in range(2)]  # epochs round to the setting's 300
    frame = by_name(build_tables(records, reference=False))["main"].frame
    assert list(frame["Method"]) == ["MAE", "MixedAE"]
    cell = frame.loc[1, "ImageNet top-1"]
    assert (cell.n, cell.mean) == (3, pytest.approx(83.3))
    assert cell.std == pytest.approx(pd.Series([83.0, 83.2, 83.7]).std())  # sample std: 0.3606
    assert cell.delta == pytest.approx(1.3)
    assert render.text(cell) == "83.3 ± 0.4 (+1.3) [n=3]"
    assert frame.loc[1, "Pre-train GPU-days"] == pytest.approx(4 / 3)  # records disagree: their mean
    assert render.text(frame.loc[0, "ImageNet top-1"]) == "82.0 ± 0.0 [n=2]"
    assert list(frame["Pre-train epochs"]) == ["300", "300"]


def test_missing_cells_print_a_dash_and_unmatched_records_go_to_other():
    records = [
        imagenet(83.0),
        Result("classification", "digits", "linear", "top1", 97.2, method="mae", checkpoint="runs/demo/mae.pth"),
        Result("classification", "digits", "linear", "top1", 97.6, method="mae", checkpoint="runs/demo/mae.pth"),
        Result("classification", "imagenet", "linear", "top1", 68.0, method="mae"),  # the table shows finetune
        Result("detection", "coco", "mask-rcnn", "AP_bbox", 40.0, {"AP_bbox": 40.0}),  # no method
        Result("classification", "cifar10", "linear", "top1", 90.0, method="mae"),  # transfer is finetune
        imagenet(80.0, tags={"ablation": "mask"}),  # an ablation row without its variant
    ]
    tables = by_name(build_tables(records, reference=False))
    row = [render.text(v) for v in tables["main"].frame.iloc[0]]
    assert row == ["ours", "MixedAE", "vit_tiny", "300", "-", "83.0"] + ["-"] * 7
    other = tables["other"].frame
    assert len(other) == 5 and other["n"].sum() == 6
    digits = other[other["Dataset"] == "digits"].iloc[0]
    assert (digits["Method"], digits["Checkpoint"], digits["n"], render.text(digits["Value"])) == \
        ("MAE", "runs/demo/mae.pth", 2, "97.4 ± 0.3")
    assert set(other["Dataset"]) == {"digits", "imagenet", "coco", "cifar10"}
    assert tables["transfer"].frame.empty
    # the same linear record fills the transfer table when that protocol is asked for
    linear = by_name(build_tables(records, reference=False, transfer_protocol="linear"))
    assert render.text(linear["transfer"].frame.loc[0, "C10"]) == "90.0"
    assert "linear" in linear["transfer"].caption


def test_ablation_rows_come_from_tags_with_only_the_metrics_present():
    tags = [{"ablation": "objective", "variant": v} for v in ("L_recon", "L_recon + L_HomoCon")]
    records = [imagenet(82.0, tags=tags[0]), imagenet(82.5, tags=tags[1]), imagenet(82.7, tags=tags[1], seed=1)]
    tables = by_name(build_tables(records, reference=False))
    frame = tables["ablation_objective"].frame
    assert list(frame.columns) == ["Source", "Variant", "Method", "Arch", "Pre-train epochs", "ImageNet top-1"]
    assert as_text(frame[["Variant", "ImageNet top-1"]]) == [
        ["L_recon", "82.0"], ["L_recon + L_HomoCon", "82.6 ± 0.1 [n=2]"]]
    assert tables["main"].frame.empty and tables["other"].frame.empty
    with_paper = by_name(build_tables(records))["ablation_objective"].frame
    assert list(with_paper["Source"]) == ["paper"] * 3 + ["ours"] * 2
    assert "ADE20K mIoU [unstated]" in with_paper.columns


def test_no_reference_hides_the_papers_rows():
    records = [imagenet(83.0)]
    with_paper, without = build_tables(records), build_tables(records, reference=False)
    assert "paper" in set(with_paper[0].frame["Source"])
    assert all(set(t.frame["Source"]) <= {"ours"} for t in without if "Source" in t.frame)
    # no ablation table of the paper's; the RC-MAE table holds our MAE-protocol ImageNet number beside its own
    assert [t.name for t in without] == ["main", "transfer", "rcmae", "other"]


# --- rendering -------------------------------------------------------------------------------------------------


def test_latex_rows_have_balanced_braces_and_one_cell_per_column():
    odd_tags = {"note": "50%_mask & {x}"}  # every LaTeX special character a user's tag may bring
    records = paper_as_our_results() + [imagenet(top1, seed=seed, tags=odd_tags) for seed, top1 in enumerate([1, 2])]
    for table in build_tables(records) + build_tables([], reference=False):
        tex = render.latex(table)
        assert tex.count(r"\begin{") == tex.count(r"\end{") == 2
        assert r"\toprule" in tex and r"\bottomrule" in tex
        body = tex[tex.index(r"\toprule"):tex.index(r"\bottomrule")]
        rows = [line for line in body.splitlines() if line.endswith(r"\\")]
        assert len(rows) == len(table.frame) + 1  # the header and every row
        for line in rows:
            unescaped = re.sub(r"\\[{}&$%#_]", "", line)
            assert unescaped.count("&") == len(table.frame.columns) - 1, line
            depth = 0
            for char in unescaped:
                depth += {"{": 1, "}": -1}.get(char, 0)
                assert depth >= 0, line
            assert depth == 0 and unescaped.count("$") % 2 == 0, line
    assert r"50\%\_mask \& \{x\}" in render.latex(build_tables(records)[0])


def test_markdown_csv_and_html_carry_the_same_table():
    tables = by_name(build_tables([imagenet(83.0, "mae"), imagenet(83.5)]))
    markdown = render.markdown(tables["main"])
    assert "| ours     | MixedAE" in markdown and "83.5 (+0.5)" in markdown and "83.1 (+0.4)" in markdown
    csv = pd.read_csv(__import__("io").StringIO(render.csv(tables["main"])))
    ours = csv[csv["Source"] == "ours"].set_index("Method")
    assert ours.loc["MixedAE", "ImageNet top-1 delta"] == pytest.approx(0.5)
    assert ours.loc["MixedAE", "ImageNet top-1"] == 83.5
    html = render.html(tables["main"])
    assert html.startswith("<!DOCTYPE html>") and "<style" in html and "font-style: italic" in html
    sources = re.findall(r'class="data row\d+ col0( paper)?" >(\w+)</td>', html)  # marked: the paper's rows only
    assert len(sources) == len(tables["main"].frame) and all(bool(marked) == (source == "paper")
                                                              for marked, source in sources)
    assert "<link" not in html and "<script" not in html  # self-contained


# --- the command -----------------------------------------------------------------------------------------------


def test_cli_end_to_end_writes_every_output_and_prints_the_main_table(tmp_path, capsys):
    store = tmp_path / "results.jsonl"
    append_result(imagenet(83.0, "mae"), store)
    append_result(imagenet(83.6), store)
    with open(store, "a") as handle:
        handle.write('{"task": "classification", "dataset": "cifar10"\n')  # cut off mid-line: line 3
        handle.write('{"task": "x", "dataset": "y", "protocol": "z", "metric": "m"}\n')  # no value: line 4
    append_result(Result("classification", "cifar10", "finetune", "top1", 97.0, method="mae"), store)
    out = tmp_path / "out"
    assert main(["--store", str(store), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "results.jsonl line 3:" in printed.err
    assert "results.jsonl line 4: missing field(s) value (skipped)" in printed.err
    assert "| ours     | MixedAE" in printed.out and "83.6 (+0.6)" in printed.out
    for stem in ("main", "transfer", "ablation_objective", "other"):
        for suffix in ("md", "csv", "tex", "html"):
            assert (out / f"{stem}.{suffix}").stat().st_size > 0, (stem, suffix)
    png = (out / "deltas_vs_mae.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert not list(out.glob(".*.tmp"))
    assert "97.0" in (out / "transfer.md").read_text()  # the rest still built
    # a later build without that ablation leaves none of its files behind
    assert main(["--store", str(store), "--out", str(out), "--no-reference"]) == 0
    assert not list(out.glob("ablation_*")) and (out / "main.md").exists()


def test_cli_on_an_empty_store_names_the_runs_and_writes_the_papers_tables(tmp_path, capsys):
    missing, out = tmp_path / "nothing.jsonl", tmp_path / "out"
    assert main(["--store", str(missing), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "No results in" in err and "python transfer/run.py <dataset> --ckpt x.pth" in err and "coco" in err
    assert "ade20k" in err and "digits" in err
    assert "MixedAE-Full*" in (out / "main.md").read_text()
    assert main(["--store", str(missing), "--out", str(tmp_path / "none"), "--no-reference"]) == 1
    assert "Nothing to show" in capsys.readouterr().err


def test_make_tables_entry_point_runs_as_a_module(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mimbench.tables.build", "--store", str(tmp_path / "s.jsonl"),
                             "--out", str(tmp_path / "out")], check=False, capture_output=True, text=True,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("**main**")  # the Markdown main table on stdout


def test_a_rerun_on_the_same_weights_replaces_the_run_instead_of_counting_as_a_seed():
    weights = {"checkpoint": "a/encoder.safetensors", "checkpoint_sha256": "ab" * 32}
    records = [imagenet(83.0, seed=0, **weights), imagenet(84.0, seed=1, **weights),
               imagenet(83.4, seed=0, **weights)]  # seed 0 run again (e.g. a finished run resumed): 83.4 counts
    cell = by_name(build_tables(records, reference=False))["main"].frame.loc[0, "ImageNet top-1"]
    assert (cell.n, cell.mean) == (2, pytest.approx(83.7))
    other_weights = {"checkpoint": "b/encoder.safetensors", "checkpoint_sha256": "cd" * 32}
    records.append(imagenet(85.0, seed=0, **other_weights))  # another pretraining run's weights: another seed
    cell = by_name(build_tables(records, reference=False))["main"].frame.loc[0, "ImageNet top-1"]
    assert (cell.n, cell.mean) == (3, pytest.approx((83.4 + 84.0 + 85.0) / 3))
    unnamed = [imagenet(83.0), imagenet(83.0)]  # no sha256: nothing says they are one run, both count
    assert by_name(build_tables(unnamed, reference=False))["main"].frame.loc[0, "ImageNet top-1"].n == 2


# --- protocols -------------------------------------------------------------------------------------------------


def test_a_number_measured_under_another_protocol_never_shares_a_column():
    coco = {"AP_bbox": 47.0, "AP_segm": 42.0}
    vitdet = Result("detection", "coco", "mask-rcnn", "AP_bbox", 47.0, coco, method="mae", arch="vit_base_patch16",
                    pretrain_epochs=1600, protocol_id="vitdet-100ep")
    shorter = dataclasses.replace(vitdet, value=30.0, metrics={"AP_bbox": 30.0, "AP_segm": 25.0},
                                  protocol_id="vitdet-100ep+iterations,lr_steps,warmup_iters")
    tables = by_name(build_tables([vitdet, shorter]))
    main_table = tables["main"].frame
    ours, paper = main_table[main_table["Source"] == "ours"], main_table[main_table["Source"] == "paper"]
    assert as_text(ours[["Method", "COCO AP^bb", "COCO AP^mk"]]) == [["MAE", "47.0", "42.0"]]  # ViTDet's alone
    # The poster's MAE-1600 (protocol unstated) is in a column of its own, never in ours.
    mae_1600 = paper[(paper["Method"] == "MAE") & (paper["Pre-train epochs"] == "1600")].iloc[0]
    assert mae_1600["COCO AP^bb"] is None and render.text(mae_1600["COCO AP^bb [unstated]"]) == "50.6"
    assert ours["COCO AP^bb [unstated]"].isna().all()
    assert any("COCO AP^bb, COCO AP^bb_50" in note and "vitdet-100ep" in note for note in tables["main"].notes)
    # The shortened run measured under a protocol of its own: listed apart, its protocol named.
    other = tables["other"].frame
    assert list(other["Protocol"]) == ["vitdet-100ep+iterations,lr_steps,warmup_iters"]
    assert render.text(other.iloc[0]["Value"]) == "30.0"


def test_the_reference_rows_name_a_protocol_and_a_source_for_every_number():
    for path in sorted(REFERENCE_DIR.glob("*.csv")):
        frame = pd.read_csv(path)
        assert frame["source"].notna().all() and (frame["source"].str.len() > 20).all(), path.name
        protocols = [c for c in frame.columns if c == "protocol" or c.endswith("_protocol")]
        assert protocols, path.name
        kind = path.stem.rsplit("_", 1)[-1]
        columns = {"mpvit": layout.MPVIT_COLUMNS, "rcmae": layout.RCMAE_COLUMNS}.get(kind, layout.MAIN_COLUMNS)
        for column in columns:  # every number of a column that fixes a protocol has its own protocol entry
            if column.reference_protocol and column.key in frame:
                numbers = frame[column.key].notna()
                assert frame.loc[numbers, column.reference_protocol].notna().all(), (path.name, column.key)
    rcmae = pd.read_csv(REFERENCE_DIR / "rcmae_iclr2023_rcmae.csv").set_index(["method", "arch"])
    assert rcmae.loc[("MAE", "ViT-B/16"), "coco_protocol"] == "benchmarking-100ep"  # Li et al. 2021, not ViTDet
    main_csv = pd.read_csv(REFERENCE_DIR / "mixedae_cvpr2023_main.csv")
    assert set(main_csv["coco_protocol"]) == {"unstated"}  # the poster does not say
