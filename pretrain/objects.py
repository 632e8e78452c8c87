"""Object-aware source crops for MixedAE-Full: every source image holds one centric object.

The MixedAE poster builds its object-aware pretraining on the "single-centric-object guarantee" of MultiSiam (Chen
et al., ICCV 2021). Our reading, with boxes from a COCO-format annotation file: a random crop (MAE's
RandomResizedCrop draw) is accepted when exactly one box's centre lies in the crop's central region (the middle
``center_region`` of its width and height) and that box covers at least ``min_cover`` of the crop's area. Up to
``attempts`` crops are drawn; when none qualifies (or the image has no boxes) the sample keeps the last random
crop, MixedAE's own. The region size, cover share and attempts are ours (the paper body was not available to us).

A COCO layout is ``<root>/<split>/<image files>`` with ``<root>/annotations/instances_<split>.json`` (train2017 on
COCO; the embedded COCO scenes are written the same way). Only the file names and boxes are read here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as TF

from mimbench.core.errors import ConfigError, DatasetError

Box = tuple[float, float, float, float]  # COCO's (x, y, width, height), in pixels
Crop = tuple[int, int, int, int]  # (top, left, height, width), as RandomResizedCrop.get_params returns it
CROP_SCALE = (0.2, 1.0)  # MAE's crop area range (pretrain.data.pretrain_transform)
CROP_RATIO = (3 / 4, 4 / 3)  # torchvision's default aspect-ratio range, which MAE keeps


@dataclass(frozen=True)
class CentricObjectRule:
    center_region: float = 0.5  # the central share of the crop's width and height a box centre must fall in
    min_cover: float = 0.2  # the share of the crop's area the centric box must cover
    attempts: int = 10  # random crops drawn before falling back to the last one

    def __post_init__(self) -> None:
        if not 0 < self.center_region <= 1 or not 0 <= self.min_cover <= 1 or self.attempts < 1:
            raise ConfigError(f"object-aware crops need center_region in (0, 1], min_cover in [0, 1] and attempts "
                             f">= 1, not {self.center_region}, {self.min_cover}, {self.attempts}")


def centric_object(crop: Crop, boxes: Sequence[Box], rule: CentricObjectRule) -> int | None:
    """Index of the one box centred in ``crop`` that covers enough of it, or None (no box, or several centred)."""
    top, left, height, width = crop
    margin_x, margin_y = width * (1 - rule.center_region) / 2, height * (1 - rule.center_region) / 2
    centred = [i for i, (x, y, w, h) in enumerate(boxes)
               if left + margin_x <= x + w / 2 <= left + width - margin_x
               and top + margin_y <= y + h / 2 <= top + height - margin_y]
    if len(centred) != 1:
        return None
    x, y, w, h = boxes[centred[0]]
    overlap_w = max(0.0, min(x + w, left + width) - max(x, left))
    overlap_h = max(0.0, min(y + h, top + height) - max(y, top))
    return centred[0] if overlap_w * overlap_h >= rule.min_cover * width * height else None


def object_centric_crop(image: Image.Image, boxes: Sequence[Box], rule: CentricObjectRule) -> tuple[Crop, bool]:
    """A random crop holding one centric object (True), else the last random crop drawn (False). Draws from
    torch's RNG only, so a seeded sample stays a pure function of its seed."""
    for _ in range(rule.attempts if boxes else 1):
        crop = transforms.RandomResizedCrop.get_params(image, scale=list(CROP_SCALE), ratio=list(CROP_RATIO))
        if boxes and centric_object(crop, boxes, rule) is not None:
            return crop, True
    return crop, False


class ObjectAwareTransform:
    """:func:`pretrain.data.pretrain_transform` with the crop chosen by :func:`object_centric_crop`, from the
    boxes the image carries in ``info["boxes"]`` (none: a random crop)."""

    def __init__(self, img_size: int, rule: CentricObjectRule, finish: transforms.Compose) -> None:
        self.img_size, self.rule, self.finish = img_size, rule, finish

    def __call__(self, image: Image.Image) -> torch.Tensor:
        (top, left, height, width), _ = object_centric_crop(image, image.info.get("boxes", []), self.rule)
        crop = TF.resized_crop(image, top, left, height, width, [self.img_size, self.img_size],
                               interpolation=transforms.InterpolationMode.BICUBIC)
        return self.finish(crop)


def coco_annotation_file(root: str | os.PathLike) -> tuple[Path, Path] | None:
    """(image folder, annotation file) of a COCO layout at ``root`` (train2017 first), or None."""
    root = Path(root)
    annotations = sorted((root / "annotations").glob("instances_*.json"),
                         key=lambda path: (path.stem != "instances_train2017", path.name))
    for path in annotations:
        images = root / path.stem.removeprefix("instances_")
        if images.is_dir():
            return images, path
    return None


def read_coco_boxes(path: str | os.PathLike) -> dict[str, list[Box]]:
    """Boxes per image file name (as the file's ``images[].file_name``), crowd regions left out."""
    try:
        data = json.loads(Path(path).read_text())
        names = {image["id"]: image["file_name"] for image in data["images"]}
        boxes: dict[str, list[Box]] = {name: [] for name in names.values()}
        for annotation in data["annotations"]:
            x, y, w, h = (float(v) for v in annotation["bbox"])
            if not annotation.get("iscrowd", 0) and w > 0 and h > 0:
                boxes[names[annotation["image_id"]]].append((x, y, w, h))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DatasetError(f"{path}: not a readable COCO annotation file ({type(error).__name__}: {error})") from None
    return boxes
