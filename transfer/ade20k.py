"""ADE20K semantic segmentation transfer: UperNet on our ViT backbones through mmsegmentation.

    python transfer/run.py ade20k --ckpt x.pth --data-root /datasets/ADEChallengeData2016
    torchrun --nproc_per_node 8 transfer/run.py ade20k --ckpt x.pth --data-root /datasets/ADEChallengeData2016
    python transfer/run.py ade20k --ckpt x.pth --embedded          # generated ADE-format scenes, CPU, minutes

The protocol is MAE/BEiT's (mmseg's ``mae-base_upernet_8xb2-amp-160k_ade20k-512x512``): the ViT's blocks 4, 6, 8
and 12 (ViT-B) feed Feature2Pyramid (rescales 4, 2, 1, 0.5), a UPerHead decodes, an FCNHead on the third level
adds an auxiliary loss (weight 0.4); AdamW with layer-wise lr decay, linear warmup then poly decay, slide
inference, mIoU / mAcc / aAcc by mmseg's IoUMetric. The checkpoint goes through our loader
(``backbones/checkpoint.py``), which fails unless every encoder weight loads; training, checkpoints, resume and
evaluation are mmengine's Runner. One record per run goes to the results store.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
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

from mimbench.backbones.checkpoint import CheckpointError, infer_arch, load_backbone  # noqa: E402
from mimbench.backbones.layer_decay import layer_decay_param_groups  # noqa: E402
from mimbench.backbones.vit import create_backbone, default_feature_blocks, dense_features  # noqa: E402
from mimbench.core.config import add_dataclass_flags, exit_status  # noqa: E402
from mimbench.core.errors import UserError  # noqa: E402
from mimbench.core.io import file_sha256, run_environment  # noqa: E402
from mimbench.core.runtime import peak_memory_gb  # noqa: E402
from mimbench.results import Result, append_result, checkpoint_fields  # noqa: E402
from mimbench.transfer.scenes import CATEGORIES, make_scene  # noqa: E402

ADE20K_NUM_CLASSES = 150
ADE20K_FOLDERS = ("images/training", "images/validation", "annotations/training", "annotations/validation")
# The embedded set: photo pixels are the "background" class (ADE20K labels every pixel with a stuff or thing
# class, so the photo is stuff here, and an all-background prediction scores only 1/5 of the classes);
# objects are their category. Annotation PNGs follow ADE20K: 0 unlabelled (unused here), k = class k - 1.
EMBEDDED_CLASSES = ("background", *CATEGORIES)
EMBEDDED_PALETTE = [[120, 120, 120], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200]]
IMAGENET_MEAN_255 = [123.675, 116.28, 103.53]
IMAGENET_STD_255 = [58.395, 57.12, 57.375]
IGNORE_INDEX = 255


class SegmentationError(UserError, ValueError):
    """A problem the user can fix (data layout, labels, missing trained weights): one line, no traceback."""


# ----------------------------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class SegmentationPreset:
    crop_size: int = 512
    resize_scale: tuple[int, ...] = (2048, 512)  # (long, short) side bound, kept ratio (ADE20K's 2048×512)
    ratio_range: tuple[float, ...] = (0.5, 2.0)  # random rescale of resize_scale in training
    photometric: bool = True  # mmseg's PhotoMetricDistortion
    max_iters: int = 160_000
    batch_size: int = 16  # in total, split over the GPUs
    lr: float = 1e-4
    weight_decay: float = 0.05
    layer_decay: float = 0.65
    drop_path_rate: float = 0.1
    warmup_iters: int = 1500  # linear from 1e-6 × lr, then poly (power 1) to 0
    head_channels: int = 768  # UPerHead width (MAE/BEiT ViT-B)
    aux_channels: int = 256  # FCNHead width
    amp: str = "bf16"  # "bf16", "fp16" or "none"; bf16 falls back to fp16 on GPUs without it
    test_mode: str = "slide"  # "slide" (crop_size windows, slide_stride apart) or "whole"
    slide_stride: int = 341
    val_interval: int = 16_000
    checkpoint_interval: int = 16_000
    log_interval: int = 50
    num_workers: int = 4
    seed: int = 0


PRESETS: dict[str, SegmentationPreset] = {
    # The paper protocol (MAE / BEiT / MixedAE ADE20K): 512² crops, 160k iterations of batch 16, AdamW 1e-4,
    # layer decay 0.65, drop path 0.1, AMP, slide inference.
    "upernet_vitb_160k": SegmentationPreset(),
    # The embedded scenes on a CPU: 64² images (16×16 tokens for the demo's patch-4 ViTs, as the COCO preset),
    # whole-image inference, a narrow head, fp32 (see README).
    "embedded_cpu": SegmentationPreset(
        crop_size=64, resize_scale=(256, 64), ratio_range=(0.75, 1.5), photometric=False, max_iters=100,
        batch_size=4, lr=4e-4, layer_decay=0.75, drop_path_rate=0.0, warmup_iters=10, head_channels=64,
        aux_channels=32, amp="none", test_mode="whole", val_interval=10**9, checkpoint_interval=50,
        log_interval=10, num_workers=0),
}


@dataclass(frozen=True)
class EmbeddedSet:
    """The generated ADE-format set: ``train``/``val`` scenes of ``size``² from scene set ``seed``."""

    size: int = 64
    train: int = 200
    val: int = 50
    seed: int = 0
    max_objects: int = 4


# ----------------------------------------------------------------------------------------------- data


def embedded_manifest(spec: EmbeddedSet) -> dict[str, Any]:
    return {"format": "ade20k-embedded/1", **asdict(spec), "classes": list(EMBEDDED_CLASSES)}


def wait_for_embedded_ade20k(root: Path, spec: EmbeddedSet, timeout_s: float = 600.0) -> None:
    """Other ranks wait while rank 0 writes the set (torchrun starts every rank at once)."""
    deadline = time.monotonic() + timeout_s
    manifest = root / "manifest.json"
    while not (manifest.exists() and json.loads(manifest.read_text()) == embedded_manifest(spec)):
        if time.monotonic() > deadline:
            raise SegmentationError(f"rank {get_rank_from_env()}: the embedded set in {root} did not appear "
                                    f"within {timeout_s:.0f} s")
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


def check_layout(root: str | os.PathLike) -> None:
    """Raise SegmentationError unless ``root`` holds the ADEChallengeData2016 folders, each image annotated."""
    root = Path(root)
    missing = [folder for folder in ADE20K_FOLDERS if not (root / folder).is_dir()]
    if missing:
        raise SegmentationError(
            f"{root} is not an ADE20K root: expected {', '.join(ADE20K_FOLDERS)} (the ADEChallengeData2016 layout; "
            f"missing {', '.join(missing)}); or use --embedded for the generated set")
    for split in ("training", "validation"):
        images = {p.stem for p in (root / "images" / split).glob("*.jpg")}
        labels = {p.stem for p in (root / "annotations" / split).glob("*.png")}
        if not images:
            raise SegmentationError(f"{root / 'images' / split} holds no .jpg images")
        unlabelled = sorted(images - labels)
        if unlabelled:
            raise SegmentationError(
                f"{len(unlabelled)} images in {root / 'images' / split} have no annotation PNG in "
                f"{root / 'annotations' / split} (e.g. {', '.join(unlabelled[:3])})")


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
        raise SegmentationError(f"{len(bad)} annotation files in {root} have labels outside 0..{num_classes} "
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


@MODELS.register_module(force=True)
class MimbenchViT(BaseModule):
    """Our timm ViT as an mmseg backbone: the patch-token maps after ``out_indices`` (default: blocks 4, 6, 8,
    12 of a 12-block ViT), loaded from ``checkpoint`` by our loader, which raises CheckpointError unless every
    encoder weight loads."""

    def __init__(self, checkpoint: str, arch: str | None = None, which: str = "teacher", img_size: int = 512,
                 drop_path_rate: float = 0.0, out_indices: Sequence[int] | None = None) -> None:
        super().__init__()
        arch = arch or infer_arch(checkpoint, which)
        # dynamic size and padding: slide windows at image borders and whole-image inference differ from img_size
        self.vit = create_backbone(arch, img_size=img_size, drop_path_rate=drop_path_rate,
                                   dynamic_img_size=True, dynamic_img_pad=True)
        self.load_report = load_backbone(self.vit, checkpoint, which=which, strict=True)
        if get_rank() == 0:
            print(self.load_report.summary(), flush=True)
        self.out_indices = tuple(out_indices) if out_indices is not None else default_feature_blocks(
            len(self.vit.blocks))
        # The final norm and blocks past the last output never get a gradient (DDP rejects unused parameters).
        self.vit.prune_intermediate_layers(list(self.out_indices), prune_norm=True, prune_head=True)

    def init_weights(self) -> None:
        """Nothing to do: the weights came from the checkpoint (and timm's own init_weights would redraw them
        if mmengine's recursive init reached it)."""
        self._is_init = True

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(dense_features(self.vit, images, self.out_indices))


@OPTIM_WRAPPER_CONSTRUCTORS.register_module(force=True)
class ViTLayerDecayConstructor:
    """AdamW groups from ``mimbench.backbones.layer_decay``: block i at lr × decay^(depth − i), embeddings at
    lr × decay^(depth + 1), neck and heads at lr; no weight decay on norms, biases, tokens, position embeddings.
    (mmseg's LayerDecayOptimizerConstructor expects its own ViT's parameter names.)"""

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: dict | None = None) -> None:
        self.optim_wrapper_cfg = dict(optim_wrapper_cfg)
        self.layer_decay = (paramwise_cfg or {}).get("layer_decay", 1.0)

    def __call__(self, model: torch.nn.Module) -> OptimWrapper:
        segmentor = model.module if is_model_wrapper(model) else model
        wrapper_cfg = dict(self.optim_wrapper_cfg)
        optimizer_cfg = dict(wrapper_cfg.pop("optimizer"))
        depth = len(segmentor.backbone.vit.blocks)
        groups = layer_decay_param_groups(segmentor, depth, optimizer_cfg.get("weight_decay", 0.0), self.layer_decay)
        for group in groups:
            group["lr"] = optimizer_cfg["lr"] * group["lr_scale"]
        optimizer = OPTIMIZERS.build({**optimizer_cfg, "params": groups})
        return OPTIM_WRAPPERS.build(wrapper_cfg, default_args=dict(optimizer=optimizer))


def segmentor_config(checkpoint: str, arch: str, num_classes: int, preset: SegmentationPreset,
                     which: str = "teacher", embed_dim: int | None = None, sync_bn: bool = False) -> dict:
    """mmseg's EncoderDecoder as data: our ViT, Feature2Pyramid, UPerHead and an auxiliary FCNHead."""
    from mimbench.backbones.vit import ARCHS

    embed_dim = embed_dim or ARCHS[arch]["embed_dim"]
    norm_cfg = dict(type="SyncBN" if sync_bn else "BN", requires_grad=True)
    crop = (preset.crop_size, preset.crop_size)
    if preset.test_mode not in ("slide", "whole"):
        raise SegmentationError(f"--test-mode {preset.test_mode!r}: choose slide or whole")
    if preset.test_mode == "slide":
        test_cfg = dict(mode="slide", crop_size=crop, stride=(preset.slide_stride, preset.slide_stride))
    else:
        test_cfg = dict(mode="whole")
    return dict(
        type="EncoderDecoder",
        data_preprocessor=dict(type="SegDataPreProcessor", mean=IMAGENET_MEAN_255, std=IMAGENET_STD_255,
                               bgr_to_rgb=True, pad_val=0, seg_pad_val=IGNORE_INDEX, size=crop),
        backbone=dict(type="MimbenchViT", checkpoint=str(checkpoint), arch=arch, which=which,
                      img_size=preset.crop_size, drop_path_rate=preset.drop_path_rate),
        neck=dict(type="Feature2Pyramid", embed_dim=embed_dim, rescales=[4, 2, 1, 0.5], norm_cfg=norm_cfg),
        decode_head=dict(type="UPerHead", in_channels=[embed_dim] * 4, in_index=[0, 1, 2, 3],
                         pool_scales=(1, 2, 3, 6), channels=preset.head_channels, dropout_ratio=0.1,
                         num_classes=num_classes, norm_cfg=norm_cfg, align_corners=False,
                         loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0)),
        auxiliary_head=dict(type="FCNHead", in_channels=embed_dim, in_index=2, channels=preset.aux_channels,
                            num_convs=1, concat_input=False, dropout_ratio=0.1, num_classes=num_classes,
                            norm_cfg=norm_cfg, align_corners=False,
                            loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=0.4)),
        train_cfg=dict(),
        test_cfg=test_cfg,
    )


def build_segmentor(checkpoint: str, num_classes: int, preset: SegmentationPreset, arch: str | None = None,
                    which: str = "teacher") -> torch.nn.Module:
    """The EncoderDecoder for ``checkpoint`` outside a Runner (for inspection and tests)."""
    arch = arch or infer_arch(checkpoint, which)
    with DefaultScope.overwrite_default_scope("mmseg"):  # the config's types are mmseg's (as the Runner's scope)
        return MODELS.build(segmentor_config(checkpoint, arch, num_classes, preset, which))


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


@dataclass
class Ade20kOptions:
    ckpt: str
    data_root: str | None = None
    embedded: bool = False
    embedded_root: str = "runs/datasets/ade20k-embedded"
    preset: str | None = None  # None: upernet_vitb_160k for --data-root, embedded_cpu for --embedded
    out: str | None = None  # None: runs/transfer/ade20k/<preset>/<checkpoint>-<sha[:8]>
    which: str = "teacher"
    arch: str | None = None
    method: str | None = None  # for foreign checkpoints without metadata (e.g. "mae")
    eval_only: bool = False
    weights: str | None = None  # --eval-only: a trained segmentor; None: the work dir's last checkpoint
    resume: bool = False
    results: str | None = None
    overlays: int = 4
    # The first N images (sorted file names) of training and of validation, for a quick check on the real data;
    # the record is tagged subset=first<N>.
    subset: int | None = None
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # preset fields from the command line
    embedded_set: EmbeddedSet = EmbeddedSet()


def amp_wrapper(amp: str, on_gpu: bool) -> dict:
    if amp not in ("bf16", "fp16", "none"):
        raise SegmentationError(f"--amp {amp!r}: choose bf16, fp16 or none")
    if amp == "none":
        return dict(type="OptimWrapper")
    if not on_gpu:  # CPU autocast is bf16 only, and without AVX512-BF16/AMX it is far slower than fp32
        return dict(type="OptimWrapper")
    if amp == "bf16" and torch.cuda.is_bf16_supported():
        return dict(type="AmpOptimWrapper", dtype="bfloat16")
    return dict(type="AmpOptimWrapper", dtype="float16", loss_scale="dynamic")


def runner_config(options: Ade20kOptions, preset: SegmentationPreset, data_root: Path, work_dir: Path,
                  arch: str) -> dict:
    """The whole mmengine Runner config as data."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    on_gpu = torch.cuda.is_available()
    if preset.batch_size % world_size:
        raise SegmentationError(f"batch size {preset.batch_size} does not split over {world_size} processes")
    embedded = options.data_root is None
    dataset = dict(type="EmbeddedScenesDataset" if embedded else "ADE20KDataset", data_root=str(data_root))
    if options.subset is not None:
        # mmengine's BaseDataset keeps the first `indices` samples of its list, and mmseg's BaseSegDataset lists
        # the image folder (scandir order) then sorts by image path: the first N sorted file names.
        dataset["indices"] = options.subset
    num_classes = len(EMBEDDED_CLASSES) if embedded else ADE20K_NUM_CLASSES
    crop = (preset.crop_size, preset.crop_size)
    train_pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="LoadAnnotations", reduce_zero_label=True),
        dict(type="RandomResize", scale=tuple(preset.resize_scale), ratio_range=tuple(preset.ratio_range),
             keep_ratio=True),
        dict(type="RandomCrop", crop_size=crop, cat_max_ratio=0.75),
        dict(type="RandomFlip", prob=0.5),
        *([dict(type="PhotoMetricDistortion")] if preset.photometric else []),
        dict(type="PackSegInputs"),
    ]
    test_pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="Resize", scale=tuple(preset.resize_scale), keep_ratio=True),
        dict(type="LoadAnnotations", reduce_zero_label=True),  # after Resize: scored at the original size
        dict(type="PackSegInputs"),
    ]
    workers = dict(num_workers=preset.num_workers, persistent_workers=preset.num_workers > 0)
    train_dataloader = dict(
        batch_size=preset.batch_size // world_size, **workers,
        sampler=dict(type="InfiniteSampler", shuffle=True),
        dataset=dict(dataset, data_prefix=dict(img_path="images/training", seg_map_path="annotations/training"),
                     pipeline=train_pipeline))
    val_dataloader = dict(
        batch_size=1, **workers, sampler=dict(type="DefaultSampler", shuffle=False),
        dataset=dict(dataset, data_prefix=dict(img_path="images/validation",
                                               seg_map_path="annotations/validation"),
                     pipeline=test_pipeline))
    optimizer = dict(type="AdamW", lr=preset.lr, betas=(0.9, 0.999), weight_decay=preset.weight_decay)
    warmup = min(preset.warmup_iters, preset.max_iters)
    return dict(
        default_scope="mmseg",
        work_dir=str(work_dir),
        launcher="pytorch" if world_size > 1 else "none",
        env_cfg=dict(cudnn_benchmark=on_gpu, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
                     dist_cfg=dict(backend="nccl" if on_gpu else "gloo")),
        randomness=dict(seed=preset.seed),
        model=segmentor_config(options.ckpt, arch, num_classes, preset, options.which, sync_bn=world_size > 1),
        train_dataloader=train_dataloader,
        val_dataloader=val_dataloader,
        test_dataloader=val_dataloader,
        val_evaluator=dict(type="IoUMetric", iou_metrics=["mIoU"]),
        test_evaluator=dict(type="IoUMetric", iou_metrics=["mIoU"]),
        train_cfg=dict(type="IterBasedTrainLoop", max_iters=preset.max_iters, val_interval=preset.val_interval),
        val_cfg=dict(type="ValLoop"),
        test_cfg=dict(type="TestLoop"),
        optim_wrapper=dict(**amp_wrapper(preset.amp, on_gpu), optimizer=optimizer,
                           constructor="ViTLayerDecayConstructor",
                           paramwise_cfg=dict(layer_decay=preset.layer_decay)),
        param_scheduler=[  # mmengine rejects empty phases (a short run may be all warmup)
            *([dict(type="LinearLR", start_factor=1e-6, by_epoch=False, begin=0, end=warmup)] if warmup else []),
            *([dict(type="PolyLR", eta_min=0.0, power=1.0, by_epoch=False, begin=warmup, end=preset.max_iters)]
              if warmup < preset.max_iters else []),
        ],
        default_hooks=dict(
            timer=dict(type="IterTimerHook"),
            logger=dict(type="LoggerHook", interval=preset.log_interval, log_metric_by_epoch=False),
            param_scheduler=dict(type="ParamSchedulerHook"),
            checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=preset.checkpoint_interval,
                            max_keep_ckpts=2, save_last=True),
            sampler_seed=dict(type="DistSamplerSeedHook"),
        ),
        log_processor=dict(by_epoch=False),
        log_level="INFO",
        visualizer=dict(type="SegLocalVisualizer", vis_backends=[dict(type="LocalVisBackend")]),
        load_from=None,
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


def loss_history(runner: Runner) -> list[float]:
    """Training losses per iteration logged by this process's run (after a resume: the resumed history too)."""
    if "train/loss" not in runner.message_hub.log_scalars:
        return []
    values, _ = runner.message_hub.get_scalar("train/loss").data
    return [round(float(v), 5) for v in values]


def run_ade20k(options: Ade20kOptions) -> Result | None:
    """Train (or only evaluate) UperNet on ``options.ckpt`` and append the record; the record on rank 0."""
    if options.data_root is None and not options.embedded:
        raise SegmentationError(f"no data: pass --data-root DIR, an ADEChallengeData2016 folder holding "
                                f"{', '.join(ADE20K_FOLDERS)} (ADEChallengeData2016.zip from "
                                f"http://sceneparsing.csail.mit.edu), or --embedded for the generated ADE-format "
                                f"scenes (a CPU demo, not ADE20K)")
    if options.data_root is not None and options.embedded:
        raise SegmentationError("pass either --data-root or --embedded, not both")
    if not Path(options.ckpt).is_file():
        raise CheckpointError(options.ckpt, "no such file")
    preset_name = options.preset or ("embedded_cpu" if options.embedded else "upernet_vitb_160k")
    if preset_name not in PRESETS:
        raise SegmentationError(f"unknown preset {preset_name!r}; choose one of: {', '.join(PRESETS)}")
    if options.subset is not None and options.subset < 1:
        raise SegmentationError(f"--subset {options.subset}: give a positive number of images (the first N sorted "
                                f"file names of training and of validation)")
    preset = dataclasses.replace(PRESETS[preset_name], **options.overrides)
    started = time.perf_counter()
    sha256 = file_sha256(options.ckpt)
    subset = f"-first{options.subset}" if options.subset is not None else ""  # never resumes a full run's work
    work_dir = Path(options.out or Path("runs/transfer/ade20k") / preset_name
                    / f"{Path(options.ckpt).stem}-{sha256[:8]}{subset}")
    if options.embedded:
        data_root = Path(options.embedded_root)
        if get_rank_from_env() == 0:
            make_embedded_ade20k(data_root, options.embedded_set)
        else:
            wait_for_embedded_ade20k(data_root, options.embedded_set)
        num_classes = len(EMBEDDED_CLASSES)
    else:
        data_root = Path(options.data_root)
        num_classes = ADE20K_NUM_CLASSES
    check_layout(data_root)
    if get_rank_from_env() == 0:
        check_annotation_labels(data_root, num_classes, cache=work_dir / "annotation_scan.json",
                                subset=options.subset)
    arch = options.arch or infer_arch(options.ckpt, options.which)

    config = runner_config(options, preset, data_root, work_dir, arch)
    if options.eval_only:
        weights = Path(options.weights) if options.weights else last_checkpoint(work_dir)
        if weights is None or not weights.is_file():
            raise SegmentationError(f"--eval-only: no trained segmentor "
                                    f"({options.weights or f'no last_checkpoint in {work_dir}'}); train first or "
                                    f"pass --weights PATH")
        config["load_from"] = str(weights)
    elif options.resume:
        if last_checkpoint(work_dir) is None:
            raise SegmentationError(f"--resume: no checkpoint in {work_dir} (its last_checkpoint file); run without "
                                    f"--resume to start")
        config["resume"] = True
    runner = Runner.from_cfg(Config(config))
    segmentor = runner.model.module if is_model_wrapper(runner.model) else runner.model
    report = segmentor.backbone.load_report
    losses: list[float] = []
    if not options.eval_only:
        runner.train()
        losses = loss_history(runner)
    metrics = {k: round(float(v), 2) for k, v in runner.test().items() if k in ("mIoU", "mAcc", "aAcc")}
    device = next(segmentor.parameters()).device
    if not is_main_process():
        return None
    palette = EMBEDDED_PALETTE if options.embedded else runner.test_dataloader.dataset.metainfo["palette"]
    overlays = save_overlays(segmentor, runner.test_dataloader, palette, work_dir / "overlays", options.overlays)
    if losses:
        (work_dir / "train_loss.json").write_text(json.dumps(losses))
    details = dict(preset=preset_name, **asdict(preset), data_root=str(data_root), work_dir=str(work_dir),
                   arch=arch, which=options.which, world_size=int(os.environ.get("WORLD_SIZE", "1")),
                   optim_wrapper=config["optim_wrapper"]["type"], eval_only=options.eval_only,
                   weights=config["load_from"], resumed=options.resume, num_classes=num_classes,
                   loaded_backbone_tensors=len(report.loaded), overlays=[str(p) for p in overlays],
                   train_loss_first=losses[0] if losses else None, train_loss_last=losses[-1] if losses else None,
                   subset=options.subset, val_images=len(runner.test_dataloader.dataset),
                   # the train loop exists only when trained (reading it would build it for --eval-only)
                   train_images=None if options.eval_only else len(runner.train_dataloader.dataset))
    if options.embedded:
        details["embedded_set"] = asdict(options.embedded_set)
    found = checkpoint_fields(options.ckpt, report.metadata, sha256, method=options.method, arch=arch)
    result = Result(task="segmentation", dataset="ade20k-embedded" if options.embedded else "ade20k",
                    protocol="upernet", metric="mIoU", value=round(metrics["mIoU"], 2), metrics=metrics,
                    tags={"subset": f"first{options.subset}"} if options.subset is not None else {},
                    seed=preset.seed, config=details, wall_time_s=round(time.perf_counter() - started, 1),
                    peak_memory_gb=round(peak_memory_gb(device), 3), **found, **run_environment(device))
    store = append_result(result, options.results)
    print(f"ADE20K UperNet ({result.dataset}, {preset_name}): mIoU {metrics['mIoU']:.2f}, mAcc "
          f"{metrics['mAcc']:.2f}, aAcc {metrics['aAcc']:.2f} -> {store}; overlays in {work_dir / 'overlays'}",
          flush=True)
    return result


def get_rank_from_env() -> int:
    """This process's rank before the Runner starts the process group (torchrun sets RANK)."""
    return int(os.environ.get("RANK", "0"))


# ----------------------------------------------------------------------------------------------- command line


def parse_args(argv: list[str]) -> Ade20kOptions:
    parser = argparse.ArgumentParser(prog="transfer/run.py ade20k", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="pretrained checkpoint (any format our loader reads)")
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--data-root", help="ADEChallengeData2016 folder (images/ and annotations/ training, "
                                          "validation)")
    data.add_argument("--embedded", action="store_true", help="the generated ADE-format scenes (CPU, minutes)")
    parser.add_argument("--embedded-root", default=Ade20kOptions.embedded_root,
                        help="where the embedded set is written once and reused")
    parser.add_argument("--preset", choices=list(PRESETS),
                        help="default: upernet_vitb_160k with --data-root, embedded_cpu with --embedded")
    parser.add_argument("--out", help="work dir (default runs/transfer/ade20k/<preset>/<checkpoint>-<sha[:8]>)")
    parser.add_argument("--which", default="teacher", help="teacher or student, for files that hold both")
    parser.add_argument("--arch", help="architecture, where the checkpoint does not say")
    parser.add_argument("--method", help="pretraining method for the record, where the checkpoint does not say "
                                         "(e.g. mae for an official MAE file)")
    parser.add_argument("--eval-only", action="store_true",
                        help="score a trained segmentor (--weights, or the work dir's last checkpoint)")
    parser.add_argument("--weights", help="with --eval-only: an mmengine checkpoint of the whole segmentor")
    parser.add_argument("--resume", action="store_true", help="continue from the work dir's last checkpoint")
    parser.add_argument("--results", help="results store (default $MIMBENCH_RESULTS or results/results.jsonl)")
    parser.add_argument("--overlays", type=int, default=4, help="predicted-mask overlays saved (PNG)")
    parser.add_argument("--subset", type=int, help="only the first N images (sorted file names) of training and "
                                                   "of validation: a quick check on the real data; the record is "
                                                   "tagged subset=first<N>")
    options = parser.add_argument_group("preset overrides (defaults come from --preset)")
    add_dataclass_flags(options, SegmentationPreset)
    embedded = parser.add_argument_group("embedded set")
    for field in dataclasses.fields(EmbeddedSet):
        embedded.add_argument(f"--embedded-{field.name.replace('_', '-')}", type=int, default=None)
    args = vars(parser.parse_args(argv))
    if args["eval_only"] and args["resume"]:
        parser.error("--eval-only and --resume exclude each other")
    preset_fields = {f.name for f in dataclasses.fields(SegmentationPreset)}
    overrides = {k: (tuple(v) if isinstance(v, list) else v) for k, v in args.items()
                 if k in preset_fields and v is not None}
    embedded_set = EmbeddedSet(**{f.name: args.pop(f"embedded_{f.name}") for f in dataclasses.fields(EmbeddedSet)
                                  if args.get(f"embedded_{f.name}") is not None})
    plain = {k: v for k, v in args.items() if k in {f.name for f in dataclasses.fields(Ade20kOptions)}}
    return Ade20kOptions(**plain, overrides=overrides, embedded_set=embedded_set)


def main(argv: list[str]) -> int:
    """``transfer/run.py ade20k ...``: 0 on success, 1 after one ``error:`` line for a problem the user can fix."""
    options = parse_args(argv)
    return exit_status(lambda: run_ade20k(options))
