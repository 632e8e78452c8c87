"""Backbone tools: ``python -m mimbench.backbones.cli {summary,inspect,demo}``.

- ``summary``: every ViT architecture with its input size, tokens, parameters and GFLOPs (built on the meta
  device, so even ViT-H costs nothing to count).
- ``inspect CKPT``: load a checkpoint (any registered backbone) through the loader and print what was loaded,
  resized, missing.
- ``demo``: the foundation's end-to-end check: summary, then write a checkpoint, read it back, verify it.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate
from torch.utils.flop_counter import FlopCounterMode

from mimbench.backbones.checkpoint import (
    CheckpointError,
    CheckpointMetadata,
    backbone_from_checkpoint,
    save_backbone,
)
from mimbench.backbones.contract import backbone_contract
from mimbench.backbones.vit import ARCHS, backbone_archs, count_parameters, create_backbone
from mimbench.core.io import git_commit


@functools.cache  # a record asks once per run; counting builds the model (on the meta device) and runs it
def forward_gflops(arch: str, num_classes: int = 0) -> tuple[int, float]:
    """Parameters and forward GFLOPs of one image, counting a multiply-add as one FLOP (as ViT papers do); a
    hierarchical backbone at 224². The one count of both: the summary, the records and the exports use it."""
    with torch.device("meta"):
        model = create_backbone(arch, num_classes=num_classes)
        size = ARCHS[arch]["img_size"] if arch in ARCHS else 224
        with FlopCounterMode(display=False) as counter:
            model(torch.empty(1, 3, size, size))
    return count_parameters(model), counter.get_total_flops() / 2 / 1e9


def backbone_size(arch: str) -> dict[str, Any]:
    """``params`` and ``gflops`` of a backbone as records and export metadata carry them: the headless backbone's
    parameters and the GFLOPs of one forward at its eval input size (`forward_gflops`, cached per arch); None
    for an arch the registry does not know."""
    if arch not in backbone_archs():
        return {"params": None, "gflops": None}
    params, gflops = forward_gflops(arch)
    return {"params": params, "gflops": round(gflops, 4)}


def summary_table(archs: list[str]) -> str:
    rows = []
    for arch in archs:
        spec = ARCHS[arch]
        params, gflops = forward_gflops(arch)
        tokens = (spec["img_size"] // spec["patch_size"]) ** 2
        rows.append([arch, f"{spec['img_size']}²", tokens, spec["embed_dim"], spec["depth"], f"{params / 1e6:.1f}",
                     f"{gflops:.2f}"])
    return tabulate(rows, headers=["arch", "input", "patches", "width", "depth", "params (M)", "GFLOPs"],
                    tablefmt="github")


def demo(out_dir: Path) -> None:
    print("Backbones (GFLOPs of one forward pass, multiply-add = 1):\n")
    print(summary_table(list(ARCHS)))

    arch = "vit_tiny_patch4_32"
    torch.manual_seed(0)
    model = create_backbone(arch).eval()
    metadata = CheckpointMetadata(method="random-init", arch=arch, epochs=0, data="none", git_commit=git_commit())
    path = save_backbone(out_dir / f"{arch}_init.safetensors", model, metadata)
    print(f"\nWrote {path} ({path.stat().st_size / 1e6:.1f} MB); reading it back through the loader:\n")

    loaded, report = backbone_from_checkpoint(path)  # arch comes from the file's metadata
    print(report.summary())
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        difference = (loaded.eval()(images) - model(images)).abs().max().item()
        contract = backbone_contract(loaded)
        maps = contract.features(images)
    print(f"  max |output difference| after the round trip: {difference:.1e}")
    print(f"  dense features after blocks {contract.blocks}: {[tuple(m.shape) for m in maps]}")
    if difference > 1e-6:
        raise SystemExit("round trip changed the model's outputs")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mimbench.backbones.cli", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    summary = commands.add_parser("summary", help="ViT architectures with parameters and GFLOPs")
    summary.add_argument("--arch", nargs="*", choices=list(ARCHS), default=list(ARCHS))
    inspect = commands.add_parser("inspect", help="load a checkpoint and report what was loaded")
    inspect.add_argument("ckpt", type=Path)
    inspect.add_argument("--arch", choices=backbone_archs(), help="default: from the file's metadata or shapes")
    inspect.add_argument("--which", choices=["teacher", "student"], default="teacher",
                         help="for files holding both (RC-MAE, DINO, iBOT)")
    inspect.add_argument("--img-size", type=int, help="build the model for this input size (pos_embed resampled)")
    run_demo = commands.add_parser("demo", help="summary + checkpoint round trip")
    run_demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    args = parser.parse_args(argv)

    try:
        if args.command == "summary":
            print(summary_table(args.arch))
        elif args.command == "inspect":
            _, report = backbone_from_checkpoint(args.ckpt, arch=args.arch, which=args.which, strict=False,
                                                 img_size=args.img_size)
            print(report.summary())
        else:
            demo(args.out)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
