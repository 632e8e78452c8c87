"""Pretraining data: offline embedded photos, image folders, clear errors, exact-resume determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mimbench.pretrain.data import (
    DatasetError,
    EmbeddedPhotos,
    ImageFiles,
    ShardedSampler,
    build_pretrain_dataset,
)


def _write_images(folder, count, size=(80, 60)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.{'png' if i % 2 else 'jpg'}")


def test_embedded_photos_are_real_rgb_photographs():
    data = EmbeddedPhotos(32)
    assert len(data.names) == len(data.images) >= 15
    assert len(set(data.names)) == len(data.names)
    assert {"astronaut", "camera", "coffee", "motorcycle_left"} <= set(data.names)
    for image in data.images:
        assert image.mode == "RGB" and min(image.size) >= 100
        assert len(np.unique(np.asarray(image))) >= 32  # a photo, not a flat or binary picture


@pytest.mark.parametrize("size", [32, 64])
def test_embedded_items_are_normalised_square_crops(size):
    data = EmbeddedPhotos(size, samples_per_epoch=40)
    assert len(data) == 40
    batch = torch.stack([data[i] for i in range(len(data.names))])
    assert batch.shape == (len(data.names), 3, size, size) and batch.dtype == torch.float32
    assert torch.isfinite(batch).all()
    means = batch.mean(dim=(1, 2, 3))
    assert ((means > -2.5) & (means < 2.5)).all()
    assert batch.std() > 0.3  # real image content, not a constant


def test_augmentation_depends_only_on_seed_epoch_and_index():
    data = EmbeddedPhotos(32, seed=3)
    data.set_epoch(2)
    first = data[5]
    torch.rand(1000)  # consuming the global RNG must not matter...
    state = torch.get_rng_state()
    again = EmbeddedPhotos(32, seed=3)
    again.set_epoch(2)
    assert torch.equal(again[5], first)
    assert torch.equal(torch.get_rng_state(), state)  # ...and drawing a sample must not consume it

    data.set_epoch(3)
    assert not torch.equal(data[5], first)
    data.set_epoch(2)
    assert torch.equal(data[5], first)
    other_seed = EmbeddedPhotos(32, seed=4)
    other_seed.set_epoch(2)
    assert not torch.equal(other_seed[5], first)
    # the same photo at another index gets another crop
    assert not torch.equal(data[5 + len(data.names)], first)


def test_image_files_reads_an_imagefolder_tree(tmp_path):
    _write_images(tmp_path / "n01440764", 3)
    _write_images(tmp_path / "n01443537", 2)
    (tmp_path / "n01443537" / "notes.txt").write_text("not an image")
    (tmp_path / "n01443537" / "._img0.jpg").write_bytes(b"macOS resource fork")
    data = ImageFiles(tmp_path, 32)
    assert len(data) == 5
    assert data[4].shape == (3, 32, 32)
    assert [p.parent.name for p in data.paths] == ["n01440764"] * 3 + ["n01443537"] * 2
    epoch0 = data[0]
    data.set_epoch(1)
    assert not torch.equal(data[0], epoch0)


def test_image_files_reads_a_flat_folder(tmp_path):
    _write_images(tmp_path, 4)
    data = build_pretrain_dataset(str(tmp_path), embedded=False, img_size=64)
    assert isinstance(data, ImageFiles) and len(data) == 4
    assert {p.name for p in data.paths} == {"img0.jpg", "img1.png", "img2.jpg", "img3.png"}
    assert data[3].shape == (3, 64, 64)


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


def test_corrupt_image_names_its_path(tmp_path):
    _write_images(tmp_path / "cls", 1)
    broken = tmp_path / "cls" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 definitely not a jpeg")
    data = ImageFiles(tmp_path, 32)
    with pytest.raises(DatasetError, match="cannot read image") as info:
        data[data.paths.index(broken)]
    assert str(broken) in str(info.value)


@pytest.mark.parametrize("data_root, embedded, given", [(None, False, "neither"), ("/data", True, "both")])
def test_exactly_one_data_source(data_root, embedded, given):
    with pytest.raises(DatasetError) as info:
        build_pretrain_dataset(data_root, embedded, 32)
    assert "--data-root DIR" in str(info.value) and "--embedded" in str(info.value) and given in str(info.value)


def test_build_embedded():
    data = build_pretrain_dataset(None, embedded=True, img_size=32, seed=1, samples_per_epoch=16)
    assert isinstance(data, EmbeddedPhotos) and len(data) == 16 and data.seed == 1


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


def test_dataloader_batches_do_not_depend_on_workers():
    data = EmbeddedPhotos(32, samples_per_epoch=24, seed=5)
    sampler = ShardedSampler(len(data), seed=5)
    batches = {}
    for workers in (0, 2):
        torch.manual_seed(workers)  # a different global RNG state per run must not matter
        data.set_epoch(1)
        sampler.set_epoch(1, skip=4)
        loader = DataLoader(data, batch_size=5, sampler=sampler, num_workers=workers)
        batches[workers] = torch.cat(list(loader))
    assert batches[0].shape == (20, 3, 32, 32)
    assert torch.equal(batches[0], batches[2])
    sampler.set_epoch(1)
    assert torch.equal(batches[0], torch.stack([data[i] for i in list(sampler)[4:]]))


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
