"""`python -m mimbench.chain ablations`: the plan's steps, flags and tags, the shared rows, the homo_acc curves and
figure; the tables' ablation columns on the embedded sets and the transfer table's protocol column."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mimbench import chain
from mimbench.pretrain.ablations import (
    ablation_plan,
    analysis_runs,
    configurations,
    homo_acc_curves,
    homo_acc_figure,
    homo_acc_summary,
)
from mimbench.results import Result, append_result, read_results
from mimbench.tables import layout, render
from mimbench.tables.assemble import build_tables
from mimbench.tables.build import shown


def flag_values(command: list[str], flag: str) -> list[str]:
    """The values after ``flag`` up to the next flag."""
    start = command.index(flag) + 1
    end = next((i for i in range(start, len(command)) if command[i].startswith("--")), len(command))
    return command[start:end]


def test_the_ablations_plan_trains_each_configuration_once_and_probes_it_tagged(tmp_path):
    steps = {step.name: step for step in chain.ablations_plan(chain.ABLATIONS, tmp_path, seeds=(0, 1))}
    pretrain = {name: step for name, step in steps.items() if name.startswith("pretrain ")}
    # 5 configurations at seed 0 (the default stands for 3 rows), the analysis pair once more at seed 1
    assert sorted(pretrain) == sorted(
        [f"pretrain {name} seed0" for name in ("contrastive-weight-0.0", "reconstruction-weight-0.0", "default",
                                               "no-segment-embedding", "homologous-last-blocks-0")]
        + ["pretrain default seed1", "pretrain contrastive-weight-0.0 seed1"])
    expected_flags = {"contrastive-weight-0.0": ["--contrastive-weight", "0.0"],
                      "reconstruction-weight-0.0": ["--reconstruction-weight", "0.0"], "default": [],
                      "no-segment-embedding": ["--no-segment-embedding"],
                      "homologous-last-blocks-0": ["--homologous-last-blocks", "0"]}
    for name, step in pretrain.items():
        config, seed = name.split()[1], name.split()[2].removeprefix("seed")
        command = step.command
        assert command[1].endswith("pretrain/run.py") and command[2:5] == ["--method", "mixedae", "--embedded"]
        # the demo's pretraining budget, the configuration's own flags, its seed
        assert flag_values(command, "--epochs") == ["3"] and flag_values(command, "--samples-per-epoch") == ["1024"]
        assert flag_values(command, "--seed") == [seed]
        assert command[command.index("--seed") + 2:command.index("--out")] == expected_flags[config]
        assert step.folder == tmp_path / "pretrain" / f"{config}-seed{seed}"
        assert "--tags" not in command  # pretraining writes no record
    probes = {name: step for name, step in steps.items() if name not in pretrain}
    assert len(probes) == 15  # digits linear, COCO, ADE per configuration
    first_rows = {group[0].config_name: group[0] for group in configurations(ablation_plan())}
    for name, step in probes.items():
        task, config = name.split()
        assert step.command[2] == task and flag_values(step.command, "--ckpt") == [
            str(tmp_path / "pretrain" / f"{config}-seed0" / "encoder.safetensors")]
        assert f"pretrain {config} seed0" in step.after
        row = first_rows[config]
        assert flag_values(step.command, "--tags") == [f"ablation={row.ablation}", f"variant={row.variant}"]
    assert flag_values(probes["digits default"].command, "--tags") == ["ablation=objective",
                                                                         "variant=L_recon + L_HomoCon"]
    assert flag_values(probes["digits default"].command, "--protocol") == ["linear"]
    assert flag_values(probes["coco default"].command, "--max-iter") == ["40"]
    assert flag_values(probes["ade20k default"].command, "--max-iters") == ["30"]
    # the first dense run writes its embedded set, the others wait for it
    assert probes["coco no-segment-embedding"].after == ("pretrain no-segment-embedding seed0",
                                                         "coco contrastive-weight-0.0")
    assert probes["coco contrastive-weight-0.0"].after == ("pretrain contrastive-weight-0.0 seed0",)


def test_a_shared_configurations_records_are_tagged_for_each_of_its_rows_once(tmp_path):
    store = tmp_path / "results.jsonl"
    tags = {"ablation": "objective", "variant": "L_recon + L_HomoCon"}
    append_result(Result("classification", "digits", "linear", "top1", 91.0, method="mixedae", tags=tags,
                         checkpoint_sha256="abc"), store)
    append_result(Result("classification", "digits", "linear", "top1", 80.0, method="mixedae",
                         tags={"ablation": "objective", "variant": "L_recon"}, checkpoint_sha256="def"), store)
    groups = configurations(ablation_plan())
    assert chain.tag_shared_rows(store, groups) == 2
    assert chain.tag_shared_rows(store, groups) == 0  # a second run adds nothing
    records, _ = read_results(store)
    copies = {(r.tags["ablation"], r.tags["variant"]): r for r in records if chain.SAME_RUN_TAG in r.tags}
    assert set(copies) == {("segment embedding", "on"), ("homologous attention", "on")}
    assert all(r.value == 91.0 and r.tags[chain.SAME_RUN_TAG] == "objective: L_recon + L_HomoCon"
               for r in copies.values())
    tables = {t.name: t for t in build_tables(records)}
    segment = tables["ablation_segment embedding"].frame
    assert list(segment["Method"]) == ["MixedAE [same_run_as=objective: L_recon + L_HomoCon]"]
    assert render.text(segment.loc[0, "digits linear top-1"]) == "91.0"


def test_homo_acc_curves_come_from_the_runs_tensorboard_per_block(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "tensorboard"))
    for step in range(1, 5):
        writer.add_scalar("pretrain/loss", 2.0 / step, step)
        writer.add_scalar("pretrain/homo_acc", 0.1 * step, step)  # the deepest block's, not a block of its own
        writer.add_scalar("pretrain/homo_acc/block0", 0.25 + 0.01 * step, step)
        writer.add_scalar("pretrain/homo_acc/block11", 0.1 * step, step)
    writer.add_scalar("pretrain/homo_acc/block11", 0.9, 4)  # a resumed run logs a step again: the last one counts
    writer.close()
    curves = homo_acc_curves(chain.pretrain_scalars(tmp_path))
    assert list(curves) == [0, 11]
    assert curves[0][0] == [1, 2, 3, 4] and curves[0][1] == pytest.approx([0.26, 0.27, 0.28, 0.29])
    assert curves[11][1] == pytest.approx([0.1, 0.2, 0.3, 0.9])
    assert chain.pretrain_losses(tmp_path) == pytest.approx([2.0, 1.0, 2 / 3, 0.5])


def test_the_analysis_figure_and_summary_of_two_configurations_over_seeds(tmp_path):
    steps = list(range(1, 9))
    rising = (steps, [0.2, 0.4, 0.6, 0.8, 0.8, 0.8, 0.8, 0.8])
    jumpy = (steps, [0.2, 0.6, 0.2, 0.6, 0.2, 0.6, 0.2, 0.6])
    curves = {"with L_HomoCon": [{3: rising}, {3: rising}], "without L_HomoCon": [{3: jumpy}, {3: jumpy}]}
    written = homo_acc_figure(curves, tmp_path / "figures" / "homo_acc")
    assert [p.name for p in written] == ["homo_acc.png", "homo_acc.pdf"]
    assert written[0].read_bytes().startswith(b"\x89PNG") and written[1].read_bytes().startswith(b"%PDF")
    summary = homo_acc_summary(curves)
    assert list(summary.index) == [3]
    assert summary.loc[3, "with L_HomoCon: final"] == pytest.approx(0.8)
    assert summary.loc[3, "with L_HomoCon: jitter"] == pytest.approx(0.2 / 5)  # one change of 0.2 in 6 steps
    assert summary.loc[3, "with L_HomoCon: t90"] == 4  # 0.2 + 0.9 x 0.6 = 0.74 first reached at step 4
    assert summary.loc[3, "without L_HomoCon: final"] == pytest.approx(0.4)
    assert summary.loc[3, "without L_HomoCon: jitter"] == pytest.approx(0.4)
    assert [run.variant for run in analysis_runs()] == list(curves)


def test_ablation_tables_show_the_embedded_probes_next_to_the_posters_rows():
    tags = {"ablation": "objective", "variant": "L_recon"}
    records = [
        Result("classification", "digits", "linear", "top1", 93.25, {"top1": 93.25}, method="mixedae",
               arch="vit_tiny_patch4_32", pretrain_epochs=3.0, tags=tags),
        Result("detection", "coco-embedded", "mask-rcnn", "AP_bbox", 2.0, {"AP_bbox": 2.0, "AP_segm": 1.5},
               method="mixedae", arch="vit_tiny_patch4_32", pretrain_epochs=3.0, tags=tags),
        Result("segmentation", "ade20k-embedded", "upernet", "mIoU", 44.0, {"mIoU": 44.0}, method="mixedae",
               arch="vit_tiny_patch4_32", pretrain_epochs=3.0, tags=tags),
        # untagged embedded records still belong to no table
        Result("classification", "digits", "linear", "top1", 95.0, {"top1": 95.0}, method="mae"),
    ]
    tables = {t.name: t for t in build_tables(records)}
    frame = tables["ablation_objective"].frame
    # the poster's numbers (their protocol unstated) in columns of their own, after ours
    assert list(frame.columns) == ["Source", "Variant", "Method", "Arch", "Pre-train epochs", "digits linear top-1",
                                   "COCO-emb. AP^bb", "COCO-emb. AP^mk", "ADE-emb. mIoU", "ImageNet top-1 [unstated]",
                                   "ADE20K mIoU [unstated]"]
    assert list(frame["Source"]) == ["paper"] * 3 + ["ours"]
    ours = [render.text(value) for value in frame.iloc[3]]
    assert ours == ["ours", "L_recon", "MixedAE", "vit_tiny_patch4_32", "3", "93.3", "2.0", "1.5", "44.0", "-", "-"]
    assert render.text(frame.iloc[0]["ImageNet top-1 [unstated]"]) == "82.4"  # the poster's row beside ours
    assert len(tables["other"].frame) == 1 and tables["main"].frame["Source"].eq("paper").all()
    assert [t.name for t in shown(list(tables.values()))] == ["main", "ablation_objective"]


def transfer_record(method: str, dataset: str, value: float, protocol_id: str, protocol: str = "finetune"):
    return Result("classification", dataset, protocol, "top1", value, method=method, arch="vit_tiny_patch4_32",
                  pretrain_epochs=3.0, protocol_id=protocol_id)


def test_the_transfer_table_names_each_rows_protocol_and_compares_within_it(tmp_path):
    store = tmp_path / "results.jsonl"
    values = {("mae", "transfer-grid"): 80.0, ("mae", "ericsson-finetune"): 75.0,
              ("mixedae", "transfer-grid"): 82.0, ("mixedae", "ericsson-finetune"): 78.0}
    for (method, preset), value in values.items():
        for name, _ in layout.TRANSFER_DATASETS:
            append_result(transfer_record(method, name, value, preset), store)
    records, _ = read_results(store)
    table = {t.name: t for t in build_tables(records)}["transfer"]
    ours = table.frame[table.frame["Source"] == "ours"]
    assert list(zip(ours["Method"], ours["Protocol"], strict=True)) == [
        ("MAE", "ericsson-finetune"), ("MAE", "transfer-grid"), ("MixedAE", "ericsson-finetune"),
        ("MixedAE", "transfer-grid")]
    assert [render.text(cell) for cell in ours["C10"]] == ["75.0", "80.0", "78.0", "82.0"]
    # each MixedAE row against the MAE row of its own protocol
    assert [render.text(cell) for cell in ours["Avg."]] == ["75.0", "80.0", "78.0 (+3.0)", "82.0 (+2.0)"]
    paper = table.frame[table.frame["Source"] == "paper"]
    assert list(paper["Protocol"].iloc[:5]) == ["ericsson-finetune"] * 5  # Ericsson et al.'s ResNet numbers
    assert list(paper["Protocol"].iloc[5:]) == ["unstated"] * 5  # the poster names none for its transformers
    assert any(note.startswith("Protocol:") for note in table.notes)
    assert re.search(r"\| ours +\| Ours +\| MixedAE +\| ericsson-finetune +\| vit_tiny_patch4_32",
                     render.markdown(table))
    linear = {t.name: t for t in build_tables([transfer_record("mae", "cifar10", 70.0, "lbfgs-linear", "linear")],
                                              transfer_protocol="linear")}["transfer"].frame
    assert list(linear.loc[linear["Source"] == "ours", "Protocol"]) == ["lbfgs-linear"]


def test_every_evaluation_entry_point_takes_tags_and_refuses_a_malformed_one(capsys):
    from mimbench.core.config import RunSpec, record_tags
    from mimbench.core.errors import ConfigError

    run = RunSpec(tags=["ablation=objective", "variant=L_recon + L_HomoCon"])
    assert record_tags(run, subset=None) == {"ablation": "objective", "variant": "L_recon + L_HomoCon"}
    assert record_tags(run, subset="first4")["subset"] == "first4"
    with pytest.raises(ConfigError, match="tag 'objective' is not key=value"):
        RunSpec(tags=["objective"])
    from mimbench.transfer.run import main

    assert main(["digits", "--ckpt", str(Path("no-such.safetensors")), "--tags", "objective"]) == 1
    assert capsys.readouterr().err.strip() == "error: tag 'objective' is not key=value"
