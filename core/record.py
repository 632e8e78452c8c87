"""One downstream measurement (:class:`Result`) and how every adapter assembles it.

The store that holds records is ``mimbench.results``; what a record says about the checkpoint, the machine and
the run comes from here, so every task writes the same fields the same way.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from mimbench.core.io import file_sha256, run_environment

SCHEMA_VERSION = 1
STORE_ENV = "MIMBENCH_RESULTS"
DEFAULT_STORE = Path("results") / "results.jsonl"
UNSTATED = "unstated"  # the protocol of a paper's number where the paper does not say how it was measured


@dataclass
class Result:
    """One measurement. ``value`` and ``metrics`` are percentages where the metric is a rate (top-1, mAP, AP)."""

    task: str  # "classification" | "detection" | "segmentation"
    dataset: str  # "cifar10", "imagenet", "coco", "ade20k", "digits", ...
    protocol: str  # "linear" | "linear-lars" | "finetune" | "mask-rcnn" | "upernet"
    metric: str  # name of the headline metric, e.g. "top1", "mean_per_class_accuracy", "map11", "mIoU", "AP_bbox"
    value: float
    metrics: dict[str, float] = field(default_factory=dict)  # every metric the run computed, headline included
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    method: str | None = None  # from the checkpoint's metadata (or --method for foreign checkpoints)
    arch: str | None = None
    params: int | None = None  # the backbone's parameters, without a head (`mimbench.backbones.cli.backbone_size`)
    gflops: float | None = None  # one forward of the backbone at its eval input size, a multiply-add = 1 FLOP
    pretrain_epochs: float | None = None
    pretrain_gpu_days: float | None = None
    tags: dict[str, str] = field(default_factory=dict)
    # The exact protocol of the number: its preset's id (vitdet-100ep, upernet-160k-ss, mae-finetune, ...), or
    # "<id>+<changed fields>" (`mimbench.core.config.protocol_id`); the tables put a paper's number beside it only
    # under the same id. None: a record written before protocols had ids.
    protocol_id: str | None = None
    seed: int | None = None
    config: dict[str, Any] = field(default_factory=dict)
    wall_time_s: float | None = None
    device: str | None = None
    precision: str | None = None  # "bf16" | "fp32": what the run computed in
    compute: dict[str, Any] = field(default_factory=dict)  # precision, threads, CPU kernel ISA
    peak_memory_gb: float | None = None
    git_commit: str | None = None
    date: str | None = None  # ISO 8601, UTC
    schema: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, allow_nan=False, default=str)

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Result:
        known = {f.name for f in fields(cls)}
        missing = [name for name in ("task", "dataset", "protocol", "metric", "value") if name not in record]
        if missing:
            raise ValueError(f"missing field(s) {', '.join(missing)}")
        if not isinstance(record["value"], (int, float)) or isinstance(record["value"], bool):
            raise ValueError(f"value is {record['value']!r}, not a number")
        return cls(**{k: v for k, v in record.items() if k in known})


def checkpoint_fields(path: str | os.PathLike, metadata: Any = None, sha256: str | None = None,
                      method: str | None = None, arch: str | None = None) -> dict[str, Any]:
    """Checkpoint path, sha256 (computed unless given) and what its metadata (a ``CheckpointMetadata``, e.g.
    ``LoadReport.metadata``) says: method, arch, pretraining epochs and GPU-days, for a record.

    ``method`` (the user's ``--method``, e.g. for a foreign checkpoint without metadata) wins over the
    metadata's; ``arch`` (the architecture the run built) fills in where the metadata names none.
    """
    path = Path(path)
    found: dict[str, Any] = {"checkpoint": str(path), "checkpoint_sha256": sha256 or file_sha256(path)}
    if metadata is not None:
        cost = metadata.extra.get("cost", {}) if isinstance(metadata.extra, dict) else {}
        found.update(method=metadata.method, arch=metadata.arch, pretrain_epochs=metadata.epochs,
                     pretrain_gpu_days=cost.get("gpu_days"))
    if method:
        found["method"] = method
    if arch and not found.get("arch"):
        found["arch"] = arch
    return found


def build_result(*, task: str, dataset: str, protocol: str, metric: str, metrics: dict[str, float],
                 checkpoint: str | os.PathLike, metadata: Any, sha256: str | None, method: str | None,
                 arch: str | None, seed: int | None, config: dict[str, Any], started: float, device: Any,
                 dtype: Any, protocol_id: str, tags: dict[str, str] | None = None, params: int | None = None,
                 gflops: float | None = None) -> Result:
    """A record with everything the store wants: the metrics, the checkpoint's fields, the backbone's size
    (``params``, ``gflops``: `mimbench.backbones.cli.backbone_size` of the arch the run built), the run's config,
    wall time since ``started`` (``time.perf_counter()``), peak memory, device, precision and where the run
    happened."""
    import torch

    from mimbench.core.runtime import compute_settings, peak_memory_gb  # torch: not for readers of the store

    device = torch.device(device)
    compute = compute_settings(device, dtype)
    return Result(task=task, dataset=dataset, protocol=protocol, protocol_id=protocol_id, metric=metric,
                  value=round(metrics[metric], 4),
                  metrics=metrics, tags=dict(tags or {}), seed=seed, config=config,
                  wall_time_s=round(time.perf_counter() - started, 1), precision=compute["precision"],
                  compute=compute, peak_memory_gb=round(peak_memory_gb(device), 3), params=params, gflops=gflops,
                  **checkpoint_fields(checkpoint, metadata, sha256, method=method, arch=arch),
                  **run_environment(device))


def store_path(path: str | os.PathLike | None = None) -> Path:
    """``path``, else ``$MIMBENCH_RESULTS``, else ``results/results.jsonl``."""
    return Path(path or os.environ.get(STORE_ENV) or DEFAULT_STORE)


def append_result(result: Result, store: str | os.PathLike | None = None) -> Path:
    """Append one record as one line; safe with any number of concurrent writers on one file system."""
    path = store_path(store)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (result.to_json() + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # O_APPEND alone does not make large writes atomic on every FS
        written = 0
        while written < len(line):
            written += os.write(fd, line[written:])
        os.fsync(fd)
    finally:
        os.close(fd)  # closing releases the lock
    return path
