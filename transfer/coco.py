"""COCO detection and instance segmentation: ViTDet-style Mask R-CNN on our backbones, through Detectron2.

    python transfer/run.py coco --ckpt mixedae.pth --data-root /datasets/coco --num-gpus 8
    python transfer/run.py coco --ckpt mixedae.pth --data-root /datasets/coco --eval-only --out runs/coco/mixedae
    python transfer/run.py coco --ckpt runs/demo/mae/encoder.safetensors --embedded      # generated set, CPU

The protocol (Li et al., "Exploring Plain Vision Transformer Backbones for Object Detection", ECCV 2022, as used
by MAE, RC-MAE and MixedAE): the ViT runs on 1024² inputs with window attention and one global block per quarter
of its depth, relative position biases; a simple feature pyramid (scales 4, 2, 1, ½) feeds Mask R-CNN with LN in
its heads; large-scale jitter; AdamW with layer decay. Detectron2's own ``ViT``, ``SimpleFeaturePyramid`` and its
``common/models/mask_rcnn_vitdet.py`` config build the detector; this module only fills in the architecture from
the checkpoint, loads the encoder through our loader, and records the six COCO numbers in the results store.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import detectron2
import numpy as np
import torch
import torch.nn as nn
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from detectron2.data import (DatasetCatalog, DatasetMapper, MetadataCatalog, build_detection_test_loader,
                             build_detection_train_loader, get_detection_dataset_dicts)
from detectron2.data import transforms as T
from detectron2.data.datasets import register_coco_instances
from detectron2.data.detection_utils import read_image
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import AMPTrainer, SimpleTrainer, create_ddp_model, default_writers, hooks, launch
from detectron2.evaluation import COCOEvaluator, inference_on_dataset
from detectron2.modeling.backbone.vit import ViT
from detectron2.solver import LRMultiplier, WarmupParamScheduler
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import Visualizer
from fvcore.common.param_scheduler import MultiStepParamScheduler

from mimbench.backbones.checkpoint import CheckpointError, LoadReport, backbone_from_checkpoint, infer_arch
from mimbench.backbones.layer_decay import layer_decay_param_groups
from mimbench.backbones.vit import ARCHS
from mimbench.core.config import add_dataclass_flags, exit_status
from mimbench.core.errors import ConfigError, TrainingDiverged
from mimbench.core.io import file_sha256, run_environment
from mimbench.core.runtime import autocast_dtype, peak_memory_gb
from mimbench.results import Result, append_result, checkpoint_fields
from mimbench.transfer.coco_data import (coco_layout, subset_split, write_coco_subset,
                                         write_embedded_coco)

# Detectron2's own ViTDet Mask R-CNN config, shipped inside its package.
VITDET_CONFIG = Path(detectron2.__file__).parent / "model_zoo/configs/common/models/mask_rcnn_vitdet.py"
# COCOEvaluator's names -> the results store's (tables/layout.py reads AP_bbox ... AP75_segm).
COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
logger = logging.getLogger("mimbench.coco")


@dataclass(frozen=True)
class DetectionPreset:
    """A training recipe: data, not code paths. Iteration counts are at ``batch_size``; another batch keeps the
    epochs (iterations scale inversely) and scales the lr linearly."""

    image_size: int  # LSJ crop, test resize and the pyramid's square padding
    batch_size: int  # images per iteration over all processes
    max_iter: int
    lr: float
    weight_decay: float
    layer_decay: float
    drop_path: float
    window_size: int
    warmup_iters: int
    lr_steps: tuple[int, ...]  # iterations where the lr drops ×0.1
    lsj_scale: tuple[float, float] = (0.1, 2.0)  # large-scale jitter
    pyramid_strides: tuple[int, ...] = (4, 8, 16, 32)  # the simple pyramid's levels; a max-pooled one tops them
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)  # one per level, the top one included
    rois_per_image: int = 512  # proposals sampled per image for the box and mask heads
    head_channels: int = 256  # width of the pyramid and of the RPN, box and mask heads' convolutions
    box_head_convs: int = 4  # ViTDet's box head: 4 convolutions (LN) and one fc layer
    box_head_fcs: tuple[int, ...] = (1024,)
    proposals: tuple[int, int] = (1000, 1000)  # RPN proposals kept per image after NMS (training, test)
    detections_per_image: int = 100
    mask_format: str = "polygon"  # COCO ships polygons; the embedded set ships exact RLE masks ("bitmask")
    checkpoint_period: int = 5000
    eval_period: int = 0  # 0: evaluate once, at the end
    log_period: int = 20  # iterations between logged losses (metrics.json, loss_curve.json, TensorBoard)


PRESETS: dict[str, DetectionPreset] = {
    # ViTDet's ViT-B Mask R-CNN, 100 epochs at batch 64 (projects/ViTDet/configs/COCO/mask_rcnn_vitdet_b_100ep.py).
    "vitdet_b_100ep": DetectionPreset(
        image_size=1024, batch_size=64, max_iter=184375, lr=1e-4, weight_decay=0.1, layer_decay=0.7,
        drop_path=0.1, window_size=14, warmup_iters=250, lr_steps=(163889, 177546)),
    # The embedded 64² scenes on a CPU in minutes: the demo's patch-4 tiny ViTs (16×16 tokens, windows of 8),
    # a two-level pyramid (strides 4, 8, and 16 max-pooled), anchors for small images, narrow heads (the heads'
    # convolutions, not the ViT, dominate a CPU step at 256 channels) and the classic two-fc box head, whose
    # classifier starts separating the shapes after ~40 iterations instead of ~220 for the 4-conv head.
    "embedded_cpu": DetectionPreset(
        image_size=64, batch_size=4, max_iter=300, lr=1e-3, weight_decay=0.1, layer_decay=0.9, drop_path=0.0,
        window_size=8, warmup_iters=30, lr_steps=(240, 280), lsj_scale=(0.5, 1.5), pyramid_strides=(4, 8),
        anchor_sizes=(16, 32, 64), rois_per_image=32, head_channels=64, box_head_convs=0, box_head_fcs=(256, 256),
        proposals=(200, 100),
        detections_per_image=20, mask_format="bitmask", checkpoint_period=100, log_period=5),
}


@dataclass
class CocoConfig:
    ckpt: str
    data_root: str | None = None
    embedded: bool = False  # the generated COCO-format set instead of --data-root
    preset: str | None = None  # None: vitdet_b_100ep for --data-root, embedded_cpu for --embedded
    out: str | None = None  # None: runs/transfer/coco[-embedded]/<preset>/<checkpoint>-<sha>
    which: str = "teacher"  # RC-MAE checkpoints hold student and teacher
    arch: str | None = None  # None: from the checkpoint's metadata or shapes
    method: str | None = None  # for foreign checkpoints without metadata (e.g. "mae")
    batch_size: int | None = None  # None: the preset's; the lr scales linearly with it
    max_iter: int | None = None  # None: the preset's (scaled for the batch size)
    eval_only: bool = False
    weights: str | None = None  # --eval-only: a trained detector (default <out>/model_final.pth)
    resume: bool = False  # continue the run in --out from its last checkpoint
    embedded_root: str = "runs/datasets/coco-embedded"  # where --embedded generates its set (once)
    num_gpus: int = 1  # processes per machine (Detectron2's launcher; GPUs when there are, else gloo on CPU)
    num_machines: int = 1
    machine_rank: int = 0
    dist_url: str = "auto"  # tcp://<rank-0 host>:<port> for several machines
    num_workers: int = 2
    # bf16 mixed precision for training: Detectron2's AMP on GPU, autocast on CPUs with native bf16 (elsewhere
    # a CPU emulates bf16, 5x slower than fp32 for this ViT); --no-amp trains in fp32.
    amp: bool = True
    device: str | None = None  # None: cuda when available
    visualize: int = 4  # predictions drawn on this many val images
    seed: int = 0
    results: str | None = None  # the results store (default results/results.jsonl or $MIMBENCH_RESULTS)
    # The first N images (by image id) of train2017 and of val2017, for a quick check on the real data: their
    # annotation jsons are written under <out>/subset/ and evaluated as such (training, as always, skips images
    # without annotations); the record is tagged subset=first<N>.
    subset: int | None = None




# ----------------------------------------------------------------------------------------------- the detector


def global_blocks(depth: int) -> list[int]:
    """The last block of each quarter of the depth attends globally (ViTDet: 2, 5, 8, 11 for ViT-B)."""
    return [depth // 4 * (quarter + 1) - 1 for quarter in range(4)]


def build_detector(arch: str, preset: DetectionPreset, num_classes: int) -> nn.Module:
    """Detectron2's ViTDet Mask R-CNN with ``arch``'s ViT (a name in :data:`~mimbench.backbones.vit.ARCHS`) and
    the preset's pyramid levels, anchors and proposal sampling."""
    spec = ARCHS[arch]
    scale_factors = tuple(spec["patch_size"] / stride for stride in preset.pyramid_strides)
    if not set(scale_factors) <= {4.0, 2.0, 1.0, 0.5}:
        raise ConfigError(f"{arch} (patch {spec['patch_size']}) cannot give the pyramid strides "
                           f"{preset.pyramid_strides}: a simple feature pyramid rescales the patch grid by 4, 2, 1 "
                           "or 1/2; choose another --preset")
    strides = (*preset.pyramid_strides, 2 * preset.pyramid_strides[-1])  # the top level max-pools the last one
    levels = [f"p{int(math.log2(stride))}" for stride in strides]
    config = LazyConfig.load(str(VITDET_CONFIG)).model
    config.backbone.scale_factors = scale_factors
    config.proposal_generator.in_features = levels
    config.proposal_generator.anchor_generator.update(sizes=[[size] for size in preset.anchor_sizes],
                                                      strides=list(strides))
    heads = config.roi_heads
    heads.box_in_features = heads.mask_in_features = levels[:-1]
    heads.box_pooler.scales = heads.mask_pooler.scales = tuple(1 / stride for stride in strides[:-1])
    heads.batch_size_per_image = preset.rois_per_image
    heads.box_predictor.test_topk_per_image = preset.detections_per_image
    config.proposal_generator.update(pre_nms_topk=tuple(2 * n for n in preset.proposals),
                                     post_nms_topk=preset.proposals)
    width = preset.head_channels
    config.backbone.out_channels = config.proposal_generator.head.in_channels = width
    heads.box_head.input_shape.channels = heads.mask_head.input_shape.channels = width
    heads.box_head.update(conv_dims=[width] * preset.box_head_convs, fc_dims=list(preset.box_head_fcs))
    heads.box_predictor.input_shape.channels = preset.box_head_fcs[-1]
    heads.mask_head.conv_dims = [width] * 5
    net = config.backbone.net
    net.update(img_size=preset.image_size, patch_size=spec["patch_size"], embed_dim=spec["embed_dim"],
               depth=spec["depth"], num_heads=spec["num_heads"], drop_path_rate=preset.drop_path,
               window_size=preset.window_size, pretrain_img_size=spec["img_size"],
               window_block_indexes=[i for i in range(spec["depth"]) if i not in global_blocks(spec["depth"])])
    config.backbone.square_pad = preset.image_size
    config.roi_heads.num_classes = num_classes
    model = instantiate(config)
    model.backbone.top_block.in_feature = levels[-2]  # an attribute, not an argument, of LastLevelMaxPool
    return model


# ViTDet's ViT names its weights as timm does, without the class token and final norm (the pyramid starts from
# the last block's tokens) and with relative position tables that pretraining does not have (zero at start).
UNUSED_BY_VITDET = ("cls_token", "norm.weight", "norm.bias")


def load_encoder(net: ViT, ckpt: str, arch: str, which: str = "teacher") -> LoadReport:
    """Load a checkpoint's encoder into ViTDet's ViT through our loader: every encoder weight or a CheckpointError.

    The loader reads any supported format into ``arch``'s timm ViT (refusing < 100% of the encoder or another
    architecture); those weights then go into ViTDet's ViT under the same names.
    """
    encoder, report = backbone_from_checkpoint(ckpt, arch=arch, which=which)
    weights = {k: v for k, v in encoder.state_dict().items()
               if k not in UNUSED_BY_VITDET and not k.startswith(("head.", "fc_norm."))}
    result = net.load_state_dict(weights, strict=False)
    untrained = [k for k in result.missing_keys if ".rel_pos_" not in k]
    if result.unexpected_keys or untrained:
        raise CheckpointError(ckpt, f"does not fit ViTDet's {arch}: unexpected {result.unexpected_keys[:4]}, "
                                    f"missing {untrained[:4]}")
    return report


def optimizer_for(model: nn.Module, depth: int, preset: DetectionPreset, lr: float) -> torch.optim.Optimizer:
    """AdamW with layer-wise lr decay (the shared helper: blocks decay, pyramid and heads get the full lr)."""
    groups = layer_decay_param_groups(model, depth, preset.weight_decay, preset.layer_decay)
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
        del group["param_names"]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))


class CPUAutocastTrainer(SimpleTrainer):
    """SimpleTrainer under bf16 autocast on a CPU (Detectron2's AMPTrainer requires CUDA)."""

    def run_step(self) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            super().run_step()


# ----------------------------------------------------------------------------------------------- data


def check_subset(subset: int | None) -> None:
    if subset is not None and subset < 1:
        raise ConfigError(f"--subset {subset}: give a positive number of images (the first N by image id)")


def register_splits(config: CocoConfig, subset_dir: Path | None = None) -> tuple[str, str]:
    """Register train and val with Detectron2's catalog (once per name) and return their names.

    With ``config.subset`` the splits are their first N images, written as jsons under ``subset_dir``.
    """
    check_subset(config.subset)
    if config.subset is not None and subset_dir is None:
        raise ConfigError("--subset needs a folder for its annotation files (the run's --out)")
    if config.embedded:
        root = Path(config.embedded_root)
        if comm.is_main_process():
            write_embedded_coco(root, image_size=PRESETS["embedded_cpu"].image_size)
        comm.synchronize()
        prefix = "mimbench_embedded"
    else:
        root = Path(config.data_root)
        prefix = f"coco2017@{root.resolve()}"
    splits = list(coco_layout(root).values())
    if config.subset is not None:
        if comm.get_local_rank() == 0:  # one writer per machine; the others wait, then read the same files
            for split in splits:
                write_coco_subset(split, config.subset, subset_dir)
        comm.synchronize()
        splits = [subset_split(split, config.subset, subset_dir) for split in splits]
    names = []
    for split in splits:
        # The subset size is in the name, so a subset is never evaluated under the full split's name.
        name = f"{prefix}_{split.name}" + (f"_first{config.subset}" if config.subset is not None else "")
        if name in DatasetCatalog.list() and MetadataCatalog.get(name).json_file != str(split.json_file):
            DatasetCatalog.remove(name)  # the same subset written under another --out: register that file
            MetadataCatalog.remove(name)
        if name not in DatasetCatalog.list():
            register_coco_instances(name, {}, str(split.json_file), str(split.image_root))
        names.append(name)
    return names[0], names[1]


def train_loader(name: str, preset: DetectionPreset, batch_size: int, num_workers: int, seed: int):
    """Large-scale jitter (ViTDet): flip, resize by 0.1-2.0 of the target size, crop a fixed-size window."""
    mapper = DatasetMapper(
        is_train=True, image_format="RGB", use_instance_mask=True, instance_mask_format=preset.mask_format,
        recompute_boxes=True,
        augmentations=[T.RandomFlip(horizontal=True),
                       T.ResizeScale(*preset.lsj_scale, target_height=preset.image_size,
                                     target_width=preset.image_size),
                       T.FixedSizeCrop(crop_size=(preset.image_size, preset.image_size), pad=False)])
    dataset = get_detection_dataset_dicts(name)
    return build_detection_train_loader(dataset=dataset, mapper=mapper, total_batch_size=batch_size,
                                        num_workers=num_workers, sampler=TrainingSampler(len(dataset), seed=seed))


def test_loader(name: str, preset: DetectionPreset, num_workers: int):
    mapper = DatasetMapper(is_train=False, image_format="RGB",
                           augmentations=[T.ResizeShortestEdge(preset.image_size, max_size=preset.image_size)])
    return build_detection_test_loader(dataset=get_detection_dataset_dicts(name, filter_empty=False),
                                       mapper=mapper, num_workers=num_workers)


# ----------------------------------------------------------------------------------------------- evaluation


def store_metrics(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """COCOEvaluator's {"bbox": {"AP": ...}, "segm": {...}} as the store's flat AP_bbox ... APl_segm (finite only:
    APs is NaN on a set without small objects)."""
    return {f"{name}_{task}": round(float(results[task][name]), 3)
            for task in ("bbox", "segm") if task in results
            for name in COCO_METRICS if np.isfinite(results[task].get(name, float("nan")))}


def evaluate(model: nn.Module, name: str, preset: DetectionPreset, out: Path, num_workers: int) -> dict:
    """Box and mask AP on ``name`` by COCOEvaluator (pycocotools)."""
    evaluator = COCOEvaluator(name, tasks=("bbox", "segm"), output_dir=str(out / "inference"),
                              use_fast_impl=False)  # the fast path needs Detectron2's compiled ops
    return inference_on_dataset(model, test_loader(name, preset, num_workers), evaluator)


def save_visualizations(model: nn.Module, name: str, preset: DetectionPreset, out: Path, count: int,
                        score_threshold: float = 0.5) -> list[Path]:
    """Predictions above ``score_threshold`` drawn on the first ``count`` val images."""
    metadata, saved = MetadataCatalog.get(name), []
    folder = out / "visualizations"
    folder.mkdir(parents=True, exist_ok=True)
    model.eval()
    with torch.no_grad():
        for index, batch in enumerate(test_loader(name, preset, num_workers=0)):
            if index >= count:
                break
            item = batch[0]
            image = np.asarray(read_image(item["file_name"], format="RGB"))
            instances = model([item])[0]["instances"].to("cpu")
            instances = instances[instances.scores > score_threshold]
            drawing = Visualizer(image, metadata).draw_instance_predictions(instances)
            path = folder / f"{Path(item['file_name']).stem}.png"
            drawing.save(str(path))
            saved.append(path)
    return saved


# ----------------------------------------------------------------------------------------------- the run


def resolve_preset(config: CocoConfig) -> tuple[str, DetectionPreset]:
    """The preset with --batch-size (same epochs, linear lr) and --max-iter applied."""
    name = config.preset or ("embedded_cpu" if config.embedded else "vitdet_b_100ep")
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    if config.batch_size and config.batch_size != preset.batch_size:
        scale = preset.batch_size / config.batch_size
        preset = dataclasses.replace(
            preset, batch_size=config.batch_size, lr=preset.lr / scale, max_iter=round(preset.max_iter * scale),
            warmup_iters=round(preset.warmup_iters * scale), lr_steps=tuple(round(s * scale) for s in preset.lr_steps),
            checkpoint_period=max(1, round(preset.checkpoint_period * scale)))
    if config.max_iter is not None:  # a shorter run keeps the schedule's shape
        scale = config.max_iter / preset.max_iter
        preset = dataclasses.replace(
            preset, max_iter=config.max_iter, warmup_iters=round(preset.warmup_iters * scale),
            lr_steps=tuple(sorted({min(round(s * scale), config.max_iter - 1) for s in preset.lr_steps})),
            checkpoint_period=min(preset.checkpoint_period, config.max_iter))
    return name, preset


def default_out(config: CocoConfig, preset_name: str, sha256: str) -> Path:
    dataset = "coco-embedded" if config.embedded else "coco"
    subset = f"-first{config.subset}" if config.subset is not None else ""  # never mixed with a full run's
    return Path("runs/transfer") / dataset / preset_name / f"{Path(config.ckpt).stem}-{sha256[:8]}{subset}"


def run_coco(config: CocoConfig) -> Result | None:
    """Train (or only evaluate) the detector and append one record to the results store (on the main process)."""
    started = time.perf_counter()
    preset_name, preset = resolve_preset(config)
    sha256 = file_sha256(config.ckpt)
    out = Path(config.out) if config.out else default_out(config, preset_name, sha256)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if comm.is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        setup_logger(str(out), distributed_rank=comm.get_rank(), name="detectron2")
        setup_logger(str(out), distributed_rank=comm.get_rank(), name="mimbench")
    seed_all_rng(config.seed + comm.get_rank())
    train_name, val_name = register_splits(config, out / "subset")
    DatasetCatalog.get(val_name)  # reading the (smaller) val json sets the categories both splits share
    num_classes = len(MetadataCatalog.get(val_name).thing_classes)

    arch = config.arch or infer_arch(config.ckpt, config.which)
    model = build_detector(arch, preset, num_classes).to(device)
    report = load_encoder(model.backbone.net, config.ckpt, arch, config.which)
    logger.info("backbone: %s", report.summary())
    # On a CPU, DDP takes no device ids (Detectron2's helper would pass the local rank).
    model = create_ddp_model(model, broadcast_buffers=False,
                             device_ids=[comm.get_local_rank()] if device.type == "cuda" else None)

    if config.eval_only:
        weights = Path(config.weights) if config.weights else out / "model_final.pth"
        if not weights.is_file():
            raise ConfigError(f"--eval-only: no trained detector at {weights}; train one first or pass --weights")
        DetectionCheckpointer(model).load(str(weights))
    else:
        train(model, config, preset, train_name, val_name, device, out, len(report.loaded))

    results = evaluate(model, val_name, preset, out, config.num_workers)
    if not comm.is_main_process():
        return None
    if config.visualize:
        save_visualizations(model, val_name, preset, out, config.visualize)
    metrics = store_metrics(results)
    dataset = "coco-embedded" if config.embedded else "coco"
    found = checkpoint_fields(config.ckpt, report.metadata, sha256, method=config.method, arch=arch)
    result = Result(
        task="detection", dataset=dataset, protocol="mask-rcnn", metric="AP_bbox", value=metrics.get("AP_bbox", 0.0),
        metrics=metrics, seed=config.seed,
        tags={"subset": f"first{config.subset}"} if config.subset is not None else {},
        config={**asdict(config), "preset_name": preset_name, "preset": asdict(preset), "arch": arch,
                "out": str(out), "processes": comm.get_world_size()},
        wall_time_s=round(time.perf_counter() - started, 1), peak_memory_gb=round(peak_memory_gb(device), 3),
        **found, **run_environment(device))
    store = append_result(result, config.results)
    summary = ", ".join(f"{k} {v:.1f}" for k, v in metrics.items() if k.startswith(("AP_", "AP50_", "AP75_")))
    print(f"COCO Mask R-CNN ({dataset}): {summary} -> {store}", flush=True)
    return result


def train(model: nn.Module, config: CocoConfig, preset: DetectionPreset, train_name: str, val_name: str,
          device: torch.device, out: Path, encoder_tensors: int) -> None:
    """Detectron2's trainer and hooks; resumes from ``out``'s last checkpoint with --resume."""
    world_size = comm.get_world_size()
    if preset.batch_size % world_size:
        raise ConfigError(f"batch size {preset.batch_size} does not split over {world_size} processes")
    depth = len(model.module.backbone.net.blocks if hasattr(model, "module") else model.backbone.net.blocks)
    optimizer = optimizer_for(model, depth, preset, preset.lr)
    loader = train_loader(train_name, preset, preset.batch_size, config.num_workers, config.seed)
    if config.amp and device.type == "cuda":
        trainer = AMPTrainer(model, loader, optimizer, precision=torch.bfloat16)
    elif config.amp and autocast_dtype(device) is not None:
        trainer = CPUAutocastTrainer(model, loader, optimizer)
    else:
        trainer = SimpleTrainer(model, loader, optimizer)
    steps = [1.0 * 0.1 ** i for i in range(len(preset.lr_steps) + 1)]
    schedule = WarmupParamScheduler(
        MultiStepParamScheduler(steps, milestones=list(preset.lr_steps), num_updates=preset.max_iter),
        warmup_factor=0.001, warmup_length=preset.warmup_iters / preset.max_iter)
    scheduler = LRMultiplier(optimizer, multiplier=schedule, max_iter=preset.max_iter)
    # The trainer's state holds the iteration, the optimizer, the grad scaler and the hooks' (the scheduler's).
    checkpointer = DetectionCheckpointer(model, str(out), trainer=trainer)
    if checkpointer.has_checkpoint() and not config.resume:
        raise ConfigError(f"{out} holds a run already; pass --resume to continue it, or another --out")
    start_iter = 0
    if config.resume and checkpointer.has_checkpoint():
        checkpointer.resume_or_load("", resume=True)
        start_iter = trainer.iter + 1

    evaluation = (lambda: evaluate(model, val_name, preset, out, config.num_workers))
    trainer.register_hooks([
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=scheduler),
        hooks.PeriodicCheckpointer(checkpointer, preset.checkpoint_period, max_iter=preset.max_iter,
                                   max_to_keep=2) if comm.is_main_process() else None,
        hooks.EvalHook(preset.eval_period, evaluation) if preset.eval_period else None,
        hooks.PeriodicWriter(default_writers(str(out), preset.max_iter), period=preset.log_period)
        if comm.is_main_process() else None,
    ])
    logger.info("training %d iterations at batch %d (%d processes), lr %.2e; backbone %d tensors from %s",
                preset.max_iter, preset.batch_size, world_size, preset.lr, encoder_tensors, config.ckpt)
    try:
        trainer.train(start_iter, preset.max_iter)
    except FloatingPointError as error:  # Detectron2 stops on a non-finite loss; checkpoints on disk are kept
        raise TrainingDiverged(f"{error}; the last good checkpoint is in {out} (--resume continues from it)") \
            from error
    if comm.is_main_process():  # the loss curve, for regression checks
        (out / "loss_curve.json").write_text(json.dumps(loss_curve(out / "metrics.json")))


def loss_curve(metrics_file: Path) -> list[dict[str, float]]:
    """(iteration, total_loss) pairs from Detectron2's JSONWriter output."""
    curve = []
    if metrics_file.is_file():
        for line in metrics_file.read_text().splitlines():
            record = json.loads(line)
            if "total_loss" in record:
                curve.append({"iteration": record["iteration"], "total_loss": record["total_loss"]})
    return curve


# ----------------------------------------------------------------------------------------------- entry point


def parse_args(argv: list[str] | None) -> CocoConfig:
    parser = argparse.ArgumentParser(prog="transfer/run.py coco", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_flags(parser, CocoConfig)
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    if "ckpt" not in args:
        parser.error("--ckpt is required (a checkpoint file: ours, official MAE / RC-MAE, timm, MMPretrain, ...)")
    if bool(args.get("data_root")) == bool(args.get("embedded")):
        parser.error("pass either --data-root DIR (COCO 2017: annotations/instances_{train,val}2017.json, "
                     "train2017/, val2017/) or --embedded (the small generated set for a CPU)")
    return CocoConfig(**args)


def check_inputs(config: CocoConfig) -> CocoConfig:
    """Bad input fails here, in the launching process, with one line (not once per spawned worker); the
    config comes back with the checkpoint's arch filled in, so the workers need not read the file for it."""
    resolve_preset(config)
    check_subset(config.subset)
    if config.data_root:
        coco_layout(config.data_root)
    if config.arch is None:  # reads the checkpoint: a missing, corrupt or foreign file fails here
        config = dataclasses.replace(config, arch=infer_arch(config.ckpt, config.which))
    return config


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)

    def launch_run() -> None:
        checked = check_inputs(config)
        launch(run_coco, checked.num_gpus, num_machines=checked.num_machines, machine_rank=checked.machine_rank,
               dist_url=checked.dist_url, args=(checked,))

    return exit_status(launch_run)
