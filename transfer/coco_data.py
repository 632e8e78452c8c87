"""COCO-format data for the detection adapter: the standard COCO 2017 layout, checked before any work, and the
embedded COCO-format set the project generates from its scenes (``transfer/scenes.py``).

Layout (``--data-root``)::

    <root>/annotations/instances_train2017.json
    <root>/annotations/instances_val2017.json
    <root>/train2017/*.jpg
    <root>/val2017/*.jpg

The embedded set (``--embedded``) has the same layout with PNG images and run-length-encoded masks, so both go
through the same Detectron2 registration, loader and COCOEvaluator. Beside them it writes a manifest,
``<root>/mimbench_dataset.json``, that names the set (``coco-embedded``) for records and run folders; a root
without one is ``coco``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image

from mimbench.core.errors import DatasetError
from mimbench.core.io import atomic_write
from mimbench.transfer.scenes import CATEGORIES, make_scene

SPLITS = ("train2017", "val2017")
EXPECTED_LAYOUT = ("<root>/annotations/instances_{train,val}2017.json and the images in <root>/train2017/ and "
                   "<root>/val2017/ (COCO 2017 from cocodataset.org: train2017.zip, val2017.zip, "
                   "annotations_trainval2017.zip, unpacked into one folder)")
MANIFEST = "mimbench_dataset.json"
EMBEDDED_NAME = "coco-embedded"


@dataclass(frozen=True)
class CocoSplit:
    name: str  # "train2017" or "val2017"
    json_file: Path
    image_root: Path


def coco_layout(root: str | os.PathLike) -> dict[str, CocoSplit]:
    """The two splits of a COCO-layout folder, or a DatasetError naming what is missing."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"COCO data root {root} does not exist; expected {EXPECTED_LAYOUT}, or pass --embedded "
                            "for the small generated set")
    splits = {name: CocoSplit(name, root / "annotations" / f"instances_{name}.json", root / name) for name in SPLITS}
    missing = [str(path) for split in splits.values() for path, ok in
               ((split.json_file, split.json_file.is_file()), (split.image_root, split.image_root.is_dir())) if not ok]
    if missing:
        raise DatasetError(f"COCO data root {root} lacks {', '.join(missing)}; expected {EXPECTED_LAYOUT}")
    return splits


def dataset_name(root: str | os.PathLike) -> str:
    """The data set's name in records and run folders: its manifest's, else ``coco``."""
    manifest = Path(root) / MANIFEST
    return json.loads(manifest.read_text())["dataset"] if manifest.is_file() else "coco"


def subset_document(document: dict, count: int) -> dict:
    """The first ``count`` images of a COCO instances document (by image id) and exactly their annotations;
    every category, and the info / licenses, kept (so category ids and the evaluator's classes do not change)."""
    if count < 1:
        raise DatasetError(f"--subset {count}: give a positive number of images")
    images = sorted(document["images"], key=lambda image: image["id"])[:count]
    kept = {image["id"] for image in images}
    annotations = [a for a in document["annotations"] if a["image_id"] in kept]
    return {**document, "images": images, "annotations": annotations}


def subset_split(split: CocoSplit, count: int, folder: str | os.PathLike) -> CocoSplit:
    """Where ``write_coco_subset`` puts ``split`` cut to ``count`` images: its json under ``folder``, the images
    where they are (so the data root may be read-only)."""
    return CocoSplit(split.name, Path(folder) / f"instances_{split.name}_first{count}.json", split.image_root)


def write_coco_subset(split: CocoSplit, count: int, folder: str | os.PathLike) -> CocoSplit:
    """Write ``split``'s first ``count`` images (by id) and their annotations as ``subset_split``'s json,
    atomically (a crash or a concurrent reader never sees half a file)."""
    document = subset_document(json.loads(split.json_file.read_text()), count)
    subset = subset_split(split, count, folder)
    atomic_write(subset.json_file, lambda tmp: tmp.write_text(json.dumps(document)))
    return subset


# Sizes of the embedded set: enough for a detector to learn the four shapes on a CPU in minutes.
EMBEDDED_SIZES = {"train2017": 320, "val2017": 64}


def scene_annotations(masks: np.ndarray, categories: list[int], image_id: int, first_id: int) -> list[dict]:
    """COCO instance annotations of one scene: exact masks as RLE, tight boxes (x, y, w, h) from the masks."""
    annotations = []
    for offset, (mask, category) in enumerate(zip(masks, categories)):
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        annotations.append({
            "id": first_id + offset, "image_id": image_id, "category_id": category + 1, "iscrowd": 0,
            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
            "area": float(mask_util.area(rle)), "bbox": [float(v) for v in mask_util.toBbox(rle)],
        })
    return annotations


def write_embedded_coco(root: str | os.PathLike, image_size: int = 128, seed: int = 0,
                        sizes: dict[str, int] | None = None) -> Path:
    """Generate the embedded COCO-format set under ``root`` (once: a complete set is reused) and return ``root``.

    Scenes are photo crops with disjoint pasted objects of :data:`~mimbench.transfer.scenes.CATEGORIES`; the
    split's scenes use distinct scene indices, so train and val never share an image. The manifest naming the
    set is written last (also beside a set generated before manifests existed).
    """
    root = Path(root)
    sizes = sizes or EMBEDDED_SIZES
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CATEGORIES)]
    first_scene = 0
    for split, count in sizes.items():
        json_file = root / "annotations" / f"instances_{split}.json"
        if not json_file.is_file():  # the json is written last, so its presence means the split is complete
            (root / split).mkdir(parents=True, exist_ok=True)
            images, annotations = [], []
            for image_id in range(1, count + 1):
                scene = make_scene(first_scene + image_id, size=image_size, seed=seed)
                file_name = f"{image_id:06d}.png"
                Image.fromarray(scene.image).save(root / split / file_name)
                images.append({"id": image_id, "file_name": file_name, "height": image_size, "width": image_size})
                annotations += scene_annotations(scene.masks, scene.categories, image_id, len(annotations) + 1)
            document = {"info": {"description": f"mimbench embedded scenes, seed {seed}"}, "images": images,
                        "annotations": annotations, "categories": categories}
            json_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(json_file, lambda tmp, text=json.dumps(document): tmp.write_text(text))
        first_scene += count
    if not (root / MANIFEST).is_file():
        manifest = {"dataset": EMBEDDED_NAME, "generator": "mimbench.transfer.coco_data.write_embedded_coco"}
        atomic_write(root / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest)))
    return root
