"""Supervised pretraining with labels: the DeiT recipe (Touvron et al., "Training data-efficient image transformers
& distillation through attention", ICML 2021), which MPViT trains with too (its main.py defaults).

    python pretrain/run.py --method supervised --data-root /imagenet --arch mpvit_small --out runs/deit-mpvit-s
    python pretrain/run.py --method supervised --embedded --out runs/demo-supervised   # digits, CPU, minutes

Any backbone of :func:`~mimbench.backbones.vit.create_backbone` (ViTs, MPViTs, resnet18) with a linear head.
Data: ImageNet's layout, ``<root>/train/<class>/<image>`` and ``<root>/val/<class>/<image>``; top-1 on val is
measured after every epoch. timm's augmentation (RandAugment, random erasing), Mixup/CutMix and soft-target loss;
repeated augmentation (each image ``repeated_augmentation`` times per epoch, DeiT's RASampler, with one third
of the images per epoch). The loop keeps the pretraining engine's guarantees: DDP, accumulation, bf16, exact
resume (every random draw a function of the seed and the micro-batch or sample), TensorBoard, progress, cost.
The headless backbone is exported with metadata ``method: supervised``, and the final val top-1 is appended to the
results store (task classification, protocol supervised; dataset ``imagenet``, or ``digits-embedded``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_weight_decay
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder
from tqdm import tqdm

from mimbench.backbones.checkpoint import CheckpointMetadata, read_checkpoint, save_backbone
from mimbench.backbones.contract import backbone_contract
from mimbench.backbones.vit import backbone_archs, create_backbone
from mimbench.core.config import Embedded, RunSpec, config_parser, exit_status, parse_config, to_dict
from mimbench.core.errors import ConfigError, DatasetError, TrainingDiverged
from mimbench.core.io import atomic_write, file_sha256, git_commit
from mimbench.core.record import append_result, build_result
from mimbench.core.rundir import start_run_on_rank0
from mimbench.core.runtime import (
    autocast,
    autocast_dtype,
    compute_settings,
    finite_on_all_ranks,
    init_distributed,
    learning_rate,
    peak_memory_gb,
    precision_name,
)
from mimbench.pretrain.data import IMAGENET_MEAN, IMAGENET_STD, ShardedSampler, sample_seed
from mimbench.pretrain.engine import checkpoint_paths, micro_batch_seed

PROG = "pretrain/run.py --method supervised"
# Drop path per arch: DeiT-B 0.1 (DeiT Table 9); MPViT T/XS 0.0 (main.py's default), S 0.05, B 0.3 (the
# official GET_STARTED.md training commands). Others: 0.1, DeiT's default.
DROP_PATH = {"vit_base_patch16_224": 0.1, "mpvit_tiny": 0.0, "mpvit_xsmall": 0.0, "mpvit_small": 0.05,
             "mpvit_base": 0.3}


@dataclass(frozen=True)
class SupervisedRecipe:
    """The DeiT recipe (DeiT Table 9; MPViT's main.py has the same defaults)."""

    arch: str = "vit_base_patch16_224"
    img_size: int = 224
    epochs: int = 300
    warmup_epochs: int = 5
    batch_size: int = 128  # per process; x 8 GPUs = 1024 (DeiT; MPViT's training commands)
    accum_steps: int = 1
    base_lr: float = 5e-4  # lr = base_lr * effective batch / 512
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    drop_path_rate: float | None = None  # None: DROP_PATH's value for the arch
    label_smoothing: float = 0.1
    auto_augment: str = "rand-m9-mstd0.5-inc1"
    random_erasing: float = 0.25
    mixup: float = 0.8
    cutmix: float = 1.0
    repeated_augmentation: int = 3  # copies of an image per epoch (DeiT's RASampler); 1: off
    num_workers: int = 8
    save_every_steps: int = 1000
    keep_checkpoints: int = 2
    compile: bool | None = None  # None: on CUDA only


BASE = SupervisedRecipe()
PRESETS: dict[str, SupervisedRecipe] = {
    "deit_in1k": BASE,
    # The embedded digits on a CPU in a few minutes: the CPU-sized MPViT at 32², 12 epochs at 32 x the lr (peak
    # 2e-3 at batch 64), no repeated augmentation, lighter mixing and RandAugment for 8 x 8 digits upsampled.
    "embedded_cpu": dataclasses.replace(
        BASE, arch="mpvit_nano_cpu", img_size=32, epochs=12, warmup_epochs=1, batch_size=64, base_lr=BASE.base_lr * 32,
        min_lr=1e-5, auto_augment="rand-m5-mstd0.5-inc1", mixup=0.2, cutmix=0.0, random_erasing=0.0,
        repeated_augmentation=1, num_workers=0, save_every_steps=20),
}
DEFAULT_PRESET = "deit_in1k"
HARMLESS_ON_RESUME = ("num_workers", "save_every_steps", "keep_checkpoints", "compile", "device", "out", "resume",
                      "preset", "tags")


@dataclass
class SupervisedConfig:
    run: RunSpec = field(default_factory=lambda: RunSpec(method="supervised", out="runs/supervised"))
    preset: str = DEFAULT_PRESET
    recipe: SupervisedRecipe = BASE


# ------------------------------------------------------------------------------------------------ data


EMBEDDED_MARK, EMBEDDED_DATASET = "manifest.json", "digits-embedded"  # the set's name in the results store


def write_embedded_digits(root: Path) -> Path:
    """scikit-learn's 1,797 digits (8 x 8, 10 classes) as PNGs in ImageNet's layout, a seeded 20% as val."""
    from sklearn.datasets import load_digits

    if (root / EMBEDDED_MARK).is_file():
        return root
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    val = set(order[: len(order) // 5].tolist())
    for index, (image, label) in enumerate(zip(digits.images, digits.target)):
        folder = root / ("val" if index in val else "train") / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255 / 16).astype(np.uint8)).convert("RGB").save(folder / f"{index:04d}.png")
    atomic_write(root / EMBEDDED_MARK, lambda tmp: tmp.write_text(json.dumps({"set": EMBEDDED_DATASET}) + "\n"))
    return root


EMBEDDED = Embedded(root="runs/datasets/digits-labelled", preset="embedded_cpu", make=write_embedded_digits)


class SeededLabelled(Dataset):
    """An ImageFolder split whose sample ``i`` in epoch ``e`` is augmented from (seed, e, i) alone; with
    ``repeats`` > 1 an epoch holds 1/repeats of the images, each ``repeats`` times (repeated augmentation)."""

    def __init__(self, folder: ImageFolder, transform: Any, seed: int, repeats: int = 1) -> None:
        self.folder, self.transform, self.seed, self.repeats = folder, transform, seed, repeats
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        order = torch.randperm(len(self.folder), generator=torch.Generator().manual_seed(self.seed + epoch))
        self.order = order[: len(self.folder) // self.repeats].repeat_interleave(self.repeats)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.folder.samples[int(self.order[index])]
        seed = sample_seed(self.seed, self.epoch, index)
        random.seed(seed)
        torch.manual_seed(seed)
        np.random.seed(seed % 2 ** 32)
        with Image.open(path) as image:
            return self.transform(image.convert("RGB")), label


def image_folder(root: Path, split: str) -> ImageFolder:
    try:
        return ImageFolder(str(root / split))
    except (FileNotFoundError, OSError) as error:
        raise DatasetError(f"{root / split}: {error}; expected ImageNet's layout <root>/{{train,val}}/<class>/"
                           "<image>, or pass --embedded for the bundled digits") from None


# ----------------------------------------------------------------------------------------------- trainer


def resolve(config: SupervisedConfig) -> SupervisedConfig:
    """The arch in the recipe only (--arch sets both), and the drop path spelled out."""
    recipe = config.recipe
    arch = config.run.arch or recipe.arch
    if arch not in backbone_archs():
        raise ConfigError(f"unknown arch {arch!r}; choose one of: {', '.join(backbone_archs())}")
    drop_path = recipe.drop_path_rate if recipe.drop_path_rate is not None else DROP_PATH.get(arch, 0.1)
    return dataclasses.replace(config, run=dataclasses.replace(config.run, arch=None),
                               recipe=dataclasses.replace(recipe, arch=arch, drop_path_rate=drop_path))


class SupervisedTrainer:
    def __init__(self, config: SupervisedConfig) -> None:
        self.config = config = resolve(config)
        run, recipe = config.run, config.recipe
        if run.data_root is None:
            raise ConfigError("--data-root is needed (ImageNet's layout), or --embedded")
        self.out = Path(run.out)
        self.dist = init_distributed(run.device)
        self.device = self.dist.device
        self.dtype = autocast_dtype(self.device, run.precision)
        root = Path(run.data_root)
        train, val = image_folder(root, "train"), image_folder(root, "val")
        self.num_classes = len(train.classes)
        normalise = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD)
        train_transform = create_transform(recipe.img_size, is_training=True, auto_augment=recipe.auto_augment,
                                           re_prob=recipe.random_erasing, interpolation="bicubic", **normalise)
        self.train_set = SeededLabelled(train, train_transform, run.seed, recipe.repeated_augmentation)
        self.val_set = SeededLabelled(val, create_transform(recipe.img_size, crop_pct=1.0, **normalise), run.seed)
        self.data_description = f"{root} ({len(train)} train / {len(val)} val images, {self.num_classes} classes)"
        self.dataset_name = EMBEDDED_DATASET if (root / EMBEDDED_MARK).is_file() else "imagenet"

        torch.manual_seed(run.seed)
        self.model = create_backbone(recipe.arch, num_classes=self.num_classes,
                                     drop_path_rate=recipe.drop_path_rate).to(self.device)
        self.sampler = ShardedSampler(len(self.train_set), self.dist.world_size, self.dist.rank, seed=run.seed,
                                      batch_size=recipe.batch_size)
        self.steps_per_epoch = len(self.train_set) // self.dist.world_size // recipe.batch_size // recipe.accum_steps
        if self.steps_per_epoch == 0:
            raise ConfigError(f"{len(self.train_set)} images cannot fill one step of batch {recipe.batch_size} x "
                              f"accumulation {recipe.accum_steps} x {self.dist.world_size} processes")
        self.total_steps = self.steps_per_epoch * recipe.epochs
        self.effective_batch = recipe.batch_size * recipe.accum_steps * self.dist.world_size
        self.peak_lr = recipe.base_lr * self.effective_batch / 512
        mixing = recipe.mixup > 0 or recipe.cutmix > 0
        self.mixup = Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, label_smoothing=recipe.label_smoothing,
                           num_classes=self.num_classes) if mixing else None
        self.criterion = SoftTargetCrossEntropy() if mixing else LabelSmoothingCrossEntropy(recipe.label_smoothing)

        self.ddp = self.model
        if self.dist.world_size > 1:
            self.ddp = DistributedDataParallel(self.model, device_ids=[self.device] if self.device.type == "cuda"
                                               else None)
        compile_model = recipe.compile if recipe.compile is not None else self.device.type == "cuda"
        self.forward = torch.compile(self.ddp) if compile_model else self.ddp
        # timm's create_optimizer (DeiT, MPViT): no decay on 1-d tensors and the family's named tensors.
        contract = backbone_contract(create_backbone(recipe.arch))
        no_decay = {name for name, p in self.model.named_parameters() if contract.no_weight_decay(name, p)}
        self.optimizer = torch.optim.AdamW(
            param_groups_weight_decay(self.model, recipe.weight_decay, no_weight_decay_list=no_decay), lr=self.peak_lr)
        self.step, self.wall_seconds, self.images_seen, self.top1 = 0, 0.0, 0, []
        self.writer = None

    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                "wall_seconds": self.wall_seconds, "images_seen": self.images_seen, "top1": self.top1}

    def save(self) -> None:
        if not self.dist.is_main:
            return
        atomic_write(self.out / "checkpoints" / f"step_{self.step:08d}.pth", lambda tmp: torch.save(self.state(), tmp))
        for old in checkpoint_paths(self.out)[: -self.config.recipe.keep_checkpoints]:
            old.unlink(missing_ok=True)

    def resume(self) -> Path | None:
        paths = checkpoint_paths(self.out)
        if not paths:
            return None
        state, _ = read_checkpoint(paths[-1])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.wall_seconds = state["step"], state["wall_seconds"]
        self.images_seen, self.top1 = state["images_seen"], list(state["top1"])
        return paths[-1]

    def train(self) -> Path:
        """Train to the recipe's epochs (resuming with ``run.resume``); returns the exported backbone's path."""
        holds_run = bool(checkpoint_paths(self.out)) or (self.out / "encoder.safetensors").exists()
        self.started = time.perf_counter()
        lock = start_run_on_rank0(self.dist.world_size, self.dist.rank, self.out, to_dict(self.config),
                                  resume=self.config.run.resume, holds_run=holds_run, harmless=HARMLESS_ON_RESUME)
        try:
            resumed = self.resume()
            if self.dist.is_main:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.out / "tensorboard"))
                print(f"supervised {self.config.recipe.arch} ({self.config.preset}): {self.config.recipe.epochs} "
                      f"epochs x {self.steps_per_epoch} steps, effective batch {self.effective_batch}, lr "
                      f"{self.peak_lr:.2e}, {self.device} {precision_name(self.dtype)}, data {self.data_description}, "
                      f"{f'resumed from {resumed}' if resumed else 'from scratch'}", flush=True)
            while self.step < self.total_steps:
                epoch = self.step // self.steps_per_epoch
                self.train_epoch(epoch)
                self.top1.append(self.evaluate())
                if self.dist.is_main:
                    self.writer.add_scalar("supervised/val_top1", self.top1[-1], self.step)
                    print(f"epoch {epoch}: val top-1 {self.top1[-1]:.2f}%", flush=True)
                self.save()
            return self.export()
        finally:
            if lock is not None:
                lock.release()

    def train_epoch(self, epoch: int) -> None:
        run, recipe = self.config.run, self.config.recipe
        start_in_epoch = self.step - epoch * self.steps_per_epoch
        self.sampler.set_epoch(epoch, skip=start_in_epoch * recipe.accum_steps * recipe.batch_size)
        self.train_set.set_epoch(epoch)
        loader = DataLoader(self.train_set, batch_size=recipe.batch_size, sampler=self.sampler, drop_last=True,
                            num_workers=recipe.num_workers, pin_memory=self.device.type == "cuda")
        self.model.train()
        segment_start = last_time = time.perf_counter()
        micro, world, rank = 0, self.dist.world_size, self.dist.rank
        with tqdm(total=self.steps_per_epoch, initial=start_in_epoch, desc=f"epoch {epoch}",
                  disable=not self.dist.is_main, dynamic_ncols=True) as progress:
            for images, labels in loader:
                images, labels = images.to(self.device, non_blocking=True), labels.to(self.device)
                last_micro = (micro + 1) % recipe.accum_steps == 0
                lr = learning_rate(self.step / self.steps_per_epoch, recipe, self.peak_lr)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                seed = micro_batch_seed(run.seed, (self.step * recipe.accum_steps + micro % recipe.accum_steps) * world
                                        + rank)
                torch.manual_seed(seed)
                np.random.seed(seed % 2 ** 32)  # timm's Mixup draws from numpy
                targets = labels
                if self.mixup is not None:
                    images, targets = self.mixup(images, labels)
                sync = contextlib.nullcontext() if last_micro or self.ddp is self.model else self.ddp.no_sync()
                with sync:
                    with autocast(self.device, self.dtype):
                        loss = self.criterion(self.forward(images), targets)
                    if not finite_on_all_ranks(loss, world):
                        raise TrainingDiverged(f"loss is {loss.item()} at epoch {epoch}, step {self.step + 1}; "
                                               "stopped (try a lower --base-lr or more --warmup-epochs)")
                    (loss / recipe.accum_steps).backward()
                micro += 1
                if not last_micro:
                    continue
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                self.images_seen += self.effective_batch
                now = time.perf_counter()
                throughput, last_time = self.effective_batch / max(now - last_time, 1e-9), now
                if self.dist.is_main:
                    for key, value in {"loss": loss.item(), "lr": lr, "images_per_s": throughput}.items():
                        self.writer.add_scalar(f"supervised/{key}", value, self.step)
                    progress.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}", img_s=f"{throughput:.0f}")
                    progress.update(1)
                if self.step % recipe.save_every_steps == 0 and self.step % self.steps_per_epoch != 0:
                    self.wall_seconds += now - segment_start
                    segment_start = now
                    self.save()
                if self.step % self.steps_per_epoch == 0:
                    break
        self.wall_seconds += time.perf_counter() - segment_start

    @torch.no_grad()
    def evaluate(self) -> float:
        """Top-1 (%) on val, every process counting its share of the images."""
        self.model.eval()
        correct = torch.zeros(2, device=self.device)
        indices = range(self.dist.rank, len(self.val_set), self.dist.world_size)
        loader = DataLoader(torch.utils.data.Subset(self.val_set, list(indices)), batch_size=256,
                            num_workers=self.config.recipe.num_workers)
        for images, labels in loader:
            with autocast(self.device, self.dtype):
                logits = self.model(images.to(self.device))
            correct += torch.tensor([(logits.argmax(1).cpu() == labels).sum().item(), len(labels)],
                                    device=self.device, dtype=correct.dtype)
        if self.dist.world_size > 1:
            torch.distributed.all_reduce(correct)
        self.model.train()
        return round(100 * correct[0].item() / max(correct[1].item(), 1), 4)

    def cost(self) -> dict[str, Any]:
        hours = self.wall_seconds / 3600
        return {"wall_hours": round(hours, 5), "processes": self.dist.world_size,
                "gpu_hours": round(hours * self.dist.world_size, 5) if self.device.type == "cuda" else 0.0,
                "images_per_s": round(self.images_seen / max(self.wall_seconds, 1e-9), 2),
                "peak_memory_gb": round(peak_memory_gb(self.device), 3), "precision": precision_name(self.dtype),
                "compute": compute_settings(self.device, self.dtype)}

    def export(self) -> Path:
        """The headless backbone with metadata (method supervised, arch, epochs, data, val top-1, cost)."""
        path = self.out / "encoder.safetensors"
        if not self.dist.is_main:
            return path
        head = {name for name, _ in self.model.named_parameters()} - set(
            create_backbone(self.config.recipe.arch).state_dict())
        weights = {k: v for k, v in self.model.state_dict().items() if k not in head}
        cost = self.cost()
        metadata = CheckpointMetadata(method="supervised", arch=self.config.recipe.arch,
                                      epochs=self.step / self.steps_per_epoch, data=self.data_description,
                                      git_commit=git_commit(), extra={"cost": cost, "val_top1": self.top1[-1:],
                                                                      "config": to_dict(self.config)})
        save_backbone(path, weights, metadata)
        atomic_write(self.out / "cost.json", lambda tmp: tmp.write_text(json.dumps(cost, indent=2) + "\n"))
        run = self.config.run
        result = build_result(task="classification", dataset=self.dataset_name, protocol="supervised", metric="top1",
                              metrics={"top1": self.top1[-1]}, checkpoint=path, metadata=metadata,
                              sha256=file_sha256(path), method="supervised", arch=self.config.recipe.arch,
                              seed=run.seed, config=to_dict(self.config),
                              started=self.started, device=self.device, dtype=self.dtype)
        print(f"val top-1 {result.value:.2f} -> {append_result(result, run.results)}", flush=True)
        self.writer.close()
        print(f"encoder: {path}\ncost: {json.dumps(cost)}", flush=True)
        return path


def parse_args(argv: list[str] | None = None) -> SupervisedConfig:
    # ckpt and which are the evaluation runs' fields; --arch is both a run field and the recipe's.
    parser = config_parser(SupervisedConfig, PROG, __doc__, PRESETS, EMBEDDED,
                           skip={"ckpt", "which", "arch", "tags"})
    parser.add_argument("--arch", help="the backbone to train (default: the preset's)")
    config = parse_config(SupervisedConfig, argv, prog=PROG, presets=PRESETS, default_preset=DEFAULT_PRESET,
                          embedded=EMBEDDED, parser=parser)
    return resolve(config)


def main(argv: list[str] | None = None) -> int:
    return exit_status(lambda: SupervisedTrainer(parse_args(argv)).train())


def trivial_baseline(dataset: SeededLabelled) -> float:
    """Top-1 (%) of always answering the most frequent val class: what "above chance" is measured against."""
    counts = np.bincount([label for _, label in dataset.folder.samples])
    return 100 * counts.max() / counts.sum()

