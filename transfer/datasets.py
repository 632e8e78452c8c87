"""Classification transfer datasets, read from their standard on-disk layouts (never downloaded).

The protocol is Kornblith et al. 2019, "Do Better ImageNet Models Transfer Better?" (CVPR), as used by
Ericsson et al. 2021 and by the MixedAE paper: a linear probe is fit on `train`, its regulariser chosen on
`val`, then refit on `trainval` and scored on `test`. Where a dataset ships a validation split (Aircraft, DTD,
Flowers, VOC2007) it is used; otherwise a seeded 20% of the official training set is held out as `val`.

Every dataset comes back as a `LabelledImages`: image sources (file paths, or pixel arrays for CIFAR and the
embedded digits) with their targets and class names, so a linear probe can read `.targets` without opening a
single image. The torchvision class of each dataset parses its layout; we keep its (path, label) lists and
load the images through one function, `read_rgb`, which turns an unreadable file into a warning naming it and
a `None` sample, which `collate_readable` drops, instead of a crash hours into a feature extraction.
"""

from __future__ import annotations

import os
import warnings
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate
from torchvision import datasets as tv

from mimbench.core.errors import DatasetError

SPLITS = ("train", "val", "trainval", "test")

# Kornblith et al. 2019: without an official validation split, 20% of the training set is held out to choose the
# hyperparameters.
VAL_FRACTION = 0.2
# Kornblith et al. 2019: Caltech-101 is split by drawing 30 random images per class for training, the rest test.
CALTECH_TRAINVAL_PER_CLASS = 30
# ImageNet's official val is our test; a 10,000-image subset of train stands in for val, to choose the probe's
# regulariser only (20% of train would cost a quarter of a million images of feature extraction for nothing).
IMAGENET_VAL_IMAGES = 10_000

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")




@dataclass(frozen=True)
class DatasetSpec:
    """What a transfer dataset is, how it is scored, and where its files go."""

    name: str  # "cifar10"
    title: str  # "CIFAR-10"
    num_classes: int
    metric: str  # "top1" | "mean_per_class_accuracy" | "map11"
    multilabel: bool  # True only for voc2007
    layout: str  # the expected on-disk layout under the data root, multi-line
    source: str  # where the official archive(s) come from and how to extract them


class LabelledImages(Dataset):
    """Images with their targets: ``dataset[i]`` is ``(transform(rgb_image), target)``, or None if unreadable.

    `images` holds file paths, or a uint8 array (N, H, W[, 3]) for datasets stored as pixels (CIFAR, digits).
    """

    def __init__(self, images: Sequence[Path] | np.ndarray, targets: list, classes: list[str],
                 transform: Callable | None = None) -> None:
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.images = images
        self.targets = targets
        self.classes = classes
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[object, int | torch.Tensor] | None:
        image = read_rgb(self.images[index])
        if image is None:
            return None
        return (self.transform(image) if self.transform is not None else image), self.targets[index]

    def subset(self, indices: Sequence[int]) -> LabelledImages:
        """The samples at `indices`, in that order, with the same classes and transform."""
        if isinstance(self.images, np.ndarray):
            images = self.images[np.asarray(indices, dtype=np.int64)]
        else:
            images = [self.images[i] for i in indices]
        return LabelledImages(images, [self.targets[i] for i in indices], self.classes, self.transform)


def read_rgb(source: Path | str | np.ndarray) -> Image.Image | None:
    """The RGB image of a file or pixel array; None (and a warning naming the file) if the file is unreadable."""
    if isinstance(source, np.ndarray):
        return Image.fromarray(source).convert("RGB")
    try:
        with Image.open(source) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        # One bad file among a hundred thousand should cost one sample, not the whole job.
        warnings.warn(f"{source}: cannot read image ({error}); skipped", stacklevel=2)
        return None


def collate_readable(batch: list) -> tuple[torch.Tensor, torch.Tensor] | None:
    """default_collate over the readable samples of `batch` (unreadable ones are None); None if none is left."""
    readable = [sample for sample in batch if sample is not None]
    if not readable:
        return None
    images, targets = default_collate(readable)  # a list of two for (image, target) pairs
    return images, targets


# ---- splits -------------------------------------------------------------------------------------------------------


def _count_class(target: int | torch.Tensor) -> int | None:
    """The class an image counts under for `first_per_class`: its label, or for a multi-hot VOC target the first
    class with a non-difficult object (1), else the first with a difficult one (-1); None for an empty target."""
    if not isinstance(target, torch.Tensor):
        return int(target)
    for value in (1, -1):
        marked = torch.nonzero(target == value).flatten()
        if len(marked):
            return int(marked[0])
    return None


def first_per_class(dataset: LabelledImages, per_class: int) -> LabelledImages:
    """The first `per_class` images of each class, in the dataset's own order: a fixed slice for quick checks.

    Classes with fewer images keep all of theirs; `.classes` is unchanged (the head keeps every class).
    """
    if per_class < 1:
        raise DatasetError(f"per_class must be a positive number of images, not {per_class}")
    seen: dict[int | None, int] = {}
    kept = []
    for index, target in enumerate(dataset.targets):
        label = _count_class(target)
        if seen.get(label, 0) < per_class:
            seen[label] = seen.get(label, 0) + 1
            kept.append(index)
    return dataset.subset(kept)


def concatenate(first: LabelledImages, second: LabelledImages) -> LabelledImages:
    """`first`'s samples followed by `second`'s (same classes; `first`'s transform)."""
    if first.classes != second.classes:
        raise DatasetError(f"cannot join splits naming different classes ({len(first.classes)} vs "
                           f"{len(second.classes)})")
    if isinstance(first.images, np.ndarray) and isinstance(second.images, np.ndarray):
        images: Sequence[Path] | np.ndarray = np.concatenate([first.images, second.images])
    else:
        images = list(first.images) + list(second.images)
    return LabelledImages(images, list(first.targets) + list(second.targets), first.classes, first.transform)


def holdout(count: int, held: int, seed: int) -> tuple[list[int], list[int]]:
    """A seeded random `held` of range(count) and the rest, each in increasing order: (kept, held)."""
    order = np.random.default_rng(seed).permutation(count)  # a local generator: global RNG state never matters
    return sorted(order[held:].tolist()), sorted(order[:held].tolist())


def _with_heldout_val(read_official: Callable[[str], LabelledImages], split: str, seed: int) -> LabelledImages:
    """Splits of a dataset with an official train/test only: val is a seeded 20% of the official train."""
    if split == "test":
        return read_official("test")
    official_train = read_official("train")
    if split == "trainval":
        return official_train
    train, val = holdout(len(official_train), round(VAL_FRACTION * len(official_train)), seed)
    return official_train.subset(train if split == "train" else val)


def _with_official_val(read_official: Callable[[str], LabelledImages], split: str) -> LabelledImages:
    """Splits of a dataset with an official train/val/test: trainval is train followed by val."""
    if split != "trainval":
        return read_official(split)
    train, val = read_official("train"), read_official("val")
    if train.classes != val.classes:
        raise _LayoutProblem(f"the train and val lists name different classes ({len(train.classes)} vs "
                             f"{len(val.classes)}): the split files are incomplete")
    return LabelledImages(list(train.images) + list(val.images), train.targets + val.targets, train.classes)


def _caltech_split(labels: Sequence[int], seed: int) -> dict[str, list[int]]:
    """Kornblith et al.'s Caltech-101 split: a seeded 30 images per class are trainval, the rest test.

    A class with 30 images or fewer keeps one image (or more) for test: trainval takes min(30, n - 1). Val is
    a seeded fifth of each class's trainval (6 of 30; none for a class with fewer than 5 trainval images).
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    parts: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label)).tolist()
        trainval_count = min(CALTECH_TRAINVAL_PER_CLASS, len(members) - 1)
        val_count = trainval_count // 5
        parts["val"] += members[:val_count]
        parts["train"] += members[val_count:trainval_count]
        parts["test"] += members[trainval_count:]
    parts["trainval"] = parts["train"] + parts["val"]
    return {split: sorted(indices) for split, indices in parts.items()}


# ---- readers: (root, split, seed) -> LabelledImages ------------------------------------------------------------------
# Each one leans on torchvision's parser of the layout and keeps its (private, long-stable) path and label lists.


class _LayoutProblem(Exception):
    """What is wrong with the files under the root; build_dataset adds the dataset, the layout and the source."""


def _require(folder: Path, *names: str) -> None:
    """Raise _LayoutProblem naming the first missing part of the layout."""
    for path in [folder, *(folder / name for name in names)]:
        if not path.exists():
            raise _LayoutProblem(f"missing {path}")


# The torchvision classes below compare MD5 checksums besides checking that the files are there. We keep the
# presence check and drop the checksums: they guard downloads, which we never do, and a test's tiny copy of the
# layout cannot match them.
class _CIFAR10(tv.CIFAR10):
    train_list = [[name, None] for name, _md5 in tv.CIFAR10.train_list]
    test_list = [[name, None] for name, _md5 in tv.CIFAR10.test_list]
    meta = {**tv.CIFAR10.meta, "md5": None}


class _CIFAR100(tv.CIFAR100):
    train_list = [[name, None] for name, _md5 in tv.CIFAR100.train_list]
    test_list = [[name, None] for name, _md5 in tv.CIFAR100.test_list]
    meta = {**tv.CIFAR100.meta, "md5": None}


class _Flowers102(tv.Flowers102):
    _file_dict = {key: (filename, None) for key, (filename, _md5) in tv.Flowers102._file_dict.items()}


def _cifar(cifar_class: type[tv.CIFAR10]) -> Callable[[Path, str, int], LabelledImages]:
    def read(root: Path, split: str, seed: int) -> LabelledImages:
        folder = root / cifar_class.base_folder
        files = [name for name, _md5 in cifar_class.train_list + cifar_class.test_list] + [cifar_class.meta["filename"]]
        _require(folder, *files)

        def official(part: str) -> LabelledImages:
            cifar = cifar_class(str(root), train=part == "train")
            return LabelledImages(cifar.data, list(cifar.targets), list(cifar.classes))

        return _with_heldout_val(official, split, seed)

    return read


def _read_aircraft(root: Path, split: str, seed: int) -> LabelledImages:
    _require(root / "fgvc-aircraft-2013b" / "data", "variants.txt", "images")
    # Kornblith et al.: the 100 variants, the official train/val/test (and trainval) lists.
    aircraft = tv.FGVCAircraft(str(root), split=split, annotation_level="variant")
    return LabelledImages([Path(p) for p in aircraft._image_files], list(aircraft._labels), list(aircraft.classes))


def _read_caltech101(root: Path, split: str, seed: int) -> LabelledImages:
    # Checked before torchvision, whose constructor would otherwise create <root>/caltech101 in the user's tree.
    _require(root / "caltech101" / "101_ObjectCategories")
    caltech = tv.Caltech101(str(root), target_type="category")  # BACKGROUND_Google is dropped: 101 classes
    images = [Path(caltech.root, "101_ObjectCategories", caltech.categories[label], f"image_{number:04d}.jpg")
              for label, number in zip(caltech.y, caltech.index)]
    everything = LabelledImages(images, list(caltech.y), list(caltech.categories))
    return everything.subset(_caltech_split(caltech.y, seed)[split])


def _read_cars(root: Path, split: str, seed: int) -> LabelledImages:
    def official(part: str) -> LabelledImages:
        annotations, images = (("devkit/cars_train_annos.mat", "cars_train") if part == "train"
                               else ("cars_test_annos_withlabels.mat", "cars_test"))
        _require(root / "stanford_cars", "devkit/cars_meta.mat", annotations, images)
        cars = tv.StanfordCars(str(root), split=part)
        # int(): the labels come out of the .mat files as numpy integers.
        return LabelledImages([Path(p) for p, _ in cars._samples], [int(label) for _, label in cars._samples],
                              list(cars.classes))

    return _with_heldout_val(official, split, seed)


def _read_dtd(root: Path, split: str, seed: int) -> LabelledImages:
    _require(root / "dtd" / "dtd", "images", "labels")

    def official(part: str) -> LabelledImages:
        dtd = tv.DTD(str(root), split=part, partition=1)  # Kornblith et al.: the first of DTD's ten splits
        return LabelledImages(list(dtd._image_files), list(dtd._labels), list(dtd.classes))

    return _with_official_val(official, split)


def _read_flowers(root: Path, split: str, seed: int) -> LabelledImages:
    _require(root / "flowers-102", "jpg", "imagelabels.mat", "setid.mat")

    def official(part: str) -> LabelledImages:
        flowers = _Flowers102(str(root), split=part)
        return LabelledImages(list(flowers._image_files), list(flowers._labels), list(flowers.classes))

    return _with_official_val(official, split)


def _read_food(root: Path, split: str, seed: int) -> LabelledImages:
    _require(root / "food-101", "images", "meta")

    def official(part: str) -> LabelledImages:
        food = tv.Food101(str(root), split=part)
        return LabelledImages(list(food._image_files), list(food._labels), list(food.classes))

    return _with_heldout_val(official, split, seed)


def _read_pets(root: Path, split: str, seed: int) -> LabelledImages:
    _require(root / "oxford-iiit-pet", "images", "annotations")

    def official(part: str) -> LabelledImages:
        # Pets' official training list is called trainval; we hold our val out of it like any train/test set.
        pets = tv.OxfordIIITPet(str(root), split="trainval" if part == "train" else "test", target_types="category")
        return LabelledImages(list(pets._images), list(pets._labels), list(pets.classes))

    return _with_heldout_val(official, split, seed)


def _read_sun397(root: Path, split: str, seed: int) -> LabelledImages:
    data_dir = root / "SUN397"
    _require(data_dir, "ClassName.txt", "Partitions/Training_01.txt", "Partitions/Testing_01.txt")

    def official(part: str) -> LabelledImages:
        sun = tv.SUN397(str(root))  # every image under SUN397/; the partition list picks ours
        label_of = {path.relative_to(data_dir).as_posix(): label for path, label in zip(sun._image_files, sun._labels)}
        # Kornblith et al.: the first of SUN397's ten official partitions (50 train + 50 test images per class).
        listing = data_dir / "Partitions" / ("Training_01.txt" if part == "train" else "Testing_01.txt")
        names = [line.strip().lstrip("/") for line in listing.read_text().splitlines() if line.strip()]
        missing = [name for name in names if name not in label_of]
        if missing:
            raise _LayoutProblem(f"{len(missing)} images of {listing.name} are absent, e.g. {data_dir / missing[0]}")
        return LabelledImages([data_dir / name for name in names], [label_of[name] for name in names],
                              list(sun.classes))

    return _with_heldout_val(official, split, seed)


def _voc_target(annotation: str) -> torch.Tensor:
    """VOC's multi-hot target: 1 = some non-difficult object of the class, -1 = only difficult ones, 0 = none.

    -1 marks what the VOC devkit's AP ignores (difficult objects count neither as hits nor as misses).
    """
    target = torch.zeros(len(VOC_CLASSES))
    for obj in ElementTree.parse(annotation).getroot().iter("object"):
        index = VOC_CLASSES.index(obj.findtext("name", "").strip())
        difficult = obj.findtext("difficult", "0").strip() == "1"
        if not difficult:
            target[index] = 1
        elif target[index] == 0:
            target[index] = -1
    return target


def _read_voc2007(root: Path, split: str, seed: int) -> LabelledImages:
    _require(root / "VOCdevkit" / "VOC2007", "JPEGImages", "Annotations", "ImageSets/Main")
    # Kornblith et al.: VOC2007's official train/val/trainval/test lists.
    voc = tv.VOCDetection(str(root), year="2007", image_set=split)
    return LabelledImages([Path(p) for p in voc.images], [_voc_target(a) for a in voc.annotations],
                          list(VOC_CLASSES))


def _read_imagenet(root: Path, split: str, seed: int) -> LabelledImages:
    _require(root, "train")
    if split == "test":  # the official val, sorted into the same class folders as train
        _require(root, "val")
        val = tv.ImageFolder(str(root / "val"))
        train_classes = sorted(entry.name for entry in os.scandir(root / "train") if entry.is_dir())
        if val.classes != train_classes:
            raise _LayoutProblem(f"{root / 'val'} has {len(val.classes)} class folders, {root / 'train'} has "
                                 f"{len(train_classes)}: val must be sorted into the train's <wnid> folders")
        return LabelledImages([Path(p) for p, _ in val.samples], list(val.targets), list(val.classes))
    train = tv.ImageFolder(str(root / "train"))
    official_train = LabelledImages([Path(p) for p, _ in train.samples], list(train.targets), list(train.classes))
    if split == "trainval":
        return official_train
    # 10,000 images, or 20% of a copy smaller than 50,000 images (a test's tiny one).
    held = min(IMAGENET_VAL_IMAGES, round(VAL_FRACTION * len(official_train)))
    kept, val = holdout(len(official_train), held, seed)
    return official_train.subset(kept if split == "train" else val)


def _read_digits(split: str, seed: int) -> LabelledImages:
    from sklearn.datasets import load_digits  # only the embedded set needs scikit-learn

    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)  # 0-16 gray levels -> 0-255
    everything = LabelledImages(pixels, digits.target.tolist(), [str(d) for d in range(10)])
    # test = 20% of all, val = 20% of the rest, train = the remainder; one seeded permutation draws all three.
    order = np.random.default_rng(seed).permutation(len(everything)).tolist()
    test_count = round(VAL_FRACTION * len(order))
    val_count = round(VAL_FRACTION * (len(order) - test_count))
    parts = {"test": order[:test_count], "val": order[test_count:test_count + val_count],
             "train": order[test_count + val_count:]}
    parts["trainval"] = parts["train"] + parts["val"]
    return everything.subset(sorted(parts[split]))


_READERS: dict[str, Callable[[Path, str, int], LabelledImages]] = {
    "aircraft": _read_aircraft,
    "caltech101": _read_caltech101,
    "cars": _read_cars,
    "cifar10": _cifar(_CIFAR10),
    "cifar100": _cifar(_CIFAR100),
    "dtd": _read_dtd,
    "flowers": _read_flowers,
    "food": _read_food,
    "pets": _read_pets,
    "sun397": _read_sun397,
    "voc2007": _read_voc2007,
    "imagenet": _read_imagenet,
}

# Metrics follow Kornblith et al. 2019: mean per-class accuracy for Aircraft, Caltech-101, Flowers and Pets,
# 11-point mAP for VOC2007, top-1 accuracy for the rest.
DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in [
    DatasetSpec(
        "aircraft", "FGVC Aircraft", 100, "mean_per_class_accuracy", False,
        "<root>/fgvc-aircraft-2013b/data/variants.txt\n"
        "<root>/fgvc-aircraft-2013b/data/images_variant_{train,val,trainval,test}.txt\n"
        "<root>/fgvc-aircraft-2013b/data/images/<id>.jpg",
        "fgvc-aircraft-2013b.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/, extracted into <root>"),
    DatasetSpec(
        "caltech101", "Caltech-101", 101, "mean_per_class_accuracy", False,
        "<root>/caltech101/101_ObjectCategories/<category>/image_0001.jpg, image_0002.jpg, ...\n"
        "(102 folders: the 101 categories and BACKGROUND_Google, which is not a class)",
        "caltech-101.zip from https://data.caltech.edu/records/mzrjq-6wc02; extract the 101_ObjectCategories.tar.gz "
        "inside it into <root>/caltech101"),
    DatasetSpec(
        "cars", "Stanford Cars", 196, "top1", False,
        "<root>/stanford_cars/devkit/{cars_meta.mat,cars_train_annos.mat}\n"
        "<root>/stanford_cars/cars_test_annos_withlabels.mat\n"
        "<root>/stanford_cars/cars_train/<fname>.jpg\n"
        "<root>/stanford_cars/cars_test/<fname>.jpg",
        "car_devkit.tgz, cars_train.tgz, cars_test.tgz and cars_test_annos_withlabels.mat from "
        "https://ai.stanford.edu/~jkrause/cars/car_dataset.html (now offline: use a mirror of these original "
        "files), extracted into <root>/stanford_cars"),
    DatasetSpec(
        "cifar10", "CIFAR-10", 10, "top1", False,
        "<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}",
        "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, extracted into <root>"),
    DatasetSpec(
        "cifar100", "CIFAR-100", 100, "top1", False,
        "<root>/cifar-100-python/{train,test,meta}",
        "cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, extracted into <root>"),
    DatasetSpec(
        "dtd", "DTD", 47, "top1", False,
        "<root>/dtd/dtd/images/<class>/<name>.jpg\n"
        "<root>/dtd/dtd/labels/{train1,val1,test1}.txt",
        "dtd-r1.0.1.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/dtd/, extracted into <root>/dtd "
        "(it unpacks a dtd/ folder)"),
    DatasetSpec(
        "flowers", "Oxford 102 Flowers", 102, "mean_per_class_accuracy", False,
        "<root>/flowers-102/jpg/image_00001.jpg ... image_08189.jpg\n"
        "<root>/flowers-102/{imagelabels.mat,setid.mat}",
        "102flowers.tgz (extracted), imagelabels.mat and setid.mat from "
        "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/, all into <root>/flowers-102"),
    DatasetSpec(
        "food", "Food-101", 101, "top1", False,
        "<root>/food-101/images/<class>/<id>.jpg\n"
        "<root>/food-101/meta/{train,test}.json",
        "food-101.tar.gz from https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/, extracted into <root>"),
    DatasetSpec(
        "pets", "Oxford-IIIT Pets", 37, "mean_per_class_accuracy", False,
        "<root>/oxford-iiit-pet/images/<Breed_name>_<n>.jpg\n"
        "<root>/oxford-iiit-pet/annotations/{trainval,test}.txt",
        "images.tar.gz and annotations.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/pets/, both extracted "
        "into <root>/oxford-iiit-pet"),
    DatasetSpec(
        "sun397", "SUN397", 397, "top1", False,
        "<root>/SUN397/ClassName.txt\n"
        "<root>/SUN397/<letter>/<class>/sun_<id>.jpg\n"
        "<root>/SUN397/Partitions/{Training_01,Testing_01}.txt",
        "SUN397.tar.gz from https://vision.princeton.edu/projects/2010/SUN/, extracted into <root>; and "
        "Training_01.txt and Testing_01.txt from https://vision.princeton.edu/projects/2010/SUN/download/"
        "Partitions.zip, put in <root>/SUN397/Partitions"),
    DatasetSpec(
        "voc2007", "Pascal VOC 2007", 20, "map11", True,
        "<root>/VOCdevkit/VOC2007/JPEGImages/<id>.jpg\n"
        "<root>/VOCdevkit/VOC2007/Annotations/<id>.xml\n"
        "<root>/VOCdevkit/VOC2007/ImageSets/Main/{train,val,trainval,test}.txt",
        "VOCtrainval_06-Nov-2007.tar and VOCtest_06-Nov-2007.tar from "
        "http://host.robots.ox.ac.uk/pascal/VOC/voc2007/, both extracted into <root>"),
    DatasetSpec(
        "imagenet", "ImageNet", 1000, "top1", False,
        "<root>/train/<wnid>/<image>.JPEG\n"
        "<root>/val/<wnid>/<image>.JPEG (the 50,000 val images sorted into the train's class folders)",
        "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from https://image-net.org/ (registration needed): "
        "train extracted into <root>/train/<wnid>/, val into <root>/val/ and sorted into <wnid> folders"),
    DatasetSpec(
        "digits", "Digits (embedded)", 10, "top1", False,
        "none: scikit-learn's bundled 8x8 digits (sklearn.datasets.load_digits); the data root is ignored",
        "ships inside the scikit-learn wheel"),
]}


def _unusable(spec: DatasetSpec, root: Path | None, problem: str) -> DatasetError:
    """One message naming the dataset, the root given, what is wrong, the layout expected and where to get it."""
    layout = "\n".join(f"  {line}" for line in spec.layout.splitlines())
    place = "no data root given" if root is None else f"no usable dataset at data root {root}"
    return DatasetError(f"{spec.title}: {place} ({problem})\n"
                        f"expected layout:\n{layout}\n"
                        f"get it: {spec.source}")


def build_dataset(name: str, root: str | os.PathLike | None, split: str, transform: Callable | None = None,
                  seed: int = 0) -> Dataset:
    """The `split` ("train", "val", "trainval" or "test") of transfer dataset `name`, read from under `root`.

    Samples are ``(transform(rgb_pil_image), target)`` or None for an unreadable file (see `collate_readable`);
    the dataset has `.classes` and `.targets`. `seed` draws the held-out val (and Caltech-101's split, digits').
    """
    if name not in DATASETS:
        raise DatasetError(f"unknown transfer dataset {name!r}; known: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r} of {name}; known: {', '.join(SPLITS)}")
    spec = DATASETS[name]
    if name == "digits":
        dataset = _read_digits(split, seed)  # embedded: the root is ignored
    elif root is None or str(root) == "":
        raise _unusable(spec, None, "pass --data-root DIR, the folder that holds it; or try the embedded labelled "
                                    "set, which needs no data: transfer/run.py digits --ckpt ...")
    else:
        root_path = Path(root).expanduser()
        if not root_path.is_dir():
            raise _unusable(spec, root_path, "not a directory" if root_path.exists() else "it does not exist")
        try:
            dataset = _READERS[name](root_path, split, seed)
        except _LayoutProblem as problem:
            raise _unusable(spec, root_path, str(problem)) from None
        except FileNotFoundError as error:  # torchvision reading a split or label file, ImageFolder finding no image
            raise _unusable(spec, root_path, f"missing {error.filename}" if error.filename else str(error)) from None
        except RuntimeError as error:
            # torchvision's own presence checks; our message replaces its advice on fetching the files.
            if not str(error).startswith(("Dataset not found", "Dataset metadata file not found")):
                raise
            raise _unusable(spec, root_path, "the layout is incomplete") from None
    dataset.transform = transform
    return dataset
