"""Run directories: one run at a time in each, and a resume only into a run with the same settings.

The rule every entry point follows: ``--out DIR`` names the run directory. A new or empty one starts a run. One
that holds a run is continued with ``--resume`` and refused without it; either way its ``config.yaml`` is
compared with the new configuration first, and fields that change the model or the data stop the run with one
line naming them, while harmless ones (workers, logging, the results store) may differ.

A run holds ``DIR/.lock`` (an ``flock`` on it, with the holder's pid, host and command written inside) from start
to end. A second run into the same folder stops at once with one line naming the holder; a lock file left by a
process that died is taken over with a warning (the kernel drops a dead process's ``flock``).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mimbench.core.errors import ConfigError, RunDirBusy, UserError
from mimbench.core.io import atomic_write, utc_now

LOCK_NAME = ".lock"
CONFIG_NAME = "config.yaml"


class RunLock:
    """An exclusive hold on a run directory for this process's lifetime (or until :meth:`release`)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirBusy(f"{self.folder} is in use by another run ({holder}); wait for it to finish or "
                             "choose another --out") from None
        previous = _read_holder(fd, default="")
        if previous:
            warnings.warn(f"{self.folder}: taking over the lock left by a run that is no longer running "
                          f"({previous})", stacklevel=2)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": utc_now(),
                  "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Clear the holder and drop the lock (a clean end leaves an empty lock file, so no warning later)."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int, default: str = "holder unknown") -> str:
    raw = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    if not raw:
        return default
    try:
        holder = json.loads(raw)
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError):
        return raw[:200]


# ------------------------------------------------------------------------------------------- config.yaml


def config_yaml(config: Mapping[str, Any]) -> str:
    """A resolved configuration as ``config.yaml`` holds it (and ``--print-config`` prints it)."""
    import yaml

    return yaml.safe_dump(json.loads(json.dumps(config)), sort_keys=False, default_flow_style=None, width=120)


def write_config(folder: str | os.PathLike, config: Mapping[str, Any]) -> Path:
    """The resolved configuration as ``folder/config.yaml`` (replayable with ``--config``)."""
    text = config_yaml(config)
    return atomic_write(Path(folder) / CONFIG_NAME, lambda tmp: tmp.write_text(text))


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not readable YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: holds a {type(data).__name__}, not a mapping of config fields")
    return data


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as ``a.b`` keys (how differing fields are named)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differing_fields(saved: Mapping[str, Any], new: Mapping[str, Any], harmless: Iterable[str]) -> list[str]:
    """``field: saved -> new`` for every field that differs, except those whose last name is in ``harmless``."""
    harmless = set(harmless)
    old, now = flatten(json.loads(json.dumps(saved))), flatten(json.loads(json.dumps(new)))
    return [f"{key}: {old.get(key)!r} -> {now.get(key)!r}" for key in sorted(set(old) | set(now))
            if old.get(key) != now.get(key) and key.rsplit(".", 1)[-1] not in harmless]


def start_run(folder: str | os.PathLike, config: Mapping[str, Any], *, resume: bool, holds_run: bool,
              harmless: Iterable[str] = ()) -> RunLock:
    """Lock ``folder`` and check the resume rule (module docstring), then write ``config.yaml``.

    ``holds_run``: whether the folder holds a run's state already (checkpoints, a finished record), as the
    caller knows its own layout. Returns the held lock; release it (or let the process end) when done.
    """
    folder = Path(folder)
    lock = RunLock(folder).acquire()
    try:
        saved_path = folder / CONFIG_NAME
        if holds_run and not resume:
            raise ConfigError(f"{folder} holds a run already; pass --resume to continue it, or choose another --out")
        if saved_path.is_file() and (holds_run or resume):
            differ = differing_fields(read_config(saved_path), config, harmless)
            if differ:
                raise ConfigError(f"{folder} holds a run with other settings ({'; '.join(differ)}); use the same "
                                  "settings to continue it, or choose another --out")
        write_config(folder, config)
    except BaseException:
        lock.release()
        raise
    return lock


def start_run_on_rank0(world_size: int, rank: int, folder: str | os.PathLike, config: Mapping[str, Any], *,
                       resume: bool, holds_run: bool, harmless: Iterable[str] = ()) -> RunLock | None:
    """:func:`start_run` in the first process only (the lock is the run's, not each rank's); with several
    processes, every rank stops with the first one's refusal instead of waiting for it in a collective."""
    lock, refusal = None, None
    if rank == 0:
        try:
            lock = start_run(folder, config, resume=resume, holds_run=holds_run, harmless=harmless)
        except UserError as error:
            refusal = error
    if world_size > 1:
        import torch.distributed as dist

        verdict = [None if refusal is None else str(refusal)]
        dist.broadcast_object_list(verdict, src=0)
        if verdict[0] is not None and refusal is None:
            refusal = ConfigError(verdict[0])
    if refusal is not None:
        raise refusal
    return lock
