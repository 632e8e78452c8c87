"""What the paper's tables show, as data: which records fill which column, and how the columns are headed.

A column is filled by the records of one task and dataset (and protocol, where the table fixes one); the
cell value is ``metrics[metric]``, or ``value`` (the record's headline metric) where ``metric`` is None.
``key`` names the column in the reference CSVs under ``tables/reference/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mimbench.results import Result


@dataclass(frozen=True)
class Column:
    key: str
    header: str  # Markdown, HTML and CSV
    latex: str
    task: str
    dataset: str
    metric: str | None = None  # None: the record's headline value (each transfer dataset has its own metric)
    protocol: str | None = None  # None: any kind of evaluation (linear, finetune, ...)
    # The exact protocol of the column's numbers (a record's protocol_id): ours fill it only under this id, and a
    # paper's number measured under another goes to a column of its own, headed by its protocol. None: any.
    protocol_id: str | None = None
    # The reference CSVs' column that names the protocol of this column's number (per row); absent or empty there:
    # "unstated" (the paper does not say).
    reference_protocol: str | None = None
    decimals: int = 1  # printed decimals of the cells (the landscape's small numbers need more)

    def value_of(self, record: Result) -> float | None:
        """This column's number in ``record``, or None where the record does not belong here."""
        if (record.task, record.dataset) != (self.task, self.dataset):
            return None
        if self.protocol is not None and record.protocol != self.protocol:
            return None
        if self.protocol_id is not None and record.protocol_id != self.protocol_id:
            return None
        if self.metric is None:
            return float(record.value)
        value: Any = record.metrics.get(self.metric)
        if value is None and record.metric == self.metric:
            value = record.value
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return float(value) if is_number else None


def _coco(key: str, metric: str, header: str, latex: str) -> Column:
    return Column(key, f"COCO {header}", latex, "detection", "coco", metric, protocol_id="vitdet-100ep",
                  reference_protocol="coco_protocol")


# The protocols of our main table: MAE's ImageNet fine-tuning, UperNet 160k single-scale (mmseg's MAE config),
# ViTDet's 100-epoch Mask R-CNN (transfer/ presets with these ids).
MAIN_COLUMNS: tuple[Column, ...] = (
    Column("imagenet_top1", "ImageNet top-1", "ImageNet top-1", "classification", "imagenet", "top1", "finetune",
           protocol_id="mae-finetune", reference_protocol="imagenet_protocol"),
    Column("ade20k_miou", "ADE20K mIoU", "ADE20K mIoU", "segmentation", "ade20k", "mIoU",
           protocol_id="upernet-160k-ss", reference_protocol="ade20k_protocol"),
    _coco("coco_ap_bb", "AP_bbox", "AP^bb", "AP$^{bb}$"),
    _coco("coco_ap50_bb", "AP50_bbox", "AP^bb_50", "AP$^{bb}_{50}$"),
    _coco("coco_ap75_bb", "AP75_bbox", "AP^bb_75", "AP$^{bb}_{75}$"),
    _coco("coco_ap_mk", "AP_segm", "AP^mk", "AP$^{mk}$"),
    _coco("coco_ap50_mk", "AP50_segm", "AP^mk_50", "AP$^{mk}_{50}$"),
    _coco("coco_ap75_mk", "AP75_segm", "AP^mk_75", "AP$^{mk}_{75}$"),
)

# (dataset as records name it, header as the paper prints it); the paper's transfer table is fine-tuning.
TRANSFER_DATASETS: tuple[tuple[str, str], ...] = (
    ("aircraft", "Aircraft"), ("caltech101", "Caltech"), ("cars", "Cars"), ("cifar10", "C10"),
    ("cifar100", "C100"), ("dtd", "DTD"), ("flowers", "Flowers"), ("food", "Food"), ("pets", "Pets"),
    ("sun397", "SUN"), ("voc2007", "VOC"),
)
TRANSFER_PROTOCOL = "finetune"
# The plain mean of the 11 datasets; filled only for rows that have all 11 (a partial mean would mislead).
AVERAGE = Column("avg", "Avg.", "Avg.", "classification", "(mean of the 11 datasets)")


def transfer_columns(protocol: str = TRANSFER_PROTOCOL) -> tuple[Column, ...]:
    """The 11 datasets: a row per protocol (its ``Protocol`` label), so a column holds several, each row naming
    its own."""
    return tuple(Column(name, header, header, "classification", name, None, protocol)
                 for name, header in TRANSFER_DATASETS)


# The embedded sets of the demo and of `python -m mimbench.chain ablations` (toy data: never a benchmark's column);
# only the ablation tables show them, next to the poster's reference rows.
EMBEDDED_COLUMNS: tuple[Column, ...] = (
    Column("digits_linear_top1", "digits linear top-1", "digits lin.", "classification", "digits", "top1", "linear"),
    Column("coco_embedded_ap_bb", "COCO-emb. AP^bb", "COCO-emb. AP$^{bb}$", "detection", "coco-embedded", "AP_bbox"),
    Column("coco_embedded_ap_mk", "COCO-emb. AP^mk", "COCO-emb. AP$^{mk}$", "detection", "coco-embedded", "AP_segm"),
    Column("ade20k_embedded_miou", "ADE-emb. mIoU", "ADE-emb. mIoU", "segmentation", "ade20k-embedded", "mIoU"),
)

# The MPViT paper's table (Lee et al., CVPR 2022, Tables 2-4): supervised ImageNet-1K top-1 at 224², Mask R-CNN
# 1x and 3x multi-scale box/mask AP, UperNet 160k mIoU; params and GFLOPs per size.
MPVIT_COLUMNS: tuple[Column, ...] = (
    Column("params_m", "Params (M)", "Params (M)", "", ""),  # the records' backbone size, else MPVIT_SIZES
    Column("gflops_224", "GFLOPs", "GFLOPs", "", ""),
    Column("imagenet_top1", "ImageNet top-1", "ImageNet top-1", "classification", "imagenet", "top1",
           protocol_id="deit", reference_protocol="imagenet_protocol"),
    Column("coco_maskrcnn_1x_ap_bb", "COCO 1x AP^bb", "1$\\times$ AP$^{bb}$", "detection", "coco", "AP_bbox",
           protocol_id="mpvit-maskrcnn-1x", reference_protocol="coco_1x_protocol"),
    Column("coco_maskrcnn_1x_ap_mk", "COCO 1x AP^mk", "1$\\times$ AP$^{mk}$", "detection", "coco", "AP_segm",
           protocol_id="mpvit-maskrcnn-1x", reference_protocol="coco_1x_protocol"),
    Column("coco_maskrcnn_3xms_ap_bb", "COCO 3x AP^bb", "3$\\times$ AP$^{bb}$", "detection", "coco", "AP_bbox",
           protocol_id="mpvit-maskrcnn-3x-ms", reference_protocol="coco_3x_protocol"),
    Column("coco_maskrcnn_3xms_ap_mk", "COCO 3x AP^mk", "3$\\times$ AP$^{mk}$", "detection", "coco", "AP_segm",
           protocol_id="mpvit-maskrcnn-3x-ms", reference_protocol="coco_3x_protocol"),
    Column("ade20k_upernet_160k_miou", "ADE20K mIoU", "ADE20K mIoU", "segmentation", "ade20k", "mIoU",
           protocol_id="mpvit-upernet-160k-ss", reference_protocol="ade20k_protocol"),
)
# Parameters (1000-class head) and GFLOPs at 224² of each MPViT size as our backbones/mpvit.py builds them (fvcore
# counting; tests/test_tables_mpvit.py checks them against the model), so the tables need no torch.
MPVIT_SIZES: dict[str, tuple[int, float]] = {
    "mpvit_tiny": (5_843_736, 1.636), "mpvit_xsmall": (10_573_448, 2.95), "mpvit_small": (22_892_400, 4.771),
    "mpvit_base": (74_845_976, 16.39), "mpvit_nano_cpu": (368_744, 0.184),
}
# The 1000-class head (last stage's width x 1000 weights + 1000 biases) that the table's counts include and a
# record's ``params`` (the backbone alone) does not.
MPVIT_HEAD_PARAMS: dict[str, int] = {"mpvit_tiny": 217_000, "mpvit_xsmall": 257_000, "mpvit_small": 289_000,
                                     "mpvit_base": 481_000, "mpvit_nano_cpu": 65_000}
# The RC-MAE paper's numbers (Lee et al., ICLR 2023) where our columns fit; its COCO is Mask R-CNN + FPN with a
# ViT (Li et al. 2021), not ViTDet, so it has a table of its own.
RCMAE_COLUMNS: tuple[Column, ...] = (
    Column("imagenet_top1_finetune", "ImageNet top-1 (fine-tune)", "IN-1K FT", "classification", "imagenet", "top1",
           "finetune", protocol_id="mae-finetune", reference_protocol="imagenet_finetune_protocol"),
    Column("imagenet_top1_linear", "ImageNet top-1 (linear)", "IN-1K lin.", "classification", "imagenet", "top1",
           "linear-lars", protocol_id="mae-linprobe", reference_protocol="imagenet_linear_protocol"),
    Column("coco_ap_bb", "COCO AP^bb (Mask R-CNN FPN)", "AP$^{bb}$", "detection", "coco", "AP_bbox",
           protocol_id="benchmarking-100ep", reference_protocol="coco_protocol"),
    Column("coco_ap_mk", "COCO AP^mk (Mask R-CNN FPN)", "AP$^{mk}$", "detection", "coco", "AP_segm",
           protocol_id="benchmarking-100ep", reference_protocol="coco_protocol"),
)

# The loss-landscape study's records (landscape/run.py: task "landscape", protocol = the loss): one table per loss,
# a row per model (tags["model"], the run's name for it), its direction seeds aggregated; metrics[key] fills a cell.
LANDSCAPE_TASK, MODEL_TAG = "landscape", "model"
LANDSCAPE_LOSSES = ("pretrain", "linear", "recon")  # the tables' order; another loss gets a table after them
LANDSCAPE_COLUMNS: tuple[Column, ...] = tuple(
    Column(key, header, latex, LANDSCAPE_TASK, "", key, decimals=decimals) for key, header, latex, decimals in (
        ("sharpness", "Sharpness", "Sharpness", 3),
        ("width", "Width", "Width", 3),
        ("convex_share", "Convex share", "Convex share", 2),
        ("lambda_max_centre", "λmax (centre)", "$\\lambda_{max}$ (centre)", 1),
        ("loss_centre", "Loss (centre)", "Loss (centre)", 3),
    ))

METHOD_NAMES = {"mae": "MAE", "rcmae": "RC-MAE", "rc-mae": "RC-MAE", "mixedae": "MixedAE",
                "mixedae-full": "MixedAE-Full", "mixedae-full*": "MixedAE-Full*", "supervised": "Supervised"}
BASELINE = "MAE"  # deltas are against this method's row of the same pretraining epochs and arch
# The paper prints deltas only on its own rows; its reference rows keep exactly that (ours get one per row).
PAPER_DELTA_METHODS = ("MixedAE", "MixedAE-Full*", "MixedAE-Full")
PAPER_ARCH = "ViT-B/16"
EFFECTIVE_EPOCHS = "††"  # the paper's mark for multi-crop methods' effective epochs

OURS, PAPER = "ours", "paper"
ABLATION_TAG, VARIANT_TAG = "ablation", "variant"

# The label columns of each table, before its metric columns; "Source" says ours or paper.
LABELS = {
    "main": ("Source", "Method", "Arch", "Pre-train epochs", "Pre-train GPU-days"),
    "transfer": ("Source", "Group", "Method", "Protocol", "Arch", "Pre-train epochs"),
    "ablation": ("Source", "Variant", "Method", "Arch", "Pre-train epochs"),
    "mpvit": ("Source", "Method", "Arch"),
    "rcmae": ("Source", "Method", "Arch", "Pre-train epochs"),
    "landscape": ("Model", "Method", "Arch"),
}
CAPTIONS = {
    "main": ("ImageNet-1K fine-tuning top-1, ADE20K UperNet mIoU, COCO Mask R-CNN box and mask AP. "
             "(+x): difference to the MAE row of the same pre-training epochs and arch."),
    "transfer": ("Transfer to 11 classification datasets ({protocol}); Avg. is their plain mean, "
                 "(+x) its difference to the MAE row of the same pre-training epochs and arch."),
    "ablation": "Ablation '{name}': one row per variant.",
    "other": "Other results: records that belong to none of the tables above.",
    "landscape": "Loss landscape on the {loss} loss (landscape/run.py): one row per model.",
    "mpvit": ("MPViT: ImageNet-1K top-1 (supervised, 224²), COCO Mask R-CNN 1x and 3x multi-scale box/mask AP, "
              "ADE20K UperNet 160k mIoU, parameters (1000-class head) and GFLOPs at 224² per size."),
    "rcmae": ("RC-MAE's reference numbers: ImageNet-1K fine-tuning and linear top-1; COCO box/mask AP of Mask "
              "R-CNN + FPN on a ViT (Li et al. 2021), not the main table's ViTDet."),
}
NOTES = {
    "seeds": "a ± s [n=k]: mean and standard deviation over k seeds; -: not measured.",
    "paper": ("paper: reference rows transcribed from the poster of Chen et al., Mixed Autoencoder for "
              "Self-supervised Visual Representation Learning, CVPR 2023."),
    "effective": EFFECTIVE_EPOCHS + ": effective epochs of multi-crop methods, as the paper reports them.",
    "landscape": ("Sharpness: the largest loss rise within radius r of the centre; width: the radius where the loss "
                  "first exceeds the centre's + ε (the grid's largest radius where it never does); convex share: "
                  "the share of the curvature grid where λmin ≥ −ε·λmax; λmax: the top Hessian eigenvalue at the "
                  "centre (r, ε: the run's recipe). n counts the seeds of the directions."),
    "mpvit_paper": "paper: Lee et al., MPViT: Multi-Path Vision Transformer for Dense Prediction, CVPR 2022.",
    "protocol": ("Protocol: how each row's numbers were measured (a record's protocol id): transfer-grid = AdamW "
                 "with layer decay, lr and weight decay chosen on val (ours); ericsson-finetune = Ericsson et al.'s "
                 "protocol (CVPR 2021: SGD with Nesterov momentum, 5000 steps, their lr x wd grid on val); "
                 "lbfgs-linear = our linear probe. The paper's SSL ResNet rows are Ericsson et al.'s numbers; its "
                 "transformer rows name no protocol on the poster (unstated)."),
    "protocols": ("Protocols of the columns: {listed}. A paper's number measured under another protocol is in a "
                  "column of its own headed [protocol] (unstated: the paper does not say), never beside ours."),
    "rcmae_paper": ("paper: Lee et al., Exploring the Role of Mean Teachers in Self-supervised Masked "
                    "Auto-Encoders, ICLR 2023 (its MAE rows are the authors' reproduction)."),
}
