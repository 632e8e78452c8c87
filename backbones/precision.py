"""Which autocast dtype pays off on the device at hand.

bf16 autocast is the default on CUDA. On a CPU it is a large win only with native bf16 instructions
(AVX512-BF16 or AMX); without them PyTorch emulates bf16 and a matmul runs several times slower than fp32
(measured: 6.6x slower on an AVX2-only AMD EPYC), so CPU paths fall back to fp32 there.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when /proc/cpuinfo lists a native bf16 instruction set (Linux; elsewhere assume not)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in NATIVE_BF16_FLAGS)


def autocast_dtype(device: str | torch.device) -> torch.dtype | None:
    """bf16 on CUDA and on CPUs with native bf16; None (plain fp32) elsewhere."""
    device_type = torch.device(device).type
    if device_type == "cuda":
        return torch.bfloat16
    if device_type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None
