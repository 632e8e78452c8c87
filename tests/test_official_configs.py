"""Every preset that names an official config equals it: the resolved values against tables of the official values,
each cited ``repo@commit:path:line`` (the line that sets it, read from the official repository at that commit).

A value an official config inherits from its framework's defaults is cited where the framework sets it. Where ours
cannot take the official value, the table says so next to the value and the test checks ours instead.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model

from mimbench.backbones.vit import create_backbone
from mimbench.pretrain import supervised
from mimbench.transfer import coco, finetune

D2 = "facebookresearch/detectron2@02b5c4e295e990042a714712c21dc79b731e8833"
VITDET = f"{D2}:projects/ViTDet/configs"
MPVIT = "youngwanLEE/MPViT@e2d86e6c465abc4847e601f8a401bdd1692836f7:detectron2/configs"
MAE = "facebookresearch/mae@efb2a8062c206524e35e47d04501ed4f544c0ae8"
RCMAE = "youngwanLEE/rc-mae@cf3982300b088945e3bfe43e54d67f826040e47d"
DEIT = "facebookresearch/deit@7e160fe43f0252d17191b71cbb5826254114ea5b"
DEIT_2021 = "facebookresearch/deit@0c4b8f60bdbe6acb438bc7f4805a331ddd19e017"


def assert_official(name: str, preset, official: dict) -> None:
    """Every field of ``official`` (field: (value, citation)) equals the preset's; a mismatch names the source."""
    for field, (value, source) in official.items():
        assert getattr(preset, field) == value, f"{name}.{field}: ours {getattr(preset, field)!r}, {source}"

# ---------------------------------------------------------------------------------------------------- ViTDet

VITDET_B_100EP = {  # field: (official value, where it is set)
    "image_size": (1024, f"{VITDET}/common/coco_loader_lsj.py:6"),
    "total_batch_size": (64, f"{VITDET}/common/coco_loader_lsj.py:16"),
    "lsj_scale": ((0.1, 2.0), f"{VITDET}/common/coco_loader_lsj.py:11"),
    "recompute_boxes": (True, f"{VITDET}/common/coco_loader_lsj.py:18"),
    "iterations": (184375, f"{VITDET}/COCO/mask_rcnn_vitdet_b_100ep.py:25"),
    "lr_steps": ((163889, 177546), f"{VITDET}/COCO/mask_rcnn_vitdet_b_100ep.py:30"),
    "warmup_iters": (250, f"{VITDET}/COCO/mask_rcnn_vitdet_b_100ep.py:33"),
    "warmup_factor": (0.001, f"{VITDET}/COCO/mask_rcnn_vitdet_b_100ep.py:34"),
    "layer_decay": (0.7, f"{VITDET}/COCO/mask_rcnn_vitdet_b_100ep.py:39"),
    "no_decay": (("pos_embed",), f"{VITDET}/COCO/mask_rcnn_vitdet_b_100ep.py:40"),
    "lr": (1e-4, f"{D2}:configs/common/optim.py:25"),
    "weight_decay": (0.1, f"{D2}:configs/common/optim.py:27"),
    "weight_decay_norm": (0.0, f"{D2}:configs/common/optim.py:23"),
    "drop_path": (0.1, f"{D2}:configs/common/models/mask_rcnn_vitdet.py:15"),
    "window_size": (14, f"{D2}:configs/common/models/mask_rcnn_vitdet.py:25"),
    "pyramid_strides": ((4, 8, 16, 32), f"{D2}:configs/common/models/mask_rcnn_vitdet.py:46 (scale factors of 16)"),
    "head_norm": ("LN", f"{D2}:configs/common/models/mask_rcnn_vitdet.py:52"),
    "rpn_convs": (2, f"{D2}:configs/common/models/mask_rcnn_vitdet.py:55"),
    "box_head_convs": (4, f"{D2}:configs/common/models/mask_rcnn_vitdet.py:58"),
    "box_head_fcs": ((1024,), f"{D2}:configs/common/models/mask_rcnn_vitdet.py:59"),
    "anchor_sizes": ((32, 64, 128, 256, 512), f"{D2}:configs/common/models/mask_rcnn_fpn.py:39"),
    "pre_nms_topk": ((2000, 1000), f"{D2}:configs/common/models/mask_rcnn_fpn.py:50"),
    "proposals": ((1000, 1000), f"{D2}:configs/common/models/mask_rcnn_fpn.py:51"),
    "rois_per_image": (512, f"{D2}:configs/common/models/mask_rcnn_fpn.py:56"),
    "detections_per_image": (100, f"{D2}:detectron2/modeling/roi_heads/fast_rcnn.py:191"),
    "filter_empty": (True, f"{D2}:detectron2/config/defaults.py:128 (get_detection_dataset_dicts' default)"),
}
VITDET_L_100EP = {**VITDET_B_100EP,
                  "drop_path": (0.4, f"{VITDET}/COCO/mask_rcnn_vitdet_l_100ep.py:19"),
                  "layer_decay": (0.8, f"{VITDET}/COCO/mask_rcnn_vitdet_l_100ep.py:25")}
VITDET_H_75EP = {**VITDET_B_100EP,
                 "drop_path": (0.5, f"{VITDET}/COCO/mask_rcnn_vitdet_h_75ep.py:19"),
                 "layer_decay": (0.9, f"{VITDET}/COCO/mask_rcnn_vitdet_h_75ep.py:25"),
                 "no_decay": ((), f"{VITDET}/COCO/mask_rcnn_vitdet_h_75ep.py:26"),
                 "weight_decay_norm": (None, f"{VITDET}/COCO/mask_rcnn_vitdet_h_75ep.py:27"),
                 "iterations": (138281, f"{VITDET}/COCO/mask_rcnn_vitdet_h_75ep.py:29 (184375 * 3 // 4)"),
                 "lr_steps": ((122916, 133159), f"{VITDET}/COCO/mask_rcnn_vitdet_h_75ep.py:31 (each * 3 // 4)"),
                 # B's warmup fraction 250 / 184375 of H's run is 187.4997 iterations; ours counts whole ones
                 "warmup_iters": (187, f"{VITDET}/COCO/mask_rcnn_vitdet_b_100ep.py:33 (250 / 184375 of 138281)")}


@pytest.mark.parametrize("name, official", [("vitdet_b_100ep", VITDET_B_100EP), ("vitdet_l_100ep", VITDET_L_100EP),
                                            ("vitdet_h_75ep", VITDET_H_75EP)])
def test_vitdet_presets_equal_detectron2s_configs(name, official):
    preset = coco.PRESETS[name]
    assert_official(name, preset, official)


def test_the_default_coco_preset_follows_the_checkpoints_vit_size():
    assert coco.vitdet_preset(["--arch", "vit_base_patch16_224"]) == "vitdet_b_100ep"
    assert coco.vitdet_preset(["--arch", "vit_large_patch16_224"]) == "vitdet_l_100ep"
    assert coco.vitdet_preset(["--arch", "vit_huge_patch14_224"]) == "vitdet_h_75ep"
    assert coco.vitdet_preset(["--arch", "mpvit_small"]) == "vitdet_b_100ep"


def decays(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, float]:
    named = {id(p): name for name, p in model.named_parameters()}
    return {named[id(p)]: group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}


def test_vitdet_weight_decay_exempts_torch_layer_norms_and_pos_embed_only():
    """Detectron2's get_default_optimizer_params with weight_decay_norm 0 and the pos_embed override: the ViT's
    nn.LayerNorm weights and pos_embed get none; Detectron2's own "LN" (pyramid, heads) and every bias decay."""
    preset = coco.PRESETS["vitdet_b_100ep"]
    model = coco.build_detector("vit_base_patch16_224", preset, num_classes=80)
    wd = decays(coco.optimizer_for(model, "vit_base_patch16_224", preset, lr=1e-4), model)
    exempt = {name for name, value in wd.items() if value == 0.0}
    layer_norms = {f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)
                   for p in ("weight", "bias")}
    assert exempt == layer_norms | {"backbone.net.pos_embed"}
    assert wd["backbone.simfp_2.4.norm.weight"] == wd["roi_heads.box_head.conv1.norm.weight"] == 0.1
    assert wd["backbone.net.blocks.0.attn.qkv.bias"] == wd["roi_heads.box_predictor.cls_score.bias"] == 0.1
    h = coco.PRESETS["vitdet_h_75ep"]
    assert set(decays(coco.optimizer_for(model, "vit_base_patch16_224", h, lr=1e-4), model).values()) == {0.1}


# ---------------------------------------------------------------------------------------------- MPViT's Mask R-CNN

MPVIT_MASKRCNN_1X = {
    "total_batch_size": (16, f"{MPVIT}/Base-RCNN-FPN.yaml:52"),
    "lr": (1e-4, f"{MPVIT}/Base-RCNN-FPN.yaml:50"),
    "weight_decay": (0.05, f"{MPVIT}/Base-RCNN-FPN.yaml:51"),
    "weight_decay_norm": (None, "youngwanLEE/MPViT@e2d86e6:detectron2/train_net.py:57 (every parameter decays)"),
    "no_decay": ((), "youngwanLEE/MPViT@e2d86e6:detectron2/train_net.py:57"),
    "layer_decay": (1.0, "youngwanLEE/MPViT@e2d86e6:detectron2/train_net.py:56 (BASE_LR for every parameter)"),
    "warmup_factor": (0.01, f"{MPVIT}/Base-RCNN-FPN.yaml:48"),
    "warmup_iters": (1000, f"{MPVIT}/Base-RCNN-FPN.yaml:49"),
    "lr_steps": ((60_000, 80_000), f"{MPVIT}/Base-RCNN-FPN.yaml:53"),
    "iterations": (90_000, f"{MPVIT}/Base-RCNN-FPN.yaml:54"),
    "checkpoint_period": (10_000, f"{MPVIT}/Base-RCNN-FPN.yaml:55"),
    "clip_grad": (1.0, f"{MPVIT}/Base-RCNN-FPN.yaml:46"),
    "filter_empty": (False, f"{MPVIT}/Base-RCNN-FPN.yaml:62"),
    "min_sizes": ((800,), f"{MPVIT}/maskrcnn/mask_rcnn_mpvit_small_1x.yaml:9"),
    "max_size": (1333, f"{D2}:detectron2/config/defaults.py (INPUT.MAX_SIZE_TRAIN / _TEST, inherited)"),
    "backbone_norm": ("SyncBN", f"{MPVIT}/Base-RCNN-FPN.yaml:10"),
    "anchor_sizes": ((32, 64, 128, 256, 512), f"{MPVIT}/Base-RCNN-FPN.yaml:15"),
    "pre_nms_topk": ((2000, 1000), f"{MPVIT}/Base-RCNN-FPN.yaml:19-20"),
    "proposals": ((1000, 1000), f"{MPVIT}/Base-RCNN-FPN.yaml:24-25"),
    "box_head_convs": (0, f"{D2}:detectron2/config/defaults.py:313"),
    "box_head_fcs": ((1024, 1024), f"{MPVIT}/Base-RCNN-FPN.yaml:31 and {D2}:detectron2/config/defaults.py:312"),
    "rpn_convs": (1, f"{D2}:detectron2/config/defaults.py:247"),
    "head_norm": ("", f"{D2}:detectron2/config/defaults.py:318 and :357"),
    "recompute_boxes": (False, "youngwanLEE/MPViT@e2d86e6: no crop in the 1x configs (DatasetMapper's default)"),
    "drop_path_by_arch": ({"mpvit_tiny": 0.1, "mpvit_xsmall": 0.1, "mpvit_small": 0.2, "mpvit_base": 0.4},
                          f"{MPVIT}/maskrcnn/mask_rcnn_mpvit_{{tiny,xs,small,base}}_1x.yaml:7"),
}
MPVIT_MASKRCNN_3X_MS = {
    **MPVIT_MASKRCNN_1X,
    "lr_steps": ((210_000, 250_000), f"{MPVIT}/maskrcnn/mask_rcnn_mpvit_small_ms_3x.yaml:9"),
    "iterations": (270_000, f"{MPVIT}/maskrcnn/mask_rcnn_mpvit_small_ms_3x.yaml:10"),
    "min_sizes": (tuple(range(480, 801, 32)), f"{MPVIT}/Base-RCNN-FPN.yaml:57"),
    "augmentation": ("detr", f"{MPVIT}/maskrcnn/mask_rcnn_mpvit_small_ms_3x.yaml:17 (AUG.DETR)"),
    "detr_crop": ((384, 600), f"{MPVIT}/maskrcnn/mask_rcnn_mpvit_small_ms_3x.yaml:15"),
    "recompute_boxes": (False, "youngwanLEE/MPViT@e2d86e6:detectron2/mpvit/dataset_mapper.py:123"),
}


@pytest.mark.parametrize("name, official", [("mpvit_maskrcnn_1x", MPVIT_MASKRCNN_1X),
                                            ("mpvit_maskrcnn_3x_ms", MPVIT_MASKRCNN_3X_MS)])
def test_mpvit_mask_rcnn_presets_equal_the_official_configs(name, official):
    preset = coco.PRESETS[name]
    assert_official(name, preset, official)


def test_mpvit_mask_rcnn_is_detectron2s_standard_fpn_mask_rcnn_built_from_its_own_config():
    """Our detector for MPViT's presets against Detectron2's Mask R-CNN R50-FPN built from its own yacs config
    (Base-RCNN-FPN.yaml): the same RPN head, box head and mask head, kind for kind and shape for shape; the
    backbone's BatchNorm is trained (SyncBN in the official config), not frozen."""
    cfg = get_cfg()
    zoo = coco.DETECTRON2_CONFIGS.parents[1]  # model_zoo/configs
    cfg.merge_from_file(str(zoo / "COCO-InstanceSegmentation" / "mask_rcnn_R_50_FPN_1x.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    reference = build_model(cfg)
    preset = coco.resolve_drop_path(coco.PRESETS["mpvit_maskrcnn_1x"], "mpvit_tiny")
    ours = coco.build_detector("mpvit_tiny", preset, num_classes=80)

    def structure(module: torch.nn.Module) -> list[tuple[str, str, tuple]]:
        return [(name, type(m).__name__, tuple(p.shape for p in m.parameters(recurse=False)))
                for name, m in module.named_modules()]

    for part in ("proposal_generator.rpn_head", "roi_heads.box_head", "roi_heads.mask_head",
                 "roi_heads.box_predictor"):
        assert structure(ours.get_submodule(part)) == structure(reference.get_submodule(part)), part
    assert [type(m).__name__ for m in ours.roi_heads.mask_head.modules() if "Norm" in type(m).__name__] == []
    net = ours.backbone.bottom_up.net
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in net.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    # and ViTDet's frozen default for the ResNet-style FPN runs stays as it was
    frozen = coco.build_detector("mpvit_tiny", coco.PRESETS["vitdet_b_100ep"], num_classes=80)
    assert any(isinstance(m, FrozenBatchNorm2d) for m in frozen.backbone.bottom_up.net.modules())


def test_mpvit_mask_rcnn_decays_every_parameter():
    preset = coco.resolve_drop_path(coco.PRESETS["mpvit_maskrcnn_1x"], "mpvit_tiny")
    model = coco.build_detector("mpvit_tiny", preset, num_classes=80)
    wd = decays(coco.optimizer_for(model, "mpvit_tiny", preset, lr=1e-4), model)
    assert set(wd.values()) == {0.05} and len(wd) == sum(p.requires_grad for p in model.parameters())


# ------------------------------------------------------------------------------- ImageNet: MAE's fine-tuning, probe

MAE_FT = f"{MAE}:FINETUNE.md"
MAE_FINETUNE_B = {
    "epochs": (100, f"{MAE_FT}:71"),
    "base_lr": (5e-4, f"{MAE_FT}:72"),
    "layer_decay": (0.65, f"{MAE_FT}:72"),
    "weight_decay": (0.05, f"{MAE_FT}:73"),
    "drop_path": (0.1, f"{MAE_FT}:73"),
    "random_erasing": (0.25, f"{MAE_FT}:73"),
    "mixup": (0.8, f"{MAE_FT}:73"),
    "cutmix": (1.0, f"{MAE_FT}:73"),
    "total_batch_size": (1024, f"{MAE_FT}:77"),
    "min_lr": (1e-6, f"{MAE}:main_finetune.py:73"),
    "warmup_epochs": (5, f"{MAE}:main_finetune.py:76"),
    "randaugment": ("rand-m9-mstd0.5-inc1", f"{MAE}:main_finetune.py:82"),
    "label_smoothing": (0.1, f"{MAE}:main_finetune.py:84"),
    "global_pool": ("avg", f"{MAE}:main_finetune.py:114"),
    "eval_crop_ratio": (0.875, f"{MAE}:util/datasets.py:54"),
}
MAE_FINETUNE_L = {**MAE_FINETUNE_B, "epochs": (50, f"{MAE_FT}:90"), "base_lr": (1e-3, f"{MAE_FT}:91"),
                  "layer_decay": (0.75, f"{MAE_FT}:91"), "drop_path": (0.2, f"{MAE_FT}:92")}
MAE_FINETUNE_H = {**MAE_FINETUNE_L, "epochs": (50, f"{MAE_FT}:106"), "drop_path": (0.3, f"{MAE_FT}:108")}
RCMAE_FINETUNE_L = {**MAE_FINETUNE_B,
                    "epochs": (100, f"{RCMAE}:scripts/finetune_rc_mae_large.sh:27"),
                    "base_lr": (5e-4, f"{RCMAE}:scripts/finetune_rc_mae_large.sh:28"),
                    "layer_decay": (0.65, f"{RCMAE}:scripts/finetune_rc_mae_large.sh:28"),
                    "drop_path": (0.2, f"{RCMAE}:scripts/finetune_rc_mae_large.sh:29"),
                    "total_batch_size": (1024, f"{RCMAE}:scripts/finetune_rc_mae_large.sh:22-24 (8 x 64 x 2)")}
MAE_LINPROBE = {
    "total_batch_size": (16384, f"{MAE_FT}:142 and :150 (512 x 32 GPUs)"),
    "epochs": (90, f"{MAE_FT}:145"),
    "base_lr": (0.1, f"{MAE_FT}:146"),
    "weight_decay": (0.0, f"{MAE_FT}:147"),
    "global_pool": ("token", f"{MAE_FT}:143 (--cls_token)"),
    "min_lr": (0.0, f"{MAE}:main_linprobe.py:63"),
    "warmup_epochs": (10, f"{MAE}:main_linprobe.py:66"),
    "optimizer": ("lars", f"{MAE}:main_linprobe.py:252"),
    "frozen_backbone": (True, f"{MAE}:main_linprobe.py:224"),
    "eval_crop_ratio": (0.875, f"{MAE}:main_linprobe.py:137"),
}
MAE_LINPROBE_50EP = {**MAE_LINPROBE, "epochs": (50, f"{MAE_FT}:155")}


@pytest.mark.parametrize("name, official", [
    ("imagenet", MAE_FINETUNE_B), ("imagenet-vitl", MAE_FINETUNE_L), ("imagenet-vith", MAE_FINETUNE_H),
    ("imagenet-rcmae-vitl", RCMAE_FINETUNE_L), ("imagenet-linear", MAE_LINPROBE),
    ("imagenet-linear-50ep", MAE_LINPROBE_50EP)])
def test_imagenet_presets_equal_the_releases_recipes(name, official):
    preset = finetune.PRESETS[name]
    assert_official(name, preset, official)


def test_imagenet_defaults_are_the_papers_protocols_by_vit_size():
    from mimbench.transfer.classification import default_preset, default_protocol

    assert default_protocol("imagenet") == "linear-lars" and default_protocol("cifar10") == "linear"
    assert [default_preset("imagenet", "finetune", width) for width in (768, 1024, 1280, 384, None)] == \
        ["imagenet", "imagenet-vitl", "imagenet-vith", "imagenet", "imagenet"]
    assert [default_preset("imagenet", "linear-lars", width) for width in (768, 1024, 1280)] == \
        ["imagenet-linear", "imagenet-linear-50ep", "imagenet-linear-50ep"]


# ------------------------------------------------------------------------------------------ supervised: DeiT

DEIT_RECIPE = {
    "epochs": (300, f"{DEIT}:main.py:35"),
    "warmup_epochs": (5, f"{DEIT}:main.py:86"),
    "min_lr": (1e-5, f"{DEIT}:main.py:81"),
    "weight_decay": (0.05, f"{DEIT}:main.py:66"),
    "base_lr": (5e-4, f"{DEIT}:main.py:71"),
    "label_smoothing": (0.1, f"{DEIT}:main.py:101"),
    "auto_augment": ("rand-m9-mstd0.5-inc1", f"{DEIT}:main.py:98"),
    "random_erasing": (0.25, f"{DEIT}:main.py:118"),
    "mixup": (0.8, f"{DEIT}:main.py:128"),
    "cutmix": (1.0, f"{DEIT}:main.py:130"),
    "eval_crop_ratio": (0.875, f"{DEIT_2021}:datasets.py:101-105 (resize int(256 / 224 * 224), crop 224)"),
}


def test_the_deit_preset_and_its_transforms_equal_deits():
    preset = supervised.PRESETS["deit_in1k"]
    assert_official("deit_in1k", preset, DEIT_RECIPE)
    # random erasing in "pixel" mode, one box ({DEIT}:main.py:120 and :122)
    (erasing,) = [t for t in supervised.train_transform(preset).transforms if type(t).__name__ == "RandomErasing"]
    assert (erasing.probability, erasing.mode, erasing.max_count) == (0.25, "pixel", 1)
    # validation: resize 256 (bicubic), centre crop 224
    resize, crop = supervised.eval_transform(preset).transforms[:2]
    assert (resize.size, resize.interpolation.value, crop.size) == (256, "bicubic", (224, 224))


# ----------------------------------------------------------------------------------- RC-MAE's pretraining release

RCMAE_B = f"{RCMAE}:scripts/pretrain_rc_mae_vit_base_1600ep.sh"
RCMAE_PRETRAIN = {
    "batch_size": (256, f"{RCMAE_B}:23"),
    "total_batch_size": (4096, f"{RCMAE_B}:21-24 (8 GPUs x 256 x --accum_iter 2)"),
    "epochs": (1600, f"{RCMAE_B}:25"),
    "warmup_epochs": (40, f"{RCMAE_B}:26"),
    "base_lr": (1.5e-4, f"{RCMAE_B}:30"),
    "weight_decay": (0.05, f"{RCMAE_B}:31"),
    "min_lr": (0.0, f"{RCMAE}:run_pretrain.py:115"),
}
RCMAE_PRETRAIN_OPTIONS = {
    "norm_pix_loss": (True, f"{RCMAE_B}:27"),
    "mask_ratio": (0.75, f"{RCMAE_B}:28"),
    "consistency_weight": (1.0, f"{RCMAE_B}:29 (--gamma)"),
    "momentum_start": (0.996, f"{RCMAE}:run_pretrain.py:171-172"),
    "teacher_schedule": ("release", f"{RCMAE}:engine_pretrain.py:110-116 (an EMA update after every micro-batch)"),
    "release_accumulation": (2, f"{RCMAE_B}:24"),
}


@pytest.mark.parametrize("name", ["rcmae_vitb_1600", "rcmae_vitl_1600"])
def test_rcmae_pretraining_presets_equal_the_release_scripts(name):
    from mimbench.pretrain.engine import PRESETS

    preset = PRESETS[name]
    assert_official(name, preset, RCMAE_PRETRAIN)
    for option, (value, source) in RCMAE_PRETRAIN_OPTIONS.items():
        ours = preset.method_options[option]
        assert ours == value, f"{name}.{option}: ours {ours!r}, {source}"


# ---------------------------------------------------------------------------------------------- ADE20K UperNet

MMSEG = "open-mmlab/mmsegmentation@827c6a50aa27eb19a308c7b66d339e4efb6f7085:configs/mae/" \
        "mae-base_upernet_8xb2-amp-160k_ade20k-512x512.py"
MMSEG_LD = "open-mmlab/mmsegmentation@cb054c5da972978d3abcff1525336d41a76951ea:mmseg/engine/optimizers/" \
           "layer_decay_optimizer_constructor.py"
MPVIT_SEG = "youngwanLEE/MPViT@e2d86e6c465abc4847e601f8a401bdd1692836f7:semantic_segmentation/configs"
UPERNET_VITB_160K = {
    "crop_size": (512, f"{MMSEG}:5"),
    "drop_path_rate": (0.1, f"{MMSEG}:19"),
    "layer_scale": (1.0, f"{MMSEG}:18"),
    "lr": (1e-4, f"{MMSEG}:30"),
    "weight_decay": (0.05, f"{MMSEG}:31"),
    "layer_decay": (0.65, f"{MMSEG}:32"),
    "warmup_iters": (1500, f"{MMSEG}:36"),
    "warmup_inside_poly": (False, f"{MMSEG}:39 (PolyLR begin=1500)"),
    "batch_size": (16, f"{MMSEG}:51-52 (8 GPUs x 2)"),
    "no_decay": ("1d", f"{MMSEG_LD}:134-137 (1-D tensors and '.bias'; 'pos_embed' never equals 'backbone.pos_embed')"),
    "test_mode": ("slide", f"{MMSEG}:25"),
}
MPVIT_UPERNET_160K = {
    "crop_size": (512, f"{MPVIT_SEG}/_base_/datasets/ade20k.py:8"),
    "lr": (6e-5, f"{MPVIT_SEG}/mpvit/upernet/upernet_mpvit_small_160k_ade20k.py:34"),
    "weight_decay": (0.01, f"{MPVIT_SEG}/mpvit/upernet/upernet_mpvit_small_160k_ade20k.py:34"),
    "layer_decay": (1.0, f"{MPVIT_SEG}/mpvit/upernet/upernet_mpvit_small_160k_ade20k.py:34 (no paramwise_cfg)"),
    "no_decay": ("none", f"{MPVIT_SEG}/mpvit/upernet/upernet_mpvit_small_160k_ade20k.py:34 (no paramwise_cfg)"),
    "warmup_iters": (1500, f"{MPVIT_SEG}/mpvit/upernet/upernet_mpvit_small_160k_ade20k.py:38"),
    "warmup_inside_poly": (True, f"{MPVIT_SEG}/mpvit/upernet/upernet_mpvit_small_160k_ade20k.py:36-40 (mmcv poly)"),
    "batch_size": (16, f"{MPVIT_SEG}/mpvit/upernet/upernet_mpvit_small_160k_ade20k.py:42-43"),
    "head_channels": (512, f"{MPVIT_SEG}/_base_/models/upernet_mpvit.py:32"),
    "aux_channels": (256, f"{MPVIT_SEG}/_base_/models/upernet_mpvit.py:43"),
    "test_mode": ("whole", f"{MPVIT_SEG}/_base_/models/upernet_mpvit.py:54"),
    "drop_path_by_arch": ({"mpvit_small": 0.2, "mpvit_base": 0.4},
                          f"{MPVIT_SEG}/mpvit/upernet/upernet_mpvit_{{small,base}}_160k_ade20k.py:21"),
}


@pytest.mark.parametrize("name, official", [("upernet_vitb_160k", UPERNET_VITB_160K),
                                            ("mpvit_upernet_160k", MPVIT_UPERNET_160K)])
def test_ade20k_presets_equal_the_official_configs(name, official):
    from mimbench.transfer import ade20k

    preset = ade20k.PRESETS[name]
    assert_official(name, preset, official)


def test_ade20k_weight_decay_as_mmseg_decides_it(tmp_path):
    """mmseg's MAE config: 1-D tensors and biases undecayed, pos_embed and cls_token decayed (its name test compares
    'pos_embed' with 'backbone.pos_embed'); MPViT's: every parameter decayed."""
    from mimbench.transfer import ade20k

    checkpoint = tmp_path / "vit.pth"
    torch.save(create_backbone("vit_tiny_patch4_32").state_dict(), checkpoint)
    tiny = dataclasses.replace(ade20k.PRESETS["embedded_cpu"], relative_position_bias=True, layer_scale=1.0,
                               test_mode="slide", slide_stride=32)
    segmentor = ade20k.build_segmentor(str(checkpoint), num_classes=5, recipe=tiny, arch="vit_tiny_patch4_32")

    def decay_of(no_decay: str) -> dict[str, float]:
        constructor = ade20k.LayerDecayConstructor(
            dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=1e-3, weight_decay=0.05)),
            dict(layer_decay=0.65, no_decay=no_decay))
        with ade20k.DefaultScope.overwrite_default_scope("mmseg"):
            optimizer = constructor(segmentor).optimizer
        return {name: group["weight_decay"] for group in optimizer.param_groups for name in group["param_names"]}

    mmseg = decay_of("1d")
    params = dict(segmentor.named_parameters())
    assert mmseg["backbone.net.pos_embed"] == mmseg["backbone.net.cls_token"] == 0.05
    assert all(mmseg[n] == (0.0 if p.ndim == 1 or n.endswith(".bias") else 0.05) for n, p in params.items())
    assert set(decay_of("none").values()) == {0.05}


def test_mpvits_poly_runs_from_zero_under_the_warmup_as_mmcv_computes_it():
    """mmcv 1.x (MPViT's mmseg 0.11): lr = base × (1 − t/T) × (1 − (1 − t/W)(1 − 1e-6)) while t < W, base × (1 − t/T)
    after; mmseg 1.x's MAE config starts the poly at W."""
    from mmengine.optim import OptimWrapper
    from mmengine.registry import PARAM_SCHEDULERS

    from mimbench.transfer import ade20k

    def lrs(recipe) -> list[float]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=recipe.lr)
        wrapper = OptimWrapper(optimizer)
        schedulers = [PARAM_SCHEDULERS.build({**cfg, "optimizer": wrapper}) for cfg in ade20k.lr_schedule(recipe)]
        found = []
        for _ in range(recipe.max_iters):
            found.append(optimizer.param_groups[0]["lr"])
            for scheduler in schedulers:
                scheduler.step()
        return found

    mpvit = dataclasses.replace(ade20k.PRESETS["mpvit_upernet_160k"], max_iters=400, warmup_iters=40)
    base, total, warm = mpvit.lr, mpvit.max_iters, mpvit.warmup_iters
    mmcv = [base * (1 - t / total) * ((1 - (1 - t / warm) * (1 - 1e-6)) if t < warm else 1.0) for t in range(total)]
    assert lrs(mpvit) == pytest.approx(mmcv, rel=1e-6, abs=1e-15)
    # mmseg 1.x's MAE config as it reads: PolyLR(begin=40, end=400) reaches 0 at 399 (mmengine's end - 1)
    mae = dataclasses.replace(ade20k.PRESETS["upernet_vitb_160k"], max_iters=400, warmup_iters=40)
    after = lrs(mae)[40:]
    assert after == pytest.approx([mae.lr * (1 - (t - 40) / 359) for t in range(40, 400)], rel=1e-6, abs=1e-15)


# ------------------------------------------------------------------------------------------- --print-config


def test_every_entry_point_prints_its_resolved_config_and_protocol(capsys):
    """No checkpoint needed; the YAML replays as --config; the protocol line names what the records will carry."""
    import yaml

    from mimbench.landscape.run import main as landscape
    from mimbench.pretrain.run import main as pretrain
    from mimbench.transfer.run import main as transfer

    def printed(main, argv: list[str]) -> tuple[str, dict]:
        assert main(argv) == 0
        out = capsys.readouterr().out
        first = out.splitlines()[0]
        return (first.removeprefix("# protocol: ") if first.startswith("# protocol: ") else ""), yaml.safe_load(out)

    protocol, config = printed(transfer, ["coco", "--print-config"])
    assert protocol == "vitdet-100ep" and config["preset"] == "vitdet_b_100ep" and config["recipe"]["lr"] == 1e-4
    protocol, config = printed(transfer, ["coco", "--arch", "vit_large_patch16_224", "--max-iter", "10",
                                          "--print-config"])
    assert config["preset"] == "vitdet_l_100ep" and protocol.startswith("vitdet-100ep+")
    assert printed(transfer, ["ade20k", "--print-config"])[0] == "upernet-160k-ss"
    protocol, config = printed(transfer, ["imagenet", "--print-config"])
    assert (protocol, config["protocol"], config["recipe"]["min_lr"]) == ("mae-linprobe", "linear-lars", 0.0)
    assert printed(transfer, ["cifar10", "--print-config"])[0] == "lbfgs-linear"
    _, config = printed(pretrain, ["--method", "supervised", "--print-config"])
    assert config["recipe"]["eval_crop_ratio"] == 0.875
    _, config = printed(pretrain, ["--preset", "rcmae_vitb_1600", "--print-config"])
    assert config["recipe"]["method_options"]["release_accumulation"] == 2
    _, config = printed(landscape, ["--print-config"])
    assert config["preset"] == "vit_b"
