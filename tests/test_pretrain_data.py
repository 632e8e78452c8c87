"""Pretraining data: offline embedded photos, image folders, clear errors, exact-resume determinism."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mimbench.core.errors import DatasetError
from mimbench.core.photos import embedded_photos
from mimbench.pretrain.data import (
    MANIFEST,
    EmbeddedPhotos,
    ImageFiles,
    ShardedSampler,
    build_pretrain_dataset,
    pretrain_transform,
    sample_seed,
    write_embedded_photos,
)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """The embedded photo set as --embedded writes it."""
    return write_embedded_photos(tmp_path_factory.mktemp("datasets") / "photos-embedded")


def _write_images(folder, count, size=(80, 60)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.{'png' if i % 2 else 'jpg'}")


def test_embedded_photos_are_real_rgb_photographs(photos):
    data = EmbeddedPhotos(photos, 32)
    assert len(data.names) == len(data.images) >= 15
    assert len(set(data.names)) == len(data.names)
    assert {"astronaut", "camera", "coffee", "motorcycle_left"} <= set(data.names)
    for image in data.images:
        assert image.mode == "RGB" and min(image.size) >= 100
        assert len(np.unique(np.asarray(image))) >= 32  # a photo, not a flat or binary picture


@pytest.mark.parametrize("size", [32, 64])
def test_embedded_items_are_normalised_square_crops(photos, size):
    data = EmbeddedPhotos(photos, size, samples_per_epoch=40)
    assert len(data) == 40
    assert all(data[i][1] == -1 for i in range(3))  # nothing unreadable
    batch = torch.stack([data[i][0] for i in range(len(data.names))])
    assert batch.shape == (len(data.names), 3, size, size) and batch.dtype == torch.float32
    assert torch.isfinite(batch).all()
    means = batch.mean(dim=(1, 2, 3))
    assert ((means > -2.5) & (means < 2.5)).all()
    assert batch.std() > 0.3  # real image content, not a constant


def test_augmentation_depends_only_on_seed_epoch_and_index(photos):
    data = EmbeddedPhotos(photos, 32, seed=3)
    data.set_epoch(2)
    first = data[5][0]
    torch.rand(1000)  # consuming the global RNG must not matter...
    state = torch.get_rng_state()
    again = EmbeddedPhotos(photos, 32, seed=3)
    again.set_epoch(2)
    assert torch.equal(again[5][0], first)
    assert torch.equal(torch.get_rng_state(), state)  # ...and drawing a sample must not consume it

    data.set_epoch(3)
    assert not torch.equal(data[5][0], first)
    data.set_epoch(2)
    assert torch.equal(data[5][0], first)
    other_seed = EmbeddedPhotos(photos, 32, seed=4)
    other_seed.set_epoch(2)
    assert not torch.equal(other_seed[5][0], first)
    # the same photo at another index gets another crop
    assert not torch.equal(data[5 + len(data.names)][0], first)


def test_the_written_photos_give_the_in_memory_photos_samples_bit_for_bit(photos):
    """The PNG files hold the bundled photos' exact pixels, and sample i is the seeded crop of photo i % N that
    the in-memory photos gave before the set was written to disk."""
    bundled = embedded_photos()
    data = EmbeddedPhotos(photos, 32, samples_per_epoch=2 * len(bundled) + 3, seed=7)
    assert data.names == [name for name, _ in bundled]
    for image, (_, photo) in zip(data.images, bundled):
        assert image.mode == photo.mode == "RGB" and np.array_equal(np.asarray(image), np.asarray(photo))
    transform = pretrain_transform(32)
    data.set_epoch(1)
    for index in range(len(data)):
        torch.manual_seed(sample_seed(7, 1, index))
        expected = transform(bundled[index % len(bundled)][1])
        assert torch.equal(data[index][0], expected), index


def test_the_photo_set_is_written_once_and_marked_by_its_manifest(photos, tmp_path):
    manifest = json.loads((photos / MANIFEST).read_text())
    assert [photo["name"] for photo in manifest["photos"]] == [name for name, _ in embedded_photos()]
    assert sorted(p.name for p in photos.glob("*.png")) == sorted(photo["file"] for photo in manifest["photos"])
    written = {p.name: p.stat().st_mtime_ns for p in photos.iterdir()}
    assert write_embedded_photos(photos) == photos  # reused, not rewritten
    assert {p.name: p.stat().st_mtime_ns for p in photos.iterdir()} == written
    assert not list(photos.parent.glob(".*tmp*"))  # no staging folder left behind

    foreign = tmp_path / "holiday"
    _write_images(foreign, 2)
    with pytest.raises(DatasetError, match="not the embedded photo set") as info:
        write_embedded_photos(foreign)
    assert str(foreign) in str(info.value) and "\n" not in str(info.value)
    assert isinstance(build_pretrain_dataset(str(foreign), img_size=32), ImageFiles)  # no manifest: image files


def test_image_files_reads_an_imagefolder_tree(tmp_path):
    _write_images(tmp_path / "n01440764", 3)
    _write_images(tmp_path / "n01443537", 2)
    (tmp_path / "n01443537" / "notes.txt").write_text("not an image")
    (tmp_path / "n01443537" / "._img0.jpg").write_bytes(b"macOS resource fork")
    data = ImageFiles(tmp_path, 32)
    assert len(data) == 5
    assert data[4][0].shape == (3, 32, 32) and data[4][1] == -1
    assert [p.parent.name for p in data.paths] == ["n01440764"] * 3 + ["n01443537"] * 2
    epoch0 = data[0][0]
    data.set_epoch(1)
    assert not torch.equal(data[0][0], epoch0)


def test_image_files_reads_a_flat_folder(tmp_path):
    _write_images(tmp_path, 4)
    data = build_pretrain_dataset(str(tmp_path), img_size=64)
    assert isinstance(data, ImageFiles) and len(data) == 4
    assert {p.name for p in data.paths} == {"img0.jpg", "img1.png", "img2.jpg", "img3.png"}
    assert data[3][0].shape == (3, 64, 64)


@pytest.mark.parametrize("make_root", ["missing", "file", "empty"])
def test_unusable_root_names_the_path_and_the_layout(tmp_path, make_root):
    root = tmp_path / "data"
    if make_root == "file":
        root.write_text("x")
    elif make_root == "empty":
        (root / "some_class").mkdir(parents=True)
    with pytest.raises(DatasetError) as info:
        ImageFiles(root, 32)
    message = str(info.value)
    assert "\n" not in message
    assert str(root) in message and "<root>/<class>/<image>.JPEG" in message and "--embedded" in message


def test_corrupt_image_is_skipped_with_a_warning_naming_its_path(tmp_path):
    """The next readable file (in path order, wrapping around) stands in, with the sample's own seeded crop."""
    _write_images(tmp_path / "cls", 3)
    broken = tmp_path / "cls" / "broken.jpg"  # sorts first: broken.jpg, img0.jpg, img1.png, img2.jpg
    broken.write_bytes(b"\xff\xd8 definitely not a jpeg")
    with pytest.warns(UserWarning, match="broken.jpg"):  # the constructor reads sample 0
        data = ImageFiles(tmp_path, 32)
    index = data.paths.index(broken)
    with pytest.warns(UserWarning, match="cannot read image") as caught:
        image, unreadable = data[index]
    assert any(str(broken) in str(warning.message) for warning in caught)
    assert unreadable == index and image.shape == (3, 32, 32)
    torch.manual_seed(sample_seed(0, 0, index))
    with Image.open(data.paths[index + 1]) as stand_in:
        assert torch.equal(image, pretrain_transform(32)(stand_in.convert("RGB")))
    assert data[index + 1][1] == -1

    (tmp_path / "cls" / "img2.jpg").write_bytes(b"GIF89a")  # the last file: its stand-in wraps to the first
    with pytest.warns(UserWarning):
        assert data[len(data) - 1][1] == len(data) - 1


def test_a_folder_with_no_readable_image_is_one_line(tmp_path):
    for name in ("a.jpg", "b.png"):
        (tmp_path / name).write_bytes(b"garbage")
    with pytest.warns(UserWarning), pytest.raises(DatasetError, match="none of the 2 images") as info:
        ImageFiles(tmp_path, 32)
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("data_root", [None, ""])
def test_no_data_source_names_both(data_root):
    with pytest.raises(DatasetError) as info:
        build_pretrain_dataset(data_root, 32)
    assert "--data-root DIR" in str(info.value) and "--embedded" in str(info.value)


def test_build_embedded(photos):
    data = build_pretrain_dataset(str(photos), img_size=32, seed=1, samples_per_epoch=16)
    assert isinstance(data, EmbeddedPhotos) and len(data) == 16 and data.seed == 1
    assert data.description == "embedded:scikit-image photos (16 crops/epoch)"


def test_sharded_sampler_partitions_each_epoch():
    ranks = [ShardedSampler(101, num_replicas=2, rank=r, seed=7) for r in range(2)]
    for sampler in ranks:
        sampler.set_epoch(4)
    orders = [list(sampler) for sampler in ranks]
    assert [len(order) for order in orders] == [50, 50] == [len(s) for s in ranks]
    union = orders[0] + orders[1]
    assert len(set(union)) == 100 and set(union) <= set(range(101))

    same = ShardedSampler(101, num_replicas=2, rank=0, seed=7)
    same.set_epoch(4)
    assert list(same) == orders[0]
    same.set_epoch(5)
    assert list(same) != orders[0]


def test_sharded_sampler_skip_resumes_mid_epoch():
    sampler = ShardedSampler(64, num_replicas=2, rank=1, seed=0)
    sampler.set_epoch(3)
    full = list(sampler)
    sampler.set_epoch(3, skip=10)
    assert len(sampler) == 22 and list(sampler) == full[10:]
    sampler.set_epoch(3)
    assert list(sampler) == full  # skip applies to one epoch only
    with pytest.raises(ValueError):
        sampler.set_epoch(3, skip=33)


def test_dataloader_batches_do_not_depend_on_workers(photos):
    data = EmbeddedPhotos(photos, 32, samples_per_epoch=24, seed=5)
    sampler = ShardedSampler(len(data), seed=5)
    batches = {}
    for workers in (0, 2):
        torch.manual_seed(workers)  # a different global RNG state per run must not matter
        data.set_epoch(1)
        sampler.set_epoch(1, skip=4)
        loader = DataLoader(data, batch_size=5, sampler=sampler, num_workers=workers)
        batches[workers] = torch.cat([images for images, _ in loader])
    assert batches[0].shape == (20, 3, 32, 32)
    assert torch.equal(batches[0], batches[2])
    sampler.set_epoch(1)
    assert torch.equal(batches[0], torch.stack([data[i][0] for i in list(sampler)[4:]]))


def test_sharding_by_batches_matches_one_process_with_accumulation():
    """Rank r's k-th batch is the (k * ranks + r)-th batch of a single process with the same seed."""
    single = ShardedSampler(40, num_replicas=1, rank=0, seed=3, batch_size=4)
    single.set_epoch(2)
    batches = [list(single)[i:i + 4] for i in range(0, 40, 4)]
    for rank in range(2):
        sampler = ShardedSampler(40, num_replicas=2, rank=rank, seed=3, batch_size=4)
        sampler.set_epoch(2)
        mine = list(sampler)
        assert len(mine) == len(sampler) == 20
        assert [mine[i:i + 4] for i in range(0, 20, 4)] == batches[rank::2]
