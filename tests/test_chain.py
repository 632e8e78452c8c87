"""The whole chain (`make demo`, `make regression`): the plan, step reuse, the comparison, and the CI-size chain
itself run end to end against the committed baseline."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from mimbench import chain
from mimbench.chain import SIZES, ChainError, Step, Tolerance, compare, curve_summary, family, plan, report, run_steps


@pytest.fixture(scope="module")
def checkpoint_for_chain(tmp_path_factory) -> Path:
    from mimbench.backbones.checkpoint import CheckpointMetadata, save_backbone
    from mimbench.backbones.vit import create_backbone

    torch.manual_seed(0)
    return save_backbone(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", create_backbone("vit_tiny_patch4_32"),
                         CheckpointMetadata(method="mae", arch="vit_tiny_patch4_32"))


BASELINE = {
    "tolerances": {"classification": {"absolute": 1.0}, "detection": {"absolute": 2.0},
                   "pretrain-loss": {"relative": 0.05}},
    "values": {"mae/classification/digits/linear/top1": 90.0, "mae/detection/coco-embedded/mask-rcnn/AP_bbox": 40.0,
               "mae/pretrain/loss/q1": 1.0},
}


def test_families_and_tolerances():
    assert family("mixedae/classification/digits/finetune/top1") == "classification"
    assert family("rcmae/pretrain/loss/q3") == "pretrain-loss"
    assert family("mae/segmentation/loss/q1") == "segmentation-loss"
    assert Tolerance(absolute=1.0).allows(90.0, 91.0) and not Tolerance(absolute=1.0).allows(90.0, 91.01)
    assert Tolerance(relative=0.05).allows(2.0, 2.1) and not Tolerance(relative=0.05).allows(2.0, 2.11)


def test_curve_summary():
    assert curve_summary([4, 4, 3, 3, 2, 2, 1, 1]) == {"q1": 4, "q2": 3, "q3": 2, "q4": 1}
    assert curve_summary(list(range(10))) == {"q1": 0.5, "q2": 3.0, "q3": 6.0, "q4": 8.5}  # bounds 0,2,5,8,10
    assert curve_summary([2.5, 2.0]) == {"p1": 2.5, "p2": 2.0}  # short curves point by point
    with pytest.raises(ChainError, match="logged no loss"):
        curve_summary([])


def test_within_tolerance_passes(tmp_path, capsys):
    measured = {"mae/classification/digits/linear/top1": 90.9, "mae/detection/coco-embedded/mask-rcnn/AP_bbox": 38.1,
                "mae/pretrain/loss/q1": 1.04}
    rows = compare(BASELINE, measured)
    assert all(row.ok for row in rows) and len(rows) == 3
    assert report(rows, tmp_path / "baseline.json", tmp_path) == 0
    assert "regression: all 3 measurements within the tolerances" in capsys.readouterr().out
    assert "| mae/pretrain/loss/q1" in (tmp_path / "regression.md").read_text()


def test_a_drift_fails_with_a_table_of_expected_vs_got(tmp_path, capsys):
    measured = {"mae/classification/digits/linear/top1": 88.5,  # 1.5 points below, tolerance 1
                "mae/detection/coco-embedded/mask-rcnn/AP_bbox": 40.0, "mae/pretrain/loss/q1": 1.2}  # +20%, tol 5%
    rows = compare(BASELINE, measured)
    assert [row.key for row in rows if not row.ok] == ["mae/classification/digits/linear/top1",
                                                       "mae/pretrain/loss/q1"]
    assert report(rows, tmp_path / "baseline.json", tmp_path) == 1
    out = capsys.readouterr().out
    assert "REGRESSION: 2 of 3 measurements outside the tolerances" in out
    drift_line = next(line for line in out.splitlines() if "digits/linear/top1" in line)
    assert [cell.strip() for cell in drift_line.strip("|").split("|")] == [
        "mae/classification/digits/linear/top1", "90", "88.5", "-1.5", "±1", "DRIFT"]
    assert "AP_bbox" not in out.split("REGRESSION")[0]  # only drifts are printed


def test_missing_and_new_measurements_fail():
    rows = {row.key: row for row in compare(BASELINE, {"mae/classification/digits/linear/top1": 90.0,
                                                        "mae/pretrain/loss/q1": 1.0,
                                                        "mae/classification/digits/linear/val_top1": 91.0})}
    assert rows["mae/detection/coco-embedded/mask-rcnn/AP_bbox"].status == "MISSING"
    assert rows["mae/classification/digits/linear/val_top1"].status == "NEW (not in the baseline)"
    assert not rows["mae/detection/coco-embedded/mask-rcnn/AP_bbox"].ok
    with pytest.raises(ChainError, match="no tolerance for 'segmentation'"):
        compare(BASELINE, {"mae/segmentation/ade20k-embedded/upernet/mIoU": 50.0})


def test_tolerances_from_the_seed_spread():
    runs = [{"m/classification/d/linear/top1": 90.0, "m/detection/c/mask-rcnn/AP": 1.0, "m/pretrain/loss/q1": 2.0},
            {"m/classification/d/linear/top1": 92.0, "m/detection/c/mask-rcnn/AP": 1.1, "m/pretrain/loss/q1": 2.2},
            {"m/classification/d/linear/top1": 94.0, "m/detection/c/mask-rcnn/AP": 0.9, "m/pretrain/loss/q1": 2.4}]
    tolerances, worst = chain.tolerances_from(runs)
    assert tolerances["m/classification/d/linear/top1"] == {"absolute": 6.0}  # 3 x std 2.0
    assert tolerances["m/detection/c/mask-rcnn/AP"] == {"absolute": 0.5}  # 3 x 0.1 is below the floor
    assert tolerances["m/pretrain/loss/q1"] == {"relative": 0.2727}  # 3 x std 0.2 / mean 2.2, rounded
    assert worst == pytest.approx({"classification": 2.0, "detection": 0.1, "pretrain-loss": 0.2 / 2.2})
    assert tolerances["classification"] == {"absolute": 6.0}
    rows = {row.key: row for row in compare({"tolerances": tolerances, "values": runs[0]},
                                            {**runs[0], "m/classification/d/linear/top1": 95.9})}
    assert rows["m/classification/d/linear/top1"].ok  # its own tolerance, not the family's
    assert not compare({"tolerances": tolerances, "values": runs[0]},
                       {**runs[0], "m/classification/d/linear/top1": 96.1})[0].ok


def test_baseline_errors(tmp_path):
    with pytest.raises(ChainError, match="no baseline at .*make regression-update"):
        chain.read_baseline(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text(json.dumps({"values": {}}))
    with pytest.raises(ChainError, match="not a regression baseline"):
        chain.read_baseline(tmp_path / "bad.json")


def test_the_committed_baseline_covers_every_step_of_the_ci_chain():
    baseline = chain.read_baseline(chain.BASELINES[False])
    keys = set(baseline["values"])
    for method in chain.METHODS:
        for prefix in (f"{method}/classification/digits/linear/top1", f"{method}/classification/digits/finetune/top1",
                       f"{method}/detection/coco-embedded/mask-rcnn/AP_segm",
                       f"{method}/segmentation/ade20k-embedded/upernet/mIoU", f"{method}/pretrain/loss/q4",
                       f"{method}/detection/loss/q4", f"{method}/segmentation/loss/q4"):
            assert prefix in keys
    assert {family(key) for key in keys} | keys <= set(baseline["tolerances"])
    assert len(baseline["spread"]["seeds"]) >= 3 and baseline["size"] == chain.asdict(SIZES["ci"])


def test_plan_on_embedded_data(tmp_path):
    steps = plan(SIZES["demo"], tmp_path)
    names = [step.name for step in steps]
    assert names[:4] == ["backbones: summary and a checkpoint round trip", "pretrain mae", "pretrain rcmae",
                         "pretrain mixedae"]
    assert names[-1] == "tables" and len(steps) == 1 + 3 + 3 * 4 + 1
    coco = next(step for step in steps if step.name == "coco rcmae")
    assert "--embedded" in coco.command and str(tmp_path / "rcmae" / "encoder.safetensors") in coco.command
    # the generated sets live under the chain's folder: --embedded writes them at --data-root once
    roots = {step.command[step.command.index("--data-root") + 1] for step in steps if "--data-root" in step.command}
    assert roots == {str(tmp_path / "datasets" / name) for name in ("photos-embedded", "coco-embedded",
                                                                     "ade20k-embedded")}
    assert all("--embedded" in step.command for step in steps if "--data-root" in step.command)


def test_the_demo_adds_the_supervised_encoders_and_the_ci_plan_is_the_regressions(tmp_path):
    """The demo trains the small MPViT and ViT with labels and puts both through every downstream step; the CI
    size, the regression's plan, is the three methods' chain with the baseline's sizes, nothing more."""
    methods, tasks = chain.METHODS, ("digits linear", "digits finetune", "coco", "ade20k")
    steps = plan(SIZES["demo"], tmp_path, supervised=chain.SUPERVISED["demo"])
    names = [step.name for step in steps]
    encoders = ["mae", "rcmae", "mixedae", "supervised-mpvit_nano_cpu", "supervised-vit_tiny_patch4_32"]
    assert names == ["backbones: summary and a checkpoint round trip", *(f"pretrain {e}" for e in encoders),
                     *(f"{task} {e}" for e in encoders for task in tasks), "tables"]
    by_name = {step.name: step for step in steps}
    mpvit, vit = by_name["pretrain supervised-mpvit_nano_cpu"], by_name["pretrain supervised-vit_tiny_patch4_32"]
    for step, arch in ((mpvit, "mpvit_nano_cpu"), (vit, "vit_tiny_patch4_32")):
        command = step.command
        assert command[command.index("--method") + 1] == "supervised" and "--embedded" in command
        assert command[command.index("--arch") + 1] == arch
        assert command[command.index("--data-root") + 1] == str(tmp_path / "datasets" / "digits-labelled")
        preset, epochs = chain.SUPERVISED["demo"][arch]
        assert command[command.index("--epochs") + 1] == str(epochs)
        assert command[command.index("--preset") + 1] == preset
    assert mpvit.after == () and vit.after == (mpvit.name,)  # the first one writes the labelled set
    coco = by_name["coco supervised-mpvit_nano_cpu"]
    assert str(tmp_path / "supervised-mpvit_nano_cpu" / "encoder.safetensors") in coco.command
    assert coco.after == ("pretrain supervised-mpvit_nano_cpu", "coco mae")

    ci = plan(SIZES["ci"], tmp_path, supervised=chain.SUPERVISED.get("ci"))
    assert [step.name for step in ci] == [
        "backbones: summary and a checkpoint round trip", "pretrain mae", "pretrain rcmae", "pretrain mixedae",
        *(f"{task} {m}" for m in methods for task in tasks), "tables"]
    flags = {step.name: " ".join(step.command[2:]) for step in ci}
    assert all("--epochs 2 --warmup-epochs 1 --samples-per-epoch 512 --seed 0" in flags[f"pretrain {m}"]
               for m in methods)
    assert all("--per-class 30 --epochs 3 --base-lr 1e-2" in flags[f"digits finetune {m}"] for m in methods)
    assert all("--per-class 30 --out" in flags[f"digits linear {m}"] for m in methods)
    assert all("--max-iter 40" in flags[f"coco {m}"] and "--max-iters 30" in flags[f"ade20k {m}"] for m in methods)


def test_the_final_screen_has_a_row_per_encoder_and_says_the_supervised_ones_saw_the_digits(tmp_path):
    from mimbench.results import Result, append_result

    store = tmp_path / "results.jsonl"
    for method, arch, top1 in (("mae", "vit_tiny_patch4_32", 90.0), ("supervised", "mpvit_nano_cpu", 60.0),
                               ("supervised", "vit_tiny_patch4_32", 70.0)):
        append_result(Result("classification", "digits", "linear", "top1", top1, {"top1": top1}, method=method,
                             arch=arch), store)
    screen = chain.final_screen(tmp_path, [*chain.METHODS, "supervised-mpvit_nano_cpu"])
    rows = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in screen.splitlines()
            if line.startswith("| ") and "top-1" not in line}
    assert rows == {"MAE": 90.0, "Supervised mpvit_nano_cpu": 60.0, "Supervised vit_tiny_patch4_32": 70.0,
                    "Supervised mpvit_nano_cpu − MAE": -30.0, "Supervised vit_tiny_patch4_32 − MAE": -20.0}
    assert "trained with labels on these digits" in screen and "supervised-mpvit_nano_cpu" in screen


def test_plan_on_real_subsets(tmp_path):
    for folder in ("cifar10", "coco", "unrelated"):
        (tmp_path / "data" / folder).mkdir(parents=True)
    size = SIZES["ci"]
    steps = plan(size, tmp_path / "out", tmp_path / "data", methods=["mae"])
    names = [step.name for step in steps]
    assert names == ["backbones: summary and a checkpoint round trip", "pretrain mae", "cifar10 linear mae",
                     "cifar10 finetune mae", "coco mae", "tables"]  # no ADE20K folder: no ADE20K step
    cifar = steps[2].command
    assert cifar[cifar.index("--data-root") + 1] == str(tmp_path / "data" / "cifar10")
    assert cifar[cifar.index("--per-class") + 1] == str(size.per_class)
    coco = steps[4].command
    assert coco[coco.index("--subset") + 1] == str(size.coco_images)
    assert coco[coco.index("--preset") + 1] == "embedded_cpu" and "--embedded" not in coco


def test_finished_steps_are_reused_and_failures_named(tmp_path):
    counter = tmp_path / "runs.txt"
    script = f"open({str(counter)!r}, 'a').write('x')"
    step = Step("count", [sys.executable, "-c", script], tmp_path / "count")
    run_steps([step])
    run_steps([step])
    assert counter.read_text() == "x"  # the second run skipped it
    changed = Step("count", [sys.executable, "-c", script + " or 1"], tmp_path / "count")
    run_steps([changed])
    assert counter.read_text() == "xx"  # a changed command runs again
    failing = Step("broken", [sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "broken")
    with pytest.raises(ChainError, match="step 'broken' failed \\(exit 3\\)"):
        run_steps([failing])
    assert not (tmp_path / "broken" / chain.DONE).exists()


def test_parallel_steps_respect_their_order_and_report_a_failure(tmp_path):
    def step(name, code, after=()):
        return Step(name, [sys.executable, "-c", code], tmp_path / name, after=after)

    # "first" waits for a file that "free" writes: it can only finish when both ran at once (no timing assumed;
    # the 300 s bound only turns a scheduler that runs them one after the other into a failure, not a hang).
    # It then sleeps a second, so its wall time exceeds the CPU time it is charged.
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    first = step("first", "import os, sys, time\ndeadline = time.monotonic() + 300\n"
                          f"while not os.path.exists({b!r}):\n"
                          "    if time.monotonic() > deadline: sys.exit('free never ran beside first')\n"
                          "    time.sleep(0.05)\n"
                          f"time.sleep(1); open({a!r}, 'w').write('a')")
    needs_first = step("needs-first", f"import os; assert os.path.exists({a!r}); print('threads',"
                                      f" os.environ['OMP_NUM_THREADS'])", after=("first",))
    free = step("free", "import time; started = time.process_time()\nwhile time.process_time() - started < 0.5: pass\n"
                        f"open({b!r}, 'w').write('b')")
    log = io.StringIO()
    run_steps([first, needs_first, free], jobs=2, threads=1, log=log)
    finished = [line.split(": done in")[0] for line in log.getvalue().splitlines() if ": done in" in line]
    assert sorted(finished) == ["[1/3] first", "[2/3] needs-first", "[3/3] free"]
    assert finished.index("[1/3] first") < finished.index("[2/3] needs-first")  # its order
    assert json.loads((tmp_path / "free" / chain.DONE).read_text())["cpu_seconds"] >= 0.5  # the child's CPU time
    first_done = json.loads((tmp_path / "first" / chain.DONE).read_text())
    assert first_done["seconds"] >= 1 and first_done["cpu_seconds"] < first_done["seconds"]  # it slept
    assert (tmp_path / "needs-first" / "chain.log").read_text().strip() == "threads 1"
    broken = step("broken", "import sys; print('step 1/3'); print('bad input: x', file=sys.stderr); sys.exit(2)")
    with pytest.raises(ChainError, match="(?s)step 'broken' failed \\(exit 2\\).*step 1/3\nbad input: x"):
        run_steps([broken, step("after-broken", "pass", after=("broken",))], jobs=2, log=log)
    assert not (tmp_path / "after-broken").exists()


@pytest.mark.slow
def test_ci_chain_end_to_end_matches_the_baseline(tmp_path, capsys):
    """The demo's path at its smallest size: pretraining of the three methods, every transfer, the tables,
    then every metric and loss curve against regression/baseline.json."""
    assert chain.main(["regression", "--out", str(tmp_path / "regression")]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "regression: all" in out and "within the tolerances" in out
    measured = json.loads((tmp_path / "regression" / "measured.json").read_text())
    assert len(measured) == len(chain.read_baseline(chain.BASELINES[False])["values"])
    assert (tmp_path / "regression" / "tables" / "other.md").is_file()
    screen = chain.final_screen(tmp_path / "regression", chain.METHODS)
    assert "MixedAE" in screen and f"{tmp_path / 'regression'}/coco/<method>/" in screen


def test_every_entry_point_wants_data_root_or_embedded(tmp_path, capsys, checkpoint_for_chain):
    """Without --data-root and without --embedded nothing runs: the message names the layout and the way to the
    embedded data, so the demo data is never mistaken for the benchmark."""
    from mimbench.pretrain.run import main as pretrain
    from mimbench.transfer.run import main as transfer

    ckpt = str(checkpoint_for_chain)
    assert pretrain(["--method", "mae", "--out", str(tmp_path / "p")]) == 1
    message = capsys.readouterr().err
    assert "--data-root DIR (ImageNet-style <root>/<class>/<image>" in message and "--embedded" in message
    with pytest.raises(SystemExit):
        transfer(["coco", "--ckpt", ckpt])
    message = capsys.readouterr().err
    assert "annotations/instances_{train,val}2017.json, train2017/, val2017/" in message and "--embedded" in message
    assert transfer(["ade20k", "--ckpt", ckpt]) == 1
    message = capsys.readouterr().err
    assert "images/training, images/validation, annotations/training" in message and "--embedded" in message
    assert transfer(["cifar10", "--ckpt", ckpt]) == 1
    message = capsys.readouterr().err
    assert "<root>/cifar-10-batches-py/" in message and "transfer/run.py digits" in message
    assert not (tmp_path / "p").exists()


def test_a_pinned_step_gets_the_avx2_kernels_and_the_plan_passes_the_precision(tmp_path):
    if not chain.can_pin_isa():
        pytest.skip("no AVX2 on this CPU: the regression falls back to unpinned_tolerances")
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    step = Step("isa", [sys.executable, "-c", code], tmp_path / "isa")
    run_steps([step], jobs=2, threads=1, log=io.StringIO(), extra_env=chain.PIN_ENV)
    assert (tmp_path / "isa" / "chain.log").read_text().strip() == "AVX2"
    steps = plan(SIZES["ci"], tmp_path / "out", precision="fp32")
    trained = [s for s in steps if s.name.startswith(("pretrain", "digits", "coco", "ade20k"))]
    assert len(trained) == 3 + 3 * 4
    assert all(s.command[s.command.index("--precision") + 1] == "fp32" for s in trained)


def baseline_with(values, pins=None, **extra):
    tolerances = {"classification": {"absolute": 1.0}, "pretrain-loss": {"relative": 0.01}}
    return {"values": values, "tolerances": tolerances, "pins": pins or dict(chain.PINS), **extra}


def test_numbers_made_under_other_settings_are_refused_by_name_not_reported_as_drift():
    """A bf16 or AVX-512 run is not a drift of the fp32/AVX2 baseline: comparing it against the seed spread would
    pass or fail by chance, so the comparison names the settings instead."""
    key = "mae/classification/digits/linear/top1"
    baseline = baseline_with({key: 80.0})
    pinned = {key: dict(chain.PINS)}
    assert [row.status for row in compare(baseline, {key: 80.5}, pinned)] == ["ok"]
    assert [row.status for row in compare(baseline, {key: 82.0}, pinned)] == ["DRIFT"]
    for other in ({"precision": "bf16"}, {"cpu_capability": "AVX512"}):
        settings = {key: {**chain.PINS, **other}}
        name, value = next(iter(other.items()))
        with pytest.raises(ChainError, match=f"{key}: {name} {value} \\(pinned {chain.PINS[name]}\\)"):
            compare(baseline, {key: 80.0}, settings)
    # Where the ISA cannot be pinned, a spread measured across ISAs decides.
    loose = baseline_with({key: 80.0}, unpinned_tolerances={"classification": {"absolute": 3.0}})
    settings = {key: {**chain.PINS, "cpu_capability": "AVX512"}}
    assert [row.status for row in compare(loose, {key: 82.0}, settings)] == ["ok"]
    assert [row.status for row in compare(loose, {key: 84.0}, settings)] == ["DRIFT"]
    assert [row.status for row in compare(loose, {key: 82.0}, pinned)] == ["DRIFT"]  # pinned: the tight spread


def test_the_committed_baseline_records_its_pins():
    baseline = chain.read_baseline(chain.BASELINES[False])
    assert baseline["pins"] == chain.PINS == {"precision": "fp32", "threads": 1, "cpu_capability": "AVX2"}


@pytest.mark.slow
def test_records_made_under_another_precision_or_isa_meet_the_comparison_as_intended(tmp_path, checkpoint_for_chain):
    """Real records through the regression's own measure/compare: a re-run under the pins equals the baseline
    exactly; the same run in bf16, or on the machine's own kernels, is refused by name rather than compared."""
    def digits_probe(name: str, precision: str, env: dict[str, str] | None) -> dict[str, Any]:
        out = tmp_path / name
        step = Step(name, chain.python_script(
            "transfer/run.py", "digits", "--ckpt", str(checkpoint_for_chain), "--per-class", "10", "--precision",
            precision, "--results", str(out / "results.jsonl"), "--out", str(out / "run"),
            "--cache-dir", str(out / "cache")), out)
        run_steps([step], jobs=2, threads=1, log=io.StringIO(), extra_env=env)
        settings: dict[str, dict[str, Any]] = {}
        return chain.measure(out, methods=[], settings=settings), settings

    pinned_env = chain.PIN_ENV if chain.can_pin_isa() else None
    values, settings = digits_probe("pinned", "fp32", pinned_env)
    assert set(values) == {"mae/classification/digits/linear/top1", "mae/classification/digits/linear/val_top1"}
    pins = {"precision": "fp32", "threads": 1, "cpu_capability": settings[next(iter(settings))]["cpu_capability"]}
    baseline = baseline_with(values, pins=pins)
    again, again_settings = digits_probe("pinned-again", "fp32", pinned_env)
    rows = compare(baseline, again, again_settings)
    assert [row.status for row in rows] == ["ok", "ok"] and all(row.got == row.expected for row in rows)
    bf16, bf16_settings = digits_probe("bf16", "bf16", pinned_env)
    with pytest.raises(ChainError, match="precision bf16 \\(pinned fp32\\)"):
        compare(baseline, bf16, bf16_settings)
    if pinned_env is not None and torch.backends.cpu.get_cpu_capability() != "AVX2":  # an AVX-512 machine
        native, native_settings = digits_probe("native", "fp32", None)
        with pytest.raises(ChainError, match="cpu_capability AVX512 \\(pinned AVX2\\)"):
            compare(baseline, native, native_settings)


@pytest.mark.parametrize("task", ["coco", "ade20k"])
def test_a_bad_checkpoint_stops_embedded_runs_before_the_set_is_written(tmp_path, capsys, task):
    from mimbench.transfer.run import main as transfer

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    for ckpt in (tmp_path / "missing.pth", garbage):
        argv = [task, "--ckpt", str(ckpt), "--embedded", "--data-root", str(tmp_path / "set"), "--out",
                str(tmp_path / "run")]
        assert transfer(argv) == 1
        error = capsys.readouterr().err.strip()
        assert error.startswith(f"error: {ckpt}: ") and len(error.splitlines()) == 1
    assert not (tmp_path / "set").exists() and not (tmp_path / "run").exists()
