"""Linear-probe feature extraction against a bare timm forward of the same model and batch.

``extract_features`` (the linear probe's path: DataLoader, autocast where it pays, pooling, copy to host) is
timed on an in-memory dataset, side by side with a loop of ``timm.create_model(arch).forward_features`` on the
same batches at the same precision. Prints both images/s and their ratio (target >= 0.9). Rounds alternate
so that drifting machine load hits both equally; the median round is reported.

    python benchmarks/feature_throughput.py                          # ViT-B/16, batch 32, CPU
    python benchmarks/feature_throughput.py --device cuda --batch 256 --batches 20
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
from torch.utils.data import TensorDataset

from mimbench.backbones.vit import ARCHS, create_backbone
from mimbench.core.runtime import autocast_dtype
from mimbench.transfer.features import extract_features


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vit_base_patch16_224", choices=list(ARCHS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pool", default="avg", choices=("avg", "token"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = autocast_dtype(device)
    spec = ARCHS[args.arch]

    torch.manual_seed(0)
    ours = create_backbone(args.arch).to(device).eval()
    # timm's own VisionTransformer with the same shape (a stock timm name where one exists)
    bare = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, **spec).to(device).eval()
    bare.load_state_dict(ours.state_dict())
    size = spec["img_size"]
    images = torch.randn(args.batch * args.batches, 3, size, size)
    dataset = TensorDataset(images, torch.zeros(len(images), dtype=torch.long))
    batches = [images[i:i + args.batch] for i in range(0, len(images), args.batch)]

    def run_ours() -> float:
        synchronize(device)
        start = time.perf_counter()
        extract_features(ours, dataset, args.pool, batch_size=args.batch, device=device, num_workers=0,
                         progress=False)
        synchronize(device)
        return len(images) / (time.perf_counter() - start)

    @torch.inference_mode()
    def run_bare() -> float:
        synchronize(device)
        start = time.perf_counter()
        for batch in batches:
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                bare.forward_features(batch.to(device))
        synchronize(device)
        return len(images) / (time.perf_counter() - start)

    run_ours(), run_bare()  # warm-up
    ours_rates, bare_rates = [], []
    for _ in range(args.rounds):
        ours_rates.append(run_ours())
        bare_rates.append(run_bare())
    ours_rate, bare_rate = statistics.median(ours_rates), statistics.median(bare_rates)
    print(f"{args.arch}, batch {args.batch}, {device.type}, autocast {dtype}, pool {args.pool}")
    print(f"timm forward_features:   {bare_rate:8.1f} images/s")
    print(f"mimbench extract_features: {ours_rate:8.1f} images/s")
    print(f"ratio (ours / timm): {ours_rate / bare_rate:.3f}  (target >= 0.9)")


if __name__ == "__main__":
    main()
