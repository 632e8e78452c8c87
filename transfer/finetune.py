"""End-to-end fine-tuning of a pretrained ViT classifier, and MAE's frozen-backbone LARS probe: one loop.

``python transfer/run.py <dataset> --protocol finetune`` and ``--protocol linear-lars`` run through here; the
recipes below are the data that tells them apart:

- ``transfer``: the small transfer sets. AdamW with layer-wise lr decay, RandomResizedCrop + flip, label
  smoothing, warmup + cosine; the learning rate and weight decay are chosen on val (``transfer/classification.py``).
- ``imagenet``: the MAE fine-tuning recipe for ViT-B (He et al. 2022, appendix A.3): 100 epochs, batch 1024, base lr
  5e-4 · batch/256, layer decay 0.65, wd 0.05, drop path 0.1, RandAugment (9, 0.5), mixup 0.8, cutmix 1.0,
  label smoothing 0.1, random erasing 0.25, global average pool + norm, 5 warmup epochs, eval resize 256 → crop 224.
  Augmentation, mixup and the soft-target loss are timm's.
- ``imagenet-linear``: MAE's linear probe (appendix A.4): frozen backbone, class token, BatchNorm without affine
  before the linear head, LARS, base lr 0.1 · batch/256, batch 16384, no weight decay, 90 epochs (10 warmup).
- ``embedded``: the CPU demo on the bundled digits (16x16 inputs, 5 epochs).

Runs on a CPU, one GPU, or many under ``torchrun`` (DDP; NCCL on GPU, gloo on CPU) with bf16 autocast where it
pays. The run keeps ``checkpoint.pth`` (written atomically after every epoch) and resumes from it; a finished
run leaves ``result.json`` and is not repeated. A non-finite loss stops the run and keeps the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from timm.data import Mixup, create_transform
from timm.loss import SoftTargetCrossEntropy
from timm.optim import Lars
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD
from tqdm import tqdm

from mimbench.backbones.checkpoint import backbone_from_checkpoint
from mimbench.backbones.layer_decay import layer_decay_param_groups
from mimbench.core.errors import TrainingDiverged
from mimbench.core.io import atomic_write
from mimbench.core.runtime import Distributed, autocast_dtype, finite_on_all_ranks, learning_rate, peak_memory_gb
from mimbench.transfer.metrics import score


@dataclass
class FinetuneConfig:
    epochs: int = 100
    warmup_epochs: float = 5
    batch_size: int = 64  # per process
    total_batch_size: int | None = None  # if set, gradient accumulation makes up the rest (MAE: 1024)
    base_lr: float = 5e-4  # lr = base_lr * effective batch / 256
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    layer_decay: float = 0.65
    drop_path: float = 0.1
    global_pool: str = "avg"  # "avg" (mean of patch tokens + norm, MAE fine-tuning) or "token"
    image_size: int | None = None  # None: the backbone's own input size
    eval_crop_ratio: float = 0.875  # eval: resize to image_size / ratio, centre crop image_size (256 -> 224)
    min_crop_scale: float = 0.08  # RandomResizedCrop scale range (min, 1)
    hflip: float = 0.5  # probability of a horizontal flip (0 for digits and text, which mirroring changes)
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    randaugment: str | None = None  # timm auto-augment spec, e.g. "rand-m9-mstd0.5-inc1"
    random_erasing: float = 0.0
    frozen_backbone: bool = False  # train only a BatchNorm (no affine) + linear head on the class token
    optimizer: str = "adamw"  # "adamw" | "lars"
    seed: int = 0
    num_workers: int = 4
    device: str | None = None  # None: cuda if available


RECIPES: dict[str, dict[str, Any]] = {
    "transfer": dict(epochs=100, warmup_epochs=5, batch_size=64, base_lr=5e-4, weight_decay=0.05, layer_decay=0.65,
                     drop_path=0.1, label_smoothing=0.1),
    "imagenet": dict(epochs=100, warmup_epochs=5, batch_size=128, total_batch_size=1024, base_lr=5e-4,
                     weight_decay=0.05, layer_decay=0.65, drop_path=0.1, randaugment="rand-m9-mstd0.5-inc1",
                     mixup=0.8, cutmix=1.0, label_smoothing=0.1, random_erasing=0.25, num_workers=10),
    "imagenet-linear": dict(epochs=90, warmup_epochs=10, batch_size=512, total_batch_size=16384, base_lr=0.1,
                            weight_decay=0.0, layer_decay=1.0, drop_path=0.0, global_pool="token",
                            label_smoothing=0.0, frozen_backbone=True, optimizer="lars", num_workers=10),
    # 8x8 digits need no more than 16x16 inputs: 16 tokens instead of 64 keep the CPU demo to a minute.
    "embedded": dict(epochs=5, warmup_epochs=1, batch_size=64, base_lr=1e-2, weight_decay=0.05, layer_decay=0.75,
                     drop_path=0.0, label_smoothing=0.1, min_crop_scale=0.8, hflip=0.0, image_size=16, eval_crop_ratio=1.0,
                     num_workers=0),
}


def train_transform(config: FinetuneConfig, image_size: int) -> Callable:
    return create_transform(image_size, is_training=True, scale=(config.min_crop_scale, 1.0), hflip=config.hflip,
                            color_jitter=None, auto_augment=config.randaugment, interpolation="bicubic",
                            re_prob=config.random_erasing, re_mode="pixel", re_count=1,
                            mean=IMAGENET_MEAN, std=IMAGENET_STD)


def eval_transform(config: FinetuneConfig, image_size: int) -> Callable:
    return create_transform(image_size, is_training=False, crop_pct=config.eval_crop_ratio,
                            interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD)


def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Independent binary losses per class; targets of -1 ("difficult" in VOC) are left out."""
    known = targets >= 0
    losses = F.binary_cross_entropy_with_logits(logits, targets.clamp(min=0).to(logits.dtype), reduction="none")
    return (losses * known).sum() / known.sum().clamp(min=1)


def build_classifier(checkpoint: str, num_classes: int, config: FinetuneConfig, arch: str | None = None
                     ) -> tuple[nn.Module, Any]:
    """The checkpoint's ViT with a fresh head (MAE: trunc-normal std 2e-5); frozen + BN head for the LARS probe."""
    model, report = backbone_from_checkpoint(checkpoint, arch=arch, num_classes=num_classes,
                                             global_pool=config.global_pool, drop_path_rate=config.drop_path,
                                             **({"img_size": config.image_size} if config.image_size else {}))
    # The head is the only random init: drawn from the seed, so a run with a fixed seed repeats exactly.
    nn.init.trunc_normal_(model.head.weight, std=2e-5 if not config.frozen_backbone else 0.01,
                          generator=torch.Generator().manual_seed(config.seed))
    nn.init.zeros_(model.head.bias)
    if config.frozen_backbone:
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        model.head = nn.Sequential(nn.BatchNorm1d(model.num_features, affine=False, eps=1e-6), model.head)
        for parameter in model.head.parameters():
            parameter.requires_grad_(True)
    return model, report


class FinetuneRun:
    """One training run: ``train`` on a dataset, ``evaluate`` on another, resumable in ``out``."""

    def __init__(self, config: FinetuneConfig, model: nn.Module, train_set: Dataset, eval_set: Dataset,
                 metric: str, multilabel: bool, out: str | Path, distributed: Distributed,
                 collate_fn: Callable | None = None) -> None:
        self.config, self.metric, self.multilabel = config, metric, multilabel
        self.out, self.dist, self.device = Path(out), distributed, distributed.device
        self.dtype = autocast_dtype(self.device)
        self.collate_fn = collate_fn
        self.train_set, self.eval_set = train_set, eval_set
        self.model = model.to(self.device)
        self.num_classes = model.head.out_features if isinstance(model.head, nn.Linear) else model.head[-1].out_features

        world = distributed.world_size
        per_step = config.batch_size * world
        total = config.total_batch_size or per_step
        if total % per_step:
            raise ValueError(f"total batch {total} is not a multiple of batch {config.batch_size} x {world} processes")
        self.accum_steps = total // per_step
        self.peak_lr = config.base_lr * total / 256
        self.sampler = DistributedSampler(train_set, num_replicas=world, rank=distributed.rank, shuffle=True,
                                          seed=config.seed, drop_last=True)
        self.loader = DataLoader(train_set, batch_size=config.batch_size, sampler=self.sampler, drop_last=True,
                                 num_workers=config.num_workers, collate_fn=collate_fn,
                                 pin_memory=self.device.type == "cuda", persistent_workers=config.num_workers > 0)
        self.steps_per_epoch = max(len(self.loader) // self.accum_steps, 1)
        if len(self.loader) == 0:
            raise ValueError(f"{len(train_set)} training images cannot fill one batch of {config.batch_size} "
                             f"on {world} process(es); lower --batch-size")

        self.optimizer = self._optimizer()
        self.mixup = None
        if config.mixup > 0 or config.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix,
                               label_smoothing=config.label_smoothing, num_classes=self.num_classes)
        self.ddp = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda"
                                           else None) if world > 1 else self.model
        self.epoch, self.history, self.wall_seconds = 0, [], 0.0

    def _optimizer(self) -> torch.optim.Optimizer:
        config = self.config
        if config.optimizer == "lars":
            # MAE's LARS: matrices get weight decay and the trust ratio (whatever the decay), vectors neither.
            trained = [p for p in self.model.parameters() if p.requires_grad]
            groups = [{"params": [p for p in trained if p.ndim > 1], "lr_scale": 1.0, "always_adapt": True},
                      {"params": [p for p in trained if p.ndim <= 1], "lr_scale": 1.0, "weight_decay": 0.0}]
            return Lars(groups, lr=self.peak_lr, momentum=0.9, weight_decay=config.weight_decay)
        if config.frozen_backbone:
            groups = [{"params": [p for p in self.model.parameters() if p.requires_grad], "lr_scale": 1.0}]
        else:
            groups = layer_decay_param_groups(self.model, len(self.model.blocks), config.weight_decay,
                                              config.layer_decay)
        if config.optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=self.peak_lr)
        raise ValueError(f"unknown optimizer {config.optimizer!r}; choose adamw or lars")

    # ---------------------------------------------------------------------------------- state on disk

    def save(self) -> None:
        if not self.dist.is_main:
            return
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "epoch": self.epoch,
                 "history": self.history, "wall_seconds": self.wall_seconds, "config": asdict(self.config)}
        atomic_write(self.out / "checkpoint.pth", lambda tmp: torch.save(state, tmp))

    def resume(self) -> bool:
        path = self.out / "checkpoint.pth"
        if not path.exists():
            return False
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state["config"] != asdict(self.config):
            raise ValueError(f"{path}: written with another configuration; use another --out or delete it")
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
        return F.cross_entropy(logits, targets, label_smoothing=self.config.label_smoothing)

    def train(self, progress: bool = True) -> dict[str, Any]:
        """Train to the last epoch (resuming if a checkpoint is there) and evaluate; returns the result."""
        done = self.out / "result.json"
        if done.exists():
            result = json.loads(done.read_text())
            if result.get("config") != asdict(self.config):
                raise ValueError(f"{done}: a finished run with another configuration; use another --out or delete it")
            return result
        self.resume()
        while self.epoch < self.config.epochs:
            started = time.perf_counter()
            train_loss = self.train_epoch(progress)
            evaluation = self.evaluate()
            self.wall_seconds += time.perf_counter() - started
            self.epoch += 1
            self.history.append({"epoch": self.epoch, "train_loss": train_loss, self.metric: evaluation})
            if self.dist.is_main and progress:
                print(f"epoch {self.epoch}/{self.config.epochs}: loss {train_loss:.4f}, {self.metric} {evaluation:.2f}",
                      flush=True)
            self.save()
        result = {"score": self.history[-1][self.metric], "metric": self.metric, "history": self.history,
                  "wall_time_s": round(self.wall_seconds, 1), "peak_memory_gb": round(peak_memory_gb(self.device), 3),
                  "effective_batch": self.config.batch_size * self.dist.world_size * self.accum_steps,
                  "peak_lr": self.peak_lr, "config": asdict(self.config)}
        if self.dist.is_main:
            atomic_write(done, lambda tmp: tmp.write_text(json.dumps(result, indent=1) + "\n"))
        return result

    def train_epoch(self, progress: bool) -> float:
        config = self.config
        self.model.train()
        if config.frozen_backbone:  # frozen means frozen: no dropout / drop path, no BatchNorm outside the head
            self.model.eval()
            self.model.head.train()
        self.sampler.set_epoch(self.epoch)
        # Augmentation (timm's crops draw from Python's random), mixup and drop path: a function of (seed, epoch),
        # so a resumed run repeats exactly what an uninterrupted one does. DataLoader workers derive their seeds
        # from torch's generator.
        epoch_seed = config.seed * 1000 + self.epoch
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
            for group in self.optimizer.param_groups:
                group["lr"] = learning_rate(step / self.steps_per_epoch, config, self.peak_lr) * group["lr_scale"]
            boundary = (index + 1) % self.accum_steps == 0
            sync = contextlib.nullcontext() if boundary or self.ddp is self.model else self.ddp.no_sync()
            with sync:
                with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
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
        loader = DataLoader(shard, batch_size=self.config.batch_size * 2, num_workers=self.config.num_workers,
                            collate_fn=self.collate_fn)
        scores, targets = [], []
        for batch in loader:
            if batch is None:
                continue
            images, labels = batch
            with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
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
