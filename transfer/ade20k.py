"""ADE20K semantic segmentation transfer: UperNet on our backbones through mmsegmentation.

    python transfer/run.py ade20k --ckpt x.pth --data-root /datasets/ADEChallengeData2016
    torchrun --nproc_per_node 8 transfer/run.py ade20k --ckpt x.pth --data-root /datasets/ADEChallengeData2016
    python transfer/run.py ade20k --ckpt x.pth --embedded          # generated ADE-format scenes, CPU, minutes
    python transfer/run.py ade20k --config runs/transfer/ade20k/.../config.yaml --out runs/again   # a replay

The protocol is MAE/BEiT's (mmseg's ``mae-base_upernet_8xb2-amp-160k_ade20k-512x512``): a ViT, given a relative
position bias in every block (zero at the start) and layer scale (1.0 at the start), both added after its
pretrained weights load (``backbones/vit_additions.py``), feeds its blocks 4, 6, 8 and 12 (ViT-B) to
Feature2Pyramid (rescales 4, 2, 1, 0.5); a hierarchical backbone (ResNet, MPViT, ...) feeds
its four stages directly, as mmseg's ResNet UperNet configs do. A UPerHead decodes, an FCNHead on the third level
adds an auxiliary loss (weight 0.4); AdamW with layer-wise lr decay, linear warmup then poly decay, slide
inference, mIoU / mAcc / aAcc by mmseg's IoUMetric. Everything the adapter asks of the backbone goes through
its contract (``backbones/contract.py``); the checkpoint goes through our loader (``backbones/checkpoint.py``),
which fails unless every encoder weight loads. Training, checkpoints, resume and evaluation are mmengine's
Runner. One record per run goes to the results store.

The configuration is :class:`Ade20kConfig` (the shared run fields, a recipe from :data:`PRESETS`, the task's
options); every field is a flag, ``--config FILE.yaml`` reads one, and the resolved configuration is written to
the run directory as ``config.yaml``. The run-directory rule is ``mimbench.core.rundir``'s: a folder holding a
run (mmengine checkpoints) is continued only with ``--resume``, after its ``config.yaml`` is compared with the new
one; :data:`HARMLESS` lists the fields that may differ. ``--eval-only`` scores the run in the folder (or
``--weights``) and continues nothing, so it needs no ``--resume``; its settings are compared with the run's as a
resume's are (the trained weights must fit the model), and ``config.yaml`` then describes that evaluation. As
mmengine loads a segmentor checkpoint non-strictly, one whose tensors are not the model's is refused first.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mimbench.transfer import mmseg_compat

mmseg_compat.install()  # before mmseg is imported: mmcv-lite has no mmcv.ops, torch >= 2.6 loads weights_only

import mmseg.datasets  # noqa: E402,F401  registers ADE20KDataset and the transforms
import mmseg.evaluation  # noqa: E402,F401  registers IoUMetric
import mmseg.models  # noqa: E402,F401  registers EncoderDecoder, Feature2Pyramid, UPerHead, FCNHead
from mmengine.config import Config  # noqa: E402
from mmengine.dist import get_rank, is_main_process  # noqa: E402
from mmengine.model import BaseModule, is_model_wrapper  # noqa: E402
from mmengine.optim import OptimWrapper  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402
from mmengine.runner import Runner  # noqa: E402
from mmseg.datasets import BaseSegDataset  # noqa: E402
from mmseg.evaluation import IoUMetric  # noqa: E402
from mmseg.registry import DATASETS, MODELS, OPTIM_WRAPPER_CONSTRUCTORS, OPTIM_WRAPPERS, OPTIMIZERS  # noqa: E402

from mimbench.backbones.checkpoint import (  # noqa: E402
    backbone_from_checkpoint,
    check_checkpoint,
    infer_arch,
    read_checkpoint,
)
from mimbench.backbones.cli import backbone_size  # noqa: E402
from mimbench.backbones.contract import BackboneContract, backbone_contract  # noqa: E402
from mimbench.backbones.layer_decay import layer_decay_param_groups  # noqa: E402
from mimbench.backbones.vit import create_backbone  # noqa: E402
from mimbench.backbones.vit_additions import add_layer_scale, add_relative_position_bias  # noqa: E402
from mimbench.core.config import (  # noqa: E402
    Embedded,
    RunSpec,
    exit_status,
    parse_config,
    print_config,
    protocol_id,
    record_tags,
    to_dict,
    wants_printed_config,
)
from mimbench.core.errors import ConfigError, DatasetError  # noqa: E402
from mimbench.core.io import file_sha256  # noqa: E402
from mimbench.core.record import build_result  # noqa: E402
from mimbench.core.rundir import start_run  # noqa: E402
from mimbench.core.runtime import autocast_dtype, resolve_device  # noqa: E402
from mimbench.results import Result, append_result  # noqa: E402
from mimbench.transfer.recipes import per_arch  # noqa: E402
from mimbench.transfer.scenes import CATEGORIES, make_scene  # noqa: E402

ADE20K_NUM_CLASSES = 150
ADE20K_FOLDERS = ("images/training", "images/validation", "annotations/training", "annotations/validation")
# The embedded set: photo pixels are the "background" class (ADE20K labels every pixel with a stuff or thing
# class, so the photo is stuff here, and an all-background prediction scores only 1/5 of the classes);
# objects are their category. Annotation PNGs follow ADE20K: 0 unlabelled (unused here), k = class k - 1.
EMBEDDED_CLASSES = ("background", *CATEGORIES)
EMBEDDED_PALETTE = [[120, 120, 120], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200]]
EMBEDDED_FORMAT = "ade20k-embedded/1"  # the manifest's tag: what tells the generated set from ADE20K
IMAGENET_MEAN_255 = [123.675, 116.28, 103.53]
IMAGENET_STD_255 = [58.395, 57.12, 57.375]
IGNORE_INDEX = 255


# ----------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class SegmentationPreset:
    """A training recipe (see :data:`PRESETS` for the numbers and their sources)."""

    crop_size: int  # training crops, the backbone's img_size and the slide window
    resize_scale: tuple[int, ...]  # (long, short) side bound, kept ratio
    ratio_range: tuple[float, ...]  # random rescale of resize_scale in training
    photometric: bool  # mmseg's PhotoMetricDistortion
    max_iters: int
    batch_size: int  # in total, split over the GPUs
    lr: float
    weight_decay: float
    layer_decay: float
    drop_path_rate: float | None  # None: drop_path_by_arch's value for the backbone (`resolve_drop_path`)
    warmup_iters: int  # linear from 1e-6 × lr, with a poly (power 1) to 0 (`lr_schedule`)
    head_channels: int  # UPerHead width
    aux_channels: int  # FCNHead width
    # Mixed precision on a GPU without bf16 (V100, T4): fp16 with a dynamic loss scale, else fp32 there.
    fp16_without_bf16: bool
    test_mode: str  # "slide" (crop_size windows, slide_stride apart) or "whole"
    slide_stride: int
    # Added to a plain ViT for the transfer, after its weights load (a hierarchical backbone has neither): a
    # relative position bias per block over the crop's token grid, starting at zero (needs slide inference,
    # whose windows never exceed that grid), and layer scale starting at this value (None: none).
    relative_position_bias: bool
    layer_scale: float | None
    val_interval: int
    checkpoint_interval: int
    log_interval: int
    num_workers: int
    drop_path_by_arch: dict[str, float] = field(default_factory=dict)  # where drop_path_rate is None
    # Which parameters get no weight decay: "1d" (mmseg's LayerDecayOptimizerConstructor: 1-D tensors and biases;
    # its name test for pos_embed / cls_token never matches the segmentor's "backbone." names, so they decay) or
    # "none" (mmengine's default constructor without paramwise_cfg: every parameter decays).
    no_decay: str = "1d"
    # mmcv 1.x's poly with warmup (MPViT's mmseg 0.11 lr_config): the poly runs from iteration 0 and the linear
    # warmup multiplies its first warmup_iters; False: mmseg 1.x's, the poly from the warmup's end.
    warmup_inside_poly: bool = False


# The paper protocol (MAE / BEiT / MixedAE ADE20K), as mmseg's configs/mae/mae-base_upernet_8xb2-amp-160k_ade20k-
# 512x512.py with _base_/datasets/ade20k.py and _base_/schedules/schedule_160k.py.
UPERNET_VITB_160K = SegmentationPreset(
    crop_size=512,  # crop_size = (512, 512)
    resize_scale=(2048, 512),  # ade20k.py: RandomResize scale=(2048, 512), keep_ratio
    ratio_range=(0.5, 2.0),  # ade20k.py: ratio_range=(0.5, 2.0)
    photometric=True,  # ade20k.py: PhotoMetricDistortion
    max_iters=160_000,  # schedule_160k.py
    batch_size=16,  # 8 GPUs × 2 images ("8xb2")
    lr=1e-4,  # AdamW lr=1e-4, betas (0.9, 0.999)
    weight_decay=0.05,
    layer_decay=0.65,  # layer_decay_rate=0.65
    drop_path_rate=0.1,
    warmup_iters=1500,  # LinearLR start_factor=1e-6, end=1500; PolyLR power=1.0 to 160000
    head_channels=768,  # decode_head channels=768
    aux_channels=256,  # upernet_mae.py: auxiliary_head channels=256
    fp16_without_bf16=True,  # the config's "amp": fp16 with loss_scale='dynamic'
    test_mode="slide",  # test_cfg mode='slide', crop_size (512, 512), stride (341, 341)
    slide_stride=341,
    relative_position_bias=True,  # backbone type='MAE': MAEAttention, its table initialised at zero
    layer_scale=1.0,  # backbone init_values=1.0
    val_interval=16_000,  # schedule_160k.py: val_interval=16000, CheckpointHook interval=16000
    checkpoint_interval=16_000,
    log_interval=50,  # schedule_160k.py: LoggerHook interval=50
    # ade20k.py: num_workers=4. Kept, not the machine's count (core.runtime.loader_workers): mmengine seeds each
    # worker by its index and the batches go round the workers, so the count decides the augmentations.
    num_workers=4,
)

# MPViT's UperNet (Lee et al., CVPR 2022, Sec. 4.3; the official semantic_segmentation/configs/mpvit/upernet/
# upernet_mpvit_small_160k_ade20k.py and _base_/models/upernet_mpvit.py): AdamW lr 6e-5, betas (0.9, 0.999),
# wd 0.01, linear warmup 1500 iterations then poly, 160k iterations at 8 GPUs x 2, UPerHead channels 512, the
# auxiliary FCN head on level 3 (in_index 2), whole-image test, no layer decay, no fp16. Drop path is per size
# (the paper's sizes on ADE20K: S 0.2, B 0.4), --drop-path-rate for any other backbone.
MPVIT_UPERNET_160K = dataclasses.replace(
    UPERNET_VITB_160K, lr=6e-5, weight_decay=0.01, layer_decay=1.0, drop_path_rate=None,
    drop_path_by_arch={"mpvit_small": 0.2, "mpvit_base": 0.4}, head_channels=512, fp16_without_bf16=False,
    test_mode="whole", no_decay="none", warmup_inside_poly=True)

# The protocol each preset measures under: a record's protocol_id, and the ids tables/reference/ rows name
# (single-scale test: mmseg's MAE config tests one scale; MPViT's too).
PROTOCOLS = {"upernet_vitb_160k": "upernet-160k-ss", "mpvit_upernet_160k": "mpvit-upernet-160k-ss",
             "embedded_cpu": "ade20k-embedded-cpu"}

PRESETS: dict[str, SegmentationPreset] = {
    "upernet_vitb_160k": UPERNET_VITB_160K,
    "mpvit_upernet_160k": MPVIT_UPERNET_160K,
    # The embedded scenes on a CPU (see README): 64² images (16×16 tokens for the demo's patch-4 ViTs, as the
    # COCO preset), whole-image inference, a narrow head, 100 iterations of 4 images, no validation during
    # training, no worker processes, the pretrained ViT as it is (no relative position bias, no layer scale).
    "embedded_cpu": dataclasses.replace(
        UPERNET_VITB_160K, crop_size=64, resize_scale=(256, 64), ratio_range=(0.75, 1.5), photometric=False,
        max_iters=100, batch_size=4, lr=4e-4, layer_decay=0.75, drop_path_rate=0.0, warmup_iters=10,
        head_channels=64, aux_channels=32, test_mode="whole", val_interval=10**9, checkpoint_interval=50,
        log_interval=10, num_workers=0, relative_position_bias=False, layer_scale=None),
}


@dataclass
class Ade20kConfig:
    """One ADE20K run: the shared run fields, the recipe and this task's options."""

    run: RunSpec = field(default_factory=RunSpec)
    preset: str = "upernet_vitb_160k"
    recipe: SegmentationPreset = UPERNET_VITB_160K
    eval_only: bool = False  # score a trained segmentor (--weights, or the run directory's last checkpoint)
    weights: str | None = None  # --eval-only: an mmengine checkpoint of the whole segmentor
    overlays: int = 4  # predicted-mask overlays saved (PNG)
    # The first N images (sorted file names) of training and of validation, for a quick check on the real data;
    # the record is tagged subset=first<N>.
    subset: int | None = None


# Fields that may differ when a run is continued or scored: a longer schedule extends a run (as mmengine's resume
# does); the rest is logging, workers, where records go, what this invocation does and where the folder now is.
HARMLESS = ("max_iters", "val_interval", "checkpoint_interval", "log_interval", "num_workers", "overlays", "results",
            "resume", "eval_only", "weights", "out", "tags")


# ----------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class EmbeddedSet:
    """The generated ADE-format set: ``train``/``val`` scenes of ``size``² from scene set ``seed``."""

    size: int = 64
    train: int = 200
    val: int = 50
    seed: int = 0
    max_objects: int = 4


def embedded_manifest(spec: EmbeddedSet) -> dict[str, Any]:
    return {"format": EMBEDDED_FORMAT, **asdict(spec), "classes": list(EMBEDDED_CLASSES)}


def wait_for_embedded_ade20k(root: Path, spec: EmbeddedSet, timeout_s: float = 600.0) -> None:
    """Other ranks wait while rank 0 writes the set (torchrun starts every rank at once)."""
    deadline = time.monotonic() + timeout_s
    manifest = root / "manifest.json"
    while not (manifest.exists() and json.loads(manifest.read_text()) == embedded_manifest(spec)):
        if time.monotonic() > deadline:
            raise DatasetError(f"rank {launch_rank()}: the embedded set in {root} did not appear within "
                               f"{timeout_s:.0f} s")
        time.sleep(1.0)


def make_embedded_ade20k(root: str | os.PathLike, spec: EmbeddedSet = EmbeddedSet()) -> Path:
    """Write (or reuse) the embedded scenes in the ADEChallengeData2016 layout under ``root``.

    A manifest written last marks a complete set; a set with another manifest is rewritten. Scenes depend only
    on (seed, index), so the files are the same on every machine.
    """
    root = Path(root)
    manifest = root / "manifest.json"
    wanted = embedded_manifest(spec)
    if manifest.exists() and json.loads(manifest.read_text()) == wanted:
        return root
    manifest.unlink(missing_ok=True)
    offset = 0
    for split, count in (("training", spec.train), ("validation", spec.val)):
        images, annotations = root / "images" / split, root / "annotations" / split
        for folder in (images, annotations):
            folder.mkdir(parents=True, exist_ok=True)
            for stale in folder.iterdir():
                stale.unlink()
        for index in range(offset, offset + count):  # validation scenes follow the training ones
            scene = make_scene(index, size=spec.size, seed=spec.seed, max_objects=spec.max_objects)
            label = np.ones(scene.image.shape[:2], np.uint8)  # 1: background (the photo)
            for mask, category in zip(scene.masks, scene.categories):
                label[mask] = category + 2  # 2..5: the objects (class index + 1 after the background)
            name = f"scene_{index:06d}"
            Image.fromarray(scene.image).save(images / f"{name}.jpg", quality=95)
            Image.fromarray(label).save(annotations / f"{name}.png")
        offset += count
    manifest.write_text(json.dumps(wanted, indent=1))
    return root


def prepare_embedded_ade20k(root: Path) -> Path:
    """``--embedded``: rank 0 writes the set where it is absent, the other ranks wait for its manifest."""
    if launch_rank() == 0:
        return make_embedded_ade20k(root)
    wait_for_embedded_ade20k(root, EmbeddedSet())
    return root


EMBEDDED = Embedded(root="runs/datasets/ade20k-embedded", preset="embedded_cpu", make=prepare_embedded_ade20k)


def check_layout(root: str | os.PathLike) -> None:
    """Raise DatasetError unless ``root`` holds the ADEChallengeData2016 folders, each image annotated."""
    root = Path(root)
    missing = [folder for folder in ADE20K_FOLDERS if not (root / folder).is_dir()]
    if missing:
        raise DatasetError(
            f"{root} is not an ADE20K root: expected {', '.join(ADE20K_FOLDERS)} (the ADEChallengeData2016 layout; "
            f"missing {', '.join(missing)}); or use --embedded for the generated set")
    for split in ("training", "validation"):
        images = {p.stem for p in (root / "images" / split).glob("*.jpg")}
        labels = {p.stem for p in (root / "annotations" / split).glob("*.png")}
        if not images:
            raise DatasetError(f"{root / 'images' / split} holds no .jpg images")
        unlabelled = sorted(images - labels)
        if unlabelled:
            raise DatasetError(
                f"{len(unlabelled)} images in {root / 'images' / split} have no annotation PNG in "
                f"{root / 'annotations' / split} (e.g. {', '.join(unlabelled[:3])})")


@dataclass(frozen=True)
class SegmentationData:
    """What a data root is, read from the data: ADE20K, or the generated scenes where its manifest says so."""

    root: Path
    name: str  # the record's dataset
    dataset_type: str  # the mmseg dataset class that reads it
    num_classes: int
    manifest: dict[str, Any] | None  # the generated set's manifest


def describe_data(root: str | os.PathLike) -> SegmentationData:
    """Check ``root``'s layout and tell ADE20K from the generated scenes by the manifest the generator writes."""
    root = Path(root)
    check_layout(root)
    path = root / "manifest.json"
    try:
        manifest = json.loads(path.read_text()) if path.is_file() else None
    except ValueError as error:
        raise DatasetError(f"{path}: not readable JSON ({error})") from None
    if isinstance(manifest, dict) and manifest.get("format") == EMBEDDED_FORMAT:
        return SegmentationData(root, "ade20k-embedded", "EmbeddedScenesDataset", len(manifest["classes"]), manifest)
    return SegmentationData(root, "ade20k", "ADE20KDataset", ADE20K_NUM_CLASSES, None)


def check_annotation_labels(root: str | os.PathLike, num_classes: int, cache: Path | None = None,
                            subset: int | None = None) -> int:
    """Scan every annotation PNG's values: 0 (unlabelled) .. ``num_classes``; raise naming the bad files.

    Returns the number of files scanned. A clean scan is remembered in ``cache`` (keyed by the files' count,
    size and newest modification time), so a rerun over the same data skips it. With ``subset``, only the
    annotations of the first N sorted images of each split (those a --subset run reads) are scanned.
    """
    root = Path(root)
    if subset is None:
        files = sorted((root / "annotations").glob("*/*.png"))
    else:  # the annotations of the images the dataset keeps (it sorts images by path)
        files = [root / "annotations" / split / f"{image.stem}.png" for split in ("training", "validation")
                 for image in sorted((root / "images" / split).glob("*.jpg"))[:subset]]
    stats = [f.stat() for f in files]
    key = {"root": str(root.resolve()), "files": len(files), "bytes": sum(s.st_size for s in stats),
           "newest": max((s.st_mtime_ns for s in stats), default=0), "num_classes": num_classes}
    if cache is not None and cache.exists() and json.loads(cache.read_text()) == key:
        return 0
    bad = []
    for path in files:
        with Image.open(path) as label:
            if label.mode not in ("L", "P", "I", "I;16"):
                bad.append(f"{path.relative_to(root)} (mode {label.mode}, not a single-channel label map)")
                continue
            present = np.flatnonzero(np.bincount(np.asarray(label).ravel()))
        outside = present[present > num_classes]
        if outside.size:
            bad.append(f"{path.relative_to(root)} (labels {', '.join(map(str, outside[:5]))})")
    if bad:
        listed = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise DatasetError(f"{len(bad)} annotation files in {root} have labels outside 0..{num_classes} "
                           f"(0 unlabelled, 1..{num_classes} classes): {listed}")
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(key))
    return len(files)


@DATASETS.register_module(force=True)
class EmbeddedScenesDataset(BaseSegDataset):
    """The generated scenes in ADE20K's format and label convention (``reduce_zero_label``)."""

    METAINFO = dict(classes=EMBEDDED_CLASSES, palette=EMBEDDED_PALETTE)

    def __init__(self, img_suffix: str = ".jpg", seg_map_suffix: str = ".png", reduce_zero_label: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(img_suffix=img_suffix, seg_map_suffix=seg_map_suffix,
                         reduce_zero_label=reduce_zero_label, **kwargs)


# ----------------------------------------------------------------------------------------------- model


def architecture_contract(arch: str) -> BackboneContract:
    """The contract of ``arch`` before any weights exist: built on the meta device (no memory, no RNG draws), so
    the segmentor's config can take its levels from ``feature_info``."""
    with torch.device("meta"):
        return backbone_contract(create_backbone(arch))


@MODELS.register_module(force=True)
class MimbenchBackbone(BaseModule):
    """Any of our backbones as an mmseg backbone, through its contract: the maps of its levels (a ViT: the patch
    tokens after blocks 4, 6, 8, 12 of 12; a hierarchical backbone: its four stages), loaded from ``checkpoint``
    by our loader, which raises CheckpointError unless every encoder weight loads. A ViT then gets what the recipe
    adds for the transfer (``relative_position_bias``, ``layer_scale``), starting where it changes nothing."""

    def __init__(self, checkpoint: str, arch: str, which: str = "teacher", img_size: int = 512,
                 drop_path_rate: float = 0.0, relative_position_bias: bool = False,
                 layer_scale: float | None = None) -> None:
        super().__init__()
        options: dict[str, Any] = dict(drop_path_rate=drop_path_rate)
        if architecture_contract(arch).kind == "plain":
            # dynamic size and padding: slide windows at image borders and whole-image inference differ from
            # img_size
            options.update(img_size=img_size, dynamic_img_size=True, dynamic_img_pad=True)
        self.net, self.load_report = backbone_from_checkpoint(checkpoint, arch=arch, which=which, strict=True,
                                                              **options)
        if get_rank() == 0:
            print(self.load_report.summary(), flush=True)
        self.contract = backbone_contract(self.net)
        if self.contract.kind == "plain":
            # The final norm and blocks past the last output never get a gradient (DDP rejects unused parameters).
            self.net.prune_intermediate_layers(list(self.contract.blocks), prune_norm=True, prune_head=True)
            if relative_position_bias:
                add_relative_position_bias(self.net)
            if layer_scale is not None:
                add_layer_scale(self.net, layer_scale)

    def init_weights(self) -> None:
        """Nothing to do: the weights came from the checkpoint (and timm's own init_weights would redraw them
        if mmengine's recursive init reached it)."""
        self._is_init = True

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.contract.features(images))


@OPTIM_WRAPPER_CONSTRUCTORS.register_module(force=True)
class LayerDecayConstructor:
    """AdamW groups from ``mimbench.backbones.layer_decay`` over the backbone's contract: layer i at
    lr × decay^(num_layers + 1 − i) (a ViT: block i at lr × decay^(depth − i), embeddings at lr × decay^(depth + 1)),
    neck and heads at lr. Weight decay as the recipe's ``no_decay`` says: "1d" exempts 1-D tensors and biases
    (mmseg's LayerDecayOptimizerConstructor, whose layer ids expect its own ViT's names), "none" decays every
    parameter."""

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: dict | None = None) -> None:
        self.optim_wrapper_cfg = dict(optim_wrapper_cfg)
        self.layer_decay = (paramwise_cfg or {}).get("layer_decay", 1.0)
        self.no_decay = (paramwise_cfg or {}).get("no_decay", "1d")
        if self.no_decay not in ("1d", "none"):
            raise ConfigError(f"--no-decay {self.no_decay!r}: choose 1d or none")

    def __call__(self, model: torch.nn.Module) -> OptimWrapper:
        segmentor = model.module if is_model_wrapper(model) else model
        wrapper_cfg = dict(self.optim_wrapper_cfg)
        optimizer_cfg = dict(wrapper_cfg.pop("optimizer"))
        weight_decay = optimizer_cfg.get("weight_decay", 0.0)
        groups = []
        for group in layer_decay_param_groups(segmentor, segmentor.backbone.contract, weight_decay,
                                              self.layer_decay, backbone_prefix="backbone.net."):
            for name, param in zip(group["param_names"], group["params"]):  # the recipe's decay, tensor by tensor
                exempt = self.no_decay == "1d" and (param.ndim == 1 or name.endswith(".bias"))
                groups.append({"params": [param], "param_names": [name], "lr_scale": group["lr_scale"],
                               "lr": optimizer_cfg["lr"] * group["lr_scale"],
                               "weight_decay": 0.0 if exempt else weight_decay})
        optimizer = OPTIMIZERS.build({**optimizer_cfg, "params": groups})
        return OPTIM_WRAPPERS.build(wrapper_cfg, default_args=dict(optimizer=optimizer))


def lr_schedule(recipe: SegmentationPreset) -> list[dict]:
    """mmengine's schedulers of the recipe: a linear warmup from 1e-6 × lr over warmup_iters and a poly (power 1)
    to 0. mmseg 1.x's MAE config: LinearLR over [0, W), PolyLR over [W, T) (mmengine reaches a scheduler's end value
    at end − 1). ``warmup_inside_poly``, mmcv 1.x's poly with warmup (lr × (1 − t/T) × (r + (1 − r) t/W) while
    t < W): both from 0, ending one step later so that they reach their end values at W and T as mmcv's do."""
    warmup = min(recipe.warmup_iters, recipe.max_iters)
    if recipe.warmup_inside_poly:
        return [dict(type="LinearLR", start_factor=1e-6, by_epoch=False, begin=0, end=warmup + 1),
                dict(type="PolyLR", eta_min=0.0, power=1.0, by_epoch=False, begin=0, end=recipe.max_iters + 1)]
    return [  # mmengine rejects empty phases (a short run may be all warmup)
        *([dict(type="LinearLR", start_factor=1e-6, by_epoch=False, begin=0, end=warmup)] if warmup else []),
        *([dict(type="PolyLR", eta_min=0.0, power=1.0, by_epoch=False, begin=warmup, end=recipe.max_iters)]
          if warmup < recipe.max_iters else []),
    ]


def segmentor_config(checkpoint: str, arch: str, num_classes: int, recipe: SegmentationPreset,
                     which: str = "teacher", sync_bn: bool = False) -> dict:
    """mmseg's EncoderDecoder as data: our backbone, Feature2Pyramid for a plain one, UPerHead and an auxiliary
    FCNHead on the third level."""
    contract = architecture_contract(arch)
    levels = contract.feature_info
    norm_cfg = dict(type="SyncBN" if sync_bn else "BN", requires_grad=True)
    crop = (recipe.crop_size, recipe.crop_size)
    if recipe.test_mode not in ("slide", "whole"):
        raise ConfigError(f"--test-mode {recipe.test_mode!r}: choose slide or whole")
    if recipe.test_mode == "slide":
        test_cfg = dict(mode="slide", crop_size=crop, stride=(recipe.slide_stride, recipe.slide_stride))
    else:
        test_cfg = dict(mode="whole")
    if recipe.relative_position_bias and recipe.test_mode != "slide" and contract.kind == "plain":
        raise ConfigError("--relative-position-bias needs --test-mode slide: the bias covers the crop's token grid, "
                          "and whole images are larger")
    if contract.kind == "plain":  # one stride: a simple pyramid makes strides 4 to 32 of it
        neck = dict(type="Feature2Pyramid", embed_dim=levels[0].channels, rescales=[4, 2, 1, 0.5],
                    norm_cfg=norm_cfg)
    else:  # four stages at strides 4 to 32 feed the heads directly (mmseg's upernet_r50.py)
        neck = None
    in_channels = [level.channels for level in levels]
    return dict(
        type="EncoderDecoder",
        data_preprocessor=dict(type="SegDataPreProcessor", mean=IMAGENET_MEAN_255, std=IMAGENET_STD_255,
                               bgr_to_rgb=True, pad_val=0, seg_pad_val=IGNORE_INDEX, size=crop),
        backbone=dict(type="MimbenchBackbone", checkpoint=str(checkpoint), arch=arch, which=which,
                      img_size=recipe.crop_size, drop_path_rate=recipe.drop_path_rate,
                      relative_position_bias=recipe.relative_position_bias, layer_scale=recipe.layer_scale),
        neck=neck,
        decode_head=dict(type="UPerHead", in_channels=in_channels, in_index=[0, 1, 2, 3],
                         pool_scales=(1, 2, 3, 6), channels=recipe.head_channels, dropout_ratio=0.1,
                         num_classes=num_classes, norm_cfg=norm_cfg, align_corners=False,
                         loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0)),
        auxiliary_head=dict(type="FCNHead", in_channels=in_channels[2], in_index=2, channels=recipe.aux_channels,
                            num_convs=1, concat_input=False, dropout_ratio=0.1, num_classes=num_classes,
                            norm_cfg=norm_cfg, align_corners=False,
                            loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=0.4)),
        train_cfg=dict(),
        test_cfg=test_cfg,
    )


def build_segmentor(checkpoint: str, num_classes: int, recipe: SegmentationPreset, arch: str | None = None,
                    which: str = "teacher") -> torch.nn.Module:
    """The EncoderDecoder for ``checkpoint`` outside a Runner (for inspection and tests)."""
    arch = arch or infer_arch(checkpoint, which)
    with DefaultScope.overwrite_default_scope("mmseg"):  # the config's types are mmseg's (as the Runner's scope)
        return MODELS.build(segmentor_config(checkpoint, arch, num_classes, recipe, which))


# ----------------------------------------------------------------------------------------------- metrics


def score_predictions(predictions: Sequence[np.ndarray], labels: Sequence[np.ndarray], num_classes: int,
                      reduce_zero_label: bool = True) -> dict[str, float]:
    """mIoU, mAcc, aAcc (percent) of predicted class maps against annotation maps, by the Runner's path.

    ``labels`` are raw annotation values; with ``reduce_zero_label`` (ADE20K) 0 becomes ignored and k becomes
    k − 1, as mmseg's LoadAnnotations does; 255 is ignored. Scoring is mmseg's IoUMetric.
    """
    metric = IoUMetric(ignore_index=IGNORE_INDEX, iou_metrics=["mIoU"])
    metric.dataset_meta = dict(classes=[str(c) for c in range(num_classes)])
    samples = []
    for prediction, label in zip(predictions, labels):
        label = np.asarray(label).astype(np.int64)
        if reduce_zero_label:
            label = np.where(label == 0, IGNORE_INDEX, label - 1)
            label[label == IGNORE_INDEX - 1] = IGNORE_INDEX
        samples.append(dict(pred_sem_seg=dict(data=torch.as_tensor(np.asarray(prediction))[None]),
                            gt_sem_seg=dict(data=torch.as_tensor(label)[None])))
    metric.process({}, samples)
    return {name: round(float(value), 2) for name, value in metric.compute_metrics(metric.results).items()}


# ----------------------------------------------------------------------------------------------- runner


def training_precision(precision: str, device: torch.device,
                       recipe: SegmentationPreset) -> tuple[dict, torch.dtype | None]:
    """mmengine's optimizer wrapper for ``precision`` (core's choice) on ``device``, and the dtype it trains in.

    mmengine autocasts on GPUs only (its AmpOptimWrapper refuses the CPU), so a CPU run is fp32, and an explicit
    bf16 there is refused. A GPU without bf16 trains in fp16 with a dynamic loss scale where the recipe says so.
    Evaluation is fp32 either way (mmengine's test loop).
    """
    dtype = autocast_dtype(device, precision)
    if device.type != "cuda":
        if precision == "bf16":
            raise ConfigError("--precision bf16: mmengine autocasts on GPUs only; use fp32 or auto on the CPU")
        return dict(type="OptimWrapper"), None
    if dtype is None:
        return dict(type="OptimWrapper"), None
    if torch.cuda.is_bf16_supported():
        return dict(type="AmpOptimWrapper", dtype="bfloat16"), torch.bfloat16
    if recipe.fp16_without_bf16:
        return dict(type="AmpOptimWrapper", dtype="float16", loss_scale="dynamic"), torch.float16
    return dict(type="OptimWrapper"), None


def runner_config(config: Ade20kConfig, data: SegmentationData, work_dir: Path, arch: str,
                  optim_wrapper: dict) -> dict:
    """The whole mmengine Runner config as data."""
    recipe = config.recipe
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    on_gpu = torch.cuda.is_available()
    if recipe.batch_size % world_size:
        raise ConfigError(f"batch size {recipe.batch_size} does not split over {world_size} processes")
    dataset = dict(type=data.dataset_type, data_root=str(data.root))
    if config.subset is not None:
        # mmengine's BaseDataset keeps the first `indices` samples of its list, and mmseg's BaseSegDataset lists
        # the image folder (scandir order) then sorts by image path: the first N sorted file names.
        dataset["indices"] = config.subset
    crop = (recipe.crop_size, recipe.crop_size)
    train_pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="LoadAnnotations", reduce_zero_label=True),
        dict(type="RandomResize", scale=tuple(recipe.resize_scale), ratio_range=tuple(recipe.ratio_range),
             keep_ratio=True),
        dict(type="RandomCrop", crop_size=crop, cat_max_ratio=0.75),
        dict(type="RandomFlip", prob=0.5),
        *([dict(type="PhotoMetricDistortion")] if recipe.photometric else []),
        dict(type="PackSegInputs"),
    ]
    test_pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="Resize", scale=tuple(recipe.resize_scale), keep_ratio=True),
        dict(type="LoadAnnotations", reduce_zero_label=True),  # after Resize: scored at the original size
        dict(type="PackSegInputs"),
    ]
    workers = dict(num_workers=recipe.num_workers, persistent_workers=recipe.num_workers > 0)
    train_dataloader = dict(
        batch_size=recipe.batch_size // world_size, **workers,
        sampler=dict(type="InfiniteSampler", shuffle=True),
        dataset=dict(dataset, data_prefix=dict(img_path="images/training", seg_map_path="annotations/training"),
                     pipeline=train_pipeline))
    val_dataloader = dict(
        batch_size=1, **workers, sampler=dict(type="DefaultSampler", shuffle=False),
        dataset=dict(dataset, data_prefix=dict(img_path="images/validation",
                                               seg_map_path="annotations/validation"),
                     pipeline=test_pipeline))
    optimizer = dict(type="AdamW", lr=recipe.lr, betas=(0.9, 0.999), weight_decay=recipe.weight_decay)
    # a hierarchical backbone's own BatchNorms are synchronised over the GPUs, as mmseg's SyncBN ResNets
    sync_bn = "torch" if world_size > 1 and architecture_contract(arch).kind == "hierarchical" else None
    return dict(
        default_scope="mmseg",
        work_dir=str(work_dir),
        launcher="pytorch" if world_size > 1 else "none",
        env_cfg=dict(cudnn_benchmark=on_gpu, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
                     dist_cfg=dict(backend="nccl" if on_gpu else "gloo")),
        randomness=dict(seed=config.run.seed),
        model=segmentor_config(config.run.ckpt, arch, data.num_classes, recipe, config.run.which,
                               sync_bn=world_size > 1),
        sync_bn=sync_bn,
        train_dataloader=train_dataloader,
        val_dataloader=val_dataloader,
        test_dataloader=val_dataloader,
        val_evaluator=dict(type="IoUMetric", iou_metrics=["mIoU"]),
        test_evaluator=dict(type="IoUMetric", iou_metrics=["mIoU"]),
        train_cfg=dict(type="IterBasedTrainLoop", max_iters=recipe.max_iters, val_interval=recipe.val_interval),
        val_cfg=dict(type="ValLoop"),
        test_cfg=dict(type="TestLoop"),
        optim_wrapper=dict(**optim_wrapper, optimizer=optimizer, constructor="LayerDecayConstructor",
                           paramwise_cfg=dict(layer_decay=recipe.layer_decay, no_decay=recipe.no_decay)),
        param_scheduler=lr_schedule(recipe),
        default_hooks=dict(
            timer=dict(type="IterTimerHook"),
            logger=dict(type="LoggerHook", interval=recipe.log_interval, log_metric_by_epoch=False),
            param_scheduler=dict(type="ParamSchedulerHook"),
            checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=recipe.checkpoint_interval,
                            max_keep_ckpts=2, save_last=True),
            sampler_seed=dict(type="DistSamplerSeedHook"),
        ),
        log_processor=dict(by_epoch=False),
        log_level="INFO",
        visualizer=dict(type="SegLocalVisualizer", vis_backends=[dict(type="LocalVisBackend")]),
        load_from=str(config.weights) if config.eval_only else None,
        resume=False,
    )


def last_checkpoint(work_dir: Path) -> Path | None:
    """The checkpoint mmengine's CheckpointHook last wrote in ``work_dir`` (its ``last_checkpoint`` file)."""
    pointer = work_dir / "last_checkpoint"
    if not pointer.exists():
        return None
    path = Path(pointer.read_text().strip())
    return path if path.exists() else None


def colourise(label: np.ndarray, palette: Sequence[Sequence[int]]) -> np.ndarray:
    colours = np.zeros((256, 3), np.uint8)
    colours[:len(palette)] = np.asarray(palette, np.uint8)
    return colours[label]


def save_overlays(segmentor: torch.nn.Module, dataloader: Any, palette: Sequence[Sequence[int]], out: Path,
                  count: int) -> list[Path]:
    """``count`` PNGs of [image | ground truth | prediction], masks blended at half opacity over the image."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    segmentor.eval()
    with torch.no_grad():
        for batch in dataloader:
            for sample in segmentor.test_step(batch):
                image = np.asarray(Image.open(sample.img_path).convert("RGB"))
                panels = [image]
                for label in (sample.gt_sem_seg.data, sample.pred_sem_seg.data):
                    label = label.squeeze(0).cpu().numpy().astype(np.uint8)
                    blended = (0.5 * image + 0.5 * colourise(label, palette)).astype(np.uint8)
                    blended[label == IGNORE_INDEX] = image[label == IGNORE_INDEX]
                    panels.append(blended)
                path = out / f"{Path(sample.img_path).stem}.png"
                Image.fromarray(np.concatenate(panels, axis=1)).save(path)
                written.append(path)
                if len(written) >= count:
                    return written
    return written


def check_segmentor_weights(segmentor: torch.nn.Module, path: str | os.PathLike) -> None:
    """Refuse a segmentor checkpoint whose tensors are not this segmentor's: mmengine loads them non-strictly, so a
    backbone or head left out (another architecture, recipe or layout) would be scored silently as initialised."""
    try:
        saved = mmseg_compat.load_mmengine_checkpoint(str(path), "cpu", mmap=True)["state_dict"]
    except Exception as error:  # a damaged or foreign file surfaces as any error type of the unpickler
        raise ConfigError(f"{path}: not a readable mmengine checkpoint ({type(error).__name__})") from None
    expected = {name: tuple(value.shape) for name, value in segmentor.state_dict().items()}
    found = {name: tuple(value.shape) for name, value in saved.items()}
    differ = sorted(name for name in expected.keys() | found.keys() if expected.get(name) != found.get(name))
    if differ:
        raise ConfigError(f"{path} holds another segmentor: {len(differ)} tensors differ in name or shape from "
                          f"this one (e.g. {', '.join(differ[:3])}); use the settings it was trained with")


def loss_history(runner: Runner) -> list[float]:
    """Training losses per iteration logged by this process's run (after a resume: the resumed history too)."""
    if "train/loss" not in runner.message_hub.log_scalars:
        return []
    values, _ = runner.message_hub.get_scalar("train/loss").data
    return [round(float(v), 5) for v in values]


def launch_rank() -> int:
    """This process's rank before the Runner starts the process group (torchrun sets RANK)."""
    return int(os.environ.get("RANK", "0"))


def check_options(config: Ade20kConfig) -> torch.device:
    """Refuse what cannot run before anything is read or written; the device the Runner will use."""
    run = config.run
    if run.ckpt is None:
        raise ConfigError("--ckpt is required (a checkpoint file: ours, official MAE / RC-MAE, timm, MMPretrain, ...)")
    if run.data_root is None:
        raise ConfigError(f"no data: pass --data-root DIR, an ADEChallengeData2016 folder holding "
                          f"{', '.join(ADE20K_FOLDERS)} (ADEChallengeData2016.zip from "
                          f"http://sceneparsing.csail.mit.edu), or --embedded for the generated ADE-format scenes "
                          f"(a CPU demo, not ADE20K)")
    if config.subset is not None and config.subset < 1:
        raise ConfigError(f"--subset {config.subset}: give a positive number of images (the first N sorted file "
                          f"names of training and of validation)")
    if config.eval_only and run.resume:
        raise ConfigError("--eval-only and --resume exclude each other")
    device = resolve_device(None)  # mmengine's Runner takes no device: CUDA when there is one
    try:
        wanted = device if run.device is None else torch.device(run.device)
    except RuntimeError:
        raise ConfigError(f"--device {run.device!r}: not a device (cpu, cuda, cuda:0, ...)") from None
    if wanted.type != device.type:
        raise ConfigError(f"--device {run.device}: mmengine's Runner uses {device.type} on this machine (CUDA "
                          f"whenever there is one); hide the GPUs (CUDA_VISIBLE_DEVICES=) to run on the CPU")
    return device


def checkpoint_arch(run: RunSpec) -> str:
    """The architecture to build (``--arch``, else the checkpoint's), after the loader has read the file: a bad
    checkpoint stops with the loader's one line before anything hashes or writes it."""
    if run.arch:
        read_checkpoint(run.ckpt)
        return run.arch
    return infer_arch(run.ckpt, run.which)


def resolve_drop_path(recipe: SegmentationPreset, arch: str) -> SegmentationPreset:
    """The recipe with its drop path for ``arch`` spelled out (a recipe may set it per backbone size)."""
    rate = per_arch(recipe.drop_path_rate, recipe.drop_path_by_arch, arch, "--drop-path-rate")
    return dataclasses.replace(recipe, drop_path_rate=rate)


def run_protocol(config: Ade20kConfig) -> str:
    """The protocol the run measures under (`mimbench.core.config.protocol_id`): its preset's id when its recipe
    is the preset's for the arch, else the id and what changed."""
    preset = PRESETS.get(config.preset)
    if preset is not None and config.run.arch is not None:
        preset = resolve_drop_path(preset, config.run.arch)
    return protocol_id(PROTOCOLS, config.preset, config.recipe, preset,
                       bookkeeping=("val_interval", "checkpoint_interval", "log_interval", "num_workers"))


def run_ade20k(config: Ade20kConfig) -> Result | None:
    """Train (or only evaluate) UperNet on ``config.run.ckpt`` and append the record; the record on rank 0."""
    device = check_options(config)
    arch = checkpoint_arch(config.run)
    config = dataclasses.replace(config, recipe=resolve_drop_path(config.recipe, arch))
    run, recipe = config.run, config.recipe
    started = time.perf_counter()
    sha256 = file_sha256(run.ckpt)
    subset = f"-first{config.subset}" if config.subset is not None else ""  # never resumes a full run's work
    work_dir = Path(run.out or Path("runs/transfer/ade20k") / config.preset
                    / f"{Path(run.ckpt).stem}-{sha256[:8]}{subset}")
    data = describe_data(run.data_root)
    optim_wrapper, dtype = training_precision(run.precision, device, recipe)
    holds_run = last_checkpoint(work_dir) is not None
    weights = config.weights
    if config.eval_only:
        weights = weights or (str(last_checkpoint(work_dir)) if holds_run else None)
        if weights is None or not Path(weights).is_file():
            raise ConfigError(f"--eval-only: no trained segmentor ({weights or f'no last_checkpoint in {work_dir}'});"
                              f" train first or pass --weights PATH")
    # config.yaml says what was resolved: the run directory, the architecture and the weights scored
    config = dataclasses.replace(config, run=dataclasses.replace(run, out=str(work_dir), arch=arch), weights=weights)
    lock = None
    if launch_rank() == 0:  # the launching process holds the folder; an evaluation of its run is checked as a resume
        lock = start_run(work_dir, to_dict(config), resume=run.resume or (config.eval_only and holds_run),
                         holds_run=holds_run, harmless=HARMLESS)
    try:
        return train_and_record(config, data, work_dir, arch, sha256, started, optim_wrapper, dtype,
                                resumed=run.resume and holds_run)
    finally:
        if lock is not None:
            lock.release()


def train_and_record(config: Ade20kConfig, data: SegmentationData, work_dir: Path, arch: str, sha256: str,
                     started: float, optim_wrapper: dict, dtype: torch.dtype | None, resumed: bool) -> Result | None:
    """The Runner's part of :func:`run_ade20k`, in the locked run directory."""
    if launch_rank() == 0:
        check_annotation_labels(data.root, data.num_classes, cache=work_dir / "annotation_scan.json",
                                subset=config.subset)
    runner_cfg = runner_config(config, data, work_dir, arch, optim_wrapper)
    runner_cfg["resume"] = resumed
    runner = Runner.from_cfg(Config(runner_cfg))
    segmentor = runner.model.module if is_model_wrapper(runner.model) else runner.model
    report = segmentor.backbone.load_report
    if config.eval_only or resumed:
        check_segmentor_weights(segmentor, config.weights if config.eval_only else last_checkpoint(work_dir))
    losses: list[float] = []
    if not config.eval_only:
        runner.train()
        losses = loss_history(runner)
    metrics = {k: round(float(v), 2) for k, v in runner.test().items() if k in ("mIoU", "mAcc", "aAcc")}
    device = next(segmentor.parameters()).device
    if not is_main_process():
        return None
    palette = runner.test_dataloader.dataset.metainfo["palette"]
    overlays = save_overlays(segmentor, runner.test_dataloader, palette, work_dir / "overlays", config.overlays)
    if losses:
        (work_dir / "train_loss.json").write_text(json.dumps(losses))
    facts = dict(data_manifest=data.manifest, num_classes=data.num_classes,
                 world_size=int(os.environ.get("WORLD_SIZE", "1")), optim_wrapper=optim_wrapper["type"],
                 resumed=resumed, loaded_backbone_tensors=len(report.loaded), overlay_files=[str(p) for p in overlays],
                 train_loss_first=losses[0] if losses else None, train_loss_last=losses[-1] if losses else None,
                 val_images=len(runner.test_dataloader.dataset),
                 # the train loop exists only when trained (reading it would build it for --eval-only)
                 train_images=None if config.eval_only else len(runner.train_dataloader.dataset))
    run = dataclasses.replace(config.run, arch=arch)
    result = build_result(task="segmentation", dataset=data.name, protocol="upernet",
                          protocol_id=run_protocol(dataclasses.replace(config, run=run)), metric="mIoU",
                          metrics=metrics,
                          checkpoint=run.ckpt, metadata=report.metadata, sha256=sha256, method=run.method, arch=arch,
                          seed=run.seed, config={**to_dict(config), **facts}, started=started, device=device,
                          dtype=dtype,
                          tags=record_tags(run, subset=None if config.subset is None else f"first{config.subset}"),
                          **backbone_size(arch))
    if dtype == torch.float16:  # core's precision names are bf16 and fp32; this fallback is neither
        result.precision = result.compute["precision"] = "fp16"
    store = append_result(result, run.results)
    print(f"ADE20K UperNet ({result.dataset}, {config.preset}): mIoU {metrics['mIoU']:.2f}, mAcc "
          f"{metrics['mAcc']:.2f}, aAcc {metrics['aAcc']:.2f} -> {store}; overlays in {work_dir / 'overlays'}",
          flush=True)
    return result


# ----------------------------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> Ade20kConfig:
    """The run's configuration from the command line (``mimbench.core.config``: defaults < --config < --preset <
    flags; --embedded: the generated scenes)."""
    return parse_config(Ade20kConfig, argv, prog="transfer/run.py ade20k", description=__doc__, presets=PRESETS,
                        default_preset="upernet_vitb_160k", embedded=EMBEDDED,
                        before_data=lambda config: check_checkpoint(config.run.ckpt))


def main(argv: list[str] | None = None) -> int:
    """``transfer/run.py ade20k ...``: 0 on success, 1 after one ``error:`` line for a problem the user can fix."""
    if wants_printed_config(argv):
        return exit_status(lambda: print_config(config := parse_args(argv), run_protocol(config)))
    return exit_status(lambda: run_ade20k(parse_args(argv)))
