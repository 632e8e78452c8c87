"""Embedded scenes for the detection and segmentation demos: real photographs as backgrounds, objects pasted on
them with masks exact by construction.

Backgrounds are random crops of the photographs bundled with scikit-image (the pretraining demo's photos). An
object is a filled shape (disc, box, triangle) or scikit-image's real horse silhouette, in a colour of its
category's hue (random saturation and brightness) with a darker rim, placed so that objects never overlap: every
mask is the whole object and boxes are tight. The COCO
and ADE20K adapters write the same scenes in their own formats; a scene depends only on (seed, index).
"""

from __future__ import annotations

import colorsys
import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from mimbench.core.photos import embedded_photos

CATEGORIES = ("disc", "box", "triangle", "horse")


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    masks: np.ndarray  # (N, H, W) bool, pairwise disjoint
    categories: list[int]  # index into CATEGORIES, one per mask


@functools.cache
def _horse_silhouette() -> np.ndarray:
    """scikit-image's horse (a real silhouette, True on the horse), cropped to its bounding box."""
    import skimage.data

    horse = ~skimage.data.horse()
    rows, cols = np.flatnonzero(horse.any(1)), np.flatnonzero(horse.any(0))
    return horse[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def object_mask(category: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A (height, width) bool mask of one object filling most of its box."""
    if category == "horse":
        silhouette = Image.fromarray(_horse_silhouette()).resize((width, height), Image.NEAREST)
        return np.asarray(silhouette, dtype=bool)
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    if category == "disc":
        draw.ellipse((0, 0, width - 1, height - 1), fill=1)
    elif category == "box":
        draw.rectangle((0, 0, width - 1, height - 1), fill=1)
    elif category == "triangle":
        apex = rng.uniform(0.2, 0.8) * (width - 1)
        draw.polygon([(apex, 0), (0, height - 1), (width - 1, height - 1)], fill=1)
    else:
        raise ValueError(f"unknown category {category!r}; choose one of: {', '.join(CATEGORIES)}")
    return np.asarray(canvas, dtype=bool)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    photos = embedded_photos()
    _, photo = photos[rng.integers(len(photos))]
    shorter = min(photo.size)
    side = int(rng.integers(min(size, shorter) // 2, shorter + 1))  # some photos are smaller than the scene
    left = int(rng.integers(photo.width - side + 1))
    top = int(rng.integers(photo.height - side + 1))
    crop = photo.crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR)
    return np.asarray(crop, dtype=np.uint8).copy()


def _rim(mask: np.ndarray) -> np.ndarray:
    """The mask's pixels that touch its outside (4-neighbourhood)."""
    padded = np.pad(mask, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def make_scene(index: int, size: int = 128, seed: int = 0, max_objects: int = 4,
               object_scale: tuple[float, float] = (0.25, 0.6)) -> Scene:
    """Scene ``index`` of the set ``seed``: a ``size``² photo crop with 1..max_objects disjoint objects whose
    sides are ``object_scale`` of the image side."""
    rng = np.random.default_rng([seed, index])
    image = _background(size, rng)
    occupied = np.zeros((size, size), dtype=bool)
    masks, categories = [], []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        category = int(rng.integers(len(CATEGORIES)))
        height, width = (int(rng.uniform(*object_scale) * size) for _ in range(2))
        shape = object_mask(CATEGORIES[category], height, width, rng)
        for _attempt in range(20):  # rejection sampling keeps objects disjoint, so masks are exact
            top, left = int(rng.integers(size - height + 1)), int(rng.integers(size - width + 1))
            mask = np.zeros_like(occupied)
            mask[top:top + height, left:left + width] = shape
            if mask.any() and not (mask & occupied).any():
                break
        else:
            continue
        hue = (category / len(CATEGORIES) + rng.uniform(-0.06, 0.06)) % 1.0  # a hue band per category
        colour = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.5, 1.0), rng.uniform(0.5, 1.0))) * 255
        colour = colour.astype(np.uint8)
        image[mask] = colour
        image[_rim(mask)] = colour // 3
        occupied |= mask
        masks.append(mask)
        categories.append(category)
    return Scene(image=image, masks=np.stack(masks) if masks else np.zeros((0, size, size), bool),
                 categories=categories)
