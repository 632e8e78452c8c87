"""The GPU check's checks: benchmarks/gpu_check.sh sets up the environment, then runs this (see that script's header
for what it assumes of the machine, and the README's "GPU check" for what it prints).

Each check runs one of the project's own commands as a subprocess on generated data and prints ``PASS``/``FAIL``
(``INFO``: measured, not judged) with its figures; the exit status is 1 when any check failed:

- steps: benchmarks/pretrain_step.py (MAE / RC-MAE / MixedAE step times and ratios, eager and compiled, FLOP/s
  against the measured matmul rate, peak memory), passed through as it prints them;
- pretrain, digits, coco, ade20k: each entry point launched by ``torchrun --nproc_per_node 1``; coco is ViTDet
  Mask R-CNN and ade20k UperNet at their papers' presets (1024², 512²), each checked for a finite loss that falls
  (the first iterations' mean against the last ones'), mixed precision on, and its time per iteration;
- nccl: a one-process group of the GPU's backend (NCCL; gloo on a CPU) with a DDP model's backward and an
  all-reduce, under the same launcher (the entry points run alone with one process, without a process group);
- loader: benchmarks/data_throughput.py, the pretraining loader's images/s against the step's.

``--size toy`` runs the same checks at toy size (ViT-tiny, a few iterations, the CPU presets): what the test suite
runs on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1")
LOSS_WINDOW = 10  # iterations averaged at each end of a run to tell whether its loss falls


@dataclass(frozen=True)
class CheckSize:
    """How big each check runs; the seconds each may take add up to the script's budget."""

    arch: str  # the ViT of every check (a random-init encoder; the pretraining run trains its own)
    step_flags: tuple[str, ...]  # benchmarks/pretrain_step.py, besides --device
    pretrain_flags: tuple[str, ...]  # pretrain/run.py, besides the method, data and output
    jpegs: tuple[int, int, int]  # the pretraining ImageFolder: images, width, height
    digits_flags: tuple[str, ...]  # transfer/run.py digits --protocol finetune
    coco_scenes: tuple[int, int, int]  # the COCO-format set: scene size, train images, val images
    coco_flags: tuple[str, ...]
    ade_scenes: tuple[int, int, int]  # the ADE-format set: scene size, train images, val images
    ade_flags: tuple[str, ...]
    loader_flags: tuple[str, ...]  # benchmarks/data_throughput.py, besides --device
    seconds: dict[str, int]  # each check's limit


FULL = CheckSize(
    arch="vit_base_patch16_224",
    step_flags=("--batch-size", "128", "--precision", "bf16", "--compile"),
    pretrain_flags=("--preset", "in1k_vit_b", "--batch-size", "64", "--total-batch-size", "64", "--epochs", "1",
                    "--warmup-epochs", "1", "--compile", "off"),
    jpegs=(256, 500, 375),
    digits_flags=("--per-class", "30", "--epochs", "1", "--base-lr", "1e-2", "--weight-decay", "0.05",
                  "--image-size", "32"),
    # ViTDet-B's own preset at 1024², batch 2, 50 iterations at its lr (not rescaled to the batch: the loss must
    # move in 50 iterations), one log line per iteration.
    coco_scenes=(512, 64, 4),
    coco_flags=("--preset", "vitdet_b_100ep", "--total-batch-size", "2", "--max-iter", "50", "--log-period", "1"),
    # UperNet's ViT-B preset at 512², batch 4, 50 iterations after 5 of warmup, no validation on the way.
    ade_scenes=(512, 32, 2),
    ade_flags=("--preset", "upernet_vitb_160k", "--batch-size", "4", "--max-iters", "50", "--warmup-iters", "5",
               "--log-interval", "1", "--val-interval", "1000000", "--checkpoint-interval", "50"),
    loader_flags=("--batch-size", "128", "--precision", "bf16", "--batches", "30"),
    seconds=dict(steps=210, pretrain=45, digits=30, coco=80, ade20k=70, nccl=15, loader=30),
)
# The same checks on a CPU in seconds: ViT-tiny, the CPU presets, a few iterations.
TOY = dataclasses.replace(
    FULL, arch="vit_tiny_patch4_32",
    step_flags=("--batch-size", "4", "--arch", "vit_tiny_patch4_32", "--steps", "1"),
    pretrain_flags=("--preset", "embedded_cpu", "--arch", "vit_tiny_patch4_32", "--batch-size", "8", "--epochs", "1",
                    "--warmup-epochs", "1", "--num-workers", "0"),
    jpegs=(16, 64, 48),
    digits_flags=("--per-class", "5", "--epochs", "1", "--base-lr", "1e-2", "--weight-decay", "0.05",
                  "--num-workers", "0"),
    coco_scenes=(64, 8, 2),
    coco_flags=("--preset", "embedded_cpu", "--total-batch-size", "2", "--max-iter", "6", "--log-period", "1",
                "--num-workers", "0"),
    ade_scenes=(64, 8, 2),
    ade_flags=("--preset", "embedded_cpu", "--batch-size", "2", "--max-iters", "6", "--warmup-iters", "1",
               "--log-interval", "1", "--checkpoint-interval", "6"),
    loader_flags=("--preset", "embedded_cpu", "--batch-size", "8", "--batches", "3", "--num-workers", "1",
                  "--steps", "1", "--image-size", "64", "48", "--precision", "fp32"),
    seconds={name: 120 for name in FULL.seconds},
)
SIZES = {"full": FULL, "toy": TOY}


@dataclass
class Outcome:
    name: str
    passed: bool | None  # None: measured, not judged
    figures: str
    seconds: float = 0.0

    @property
    def status(self) -> str:
        return "INFO" if self.passed is None else "PASS" if self.passed else "FAIL"


@dataclass
class Context:
    size: CheckSize
    device: str
    work: Path  # generated data and run folders
    log: Path  # every command's output
    checkpoint: Path  # a random-init encoder of size.arch
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)  # the log, for checks run at once

    @property
    def results(self) -> Path:
        return self.work / "results.jsonl"

    def run(self, name: str, command: Sequence[str]) -> tuple[int, str]:
        """Run ``command`` in the repository under the check's time limit; (exit status, output). The output is
        appended to the log; a timeout reads as status 124."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        limit = self.size.seconds[name]
        with subprocess.Popen(list(command), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) as process:
            try:
                output, _ = process.communicate(timeout=limit)
                status = process.returncode
            except subprocess.TimeoutExpired:
                # SIGTERM first: torchrun then ends its workers (which would hold the GPU) before it exits.
                process.terminate()
                try:
                    output, _ = process.communicate(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    output, _ = process.communicate()
                output, status = f"{output}\n(stopped after {limit} s)", 124
        with self.lock, self.log.open("a") as log:
            log.write(f"\n===== {name}: {' '.join(command)}\n{output}\n===== {name}: exit status {status}\n")
        return status, output


# ------------------------------------------------------------------------------------------------ verdicts


def loss_verdict(losses: Sequence[float]) -> tuple[bool, str]:
    """Whether a run's losses are finite and fall: the mean of the first ``LOSS_WINDOW`` iterations (fewer in a
    short run) against the last ones'."""
    if len(losses) < 2:
        return False, f"{len(losses)} logged loss(es), too few to tell"
    if not all(math.isfinite(loss) for loss in losses):
        return False, f"non-finite loss among {len(losses)}"
    window = min(LOSS_WINDOW, len(losses) // 2)
    first, last = statistics.fmean(losses[:window]), statistics.fmean(losses[-window:])
    return last < first, f"loss {first:.3f} -> {last:.3f} (mean of the first and last {window} of {len(losses)})"


def record_of(results: Path, task: str) -> dict | None:
    """The last record of ``task`` in the results store, as plain data."""
    if not results.is_file():
        return None
    records = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    found = [record for record in records if record.get("task") == task]
    return found[-1] if found else None


def failed_run(name: str, status: int, output: str) -> Outcome:
    tail = "\n".join(output.strip().splitlines()[-15:])
    return Outcome(name, False, f"exit status {status}; its last lines:\n{tail}")


def median_ms(values: Sequence[float]) -> str:
    return f"{statistics.median(values) * 1e3:.0f} ms/iteration" if values else "no iteration time logged"


# -------------------------------------------------------------------------------------------------- checks


def check_steps(ctx: Context) -> Outcome:
    status, output = ctx.run("steps", [sys.executable, "benchmarks/pretrain_step.py", "--device", ctx.device,
                                       *ctx.size.step_flags])
    if status:
        return failed_run("steps", status, output)
    return Outcome("steps", True, output.strip())


def check_pretrain(ctx: Context, jpegs: Path) -> Outcome:
    out = ctx.work / "pretrain"
    status, output = ctx.run("pretrain", [*TORCHRUN, "pretrain/run.py", "--method", "mae", "--data-root", str(jpegs),
                                          "--device", ctx.device, *ctx.size.pretrain_flags, "--out", str(out)])
    if status:
        return failed_run("pretrain", status, output)
    cost = json.loads((out / "cost.json").read_text())
    passed = (out / "encoder.safetensors").is_file()
    return Outcome("pretrain", passed, f"torchrun, 1 process: {cost['images_per_s']} images/s, peak memory "
                                       f"{cost['peak_memory_gb']} GB, {cost['precision']}, encoder written: {passed}")


def check_digits(ctx: Context) -> Outcome:
    status, output = ctx.run("digits", [
        *TORCHRUN, "transfer/run.py", "digits", "--protocol", "finetune", "--ckpt", str(ctx.checkpoint),
        "--device", ctx.device, *ctx.size.digits_flags, "--results", str(ctx.results),
        "--cache-dir", str(ctx.work / "cache"), "--out", str(ctx.work / "digits")])
    record = record_of(ctx.results, "classification")
    if status or record is None:
        return failed_run("digits", status, output)
    value = record["metrics"][record["metric"]]
    return Outcome("digits", math.isfinite(value), f"torchrun, 1 process: fine-tuned, {record['metric']} {value:.2f}")


def check_coco(ctx: Context) -> Outcome:
    from mimbench.transfer.coco_data import write_embedded_coco

    scene, train, val = ctx.size.coco_scenes
    data = write_embedded_coco(ctx.work / "coco-data", image_size=scene, sizes={"train2017": train, "val2017": val})
    return check_dense(ctx, "coco", "detection", data, [*ctx.size.coco_flags, "--visualize", "0"], coco_curves,
                       amp=lambda record: record["precision"] == "bf16")


def coco_curves(out: Path) -> tuple[list[float], list[float]]:
    """Detectron2's logged losses and seconds per iteration (past the first fifth: the warm-up)."""
    logged = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    times = [entry["time"] for entry in logged if "time" in entry]
    return [entry["total_loss"] for entry in logged if "total_loss" in entry], times[len(times) // 5:]


def check_ade20k(ctx: Context) -> Outcome:
    from mimbench.transfer.ade20k import EmbeddedSet, make_embedded_ade20k

    scene, train, val = ctx.size.ade_scenes
    data = make_embedded_ade20k(ctx.work / "ade-data", EmbeddedSet(size=scene, train=train, val=val))
    return check_dense(ctx, "ade20k", "segmentation", data, [*ctx.size.ade_flags, "--overlays", "0"], ade20k_curves,
                       amp=lambda record: record["config"]["optim_wrapper"] == "AmpOptimWrapper")


def ade20k_curves(out: Path) -> tuple[list[float], list[float]]:
    """The run's losses per iteration and mmengine's logged seconds per iteration (past the first fifth)."""
    scalars = [json.loads(line) for path in glob.glob(str(out / "*" / "vis_data" / "scalars.json"))
               for line in Path(path).read_text().splitlines()]
    times = [entry["time"] for entry in scalars if "time" in entry]
    return json.loads((out / "train_loss.json").read_text()), times[len(times) // 5:]


def check_dense(ctx: Context, name: str, task: str, data: Path, flags: Sequence[str],
                curves: Callable[[Path], tuple[list[float], list[float]]], amp: Callable[[dict], bool]) -> Outcome:
    """A detection or segmentation run under torchrun; passed when its loss is finite and falls, and when it ran
    in mixed precision wherever it ran on a GPU."""
    out = ctx.work / name
    status, output = ctx.run(name, [
        *TORCHRUN, "transfer/run.py", name, "--ckpt", str(ctx.checkpoint), "--data-root", str(data),
        "--device", ctx.device, *flags, "--results", str(ctx.results), "--out", str(out)])
    record = record_of(ctx.results, task)
    if status or record is None:
        return failed_run(name, status, output)
    losses, times = curves(out)
    falling, loss_text = loss_verdict(losses)
    mixed = amp(record)
    on_cpu = record["device"].startswith("cpu")  # a record's device: the GPU's name, or "cpu (...)"
    metric = f"{record['metric']} {record['metrics'][record['metric']]:.2f}"
    return Outcome(name, falling and (mixed or on_cpu),
                   f"torchrun, 1 process: {loss_text}, {median_ms(times)}, precision {record['precision']} (mixed "
                   f"precision {'on' if mixed else 'off'}), {metric} on {record['device']}")


def check_nccl(ctx: Context) -> Outcome:
    status, output = ctx.run("nccl", [*TORCHRUN, "benchmarks/gpu_check.py", "--probe-process-group",
                                      "--device", ctx.device])
    if status:
        return failed_run("nccl", status, output)
    line = next(line for line in output.splitlines() if line.startswith("process group"))
    wanted = "nccl" if ctx.device.startswith("cuda") else "gloo"
    return Outcome("nccl", f"backend {wanted}" in line, line)


def check_loader(ctx: Context) -> Outcome:
    status, output = ctx.run("loader", [sys.executable, "benchmarks/data_throughput.py", "--device", ctx.device,
                                        *ctx.size.loader_flags])
    if status:
        return failed_run("loader", status, output)
    return Outcome("loader", None, output.strip())


def probe_process_group(device: str) -> None:
    """Inside torchrun: join a process group of the device's backend, run a DDP model's backward (its gradient
    all-reduce) and an all-reduce of its own, and say what ran."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    cuda = device.startswith("cuda")
    where = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=where if cuda else None)
    model = DistributedDataParallel(torch.nn.Linear(64, 64).to(where), device_ids=[where] if cuda else None)
    model(torch.randn(8, 64, device=where)).square().mean().backward()
    total = torch.ones(1, device=where)
    dist.all_reduce(total)
    print(f"process group: backend {dist.get_backend()}, world size {dist.get_world_size()}, DDP backward and "
          f"all-reduce done ({total.item():.0f})", flush=True)
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------- main


def write_checkpoint(path: Path, arch: str) -> Path:
    """A random-init encoder of ``arch`` in our format: what the transfer checks start from."""
    from mimbench.backbones.checkpoint import CheckpointMetadata, save_backbone
    from mimbench.backbones.vit import create_backbone

    torch.manual_seed(0)
    return save_backbone(path, create_backbone(arch), CheckpointMetadata(method="mae", arch=arch, data="random init"))


def environment(device: str) -> str:
    from mimbench.core.runtime import loader_workers

    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    return (f"gpu check on {name}: torch {torch.__version__} (CUDA {torch.version.cuda}), python "
            f"{sys.version.split()[0]}, {len(os.sched_getaffinity(0))} usable CPUs, {loader_workers()} loader "
            "workers by default")


def run_checks(ctx: Context, only: Sequence[str], jobs: int = 1) -> list[Outcome]:
    """The checks in order (``jobs`` at a time: more than one only where timings do not matter), each printed as
    its turn comes."""
    from mimbench.benchmarks.data_throughput import write_jpegs

    count, width, height = ctx.size.jpegs
    jpegs = write_jpegs(ctx.work / "jpegs", count, size=(width, height))
    checks: dict[str, Callable[[], Outcome]] = {
        "steps": lambda: check_steps(ctx), "pretrain": lambda: check_pretrain(ctx, jpegs),
        "digits": lambda: check_digits(ctx), "coco": lambda: check_coco(ctx), "ade20k": lambda: check_ade20k(ctx),
        "nccl": lambda: check_nccl(ctx), "loader": lambda: check_loader(ctx)}

    def timed(name: str) -> Outcome:
        start = time.perf_counter()
        outcome = checks[name]()
        outcome.seconds = time.perf_counter() - start
        return outcome

    outcomes = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for outcome in pool.map(timed, only or checks):
            print(f"{outcome.status} {outcome.name} ({outcome.seconds:.0f} s): "
                  + outcome.figures.replace("\n", "\n    "), flush=True)
            outcomes.append(outcome)
    return outcomes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", default="full", choices=list(SIZES))
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_check"),
                        help="where gpu_check.log (every command's output) and gpu_check.json go")
    parser.add_argument("--only", nargs="*", default=[], choices=list(FULL.seconds), help="default: every check")
    parser.add_argument("--jobs", type=int, default=1, help="checks run at once (timings are then not comparable)")
    parser.add_argument("--probe-process-group", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe_process_group:
        probe_process_group(args.device)
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "gpu_check.log"
    log.write_text("")
    print(environment(args.device), flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check") as work:
        ctx = Context(SIZES[args.size], args.device, Path(work), log,
                      write_checkpoint(Path(work) / "encoder.safetensors", SIZES[args.size].arch))
        outcomes = run_checks(ctx, args.only, args.jobs)
    failed = [outcome.name for outcome in outcomes if outcome.passed is False]
    summary = {"size": args.size, "device": args.device, "seconds": round(time.perf_counter() - started, 1),
               "failed": failed, "checks": [dataclasses.asdict(outcome) for outcome in outcomes]}
    (args.out / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"gpu check: {len(outcomes) - len(failed)} of {len(outcomes)} checks passed or measured, "
          f"{'failed: ' + ', '.join(failed) if failed else 'none failed'}, {summary['seconds']:.0f} s "
          f"(log: {log})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
