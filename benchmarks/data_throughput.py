"""Does data loading starve the pretraining step? Images/s of the pretraining loader against the step's.

The loader is the engine's own (`mimbench.pretrain.engine.pretrain_loader`: pretrain/data.py's dataset with the
recipe's batch size and loader workers) over an ImageFolder of JPEGs written on the fly at ImageNet's typical size
(500×375), so every sample is a real JPEG decode and MAE's RandomResizedCrop. The step is the recipe's model
trained for a few steps on random images of its input size, or the number given with --step-images-per-s (e.g.
benchmarks/pretrain_step.py's). The loader keeps up when its images/s is at least the step's.

    python benchmarks/data_throughput.py                                         # ViT-B/16 recipe on this CPU
    python benchmarks/data_throughput.py --device cuda --batch-size 128 --precision bf16
    python benchmarks/data_throughput.py --step-images-per-s 2400 --num-workers 15   # the loader alone
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mimbench.backbones.vit import ARCHS
from mimbench.core.config import RunSpec
from mimbench.core.runtime import autocast, autocast_dtype, precision_name
from mimbench.pretrain.data import ShardedSampler, build_pretrain_dataset
from mimbench.pretrain.engine import (
    DEFAULT_PRESET,
    PRESETS,
    PretrainConfig,
    PretrainRecipe,
    build_method,
    pretrain_loader,
    weight_decay_groups,
)
from mimbench.pretrain.rcmae import MicroBatch

IMAGENET_TYPICAL = (500, 375)  # the most common ImageNet train image size (width, height)


def write_jpegs(root: str | Path, count: int, size: tuple[int, int] = IMAGENET_TYPICAL, distinct: int = 32,
                seed: int = 0) -> Path:
    """An ImageFolder of ``count`` JPEGs (``root/class_k/img_i.JPEG``, 10 classes): ``distinct`` different pictures
    (smooth colour fields with grain, ~photo-sized files), repeated; each file is still decoded on its own."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    width, height = size
    encoded = []
    for _ in range(min(distinct, count)):
        coarse = Image.fromarray(rng.integers(0, 256, (height // 25 + 1, width // 25 + 1, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize(size, Image.BICUBIC), dtype=np.int16)
        grain = rng.integers(-12, 13, smooth.shape, dtype=np.int16)
        picture = Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8))
        path = root / "encoded.tmp"
        path.parent.mkdir(parents=True, exist_ok=True)
        picture.save(path, format="JPEG", quality=90)
        encoded.append(path.read_bytes())
        path.unlink()
    for index in range(count):
        path = root / f"class_{index % 10}" / f"img_{index:06d}.JPEG"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(encoded[index % len(encoded)])
    return root


def loader_images_per_s(recipe: PretrainRecipe, data_root: Path, device: torch.device, batches: int,
                        seed: int = 0) -> tuple[float, float]:
    """(images/s over ``batches`` batches after the first, seconds to the first batch: the workers' start)."""
    dataset = build_pretrain_dataset(data_root, ARCHS[recipe.arch]["img_size"], seed=seed)
    sampler = ShardedSampler(len(dataset), seed=seed, batch_size=recipe.batch_size)
    sampler.set_epoch(0)
    dataset.set_epoch(0)
    loader = iter(pretrain_loader(dataset, sampler, recipe, device, seed))
    start = time.perf_counter()
    next(loader)
    first = time.perf_counter()
    timed = 0
    for images, _ in loader:
        timed += len(images)
        if timed >= (batches - 1) * recipe.batch_size:
            break
    return timed / max(time.perf_counter() - first, 1e-9), first - start


def step_images_per_s(config: PretrainConfig, device: torch.device, dtype: torch.dtype | None, steps: int) -> float:
    """The recipe's model trained on random images: images/s of one training step (median of ``steps``)."""
    recipe = config.recipe
    torch.manual_seed(config.run.seed)
    model = build_method(config).to(device).train()
    optimizer = torch.optim.AdamW(weight_decay_groups(model, recipe.weight_decay), lr=1e-4, betas=(0.9, 0.95))
    size = ARCHS[recipe.arch]["img_size"]
    images = torch.randn(recipe.batch_size, 3, size, size, device=device)
    seconds = []
    for _ in range(steps + 1):  # the first step warms up (allocations, kernel selection)
        synchronize(device)
        start = time.perf_counter()
        with autocast(device, dtype):
            loss, _ = model(images)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if hasattr(model, "after_micro_batch"):  # RC-MAE's teacher moves after every micro-batch
            model.after_micro_batch(MicroBatch(index_in_epoch=0, per_epoch=1, accumulation=1, epochs=1, step=1,
                                               total_steps=1, stepped=True))
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return recipe.batch_size / statistics.median(seconds[1:])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=list(PRESETS), help="the pretraining recipe")
    parser.add_argument("--method", default="mae", choices=("mae", "rcmae", "mixedae"))
    parser.add_argument("--arch", choices=list(ARCHS), help="default: the recipe's")
    parser.add_argument("--batch-size", type=int, help="per process; default: the recipe's")
    parser.add_argument("--num-workers", type=int, help="default: the recipe's (this machine's CPUs)")
    parser.add_argument("--batches", type=int, default=20, help="loader batches timed (after the first)")
    parser.add_argument("--image-size", type=int, nargs=2, default=IMAGENET_TYPICAL, metavar=("W", "H"),
                        help="the JPEGs' size")
    parser.add_argument("--step-images-per-s", type=float, help="the step's images/s, instead of timing steps")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    args = parser.parse_args(argv)
    if args.batches < 2:
        parser.error("--batches: at least 2 (the first one only starts the workers)")

    recipe = PRESETS[args.preset]
    recipe = dataclasses.replace(recipe, arch=args.arch or recipe.arch, batch_size=args.batch_size or recipe.batch_size,
                                 num_workers=recipe.num_workers if args.num_workers is None else args.num_workers)
    config = PretrainConfig(run=RunSpec(method=args.method), preset=args.preset, recipe=recipe)
    device = torch.device(args.device)
    dtype = autocast_dtype(device, args.precision)
    with tempfile.TemporaryDirectory(prefix="data_throughput") as folder:
        root = write_jpegs(folder, recipe.batch_size * args.batches, size=tuple(args.image_size))
        loader, startup = loader_images_per_s(recipe, root, device, args.batches)
    crop = ARCHS[recipe.arch]["img_size"]
    print(f"loader: {loader:10.4g} images/s  ({recipe.num_workers} workers, batch {recipe.batch_size}, "
          f"{args.batches - 1} batches of {crop}² crops from {args.image_size[0]}×{args.image_size[1]} JPEGs; "
          f"first batch after {startup:.1f} s)")
    if args.step_images_per_s:
        step, source = args.step_images_per_s, "given"
    else:
        step = step_images_per_s(config, device, dtype, args.steps)
        source = (f"{args.method} {recipe.arch}, batch {recipe.batch_size}, {precision_name(dtype)} on {device}, "
                  f"median of {args.steps} steps")
    print(f"step:   {step:10.4g} images/s  ({source})")
    ratio = loader / step
    verdict = "keeps up with the step" if ratio >= 1 else "STARVES the step (more --num-workers, or faster decoding)"
    print(f"loader/step = {ratio:.2f}: data loading {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
