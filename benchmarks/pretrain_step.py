"""MAE, RC-MAE, MixedAE, MixedAE-Full* and MixedAE-Full training steps for the same arch and batch, side by side.

Prints each method's step time, the ratios the project holds itself to (MixedAE/MAE ≤ 1.05, as the paper
pays ~3%: 16.9 vs 16.4 GPU-days; RC-MAE/MAE ≤ 1.35), the Full*/MixedAE and Full/MixedAE step-time ratios next
to the poster's GPU-day ratios (30.8/16.9 = 1.82, 62.3/16.9 = 3.69), and each step's achieved FLOP/s as a share
of this machine's measured matmul FLOP/s (FLOPs counted by torch's FlopCounterMode, multiply-add = 2). The Full
variants' object-aware crops are data-side and cost nothing here: only their m complementary mixtures are timed.

    python benchmarks/pretrain_step.py                                  # ViT-B/16, batch 8, this CPU
    python benchmarks/pretrain_step.py --device cuda --batch-size 128
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from mimbench.backbones.vit import ARCHS
from mimbench.core.config import RunSpec
from mimbench.core.runtime import autocast_dtype
from mimbench.pretrain.engine import BASE, PretrainConfig, build_method
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
# The poster's GPU-days (ViT-B, 300 epochs): MixedAE 16.9, MixedAE-Full* 30.8, MixedAE-Full 62.3.
POSTER_RATIOS = {"mixedae-full*": 30.8 / 16.9, "mixedae-full": 62.3 / 16.9}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops_per_second(device: torch.device, dtype: torch.dtype | None, size: int = 2048) -> float:
    """Best of 5 timings of a square matmul: this machine's attainable peak for the step's precision."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    if dtype is not None:
        a, b = a.to(dtype), b.to(dtype)
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
    """One method's model, optimizer and batch, ready to time one training step at a time."""

    def __init__(self, name: str, args: argparse.Namespace, device: torch.device, dtype) -> None:
        torch.manual_seed(0)
        method, options = METHODS[name]
        recipe = dataclasses.replace(BASE, arch=args.arch, method_options=options)
        self.model = build_method(PretrainConfig(run=RunSpec(method=method), recipe=recipe)).to(device).train()
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        size = ARCHS[args.arch]["img_size"]
        self.images = torch.randn(args.batch_size, 3, size, size, device=device)
        self.dtype = dtype
        with FlopCounterMode(display=False) as counter:  # also the warm-up step
            self.step()
        self.flops = counter.get_total_flops()

    def step(self) -> None:
        with torch.autocast(self.images.device.type, dtype=self.dtype or torch.float32,
                            enabled=self.dtype is not None):
            loss, _ = self.model(self.images)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if hasattr(self.model, "after_micro_batch"):  # RC-MAE's teacher update, once per step without accumulation
            self.model.after_micro_batch(MicroBatch(index_in_epoch=0, per_epoch=1, epochs=100, step=1, total_steps=100,
                                                    stepped=True))

    def seconds(self) -> float:
        synchronize(self.images.device)
        start = time.perf_counter()
        self.step()
        synchronize(self.images.device)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vit_base_patch16_224", choices=list(ARCHS))
    parser.add_argument("--batch-size", type=int, default=8, help="a multiple of 1/r = 4 for MixedAE")
    parser.add_argument("--steps", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = autocast_dtype(device)
    peak = matmul_flops_per_second(device, dtype)
    precision = "bf16 autocast" if dtype else "fp32"
    print(f"{args.arch}, batch {args.batch_size}, {precision} on {device}; matmul peak {peak / 1e9:.1f} GFLOP/s")
    steps = {method: MethodStep(method, args, device, dtype) for method in METHODS}
    timings: dict[str, list[float]] = {method: [] for method in METHODS}
    for _ in range(args.steps):  # interleaved rounds, so drifting machine speed hits every method alike
        for method in METHODS:
            timings[method].append(steps[method].seconds())
    seconds = {method: statistics.median(values) for method, values in timings.items()}
    for method in METHODS:
        flops = steps[method].flops
        print(f"{method:13s} {seconds[method] * 1e3:9.1f} ms/step (median of {args.steps})  "
              f"{flops / 1e9:8.1f} GFLOP/step  {flops / seconds[method] / peak:6.1%} of matmul peak")
    for method, goal in GOALS.items():
        ratio = seconds[method] / seconds["mae"]
        print(f"ratio {method}/mae = {ratio:.3f} (goal <= {goal}: {'met' if ratio <= goal else 'NOT met'})")
    for method, poster in POSTER_RATIOS.items():
        print(f"ratio {method}/mixedae = {seconds[method] / seconds['mixedae']:.2f} step time "
              f"(poster: {poster:.2f} GPU-days)")


if __name__ == "__main__":
    main()
