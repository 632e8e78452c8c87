"""Pretraining data for the MAE-style methods: images in, augmented (3, S, S) tensors out, labels never.

A data root is a folder; `build_pretrain_dataset` reads it as one of two sources:

* `EmbeddedPhotos`: the few dozen real photographs bundled in the scikit-image wheel, written once as lossless
  PNGs with a manifest (`write_embedded_photos`, what ``--embedded`` points at), so a demo or a smoke test runs
  offline with no data set to download. The manifest is what marks a folder as this set;
* `ImageFiles`: any other folder, ImageNet-style ``<root>/<class>/<image>.JPEG`` or any tree of images.

A sample is ``(image, unreadable)``. An unreadable file (a truncated JPEG, a stray ``fake.jpg``) is found when its
sample is drawn, not up front (reading every header of ImageNet first would take longer than an epoch): it is
skipped with a warning naming it, the next readable file in path order stands in for it so batch shapes hold, and
``unreadable`` carries its index (else -1) out of the DataLoader worker, so the engine counts skipped files across
workers and processes and stops when their share passes a limit.

Exact resume: every augmentation is a pure function of (seed, epoch, index), whatever the DataLoader worker
that draws it or the global RNG state, and `ShardedSampler` can skip the samples a rank already consumed in
the current epoch. Together, a run resumed mid-epoch sees exactly the batches it would have seen.

Epochs and workers: DataLoader workers hold *copies* of the dataset, so `set_epoch` only reaches them when
they are started after it. Call ``dataset.set_epoch(e)`` and ``sampler.set_epoch(e, skip)`` and then create a
fresh iterator (``iter(loader)``, with ``persistent_workers=False``, the default) every epoch.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD
from torch.utils.data import Dataset, Sampler
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from mimbench.core.errors import DatasetError
from mimbench.core.photos import embedded_photos
from mimbench.pretrain.objects import (
    CROP_SCALE,
    CentricObjectRule,
    ObjectAwareTransform,
    coco_annotation_file,
    read_coco_boxes,
)

EXPECTED_LAYOUT = "ImageNet-style <root>/<class>/<image>.JPEG or a folder of .jpg/.png images"
MANIFEST = "manifest.json"
EMBEDDED_SET = "mimbench embedded photos"  # the manifest's "set": what makes a folder the embedded photos
UNREADABLE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # what PIL raises on bad files


def after_crop() -> list[Callable]:
    """What MAE's augmentation does after the crop: a random flip and ImageNet normalisation."""
    return [transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def pretrain_transform(img_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """MAE's augmentation: a random 20-100% area crop resized to img_size, a random flip, ImageNet normalisation."""
    return transforms.Compose([
        transforms.RandomResizedCrop(img_size, scale=CROP_SCALE, interpolation=transforms.InterpolationMode.BICUBIC),
        *after_crop(),
    ])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The RNG seed of one sample's augmentation (non-negative seed, epoch and index)."""
    # SeedSequence hashes the triple, so neighbouring indices or epochs do not get related random streams.
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)
    return int(state[0])


class _SeededAugmentation(Dataset):
    """Applies `pretrain_transform` with randomness drawn from (seed, epoch, index) alone."""

    def __init__(self, img_size: int, seed: int) -> None:
        self.img_size = img_size
        self.seed = seed
        self.epoch = 0
        self.transform = pretrain_transform(img_size)

    def set_epoch(self, epoch: int) -> None:
        """Use epoch's augmentations; reaches DataLoader workers only if their iterator is created afterwards."""
        self.epoch = epoch

    def image(self, index: int) -> tuple[Image.Image, int]:
        """Sample index's RGB image, and index if its own file was unreadable (else -1)."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, unreadable = self.image(index)
        # fork_rng restores the global CPU RNG afterwards, so the caller's random stream is untouched. The v1
        # transforms draw only from torch's RNG, hence no need to seed Python's `random`.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, self.epoch, index))
            return self.transform(image), unreadable


class EmbeddedPhotos(_SeededAugmentation):
    """Random crops of the bundled photographs, read from the folder `write_embedded_photos` wrote.

    An epoch has `samples_per_epoch` samples; sample i is a crop of photo ``i % len(names)``.
    """

    def __init__(self, root: str | os.PathLike, img_size: int, samples_per_epoch: int = 2048, seed: int = 0) -> None:
        super().__init__(img_size, seed)
        self.root = Path(root)
        self.samples_per_epoch = samples_per_epoch
        photos = json.loads((self.root / MANIFEST).read_text())["photos"]
        self.names = [photo["name"] for photo in photos]
        try:
            self.images = [_read_rgb(self.root / photo["file"]) for photo in photos]
        except UNREADABLE_ERRORS as error:
            raise DatasetError(f"{self.root}: a photo of the embedded set is unreadable ({error}); remove the "
                               "folder and --embedded writes it again") from None

    @property
    def description(self) -> str:
        """What the export metadata's ``data`` says."""
        return f"embedded:scikit-image photos ({len(self)} crops/epoch)"

    def __len__(self) -> int:
        return self.samples_per_epoch

    def image(self, index: int) -> tuple[Image.Image, int]:
        return self.images[index % len(self.images)], -1


class ImageFiles(_SeededAugmentation):
    """Every image under root, in sorted path order; class folders (ImageNet's train/) are walked, labels ignored."""

    def __init__(self, root: str | os.PathLike, img_size: int, seed: int = 0) -> None:
        super().__init__(img_size, seed)
        self.root = Path(root)
        if not self.root.is_dir():
            problem = "does not exist" if not self.root.exists() else "is not a directory"
            raise DatasetError(_layout_message(f"data root {self.root} {problem}"))
        self.paths = _find_images(self.root)
        if not self.paths:
            raise DatasetError(_layout_message(f"no images found under data root {self.root}"))
        # One sample read here turns a folder with no readable image at all into one line from this process,
        # not a DataLoader worker's traceback.
        self.image(0)

    @property
    def description(self) -> str:
        return str(self.root)

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, index: int) -> tuple[Image.Image, int]:
        """The file's image; an unreadable file is skipped with a warning and the next readable one (in path
        order, wrapping around) stands in, so the sample stays a pure function of index. Only the sample's own
        file is warned about and reported: a stand-in candidate that fails is, when its own sample is drawn."""
        for offset in range(len(self.paths)):
            path = self.paths[(index + offset) % len(self.paths)]
            try:
                return _read_rgb(path), index if offset else -1
            except UNREADABLE_ERRORS as error:
                if not offset:
                    warnings.warn(f"{path}: cannot read image ({error}); skipped", stacklevel=2)
        raise DatasetError(f"none of the {len(self.paths)} images under {self.root} is readable")


class ObjectImages(ImageFiles):
    """The images of a COCO layout, each source crop holding one centric object of its boxes
    (:mod:`mimbench.pretrain.objects`): MixedAE-Full's object-aware sources."""

    def __init__(self, images: Path, annotations: Path, img_size: int, rule: CentricObjectRule, seed: int = 0) -> None:
        self.boxes = read_coco_boxes(annotations)
        super().__init__(images, img_size, seed=seed)
        self.annotations = annotations
        self.transform = ObjectAwareTransform(img_size, rule, transforms.Compose(after_crop()))

    @property
    def description(self) -> str:
        return f"{self.root} (object-aware crops, boxes from {self.annotations.name})"

    def image(self, index: int) -> tuple[Image.Image, int]:
        """The file's image with its boxes in ``info["boxes"]``; a stand-in for an unreadable file has none (the
        boxes are its sample's file's)."""
        image, unreadable = super().image(index)
        name = self.paths[index].relative_to(self.root).as_posix()
        image.info["boxes"] = [] if unreadable >= 0 else self.boxes.get(name, [])
        return image, unreadable


def _read_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def _layout_message(problem: str) -> str:
    return f"{problem}; expected {EXPECTED_LAYOUT}, or pass --embedded for the bundled demo photos"


def _find_images(root: Path) -> list[Path]:
    found = []
    # followlinks: ImageNet is often a tree of symlinks into shared storage.
    for folder, subfolders, files in os.walk(root, followlinks=True):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        # Dot files are skipped: macOS "._x.jpg" resource forks carry an image extension but are not images.
        found += [Path(folder, name) for name in files
                  if not name.startswith(".") and has_file_allowed_extension(name, IMG_EXTENSIONS)]
    return sorted(found)


def is_embedded_photos(root: str | os.PathLike) -> bool:
    manifest = Path(root) / MANIFEST
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text()).get("set") == EMBEDDED_SET
    except (ValueError, AttributeError):
        return False


def write_embedded_photos(root: str | os.PathLike) -> Path:
    """Write the bundled photographs under root as PNG files (lossless: the pixels stay identical) with a
    manifest listing them in order, once; a folder that already holds them is reused."""
    root = Path(root)
    if is_embedded_photos(root):
        return root
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DatasetError(f"{root} exists and is not the embedded photo set (no {MANIFEST} naming it); remove it "
                           "or choose another folder")
    import skimage

    # Written beside root and renamed into place, so a reader never sees half a set; when two processes
    # write it at once, the first rename wins and the other one's copy is dropped.
    staging = root.with_name(f".{root.name}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    photos = []
    for number, (name, image) in enumerate(embedded_photos()):
        photos.append({"name": name, "file": f"{number:02d}_{name}.png"})
        image.save(staging / photos[-1]["file"], format="png")
    manifest = {"set": EMBEDDED_SET, "source": f"scikit-image {skimage.__version__} (skimage.data)",
                "photos": photos}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    try:
        if root.is_dir():
            root.rmdir()  # empty (checked above)
        os.rename(staging, root)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not is_embedded_photos(root):
            raise
    return root


class ShardedSampler(Sampler[int]):
    """A seeded shuffle per epoch, split across ranks batch by batch, that can resume mid-epoch.

    Rank r takes the r-th block of ``batch_size`` indices out of every ``batch_size * num_replicas``
    consecutive positions of the permutation (``batch_size=1`` is DistributedSampler's interleave). So the
    global batch of step s is the same slice of the permutation whatever the number of processes, and N
    processes with batch b see the data of one process with batch b and N accumulation steps. The tail that
    cannot fill a global batch is dropped so ranks stay in step. `set_epoch(epoch, skip)` skips the first
    `skip` of this rank's indices, those a resumed run already consumed.
    """

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0, seed: int = 0, batch_size: int = 1) -> None:
        if length < 0 or num_replicas < 1 or not 0 <= rank < num_replicas or batch_size < 1:
            raise ValueError(f"ShardedSampler needs length >= 0, batch_size >= 1 and 0 <= rank < num_replicas, "
                             f"got length={length}, rank={rank}, num_replicas={num_replicas}, batch_size={batch_size}")
        self.length = length
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.batch_size = batch_size
        self.per_rank = length // (num_replicas * batch_size) * batch_size
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Yield epoch's order, less the first `skip` indices of this rank (already consumed before a resume)."""
        if not 0 <= skip <= self.per_rank:
            raise ValueError(f"skip must be in [0, {self.per_rank}] (this rank's samples per epoch), got {skip}")
        self.epoch = epoch
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.length, generator=generator)[: self.per_rank * self.num_replicas]
        mine = order.view(-1, self.num_replicas, self.batch_size)[:, self.rank].flatten()
        return iter(mine[self.skip :].tolist())

    def __len__(self) -> int:
        return self.per_rank - self.skip


def build_pretrain_dataset(data_root: str | os.PathLike | None, img_size: int, seed: int = 0,
                           samples_per_epoch: int = 2048, object_aware: CentricObjectRule | None = None,
                           ) -> EmbeddedPhotos | ImageFiles:
    """The dataset under ``data_root``: the embedded photos when its manifest says so, else its image files.
    With ``object_aware``, a COCO layout's images with object-centric crops; without boxes, random crops (said
    once)."""
    if not data_root:  # an empty --data-root counts as not given
        raise DatasetError(f"say where the images are: --data-root DIR ({EXPECTED_LAYOUT}), or --embedded for the "
                           "photos bundled with the install (a small CPU demo)")
    if object_aware is not None:
        coco = coco_annotation_file(data_root)
        if coco is not None:
            return ObjectImages(*coco, img_size, object_aware, seed=seed)
        warnings.warn(f"{data_root}: no COCO boxes (annotations/instances_<split>.json next to <split>/), so "
                      "object-aware sources fall back to random crops", stacklevel=2)
    if is_embedded_photos(data_root):
        return EmbeddedPhotos(data_root, img_size, samples_per_epoch=samples_per_epoch, seed=seed)
    return ImageFiles(data_root, img_size, seed=seed)
