"""The whole chain on one command: pretrain MAE, RC-MAE and MixedAE (the demo also trains its small MPViT and ViT
with labels, `SUPERVISED`), transfer every encoder, build the tables.

    python -m mimbench.chain demo [--out runs/demo] [--fresh]           # `make demo`: embedded data, CPU
    python -m mimbench.chain regression [--update]                      # `make regression`: CI size vs baseline
    python -m mimbench.chain regression --data-root /datasets           # the same on small real subsets
    python -m mimbench.chain spread --seeds 1 2                         # re-derive the baseline's tolerances
    python -m mimbench.chain ablations [--seeds 0 1]                   # `make ablations`: the MixedAE poster's
                                                                        # ablations and analysis figure, CPU

Each step is the user-facing command (``pretrain/run.py``, ``transfer/run.py``, ``tables.build``) run as its own
process, so the chain proves exactly what a user types, and a framework (Detectron2, mmseg) stays inside its
adapter's process. A step that finished writes ``chain-step.json`` (its command) into its folder; a second run
skips it while the command is unchanged, so ``make demo`` twice redoes nothing (``--fresh`` starts over).

Regression: the chain at CI size (fixed seed) on the embedded data gives every metric of every downstream record
and each loss curve (the mean of each quarter of it); these are compared with ``regression/baseline.json``.
Its tolerances come from ``spread``: the same chain under other seeds, 3 standard deviations per measurement.

What decides float rounding is pinned and recorded in the baseline (``PINS``): fp32 (no bf16 autocast, which
only CPUs with native bf16 would pick), one thread per step, and torch's AVX2 kernels on x86 (``PIN_ENV``: an
AVX-512 CPU otherwise rounds differently, and after a few hundred steps that is a new random trajectory). Pinned,
the chain reproduces the baseline's numbers bit for bit on AVX2-only and AVX-512 machines alike. Every record
says what it was computed under; numbers made under other settings than the baseline's pins are not compared
against the seed spread (they would drift by chance) but refused by name, unless the baseline holds
``unpinned_tolerances``: a spread measured with the kernel ISA left to the machine (``spread --unpinned``), for
platforms where it cannot be pinned.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from mimbench.core.errors import UserError

if TYPE_CHECKING:
    from mimbench.pretrain.ablations import AblationRun

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent
BASELINES = {False: ROOT / "regression" / "baseline.json", True: ROOT / "regression" / "baseline-real.json"}
METHODS = ("mae", "rcmae", "mixedae")
DONE = "chain-step.json"
# Two steps at once, a thread each: most of a small step is single-threaded Python (Detectron2's and mmseg's
# loops, data loading), so two of them on two cores finish sooner than one after the other on two threads
# (measured: the CI-size chain in 7.1 minutes instead of 10.0 on a 2-core AMD EPYC).
DEFAULT_JOBS = 2
# What the regression pins (see the module docstring), and the environment that pins torch's kernel ISA.
PINS = {"precision": "fp32", "threads": 1, "cpu_capability": "AVX2"}
PIN_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


@dataclass(frozen=True)
class ChainSize:
    """How much of each step: the demo shows learning, the CI size only has to be quick and sensitive."""

    pretrain_epochs: int
    pretrain_warmup_epochs: int
    samples_per_epoch: int  # embedded photos: random crops per epoch
    linear: list[str]  # extra `transfer/run.py digits --protocol linear` flags
    finetune: list[str]  # extra `transfer/run.py digits --protocol finetune` flags (empty: the recipe's)
    coco_iters: int
    ade_iters: int
    seed: int = 0
    # the real-data subsets (regression --data-root): images per class, COCO / ADE20K images per split
    per_class: int = 10
    coco_images: int = 50
    ade_images: int = 50


SIZES: dict[str, ChainSize] = {
    # Per method: 32 pretraining steps; per encoder (the methods' and SUPERVISED's): the whole digits set probed,
    # 2 fine-tuning epochs at the recipe's best lr, 15 detector and 20 segmentor iterations (trimmed from 48 steps,
    # 4 epochs, 80 and 50 iterations when the supervised encoders joined, so the demo stays within its minutes on
    # an AVX2-only CPU too: README).
    "demo": ChainSize(pretrain_epochs=2, pretrain_warmup_epochs=1, samples_per_epoch=1024, linear=[],
                      finetune=["--epochs", "2", "--base-lr", "1e-2"], coco_iters=15, ade_iters=20),
    # Per method: 16 pretraining steps, 30 digits a class, 40 detector and 30 segmentor iterations.
    "ci": ChainSize(pretrain_epochs=2, pretrain_warmup_epochs=1, samples_per_epoch=512,
                    linear=["--per-class", "30"], finetune=["--per-class", "30", "--epochs", "3", "--base-lr", "1e-2"],
                    coco_iters=40, ade_iters=30),
}

# Backbones trained with labels beside the methods (a preset of pretrain/supervised.py on the embedded digits for
# the given epochs of 22 steps), each then through the same downstream steps: the demo's small MPViT and its ViT
# (the ViT's preset has its own lr and lighter augmentation: at the MPViT's it stays at chance). The CI size has
# none: it is the regression's plan.
SUPERVISED: dict[str, dict[str, tuple[str, int]]] = {
    "demo": {"mpvit_nano_cpu": ("embedded_cpu", 4), "vit_tiny_patch4_32": ("embedded_cpu_vit", 2)}}

# Where --data-root's benchmarks are expected; a missing one is skipped (and said so).
REAL_LAYOUT = """<data-root>/coco/{train2017,val2017,annotations/instances_{train,val}2017.json}
<data-root>/ADEChallengeData2016/{images,annotations}/{training,validation}
<data-root>/<dataset>/ for each classification dataset of transfer/run.py (cifar10, flowers, ...), in its layout"""
CLASSIFICATION_DATASETS = ("aircraft", "caltech101", "cars", "cifar10", "cifar100", "dtd", "flowers", "food", "pets",
                           "sun397", "voc2007")


@dataclass(frozen=True)
class Step:
    name: str
    command: list[str]  # run in the current folder (paths in it are the user's)
    folder: Path  # holds the step's outputs and its done-marker
    after: tuple[str, ...] = ()  # names of the steps whose outputs it reads

    def is_done(self) -> bool:
        marker = self.folder / DONE
        return marker.is_file() and json.loads(marker.read_text()).get("command") == self.command


def python_script(script: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / script), *args]


def supervised_encoder(arch: str) -> str:
    """The name (and folder) of the encoder trained with labels for ``arch``."""
    return f"supervised-{arch}"


def plan(size: ChainSize, out: Path, data_root: Path | None = None,
         methods: Sequence[str] = METHODS, precision: str | None = None,
         supervised: dict[str, tuple[str, int]] | None = None) -> list[Step]:
    """Every step of the chain, in order. Pretraining is always on the embedded photos, and for each arch of
    ``supervised`` (its preset and epochs) with labels on the embedded digits; downstream runs for every encoder on the
    embedded sets, or with ``data_root`` on the fixed small subsets of each real benchmark found there.
    ``precision`` (auto | fp32 | bf16) goes to every training and evaluation step; None leaves each its default."""
    out = Path(out)
    store = str(out / "results.jsonl")
    seed = str(size.seed)
    computed = ["--precision", precision] if precision else []
    steps = [Step("backbones: summary and a checkpoint round trip",
                  [sys.executable, "-m", "mimbench.backbones.cli", "demo", "--out", str(out / "backbones")],
                  out / "backbones")]
    for method in methods:
        steps.append(Step(f"pretrain {method}", python_script(
            "pretrain/run.py", "--method", method, "--embedded", "--data-root",
            str(out / "datasets" / "photos-embedded"), "--epochs", str(size.pretrain_epochs),
            "--warmup-epochs", str(size.pretrain_warmup_epochs), "--samples-per-epoch", str(size.samples_per_epoch),
            "--seed", seed, *computed, "--out", str(out / method)), out / method))
    encoders = list(methods)
    for arch, (preset, epochs) in (supervised or {}).items():
        name = supervised_encoder(arch)
        # The first run writes the labelled set; the others wait for it rather than race it.
        first = (f"pretrain {encoders[len(methods)]}",) if len(encoders) > len(methods) else ()
        steps.append(Step(f"pretrain {name}", python_script(
            "pretrain/run.py", "--method", "supervised", "--embedded", "--data-root",
            str(out / "datasets" / "digits-labelled"), "--preset", preset, "--arch", arch, "--epochs", str(epochs),
            "--seed", seed,
            "--results", store, *computed, "--out", str(out / name)), out / name, after=first))
        encoders.append(name)
    for method in encoders:
        ckpt = str(out / method / "encoder.safetensors")
        common = ["--ckpt", ckpt, "--results", store, "--seed", seed, *computed]
        if data_root is None:
            classification = [("digits", [], {"linear": size.linear, "finetune": size.finetune})]
        else:
            classification = [(name, ["--data-root", str(data_root / name), "--per-class", str(size.per_class)],
                               {"linear": [], "finetune": ["--epochs", "2", "--base-lr", "5e-4", "--weight-decay",
                                                           "0.05"]})  # one point of the recipe's grid
                              for name in CLASSIFICATION_DATASETS if (data_root / name).is_dir()]
        for dataset, data, extras in classification:
            for protocol, extra in extras.items():
                folder = out / "transfer" / dataset / protocol / method
                steps.append(Step(f"{dataset} {protocol} {method}", python_script(
                    "transfer/run.py", dataset, "--protocol", protocol, *common, *data, *extra, "--out", str(folder),
                    "--cache-dir", str(out / "feature_cache")), folder, after=(f"pretrain {method}",)))
        dense = [("coco", out / "datasets" / "coco-embedded", data_root and data_root / "coco", size.coco_images,
                  ["--max-iter", str(size.coco_iters)]),
                 ("ade20k", out / "datasets" / "ade20k-embedded", data_root and data_root / "ADEChallengeData2016",
                  size.ade_images, ["--max-iters", str(size.ade_iters)])]
        for task, embedded_root, real_root, subset, iterations in dense:
            if data_root is None:
                data = ["--embedded", "--data-root", str(embedded_root)]  # written there by the first run
            elif real_root.is_dir():  # the CPU preset on a fixed slice: a check of the pipeline, not a result
                data = ["--data-root", str(real_root), "--preset", "embedded_cpu", "--subset", str(subset)]
            else:
                continue
            folder = out / task / method
            # The first run of a task writes its embedded set; the others wait for it rather than race it.
            first = () if method == encoders[0] or data_root is not None else (f"{task} {encoders[0]}",)
            steps.append(Step(f"{task} {method}", python_script(
                "transfer/run.py", task, *common, *data, *iterations, "--out", str(folder)), folder,
                after=(f"pretrain {method}", *first)))
    steps.append(Step("tables", [sys.executable, "-m", "mimbench.tables.build", "--store", store,
                                 "--out", str(out / "tables")], out / "tables", after=tuple(s.name for s in steps)))
    return steps


def run_steps(steps: Sequence[Step], jobs: int = 1, threads: int | None = None, log: Any = sys.stdout,
              heartbeat_s: float = 30.0, extra_env: dict[str, str] | None = None) -> None:
    """Run every step not already done, up to ``jobs`` at once, each after the steps it needs.

    One job: a step's own output (progress bars included) goes to the terminal. Several: each step writes
    ``<folder>/chain.log`` and a line every ``heartbeat_s`` shows each running step's latest progress.
    ``threads`` sets OMP_NUM_THREADS of each step (None: the cores shared among the jobs). A failure lets the
    running steps finish (their work is kept), then raises naming the step, its command and its log's tail.
    """
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), **(extra_env or {})}
    number = {step.name: k for k, step in enumerate(steps, 1)}
    done = {step.name for step in steps if step.is_done()}
    for step in steps:
        if step.name in done:
            print(f"[{number[step.name]}/{len(steps)}] {step.name}: done before, skipped", file=log, flush=True)
    waiting = [step for step in steps if step.name not in done]
    running: dict[str, tuple[Step, subprocess.Popen, float]] = {}
    failed: list[str] = []
    last_beat = time.perf_counter()
    while waiting or running:
        for step in list(waiting):
            if len(running) >= jobs or failed:
                break
            if all(name in done for name in step.after):
                waiting.remove(step)
                running[step.name] = (step, start(step, jobs, env, f"[{number[step.name]}/{len(steps)}]", log),
                                      time.perf_counter())
        if not running:
            if waiting and not failed:
                raise ChainError(f"steps wait on steps that are not in the plan: {[s.name for s in waiting]}")
            break
        time.sleep(0.2)
        for name, (step, process, started) in list(running.items()):
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)  # with the step's CPU time, its loaders' too
            if pid == 0:
                continue
            process.returncode = os.waitstatus_to_exitcode(status)
            del running[name]
            header = f"[{number[name]}/{len(steps)}] {name}"
            if process.returncode != 0:
                tail = "" if jobs == 1 else "\n" + log_tail(step.folder / "chain.log", lines=25)
                failed.append(f"step {name!r} failed (exit {process.returncode}): {' '.join(step.command)}{tail}")
                print(f"{header}: FAILED", file=log, flush=True)
                continue
            seconds = time.perf_counter() - started
            cpu = usage.ru_utime + usage.ru_stime  # what the step costs on a machine nobody else uses
            write_json(step.folder / DONE, {"command": step.command, "seconds": round(seconds, 1),
                                            "cpu_seconds": round(cpu, 1)})
            done.add(name)
            print(f"{header}: done in {seconds:.0f} s ({cpu:.0f} CPU seconds)", file=log, flush=True)
        if jobs > 1 and running and time.perf_counter() - last_beat > heartbeat_s:
            last_beat = time.perf_counter()
            for name, (step, _, started) in running.items():
                progress = log_tail(step.folder / "chain.log", lines=1)[-150:]
                print(f"  ... {name} ({time.perf_counter() - started:.0f} s): {progress}", file=log, flush=True)
    if failed:
        raise ChainError("\n".join(failed))


def start(step: Step, jobs: int, env: dict[str, str], number: str, log: Any) -> subprocess.Popen:
    print(f"{number} {step.name}\n  $ {' '.join(step.command)}", file=log, flush=True)
    # An interrupted step continues its run in the same folder (every entry point's --resume rule).
    command = step.command + (["--resume"] if resumable(step) else [])
    if jobs == 1:
        return subprocess.Popen(command, env=env)
    step.folder.mkdir(parents=True, exist_ok=True)
    with open(step.folder / "chain.log", "wb") as output:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)


def log_tail(path: Path, lines: int) -> str:
    """The last ``lines`` lines of a step's log, progress-bar redraws (carriage returns) resolved."""
    if not path.is_file():
        return ""
    with open(path, "rb") as file:
        file.seek(max(0, path.stat().st_size - 20_000))
        text = file.read().decode(errors="replace")
    # a progress bar redraws its line after carriage returns: keep what its last redraw shows
    shown = [next((part for part in reversed(line.split("\r")) if part.strip()), "") for line in text.split("\n")]
    return "\n".join([line for line in shown if line.strip()][-lines:])


def resumable(step: Step) -> bool:
    """A training or transfer step: it continues what an interrupted run left in its folder."""
    return len(step.command) > 1 and step.command[1].endswith(("pretrain/run.py", "transfer/run.py"))


class ChainError(UserError, RuntimeError):
    """A step failed or the outputs to compare are missing."""


# ------------------------------------------------------------------------------------------------ measuring


def curve_summary(curve: Sequence[float]) -> dict[str, float]:
    """A loss curve as the mean of each quarter (q1..q4): robust to per-step noise, still the curve's shape.
    A curve of under 8 points is compared point by point (p1, p2, ...)."""
    if not curve:
        raise ChainError("an empty loss curve: the run logged no loss")
    if len(curve) < 8:
        return {f"p{k}": float(value) for k, value in enumerate(curve, 1)}
    bounds = [round(len(curve) * k / 4) for k in range(5)]
    return {f"q{k}": statistics.fmean(curve[a:b]) for k, (a, b) in enumerate(zip(bounds, bounds[1:]), 1)}


def pretrain_scalars(run: Path) -> dict[str, dict[int, float]]:
    """Every per-step scalar TensorBoard holds for a pretraining run, by tag then step (the last value of a
    repeated step, as a resumed run logs again the steps after its checkpoint)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, dict[int, float]] = {}
    for events in sorted((run / "tensorboard").glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({event.step: event.value for event in accumulator.Scalars(tag)})
    return scalars


def pretrain_losses(run: Path) -> list[float]:
    """The per-step training loss of a pretraining run (:func:`pretrain_scalars`)."""
    by_step = pretrain_scalars(run).get("pretrain/loss", {})
    return [by_step[step] for step in sorted(by_step)]


def measure(out: Path, methods: Sequence[str] = METHODS,
            settings: dict[str, dict[str, Any]] | None = None) -> dict[str, float]:
    """Every number the regression compares, by name: ``<method>/<task>/<dataset>/<protocol>/<metric>`` for each
    metric of each record in the chain's store, ``<method>/<curve>/loss/q<k>`` for each loss curve's quarters
    (see `curve_summary`). ``settings``, when given, receives what each number was computed under (the record's
    or the pretraining cost record's ``compute``: precision, threads, CPU kernel ISA)."""
    settings = {} if settings is None else settings
    from mimbench.results import read_results

    records, malformed = read_results(out / "results.jsonl")
    if malformed:
        raise ChainError(f"{out / 'results.jsonl'}: malformed lines {', '.join(map(str, malformed))}")
    values: dict[str, float] = {}
    for record in records:
        for metric, value in record.metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                key = f"{record.method}/{record.task}/{record.dataset}/{record.protocol}/{metric}"
                if key in values:
                    raise ChainError(f"{key} is in the store twice; measure a fresh chain")
                values[key] = float(value)
                settings[key] = record.compute
    for method in methods:
        curves = {"pretrain": pretrain_losses(out / method)}
        coco_curve = out / "coco" / method / "loss_curve.json"
        if coco_curve.is_file():
            curves["detection"] = [point["total_loss"] for point in json.loads(coco_curve.read_text())]
        ade_curve = out / "ade20k" / method / "train_loss.json"
        if ade_curve.is_file():
            curves["segmentation"] = json.loads(ade_curve.read_text())
        cost = out / method / "cost.json"
        computed = {"pretrain": json.loads(cost.read_text()).get("compute", {}) if cost.is_file() else {}}
        for record in records:  # a dense run's curve was computed under its record's settings
            if record.method == method and record.task in ("detection", "segmentation"):
                computed[record.task] = record.compute
        for name, curve in curves.items():
            for part, mean in curve_summary(curve).items():
                values[f"{method}/{name}/loss/{part}"] = mean
                settings[f"{method}/{name}/loss/{part}"] = computed.get(name, {})
    return values


def unpinned(pins: dict[str, Any], settings: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Each measurement computed under other settings than the pins: ``key -> "precision bf16 (pinned fp32)"``."""
    differ = {}
    for key, computed in settings.items():
        wrong = [f"{name} {computed.get(name)} (pinned {pinned})" for name, pinned in pins.items()
                 if computed.get(name) != pinned]
        if wrong:
            differ[key] = ", ".join(wrong)
    return differ


# ------------------------------------------------------------------------------------------------ comparing


@dataclass(frozen=True)
class Tolerance:
    absolute: float = 0.0  # in the metric's unit (points for accuracies, AP, mIoU)
    relative: float = 0.0  # a share of the expected value (loss curves)

    def allows(self, expected: float, got: float) -> bool:
        return abs(got - expected) <= max(self.absolute, self.relative * abs(expected)) + 1e-9


def family(key: str) -> str:
    """The tolerance group of a measurement: its task, plus "-loss" for a loss curve."""
    parts = key.split("/")
    return f"{parts[1]}-loss" if parts[2] == "loss" else parts[1]


@dataclass(frozen=True)
class Row:
    key: str
    expected: float | None
    got: float | None
    tolerance: str
    ok: bool

    @property
    def status(self) -> str:
        if self.expected is None:
            return "NEW (not in the baseline)"
        if self.got is None:
            return "MISSING"
        return "ok" if self.ok else "DRIFT"


def compare(baseline: dict[str, Any], measured: dict[str, float],
            settings: dict[str, dict[str, Any]] | None = None) -> list[Row]:
    """One row per measurement in either the baseline or this run; drifts first.

    With ``settings`` (what each measurement was computed under, from :func:`measure`) and pins in the baseline,
    a measurement made under other settings is compared with the baseline's ``unpinned_tolerances`` (a spread
    across those settings); where the baseline has none, the comparison is refused, naming the settings."""
    differ = unpinned(baseline.get("pins", {}), settings or {})
    if differ and "unpinned_tolerances" not in baseline:
        shown = "; ".join(f"{key}: {why}" for key, why in list(differ.items())[:4])
        raise ChainError(f"{len(differ)} measurements were computed under other settings than the baseline pins "
                         f"({shown}{'; ...' if len(differ) > 4 else ''}); their numbers cannot be compared with its "
                         "seed spread. Run `make regression` (it pins them), or measure a spread across those "
                         "settings with `python -m mimbench.chain spread --unpinned`")
    pinned = {name: Tolerance(**spec) for name, spec in baseline["tolerances"].items()}
    loose = {name: Tolerance(**spec) for name, spec in baseline.get("unpinned_tolerances", {}).items()}
    expected_values: dict[str, float] = baseline["values"]
    rows = []
    for key in sorted(set(expected_values) | set(measured)):
        expected, got = expected_values.get(key), measured.get(key)
        tolerances = loose if key in differ else pinned
        tolerance = tolerances.get(key) or tolerances.get(family(key))  # the measurement's own, else its family's
        if tolerance is None:
            raise ChainError(f"the baseline has no tolerance for {family(key)!r} (measurement {key})")
        ok = expected is not None and got is not None and tolerance.allows(expected, got)
        shown = f"±{tolerance.absolute:g}" if tolerance.absolute else f"±{tolerance.relative:.1%}"
        rows.append(Row(key, expected, got, shown, ok))
    return sorted(rows, key=lambda row: row.ok)


def comparison_table(rows: Sequence[Row]) -> str:
    from tabulate import tabulate

    def number(value: float | None) -> str:
        return "—" if value is None else f"{value:.4g}"

    table = [[row.key, number(row.expected), number(row.got),
              number(row.got - row.expected) if row.got is not None and row.expected is not None else "—",
              row.tolerance, row.status] for row in rows]
    return tabulate(table, headers=["measurement", "expected", "got", "Δ", "tolerance", "status"],
                    tablefmt="github", disable_numparse=True)


def read_baseline(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ChainError(f"no baseline at {path}; write one with `make regression-update` (and review its diff)")
    try:
        baseline = json.loads(path.read_text())
        baseline["values"], baseline["tolerances"]  # noqa: B018  the two parts compare() reads
    except (ValueError, KeyError) as error:
        raise ChainError(f"{path}: not a regression baseline ({error})") from None
    return baseline


def write_json(path: Path, data: dict[str, Any]) -> None:
    from mimbench.core.io import atomic_write

    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n"))


def environment(options: ChainOptions) -> dict[str, Any]:
    """Where a baseline was measured (the tolerances cover other machines; see the module's docstring)."""
    import platform

    import torch

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 platform.machine())
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"), "torch": torch.__version__,
            "python": platform.python_version(), "cpu": model,
            "cores": os.cpu_count(), "jobs": options.jobs, "threads_per_step": options.threads}


# ------------------------------------------------------------------------------------------------ commands


@dataclass
class ChainOptions:
    out: Path
    size: str = "demo"
    data_root: Path | None = None
    fresh: bool = False
    seed: int = 0
    jobs: int = 1  # steps run at once
    threads: int | None = None  # OMP threads per step (None: the cores shared among the jobs)
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    precision: str | None = None  # every step's --precision (None: each step's default, auto)
    pin_isa: bool = False  # torch's AVX2 kernels in every step (PIN_ENV), where the CPU has them


def run_chain(options: ChainOptions, log: Any = sys.stdout) -> list[Step]:
    """Every step of the plan not done yet, with ``options.out`` locked to this chain meanwhile."""
    return with_locked_out(options, lambda: _run_chain(options, log))


def with_locked_out(options: ChainOptions, action: Callable[[], T]) -> T:
    """``action()`` with ``options.out`` locked to this chain meanwhile, emptied first with ``options.fresh``."""
    from mimbench.core.rundir import LOCK_NAME, RunLock

    with RunLock(options.out):
        if options.fresh:  # everything but the lock this chain holds
            for path in options.out.iterdir():
                if path.name != LOCK_NAME:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        return action()


def _run_chain(options: ChainOptions, log: Any) -> list[Step]:
    size = replace(SIZES[options.size], seed=options.seed)
    if options.data_root is not None and not options.data_root.is_dir():
        raise ChainError(f"--data-root {options.data_root}: not a directory; expected\n{REAL_LAYOUT}")
    steps = plan(size, options.out, options.data_root, options.methods, options.precision,
                 SUPERVISED.get(options.size))
    if options.data_root is not None:
        found = [name for name in (*CLASSIFICATION_DATASETS, "coco", "ADEChallengeData2016")
                 if (options.data_root / name).is_dir()]
        print(f"real subsets under {options.data_root}: {', '.join(found) or 'none found'} "
              f"(expected layout:\n{REAL_LAYOUT})", file=log, flush=True)
    pinned = PIN_ENV if options.pin_isa and can_pin_isa() else None
    run_steps(steps, options.jobs, options.threads, log, extra_env=pinned)
    return steps


def can_pin_isa() -> bool:
    """Whether PIN_ENV can give torch's AVX2 kernels here: an x86 CPU that has AVX2."""
    import platform

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return platform.machine() in ("x86_64", "AMD64") and "avx2" in cpuinfo.split()


# The headline number of each embedded run, as the final screen shows it
SUMMARY_COLUMNS = (("digits", "linear", "top1", "digits linear top-1"),
                   ("digits", "finetune", "top1", "digits fine-tune top-1"),
                   ("coco-embedded", "mask-rcnn", "AP_bbox", "COCO-emb. AP box"),
                   ("coco-embedded", "mask-rcnn", "AP_segm", "COCO-emb. AP mask"),
                   ("ade20k-embedded", "upernet", "mIoU", "ADE-emb. mIoU"))


def side_by_side(store: Path) -> str:
    """Our encoders as rows (a method trained on several archs: one row per arch), the embedded runs' headline
    metrics as columns, the others' deltas vs MAE."""
    import pandas as pd

    from mimbench.results import read_results
    from mimbench.tables.layout import METHOD_NAMES

    records, _ = read_results(store)
    archs: dict[str | None, set[str | None]] = {}
    for record in records:
        archs.setdefault(record.method, set()).add(record.arch)
    cells: dict[str, dict[str, float]] = {}
    for record in records:
        name = METHOD_NAMES.get(record.method or "", record.method)
        row = f"{name} {record.arch}" if len(archs[record.method]) > 1 else name
        for dataset, protocol, metric, header in SUMMARY_COLUMNS:
            if (record.dataset, record.protocol) == (dataset, protocol) and metric in record.metrics:
                cells.setdefault(row, {})[header] = record.metrics[metric]
    frame = pd.DataFrame.from_dict(cells, orient="index")
    frame = frame[[header for *_, header in SUMMARY_COLUMNS if header in frame.columns]]
    if "MAE" in frame.index:
        deltas = (frame.drop(index="MAE") - frame.loc["MAE"]).rename(index=lambda name: f"{name} − MAE")
        frame = pd.concat([frame, deltas])
    # "–" where the store has no such number (a step not run, a metric a run does not report), not a bare "nan"
    return frame.astype(object).where(frame.notna(), None).to_markdown(floatfmt=".1f", missingval="–")


def final_screen(out: Path, encoders: Sequence[str]) -> str:
    tables = out / "tables"
    supervised = [name for name in encoders if name.startswith(supervised_encoder(""))]
    labelled = (" The supervised encoders were trained with labels on these digits, so their digits rows are not a "
                "transfer.") if supervised else ""
    shown = ["Our encoders on the embedded sets (the methods on the same ViT with the same budget; a demo of the "
             f"pipeline, not the paper's benchmarks).{labelled} –: no such number in the store.\n\n"
             + side_by_side(out / "results.jsonl")]
    for name, title in (("main", "The paper's main table"), ("transfer", "The paper's transfer table")):
        if (tables / f"{name}.md").is_file():
            shown.append(f"{title} (our rows appear once the real benchmarks are run):\n\n"
                         + (tables / f"{name}.md").read_text().rstrip())
    where = [f"Everything is under {out}/:",
             f"  pretraining     {out}/<method>/  (checkpoints/, encoder.safetensors, cost.json, figures/, "
             f"tensorboard/) for {', '.join(encoders)}",
             f"  TensorBoard     tensorboard --logdir {out}",
             f"  classification  {out}/transfer/<dataset>/<protocol>/<method>/",
             f"  Mask R-CNN      {out}/coco/<method>/  (visualizations/, metrics.json, model_final.pth)",
             f"  UperNet         {out}/ade20k/<method>/  (overlays/, train_loss.json)",
             f"  results store   {out}/results.jsonl",
             f"  tables          {tables}/  (Markdown, CSV, LaTeX, HTML; deltas_vs_mae.png)"]
    return "\n\n".join([*shown, "\n".join(where)])


def demo(options: ChainOptions) -> int:
    started = time.perf_counter()
    run_chain(options)
    supervised = [supervised_encoder(arch) for arch in SUPERVISED.get(options.size, {})]
    print("\n" + final_screen(options.out, [*options.methods, *supervised]))
    print(f"\nchain finished in {(time.perf_counter() - started) / 60:.1f} min "
          f"(a second run reuses every finished step; --fresh starts over)")
    return 0


def regression(options: ChainOptions, baseline_path: Path, update: bool) -> int:
    """Run the chain fresh at CI size under the pins (module docstring) and compare with the baseline (or, with
    ``update``, rewrite its values)."""
    options = replace(options, fresh=True, size="ci", threads=PINS["threads"], precision=PINS["precision"],
                      pin_isa=True)
    run_chain(options)
    settings: dict[str, dict[str, Any]] = {}
    measured = measure(options.out, options.methods, settings)
    write_json(options.out / "measured.json", measured)
    write_json(options.out / "settings.json", settings)
    if update:
        old = json.loads(baseline_path.read_text()) if baseline_path.is_file() else {}
        baseline = {"size": asdict(SIZES["ci"]), "seed": options.seed, "environment": environment(options),
                    "data": str(options.data_root) if options.data_root else "embedded",
                    "pins": PINS, "tolerances": old.get("tolerances", DEFAULT_TOLERANCES), "spread": old.get("spread"),
                    "values": measured}
        if "unpinned_tolerances" in old:
            baseline.update(unpinned_tolerances=old["unpinned_tolerances"], unpinned_spread=old["unpinned_spread"])
        write_json(baseline_path, baseline)
        print(f"wrote {len(measured)} values to {baseline_path}; review the diff (git diff {baseline_path})")
        return 0
    return report(compare(read_baseline(baseline_path), measured, settings), baseline_path, options.out)


def report(rows: Sequence[Row], baseline_path: Path, out: Path) -> int:
    """Print the drifts as a table of expected vs got (the full table goes to ``out/regression.md``); 1 on drift."""
    from mimbench.core.io import atomic_write

    atomic_write(out / "regression.md", lambda tmp: tmp.write_text(comparison_table(rows) + "\n"))
    drifts = [row for row in rows if not row.ok]
    if drifts:
        print(comparison_table(drifts))
        print(f"REGRESSION: {len(drifts)} of {len(rows)} measurements outside the tolerances of {baseline_path} "
              f"(full table: {out / 'regression.md'})")
        return 1
    print(f"regression: all {len(rows)} measurements within the tolerances of {baseline_path} "
          f"(table: {out / 'regression.md'})")
    return 0


# Before `spread` has measured anything: only rounding-level changes pass.
DEFAULT_TOLERANCES = {name: {"absolute": 0.5} for name in ("classification", "detection", "segmentation")} | {
    f"{name}-loss": {"relative": 0.01} for name in ("pretrain", "detection", "segmentation")}
SPREAD_FACTOR = 3.0  # tolerance = 3 standard deviations of the seed-to-seed spread
FLOORS = {"absolute": 0.5, "relative": 0.005}


def tolerances_from(runs: Sequence[dict[str, float]]) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Tolerances from the same chain under several seeds: each measurement gets 3 × its own standard deviation
    across the runs (absolute for metrics, relative to the mean for loss curves), never below the floors; each
    family gets its largest, for measurements the runs did not have. Also returns each family's largest std."""
    tolerances: dict[str, dict[str, float]] = {}
    worst: dict[str, float] = {}
    for key in sorted(set.intersection(*(set(run) for run in runs))):
        samples = [run[key] for run in runs]
        kind = "relative" if family(key).endswith("-loss") else "absolute"
        deviation = statistics.stdev(samples) / (abs(statistics.fmean(samples)) if kind == "relative" else 1.0)
        tolerances[key] = {kind: round(max(SPREAD_FACTOR * deviation, FLOORS[kind]), 4)}
        worst[family(key)] = max(worst.get(family(key), 0.0), deviation)
    for name, deviation in worst.items():
        kind = "relative" if name.endswith("-loss") else "absolute"
        tolerances[name] = {kind: round(max(SPREAD_FACTOR * deviation, FLOORS[kind]), 4)}
    return tolerances, worst


def spread(options: ChainOptions, seeds: Sequence[int], baseline_path: Path, reuse: bool = False,
           pinned: bool = True) -> int:
    """Run the CI chain under each seed (``reuse``: keep the steps a previous spread finished) and write the
    tolerances into the baseline; the baseline's own run (its seed) counts as one more sample.

    ``pinned=False`` leaves the kernel ISA to the machine (precision and threads stay pinned) and writes
    ``unpinned_tolerances``: run it on machines of each ISA the chain must pass on where pinning is impossible."""
    runs = []
    for seed in seeds:
        seed_options = replace(options, fresh=not reuse, size="ci", seed=seed, threads=PINS["threads"],
                               precision=PINS["precision"], pin_isa=pinned, out=options.out / f"seed{seed}")
        run_chain(seed_options)
        runs.append(measure(seed_options.out, options.methods))
    baseline = json.loads(baseline_path.read_text()) if baseline_path.is_file() else {"values": {}}
    if baseline["values"] and baseline.get("seed") not in seeds:
        runs.append(baseline["values"])
        seeds = [*seeds, baseline["seed"]]
    if len(runs) < 2:
        raise ChainError("a spread needs two runs at least: give two seeds, or one besides the baseline's")
    name = "" if pinned else "unpinned_"
    baseline[f"{name}tolerances"], worst = tolerances_from(runs)
    baseline[f"{name}spread"] = {"seeds": list(seeds), "largest_std": {k: round(v, 5) for k, v in worst.items()},
                                 "factor": SPREAD_FACTOR, "floors": FLOORS,
                                 "environment": environment(replace(options, threads=1))}
    write_json(baseline_path, baseline)
    print(json.dumps(baseline[f"{name}spread"], indent=1))
    print(f"{len(baseline[f'{name}tolerances'])} {name}tolerances written to {baseline_path}")
    return 0


# ------------------------------------------------------------------------------------------------ ablations

# `python -m mimbench.chain ablations`: 48 pretraining steps of the demo's ViT on the photos (the demo's budget
# before its trim), the whole digits set linear-probed, the CI size's 40 detector and 30 segmentor iterations.
ABLATIONS = replace(SIZES["demo"], pretrain_epochs=3, coco_iters=SIZES["ci"].coco_iters,
                    ade_iters=SIZES["ci"].ade_iters)
ANALYSIS_SEEDS = (0, 1)  # the analysis figure's seeds (the ablations themselves run at the size's seed)
SAME_RUN_TAG = "same_run_as"  # on the copies of a shared configuration's records (tag_shared_rows)


def ablation_folder(out: Path, run: AblationRun, seed: int) -> Path:
    """Where a configuration's pretraining runs."""
    return Path(out) / "pretrain" / f"{run.config_name}-seed{seed}"


def ablations_plan(size: ChainSize, out: Path, seeds: Sequence[int] = ANALYSIS_SEEDS,
                   precision: str | None = None) -> list[Step]:
    """Every step of the ablations: one MixedAE pretraining per configuration of the ablation plan (at
    ``size.seed``) and per analysis configuration and seed (the same configuration and seed trains once); then,
    for each ablation configuration, the digits linear probe, Mask R-CNN and UperNet on the embedded sets, their
    records tagged with the configuration's first row (:func:`tag_shared_rows` tags them for its other rows)."""
    from mimbench.pretrain.ablations import ablation_plan, analysis_runs, configurations

    out, computed = Path(out), ["--precision", precision] if precision else []
    steps: dict[str, Step] = {}

    def pretrain(run: AblationRun, seed: int) -> str:
        name, folder = f"pretrain {run.config_name} seed{seed}", ablation_folder(out, run, seed)
        steps.setdefault(name, Step(name, python_script(
            "pretrain/run.py", "--method", "mixedae", "--embedded", "--data-root",
            str(out / "datasets" / "photos-embedded"), "--epochs", str(size.pretrain_epochs),
            "--warmup-epochs", str(size.pretrain_warmup_epochs), "--samples-per-epoch", str(size.samples_per_epoch),
            "--seed", str(seed), *run.flags(), *computed, "--out", str(folder)), folder))
        return name

    groups = configurations(ablation_plan())
    trained = [pretrain(first, size.seed) for first, *_ in groups]
    for run in analysis_runs():
        for seed in seeds:
            pretrain(run, seed)
    probes = {"digits": ["--protocol", "linear", *size.linear, "--cache-dir", str(out / "feature_cache")],
              "coco": ["--embedded", "--data-root", str(out / "datasets" / "coco-embedded"),
                       "--max-iter", str(size.coco_iters)],
              "ade20k": ["--embedded", "--data-root", str(out / "datasets" / "ade20k-embedded"),
                         "--max-iters", str(size.ade_iters)]}
    for (first, *_), pretrained in zip(groups, trained, strict=True):
        ckpt = ablation_folder(out, first, size.seed) / "encoder.safetensors"
        tags = ["--tags", *(f"{key}={value}" for key, value in first.tags.items())]
        for task, extra in probes.items():
            name, folder = f"{task} {first.config_name}", out / task / first.config_name
            # The first run of a dense task writes its embedded set; the others wait for it rather than race it.
            writer = () if task == "digits" or first is groups[0][0] else (f"{task} {groups[0][0].config_name}",)
            steps[name] = Step(name, python_script(
                "transfer/run.py", task, "--ckpt", str(ckpt), "--results", str(out / "results.jsonl"), "--seed",
                str(size.seed), *computed, *extra, *tags, "--out", str(folder)), folder, after=(pretrained, *writer))
    return list(steps.values())


def tag_shared_rows(store: Path, groups: Sequence[Sequence[AblationRun]]) -> int:
    """Each configuration's records (tagged with its first row) once more for each of its other rows, tagged with
    that row and ``same_run_as=<first row>``: one training and one probe stand in every row they belong to, and the
    table says so. Returns the number of records added (none when they are there already)."""
    from mimbench.results import append_result, read_results

    records, _ = read_results(store)
    present = {(r.checkpoint_sha256, r.dataset, r.protocol, tuple(sorted(r.tags.items()))) for r in records}
    added = 0
    for first, *others in groups:
        for record in [r for r in records if r.tags == first.tags]:
            for row in others:
                tags = {**row.tags, SAME_RUN_TAG: f"{first.ablation}: {first.variant}"}
                key = (record.checkpoint_sha256, record.dataset, record.protocol, tuple(sorted(tags.items())))
                if key not in present:
                    append_result(replace(record, tags=tags), store)
                    present.add(key)
                    added += 1
    return added


def analysis_curves(out: Path, seeds: Sequence[int]) -> dict[str, list[dict[int, tuple[list[int], list[float]]]]]:
    """homo_acc per homologous block over training, per analysis configuration and seed, from its TensorBoard."""
    from mimbench.pretrain.ablations import analysis_runs, homo_acc_curves

    return {run.variant: [homo_acc_curves(pretrain_scalars(ablation_folder(out, run, seed))) for seed in seeds]
            for run in analysis_runs()}


def ablations(options: ChainOptions, seeds: Sequence[int]) -> int:
    """Train and probe every ablation configuration, write the analysis figure and the tables, print both."""
    from mimbench.pretrain.ablations import ablation_plan, configurations, homo_acc_figure, homo_acc_summary
    from mimbench.results import read_results
    from mimbench.tables import render
    from mimbench.tables.assemble import build_tables
    from mimbench.tables.build import write_outputs

    started, out = time.perf_counter(), options.out
    store = out / "results.jsonl"

    def run() -> str:
        run_steps(ablations_plan(replace(ABLATIONS, seed=options.seed), out, seeds, options.precision),
                  options.jobs, options.threads)
        tag_shared_rows(store, configurations(ablation_plan()))
        curves = analysis_curves(out, seeds)
        figure = homo_acc_figure(curves, out / "figures" / "homo_acc")
        tables = build_tables(read_results(store)[0])
        write_outputs(tables, out / "tables")
        return "\n\n".join([
            *(render.markdown(table) for table in tables if table.name.startswith("ablation_")),
            f"homo_acc per homologous block, seeds {', '.join(map(str, seeds))}: the last quarter's mean (final), the "
            f"mean step-to-step change after the first quarter (jitter), the step at 90% of the rise (t90)",
            homo_acc_summary(curves).to_markdown(),
            f"figure: {', '.join(map(str, figure))}\ntables: {out / 'tables'}/ablation_*.{{md,csv,tex,html}}"])

    print(with_locked_out(options, run))
    print(f"ablations finished in {(time.perf_counter() - started) / 60:.1f} min (a second run reuses every "
          "finished step; --fresh starts over)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mimbench.chain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, default_out in (("demo", "runs/demo"), ("regression", "runs/regression"), ("spread", "runs/spread")):
        command = commands.add_parser(name)
        command.add_argument("--out", type=Path, default=Path(default_out))
        command.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
        command.add_argument("--jobs", type=int, default=DEFAULT_JOBS,
                             help=f"steps run at once, each on cores/jobs threads (default {DEFAULT_JOBS})")
        if name == "demo":
            command.add_argument("--fresh", action="store_true", help="start over instead of reusing finished steps")
            command.add_argument("--size", choices=list(SIZES), default="demo")
        else:
            command.add_argument("--data-root", type=Path, help=f"real benchmarks laid out as\n{REAL_LAYOUT}")
            command.add_argument("--baseline", type=Path, help="default: regression/baseline.json "
                                                               "(baseline-real.json with --data-root)")
        if name == "regression":
            command.add_argument("--update", action="store_true", help="rewrite the baseline's values")
        if name == "spread":
            command.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
            command.add_argument("--reuse", action="store_true", help="keep the steps an earlier spread finished")
            command.add_argument("--unpinned", action="store_true",
                                 help="leave the kernel ISA to the machine; writes unpinned_tolerances")
    command = commands.add_parser("ablations", help="the MixedAE poster's ablations and analysis figure at CPU scale")
    command.add_argument("--out", type=Path, default=Path("runs/ablations"))
    command.add_argument("--jobs", type=int, default=DEFAULT_JOBS,
                         help=f"steps run at once, each on cores/jobs threads (default {DEFAULT_JOBS})")
    command.add_argument("--fresh", action="store_true", help="start over instead of reusing finished steps")
    command.add_argument("--seeds", type=int, nargs="+", default=list(ANALYSIS_SEEDS),
                         help="seeds of the analysis figure's runs (default: %(default)s)")
    args = parser.parse_args(argv)
    options = ChainOptions(out=args.out, methods=getattr(args, "methods", list(METHODS)), jobs=args.jobs)
    try:
        if args.command == "ablations":
            return ablations(replace(options, fresh=args.fresh), args.seeds)
        if args.command == "demo":
            return demo(replace(options, fresh=args.fresh, size=args.size))
        options = replace(options, data_root=args.data_root)
        baseline = args.baseline or BASELINES[args.data_root is not None]
        if args.command == "regression":
            return regression(options, baseline, args.update)
        return spread(options, args.seeds, baseline, args.reuse, pinned=not args.unpinned)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
