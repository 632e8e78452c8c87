"""``make landscape``: the seed paper's comparison (Lee et al., "Visualizing the Loss Landscape of Self-supervised
Vision Transformer", arXiv 2405.18042) at CPU scale on the embedded data.

    python -m mimbench.landscape.study [--out runs/landscape-study] [--seeds 0 1] [--jobs 2]

MAE, RC-MAE and a supervised ViT of one small arch (vit_mini_patch4_32: ViT-Ti/4 at 6 blocks) and one budget
(`STEPS` optimizer steps of batch 64: MAE and RC-MAE on the bundled photos, the supervised ViT on the bundled digits,
each its method's CPU preset otherwise), then their landscapes (``landscape/run.py --embedded``, the
``embedded_cpu`` preset) on the pretraining, linear-probe and reconstruction losses, once per seed of the
directions, then the landscape tables
(``python -m mimbench.tables.build`` on the study's own store). Each step is the command a user would type, run
as its own process with --resume; a finished step leaves ``study-step.json`` (its command) in its folder and is
skipped while the command is unchanged, so a second ``make landscape`` redoes nothing.
Outputs under --out: ``<method>/`` (the pretraining runs), ``seed<k>/`` (surfaces, ``figures/``,
``landscape.md``), ``results.jsonl`` and ``tables/landscape_<loss>.md`` (mean ± std over the direction seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Half the tiny ViT's depth halves every forward, backward and Hessian-vector product: the study fits its minutes
# on 2 CPU cores with the embedded_cpu landscape preset whole (8 images, 4 Lanczos steps).
ARCH = "vit_mini_patch4_32"
# The budget of every model: 2 epochs of the digits' 1,438 training images at batch 64 (22 steps each) for the
# supervised ViT, and as many crops of the photos per epoch (22 x 64) for MAE and RC-MAE.
EPOCHS, STEPS_PER_EPOCH, BATCH = 2, 22, 64
STEPS = EPOCHS * STEPS_PER_EPOCH
LOSSES = ("pretrain", "linear", "recon")
MARKER = "study-step.json"


def script(path: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / path), *args]


def plan(out: Path, seeds: Sequence[int]) -> list[list[tuple[Path, list[str]]]]:
    """The study's phases, each a list of (folder, command) that may run at once."""
    store = str(out / "results.jsonl")
    photos, digits = str(out / "datasets" / "photos-embedded"), str(out / "datasets" / "digits-labelled")
    schedule = ["--epochs", str(EPOCHS), "--warmup-epochs", "1", "--batch-size", str(BATCH), "--arch", ARCH]
    methods = {method: (out / method, script("pretrain/run.py", "--method", method, "--embedded", "--data-root",
                                             photos, "--samples-per-epoch", str(STEPS_PER_EPOCH * BATCH), *schedule,
                                             "--out", str(out / method)))
               for method in ("mae", "rcmae")}
    methods["supervised"] = (out / "supervised", script(
        "pretrain/run.py", "--method", "supervised", "--embedded", "--preset", "embedded_cpu_vit", "--data-root",
        digits, *schedule, "--results", store, "--out", str(out / "supervised")))
    models = [str(folder) for folder, _ in methods.values()]
    # the two longest first, side by side; MAE, the shortest, after RC-MAE
    pretraining = [methods["rcmae"], methods["supervised"], methods["mae"]]
    landscapes = [(out / f"seed{seed}", script("landscape/run.py", "--embedded", "--data-root", photos, "--ckpt",
                                               *models, "--loss", *LOSSES, "--seed", str(seed), "--results", store,
                                               "--out", str(out / f"seed{seed}")))
                  for seed in seeds]
    tables = [(out / "tables", [sys.executable, "-m", "mimbench.tables.build", "--store", store, "--out",
                                str(out / "tables"), "--no-reference"])]
    return [pretraining, landscapes, tables]


def run_step(folder: Path, command: list[str], threads: int) -> float:
    """Run one step (its output in ``<folder>/study.log``) unless its marker says it finished; its seconds. The
    marker records its wall and CPU seconds (the CPU's: what it costs on a machine nobody else uses)."""
    marker = folder / MARKER
    if marker.is_file() and json.loads(marker.read_text())["command"] == command:
        print(f"{folder.name}: done before, skipped", flush=True)
        return 0.0
    folder.mkdir(parents=True, exist_ok=True)
    resume = ["--resume"] if "--resume" not in command and command[1].endswith("run.py") else []
    print(f"{folder.name}: $ {' '.join(command + resume)}", flush=True)
    started = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(folder / "study.log", "wb") as log:
        process = subprocess.Popen(command + resume, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)  # the step's own CPU time, its data loaders' included
    seconds, cpu = time.perf_counter() - started, usage.ru_utime + usage.ru_stime
    if os.waitstatus_to_exitcode(status) != 0:
        tail = (folder / "study.log").read_text(errors="replace").replace("\r", "\n").splitlines()[-15:]
        raise SystemExit(f"{folder.name} failed (exit {os.waitstatus_to_exitcode(status)}):\n" + "\n".join(tail))
    marker.write_text(json.dumps({"command": command, "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1)})
                      + "\n")
    print(f"{folder.name}: done in {seconds:.0f} s ({cpu:.0f} CPU seconds)", flush=True)
    return seconds


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mimbench.landscape.study", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs") / "landscape-study")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of the directions (≥ 2)")
    parser.add_argument("--jobs", type=int, default=2, help="steps at once (a thread each on 2 cores)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    for phase in plan(args.out, args.seeds):
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda step: run_step(*step, threads), phase))
    print((args.out / "tables" / "landscape_pretrain.md").read_text(), flush=True)
    print(f"the study in {time.perf_counter() - started:.0f} s; figures in {args.out}/seed*/figures/", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
