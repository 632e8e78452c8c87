"""The pretraining engine shared by MAE, RC-MAE and MixedAE: one loop, from a CPU to many GPUs.

A method is an ``nn.Module`` whose ``forward(images)`` returns ``(loss, parts)``; it may define
``after_optimizer_step(step, total_steps)`` (RC-MAE's EMA teacher), and defines ``visualize(images)`` and
``export_encoder()``. Everything else lives here:

- distributed: ``torchrun`` env:// with DDP (NCCL on GPU, gloo on CPU); only rank 0 writes;
- AdamW (β 0.9/0.95), lr = base_lr · effective batch / 256, per-step warmup + half-cycle cosine (MAE);
  gradient accumulation to reach a large effective batch on few GPUs; bf16 autocast where it pays
  (``mimbench.backbones.precision``); ``torch.compile`` on CUDA unless disabled;
- exact resume: the random state of every micro-batch is a pure function of (seed, micro-batch index) and
  augmentations of (seed, epoch, sample), so a checkpoint needs only model, optimizer, step and data position;
  checkpoints are written atomically, every N steps and at epoch end, keeping the last K;
- a non-finite loss stops the run with a clear message and leaves the last good checkpoint untouched;
- progress (tqdm), TensorBoard scalars, a reconstruction figure per epoch, and the run's cost.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.optim import param_groups_weight_decay
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torchvision.utils import save_image
from tqdm import tqdm

from mimbench.backbones.checkpoint import CheckpointMetadata, read_checkpoint, save_backbone
from mimbench.core.errors import TrainingDiverged
from mimbench.core.io import atomic_write, git_commit
from mimbench.core.runtime import (autocast_dtype, compute_settings, finite_on_all_ranks, init_distributed, learning_rate,
                                   peak_memory_gb, precision_name)
from mimbench.pretrain.data import IMAGENET_MEAN, IMAGENET_STD, ShardedSampler, build_pretrain_dataset
from mimbench.pretrain.mae import MAEConfig, MaskedAutoencoder
from mimbench.pretrain.mixedae import MixedAEConfig, MixedAutoencoder
from mimbench.pretrain.rcmae import RCMAEConfig, ReconstructionConsistentMAE


# Each method's config dataclass and model: what `--method` chooses between.
METHODS: dict[str, tuple[type, type[nn.Module]]] = {
    "mae": (MAEConfig, MaskedAutoencoder),
    "rcmae": (RCMAEConfig, ReconstructionConsistentMAE),
    "mixedae": (MixedAEConfig, MixedAutoencoder),
}


@dataclass
class PretrainConfig:
    method: str = "mae"
    arch: str = "vit_base_patch16_224"
    data_root: str | None = None
    embedded: bool = False
    out: str = "runs/pretrain"
    epochs: int = 300
    warmup_epochs: int = 40
    batch_size: int = 64  # per process
    accum_steps: int = 1
    base_lr: float = 1.5e-4  # lr = base_lr * effective batch / 256
    min_lr: float = 0.0
    weight_decay: float = 0.05
    seed: int = 0
    num_workers: int = 8
    samples_per_epoch: int = 2048  # embedded data only: random crops per epoch
    save_every_steps: int = 1000
    keep_checkpoints: int = 2
    compile: bool | None = None  # None: on CUDA only
    device: str | None = None  # None: cuda if available
    precision: str = "auto"  # auto | fp32 | bf16 (mimbench.core.runtime.autocast_dtype)
    method_options: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ small pieces


def micro_batch_seed(seed: int, micro_batch: int) -> int:
    """Seed of one micro-batch on one rank: masks, mixing and drop path are a function of it alone."""
    return (seed * 1_000_003 + micro_batch) % (2 ** 63)


def build_method(config: PretrainConfig) -> nn.Module:
    if config.method not in METHODS:
        raise ValueError(f"unknown method {config.method!r}; choose one of: {', '.join(METHODS)}")
    config_class, model_class = METHODS[config.method]
    return model_class(config_class(arch=config.arch, **config.method_options))


def checkpoint_paths(out: Path) -> list[Path]:
    """Resumable checkpoints in ``out/checkpoints``, oldest first."""
    paths = (out / "checkpoints").glob("step_*.pth")
    return sorted(paths, key=lambda p: int(re.search(r"step_(\d+)", p.name).group(1)))


def denormalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() * std + mean).clamp(0, 1)


# ------------------------------------------------------------------------------------------------ trainer


class Trainer:
    def __init__(self, config: PretrainConfig) -> None:
        self.config = config
        self.out = Path(config.out)
        self.dist = init_distributed(config.device)
        self.device = self.dist.device
        self.dtype = autocast_dtype(self.device, config.precision)

        torch.manual_seed(config.seed)  # identical initial weights on every rank
        self.model = build_method(config).to(self.device)
        self.dataset = build_pretrain_dataset(config.data_root, config.embedded, self.image_size, seed=config.seed,
                                              samples_per_epoch=config.samples_per_epoch)
        self.sampler = ShardedSampler(len(self.dataset), self.dist.world_size, self.dist.rank, seed=config.seed,
                                      batch_size=config.batch_size)
        self.steps_per_epoch = len(self.dataset) // self.dist.world_size // config.batch_size // config.accum_steps
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.dataset)} images cannot fill one step of batch {config.batch_size} x "
                             f"accumulation {config.accum_steps} x {self.dist.world_size} processes")
        self.total_steps = self.steps_per_epoch * config.epochs
        self.effective_batch = config.batch_size * config.accum_steps * self.dist.world_size
        self.peak_lr = config.base_lr * self.effective_batch / 256

        self.ddp = self.model
        if self.dist.world_size > 1:
            self.ddp = DistributedDataParallel(self.model, device_ids=[self.device] if self.device.type == "cuda"
                                               else None)
        compile_model = config.compile if config.compile is not None else self.device.type == "cuda"
        self.forward = torch.compile(self.ddp) if compile_model else self.ddp
        no_decay = {name for name, _ in self.model.named_parameters() if name.rsplit(".", 1)[-1] in (
            "pos_embed", "cls_token", "mask_token", "segment_embed")}
        self.optimizer = torch.optim.AdamW(
            param_groups_weight_decay(self.model, config.weight_decay, no_weight_decay_list=no_decay),
            lr=self.peak_lr, betas=(0.9, 0.95))

        self.step = 0  # optimizer steps done
        self.wall_seconds = 0.0  # across every segment of a resumed run
        self.images_seen = 0
        self.writer = None

    @property
    def image_size(self) -> int:
        from mimbench.backbones.vit import ARCHS

        return ARCHS[self.config.arch]["img_size"]

    # ----------------------------------------------------------------------------------------- state

    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "wall_seconds": self.wall_seconds,
            "images_seen": self.images_seen,
            "config": json.dumps(asdict(self.config)),
        }

    def save(self) -> Path | None:
        if not self.dist.is_main:
            return None
        path = self.out / "checkpoints" / f"step_{self.step:08d}.pth"
        atomic_write(path, lambda tmp: torch.save(self.state(), tmp))
        for old in checkpoint_paths(self.out)[: -self.config.keep_checkpoints]:
            old.unlink(missing_ok=True)
        return path

    def resume(self) -> Path | None:
        """Continue from the newest checkpoint in ``out/checkpoints`` if there is one."""
        paths = checkpoint_paths(self.out)
        if not paths:
            return None
        state, _ = read_checkpoint(paths[-1])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        self.wall_seconds = state["wall_seconds"]
        self.images_seen = state["images_seen"]
        return paths[-1]

    # -------------------------------------------------------------------------------------- training

    def train(self) -> Path:
        """Train to ``config.epochs`` (resuming if possible); returns the exported encoder's path."""
        resumed = self.resume()
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "tensorboard"))
            where = f"resumed from {resumed}" if resumed else "from scratch"
            print(f"{self.config.method} {self.config.arch}: {self.config.epochs} epochs x {self.steps_per_epoch} "
                  f"steps, effective batch {self.effective_batch}, lr {self.peak_lr:.2e}, {self.device} "
                  f"{'bf16' if self.dtype else 'fp32'}, {self.dist.world_size} process(es), {where}", flush=True)
        while self.step < self.total_steps:
            self.train_epoch(self.step // self.steps_per_epoch)
        return self.export()

    def train_epoch(self, epoch: int) -> None:
        config = self.config
        micro_per_step = config.accum_steps
        start_in_epoch = self.step - epoch * self.steps_per_epoch
        self.sampler.set_epoch(epoch, skip=start_in_epoch * micro_per_step * config.batch_size)
        self.dataset.set_epoch(epoch)
        loader = DataLoader(self.dataset, batch_size=config.batch_size, sampler=self.sampler, drop_last=True,
                            num_workers=config.num_workers, pin_memory=self.device.type == "cuda",
                            generator=torch.Generator().manual_seed(config.seed))
        self.model.train()
        progress = tqdm(total=self.steps_per_epoch, initial=start_in_epoch, desc=f"epoch {epoch}",
                        disable=not self.dist.is_main, dynamic_ncols=True)
        segment_start = time.perf_counter()
        last_time, micro = segment_start, 0
        for images in loader:
            images = images.to(self.device, non_blocking=True)
            last_micro = (micro + 1) % micro_per_step == 0
            lr = learning_rate(self.step / self.steps_per_epoch, config, self.peak_lr)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            global_micro = (self.step * micro_per_step + micro % micro_per_step) * self.dist.world_size + self.dist.rank
            torch.manual_seed(micro_batch_seed(config.seed, global_micro))
            sync = contextlib.nullcontext() if last_micro or self.ddp is self.model else self.ddp.no_sync()
            with sync:
                with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
                    loss, parts = self.forward(images)
                self.check_finite(loss, epoch)
                (loss / micro_per_step).backward()
            micro += 1
            if not last_micro:
                continue
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.images_seen += self.effective_batch
            logs = {"loss": loss.detach().float(), **parts, "lr": lr}
            if hasattr(self.model, "after_optimizer_step"):
                logs.update(self.model.after_optimizer_step(self.step, self.total_steps))
            now = time.perf_counter()
            throughput = self.effective_batch / max(now - last_time, 1e-9)
            last_time = now
            self.log(logs, throughput, progress)
            if self.step % config.save_every_steps == 0 and self.step % self.steps_per_epoch != 0:
                self.wall_seconds += now - segment_start
                segment_start = now
                self.save()
            if self.step % self.steps_per_epoch == 0:
                break
        progress.close()
        self.wall_seconds += time.perf_counter() - segment_start
        self.save()
        if self.dist.is_main:
            self.save_figure(epoch)

    def check_finite(self, loss: torch.Tensor, epoch: int) -> None:
        if not finite_on_all_ranks(loss, self.dist.world_size):
            last = checkpoint_paths(self.out)
            kept = f"last good checkpoint: {last[-1]}" if last else "no checkpoint was written yet"
            raise TrainingDiverged(f"loss is {loss.item()} at epoch {epoch}, step {self.step + 1}; stopped. {kept} "
                                   "(try a lower --base-lr or more --warmup-epochs)")

    def log(self, logs: dict[str, Any], throughput: float, progress: tqdm) -> None:
        if not self.dist.is_main:
            return
        scalars = {k: float(v) for k, v in logs.items()}
        scalars["images_per_s"] = throughput
        for key, value in scalars.items():
            self.writer.add_scalar(f"pretrain/{key}", value, self.step)
        progress.set_postfix(loss=f"{scalars['loss']:.4f}", lr=f"{scalars['lr']:.2e}", img_s=f"{throughput:.0f}")
        progress.update(1)

    @torch.no_grad()
    def save_figure(self, epoch: int) -> None:
        """Original / input (masked or mixed) / reconstruction of a fixed set of images, one row each."""
        self.model.eval()
        torch.manual_seed(self.config.seed)
        images = torch.stack([self.dataset[i] for i in range(min(8, len(self.dataset)))]).to(self.device)
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            shown = self.model.visualize(images)
        rows = [denormalize(shown[key]) for key in ("original", "input", "reconstruction")]
        zoom = max(1, 128 // images.shape[-1])  # small demo crops are enlarged so they can be seen
        rows = [F.interpolate(row, scale_factor=zoom, mode="nearest") for row in rows]
        path = self.out / "figures" / f"epoch_{epoch:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: save_image(torch.cat(rows), str(tmp), nrow=len(images), format="png"))
        self.model.train()

    def cost(self) -> dict[str, Any]:
        hours = self.wall_seconds / 3600
        accelerator_hours = hours * self.dist.world_size
        return {
            "wall_hours": round(hours, 5),
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "processes": self.dist.world_size,
            "gpu_hours": round(accelerator_hours, 5) if self.device.type == "cuda" else 0.0,
            "gpu_days": round(accelerator_hours / 24, 6) if self.device.type == "cuda" else 0.0,
            "cpu_process_hours": round(accelerator_hours, 5) if self.device.type == "cpu" else 0.0,
            "images_per_s": round(self.images_seen / max(self.wall_seconds, 1e-9), 2),
            "peak_memory_gb": round(peak_memory_gb(self.device), 3),
            "precision": precision_name(self.dtype),
            "compute": compute_settings(self.device, self.dtype),
        }

    def export(self) -> Path:
        """Encoder-only safetensors with metadata (method, arch, epochs, data, cost) for every downstream task."""
        path = self.out / "encoder.safetensors"
        if not self.dist.is_main:
            return path
        cost = self.cost()
        data = f"embedded:scikit-image photos ({len(self.dataset)} crops/epoch)" if self.config.embedded \
            else str(self.config.data_root)
        metadata = CheckpointMetadata(method=self.config.method, arch=self.config.arch,
                                      epochs=self.step / self.steps_per_epoch, data=data, git_commit=git_commit(),
                                      extra={"cost": cost, "config": asdict(self.config)})
        save_backbone(path, self.model.export_encoder(), metadata)
        atomic_write(self.out / "cost.json", lambda tmp: tmp.write_text(json.dumps(cost, indent=2) + "\n"))
        self.writer.close()
        print(f"encoder: {path}\ncost: {json.dumps(cost)}", flush=True)
        return path
