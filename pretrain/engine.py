"""The pretraining engine shared by MAE, RC-MAE and MixedAE: one loop, from a CPU to many GPUs.

A method is an ``nn.Module`` whose ``forward(images)`` returns ``(loss, parts)``; it may define
``after_micro_batch(micro_batch)`` (RC-MAE's EMA teacher: called after every micro-batch, with where it stands in
the run, `mimbench.pretrain.rcmae.MicroBatch`), and defines ``visualize(images)`` and ``export_encoder()``.
Training with labels (`mimbench.pretrain.supervised`) is a `Trainer` subclass: it overrides the hooks of the section
"what a subclass may override" (config, data, model, optimizer groups, the loss of a micro-batch, the end of an
epoch, what is exported) and the class's lr reference batch and betas, and extends ``state``/``load_state`` and
``export``; the loader's batches are ``(*inputs, unreadable)`` for every trainer. Everything else lives here:

- distributed: ``torchrun`` env:// with DDP (NCCL on GPU, gloo on CPU); only rank 0 writes;
- AdamW (β 0.9/0.95) with MAE's weight-decay groups (`weight_decay_groups`), lr = base_lr · effective batch / 256,
  per-step warmup + half-cycle cosine (MAE); gradient accumulation to reach the recipe's total batch on any number
  of GPUs; bf16 autocast where it pays (``mimbench.core.runtime``; the releases use fp16 with a GradScaler, which
  bf16's range makes unnecessary); AdamW's fused kernel where torch has one for the device; ``torch.compile``
  where it pays (`compile_wanted`: long runs on CUDA);
- ``init``: the run starts from a full pretraining checkpoint (official MAE / RC-MAE, or ours), every tensor of
  the model loaded from it (`mimbench.backbones.checkpoint.load_pretraining_checkpoint`), with a fresh optimizer;
- exact resume: the random state of every micro-batch is a pure function of (seed, micro-batch index) and
  augmentations of (seed, epoch, sample), so a checkpoint needs only model, optimizer, step and data position;
  checkpoints are written atomically, every N steps and at epoch end, keeping the last K;
- a non-finite loss stops the run with a clear message and leaves the last good checkpoint untouched;
- unreadable image files are skipped (`mimbench.pretrain.data`) and counted over every worker and process; the
  run stops when their share of the data passes ``max_bad_image_share``;
- the run directory belongs to one run at a time and is continued only with ``resume``, into a run of the same
  model and data (`mimbench.core.rundir.start_run`; `HARMLESS_ON_RESUME` lists what may differ);
- progress (tqdm), TensorBoard scalars, a reconstruction figure per epoch, and the run's cost.

The configuration (`PretrainConfig`) is the shared `RunSpec`, a preset's name and its `PretrainRecipe`, taken from
`PRESETS` (each derived from the paper's base recipe), so ``Trainer(config)`` runs exactly what the command line
runs with the same fields.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from timm.optim import param_groups_weight_decay
from torch.nn.parallel import DistributedDataParallel
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
from torch.utils.data import DataLoader, Dataset
from torchvision.utils import save_image
from tqdm import tqdm

from mimbench.backbones.checkpoint import (
    CheckpointMetadata,
    load_pretraining_checkpoint,
    read_checkpoint,
    save_backbone,
)
from mimbench.backbones.cli import backbone_size
from mimbench.backbones.vit import ARCHS
from mimbench.core.config import RunSpec, from_dict, to_dict
from mimbench.core.errors import ConfigError, DatasetError, TrainingDiverged
from mimbench.core.io import atomic_write, git_commit
from mimbench.core.rundir import RunLock, start_run_on_rank0
from mimbench.core.runtime import (
    autocast,
    autocast_dtype,
    compute_settings,
    finite_on_all_ranks,
    init_distributed,
    learning_rate,
    loader_workers,
    peak_memory_gb,
    precision_name,
)
from mimbench.pretrain.data import IMAGENET_MEAN, IMAGENET_STD, ShardedSampler, build_pretrain_dataset
from mimbench.pretrain.mae import MAEConfig, MaskedAutoencoder
from mimbench.pretrain.mixedae import MixedAEConfig, MixedAutoencoder
from mimbench.pretrain.objects import CentricObjectRule
from mimbench.pretrain.rcmae import MicroBatch, RCMAEConfig, ReconstructionConsistentMAE

# Each method's config dataclass and model: what `--method` chooses between.
METHODS: dict[str, tuple[type, type[nn.Module]]] = {
    "mae": (MAEConfig, MaskedAutoencoder),
    "rcmae": (RCMAEConfig, ReconstructionConsistentMAE),
    "mixedae": (MixedAEConfig, MixedAutoencoder),
}


@dataclass(frozen=True)
class PretrainRecipe:
    """How a model is pretrained. The defaults are the paper's recipe (MAE, He et al., CVPR 2022, Table 8), which
    RC-MAE and MixedAE keep; `PRESETS` derives the others from it."""

    arch: str = "vit_base_patch16_224"  # ViT-B/16: the model of the three papers' main tables
    epochs: int = 300  # the MixedAE paper's shorter ViT-B schedule (its rows: 300 and 1600; tables/reference)
    warmup_epochs: int = 40  # MAE Table 8
    batch_size: int = 64  # per process (MAE's PRETRAIN.md: 64 per GPU)
    # The batch of one optimizer step over all processes, reached by accumulation (MAE Table 8: 4096); None: batch
    # size x processes x accum_steps.
    total_batch_size: int | None = 4096
    accum_steps: int = 1  # micro-batches per step where total_batch_size is None (else derived from it)
    base_lr: float = 1.5e-4  # MAE Table 8; lr = base_lr * effective batch / 256
    min_lr: float = 0.0  # the cosine decays to zero (MAE's code)
    weight_decay: float = 0.05  # MAE Table 8
    samples_per_epoch: int = 2048  # the embedded photos only: random crops per epoch
    # Object-aware sources (MixedAE-Full; pretrain/objects.py): crops holding one centric object of a COCO layout's
    # boxes; without boxes, random crops.
    object_aware: bool = False
    object_center_region: float = CentricObjectRule.center_region
    object_min_cover: float = CentricObjectRule.min_cover
    # Loader processes per training process: this machine's CPUs (`loader_workers`). The count changes no number:
    # every augmentation is drawn from (seed, epoch, sample), whichever worker draws it (pretrain/data.py).
    num_workers: int = loader_workers()
    save_every_steps: int = 1000
    keep_checkpoints: int = 2
    compile: str = "auto"  # auto | on | off; auto: on CUDA for runs of at least COMPILE_MIN_STEPS (compile_wanted)
    for_method: str | None = None  # the method whose release this recipe reproduces; None: any method
    # The method's own options (MAEConfig, RCMAEConfig, MixedAEConfig fields); unset ones keep their papers' values.
    method_options: dict[str, Any] = field(default_factory=dict)


BASE = PretrainRecipe()
# The releases' recipes, each for its own method (``--preset mae_vitb_1600`` runs MAE). MAE (facebookresearch/mae,
# PRETRAIN.md; paper Table 8): 64 images per GPU, 4096 per step, blr 1.5e-4, wd 0.05, 40 warmup epochs, norm-pix
# targets, mask ratio 0.75; 1600 epochs, the schedule of its released ViT-B/L/H checkpoints.
MAE_RELEASE = dataclasses.replace(BASE, for_method="mae", epochs=1600,
                                  method_options=dict(mask_ratio=0.75, norm_pix_loss=True))
# RC-MAE (youngwanLEE/rc-mae, scripts/pretrain_rc_mae_vit_{base,large}_1600ep.sh): 256 per GPU x 2 accumulation x
# 8 GPUs = 4096 per step (the accumulation sets how often its teacher moves per step: pretrain/rcmae.py), blr
# 1.5e-4, wd 0.05, 40 warmup epochs, norm-pix, mask 0.75, γ 1, teacher momentum 0.996 per micro-batch.
RCMAE_RELEASE = dataclasses.replace(
    BASE, for_method="rcmae", epochs=1600, batch_size=256,
    method_options=dict(mask_ratio=0.75, norm_pix_loss=True, consistency_weight=1.0, momentum_start=0.996,
                        teacher_schedule="release", release_accumulation=2))
PRESETS: dict[str, PretrainRecipe] = {
    "in1k_vit_b": BASE,
    # The bundled photos on a CPU in minutes: 32-pixel crops, a tiny ViT (its decoder from the table: 2 blocks,
    # 128 wide), a 10-epoch schedule, 4 x the lr for the short run, and batch 64 x 1 process.
    "embedded_cpu": dataclasses.replace(
        BASE, arch="vit_tiny_patch4_32", epochs=10, warmup_epochs=2, base_lr=BASE.base_lr * 4, num_workers=2,
        samples_per_epoch=2048, save_every_steps=100, total_batch_size=None),
    "mae_vitb_1600": dataclasses.replace(MAE_RELEASE, arch="vit_base_patch16_224"),
    "mae_vitl_1600": dataclasses.replace(MAE_RELEASE, arch="vit_large_patch16_224"),
    "rcmae_vitb_1600": dataclasses.replace(RCMAE_RELEASE, arch="vit_base_patch16_224"),
    "rcmae_vitl_1600": dataclasses.replace(RCMAE_RELEASE, arch="vit_large_patch16_224"),
    # MixedAE-Full and MixedAE-Full* (--method mixedae): object-aware sources and m complementary mixtures per
    # group, our reading of the poster's GPU-days (62.3 and 30.8 against MixedAE's 16.9: ~4x and ~2x the tokens).
    "mixedae_full": dataclasses.replace(BASE, object_aware=True, method_options=dict(mixtures_per_group=4)),  # 1/r
    "mixedae_full_star": dataclasses.replace(BASE, object_aware=True, method_options=dict(mixtures_per_group=2)),
}
DEFAULT_PRESET = "in1k_vit_b"

# Fields that may differ when a run is resumed: how the machine runs it, not what it computes. Everything else
# (the recipe, method and its options, data root, seed, precision) must match the run's config.yaml.
HARMLESS_ON_RESUME = ("num_workers", "save_every_steps", "keep_checkpoints", "compile", "device", "out", "resume",
                      "preset", "max_bad_image_share", "tags")


@dataclass
class PretrainConfig:
    # RunSpec.arch, when set, overrides the recipe's (and is folded into it by `resolve`); ckpt, which and
    # results belong to evaluation runs.
    run: RunSpec = field(default_factory=lambda: RunSpec(method="mae", out="runs/pretrain"))
    preset: str = DEFAULT_PRESET
    recipe: PretrainRecipe = BASE
    max_bad_image_share: float = 0.01  # the run stops when more of its image files than this are unreadable
    # A full pretraining checkpoint (official MAE / RC-MAE, or one of ours) to start from, every model tensor
    # loaded from it (an MAE from an RC-MAE file takes its teacher; an RC-MAE from an MAE file, that model for both
    # halves); the optimizer and schedule start afresh. Ignored when the run resumes from its own checkpoint.
    init: str | None = None


COMPILE_CHOICES = ("auto", "on", "off")
# torch.compile costs ~1-2 min before the first step (97 s for a ViT-B MAE step on a 2-core CPU) and then saves
# ~10-25% of each step; on a GPU step of ~0.3 s that is ~0.05 s, so the compile pays back after ~2000 steps. Shorter
# runs (every CPU demo, smoke runs) stay eager; "on" / "off" override.
COMPILE_MIN_STEPS = 2000


# ------------------------------------------------------------------------------------------ small pieces


def micro_batch_seed(seed: int, micro_batch: int) -> int:
    """Seed of one micro-batch on one rank: masks, mixing and drop path are a function of it alone."""
    return (seed * 1_000_003 + micro_batch) % (2 ** 63)


def method_classes(method: str) -> tuple[type, type[nn.Module]]:
    """The method's config dataclass and model (`METHODS`), or one line naming the choices."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[method]


def method_config(config: PretrainConfig) -> Any:
    """The method's own config dataclass (e.g. `MAEConfig`) from the run's method, arch and method options."""
    arch = config.run.arch or config.recipe.arch
    if arch not in ARCHS:
        raise ConfigError(f"unknown arch {arch!r}; choose one of: {', '.join(ARCHS)}")
    options = {**config.recipe.method_options, "arch": arch}
    return from_dict(method_classes(config.run.method)[0], options, f"{config.run.method} options")


def resolve(config: PretrainConfig) -> PretrainConfig:
    """The configuration as it runs and as config.yaml records it: the arch in the recipe only, and every method
    option spelled out, so a saved run compares and replays field by field."""
    wanted = config.recipe.for_method
    if wanted is not None and wanted != config.run.method:
        raise ConfigError(f"preset {config.preset!r} is the {wanted} release's recipe, not {config.run.method}'s; "
                          f"run it with --method {wanted}")
    options = to_dict(method_config(config))
    arch = options.pop("arch")
    return dataclasses.replace(config, run=dataclasses.replace(config.run, arch=None),
                               recipe=dataclasses.replace(config.recipe, arch=arch, method_options=options))


def build_method(config: PretrainConfig) -> nn.Module:
    return method_classes(config.run.method)[1](method_config(config))


def accumulation_steps(recipe: PretrainRecipe, world_size: int) -> int:
    """Micro-batches per optimizer step: what reaches ``total_batch_size`` on ``world_size`` processes, else
    ``accum_steps``."""
    if recipe.total_batch_size is None:
        return recipe.accum_steps
    per_micro_batch = recipe.batch_size * world_size
    total = recipe.total_batch_size
    if total % per_micro_batch:
        raise ConfigError(f"--total-batch-size {total} is not a multiple of batch {recipe.batch_size} x {world_size} "
                          f"process(es); change --batch-size or --total-batch-size")
    steps = total // per_micro_batch
    if recipe.accum_steps not in (1, steps):
        raise ConfigError(f"--accum-steps {recipe.accum_steps} disagrees with --total-batch-size {total} (batch "
                          f"{recipe.batch_size} x {world_size} process(es) x {steps}); leave --accum-steps out or "
                          f"change --total-batch-size")
    return steps


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups as MAE's main_pretrain.py (and RC-MAE's run_pretrain.py) make them with timm's
    ``add_weight_decay`` and no skip list: biases and every tensor of one dim (norms) get no weight decay, every
    other trainable tensor is decayed, ``cls_token`` and ``mask_token`` (and MixedAE's segment embeddings)
    included; frozen tensors (the sin-cos position embeddings, RC-MAE's teacher) are in neither group."""
    return param_groups_weight_decay(model, weight_decay)


def pretrain_loader(dataset: Dataset, sampler: ShardedSampler, recipe: PretrainRecipe, device: torch.device,
                    seed: int) -> DataLoader:
    """One epoch's loader (create it after ``set_epoch``: pretrain/data.py); benchmarks/data_throughput.py times
    this one."""
    return DataLoader(dataset, batch_size=recipe.batch_size, sampler=sampler, drop_last=True,
                      num_workers=recipe.num_workers, pin_memory=device.type == "cuda",
                      generator=torch.Generator().manual_seed(seed))


def build_optimizer(groups: list[dict[str, Any]], lr: float, device: torch.device,
                    betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW over ``groups`` (MAE's: `weight_decay_groups`), with torch's fused kernel where it has one for the device
    (one kernel over all tensors instead of a loop of small ops; the same update to ~1e-7 relative)."""
    fused = device.type in _get_fused_kernels_supported_devices()
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


def choose_attention_kernels(model: nn.Module, device: torch.device, dtype: torch.dtype | None) -> None:
    """timm's attention through ``scaled_dot_product_attention`` everywhere but under bf16 on a CPU, where its
    matmul-softmax-matmul path is faster: torch's CPU flash kernel took 73 ms for a ViT-B decoder layer's forward and
    backward (batch 8, 16 heads of 32, 197 tokens) against 27 ms, and 24 against 5 ms for an encoder layer's 50
    tokens (benchmarks/pretrain_step.py: ~10% of an MAE step). In fp32 the flash kernel is as fast or faster, so fp32
    runs keep it, and their numbers."""
    fused = not (device.type == "cpu" and dtype == torch.bfloat16)
    for module in model.modules():
        if hasattr(module, "fused_attn"):  # timm's Attention and MixedAE's HomologousAttention
            module.fused_attn = fused


def compile_wanted(setting: str, device_type: str, total_steps: int) -> bool:
    """Whether the run's forward is compiled: ``on`` / ``off`` as said; ``auto`` on CUDA for runs of at least
    `COMPILE_MIN_STEPS` optimizer steps only."""
    if setting not in COMPILE_CHOICES:
        raise ConfigError(f"--compile {setting!r}: choose one of {', '.join(COMPILE_CHOICES)}")
    if setting != "auto":
        return setting == "on"
    return device_type == "cuda" and total_steps >= COMPILE_MIN_STEPS


def method_loss(forward: Callable, images: torch.Tensor, device: torch.device,
                dtype: torch.dtype | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A pretraining method's loss and logged parts for one micro-batch, under the run's autocast."""
    with autocast(device, dtype):
        return forward(images.to(device, non_blocking=True))


def forward_backward(loss_of: Callable[[], tuple[torch.Tensor, dict[str, Any]]], accum_steps: int = 1,
                     check: Callable[[torch.Tensor], None] | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """One micro-batch: its loss (``loss_of()``), ``check(loss)`` if given, and the backward of its share of the
    step's loss. Returns the loss and its logged parts."""
    loss, parts = loss_of()
    if check is not None:
        check(loss)
    (loss / accum_steps).backward()
    return loss, parts


def optimizer_step(optimizer: torch.optim.Optimizer) -> None:
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


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
    lr_reference_batch = 256  # lr = base_lr * effective batch / this (MAE)
    betas = (0.9, 0.95)  # AdamW's (MAE)
    harmless_on_resume = HARMLESS_ON_RESUME

    def __init__(self, config: PretrainConfig) -> None:
        self.config = config = self.resolve(config)
        run, recipe = config.run, config.recipe
        self.out = Path(run.out)
        self.dist = init_distributed(run.device)
        self.device = self.dist.device
        self.dtype = autocast_dtype(self.device, run.precision)

        self.dataset = self.build_dataset()
        torch.manual_seed(run.seed)  # identical initial weights on every rank
        self.model = self.build_model().to(self.device)
        choose_attention_kernels(self.model, self.device, self.dtype)
        self.sampler = ShardedSampler(len(self.dataset), self.dist.world_size, self.dist.rank, seed=run.seed,
                                      batch_size=recipe.batch_size)
        self.accum_steps = accumulation_steps(recipe, self.dist.world_size)
        self.steps_per_epoch = len(self.dataset) // self.dist.world_size // recipe.batch_size // self.accum_steps
        if self.steps_per_epoch == 0:
            raise ConfigError(f"{len(self.dataset)} images cannot fill one step of batch {recipe.batch_size} x "
                              f"accumulation {self.accum_steps} x {self.dist.world_size} processes")
        self.total_steps = self.steps_per_epoch * recipe.epochs
        self.effective_batch = recipe.batch_size * self.accum_steps * self.dist.world_size
        # MixedAE may count mixed images instead of source images (its lr_batch switch).
        self.peak_lr = recipe.base_lr * (self.effective_batch * getattr(self.model, "lr_batch_share", 1)) / \
            self.lr_reference_batch

        self.ddp = self.model
        if self.dist.world_size > 1:
            self.ddp = DistributedDataParallel(self.model, device_ids=[self.device] if self.device.type == "cuda"
                                               else None)
        self.compiled = compile_wanted(recipe.compile, self.device.type, self.total_steps)
        self.forward = torch.compile(self.ddp) if self.compiled else self.ddp
        self.optimizer = build_optimizer(self.parameter_groups(), self.peak_lr, self.device, self.betas)

        self.step = 0  # optimizer steps done
        self.wall_seconds = 0.0  # across every segment of a resumed run
        self.images_seen = 0
        self.unreadable: set[int] = set()  # indices of the image files found unreadable so far
        self.writer = None
        self.metadata: CheckpointMetadata | None = None  # the export's, once written

    # ------------------------------------------------------------------- what a subclass may override

    def resolve(self, config: PretrainConfig) -> PretrainConfig:
        return resolve(config)

    def build_dataset(self) -> Any:
        """The training set: samples ``(*inputs, unreadable)``, ``set_epoch`` and a ``description``."""
        recipe = self.config.recipe
        objects = CentricObjectRule(recipe.object_center_region, recipe.object_min_cover) if recipe.object_aware \
            else None
        return build_pretrain_dataset(self.config.run.data_root, ARCHS[recipe.arch]["img_size"],
                                      seed=self.config.run.seed, object_aware=objects,
                                      samples_per_epoch=recipe.samples_per_epoch)

    def build_model(self) -> nn.Module:
        return build_method(self.config)

    def parameter_groups(self) -> list[dict[str, Any]]:
        return weight_decay_groups(self.model, self.config.recipe.weight_decay)

    def micro_batch_loss(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """The loss of one micro-batch (the loader's inputs), with its random state already seeded."""
        return method_loss(self.forward, images, self.device, self.dtype)

    def finish_epoch(self, epoch: int) -> None:
        """After an epoch's last step, before its checkpoint: the unreadable count and a figure."""
        if self.dist.is_main:
            if self.unreadable:
                print(f"epoch {epoch}: {len(self.unreadable)} unreadable image file(s) skipped so far, "
                      f"{len(self.unreadable) / len(self.dataset):.3%} of {len(self.dataset)}", flush=True)
            self.save_figure(epoch)

    def exported(self) -> tuple[Any, dict[str, Any]]:
        """What `export` writes: the encoder (a module or its tensors) and the metadata's own extra fields."""
        return self.model.export_encoder(), {}

    # ----------------------------------------------------------------------------------------- state

    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "wall_seconds": self.wall_seconds,
            "images_seen": self.images_seen,
            "unreadable": sorted(self.unreadable),
            "config": json.dumps(to_dict(self.config)),
        }

    def save(self) -> Path | None:
        if not self.dist.is_main:
            return None
        path = self.out / "checkpoints" / f"step_{self.step:08d}.pth"
        atomic_write(path, lambda tmp: torch.save(self.state(), tmp))
        for old in checkpoint_paths(self.out)[: -self.config.recipe.keep_checkpoints]:
            old.unlink(missing_ok=True)
        return path

    def holds_run(self) -> bool:
        return bool(checkpoint_paths(self.out)) or (self.out / "encoder.safetensors").exists()

    def take_run_directory(self) -> RunLock | None:
        """Rank 0 locks ``out`` and applies the resume rule; the other ranks stop with its one line if it refuses,
        before any of them reads a checkpoint."""
        return start_run_on_rank0(self.dist.world_size, self.dist.rank, self.out, to_dict(self.config),
                                  resume=self.config.run.resume, holds_run=self.holds_run(),
                                  harmless=self.harmless_on_resume)

    def resume(self) -> Path | None:
        """Continue from the newest checkpoint in ``out/checkpoints`` if there is one."""
        paths = checkpoint_paths(self.out)
        if not paths:
            return None
        self.load_state(read_checkpoint(paths[-1])[0])
        return paths[-1]

    def load_state(self, state: dict[str, Any]) -> None:
        """The inverse of `state`."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        self.wall_seconds = state["wall_seconds"]
        self.images_seen = state["images_seen"]
        self.unreadable = set(state.get("unreadable", ()))  # checkpoints older than the count have none

    def initialize(self) -> str | None:
        """Load ``init`` (a full pretraining checkpoint) into the model, on every process; its description."""
        if self.config.init is None:
            return None
        report = load_pretraining_checkpoint(self.model, self.config.init)
        if self.dist.is_main:
            print(report.summary(), flush=True)
        return f"{self.config.init} ({report.source_format})"

    # -------------------------------------------------------------------------------------- training

    def train(self) -> Path:
        """Train to the recipe's epochs (resuming with ``run.resume``); returns the exported encoder's path."""
        lock = self.take_run_directory()
        try:
            resumed = self.resume()
            initial = self.initialize() if resumed is None else None
            if self.dist.is_main:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.out / "tensorboard"))
                where = f"resumed from {resumed}" if resumed else f"from {initial}" if initial else "from scratch"
                print(f"{self.config.run.method} {self.config.recipe.arch} ({self.config.preset}): "
                      f"{self.config.recipe.epochs} epochs x {self.steps_per_epoch} steps, effective batch "
                      f"{self.effective_batch}, lr {self.peak_lr:.2e}, {self.device} {precision_name(self.dtype)}, "
                      f"{self.dist.world_size} process(es){', compiled' if self.compiled else ''}, data "
                      f"{self.dataset.description}, {where}", flush=True)
            while self.step < self.total_steps:
                self.train_epoch(self.step // self.steps_per_epoch)
            return self.export()
        finally:
            if lock is not None:
                lock.release()

    def train_epoch(self, epoch: int) -> None:
        run, recipe = self.config.run, self.config.recipe
        micro_per_step = self.accum_steps
        start_in_epoch = self.step - epoch * self.steps_per_epoch
        self.sampler.set_epoch(epoch, skip=start_in_epoch * micro_per_step * recipe.batch_size)
        self.dataset.set_epoch(epoch)
        loader = pretrain_loader(self.dataset, self.sampler, recipe, self.device, run.seed)
        self.model.train()
        segment_start = time.perf_counter()
        last_time, micro, unreadable = segment_start, 0, []
        world, rank = self.dist.world_size, self.dist.rank
        # A context, so a run stopped mid-epoch ends the bar's line before its error line.
        with tqdm(total=self.steps_per_epoch, initial=start_in_epoch, desc=f"epoch {epoch}",
                  disable=not self.dist.is_main, dynamic_ncols=True) as progress:
            for *inputs, skipped in loader:
                unreadable += skipped[skipped >= 0].tolist()
                last_micro = (micro + 1) % micro_per_step == 0
                lr = learning_rate(self.step / self.steps_per_epoch, recipe, self.peak_lr)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                global_micro = (self.step * micro_per_step + micro % micro_per_step) * world + rank
                torch.manual_seed(micro_batch_seed(run.seed, global_micro))
                sync = contextlib.nullcontext() if last_micro or self.ddp is self.model else self.ddp.no_sync()
                with sync:
                    loss, parts = forward_backward(functools.partial(self.micro_batch_loss, *inputs), micro_per_step,
                                                   check=lambda value: self.check_finite(value, epoch))
                index_in_epoch = start_in_epoch * micro_per_step + micro
                micro += 1
                if last_micro:
                    self.count_unreadable(unreadable)
                    unreadable = []
                    optimizer_step(self.optimizer)
                    self.step += 1
                    self.images_seen += self.effective_batch
                method_logs = self.after_micro_batch(index_in_epoch, last_micro)
                if not last_micro:
                    continue
                logs = {"loss": loss.detach().float(), **parts, "lr": lr, **method_logs}
                now = time.perf_counter()
                throughput = self.effective_batch / max(now - last_time, 1e-9)
                last_time = now
                self.log(logs, throughput, progress)
                if self.step % recipe.save_every_steps == 0 and self.step % self.steps_per_epoch != 0:
                    self.wall_seconds += now - segment_start
                    segment_start = now
                    self.save()
                if self.step % self.steps_per_epoch == 0:
                    break
        self.wall_seconds += time.perf_counter() - segment_start
        self.finish_epoch(epoch)
        self.save()

    def after_micro_batch(self, index_in_epoch: int, stepped: bool) -> dict[str, float]:
        """The method's hook after each micro-batch (RC-MAE's teacher update), if it has one; what it logs."""
        if not hasattr(self.model, "after_micro_batch"):
            return {}
        return self.model.after_micro_batch(MicroBatch(
            index_in_epoch=index_in_epoch, per_epoch=self.steps_per_epoch * self.accum_steps,
            accumulation=self.accum_steps, epochs=self.config.recipe.epochs, step=self.step,
            total_steps=self.total_steps, stepped=stepped))

    def count_unreadable(self, found: list[int]) -> None:
        """Add the unreadable files of one step (every process's) to the count; past the limit, stop."""
        if self.dist.world_size > 1:
            gathered: list[list[int]] = [[] for _ in range(self.dist.world_size)]
            dist.all_gather_object(gathered, found)
            found = [index for part in gathered for index in part]
        self.unreadable.update(found)
        limit = self.config.max_bad_image_share
        if len(self.unreadable) > limit * len(self.dataset):
            raise DatasetError(f"{len(self.unreadable)} of the {len(self.dataset)} images under "
                               f"{self.dataset.description} are unreadable so far, more than --max-bad-image-share "
                               f"{limit:g} ({limit:.1%}); the warnings name each file; fix or remove them, or "
                               "raise the limit")

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
        torch.manual_seed(self.config.run.seed)
        images = torch.stack([self.dataset[i][0] for i in range(min(8, len(self.dataset)))]).to(self.device)
        with autocast(self.device, self.dtype):
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
            "unreadable_images": len(self.unreadable),
            "peak_memory_gb": round(peak_memory_gb(self.device), 3),
            "precision": precision_name(self.dtype),
            "compute": compute_settings(self.device, self.dtype),
        }

    def export(self) -> Path:
        """Encoder-only safetensors with metadata (method, arch, epochs, data, cost, the backbone's params and
        GFLOPs) for every downstream task."""
        path = self.out / "encoder.safetensors"
        if not self.dist.is_main:
            return path
        cost = self.cost()
        method = getattr(self.model, "export_method", self.config.run.method)  # e.g. MixedAE's Full variants
        arch = self.config.recipe.arch
        encoder, extra = self.exported()
        self.metadata = CheckpointMetadata(
            method=method, arch=arch, epochs=self.step / self.steps_per_epoch, data=self.dataset.description,
            git_commit=git_commit(),
            extra={"cost": cost, **backbone_size(arch), **extra, "config": to_dict(self.config)})
        save_backbone(path, encoder, self.metadata)
        atomic_write(self.out / "cost.json", lambda tmp: tmp.write_text(json.dumps(cost, indent=2) + "\n"))
        self.writer.close()
        print(f"encoder: {path}\ncost: {json.dumps(cost)}", flush=True)
        return path
