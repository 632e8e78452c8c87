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

import fcntl
import json
import os
from dataclasses import dataclass

# A record and how it is written have their home in core (every engine and adapter writes records).
from mimbench.core.record import (  # noqa: F401
    DEFAULT_STORE,
    STORE_ENV,
    UNSTATED,
    Result,
    append_result,
    build_result,
    checkpoint_fields,
    store_path,
)


@dataclass
class MalformedLine:
    line_number: int  # counted from 1, as editors do
    problem: str

    def __str__(self) -> str:
        return f"line {self.line_number}: {self.problem}"


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
