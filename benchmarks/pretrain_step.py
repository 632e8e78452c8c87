"""MAE, RC-MAE, MixedAE, MixedAE-Full* and MixedAE-Full training steps for the same arch and batch, side by side.

Each step is the engine's own (`mimbench.pretrain.engine`: `choose_attention_kernels`, `build_optimizer` with MAE's
weight-decay groups and fused AdamW, `forward_backward` under the run's autocast, `optimizer_step`, then the
method's ``after_micro_batch``, RC-MAE's EMA teacher). Prints each method's step time, the ratios the project
holds itself to (MixedAE/MAE ≤ 1.05, as the paper pays ~3%: 16.9 vs 16.4 GPU-days; RC-MAE/MAE ≤ 1.35), the
Full*/MixedAE and Full/MixedAE step-time ratios next to the poster's GPU-day ratios (30.8/16.9 = 1.82,
62.3/16.9 = 3.69), and each step's achieved FLOP/s as a share of this machine's measured matmul FLOP/s in the
step's precision (FLOPs counted by torch's FlopCounterMode, multiply-add = 2; goal for MAE in bf16: ≥ 0.6). With
``--compile`` every method also runs compiled (``torch.compile``, as the engine compiles), in the same rounds, with
its compile time (first compiled step less an eager step). The Full variants' object-aware crops are data-side and
cost nothing here: only their m complementary mixtures are timed. Exits non-zero when a step fails or a loss is
not finite.

    python benchmarks/pretrain_step.py                                  # ViT-B/16, batch 8, this CPU
    python benchmarks/pretrain_step.py --precision fp32 --methods mae rcmae mixedae
    python benchmarks/pretrain_step.py --device cuda --batch-size 128 --precision bf16 --compile
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from mimbench.backbones.vit import ARCHS
from mimbench.core.config import RunSpec
from mimbench.core.runtime import PRECISIONS, autocast_dtype, peak_memory_gb, precision_name
from mimbench.pretrain.engine import (
    BASE,
    PretrainConfig,
    build_method,
    build_optimizer,
    choose_attention_kernels,
    forward_backward,
    method_loss,
    optimizer_step,
    weight_decay_groups,
)
from mimbench.pretrain.rcmae import MicroBatch

# name -> (--method, method options); the Full variants' m as the presets mixedae_full(_star) set it
METHODS = {
    "mae": ("mae", {}),
    "rcmae": ("rcmae", {}),
    "mixedae": ("mixedae", {}),
    "mixedae-full*": ("mixedae", dict(mixtures_per_group=2)),
    "mixedae-full": ("mixedae", dict(mixtures_per_group=4)),
}
GOALS = {"rcmae": 1.35, "mixedae": 1.05}
MATMUL_SHARE_GOAL = 0.6  # MAE's achieved FLOP/s over the matmul rate, in bf16 where the device has it natively
# The poster's GPU-days (ViT-B, 300 epochs): MixedAE 16.9, MixedAE-Full* 30.8, MixedAE-Full 62.3.
POSTER_RATIOS = {"mixedae-full*": 30.8 / 16.9, "mixedae-full": 62.3 / 16.9}
# One micro-batch per step, no accumulation: where RC-MAE's release schedule reads its momentum (0.996).
ONE_STEP = MicroBatch(index_in_epoch=0, per_epoch=1, accumulation=2, epochs=100, step=1, total_steps=100, stepped=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], None], device: torch.device) -> float:
    """Seconds of one call of ``step``, the device's queued work included."""
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start


def matmul_flops_per_second(device: torch.device, dtype: torch.dtype | None, size: int = 2048) -> float:
    """Best of 5 timings of a square matmul: this machine's attainable peak for the step's precision."""
    a = torch.randn(size, size, device=device, dtype=dtype or torch.float32)
    b = torch.randn(size, size, device=device, dtype=dtype or torch.float32)
    a @ b
    repeats = 5 if device.type == "cpu" else 100
    best = 0.0
    for _ in range(5):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        synchronize(device)
        best = max(best, 2 * size ** 3 * repeats / (time.perf_counter() - start))
    return best


class MethodStep:
    """One method's model, optimizer and batch, built and stepped as the engine does, ready to time one training
    step at a time (eager, or compiled with ``compiled``)."""

    def __init__(self, name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype | None,
                 compiled: bool = False) -> None:
        torch.manual_seed(0)
        self.name = name
        method, options = METHODS[name]
        recipe = dataclasses.replace(BASE, arch=args.arch, method_options=options)
        self.model = build_method(PretrainConfig(run=RunSpec(method=method), recipe=recipe)).to(device).train()
        choose_attention_kernels(self.model, device, dtype)
        self.forward = torch.compile(self.model) if compiled else self.model
        self.optimizer = build_optimizer(weight_decay_groups(self.model, recipe.weight_decay), 1e-4, device)
        size = ARCHS[args.arch]["img_size"]
        self.images = torch.randn(args.batch_size, 3, size, size, device=device)
        self.device, self.dtype = device, dtype
        self.flops = 0
        self.first_seconds = self.seconds()  # the warm-up step: with compile, the compilation
        if not compiled:
            with FlopCounterMode(display=False) as counter:
                self.step()
            self.flops = counter.get_total_flops()

    def step(self) -> None:
        loss, _ = forward_backward(lambda: method_loss(self.forward, self.images, self.device, self.dtype))
        optimizer_step(self.optimizer)
        if hasattr(self.model, "after_micro_batch"):  # RC-MAE's teacher update
            self.model.after_micro_batch(ONE_STEP)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"{self.name}: the loss is {loss.item()}")

    def seconds(self) -> float:
        return timed(self.step, self.device)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vit_base_patch16_224", choices=list(ARCHS))
    parser.add_argument("--batch-size", type=int, default=8, help="a multiple of 1/r = 4 for MixedAE")
    parser.add_argument("--steps", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="auto: bf16 autocast on CUDA and on CPUs with native bf16, else fp32")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                        help="methods to time (mae always)")
    parser.add_argument("--compile", action="store_true", help="also time every method compiled, side by side")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = autocast_dtype(device, args.precision)
    names = ["mae", *(name for name in args.methods if name != "mae")]
    peak = matmul_flops_per_second(device, dtype)
    print(f"{args.arch}, batch {args.batch_size}, {precision_name(dtype)} on {device} "
          f"({torch.get_num_threads()} threads); matmul {peak / 1e9:.1f} GFLOP/s")
    modes = ["eager", "compiled"] if args.compile else ["eager"]
    steps = {(name, mode): MethodStep(name, args, device, dtype, compiled=mode == "compiled")
             for name in names for mode in modes}
    timings: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
    for _ in range(args.steps):  # interleaved rounds, so drifting machine speed hits every method alike
        for key, step in steps.items():
            timings[key].append(step.seconds())
    seconds = {key: statistics.median(values) for key, values in timings.items()}
    for name in names:
        flops = steps[name, "eager"].flops
        for mode in modes:
            extra = ""
            if mode == "compiled":
                compile_seconds = steps[name, mode].first_seconds - seconds[name, "eager"]
                extra = f"  compile {compile_seconds:.0f} s, x{seconds[name, 'eager'] / seconds[name, mode]:.2f}"
            print(f"{name:13s} {mode:8s} {seconds[name, mode] * 1e3:9.1f} ms/step (median of {args.steps})  "
                  f"{flops / 1e9:8.1f} GFLOP/step  {flops / seconds[name, mode] / peak:6.1%} of matmul{extra}")
    share = steps["mae", "eager"].flops / seconds["mae", "eager"] / peak
    verdict = "met" if share >= MATMUL_SHARE_GOAL else "NOT met"
    print(f"mae eager share of matmul = {share:.2f} (goal >= {MATMUL_SHARE_GOAL} in bf16 on native bf16: "
          f"{verdict if dtype == torch.bfloat16 else 'not this precision'})")
    for mode in modes:
        for name, goal in GOALS.items():
            if name in names:
                ratio = seconds[name, mode] / seconds["mae", mode]
                verdict = "met" if ratio <= goal else "NOT met"
                print(f"ratio {name}/mae {mode} = {ratio:.3f} (goal <= {goal}: {verdict})")
        for name, poster in POSTER_RATIOS.items():
            if name in names and "mixedae" in names:
                print(f"ratio {name}/mixedae {mode} = {seconds[name, mode] / seconds['mixedae', mode]:.2f} step "
                      f"time (poster: {poster:.2f} GPU-days)")
    print(f"peak memory {peak_memory_gb(device):.2f} GB ({'allocated' if device.type == 'cuda' else 'process RSS'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
