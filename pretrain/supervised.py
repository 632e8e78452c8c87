"""Supervised pretraining with labels: the DeiT recipe (Touvron et al., "Training data-efficient image transformers
& distillation through attention", ICML 2021), which MPViT trains with too (its main.py defaults).

    python pretrain/run.py --method supervised --data-root /imagenet --arch mpvit_small --out runs/deit-mpvit-s
    python pretrain/run.py --method supervised --embedded --out runs/demo-supervised   # digits, CPU, minutes

Any backbone of :func:`~mimbench.backbones.vit.create_backbone` (ViTs, MPViTs, resnet18) with a linear head.
Data: ImageNet's layout, ``<root>/train/<class>/<image>`` and ``<root>/val/<class>/<image>``; top-1 on val is
measured after every epoch. timm's augmentation (RandAugment, random erasing), Mixup/CutMix and soft-target loss;
repeated augmentation (each image ``repeated_augmentation`` times per epoch, DeiT's RASampler, with one third
of the images per epoch). It runs on the pretraining engine (`SupervisedTrainer` is a
`mimbench.pretrain.engine.Trainer`), so DDP, accumulation, bf16, exact resume (every random draw a function of the
seed and the micro-batch or sample), TensorBoard, progress, cost, the non-finite stop and the run lock are the
engine's.
The headless backbone is exported with metadata ``method: supervised``, and the final val top-1 is appended to the
results store (task classification, protocol supervised; dataset ``imagenet``, or ``digits-embedded``).
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_weight_decay
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder

from mimbench.backbones.cli import backbone_size
from mimbench.backbones.contract import backbone_contract
from mimbench.backbones.vit import backbone_archs, create_backbone
from mimbench.core.config import (
    Embedded,
    RunSpec,
    config_parser,
    exit_status,
    from_dict,
    parse_config,
    print_config,
    protocol_id,
    to_dict,
    wants_printed_config,
)
from mimbench.core.errors import ConfigError, DatasetError
from mimbench.core.io import atomic_write, file_sha256
from mimbench.core.record import append_result, build_result
from mimbench.core.rundir import read_config
from mimbench.core.runtime import autocast, loader_workers
from mimbench.pretrain.data import IMAGENET_MEAN, IMAGENET_STD, UNREADABLE_ERRORS, sample_seed
from mimbench.pretrain.engine import HARMLESS_ON_RESUME, Trainer

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
    batch_size: int = 128  # per process (DeiT; MPViT's training commands)
    # The batch of one optimizer step over all processes, reached by accumulation (DeiT: 128 x 8 GPUs = 1024); None:
    # batch size x processes x accum_steps.
    total_batch_size: int | None = 1024
    accum_steps: int = 1  # micro-batches per step where total_batch_size is None (else derived from it)
    base_lr: float = 5e-4  # lr = base_lr * effective batch / 512
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    drop_path_rate: float | None = None  # None: DROP_PATH's value for the arch
    label_smoothing: float = 0.1
    auto_augment: str = "rand-m9-mstd0.5-inc1"  # a timm policy string (rand-…, augmix-…, original, v0, …); "none": off
    random_erasing: float = 0.25  # in timm's "pixel" mode, one erased box (DeiT's --remode pixel --recount 1)
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop's area range (timm's and DeiT's default)
    hflip: float = 0.5  # horizontal flip probability (timm's default; a flipped digit is another glyph)
    mixup: float = 0.8
    cutmix: float = 1.0
    # Validation: resize to img_size / ratio, centre crop img_size (DeiT's datasets.py: resize 256, crop 224).
    eval_crop_ratio: float = 0.875
    repeated_augmentation: int = 3  # copies of an image per epoch (DeiT's RASampler); 1: off
    # Loader processes: this machine's CPUs (core.runtime.loader_workers); sample i of epoch e is augmented from
    # (seed, e, i) alone, so the count changes no number.
    num_workers: int = loader_workers()
    save_every_steps: int = 1000
    keep_checkpoints: int = 2
    compile: str = "auto"  # auto | on | off (the engine's compile_wanted)


BASE = SupervisedRecipe()
PRESETS: dict[str, SupervisedRecipe] = {
    "deit_in1k": BASE,
    # The embedded digits on a CPU in a few minutes: the CPU-sized MPViT at 32², 12 epochs at 32 x the lr (peak
    # 2e-3 at batch 64), no repeated augmentation, lighter mixing and RandAugment for 8 x 8 digits upsampled.
    "embedded_cpu": dataclasses.replace(
        BASE, arch="mpvit_nano_cpu", img_size=32, epochs=12, warmup_epochs=1, batch_size=64, base_lr=BASE.base_lr * 32,
        min_lr=1e-5, auto_augment="rand-m5-mstd0.5-inc1", mixup=0.2, cutmix=0.0, random_erasing=0.0,
        repeated_augmentation=1, num_workers=0, save_every_steps=20, total_batch_size=None,
        eval_crop_ratio=1.0),  # the whole 8 x 8 digit
}
# The demo's and the landscape study's small ViT on the same digits (ours, measured on them: at embedded_cpu's peak
# lr of 2e-3 a ViT from scratch stays at chance for 4 epochs; at 5e-4 with whole digits — crops of 60-100% of the
# image, no flips, no RandAugment or mixup — it reaches ~24% val top-1 in 2 epochs).
PRESETS["embedded_cpu_vit"] = dataclasses.replace(
    PRESETS["embedded_cpu"], arch="vit_tiny_patch4_32", base_lr=BASE.base_lr * 8, auto_augment="none", mixup=0.0,
    crop_scale=(0.6, 1.0), hflip=0.0)
DEFAULT_PRESET = "deit_in1k"
# Recipe fields that decide no number: left out when a run's protocol is compared with its preset's.
BOOKKEEPING = ("num_workers", "save_every_steps", "keep_checkpoints", "compile")
# The protocol each preset measures under (the val top-1 record's protocol_id).
PROTOCOLS = {"deit_in1k": "deit", "embedded_cpu": "digits-supervised-cpu", "embedded_cpu_vit": "digits-supervised-cpu"}


@dataclass
class SupervisedConfig:
    run: RunSpec = field(default_factory=lambda: RunSpec(method="supervised", out="runs/supervised"))
    preset: str = DEFAULT_PRESET
    recipe: SupervisedRecipe = BASE
    max_bad_image_share: float = 0.01  # the run stops when more of its image files than this are unreadable


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
    ``repeats`` > 1 an epoch holds 1/repeats of the images, each ``repeats`` times (repeated augmentation).
    A sample is ``(image, label, unreadable)`` as the engine's loader wants it: an unreadable file is skipped with
    a warning and the next readable one (in the epoch's order) stands in with its label, ``unreadable`` its index
    (else -1)."""

    def __init__(self, folder: ImageFolder, transform: Any, seed: int, repeats: int = 1, description: str = "") -> None:
        self.folder, self.transform, self.seed, self.repeats = folder, transform, seed, repeats
        self.description = description  # what the export metadata's ``data`` says
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        order = torch.randperm(len(self.folder), generator=torch.Generator().manual_seed(self.seed + epoch))
        self.order = order[: len(self.folder) // self.repeats].repeat_interleave(self.repeats)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        for offset in range(len(self)):
            path, label = self.folder.samples[int(self.order[(index + offset) % len(self)])]
            try:
                with Image.open(path) as file:
                    image = file.convert("RGB")
            except UNREADABLE_ERRORS as error:
                if not offset:
                    warnings.warn(f"{path}: cannot read image ({error}); skipped", stacklevel=2)
                continue
            seed = sample_seed(self.seed, self.epoch, index)
            random.seed(seed)
            torch.manual_seed(seed)
            np.random.seed(seed % 2 ** 32)
            return self.transform(image), label, index if offset else -1
        raise DatasetError(f"none of the {len(self)} images of {self.description} is readable")


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


def train_transform(recipe: SupervisedRecipe) -> Callable:
    """DeiT's training augmentation through timm: RandomResizedCrop (bicubic) and flip, RandAugment, random erasing
    in "pixel" mode with one box (DeiT's --remode pixel --recount 1)."""
    try:  # timm asserts on an unknown policy deep inside its transform builder
        return create_transform(
            recipe.img_size, is_training=True, scale=tuple(recipe.crop_scale), hflip=recipe.hflip,
            re_prob=recipe.random_erasing, re_mode="pixel", re_count=1, interpolation="bicubic",
            auto_augment=None if recipe.auto_augment == "none" else recipe.auto_augment,
            mean=IMAGENET_MEAN, std=IMAGENET_STD)
    except AssertionError as error:
        raise ConfigError(f"--auto-augment {recipe.auto_augment!r} is not a timm augmentation policy ({error}); "
                          "e.g. rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, original, or none") from None


def eval_transform(recipe: SupervisedRecipe) -> Callable:
    """DeiT's validation: resize the short side to img_size / eval_crop_ratio (bicubic), centre crop img_size."""
    return create_transform(recipe.img_size, crop_pct=recipe.eval_crop_ratio, interpolation="bicubic",
                            mean=IMAGENET_MEAN, std=IMAGENET_STD)


class SupervisedTrainer(Trainer):
    """The engine's loop (`mimbench.pretrain.engine.Trainer`: DDP, accumulation, bf16, exact resume, cost,
    TensorBoard, progress, the non-finite stop, the run lock) on labelled images: what differs is the data
    (train and val splits), the model (the backbone with a linear head), DeiT's optimizer groups, betas and lr
    scaling, the loss of a micro-batch (Mixup/CutMix, soft-target cross-entropy), val top-1 after every epoch and
    the export (the headless backbone, its val top-1, a record in the results store). The checkpoint's ``model``
    is the backbone-with-head's own state dict (``create_backbone(arch, num_classes=...)``)."""

    lr_reference_batch = 512  # DeiT: lr = 5e-4 * batch / 512
    betas = (0.9, 0.999)  # timm's create_optimizer default (DeiT, MPViT)
    harmless_on_resume = HARMLESS_ON_RESUME  # the engine's: how the machine runs it, not what it computes

    def __init__(self, config: SupervisedConfig) -> None:
        self.top1: list[float] = []  # val top-1 (%) after each epoch
        super().__init__(config)
        recipe = self.config.recipe
        mixing = recipe.mixup > 0 or recipe.cutmix > 0
        self.mixup = Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, label_smoothing=recipe.label_smoothing,
                           num_classes=self.num_classes) if mixing else None
        self.criterion = SoftTargetCrossEntropy() if mixing else LabelSmoothingCrossEntropy(recipe.label_smoothing)

    def resolve(self, config: SupervisedConfig) -> SupervisedConfig:
        return resolve(config)

    def build_dataset(self) -> SeededLabelled:
        run, recipe = self.config.run, self.config.recipe
        if run.data_root is None:
            raise ConfigError("--data-root is needed (ImageNet's layout), or --embedded")
        root = Path(run.data_root)
        train, val = image_folder(root, "train"), image_folder(root, "val")
        self.num_classes = len(train.classes)
        self.dataset_name = EMBEDDED_DATASET if (root / EMBEDDED_MARK).is_file() else "imagenet"
        description = f"{root} ({len(train)} train / {len(val)} val images, {self.num_classes} classes)"
        self.val_set = SeededLabelled(val, eval_transform(recipe), run.seed, description=f"{root}/val")
        return SeededLabelled(train, train_transform(recipe), run.seed, recipe.repeated_augmentation, description)

    def build_model(self) -> nn.Module:
        recipe = self.config.recipe
        return create_backbone(recipe.arch, num_classes=self.num_classes, drop_path_rate=recipe.drop_path_rate)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """timm's create_optimizer (DeiT, MPViT): no decay on 1-d tensors and the family's named tensors."""
        contract = backbone_contract(create_backbone(self.config.recipe.arch))
        no_decay = {name for name, p in self.model.named_parameters() if contract.no_weight_decay(name, p)}
        return param_groups_weight_decay(self.model, self.config.recipe.weight_decay, no_weight_decay_list=no_decay)

    def initialize(self) -> None:
        return None  # training with labels starts from scratch

    def micro_batch_loss(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        images, labels = images.to(self.device, non_blocking=True), labels.to(self.device)
        np.random.seed(torch.initial_seed() % 2 ** 32)  # timm's Mixup draws from numpy: the micro-batch's seed
        targets = labels
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)
        with autocast(self.device, self.dtype):
            return self.criterion(self.forward(images), targets), {}

    def finish_epoch(self, epoch: int) -> None:
        self.top1.append(self.evaluate())
        if self.dist.is_main:
            self.writer.add_scalar("pretrain/val_top1", self.top1[-1], self.step)
            print(f"epoch {epoch}: val top-1 {self.top1[-1]:.2f}%", flush=True)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Top-1 (%) on val, every process counting its share of the images."""
        self.model.eval()
        correct = torch.zeros(2, device=self.device)
        indices = range(self.dist.rank, len(self.val_set), self.dist.world_size)
        loader = DataLoader(torch.utils.data.Subset(self.val_set, list(indices)), batch_size=256,
                            num_workers=self.config.recipe.num_workers)
        for images, labels, _ in loader:
            with autocast(self.device, self.dtype):
                logits = self.model(images.to(self.device))
            correct += torch.tensor([(logits.argmax(1).cpu() == labels).sum().item(), len(labels)],
                                    device=self.device, dtype=correct.dtype)
        if self.dist.world_size > 1:
            torch.distributed.all_reduce(correct)
        self.model.train()
        return round(100 * correct[0].item() / max(correct[1].item(), 1), 4)

    def state(self) -> dict[str, Any]:
        return {**super().state(), "top1": self.top1}

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.top1 = list(state["top1"])

    def exported(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The headless backbone (the head's tensors left out) and the final val top-1."""
        head = {name for name, _ in self.model.named_parameters()} - set(
            create_backbone(self.config.recipe.arch).state_dict())
        return {k: v for k, v in self.model.state_dict().items() if k not in head}, {"val_top1": self.top1[-1:]}

    def export(self) -> Path:
        """The headless backbone with metadata (method supervised, arch, epochs, data, val top-1, cost), and the
        final val top-1 in the results store."""
        path = super().export()
        if self.dist.is_main:
            run = self.config.run
            result = build_result(task="classification", dataset=self.dataset_name, protocol="supervised",
                                  protocol_id=protocol_id(PROTOCOLS, self.config.preset, self.config.recipe,
                                                          PRESETS.get(self.config.preset), bookkeeping=BOOKKEEPING),
                                  metric="top1", metrics={"top1": self.top1[-1]}, checkpoint=path,
                                  metadata=self.metadata, sha256=file_sha256(path), method="supervised",
                                  arch=self.config.recipe.arch, seed=run.seed, config=to_dict(self.config),
                                  started=self.started, device=self.device, dtype=self.dtype,
                                  **backbone_size(self.config.recipe.arch))
            print(f"val top-1 {result.value:.2f} -> {append_result(result, run.results)}", flush=True)
        return path

    def train(self) -> Path:
        self.started = time.perf_counter()  # the record's wall time
        return super().train()


def parse_args(argv: list[str] | None = None) -> SupervisedConfig:
    # ckpt and which are the evaluation runs' fields; --arch is both a run field and the recipe's.
    parser = config_parser(SupervisedConfig, PROG, __doc__, PRESETS, EMBEDDED,
                           skip={"ckpt", "which", "arch", "tags"})
    parser.add_argument("--arch", help="the backbone to train (default: the preset's)")
    config = parse_config(SupervisedConfig, argv, prog=PROG, presets=PRESETS, default_preset=DEFAULT_PRESET,
                          embedded=EMBEDDED, parser=parser)
    return resolve(config)


def main(argv: list[str] | None = None) -> int:
    if wants_printed_config(argv):
        return exit_status(lambda: print_config(parse_args(argv)))
    return exit_status(lambda: SupervisedTrainer(parse_args(argv)).train())


def trivial_baseline(dataset: SeededLabelled) -> float:
    """Top-1 (%) of always answering the most frequent val class: what "above chance" is measured against."""
    counts = np.bincount([label for _, label in dataset.folder.samples])
    return 100 * counts.max() / counts.sum()



def read_supervised_checkpoint(state: dict[str, Any], path: Path) -> tuple[torch.nn.Module, SupervisedConfig] | None:
    """The classifier (backbone and head, in eval mode) and the run's configuration of a supervised run's resumable
    checkpoint ``path`` whose content is ``state``; None where it is another method's. The one place that knows the
    layout :meth:`SupervisedTrainer.state` writes: the weights are ``state["model"]``; the configuration is
    ``state["config"]`` (JSON, as the pretraining engine writes it) where present, else the run folder's config.yaml
    (``<run>/checkpoints/step_*.pth`` -> ``<run>/config.yaml``). The head's class count is that of the weights."""
    if "config" in state:
        saved = json.loads(state["config"])
    else:
        config_file = Path(path).resolve().parent.parent / "config.yaml"
        saved = read_config(config_file) if config_file.is_file() else {}
    if not isinstance(saved.get("run"), dict) or saved["run"].get("method") != "supervised":
        return None
    config = from_dict(SupervisedConfig, saved, f"{path} config")
    headless = set(create_backbone(config.recipe.arch).state_dict())
    head_weights = [v for k, v in state["model"].items() if k not in headless and v.ndim == 2]
    model = create_backbone(config.recipe.arch, num_classes=len(head_weights[-1]) if head_weights else 0)
    model.load_state_dict(state["model"])
    return model.eval(), config
