"""The loader-worker default, the data-throughput benchmark's pieces and the GPU check's whole logic at toy size on a
CPU (benchmarks are not tests: nothing here asserts a timing)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mimbench.benchmarks import gpu_check
from mimbench.benchmarks.data_throughput import loader_images_per_s, write_jpegs
from mimbench.core.runtime import loader_workers
from mimbench.pretrain import supervised
from mimbench.pretrain.data import ImageFiles
from mimbench.pretrain.engine import HARMLESS_ON_RESUME, PRESETS, PretrainRecipe
from mimbench.transfer.classification import LinearProbe

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("cpus", "local_world_size", "cap", "expected"), [
    (16, None, 16, 15),  # one process: every CPU but the training process's own
    (16, None, 8, 8),  # capped
    (16, "8", 16, 1),  # eight processes under torchrun share the machine's CPUs
    (8, "3", 16, 1),  # 8 // 3 = 2 CPUs per process, one of them the process's own
    (1, None, 16, 0),  # one CPU: load in the training process
    (2, "4", 16, 0),  # more processes than CPUs: never negative
])
def test_loader_workers_follows_the_usable_cpus_per_process(monkeypatch, cpus, local_world_size, cap, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(100, 100 + cpus)), raising=False)
    if local_world_size is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world_size)
    assert loader_workers(cap) == expected


def test_loader_workers_without_affinity_masks_counts_the_cpus(monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert loader_workers() == 2


def test_worker_defaults_follow_the_machine_and_stay_harmless_on_resume():
    assert PretrainRecipe().num_workers == PRESETS["in1k_vit_b"].num_workers == loader_workers()
    assert PRESETS["embedded_cpu"].num_workers == 2  # the demo's (and the regression's) own choice
    assert "num_workers" in HARMLESS_ON_RESUME
    assert supervised.SupervisedRecipe().num_workers == loader_workers()
    assert "num_workers" in supervised.HARMLESS_ON_RESUME
    assert LinearProbe().num_workers == loader_workers()


def test_the_benchmark_jpegs_are_an_image_folder_the_engine_loader_reads(tmp_path):
    root = write_jpegs(tmp_path / "jpegs", 12, size=(40, 30), distinct=3)
    files = sorted(root.rglob("*.JPEG"))
    assert len(files) == 12 and len({path.parent.name for path in files}) == 10
    assert len({path.read_bytes() for path in files}) == 3
    dataset = ImageFiles(root, img_size=32)
    assert dataset.image(5)[0].size == (40, 30) and dataset[5][0].shape == (3, 32, 32)
    recipe = dataclasses.replace(PRESETS["embedded_cpu"], batch_size=4, num_workers=0)
    images_per_s, startup = loader_images_per_s(recipe, root, torch.device("cpu"), batches=3)
    assert images_per_s > 0 and startup >= 0


def test_loss_verdict():
    assert gpu_check.loss_verdict([3.0, 2.9, 2.5, 2.0])[0]
    assert not gpu_check.loss_verdict([2.0, 2.5, 2.9, 3.0])[0]
    assert not gpu_check.loss_verdict([3.0, float("nan"), 2.0, 1.0])[0]
    assert not gpu_check.loss_verdict([1.0])[0]
    falling, text = gpu_check.loss_verdict([4.0] * 10 + [1.0] * 30)
    assert falling and "4.000 -> 1.000" in text and "first and last 10 of 40" in text


@pytest.mark.slow  # one benchmark subprocess (~5 s)
def test_a_failed_check_fails_the_gpu_check(tmp_path, monkeypatch, capsys):
    broken = dataclasses.replace(gpu_check.TOY, loader_flags=("--batches", "1"))  # refused by data_throughput.py
    monkeypatch.setitem(gpu_check.SIZES, "toy", broken)
    assert gpu_check.main(["--device", "cpu", "--size", "toy", "--only", "loader", "--out", str(tmp_path)]) == 1
    assert "FAIL loader" in capsys.readouterr().out
    assert json.loads((tmp_path / "gpu_check.json").read_text())["failed"] == ["loader"]


@pytest.mark.slow  # every check of benchmarks/gpu_check.sh at toy size: a dozen processes, two at a time
def test_the_gpu_check_runs_every_check_at_toy_size_on_a_cpu(tmp_path):
    env = {**os.environ, "DEVICE": "cpu", "SIZE": "toy", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--out", str(tmp_path), "--jobs", "2"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    for name in ("steps", "pretrain", "digits", "coco", "ade20k", "nccl"):
        assert any(line.startswith(f"PASS {name} ") for line in lines), done.stdout
    assert any(line.startswith("INFO loader ") for line in lines)
    assert "backend gloo" in done.stdout and "loss " in done.stdout and "loader/step = " in done.stdout
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["failed"] == [] and len(summary["checks"]) == 7
    assert "===== coco: exit status 0" in (tmp_path / "gpu_check.log").read_text()
