"""Pretraining data for the MAE-style methods: images in, augmented (3, S, S) tensors out, labels never.

Two sources, picked by `build_pretrain_dataset`:

* `ImageFiles`: a folder on disk, ImageNet-style ``<root>/<class>/<image>.JPEG`` or any tree of images;
* `EmbeddedPhotos`: a few dozen real photographs bundled in the scikit-image wheel (``--embedded``), so a demo
  or a smoke test runs offline with no data set to download.

Exact resume: every augmentation is a pure function of (seed, epoch, index), whatever the DataLoader worker
that draws it or the global RNG state, and `ShardedSampler` can skip the samples a rank already consumed in
the current epoch. Together, a run resumed mid-epoch sees exactly the batches it would have seen.

Epochs and workers: DataLoader workers hold *copies* of the dataset, so `set_epoch` only reaches them when
they are started after it. Call ``dataset.set_epoch(e)`` and ``sampler.set_epoch(e, skip)`` and then create a
fresh iterator (``iter(loader)``, with ``persistent_workers=False``, the default) every epoch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision import transforms
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from mimbench.core.errors import DatasetError  # noqa: F401  the pretraining data's errors
from mimbench.core.photos import embedded_photos

EXPECTED_LAYOUT = "ImageNet-style <root>/<class>/<image>.JPEG or a folder of .jpg/.png images"


def pretrain_transform(img_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """MAE's augmentation: a random 20-100% area crop resized to img_size, a random flip, ImageNet normalisation."""
    return transforms.Compose([
        transforms.RandomResizedCrop(img_size, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
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

    def _augment(self, image: Image.Image, index: int) -> torch.Tensor:
        # fork_rng restores the global CPU RNG afterwards, so the caller's random stream is untouched. The v1
        # transforms draw only from torch's RNG, hence no need to seed Python's `random`.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, self.epoch, index))
            return self.transform(image)


class EmbeddedPhotos(_SeededAugmentation):
    """Random crops of the real photographs bundled with scikit-image: pretraining data that needs no download.

    An epoch has `samples_per_epoch` samples; sample i is a crop of photo ``i % len(names)``.
    """

    def __init__(self, img_size: int, samples_per_epoch: int = 2048, seed: int = 0) -> None:
        super().__init__(img_size, seed)
        self.samples_per_epoch = samples_per_epoch
        photos = embedded_photos()
        self.names = [name for name, _ in photos]
        self.images = [image for _, image in photos]

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __getitem__(self, index: int) -> torch.Tensor:
        return self._augment(self.images[index % len(self.images)], index)


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

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            # One line naming the file beats a deep PIL traceback from inside a DataLoader worker.
            raise DatasetError(f"cannot read image {path}: {err}") from None
        return self._augment(rgb, index)


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


def build_pretrain_dataset(data_root: str | None, embedded: bool, img_size: int, seed: int = 0,
                           samples_per_epoch: int = 2048) -> EmbeddedPhotos | ImageFiles:
    """The dataset named on the command line: `--data-root DIR` or `--embedded`, exactly one of them."""
    if bool(data_root) == bool(embedded):  # an empty --data-root counts as not given
        given = "both" if embedded else "neither"
        raise DatasetError(f"pass exactly one of --data-root DIR ({EXPECTED_LAYOUT}) or --embedded "
                           f"(the bundled demo photos); got {given}")
    if embedded:
        return EmbeddedPhotos(img_size, samples_per_epoch=samples_per_epoch, seed=seed)
    return ImageFiles(data_root, img_size, seed=seed)
