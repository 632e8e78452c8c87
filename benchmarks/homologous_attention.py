"""Cost of homologous attention (TopK) against timm's fused attention in a full encoder training step.

MixedAE's encoder sees every token of a mixed image and runs homologous attention; the paper pays ~3% in
pretraining time over MAE for the whole method (16.9 vs 16.4 GPU-days, ViT-B 300 epochs). This prints the
step time of the same ViT with homologous attention in all blocks, divided by the step time with standard
attention, measured side by side in one run.

    python benchmarks/homologous_attention.py                       # ViT-B/16, batch 8, CPU
    python benchmarks/homologous_attention.py --device cuda --batch 64
"""

from __future__ import annotations

import argparse
import time

import torch

from mimbench.backbones.vit import ARCHS, create_backbone
from mimbench.core.runtime import autocast_dtype
from mimbench.pretrain.mixedae import use_homologous_attention


def step_seconds(model: torch.nn.Module, images: torch.Tensor, steps: int, dtype: torch.dtype | None) -> float:
    def step() -> None:
        with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
            loss = model.forward_features(images).float().pow(2).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up
    if images.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if images.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vit_base_patch16_224", choices=list(ARCHS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--mixing-ratio", type=float, default=0.25, help="K = ratio x tokens, as MixedAE")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"],
                        help="autocast dtype; default: bf16 on CUDA and on CPUs with native bf16, else fp32")
    args = parser.parse_args()

    torch.manual_seed(0)
    size = ARCHS[args.arch]["img_size"]
    model = create_backbone(args.arch).to(args.device).train()
    images = torch.randn(args.batch, 3, size, size, device=args.device)
    tokens = model.patch_embed.num_patches + 1
    topk = max(1, round(args.mixing_ratio * tokens))
    dtype = autocast_dtype(args.device) if args.dtype is None else getattr(torch, args.dtype)
    precision = "fp32" if dtype in (None, torch.float32) else f"{dtype} autocast"

    standard = step_seconds(model, images, args.steps, dtype)
    use_homologous_attention(model, topk)  # the same weights, now attending through TopK
    homologous = step_seconds(model, images, args.steps, dtype)
    print(f"{args.arch}, batch {args.batch}, {tokens} tokens, K={topk}, {precision} on {args.device}")
    print(f"standard attention   {standard * 1e3:8.1f} ms/step")
    print(f"homologous attention {homologous * 1e3:8.1f} ms/step")
    print(f"ratio homologous/standard = {homologous / standard:.3f}")


if __name__ == "__main__":
    main()
