"""The results store: one JSON line per downstream run, appended atomically; ``tables/`` reads only this.

A record says what was measured (task, dataset, protocol, metric and value, plus every other metric the
run computed), on which weights (checkpoint path and sha256, and the method / arch / pretraining epochs /
GPU-days the checkpoint's metadata names), how (the full config and seed) and where (device, wall time,
peak memory, git commit, date). ``tags`` group runs the tables treat specially, e.g.
``{"ablation": "objective", "variant": "L_recon + L_HomoCon"}``.

JSON lines rather than SQLite: a store is appended to by many jobs (often on a shared file system where
SQLite locking is unreliable), read whole by pandas, merged by ``cat`` and diffed by ``git``. Each record is
one ``os.write`` of one line to a file opened with ``O_APPEND`` under an exclusive ``flock``, so concurrent
writers never interleave or lose lines; a reader that meets a malformed line (a hand edit, a disk that
filled up mid-line) reports it by line number and keeps the rest.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import os
import platform
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
STORE_ENV = "MIMBENCH_RESULTS"
DEFAULT_STORE = Path("results") / "results.jsonl"


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
    pretrain_epochs: float | None = None
    pretrain_gpu_days: float | None = None
    tags: dict[str, str] = field(default_factory=dict)
    seed: int | None = None
    config: dict[str, Any] = field(default_factory=dict)
    wall_time_s: float | None = None
    device: str | None = None
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


@dataclass
class MalformedLine:
    line_number: int  # counted from 1, as editors do
    problem: str

    def __str__(self) -> str:
        return f"line {self.line_number}: {self.problem}"


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


def read_results(store: str | os.PathLike | None = None) -> tuple[list[Result], list[MalformedLine]]:
    """All well-formed records, and the lines that are not (by line number); a missing store reads as empty."""
    path = store_path(store)
    if not path.exists():
        return [], []
    with open(path, "rb") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_SH)
        raw_lines = handle.read().split(b"\n")
    results, malformed = [], []
    for number, raw in enumerate(raw_lines, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
            if not isinstance(record, dict):
                raise ValueError(f"a JSON {type(record).__name__}, not an object")
            results.append(Result.from_dict(record))
        except (ValueError, TypeError) as error:  # JSONDecodeError is a ValueError
            malformed.append(MalformedLine(number, str(error).splitlines()[0][:200]))
    return results, malformed


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def run_environment(device: Any = "cpu") -> dict[str, Any]:
    """Where a run happened: device name, git commit, UTC date (the fields every record shares)."""
    import torch

    from mimbench.backbones.checkpoint import git_commit

    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})"
    return {
        "device": name,
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


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
