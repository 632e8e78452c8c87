"""End-to-end fine-tuning of a pretrained backbone with a classifier head, and MAE's frozen-backbone LARS probe:
one loop.

``python transfer/run.py <dataset> --protocol finetune`` and ``--protocol linear-lars`` run through here. How a
run trains is its :class:`FinetuneRecipe`; the named presets below (``--preset``, derived from MAE's fine-tuning
recipe with ``dataclasses.replace``) are the data that tells the protocols apart:

- ``imagenet``: the MAE fine-tuning recipe for ViT-B (He et al. 2022, appendix A.3), the base of the others.
  Augmentation, mixup and the soft-target loss are timm's. ``imagenet-vitl`` / ``imagenet-vith``: MAE's ViT-L / ViT-H
  recipes (FINETUNE.md), the default for a checkpoint of that size; ``imagenet-rcmae-vitl``: the RC-MAE release's
  ViT-L script, by name.
- ``transfer``: the small transfer sets. MAE's optimiser and schedule without ImageNet's heavy regularisation;
  the learning rate and weight decay are chosen on val from a small grid (``transfer/classification.py``).
- ``imagenet-linear``: MAE's linear probe (appendix A.4): frozen backbone, BatchNorm without affine before the
  linear head, LARS, the lr to 0; ``imagenet-linear-50ep`` for ViT-L / ViT-H. The default protocol on ImageNet.
- ``ericsson``: Ericsson et al., "How Well Do Self-Supervised Models Transfer?", CVPR 2021 (linusericsson/
  ssl-transfer, finetune.py), the protocol of the ResNet rows of the MixedAE transfer table: SGD with Nesterov
  momentum 0.9 on every parameter, 5000 steps of batch 64, cosine to 0 without warmup, lr and weight decay chosen
  on val from their grid, RandomResizedCrop + flip for training, resize + centre crop for evaluation.
- ``embedded``: the CPU demo on the bundled digits (16x16 inputs, 5 epochs).

Runs on a CPU, one GPU, or many under ``torchrun`` (DDP; NCCL on GPU, gloo on CPU), in the precision the run
chose (``mimbench.core.runtime``). The run keeps ``checkpoint.pth`` (written atomically after every epoch) and
resumes from it; a finished run leaves ``result.json`` and is not repeated. A non-finite loss stops the run and
keeps the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD
from timm.data import Mixup, create_transform
from timm.loss import SoftTargetCrossEntropy
from timm.optim import Lars
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm import tqdm

from mimbench.backbones.checkpoint import backbone_from_checkpoint
from mimbench.backbones.contract import backbone_contract
from mimbench.backbones.layer_decay import layer_decay_param_groups
from mimbench.core.errors import ConfigError, TrainingDiverged
from mimbench.core.io import atomic_write
from mimbench.core.runtime import (
    Distributed,
    autocast,
    finite_on_all_ranks,
    learning_rate,
    peak_memory_gb,
    precision_name,
)
from mimbench.transfer.metrics import score


@dataclass(frozen=True)
class FinetuneRecipe:
    """How a classification run trains: the ``recipe`` of its configuration. The defaults are MAE's ImageNet
    fine-tuning of ViT-B (He et al. 2022, appendix A.3, Table 9), the base every preset is derived from."""

    epochs: int = 100
    warmup_epochs: float = 5
    batch_size: int = 128  # per process (MAE: 1024 in all)
    total_batch_size: int | None = 1024  # if set, gradient accumulation makes up the rest
    base_lr: float = 5e-4  # lr = base_lr * effective batch / 256, then half-cycle cosine to min_lr
    min_lr: float = 1e-6  # MAE main_finetune.py's default
    weight_decay: float = 0.05
    layer_decay: float = 0.65
    drop_path: float = 0.1
    global_pool: str = "avg"  # "avg" (global average pool + norm, MAE fine-tuning) or "token" (a ViT's class token)
    image_size: int | None = None  # None: the backbone's own input size
    eval_crop_ratio: float = 0.875  # eval: resize to image_size / ratio, centre crop image_size (256 -> 224)
    min_crop_scale: float = 0.08  # RandomResizedCrop scale range (min, 1)
    hflip: float = 0.5  # probability of a horizontal flip (0 for digits and text, which mirroring changes)
    label_smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    randaugment: str | None = "rand-m9-mstd0.5-inc1"  # timm auto-augment spec: RandAugment (9, 0.5)
    random_erasing: float = 0.25
    frozen_backbone: bool = False  # train only a BatchNorm (no affine) + linear head on the pooled features
    optimizer: str = "adamw"  # "adamw" | "lars" | "sgd-nesterov" (momentum 0.9, weight decay on every parameter)
    steps: int | None = None  # a budget of optimizer steps instead of epochs (the schedule runs over it)
    lr_batch_scaling: bool = True  # lr = base_lr * effective batch / 256; False: lr = base_lr
    # Data-loading processes per training process (MAE's default). A fixed number, not the machine's count
    # (core.runtime.loader_workers): each worker draws the augmentations of its own batches from its own seed, so
    # the count is part of what a run computes.
    num_workers: int = 10
    # Base lrs and weight decays tried on val (train -> val), the best pair retrained on trainval; empty: base_lr
    # (weight_decay) alone. An explicit --base-lr (--weight-decay) on the command line is that one value.
    lr_grid: tuple[float, ...] = ()
    wd_grid: tuple[float, ...] = ()
    wd_over_lr: bool = False  # each wd_grid value is divided by the lr it is paired with (Ericsson et al.'s grid)


# MAE's ImageNet fine-tuning recipe as it stands (the field defaults above): no grid, as the paper's fixed values.
MAE_FINETUNE = FinetuneRecipe()
# MAE's FINETUNE.md per size: ViT-L 50 epochs, blr 1e-3, layer decay 0.75, drop path 0.2; ViT-H the same with drop
# path 0.3 (batch 1024 for every size).
MAE_FINETUNE_L = replace(MAE_FINETUNE, epochs=50, base_lr=1e-3, layer_decay=0.75, drop_path=0.2)
MAE_FINETUNE_H = replace(MAE_FINETUNE_L, drop_path=0.3)
# The RC-MAE release's ViT-L fine-tuning (scripts/finetune_rc_mae_large.sh): MAE's ViT-B schedule (100 epochs, blr
# 5e-4, layer decay 0.65) with drop path 0.2, batch 64 x 2 accumulation x 8 GPUs = 1024.
RCMAE_FINETUNE_L = replace(MAE_FINETUNE, drop_path=0.2)

# The transfer sets (ours): MAE's optimiser, schedule and layer decay at batch 64 without ImageNet's RandAugment,
# mixup, cutmix and random erasing (a few thousand images per set); lr and weight decay chosen on val from this
# grid around MAE's values, as Kornblith et al. 2019 choose the probe's regulariser.
TRANSFER = replace(MAE_FINETUNE, batch_size=64, total_batch_size=None, randaugment=None, mixup=0.0, cutmix=0.0,
                   random_erasing=0.0, num_workers=4, lr_grid=(2.5e-4, 5e-4, 1e-3), wd_grid=(0.05, 0.3))

# He et al. 2022 (MAE), appendix A.4, Table 10: the linear probe. 90 epochs (10 warmup), batch 16384 (512 per
# process, or accumulation), LARS with base lr 0.1, no weight decay, the class token, BatchNorm without affine
# before the linear head; augmentation is RandomResizedCrop + flip only, no drop path, no label smoothing.
IMAGENET_LINEAR = replace(MAE_FINETUNE, epochs=90, warmup_epochs=10, batch_size=512, total_batch_size=16384,
                          base_lr=0.1, min_lr=0.0, weight_decay=0.0, layer_decay=1.0, drop_path=0.0,
                          global_pool="token", randaugment=None, mixup=0.0, cutmix=0.0, label_smoothing=0.0,
                          random_erasing=0.0, frozen_backbone=True, optimizer="lars")
# ViT-L and ViT-H: "It is sufficient to train 50 epochs" (MAE's FINETUNE.md, linear probing).
IMAGENET_LINEAR_50EP = replace(IMAGENET_LINEAR, epochs=50)

# The CPU demo on the bundled 8x8 digits (ours): 16x16 inputs (16 tokens instead of 64 keep it to a minute), 5
# epochs (1 warmup), no drop path, mild crops (scale 0.8-1), no flips (mirroring changes a digit), no eval crop,
# layer decay 0.75 for a 12-block ViT-Tiny, in-process loading; lr chosen on val from 3e-3 and 1e-2.
EMBEDDED = replace(TRANSFER, epochs=5, warmup_epochs=1, base_lr=1e-2, layer_decay=0.75, drop_path=0.0,
                   min_crop_scale=0.8, hflip=0.0, image_size=16, eval_crop_ratio=1.0, num_workers=0,
                   lr_grid=(3e-3, 1e-2), wd_grid=(0.05,))

# Ericsson et al. 2021 (linusericsson/ssl-transfer finetune.py): SGD, momentum 0.9, Nesterov, weight decay on every
# parameter, CosineAnnealingLR over 5000 steps (no warmup, to 0), batch 64; lr in logspace(-4, -1, 4) and weight
# decay w / lr for w in {0} + logspace(-6, -3, 4), chosen on val, then trainval -> test; RandomResizedCrop (scale
# 0.08-1, bicubic) + flip, evaluation resize + centre crop at the input size; no label smoothing, mixup or
# RandAugment. Theirs is a ResNet (no drop path, no layer decay); the head's init is ours (MAE's).
ERICSSON = replace(MAE_FINETUNE, steps=5000, warmup_epochs=0, batch_size=64, total_batch_size=None, min_lr=0.0,
                   layer_decay=1.0, drop_path=0.0, eval_crop_ratio=1.0, label_smoothing=0.0, mixup=0.0, cutmix=0.0,
                   randaugment=None, random_erasing=0.0, optimizer="sgd-nesterov", lr_batch_scaling=False,
                   num_workers=4, lr_grid=(0.1, 0.01, 0.001, 0.0001), wd_grid=(0.0, 1e-6, 1e-5, 1e-4, 1e-3),
                   wd_over_lr=True)

PRESETS: dict[str, FinetuneRecipe] = {"imagenet": MAE_FINETUNE, "imagenet-vitl": MAE_FINETUNE_L,
                                      "imagenet-vith": MAE_FINETUNE_H, "imagenet-rcmae-vitl": RCMAE_FINETUNE_L,
                                      "transfer": TRANSFER, "imagenet-linear": IMAGENET_LINEAR,
                                      "imagenet-linear-50ep": IMAGENET_LINEAR_50EP, "embedded": EMBEDDED,
                                      "ericsson": ERICSSON}


def train_transform(recipe: FinetuneRecipe, image_size: int) -> Callable:
    return create_transform(image_size, is_training=True, scale=(recipe.min_crop_scale, 1.0), hflip=recipe.hflip,
                            color_jitter=None, auto_augment=recipe.randaugment, interpolation="bicubic",
                            re_prob=recipe.random_erasing, re_mode="pixel", re_count=1,
                            mean=IMAGENET_MEAN, std=IMAGENET_STD)


def eval_transform(recipe: FinetuneRecipe, image_size: int) -> Callable:
    return create_transform(image_size, is_training=False, crop_pct=recipe.eval_crop_ratio,
                            interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD)


def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Independent binary losses per class; targets of -1 ("difficult" in VOC) are left out."""
    known = targets >= 0
    losses = F.binary_cross_entropy_with_logits(logits, targets.clamp(min=0).to(logits.dtype), reduction="none")
    return (losses * known).sum() / known.sum().clamp(min=1)


def input_size(model: nn.Module) -> int:
    """The side a backbone is built for: a ViT's fixed patch grid, else its timm configuration's input size (a
    hierarchical backbone takes any size; this is the one it was designed at)."""
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None:
        return patch_embed.img_size[0]
    return model.pretrained_cfg["input_size"][-1]


def classifier_name(model: nn.Module) -> str:
    """The attribute that holds the model's classification head (``head`` in a ViT, ``fc`` in a ResNet)."""
    classifier = model.get_classifier()
    return next(name for name, child in model.named_children() if child is classifier)


def build_classifier(checkpoint: str, num_classes: int, recipe: FinetuneRecipe, seed: int, arch: str | None = None,
                     which: str = "teacher") -> tuple[nn.Module, Any]:
    """The checkpoint's backbone with a fresh head (MAE: trunc-normal std 2e-5); frozen + BN head for the LARS probe."""
    model, report = backbone_from_checkpoint(checkpoint, arch=arch, which=which, num_classes=num_classes,
                                             global_pool=recipe.global_pool, drop_path_rate=recipe.drop_path,
                                             **({"img_size": recipe.image_size} if recipe.image_size else {}))
    head = model.get_classifier()
    # The head is the only random init: drawn from the seed, so a run with a fixed seed repeats exactly.
    nn.init.trunc_normal_(head.weight, std=2e-5 if not recipe.frozen_backbone else 0.01,
                          generator=torch.Generator().manual_seed(seed))
    nn.init.zeros_(head.bias)
    if recipe.frozen_backbone:
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        head = nn.Sequential(nn.BatchNorm1d(model.num_features, affine=False, eps=1e-6), head)
        setattr(model, classifier_name(model), head)
        for parameter in head.parameters():
            parameter.requires_grad_(True)
    return model, report


class FinetuneRun:
    """One training run: ``train`` on a dataset, ``evaluate`` on another, resumable in ``out``.

    ``seed`` draws the sampler's order and each epoch's augmentation; ``dtype`` is the autocast dtype (None: fp32).
    """

    def __init__(self, recipe: FinetuneRecipe, model: nn.Module, train_set: Dataset, eval_set: Dataset,
                 metric: str, multilabel: bool, out: str | Path, distributed: Distributed, *, num_classes: int,
                 seed: int = 0, dtype: torch.dtype | None = None, collate_fn: Callable | None = None) -> None:
        self.recipe, self.metric, self.multilabel = recipe, metric, multilabel
        self.out, self.dist, self.device = Path(out), distributed, distributed.device
        self.seed, self.dtype, self.num_classes = seed, dtype, num_classes
        self.collate_fn = collate_fn
        self.train_set, self.eval_set = train_set, eval_set
        self.model = model.to(self.device)
        self.head = model.get_classifier()

        world = distributed.world_size
        per_step = recipe.batch_size * world
        total = recipe.total_batch_size or per_step
        if total % per_step:
            raise ConfigError(f"total batch {total} is not a multiple of batch {recipe.batch_size} x {world} "
                              "processes")
        self.accum_steps = total // per_step
        self.peak_lr = recipe.base_lr * total / 256 if recipe.lr_batch_scaling else recipe.base_lr
        self.sampler = DistributedSampler(train_set, num_replicas=world, rank=distributed.rank, shuffle=True,
                                          seed=seed, drop_last=True)
        self.loader = DataLoader(train_set, batch_size=recipe.batch_size, sampler=self.sampler, drop_last=True,
                                 num_workers=recipe.num_workers, collate_fn=collate_fn,
                                 pin_memory=self.device.type == "cuda", persistent_workers=recipe.num_workers > 0)
        self.steps_per_epoch = max(len(self.loader) // self.accum_steps, 1)
        if len(self.loader) == 0:
            raise ConfigError(f"{len(train_set)} training images cannot fill one batch of {recipe.batch_size} "
                              f"on {world} process(es); lower --batch-size")
        # A step budget: as many epochs as it needs (the last one cut short), the schedule over the budget.
        self.schedule, self.epochs = recipe, recipe.epochs
        if recipe.steps:
            self.epochs = -(-recipe.steps // self.steps_per_epoch)
            self.schedule = replace(recipe, epochs=recipe.steps / self.steps_per_epoch)

        self.optimizer = self._optimizer()
        self.mixup = None
        if recipe.mixup > 0 or recipe.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix,
                               label_smoothing=recipe.label_smoothing, num_classes=num_classes)
        self.ddp = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda"
                                           else None) if world > 1 else self.model
        self.epoch, self.history, self.wall_seconds = 0, [], 0.0

    def _optimizer(self) -> torch.optim.Optimizer:
        recipe = self.recipe
        if recipe.optimizer == "lars":
            # MAE's LARS: matrices get weight decay and the trust ratio (whatever the decay), vectors neither.
            trained = [p for p in self.model.parameters() if p.requires_grad]
            groups = [{"params": [p for p in trained if p.ndim > 1], "lr_scale": 1.0, "always_adapt": True},
                      {"params": [p for p in trained if p.ndim <= 1], "lr_scale": 1.0, "weight_decay": 0.0}]
            return Lars(groups, lr=self.peak_lr, momentum=0.9, weight_decay=recipe.weight_decay)
        if recipe.frozen_backbone:
            groups = [{"params": [p for p in self.model.parameters() if p.requires_grad], "lr_scale": 1.0}]
        else:
            groups = layer_decay_param_groups(self.model, backbone_contract(self.model), recipe.weight_decay,
                                              recipe.layer_decay)
        if recipe.optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=self.peak_lr)
        if recipe.optimizer == "sgd-nesterov":  # Ericsson et al.: one group, weight decay on every parameter
            trained = [p for p in self.model.parameters() if p.requires_grad]
            return torch.optim.SGD([{"params": trained, "lr_scale": 1.0}], lr=self.peak_lr, momentum=0.9,
                                   nesterov=True, weight_decay=recipe.weight_decay)
        raise ConfigError(f"unknown optimizer {recipe.optimizer!r}; choose adamw, lars or sgd-nesterov")

    # ---------------------------------------------------------------------------------- state on disk

    def settings(self) -> dict[str, Any]:
        """What decides the run's numbers, stored with its checkpoint and result: a resume must match them."""
        # Loader workers change no number; the grid is the caller's (this run trains one of its points).
        recipe = {k: v for k, v in asdict(self.recipe).items()
                  if k not in ("num_workers", "lr_grid", "wd_grid", "wd_over_lr")}
        return {**recipe, "seed": self.seed, "precision": precision_name(self.dtype)}

    def save(self) -> None:
        if not self.dist.is_main:
            return
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "epoch": self.epoch,
                 "history": self.history, "wall_seconds": self.wall_seconds, "config": self.settings()}
        atomic_write(self.out / "checkpoint.pth", lambda tmp: torch.save(state, tmp))

    def resume(self) -> bool:
        path = self.out / "checkpoint.pth"
        if not path.exists():
            return False
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state["config"] != self.settings():
            raise ConfigError(f"{path}: written with another configuration; use another --out or delete it")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.history, self.wall_seconds = state["epoch"], state["history"], state["wall_seconds"]
        return True

    # ------------------------------------------------------------------------------------- training

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.multilabel:
            return masked_bce(logits, targets)
        if self.mixup is not None:
            return SoftTargetCrossEntropy()(logits, targets)
        return F.cross_entropy(logits, targets, label_smoothing=self.recipe.label_smoothing)

    def train(self, progress: bool = True) -> dict[str, Any]:
        """Train to the last epoch (resuming if a checkpoint is there) and evaluate; returns the result."""
        done = self.out / "result.json"
        if done.exists():
            result = json.loads(done.read_text())
            if result.get("config") != self.settings():
                raise ConfigError(f"{done}: a finished run with another configuration; use another --out or delete it")
            return result
        self.resume()
        while self.epoch < self.epochs:
            started = time.perf_counter()
            train_loss = self.train_epoch(progress)
            evaluation = self.evaluate()
            self.wall_seconds += time.perf_counter() - started
            self.epoch += 1
            self.history.append({"epoch": self.epoch, "train_loss": train_loss, self.metric: evaluation})
            if self.dist.is_main and progress:
                print(f"epoch {self.epoch}/{self.epochs}: loss {train_loss:.4f}, {self.metric} {evaluation:.2f}",
                      flush=True)
            self.save()
        result = {"score": self.history[-1][self.metric], "metric": self.metric, "history": self.history,
                  "wall_time_s": round(self.wall_seconds, 1), "peak_memory_gb": round(peak_memory_gb(self.device), 3),
                  "effective_batch": self.recipe.batch_size * self.dist.world_size * self.accum_steps,
                  "peak_lr": self.peak_lr, "config": self.settings()}
        if self.dist.is_main:
            atomic_write(done, lambda tmp: tmp.write_text(json.dumps(result, indent=1) + "\n"))
        return result

    def train_epoch(self, progress: bool) -> float:
        recipe = self.recipe
        self.model.train()
        if recipe.frozen_backbone:  # frozen means frozen: no dropout / drop path, no BatchNorm outside the head
            self.model.eval()
            self.head.train()
        self.sampler.set_epoch(self.epoch)
        # Augmentation (timm's crops draw from Python's random), mixup and drop path: a function of (seed, epoch),
        # so a resumed run repeats exactly what an uninterrupted one does. DataLoader workers derive their seeds
        # from torch's generator.
        epoch_seed = self.seed * 1000 + self.epoch
        torch.manual_seed(epoch_seed)
        random.seed(epoch_seed)
        np.random.seed(epoch_seed)
        losses = []
        bar = tqdm(self.loader, desc=f"epoch {self.epoch + 1}", disable=not (progress and self.dist.is_main),
                   leave=False)
        for index, batch in enumerate(bar):
            if batch is None:
                continue
            images, targets = (t.to(self.device, non_blocking=True) for t in batch)
            if self.mixup is not None:
                if len(images) % 2:  # timm's mixup pairs images; an odd batch only follows a skipped image
                    images, targets = images[:-1], targets[:-1]
                images, targets = self.mixup(images, targets)
            step = self.epoch * self.steps_per_epoch + index // self.accum_steps
            if recipe.steps and step >= recipe.steps:
                break
            lr = learning_rate(step / self.steps_per_epoch, self.schedule, self.peak_lr)
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            boundary = (index + 1) % self.accum_steps == 0
            sync = contextlib.nullcontext() if boundary or self.ddp is self.model else self.ddp.no_sync()
            with sync:
                with autocast(self.device, self.dtype):
                    loss = self.loss(self.ddp(images), targets)
                if not finite_on_all_ranks(loss, self.dist.world_size):
                    raise TrainingDiverged(f"loss is {loss.item()} at epoch {self.epoch + 1}, batch {index}; "
                                           f"{self.out / 'checkpoint.pth'} holds the last good epoch")
                (loss / self.accum_steps).backward()
            if boundary:
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.4f}")
        self.optimizer.zero_grad(set_to_none=True)
        return sum(losses) / max(len(losses), 1)

    @torch.inference_mode()
    def predict(self, dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and targets of every readable image of ``dataset`` (each process scores its shard)."""
        self.model.eval()
        shard = Subset(dataset, range(self.dist.rank, len(dataset), self.dist.world_size))
        loader = DataLoader(shard, batch_size=self.recipe.batch_size * 2, num_workers=self.recipe.num_workers,
                            collate_fn=self.collate_fn)
        scores, targets = [], []
        for batch in loader:
            if batch is None:
                continue
            images, labels = batch
            with autocast(self.device, self.dtype):
                scores.append(self.model(images.to(self.device)).float().cpu())
            targets.append(torch.as_tensor(labels))
        scores = torch.cat(scores) if scores else torch.empty(0, self.num_classes)
        targets = torch.cat(targets) if targets else torch.empty(0, dtype=torch.long)
        if self.dist.world_size > 1:
            gathered: list[Any] = [None] * self.dist.world_size
            dist.all_gather_object(gathered, (scores, targets))
            scores = torch.cat([s for s, _ in gathered])
            targets = torch.cat([t for _, t in gathered])
        return scores, targets

    def evaluate(self) -> float:
        scores, targets = self.predict(self.eval_set)
        return score(self.metric, scores, targets)
