"""MPViT-S against a ViT-S of similar FLOPs (4.8 vs 4.6 GFLOPs at 224²): forward and forward+backward throughput
of a classification step, in the same run, rounds interleaved.

    python benchmarks/mpvit_throughput.py                                  # batch 8, this CPU
    python benchmarks/mpvit_throughput.py --device cuda --batch-size 128
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from mimbench.backbones.cli import forward_gflops
from mimbench.backbones.vit import backbone_archs, count_parameters, create_backbone
from mimbench.core.runtime import autocast, autocast_dtype

ARCHS = ("mpvit_small", "vit_small_patch16_224")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, model: torch.nn.Module, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    step(model)
    synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs=2, default=list(ARCHS), choices=backbone_archs())
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = autocast_dtype(device)
    images = torch.randn(args.batch_size, 3, 224, 224, device=device)
    labels = torch.randint(0, 1000, (args.batch_size,), device=device)
    models = {arch: create_backbone(arch, num_classes=1000).to(device) for arch in args.archs}

    def forward(model):
        with torch.no_grad(), autocast(device, dtype):
            model(images)

    def train_step(model):
        with autocast(device, dtype):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        model.zero_grad(set_to_none=True)

    timings = {(arch, kind): [] for arch in args.archs for kind in ("forward", "train")}
    for model in models.values():  # warm-up
        train_step(model.train())
        forward(model.eval())
    for _ in range(args.steps):
        for arch, model in models.items():
            timings[arch, "forward"].append(timed(forward, model.eval(), device))
            timings[arch, "train"].append(timed(train_step, model.train(), device))
    print(f"batch {args.batch_size} at 224², {'bf16 autocast' if dtype else 'fp32'} on {device}")
    for arch, model in models.items():
        _, gflops = forward_gflops(arch, num_classes=1000)
        forward_rate = args.batch_size / statistics.median(timings[arch, "forward"])
        train_rate = args.batch_size / statistics.median(timings[arch, "train"])
        print(f"{arch:24s} {count_parameters(model) / 1e6:6.1f}M params {gflops:5.2f} GFLOPs  "
              f"forward {forward_rate:8.1f} img/s  forward+backward {train_rate:8.1f} img/s")


if __name__ == "__main__":
    main()
