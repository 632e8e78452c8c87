"""Where and how a run computes: distributed set-up, device, precision (the one autocast choice), the lr
schedule, the finiteness check and peak memory. Every engine and adapter takes these from here.

Precision is a run-config field, ``auto | fp32 | bf16``. ``auto`` is bf16 autocast on CUDA and on CPUs with
native bf16 instructions (AVX512-BF16 or AMX), fp32 elsewhere: without them PyTorch emulates bf16 and a matmul
runs several times slower than fp32 (measured: 6.6x slower on an AVX2-only AMD EPYC).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from mimbench.core.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


# ------------------------------------------------------------------------------------------------- device


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device``, else CUDA when there is one, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None) -> Distributed:
    """Join the torchrun process group when launched by torchrun (RANK/WORLD_SIZE set), else run alone.
    NCCL on GPU, gloo on CPU."""
    wanted = resolve_device(device)
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Distributed(device=wanted)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if wanted.type == "cuda":
        torch.cuda.set_device(local_rank)
        wanted = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if wanted.type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank, wanted)


def leave_process_group() -> None:
    """Destroy every process group this process joined (torchrun's, Detectron2's launcher's, mmengine's). Every entry
    point calls it on its way out: a gloo group left for the interpreter's exit still has its C++ worker threads, and
    the process can then abort ("terminate called without an active exception", pytorch/pytorch#190489) after its
    run succeeded. Local: it waits for no other rank, so a rank that failed does not hang the others."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# More loader processes than this rarely pay for one training process: each holds a copy of the dataset object and
# its prefetched batches, and one epoch's start waits for all of them.
MAX_LOADER_WORKERS = 16


def loader_workers(cap: int = MAX_LOADER_WORKERS) -> int:
    """DataLoader worker processes for one training process: the CPUs this process may run on (its affinity mask,
    which a job scheduler or ``taskset`` narrows), shared among the torchrun processes of this machine
    (``LOCAL_WORLD_SIZE``), less one for the training process itself, at most ``cap``, at least 0."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks (macOS, Windows)
        cpus = os.cpu_count() or 1
    per_process = cpus // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    return max(min(per_process - 1, cap), 0)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


# ---------------------------------------------------------------------------------------------- precision


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when /proc/cpuinfo lists a native bf16 instruction set (Linux; elsewhere assume not) and torch's
    kernels may use it: with the ISA capped to AVX2 (ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2) bf16 is
    emulated as on an AVX2-only CPU."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    capped = cpu_capability() in ("DEFAULT", "AVX2") or os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in (
        "SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2")
    return not capped and any(flag in flags.split() for flag in NATIVE_BF16_FLAGS)


def autocast_dtype(device: str | torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device``: bf16, or None for plain fp32."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    device_type = torch.device(device).type
    if device_type == "cuda" or (device_type == "cpu" and cpu_has_native_bf16()):
        return torch.bfloat16
    return None


def precision_name(dtype: torch.dtype | None) -> str:
    """What a record says a run computed in: ``bf16`` or ``fp32``."""
    return "bf16" if dtype == torch.bfloat16 else "fp32"


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device``'s type; a no-op for fp32 (None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def cpu_capability() -> str:
    """The kernel ISA torch dispatches to on this CPU (``AVX512``, ``AVX2``, ...; ATEN_CPU_CAPABILITY caps it)."""
    return torch.backends.cpu.get_cpu_capability()


def compute_settings(device: torch.device, dtype: torch.dtype | None) -> dict[str, Any]:
    """What decides a run's float rounding, for its records: precision, threads and the CPU kernel ISA."""
    settings: dict[str, Any] = {"precision": precision_name(dtype), "threads": torch.get_num_threads()}
    if device.type == "cpu":
        settings["cpu_capability"] = cpu_capability()
    return settings


# ------------------------------------------------------------------------------------- schedule and checks


class Schedule(Protocol):
    """What the lr schedule reads from a config (pretraining's and fine-tuning's both have it)."""

    epochs: int
    warmup_epochs: float
    min_lr: float


def learning_rate(epoch: float, config: Schedule, peak_lr: float) -> float:
    """Linear warmup, then half-cycle cosine to ``min_lr``; ``epoch`` is fractional (per optimizer step)."""
    if epoch < config.warmup_epochs:
        return peak_lr * epoch / config.warmup_epochs
    progress = (epoch - config.warmup_epochs) / max(config.epochs - config.warmup_epochs, 1e-8)
    return config.min_lr + (peak_lr - config.min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def finite_on_all_ranks(loss: torch.Tensor, world_size: int) -> bool:
    """Whether the loss is finite in every process: all ranks then stop together instead of waiting on a
    collective that a stopped rank never joins."""
    finite = torch.isfinite(loss.detach()).float()
    if world_size > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return finite.item() == 1
