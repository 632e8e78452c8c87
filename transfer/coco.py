"""COCO detection and instance segmentation: Mask R-CNN on our backbones, through Detectron2.

    python transfer/run.py coco --ckpt mixedae.pth --data-root /datasets/coco --num-gpus 8
    python transfer/run.py coco --ckpt mixedae.pth --data-root /datasets/coco --eval-only --out runs/coco/mixedae
    python transfer/run.py coco --ckpt runs/demo/mae/encoder.safetensors --embedded      # generated set, CPU
    python transfer/run.py coco --config runs/coco/mixedae/config.yaml --out runs/coco/again   # replay a run

A ViT follows the ViTDet protocol (Li et al., "Exploring Plain Vision Transformer Backbones for Object
Detection", ECCV 2022, as used by MAE, RC-MAE and MixedAE): the ViT runs on 1024² inputs with window attention and
one global block per quarter of its depth, relative position biases; a simple feature pyramid (scales 4, 2, 1, ½)
feeds Mask R-CNN with LN in its heads; large-scale jitter; AdamW with layer decay. Detectron2's own ``ViT``,
``SimpleFeaturePyramid`` and its ``common/models/mask_rcnn_vitdet.py`` config build that detector. A hierarchical
backbone (four stages at strides 4-32, e.g. ResNet or MPViT; see ``mimbench.backbones.contract``) feeds
Detectron2's own FPN instead, as ``common/models/mask_rcnn_fpn.py`` builds it (frozen batch norm in the
backbone, ``LastLevelMaxPool`` on top), under the same heads and recipe. This module fills in the architecture
from the checkpoint, loads the backbone through our loader, and records the six COCO numbers in the results store.

Configuration: ``--preset NAME`` picks the recipe (:data:`PRESETS`), every field of :class:`CocoConfig` is a flag
of its own name, and ``--config FILE.yaml`` reads a whole configuration (flags override it). The resolved
configuration is written to the run directory as ``config.yaml``; passing it back with ``--config`` replays the
run (into a fresh ``--out``, or with ``--eval-only`` to score its detector again). ``--embedded`` is the same as
``--data-root runs/datasets/coco-embedded --preset embedded_cpu`` after generating that set once
(``--embedded --data-root DIR`` generates it in DIR). What differs for that set comes from its files: its
manifest names it ``coco-embedded`` in records and run folders, and its RLE masks are read as bitmasks.

Run directories follow ``mimbench.core.rundir``: one run at a time in each; a folder that holds a run is continued
with ``--resume`` and refused without it, and a resume whose model or data settings differ from the folder's
``config.yaml`` stops naming them (:data:`HARMLESS` fields may differ). ``--eval-only`` reads a run: it holds the
folder's lock and checks its ``config.yaml`` the same way, but writes no configuration of its own.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import detectron2
import numpy as np
import torch
import torch.nn as nn
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from detectron2.data import (
    DatasetCatalog,
    DatasetMapper,
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.data import transforms as T
from detectron2.data.datasets import register_coco_instances
from detectron2.data.detection_utils import read_image
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import AMPTrainer, SimpleTrainer, create_ddp_model, default_writers, hooks, launch
from detectron2.evaluation import COCOEvaluator, inference_on_dataset
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling.backbone import BACKBONE_REGISTRY, FPN, Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.backbone.vit import ViT
from detectron2.solver import LRMultiplier, WarmupParamScheduler
from detectron2.solver.build import get_default_optimizer_params
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import Visualizer
from fvcore.common.param_scheduler import MultiStepParamScheduler

from mimbench.backbones.checkpoint import (
    CheckpointError,
    LoadReport,
    backbone_from_checkpoint,
    check_checkpoint,
    infer_arch,
    read_checkpoint,
)
from mimbench.backbones.cli import backbone_size
from mimbench.backbones.contract import BackboneContract, backbone_contract
from mimbench.backbones.layer_decay import layer_decay_param_groups
from mimbench.backbones.vit import ARCHS, create_backbone
from mimbench.core.config import (
    Embedded,
    RunSpec,
    config_parser,
    exit_status,
    parse_config,
    print_config,
    protocol_id,
    record_tags,
    to_dict,
    wants_printed_config,
)
from mimbench.core.errors import ConfigError, TrainingDiverged
from mimbench.core.io import file_sha256
from mimbench.core.rundir import CONFIG_NAME, RunLock, differing_fields, read_config, start_run
from mimbench.core.runtime import autocast, autocast_dtype, leave_process_group, resolve_device
from mimbench.results import Result, append_result, build_result
from mimbench.transfer.coco_data import coco_layout, dataset_name, subset_split, write_coco_subset, write_embedded_coco
from mimbench.transfer.recipes import per_arch, vit_width

DETECTRON2_CONFIGS = Path(detectron2.__file__).parent / "model_zoo/configs/common/models"
# Detectron2's own configs, shipped inside its package: ViTDet's Mask R-CNN (heads, simple pyramid) and the
# standard FPN Mask R-CNN whose FPN a hierarchical backbone feeds.
VITDET_CONFIG = DETECTRON2_CONFIGS / "mask_rcnn_vitdet.py"
FPN_CONFIG = DETECTRON2_CONFIGS / "mask_rcnn_fpn.py"
# COCOEvaluator's names -> the results store's (tables/layout.py reads AP_bbox ... AP75_segm).
COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
HEADLINE = "AP_bbox"
logger = logging.getLogger("mimbench.coco")


@dataclass(frozen=True)
class DetectionPreset:
    """A training recipe: data, not code paths. Iteration counts are at ``total_batch_size``; ``--batch-size`` and
    ``--max-iter`` rescale them (:func:`effective_recipe`), while setting a field itself takes it as given."""

    image_size: int  # LSJ crop, test resize and the pyramid's square padding
    total_batch_size: int  # images per iteration over all processes
    iterations: int
    lr: float
    weight_decay: float
    layer_decay: float
    drop_path: float | None  # None: drop_path_by_arch's value for the backbone (`resolve_drop_path`)
    window_size: int  # ViT: window attention's size, in tokens
    warmup_iters: int
    lr_steps: tuple[int, ...]  # iterations where the lr drops ×0.1
    lsj_scale: tuple[float, float]  # large-scale jitter: the resize range, relative to image_size
    pyramid_strides: tuple[int, ...]  # the pyramid's levels (a max-pooled one tops them); a hierarchical backbone
    # feeds the FPN its stages at these strides
    anchor_sizes: tuple[int, ...]  # one per level, the top one included
    rois_per_image: int  # proposals sampled per image for the box and mask heads
    head_channels: int  # width of the pyramid and of the RPN, box and mask heads' convolutions
    box_head_convs: int  # convolutions (LN) before the box head's fc layers
    box_head_fcs: tuple[int, ...]
    proposals: tuple[int, int]  # RPN proposals kept per image after NMS (training, test)
    detections_per_image: int
    checkpoint_period: int
    eval_period: int  # 0: evaluate once, at the end
    log_period: int  # iterations between logged losses (metrics.json, loss_curve.json, TensorBoard)
    # The classic FPN protocol (MPViT's) instead of large-scale jitter: "resize" picks the shortest side from
    # min_sizes (at most max_size long); "detr" does that, or (half the time) DETR's resize-crop-resize first.
    augmentation: str = "lsj"  # "lsj" | "resize" | "detr"
    min_sizes: tuple[int, ...] = ()  # resize/detr: shortest-side choices in training (test: image_size)
    max_size: int = 1333  # resize/detr: the longest side, in training and test
    detr_crop: tuple[int, int] = (384, 600)  # detr: the absolute-range crop after a resize to 400/500/600
    clip_grad: float = 0.0  # the whole model's gradient L2 norm is clipped to this (0: no clipping)
    drop_path_by_arch: dict[str, float] = field(default_factory=dict)  # where drop_path is None
    # ViTDet's heads and optimizer by default; Detectron2's standard FPN Mask R-CNN (Base-RCNN-FPN.yaml) where a
    # hierarchical backbone's official config is that.
    rpn_convs: int = 2  # the RPN head's 3x3 convolutions (ViTDet: 2; Detectron2's StandardRPNHead: 1)
    head_norm: str = "LN"  # the box and mask heads' conv norm (Detectron2's get_norm name; "": none)
    pre_nms_topk: tuple[int, int] = (2000, 1000)  # RPN proposals per level before NMS (training, test)
    backbone_norm: str = "FrozenBN"  # a hierarchical backbone's BatchNorm: "FrozenBN", or "SyncBN" (trained)
    warmup_factor: float = 0.001  # the lr starts at this fraction and rises linearly over warmup_iters
    # Detectron2's get_default_optimizer_params: torch.nn norm layers' weight decay (None: weight_decay, as every
    # other parameter) and the parameters, by their own name, without decay.
    weight_decay_norm: float | None = 0.0
    no_decay: tuple[str, ...] = ("pos_embed",)
    filter_empty: bool = True  # training skips images without annotations
    recompute_boxes: bool = True  # boxes recomputed from the masks after the crop (ViTDet's LSJ loader)


# ViTDet's ViT-B Mask R-CNN, 100 epochs at batch 64: Detectron2's projects/ViTDet/configs/COCO/
# mask_rcnn_vitdet_b_100ep.py and the configs it imports (projects/ViTDet/configs/common/coco_loader_lsj.py;
# configs/common/models/mask_rcnn_vitdet.py, models/mask_rcnn_fpn.py, optim.py and train.py).
VITDET_B_100EP = DetectionPreset(
    image_size=1024,  # coco_loader_lsj.py: image_size = 1024
    total_batch_size=64,  # coco_loader_lsj.py: dataloader.train.total_batch_size = 64
    iterations=184375,  # mask_rcnn_vitdet_b_100ep.py: train.max_iter (100 epochs of 118k images at 64)
    lr=1e-4, weight_decay=0.1,  # optim.py: AdamW(lr=1e-4, weight_decay=0.1)
    layer_decay=0.7,  # mask_rcnn_vitdet_b_100ep.py: get_vit_lr_decay_rate(..., lr_decay_rate=0.7)
    drop_path=0.1, window_size=14,  # mask_rcnn_vitdet.py: drop_path_rate, window_size
    warmup_iters=250, lr_steps=(163889, 177546),  # mask_rcnn_vitdet_b_100ep.py: warmup_length, milestones
    lsj_scale=(0.1, 2.0),  # coco_loader_lsj.py: ResizeScale(min_scale=0.1, max_scale=2.0)
    pyramid_strides=(4, 8, 16, 32),  # mask_rcnn_vitdet.py: scale_factors (4, 2, 1, 0.5) of the stride-16 map
    anchor_sizes=(32, 64, 128, 256, 512),  # mask_rcnn_fpn.py: anchor_generator.sizes
    rois_per_image=512,  # mask_rcnn_fpn.py: roi_heads.batch_size_per_image
    head_channels=256,  # mask_rcnn_vitdet.py: out_channels; mask_rcnn_fpn.py: head widths
    box_head_convs=4, box_head_fcs=(1024,),  # mask_rcnn_vitdet.py: "4conv1fc box head"
    proposals=(1000, 1000),  # mask_rcnn_fpn.py: proposal_generator.post_nms_topk
    detections_per_image=100,  # FastRCNNOutputLayers' test_topk_per_image default
    checkpoint_period=5000,  # common/train.py: checkpointer.period
    eval_period=0,  # ours: one evaluation at the end (common/train.py evaluates every 5000 iterations)
    log_period=20,  # common/train.py: log_period
    # The rest are the field defaults: 2-conv RPN, LN heads, pre-NMS top-k (2000, 1000), warmup factor 0.001, no
    # decay for nn.LayerNorm and pos_embed, empty images dropped, boxes recomputed (tests/test_official_configs.py).
)
# ViT-L and ViT-H (mask_rcnn_vitdet_l_100ep.py, mask_rcnn_vitdet_h_75ep.py): drop path and layer decay per size;
# ViT-H trains 75 epochs (max_iter and milestones x 3 // 4; its warmup stays 250 / 184375 of the run, as the
# config's fraction) and decays every parameter (overrides = {}, weight_decay_norm = None).
VITDET_L_100EP = dataclasses.replace(VITDET_B_100EP, drop_path=0.4, layer_decay=0.8)
VITDET_H_75EP = dataclasses.replace(
    VITDET_B_100EP, drop_path=0.5, layer_decay=0.9, iterations=184375 * 3 // 4,
    lr_steps=tuple(step * 3 // 4 for step in VITDET_B_100EP.lr_steps),
    warmup_iters=round(250 / 184375 * (184375 * 3 // 4)), weight_decay_norm=None, no_decay=())
# ViTDet's preset for a ViT by its size (embed dim); other ViTs take ViT-B's.
VITDET_BY_WIDTH = {768: "vitdet_b_100ep", 1024: "vitdet_l_100ep", 1280: "vitdet_h_75ep"}

# The embedded 64² scenes on a CPU in minutes: the demo's patch-4 tiny ViTs (16×16 tokens, windows of 8), a
# two-level pyramid (strides 4, 8, and 16 max-pooled), anchors for small images, narrow heads (the heads'
# convolutions, not the ViT, dominate a CPU step at 256 channels) and the classic two-fc box head, whose
# classifier starts separating the shapes after ~40 iterations instead of ~220 for the 4-conv head. Measured on
# the 2-core CPU: box AP50 39.1 after the 300 iterations from the demo's 3-epoch MAE encoder.
EMBEDDED_CPU = dataclasses.replace(
    VITDET_B_100EP, image_size=64, total_batch_size=4, iterations=300, lr=1e-3, layer_decay=0.9, drop_path=0.0,
    window_size=8, warmup_iters=30, lr_steps=(240, 280), lsj_scale=(0.5, 1.5), pyramid_strides=(4, 8),
    anchor_sizes=(16, 32, 64), rois_per_image=32, head_channels=64, box_head_convs=0, box_head_fcs=(256, 256),
    proposals=(200, 100), pre_nms_topk=(400, 200), detections_per_image=20, checkpoint_period=100, log_period=5)

# MPViT's Mask R-CNN (Lee et al., CVPR 2022, Sec. 4.2; the official detectron2/configs/Base-RCNN-FPN.yaml,
# maskrcnn/mask_rcnn_mpvit_*_1x.yaml and _ms_3x.yaml, train_net.py): Detectron2's standard FPN Mask R-CNN (1-conv
# RPN, 2-fc box head and 4-conv mask head without norm, pre-NMS top-k 2000 / 1000 per level) over the backbone with
# its BatchNorm trained (SyncBN); AdamW lr 1e-4 with weight decay 0.05 on every parameter, batch 16, 90k iterations
# with steps at 60k/80k, 1000 warmup iterations from 0.01, full-model gradient clipping at 1.0, shortest side 800
# (max 1333), images without annotations kept, boxes as annotated (never recomputed), no layer decay. Drop path is
# per size (the size's config: T/XS 0.1, S 0.2, B 0.4), --drop-path for any other backbone.
MPVIT_MASKRCNN_1X = dataclasses.replace(
    VITDET_B_100EP, image_size=800, total_batch_size=16, iterations=90_000, lr=1e-4, weight_decay=0.05,
    layer_decay=1.0, drop_path=None,
    drop_path_by_arch={"mpvit_tiny": 0.1, "mpvit_xsmall": 0.1, "mpvit_small": 0.2, "mpvit_base": 0.4},
    warmup_iters=1000, lr_steps=(60_000, 80_000), box_head_convs=0,
    box_head_fcs=(1024, 1024), checkpoint_period=10_000, augmentation="resize", min_sizes=(800,), max_size=1333,
    clip_grad=1.0, rpn_convs=1, head_norm="", backbone_norm="SyncBN", warmup_factor=0.01, weight_decay_norm=None,
    no_decay=(), filter_empty=False, recompute_boxes=False)
# 3x multi-scale: 270k iterations, steps at 210k/250k, shortest side 480-800 in steps of 32 with DETR's crop.
MPVIT_MASKRCNN_3X_MS = dataclasses.replace(
    MPVIT_MASKRCNN_1X, iterations=270_000, lr_steps=(210_000, 250_000), augmentation="detr",
    min_sizes=tuple(range(480, 801, 32)))

PRESETS: dict[str, DetectionPreset] = {"vitdet_b_100ep": VITDET_B_100EP, "vitdet_l_100ep": VITDET_L_100EP,
                                       "vitdet_h_75ep": VITDET_H_75EP, "embedded_cpu": EMBEDDED_CPU,
                                       "mpvit_maskrcnn_1x": MPVIT_MASKRCNN_1X,
                                       "mpvit_maskrcnn_3x_ms": MPVIT_MASKRCNN_3X_MS}

# The protocol each preset measures under: a record's protocol_id, and the ids tables/reference/ rows name.
PROTOCOLS = {"vitdet_b_100ep": "vitdet-100ep", "vitdet_l_100ep": "vitdet-100ep", "vitdet_h_75ep": "vitdet-75ep",
             "embedded_cpu": "coco-embedded-cpu",
             "mpvit_maskrcnn_1x": "mpvit-maskrcnn-1x", "mpvit_maskrcnn_3x_ms": "mpvit-maskrcnn-3x-ms"}

# --embedded: the generated COCO-format set (written once, at the embedded preset's image size).
EMBEDDED = Embedded(root="runs/datasets/coco-embedded", preset="embedded_cpu",
                    make=functools.partial(write_embedded_coco, image_size=EMBEDDED_CPU.image_size))


@dataclass
class CocoConfig:
    run: RunSpec = field(default_factory=RunSpec)  # out None: runs/transfer/<dataset>/<preset>/<checkpoint>-<sha>
    preset: str = "vitdet_b_100ep"
    recipe: DetectionPreset = VITDET_B_100EP
    batch_size: int | None = None  # None: the recipe's; another keeps its epochs and scales the lr linearly
    max_iter: int | None = None  # None: the recipe's (scaled for the batch size); a shorter run keeps its shape
    eval_only: bool = False
    weights: str | None = None  # --eval-only: a trained detector (default <out>/model_final.pth)
    num_gpus: int = 1  # processes per machine (Detectron2's launcher; GPUs when there are, else gloo on CPU)
    num_machines: int = 1
    machine_rank: int = 0
    dist_url: str = "auto"  # tcp://<rank-0 host>:<port> for several machines
    # A fixed number, not the machine's count (core.runtime.loader_workers): Detectron2's workers each draw their
    # own augmentations and shard the sampler's order among themselves, so the count decides the batches.
    num_workers: int = 2
    visualize: int = 4  # predictions drawn on this many val images
    # The first N images (by image id) of train2017 and of val2017, for a quick check on the real data: their
    # annotation jsons are written under <out>/subset/ and evaluated as such (training, as always, skips images
    # without annotations); the record is tagged subset=first<N>.
    subset: int | None = None


# Fields a resume (or an --eval-only of the run) may change: where and how the run executes, what it logs and when
# it checkpoints, not the model or the data (out: the folder is the one compared, however it is spelled). max_iter
# too: a resume may extend a run (the schedule follows the new length).
HARMLESS = ("resume", "eval_only", "weights", "out", "results", "num_workers", "visualize", "num_gpus",
            "num_machines", "machine_rank", "dist_url", "log_period", "eval_period", "checkpoint_period", "max_iter",
            "tags")


# ----------------------------------------------------------------------------------------------- the detector


@functools.cache
def arch_contract(arch: str) -> BackboneContract:
    """``arch``'s backbone contract, read off a model built on the meta device (no memory, no random draws)."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        return backbone_contract(create_backbone(arch))


def global_blocks(depth: int) -> list[int]:
    """The last block of each quarter of the depth attends globally (ViTDet: 2, 5, 8, 11 for ViT-B)."""
    return [depth // 4 * (quarter + 1) - 1 for quarter in range(4)]


def simple_pyramid(backbone, arch: str, recipe: DetectionPreset) -> None:
    """ViTDet's backbone config for ``arch``'s ViT (a name in :data:`~mimbench.backbones.vit.ARCHS`): Detectron2's
    ViT with windows and relative positions, and a simple feature pyramid at the recipe's strides."""
    spec = ARCHS[arch]
    scale_factors = tuple(spec["patch_size"] / stride for stride in recipe.pyramid_strides)
    if not set(scale_factors) <= {4.0, 2.0, 1.0, 0.5}:
        raise ConfigError(f"{arch} (patch {spec['patch_size']}) cannot give the pyramid strides "
                          f"{recipe.pyramid_strides}: a simple feature pyramid rescales the patch grid by 4, 2, 1 "
                          "or 1/2; choose another --preset")
    backbone.scale_factors = scale_factors
    backbone.net.update(img_size=recipe.image_size, patch_size=spec["patch_size"], embed_dim=spec["embed_dim"],
                        depth=spec["depth"], num_heads=spec["num_heads"], drop_path_rate=recipe.drop_path,
                        window_size=recipe.window_size, pretrain_img_size=spec["img_size"],
                        window_block_indexes=[i for i in range(spec["depth"])
                                              if i not in global_blocks(spec["depth"])])
    backbone.square_pad = recipe.image_size


class ContractBackbone(Backbone):
    """A hierarchical backbone as Detectron2's bottom-up network, the way ``build_resnet_backbone`` gives FPN a
    ResNet: its contract's levels by name, with channels and stride (``output_shape``), and their maps. Batch
    norm is frozen by default, as Detectron2's ResNets (``norm="FrozenBN"``), or trained ("SyncBN": synchronised
    across processes on GPUs; on a CPU each process keeps its own statistics)."""

    def __init__(self, net: nn.Module, norm: str = "FrozenBN") -> None:
        super().__init__()
        if norm == "FrozenBN":
            net = FrozenBatchNorm2d.convert_frozen_batchnorm(net)
        elif norm == "SyncBN":  # trained, its statistics over every process's images (one GPU each)
            if torch.cuda.is_available() and comm.get_world_size() > 1:
                net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        else:
            raise ConfigError(f"--backbone-norm {norm!r}: choose FrozenBN or SyncBN")
        self.net = net
        self.contract = backbone_contract(self.net)
        levels = self.contract.feature_info
        self._out_features = [level.name for level in levels]
        self._out_feature_channels = {level.name: level.channels for level in levels}
        self._out_feature_strides = {level.name: level.stride for level in levels}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self._out_features, self.contract.features(images)))


@BACKBONE_REGISTRY.register()
def build_contract_fpn_backbone(cfg, input_shape) -> FPN:
    """For Detectron2's yacs configs (``MODEL.BACKBONE.NAME: build_contract_fpn_backbone``): a hierarchical
    backbone of ours (``MODEL.MIMBENCH_ARCH``) under Detectron2's FPN, as ``build_resnet_fpn_backbone`` builds one
    over its ResNets; ``MODEL.FPN.IN_FEATURES`` names the contract's levels (``stage1`` ... ``stage4``)."""
    bottom_up = ContractBackbone(create_backbone(cfg.MODEL.MIMBENCH_ARCH))
    return FPN(bottom_up=bottom_up, in_features=cfg.MODEL.FPN.IN_FEATURES, out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
               norm=cfg.MODEL.FPN.NORM, top_block=LastLevelMaxPool(), fuse_type=cfg.MODEL.FPN.FUSE_TYPE)


def feature_pyramid(config, backbone: nn.Module, recipe: DetectionPreset) -> None:
    """Detectron2's FPN (``mask_rcnn_fpn.py``'s, LastLevelMaxPool on top) over the backbone's stages at the
    recipe's pyramid strides. The input stays as ViTDet's config has it: RGB with ImageNet's mean and std, as
    our backbones are trained (``mask_rcnn_fpn.py``'s BGR caffe means suit Detectron2's own ResNets only)."""
    bottom_up = ContractBackbone(backbone, recipe.backbone_norm)
    by_stride = {shape.stride: name for name, shape in bottom_up.output_shape().items()}
    if not set(recipe.pyramid_strides) <= set(by_stride):
        raise ConfigError(f"{getattr(backbone, 'arch', type(backbone).__name__)} has levels at strides "
                          f"{sorted(by_stride)}, not all of the pyramid's {recipe.pyramid_strides}; choose another "
                          "--preset")
    config.backbone = LazyConfig.load(str(FPN_CONFIG)).model.backbone
    config.backbone.bottom_up = bottom_up
    config.backbone.in_features = [by_stride[stride] for stride in recipe.pyramid_strides]


def configure_heads(config, recipe: DetectionPreset, num_classes: int) -> list[str]:
    """The RPN and ROI heads at the pyramid's levels (the recipe's strides and a max-pooled one over them), with
    the recipe's anchors, widths and sampling; returns the level names."""
    strides = (*recipe.pyramid_strides, 2 * recipe.pyramid_strides[-1])  # the top level max-pools the last one
    levels = [f"p{int(math.log2(stride))}" for stride in strides]
    config.proposal_generator.in_features = levels
    config.proposal_generator.anchor_generator.update(sizes=[[size] for size in recipe.anchor_sizes],
                                                      strides=list(strides))
    heads = config.roi_heads
    heads.box_in_features = heads.mask_in_features = levels[:-1]
    heads.box_pooler.scales = heads.mask_pooler.scales = tuple(1 / stride for stride in strides[:-1])
    heads.batch_size_per_image = recipe.rois_per_image
    heads.box_predictor.test_topk_per_image = recipe.detections_per_image
    config.proposal_generator.update(pre_nms_topk=recipe.pre_nms_topk, post_nms_topk=recipe.proposals)
    config.proposal_generator.head.conv_dims = [-1] * recipe.rpn_convs
    heads.box_head.conv_norm = heads.mask_head.conv_norm = recipe.head_norm
    width = recipe.head_channels
    config.backbone.out_channels = config.proposal_generator.head.in_channels = width
    heads.box_head.input_shape.channels = heads.mask_head.input_shape.channels = width
    heads.box_head.update(conv_dims=[width] * recipe.box_head_convs, fc_dims=list(recipe.box_head_fcs))
    heads.box_predictor.input_shape.channels = recipe.box_head_fcs[-1]
    heads.mask_head.conv_dims = [width] * 5
    config.roi_heads.num_classes = num_classes
    return levels


def build_detector(arch: str, recipe: DetectionPreset, num_classes: int, backbone: nn.Module | None = None
                   ) -> nn.Module:
    """Mask R-CNN for ``arch``: ViTDet's (a simple pyramid over Detectron2's ViT) for a plain backbone, Detectron2's
    FPN over ``backbone`` (default: ``arch`` randomly initialised) for a hierarchical one; heads from ViTDet's
    config with the recipe's levels, anchors and proposal sampling."""
    config = LazyConfig.load(str(VITDET_CONFIG)).model
    if arch_contract(arch).kind == "plain":
        simple_pyramid(config.backbone, arch, recipe)
    else:
        feature_pyramid(config, backbone or create_backbone(arch, drop_path_rate=recipe.drop_path), recipe)
    levels = configure_heads(config, recipe, num_classes)
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


def detector_from_checkpoint(config: CocoConfig, recipe: DetectionPreset, num_classes: int
                             ) -> tuple[nn.Module, LoadReport]:
    """The detector with the checkpoint's backbone in it. A ViT's weights go into ViTDet's own ViT after the
    detector is built; a hierarchical backbone is loaded first and built into the FPN as it is."""
    run = config.run
    if arch_contract(run.arch).kind == "plain":
        model = build_detector(run.arch, recipe, num_classes)
        return model, load_encoder(model.backbone.net, run.ckpt, run.arch, run.which)
    backbone, report = backbone_from_checkpoint(run.ckpt, arch=run.arch, which=run.which,
                                                drop_path_rate=recipe.drop_path)
    return build_detector(run.arch, recipe, num_classes, backbone), report


# Where each detector keeps the backbone's weights: ViTDet's ViT in the simple pyramid, ours under the FPN.
BACKBONE_PREFIX = {"plain": "backbone.net.", "hierarchical": "backbone.bottom_up.net."}


def optimizer_for(detector: nn.Module, arch: str, recipe: DetectionPreset, lr: float) -> torch.optim.Optimizer:
    """AdamW over Detectron2's own parameter groups (``get_default_optimizer_params``: the recipe's weight decay,
    none for torch.nn norm layers where ``weight_decay_norm`` is 0 and for the ``no_decay`` names), with layer-wise
    lr decay by the backbone's contract (its layers decay; pyramid and heads get the full lr). ``detector`` is the
    bare model, not its DDP wrapper (the prefix names its own parameters)."""
    contract = arch_contract(arch)
    scales = {name: group["lr_scale"] for group in layer_decay_param_groups(
        detector, contract, recipe.weight_decay, recipe.layer_decay, backbone_prefix=BACKBONE_PREFIX[contract.kind])
        for name in group["param_names"]}
    groups = get_default_optimizer_params(
        detector, base_lr=lr, weight_decay=recipe.weight_decay, weight_decay_norm=recipe.weight_decay_norm,
        overrides={name: {"weight_decay": 0.0} for name in recipe.no_decay}, lr_factor_func=scales.__getitem__)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))


class CPUAutocastTrainer(SimpleTrainer):
    """SimpleTrainer under bf16 autocast on a CPU (Detectron2's AMPTrainer requires CUDA)."""

    def run_step(self) -> None:
        with autocast(torch.device("cpu"), torch.bfloat16):
            super().run_step()


def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    """Clip the L2 norm of every gradient the optimizer steps to ``max_norm`` before each step (Detectron2's
    CLIP_TYPE full_model); under a grad scaler the step sees unscaled gradients."""
    step = optimizer.step

    def clipped_step(*args, **kwargs):
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], max_norm)
        return step(*args, **kwargs)

    optimizer.step = clipped_step


def trainer_for(model: nn.Module, loader, optimizer: torch.optim.Optimizer, device: torch.device,
                dtype: torch.dtype | None) -> SimpleTrainer:
    """The trainer of the run's precision: Detectron2's AMP on CUDA, autocast on a CPU, else plain fp32."""
    if dtype is None:
        return SimpleTrainer(model, loader, optimizer)
    if device.type == "cuda":
        return AMPTrainer(model, loader, optimizer, precision=dtype)
    return CPUAutocastTrainer(model, loader, optimizer)


# ----------------------------------------------------------------------------------------------- data


def check_subset(subset: int | None) -> None:
    if subset is not None and subset < 1:
        raise ConfigError(f"--subset {subset}: give a positive number of images (the first N by image id)")


def register_splits(config: CocoConfig, subset_dir: Path | None = None) -> tuple[str, str]:
    """Register train and val with Detectron2's catalog (once per name) and return their names.

    With ``config.subset`` the splits are their first N images, written as jsons under ``subset_dir``.
    """
    check_subset(config.subset)
    root = Path(config.run.data_root)
    prefix = f"{dataset_name(root)}@{root.resolve()}"
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


def mask_format(dataset: list[dict]) -> str:
    """How the masks are read: COCO ships polygons (RLE only for crowds, which training skips); a set with RLE
    masks of single objects, like the embedded one, is read as bitmasks (which take polygons too)."""
    rle = any(isinstance(annotation.get("segmentation"), dict) for record in dataset
              for annotation in record["annotations"] if not annotation.get("iscrowd", 0))
    return "bitmask" if rle else "polygon"


class EitherOf(T.Augmentation):
    """One of two augmentation lists, the first with probability ``prob`` (DETR's crop, half the time)."""

    def __init__(self, first: list, second: list, prob: float = 0.5) -> None:
        super().__init__()
        self.first, self.second, self.prob = T.AugmentationList(first), T.AugmentationList(second), prob

    def __call__(self, aug_input):
        return (self.first if np.random.rand() < self.prob else self.second)(aug_input)


def train_augmentations(recipe: DetectionPreset) -> list:
    """Large-scale jitter (ViTDet): flip, resize by the recipe's range of the target size, crop a fixed window;
    or the classic FPN resize (with DETR's crop half the time)."""
    flip = T.RandomFlip(horizontal=True)
    if recipe.augmentation == "lsj":
        return [flip, T.ResizeScale(*recipe.lsj_scale, target_height=recipe.image_size, target_width=recipe.image_size),
                T.FixedSizeCrop(crop_size=(recipe.image_size, recipe.image_size), pad=False)]
    resize = T.ResizeShortestEdge(recipe.min_sizes, recipe.max_size, sample_style="choice")
    if recipe.augmentation == "resize":
        return [flip, resize]
    if recipe.augmentation == "detr":
        crop = [T.ResizeShortestEdge([400, 500, 600], sample_style="choice"),
                T.RandomCrop("absolute_range", recipe.detr_crop)]
        return [flip, EitherOf([*crop, resize], [resize])]
    raise ConfigError(f"--augmentation {recipe.augmentation!r}: choose lsj, resize or detr")


def train_loader(name: str, recipe: DetectionPreset, batch_size: int, num_workers: int, seed: int):
    dataset = get_detection_dataset_dicts(name, filter_empty=recipe.filter_empty)
    mapper = DatasetMapper(
        is_train=True, image_format="RGB", use_instance_mask=True, instance_mask_format=mask_format(dataset),
        recompute_boxes=recipe.recompute_boxes, augmentations=train_augmentations(recipe))
    return build_detection_train_loader(dataset=dataset, mapper=mapper, total_batch_size=batch_size,
                                        num_workers=num_workers, sampler=TrainingSampler(len(dataset), seed=seed))


def test_loader(name: str, recipe: DetectionPreset, num_workers: int):
    mapper = DatasetMapper(is_train=False, image_format="RGB",
                           augmentations=[T.ResizeShortestEdge(recipe.image_size, max_size=recipe.image_size
                                                               if recipe.augmentation == "lsj" else recipe.max_size)])
    return build_detection_test_loader(dataset=get_detection_dataset_dicts(name, filter_empty=False),
                                       mapper=mapper, num_workers=num_workers)


# ----------------------------------------------------------------------------------------------- evaluation


def store_metrics(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """COCOEvaluator's {"bbox": {"AP": ...}, "segm": {...}} as the store's flat AP_bbox ... APl_segm (finite only:
    APs is NaN on a set without small objects). A detector with no prediction at all, for which Detectron2
    reports NaN, scores AP 0 on each task evaluated."""
    metrics = {f"{name}_{task}": round(float(results[task][name]), 3)
               for task in ("bbox", "segm") if task in results
               for name in COCO_METRICS if np.isfinite(results[task].get(name, float("nan")))}
    return {**{f"AP_{task}": 0.0 for task in ("bbox", "segm") if task in results}, **metrics}


def evaluate(model: nn.Module, name: str, recipe: DetectionPreset, out: Path, num_workers: int) -> dict:
    """Box and mask AP on ``name`` by COCOEvaluator (pycocotools)."""
    evaluator = COCOEvaluator(name, tasks=("bbox", "segm"), output_dir=str(out / "inference"),
                              use_fast_impl=False)  # the fast path needs Detectron2's compiled ops
    return inference_on_dataset(model, test_loader(name, recipe, num_workers), evaluator)


def save_visualizations(model: nn.Module, name: str, recipe: DetectionPreset, out: Path, count: int,
                        score_threshold: float = 0.5) -> list[Path]:
    """Predictions above ``score_threshold`` drawn on the first ``count`` val images."""
    metadata, saved = MetadataCatalog.get(name), []
    folder = out / "visualizations"
    folder.mkdir(parents=True, exist_ok=True)
    model.eval()
    with torch.no_grad():
        for index, batch in enumerate(test_loader(name, recipe, num_workers=0)):
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


def resolve_drop_path(recipe: DetectionPreset, arch: str) -> DetectionPreset:
    """The recipe with its drop path for ``arch`` spelled out (a recipe may set it per backbone size)."""
    return dataclasses.replace(recipe, drop_path=per_arch(recipe.drop_path, recipe.drop_path_by_arch, arch,
                                                          "--drop-path"))


def run_protocol(config: CocoConfig) -> str:
    """The protocol the run measures under (`mimbench.core.config.protocol_id`): its preset's id when the recipe it
    runs (``--batch-size`` and ``--max-iter`` applied) is the preset's for the arch, else the id and what changed."""
    preset = PRESETS.get(config.preset)
    if preset is not None and config.run.arch is not None:
        preset = effective_recipe(dataclasses.replace(config, recipe=resolve_drop_path(preset, config.run.arch),
                                                      batch_size=None, max_iter=None))
    recipe = effective_recipe(config) if config.run.arch is not None else config.recipe
    return protocol_id(PROTOCOLS, config.preset, recipe, preset,
                       bookkeeping=("checkpoint_period", "eval_period", "log_period"))


def effective_recipe(config: CocoConfig) -> DetectionPreset:
    """The recipe with --batch-size (same epochs, linear lr) and --max-iter (same schedule shape) applied; a
    ConfigError for a schedule that does not fit its length."""
    recipe = config.recipe
    if config.batch_size and config.batch_size != recipe.total_batch_size:
        scale = recipe.total_batch_size / config.batch_size
        recipe = dataclasses.replace(
            recipe, total_batch_size=config.batch_size, lr=recipe.lr / scale,
            iterations=round(recipe.iterations * scale), warmup_iters=round(recipe.warmup_iters * scale),
            lr_steps=tuple(round(s * scale) for s in recipe.lr_steps),
            checkpoint_period=max(1, round(recipe.checkpoint_period * scale)))
    if config.max_iter is not None:  # a shorter run keeps the schedule's shape
        scale = config.max_iter / recipe.iterations
        recipe = dataclasses.replace(
            recipe, iterations=config.max_iter, warmup_iters=round(recipe.warmup_iters * scale),
            lr_steps=tuple(sorted({min(round(s * scale), config.max_iter - 1) for s in recipe.lr_steps})),
            checkpoint_period=min(recipe.checkpoint_period, config.max_iter))
    steps = recipe.lr_steps
    if recipe.iterations < 1 or list(steps) != sorted(set(steps)) or (steps and steps[-1] >= recipe.iterations):
        raise ConfigError(f"a schedule of {recipe.iterations} iterations cannot drop the lr at {list(steps)}: give "
                          "increasing --lr-steps below the run's length (or --max-iter, which rescales them)")
    return recipe


def default_out(config: CocoConfig, sha256: str) -> Path:
    subset = f"-first{config.subset}" if config.subset is not None else ""  # never mixed with a full run's
    return (Path("runs/transfer") / dataset_name(config.run.data_root) / config.preset /
            f"{Path(config.run.ckpt).stem}-{sha256[:8]}{subset}")


def run_coco(config: CocoConfig) -> Result | None:
    """Train (or only evaluate) the detector and append one record to the results store (on the main process).
    ``config`` is :func:`prepare`'s: the arch and the run directory are filled in."""
    started = time.perf_counter()
    run, recipe, out = config.run, effective_recipe(config), Path(config.run.out)
    device = resolve_device(run.device)
    dtype = None if config.eval_only else autocast_dtype(device, run.precision)  # evaluation runs in fp32
    if comm.is_main_process():
        setup_logger(str(out), distributed_rank=comm.get_rank(), name="detectron2")
        setup_logger(str(out), distributed_rank=comm.get_rank(), name="mimbench")
    seed_all_rng(run.seed + comm.get_rank())
    train_name, val_name = register_splits(config, out / "subset")
    DatasetCatalog.get(val_name)  # reading the (smaller) val json sets the categories both splits share
    num_classes = len(MetadataCatalog.get(val_name).thing_classes)

    model, report = detector_from_checkpoint(config, recipe, num_classes)
    model = model.to(device)
    logger.info("backbone: %s", report.summary())
    # On a CPU, DDP takes no device ids (Detectron2's helper would pass the local rank). Backbone stages above
    # the FPN's levels get no gradient; DDP must then not wait for them.
    bottom_up = getattr(model.backbone, "bottom_up", None)
    unused_stages = bottom_up is not None and len(model.backbone.in_features) < len(bottom_up.output_shape())
    model = create_ddp_model(model, broadcast_buffers=False,
                             device_ids=[comm.get_local_rank()] if device.type == "cuda" else None,
                             find_unused_parameters=unused_stages and comm.get_world_size() > 1)

    if config.eval_only:
        DetectionCheckpointer(model).load(str(trained_weights(config)))
    else:
        train(model, config, recipe, train_name, val_name, device, dtype, len(report.loaded))

    results = evaluate(model, val_name, recipe, out, config.num_workers)
    if not comm.is_main_process():
        return None
    if config.visualize:
        save_visualizations(model, val_name, recipe, out, config.visualize)
    metrics = store_metrics(results)
    dataset = dataset_name(run.data_root)
    result = build_result(
        task="detection", dataset=dataset, protocol="mask-rcnn", protocol_id=run_protocol(config), metric=HEADLINE,
        metrics=metrics,
        checkpoint=run.ckpt, metadata=report.metadata, sha256=None, method=run.method, arch=run.arch,
        seed=run.seed, config={**to_dict(config), "resolved_recipe": asdict(recipe),
                               "processes": comm.get_world_size()},
        started=started, device=device, dtype=dtype,
        tags=record_tags(run, subset=None if config.subset is None else f"first{config.subset}"),
        **backbone_size(run.arch))
    store = append_result(result, run.results)
    summary = ", ".join(f"{k} {v:.1f}" for k, v in metrics.items() if k.startswith(("AP_", "AP50_", "AP75_")))
    print(f"COCO Mask R-CNN ({dataset}): {summary} -> {store}", flush=True)
    return result


def train(model: nn.Module, config: CocoConfig, recipe: DetectionPreset, train_name: str, val_name: str,
          device: torch.device, dtype: torch.dtype | None, encoder_tensors: int) -> None:
    """Detectron2's trainer and hooks; resumes from the run directory's last checkpoint with --resume."""
    out, world_size = Path(config.run.out), comm.get_world_size()
    optimizer = optimizer_for(getattr(model, "module", model), config.run.arch, recipe, recipe.lr)
    if recipe.clip_grad > 0:
        clip_gradients(optimizer, recipe.clip_grad)
    loader = train_loader(train_name, recipe, recipe.total_batch_size, config.num_workers, config.run.seed)
    trainer = trainer_for(model, loader, optimizer, device, dtype)
    steps = [1.0 * 0.1 ** i for i in range(len(recipe.lr_steps) + 1)]
    schedule = WarmupParamScheduler(
        MultiStepParamScheduler(steps, milestones=list(recipe.lr_steps), num_updates=recipe.iterations),
        warmup_factor=recipe.warmup_factor, warmup_length=recipe.warmup_iters / recipe.iterations)
    scheduler = LRMultiplier(optimizer, multiplier=schedule, max_iter=recipe.iterations)
    # The trainer's state holds the iteration, the optimizer, the grad scaler and the hooks' (the scheduler's).
    checkpointer = DetectionCheckpointer(model, str(out), trainer=trainer)
    start_iter = 0
    if config.run.resume and checkpointer.has_checkpoint():
        checkpointer.resume_or_load("", resume=True)
        start_iter = trainer.iter + 1

    evaluation = (lambda: evaluate(model, val_name, recipe, out, config.num_workers))
    trainer.register_hooks([
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=scheduler),
        hooks.PeriodicCheckpointer(checkpointer, recipe.checkpoint_period, max_iter=recipe.iterations,
                                   max_to_keep=2) if comm.is_main_process() else None,
        hooks.EvalHook(recipe.eval_period, evaluation) if recipe.eval_period else None,
        hooks.PeriodicWriter(default_writers(str(out), recipe.iterations), period=recipe.log_period)
        if comm.is_main_process() else None,
    ])
    logger.info("training %d iterations at batch %d (%d processes), lr %.2e; backbone %d tensors from %s",
                recipe.iterations, recipe.total_batch_size, world_size, recipe.lr, encoder_tensors, config.run.ckpt)
    try:
        trainer.train(start_iter, recipe.iterations)
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
    """The resolved configuration (``mimbench.core.config.parse_config``); --ckpt and the data are required."""
    prog = "transfer/run.py coco"
    parser = config_parser(CocoConfig, prog, __doc__, PRESETS, EMBEDDED)
    parser.add_argument("--no-amp", dest="precision", action="store_const", const="fp32",
                        help="the same as --precision fp32")
    config = parse_config(CocoConfig, argv, prog=prog, presets=PRESETS, default_preset=vitdet_preset(argv),
                          embedded=EMBEDDED, parser=parser, before_data=lambda c: check_checkpoint(c.run.ckpt))
    if wants_printed_config(argv):
        return config
    if not config.run.ckpt:
        parser.error("--ckpt is required (a checkpoint file: ours, official MAE / RC-MAE, timm, MMPretrain, ...)")
    if not config.run.data_root:
        parser.error("pass either --data-root DIR (COCO 2017: annotations/instances_{train,val}2017.json, "
                     "train2017/, val2017/) or --embedded (the small generated set for a CPU)")
    return config


def vitdet_preset(argv: list[str] | None) -> str:
    """The default preset: ViTDet's for the checkpoint's ViT size (B, L or H by width), ViT-B's for any other
    backbone."""
    return VITDET_BY_WIDTH.get(vit_width(argv), CocoConfig.preset)


def trained_weights(config: CocoConfig) -> Path:
    return Path(config.weights) if config.weights else Path(config.run.out) / "model_final.pth"


def prepare(config: CocoConfig) -> CocoConfig:
    """Check the run in the launching process, where bad input fails with one line (not once per spawned worker):
    the checkpoint first (the loader's error, before it is hashed or anything is written), then the recipe, the
    data, the precision and the weights to evaluate. Returns the config with the checkpoint's arch and the run
    directory filled in, as ``config.yaml`` records them."""
    run = config.run
    if run.arch is None:
        run = dataclasses.replace(run, arch=infer_arch(run.ckpt, run.which))
    else:
        read_checkpoint(run.ckpt)
    config = dataclasses.replace(config, recipe=resolve_drop_path(config.recipe, run.arch))
    recipe = effective_recipe(config)
    check_subset(config.subset)
    coco_layout(run.data_root)
    autocast_dtype(resolve_device(run.device), run.precision)
    processes = config.num_gpus * config.num_machines
    if recipe.total_batch_size % processes:
        raise ConfigError(f"batch size {recipe.total_batch_size} does not split over {processes} processes")
    if run.out is None:
        run = dataclasses.replace(run, out=str(default_out(config, file_sha256(run.ckpt))))
    config = dataclasses.replace(config, run=run)
    if config.eval_only and not trained_weights(config).is_file():
        raise ConfigError(f"--eval-only: no trained detector at {trained_weights(config)}; train one first or pass "
                          "--weights")
    return config


def hold_run_dir(config: CocoConfig) -> RunLock:
    """The run directory's lock, under the resume rule of ``mimbench.core.rundir``; ``--eval-only`` reads a run, so
    it compares the folder's ``config.yaml`` (where there is one) but writes none."""
    out, settings = Path(config.run.out), to_dict(config)
    if not config.eval_only:
        return start_run(out, settings, resume=config.run.resume, holds_run=(out / "last_checkpoint").is_file(),
                         harmless=HARMLESS)
    lock = RunLock(out).acquire()
    saved = out / CONFIG_NAME
    differ = differing_fields(read_config(saved), settings, HARMLESS) if saved.is_file() else []
    if differ:
        lock.release()
        raise ConfigError(f"--eval-only: {out} holds a detector trained with other settings ({'; '.join(differ)}); "
                          f"evaluate it with its own configuration (--config {saved})")
    return lock


def run_launched(config: CocoConfig) -> None:
    """One process of Detectron2's launcher: the run, then the process group the launcher made is left (the
    launcher itself never destroys it; see ``leave_process_group``)."""
    try:
        run_coco(config)
    finally:
        leave_process_group()


def main(argv: list[str] | None = None) -> int:
    if wants_printed_config(argv):
        return exit_status(lambda: print_config(config := parse_args(argv), run_protocol(config)))

    def launch_run() -> None:
        config = prepare(parse_args(argv))
        lock = hold_run_dir(config) if config.machine_rank == 0 else None  # one holder: the first machine's
        try:
            launch(run_launched, config.num_gpus, num_machines=config.num_machines, machine_rank=config.machine_rank,
                   dist_url=config.dist_url, args=(config,))
        finally:
            if lock is not None:
                lock.release()

    return exit_status(launch_run)
