"""Object-aware source crops: the single-centric-object rule on hand-made boxes, the COCO reader, the fallback."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from mimbench.core.errors import ConfigError, DatasetError
from mimbench.pretrain.data import ImageFiles, ObjectImages, build_pretrain_dataset, sample_seed
from mimbench.pretrain.objects import (
    CentricObjectRule,
    centric_object,
    coco_annotation_file,
    object_centric_crop,
    read_coco_boxes,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

CROP = (0, 0, 100, 100)  # top, left, height, width: central region [25, 75]² at center_region 0.5
RULE = CentricObjectRule(center_region=0.5, min_cover=0.1)


def test_one_centred_box_that_covers_enough_is_accepted():
    assert centric_object(CROP, [(30, 30, 40, 40)], RULE) == 0  # centre (50, 50), covers 16%
    # A second box centred outside the central region does not count.
    assert centric_object(CROP, [(0, 0, 10, 10), (30, 30, 40, 40)], RULE) == 1
    # Only the part inside the crop counts towards the cover: centre (74, 74), 68² = 46% of the crop's area but
    # 60² = 36% inside it.
    assert centric_object(CROP, [(40, 40, 68, 68)], CentricObjectRule(0.5, 0.4)) is None
    assert centric_object(CROP, [(40, 40, 68, 68)], CentricObjectRule(0.5, 0.35)) == 0


def test_several_centred_boxes_no_box_or_too_small_a_box_are_rejected():
    assert centric_object(CROP, [(30, 30, 40, 40), (40, 40, 20, 20)], RULE) is None  # two centred objects
    assert centric_object(CROP, [], RULE) is None
    assert centric_object(CROP, [(45, 45, 10, 10)], RULE) is None  # 1% of the crop
    assert centric_object(CROP, [(0, 0, 20, 20)], RULE) is None  # centre (10, 10) outside [25, 75]
    assert centric_object(CROP, [(0, 0, 20, 20)], CentricObjectRule(1.0, 0.01)) == 0  # the whole crop is central
    # The crop's offset counts: the same box seen from a crop whose centre is elsewhere.
    assert centric_object((100, 100, 100, 100), [(30, 30, 40, 40)], RULE) is None


def test_object_centric_crop_draws_until_the_rule_holds_else_keeps_the_random_crop():
    image = Image.new("RGB", (200, 200))
    boxes = [(60.0, 60.0, 80.0, 80.0)]
    torch.manual_seed(0)
    crop, found = object_centric_crop(image, boxes, CentricObjectRule(0.5, 0.2, attempts=50))
    assert found and centric_object(crop, boxes, CentricObjectRule(0.5, 0.2)) == 0
    # No boxes: one draw, exactly MAE's RandomResizedCrop draw.
    torch.manual_seed(1)
    crop, found = object_centric_crop(image, [], RULE)
    torch.manual_seed(1)
    expected = transforms.RandomResizedCrop.get_params(image, scale=[0.2, 1.0], ratio=[3 / 4, 4 / 3])
    assert not found and crop == expected
    # A rule no crop can meet: the last of its attempts.
    torch.manual_seed(2)
    crop, found = object_centric_crop(image, boxes, CentricObjectRule(0.5, 1.0, attempts=3))
    torch.manual_seed(2)
    draws = [transforms.RandomResizedCrop.get_params(image, scale=[0.2, 1.0], ratio=[3 / 4, 4 / 3]) for _ in range(3)]
    assert not found and crop == draws[-1]


def test_rule_values_are_checked():
    for bad in (dict(center_region=0), dict(min_cover=1.5), dict(attempts=0)):
        with pytest.raises(ConfigError, match="object-aware crops need"):
            CentricObjectRule(**bad)


def write_coco(root, boxes_per_image):
    (root / "train2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, annotations = [], []
    rng = np.random.default_rng(0)
    for index, (name, boxes) in enumerate(boxes_per_image.items()):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "train2017" / name)
        images.append({"id": index + 1, "file_name": name, "width": 64, "height": 64})
        annotations += [{"id": len(annotations) + 1, "image_id": index + 1, "bbox": list(box), "iscrowd": crowd}
                        for box, crowd in boxes]
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}))
    return root


def test_coco_reader_gives_boxes_per_file_and_skips_crowds(tmp_path):
    root = write_coco(tmp_path / "coco", {"a.png": [((8, 8, 40, 40), 0), ((0, 0, 64, 64), 1)], "b.png": []})
    images, annotations = coco_annotation_file(root)
    assert images == root / "train2017" and annotations.name == "instances_train2017.json"
    assert read_coco_boxes(annotations) == {"a.png": [(8.0, 8.0, 40.0, 40.0)], "b.png": []}
    (tmp_path / "bad.json").write_text('{"images": []')
    with pytest.raises(DatasetError, match="not a readable COCO annotation file"):
        read_coco_boxes(tmp_path / "bad.json")
    assert coco_annotation_file(tmp_path) is None


def test_object_aware_dataset_crops_around_the_one_object_deterministically(tmp_path):
    root = write_coco(tmp_path / "coco", {"a.png": [((16, 16, 32, 32), 0)], "b.png": []})
    rule = CentricObjectRule(0.5, 0.2, attempts=50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # boxes found: nothing to say
        dataset = build_pretrain_dataset(root, 32, seed=3, object_aware=rule)
    assert isinstance(dataset, ObjectImages) and len(dataset) == 2
    assert "object-aware" in dataset.description
    image, unreadable = dataset.image(0)
    assert unreadable == -1 and image.info["boxes"] == [(16.0, 16.0, 32.0, 32.0)]
    assert dataset.image(1)[0].info["boxes"] == []
    first, again = dataset[0][0], dataset[0][0]
    assert first.shape == (3, 32, 32) and torch.equal(first, again)  # a pure function of (seed, epoch, index)
    torch.manual_seed(sample_seed(3, 0, 0))  # the crop the transform drew satisfies the rule
    crop, found = object_centric_crop(image, image.info["boxes"], rule)
    assert found and centric_object(crop, image.info["boxes"], rule) == 0


def test_without_boxes_object_aware_falls_back_to_random_crops_and_says_so_once(tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    Image.new("RGB", (40, 40), "red").save(folder / "x.png")
    with pytest.warns(UserWarning, match="no COCO boxes .* fall back to random crops") as record:
        dataset = build_pretrain_dataset(folder, 32, object_aware=CentricObjectRule())
    assert len([w for w in record if "no COCO boxes" in str(w.message)]) == 1
    assert type(dataset) is ImageFiles
    plain = build_pretrain_dataset(folder, 32)
    assert torch.equal(dataset[0][0], plain[0][0])  # MixedAE's own crops


@pytest.mark.slow  # writes the embedded COCO scenes (~15 s)
def test_embedded_coco_scenes_give_object_centric_sources(tmp_path):
    from mimbench.transfer.coco_data import write_embedded_coco  # the test may use transfer; pretrain does not

    dataset = build_pretrain_dataset(write_embedded_coco(tmp_path / "coco"), 32, object_aware=CentricObjectRule())
    assert isinstance(dataset, ObjectImages) and dataset.root.name == "train2017"
    found = 0
    for index in range(len(dataset)):
        image = dataset.image(index)[0]
        torch.manual_seed(index)
        found += object_centric_crop(image, image.info["boxes"], CentricObjectRule())[1]
    assert found >= 0.8 * len(dataset)  # the scenes' pasted objects are exact boxes; most crops find one
    assert dataset[0][0].shape == (3, 32, 32)
