"""Transfer dataset readers: each on a tiny fake copy of its official on-disk layout, plus splits and errors."""

from __future__ import annotations

import json
import pickle
import warnings

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torchvision import transforms

from mimbench.transfer.datasets import (
    DATASETS,
    DatasetError,
    LabelledImages,
    build_dataset,
    collate_readable,
    first_per_class,
    holdout,
)


def _image(path, shade=0):
    """A tiny 8x8 image file; `shade` makes its pixels recognisable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), shade, dtype=np.uint8)).save(path)


def _splits(name, root, seed=0):
    return {split: build_dataset(name, root, split, seed=seed) for split in ("train", "val", "trainval", "test")}


def _sample_ids(dataset):
    """One hashable id per sample: its file, or its pixels for array-backed sets."""
    if isinstance(dataset.images, np.ndarray):
        return [image.tobytes() for image in dataset.images]
    return [str(path) for path in dataset.images]


def _assert_partition(parts, sizes):
    """Split sizes as given; train and val partition trainval; test shares nothing with trainval."""
    assert {split: len(data) for split, data in parts.items()} == sizes
    ids = {split: _sample_ids(data) for split, data in parts.items()}
    assert all(len(set(found)) == len(found) for found in ids.values())
    assert set(ids["train"]) | set(ids["val"]) == set(ids["trainval"])
    assert not set(ids["train"]) & set(ids["val"])
    assert not set(ids["trainval"]) & set(ids["test"])
    for data in parts.values():
        assert len(data.targets) == len(data)
        assert data.classes == parts["train"].classes


def _label_of(dataset, filename):
    names = [str(path) for path in dataset.images]
    [index] = [i for i, name in enumerate(names) if name.endswith(filename)]
    return dataset.targets[index]


# ---- registry --------------------------------------------------------------------------------------------------------


def test_registry_follows_the_protocol():
    assert list(DATASETS) == ["aircraft", "caltech101", "cars", "cifar10", "cifar100", "dtd", "flowers", "food", "pets",
                              "sun397", "voc2007", "imagenet", "digits"]
    assert {name: spec.num_classes for name, spec in DATASETS.items()} == {
        "aircraft": 100, "caltech101": 101, "cars": 196, "cifar10": 10, "cifar100": 100, "dtd": 47, "flowers": 102,
        "food": 101, "pets": 37, "sun397": 397, "voc2007": 20, "imagenet": 1000, "digits": 10}
    assert {name for name, spec in DATASETS.items() if spec.metric == "mean_per_class_accuracy"} == {
        "aircraft", "caltech101", "flowers", "pets"}
    assert {name for name, spec in DATASETS.items() if spec.metric == "map11"} == {"voc2007"}
    assert [name for name, spec in DATASETS.items() if spec.multilabel] == ["voc2007"]
    assert all(spec.name == name and spec.layout and spec.source for name, spec in DATASETS.items())


def test_holdout_is_seeded_and_partitions():
    kept, held = holdout(50, 10, seed=3)
    assert len(held) == 10 and sorted(kept + held) == list(range(50)) and kept == sorted(kept)
    torch.manual_seed(123)
    np.random.seed(123)  # global RNG state must not matter
    assert holdout(50, 10, seed=3) == (kept, held)
    assert holdout(50, 10, seed=4)[1] != held


# ---- CIFAR -----------------------------------------------------------------------------------------------------------


def _write_cifar(root, hundred):
    """CIFAR pickles whose image k (in file order, train then test) is filled with the value k."""
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    label_key, names_key = ("fine_labels", "fine_label_names") if hundred else ("labels", "label_names")
    files = [("train", 20), ("test", 5)] if hundred else [(f"data_batch_{i}", 4) for i in range(1, 6)] + [
        ("test_batch", 5)]
    shade = 0
    for filename, count in files:
        data = np.repeat(np.arange(shade, shade + count, dtype=np.uint8)[:, None], 3072, axis=1)
        labels = [(shade + i) % 3 for i in range(count)]
        with open(folder / filename, "wb") as f:
            pickle.dump({"data": data, label_key: labels}, f)
        shade += count
    with open(folder / ("meta" if hundred else "batches.meta"), "wb") as f:
        pickle.dump({names_key: ["apple", "bear", "cloud"]}, f)


@pytest.mark.parametrize("name, hundred", [("cifar10", False), ("cifar100", True)])
def test_cifar(tmp_path, name, hundred):
    _write_cifar(tmp_path, hundred)
    parts = _splits(name, tmp_path)
    _assert_partition(parts, {"train": 16, "val": 4, "trainval": 20, "test": 5})
    assert parts["train"].classes == ["apple", "bear", "cloud"]
    image, label = parts["trainval"][7]  # the 8th training image: every pixel 7, label 7 % 3
    assert image.mode == "RGB" and image.size == (32, 32) and np.asarray(image).max() == 7 and label == 1
    image, label = parts["test"][2]  # test images follow the 20 training ones
    assert np.asarray(image).min() == 22 and label == 22 % 3
    for data in parts.values():  # targets stay attached to their pixels through the split
        assert all(data.targets[i] == int(data.images[i][0, 0, 0]) % 3 for i in range(len(data)))


def test_seeded_val_is_deterministic_and_depends_on_seed(tmp_path):
    _write_cifar(tmp_path, hundred=False)
    first = _sample_ids(build_dataset("cifar10", tmp_path, "val", seed=0))
    assert _sample_ids(build_dataset("cifar10", tmp_path, "val", seed=0)) == first
    assert _sample_ids(build_dataset("cifar10", tmp_path, "val", seed=1)) != first


# ---- file-based datasets ---------------------------------------------------------------------------------------------


def test_aircraft(tmp_path):
    data = tmp_path / "fgvc-aircraft-2013b" / "data"
    data.mkdir(parents=True)
    (data / "variants.txt").write_text("707-320\nCessna 172\nA380\n")
    lists = {"train": ["1000 707-320", "1001 Cessna 172", "1002 A380"], "val": ["1003 A380", "1004 Cessna 172"],
             "test": ["1005 707-320", "1006 Cessna 172"]}
    lists["trainval"] = lists["train"] + lists["val"]
    for split, lines in lists.items():
        (data / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
        for line in lines:
            _image(data / "images" / f"{line.split()[0]}.jpg")
    parts = _splits("aircraft", tmp_path)
    _assert_partition(parts, {"train": 3, "val": 2, "trainval": 5, "test": 2})
    assert parts["test"].classes == ["707-320", "Cessna 172", "A380"]
    assert _label_of(parts["train"], "1001.jpg") == 1 and _label_of(parts["val"], "1003.jpg") == 2
    assert _label_of(parts["test"], "1005.jpg") == 0


def test_caltech101_draws_30_per_class_for_trainval(tmp_path):
    categories = tmp_path / "caltech101" / "101_ObjectCategories"
    for category, count in [("BACKGROUND_Google", 2), ("airplanes", 35), ("ant", 3)]:
        for number in range(1, count + 1):
            _image(categories / category / f"image_{number:04d}.jpg")
    parts = _splits("caltech101", tmp_path)
    # airplanes: 30 trainval (6 val) + 5 test; ant (3 images): all but one for trainval, too few for a val image.
    _assert_partition(parts, {"train": 24 + 2, "val": 6, "trainval": 32, "test": 5 + 1})
    assert parts["trainval"].classes == ["airplanes", "ant"]  # BACKGROUND_Google is not a class
    assert np.bincount(parts["trainval"].targets).tolist() == [30, 2]
    assert np.bincount(parts["val"].targets).tolist() == [6]
    assert np.bincount(parts["test"].targets).tolist() == [5, 1]
    for data in parts.values():
        assert all(path.parent.name == data.classes[label] for path, label in zip(data.images, data.targets))
    other = build_dataset("caltech101", tmp_path, "test", seed=1)
    assert _sample_ids(other) != _sample_ids(parts["test"]) and len(other) == 6


def test_cars(tmp_path):
    base = tmp_path / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    names = np.array(["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi R8 Coupe 2012"], dtype=object)
    scipy.io.savemat(base / "devkit" / "cars_meta.mat", {"class_names": names})
    record = [("fname", "O"), ("class", "O")]
    train = np.array([(f"{i:05d}.jpg", i % 3 + 1) for i in range(1, 11)], dtype=record)  # classes are 1-based
    test = np.array([(f"{i:05d}.jpg", 3) for i in range(1, 4)], dtype=record)
    scipy.io.savemat(base / "devkit" / "cars_train_annos.mat", {"annotations": train})
    scipy.io.savemat(base / "cars_test_annos_withlabels.mat", {"annotations": test})
    for i in range(1, 11):
        _image(base / "cars_train" / f"{i:05d}.jpg")
    for i in range(1, 4):
        _image(base / "cars_test" / f"{i:05d}.jpg")
    parts = _splits("cars", tmp_path)
    _assert_partition(parts, {"train": 8, "val": 2, "trainval": 10, "test": 3})
    assert parts["train"].classes == names.tolist()
    assert _label_of(parts["trainval"], "cars_train/00004.jpg") == 1 and parts["test"].targets == [2, 2, 2]


def test_dtd(tmp_path):
    data = tmp_path / "dtd" / "dtd"
    lists = {"train": ["banded/banded_0001.jpg", "dotted/dotted_0001.jpg", "banded/banded_0002.jpg"],
             "val": ["dotted/dotted_0002.jpg", "banded/banded_0003.jpg"],
             "test": ["banded/banded_0004.jpg", "dotted/dotted_0003.jpg"]}
    for split, lines in lists.items():
        for line in lines:
            _image(data / "images" / line)
        (data / "labels").mkdir(parents=True, exist_ok=True)
        (data / "labels" / f"{split}1.txt").write_text("\n".join(lines) + "\n")
        (data / "labels" / f"{split}2.txt").write_text(lines[0] + "\n")  # another partition, not ours
    parts = _splits("dtd", tmp_path)
    _assert_partition(parts, {"train": 3, "val": 2, "trainval": 5, "test": 2})
    assert parts["trainval"].classes == ["banded", "dotted"]
    assert parts["trainval"].targets == [0, 1, 0, 1, 0]  # train then val, in list order
    assert _label_of(parts["test"], "dotted_0003.jpg") == 1


def test_flowers(tmp_path):
    base = tmp_path / "flowers-102"
    labels = np.array([1, 1, 2, 3, 2, 3, 1, 102])  # 1-based, image_00001 .. image_00008
    base.mkdir()
    scipy.io.savemat(base / "imagelabels.mat", {"labels": labels})
    scipy.io.savemat(base / "setid.mat", {"trnid": np.array([1, 3, 4]), "valid": np.array([2, 5]),
                                          "tstid": np.array([6, 7, 8])})
    for i in range(1, 9):
        _image(base / "jpg" / f"image_{i:05d}.jpg")
    parts = _splits("flowers", tmp_path)
    _assert_partition(parts, {"train": 3, "val": 2, "trainval": 5, "test": 3})
    assert len(parts["train"].classes) == 102 and parts["train"].classes[0] == "pink primrose"
    assert parts["trainval"].targets == [0, 1, 2, 0, 1] and parts["test"].targets == [2, 0, 101]
    assert _label_of(parts["test"], "image_00008.jpg") == 101


def test_food(tmp_path):
    base = tmp_path / "food-101"
    train = {"apple_pie": [f"apple_pie/{i}" for i in range(6)], "waffles": [f"waffles/{i}" for i in range(4)]}
    test = {"apple_pie": ["apple_pie/100"], "waffles": ["waffles/100", "waffles/101"]}
    (base / "meta").mkdir(parents=True)
    for split, listing in [("train", train), ("test", test)]:
        (base / "meta" / f"{split}.json").write_text(json.dumps(listing))
        for names in listing.values():
            for name in names:
                _image(base / "images" / f"{name}.jpg")
    parts = _splits("food", tmp_path)
    _assert_partition(parts, {"train": 8, "val": 2, "trainval": 10, "test": 3})
    assert parts["train"].classes == ["apple_pie", "waffles"]
    assert _label_of(parts["trainval"], "waffles/3.jpg") == 1 and parts["test"].targets == [0, 1, 1]


def test_pets(tmp_path):
    base = tmp_path / "oxford-iiit-pet"
    trainval = [f"Abyssinian_{i} 1 1 1" for i in range(1, 6)] + [f"american_bulldog_{i} 2 2 1" for i in range(1, 6)]
    test = ["Abyssinian_100 1 1 1", "american_bulldog_100 2 2 1"]
    (base / "annotations").mkdir(parents=True)
    (base / "annotations" / "trainval.txt").write_text("\n".join(trainval) + "\n")
    (base / "annotations" / "test.txt").write_text("\n".join(test) + "\n")
    for line in trainval + test:
        _image(base / "images" / f"{line.split()[0]}.jpg")
    parts = _splits("pets", tmp_path)
    _assert_partition(parts, {"train": 8, "val": 2, "trainval": 10, "test": 2})
    assert parts["train"].classes == ["Abyssinian", "American Bulldog"]
    assert _label_of(parts["trainval"], "american_bulldog_3.jpg") == 1 and parts["test"].targets == [0, 1]


def test_sun397_reads_partition_1_only(tmp_path):
    data = tmp_path / "SUN397"
    data.mkdir()
    (data / "ClassName.txt").write_text("/a/abbey\n/b/bedroom\n/o/office/outdoor\n")
    training = [f"/a/abbey/sun_a{i}.jpg" for i in range(4)] + [f"/o/office/outdoor/sun_o{i}.jpg" for i in range(6)]
    testing = ["/b/bedroom/sun_b0.jpg", "/a/abbey/sun_a9.jpg"]
    unused = ["/b/bedroom/sun_b5.jpg"]  # on disk, in neither list: another partition's image
    for name in training + testing + unused:
        _image(data / name.lstrip("/"))
    (data / "Partitions").mkdir()
    (data / "Partitions" / "Training_01.txt").write_text("\n".join(training) + "\n")
    (data / "Partitions" / "Testing_01.txt").write_text("\n".join(testing) + "\n")
    parts = _splits("sun397", tmp_path)
    _assert_partition(parts, {"train": 8, "val": 2, "trainval": 10, "test": 2})
    assert parts["test"].classes == ["abbey", "bedroom", "office/outdoor"]
    assert parts["trainval"].targets == [0] * 4 + [2] * 6 and parts["test"].targets == [1, 0]
    assert not any(path.name == "sun_b5.jpg" for data_ in parts.values() for path in data_.images)


def _voc_annotation(objects):
    body = "".join(f"<object><name>{name}</name><pose>Left</pose><difficult>{int(difficult)}</difficult>"
                   f"<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object>"
                   for name, difficult in objects)
    return f"<annotation><folder>VOC2007</folder><filename>x.jpg</filename>{body}</annotation>"


def test_voc2007_multi_hot_with_difficult(tmp_path):
    voc = tmp_path / "VOCdevkit" / "VOC2007"
    annotations = {
        "000001": [("dog", False), ("person", True)],  # person only difficult -> -1
        "000002": [("car", True), ("car", False), ("tvmonitor", False)],  # one car not difficult -> 1
        "000003": [("aeroplane", False)],
        "000004": [("bird", True), ("bird", True)],
        "000005": [("person", False)],
    }
    for image_id, objects in annotations.items():
        _image(voc / "JPEGImages" / f"{image_id}.jpg")
        (voc / "Annotations").mkdir(parents=True, exist_ok=True)
        (voc / "Annotations" / f"{image_id}.xml").write_text(_voc_annotation(objects))
    lists = {"train": ["000001", "000002"], "val": ["000003"], "test": ["000004", "000005"]}
    lists["trainval"] = lists["train"] + lists["val"]
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    for split, ids in lists.items():
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    parts = _splits("voc2007", tmp_path)
    _assert_partition(parts, {"train": 2, "val": 1, "trainval": 3, "test": 2})
    classes = parts["train"].classes
    assert len(classes) == 20 and classes[:3] == ["aeroplane", "bicycle", "bird"] and classes[-1] == "tvmonitor"

    def expected(present, difficult_only=()):
        target = torch.zeros(20)
        target[[classes.index(c) for c in present]] = 1
        target[[classes.index(c) for c in difficult_only]] = -1
        return target

    first, second = parts["train"].targets
    assert torch.equal(first, expected(["dog"], ["person"]))
    assert torch.equal(second, expected(["car", "tvmonitor"]))
    assert torch.equal(parts["test"].targets[0], expected([], ["bird"]))
    image, target = parts["trainval"][2]
    assert image.mode == "RGB" and target.dtype == torch.float32 and torch.equal(target, expected(["aeroplane"]))


def _write_imagenet(root, train_per_class=10):
    for wnid in ("n01440764", "n01443537"):
        for i in range(train_per_class):
            _image(root / "train" / wnid / f"{wnid}_{i}.JPEG")
        for i in range(2):
            _image(root / "val" / wnid / f"ILSVRC2012_val_{wnid}_{i}.JPEG")


def test_imagenet(tmp_path):
    _write_imagenet(tmp_path)
    parts = _splits("imagenet", tmp_path)
    # trainval is the official train; val is held out of it (20% of a copy this small, 10,000 of the real one).
    _assert_partition(parts, {"train": 16, "val": 4, "trainval": 20, "test": 4})
    assert parts["test"].classes == ["n01440764", "n01443537"]
    assert _label_of(parts["trainval"], "n01443537_3.JPEG") == 1
    assert parts["test"].targets == [0, 0, 1, 1]


def test_imagenet_val_must_use_the_train_class_folders(tmp_path):
    _write_imagenet(tmp_path)
    _image(tmp_path / "val" / "n99999999" / "stray.JPEG")
    with pytest.raises(DatasetError, match="class folders") as info:
        build_dataset("imagenet", tmp_path, "test")
    assert "ImageNet" in str(info.value)


# ---- embedded digits -------------------------------------------------------------------------------------------------


def test_digits_splits_and_labels():
    parts = _splits("digits", None)
    _assert_partition(parts, {"train": 1150, "val": 288, "trainval": 1438, "test": 359})
    assert len(parts["trainval"]) + len(parts["test"]) == 1797
    digits = load_digits()
    label_of_pixels = {np.round(img * (255 / 16)).astype(np.uint8).tobytes(): int(label)
                       for img, label in zip(digits.images, digits.target)}
    test = parts["test"]
    assert test.classes == [str(d) for d in range(10)]
    for i in range(0, len(test), 7):
        image, label = test[i]
        pixels = np.asarray(image)
        assert image.mode == "RGB" and image.size == (8, 8) and (pixels[..., 0] == pixels[..., 2]).all()
        assert label_of_pixels[pixels[..., 0].tobytes()] == label
    assert sorted(parts["trainval"].targets + test.targets) == sorted(digits.target.tolist())
    assert _sample_ids(build_dataset("digits", None, "val", seed=0)) == _sample_ids(parts["val"])
    assert _sample_ids(build_dataset("digits", None, "val", seed=1)) != _sample_ids(parts["val"])


# ---- per-class slices (--per-class) ----------------------------------------------------------------------------------


def _first_n_by_hand(targets, n):
    """Indices of the first n of each label, counted one by one."""
    kept, counts = [], {}
    for index, label in enumerate(targets):
        if counts.get(label, 0) < n:
            counts[label] = counts.get(label, 0) + 1
            kept.append(index)
    return kept


@pytest.mark.parametrize("n", [1, 3, 100])
def test_first_per_class_on_cifar_keeps_the_first_n_of_each_class_in_order(tmp_path, n):
    _write_cifar(tmp_path, False)  # train labels in file order: 0 1 2 0 1 2 ..., test 20 % 3, 21 % 3, ...
    for split in ("train", "val", "test"):
        full = build_dataset("cifar10", tmp_path, split)
        part = first_per_class(full, n)
        kept = _first_n_by_hand(full.targets, n)
        assert part.targets == [full.targets[i] for i in kept]
        assert _sample_ids(part) == [_sample_ids(full)[i] for i in kept]  # pixels follow, order kept
        assert part.classes == full.classes == ["apple", "bear", "cloud"]
        for label in range(3):
            assert part.targets.count(label) == min(n, full.targets.count(label))
        assert all(part.targets[i] == int(part.images[i][0, 0, 0]) % 3 for i in range(len(part)))
        part.transform = transforms.ToTensor()  # the rest of the code sets the transform on a split
        assert part[0][0].shape == (3, 32, 32)
    assert len(first_per_class(build_dataset("cifar10", tmp_path, "train"), 1)) == 3
    assert len(first_per_class(build_dataset("cifar10", tmp_path, "train"), 100)) == 16  # n above a class's count


def test_first_per_class_on_digits_and_bad_counts():
    for split in ("train", "val", "test"):
        full = build_dataset("digits", None, split)
        part = first_per_class(full, 5)
        assert len(part) == 50 and sorted(part.targets) == sorted(list(range(10)) * 5)
        kept = _first_n_by_hand(full.targets, 5)
        assert part.targets == [full.targets[i] for i in kept]
        assert _sample_ids(part) == [_sample_ids(full)[i] for i in kept]
    for bad in (0, -2):
        with pytest.raises(DatasetError, match=f"per_class must be a positive number of images, not {bad}"):
            first_per_class(full, bad)


def test_first_per_class_counts_a_voc_image_under_its_first_present_class():
    def multi_hot(**marks):
        target = torch.zeros(20)
        for index, value in marks.items():
            target[int(index[1:])] = value
        return target

    # classes by index: 2 bird, 7 cat, 11 dog, 14 person
    targets = [multi_hot(c11=1, c14=-1),  # dog (person is only difficult)
               multi_hot(c7=1, c11=1),  # cat: the first present class
               multi_hot(c2=-1),  # bird: only a difficult object, so the first difficult class
               multi_hot(c2=-1, c7=1),  # cat: a present class beats an earlier difficult one
               multi_hot(c11=1),  # dog, the second
               multi_hot(c7=1)]  # cat, the third
    voc = LabelledImages([f"{i}.jpg" for i in range(6)], targets, [str(c) for c in range(20)])
    assert [str(p) for p in first_per_class(voc, 1).images] == ["0.jpg", "1.jpg", "2.jpg"]
    assert [str(p) for p in first_per_class(voc, 2).images] == ["0.jpg", "1.jpg", "2.jpg", "3.jpg", "4.jpg"]
    assert all(torch.equal(a, b) for a, b in zip(first_per_class(voc, 2).targets, targets[:5]))


# ---- errors and unreadable images ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [name for name in DATASETS if name != "digits"])
def test_missing_root_names_title_layout_and_source(tmp_path, name):
    spec = DATASETS[name]
    for root in (tmp_path / "nowhere", tmp_path, None):  # absent, empty, not given
        with pytest.raises(DatasetError) as info:
            build_dataset(name, root, "train")
        message = str(info.value)
        assert spec.title in message and spec.source in message
        assert all(line in message for line in spec.layout.splitlines())
        assert (str(root) if root is not None else "no data root given") in message


def test_missing_split_file_is_reported(tmp_path):
    data = tmp_path / "dtd" / "dtd"
    _image(data / "images" / "banded" / "banded_0001.jpg")
    (data / "labels").mkdir()
    (data / "labels" / "train1.txt").write_text("banded/banded_0001.jpg\n")
    assert build_dataset("dtd", tmp_path, "train").targets == [0]
    with pytest.raises(DatasetError, match="test1.txt") as info:
        build_dataset("dtd", tmp_path, "test")
    assert "DTD" in str(info.value) and DATASETS["dtd"].source in str(info.value)


def test_torchvision_presence_check_becomes_a_dataset_error(tmp_path):
    base = tmp_path / "oxford-iiit-pet"
    (base / "annotations").mkdir(parents=True)
    (base / "images").write_text("not a folder")  # there, so ours passes; torchvision wants a directory
    with pytest.raises(DatasetError, match="layout is incomplete") as info:
        build_dataset("pets", tmp_path, "test")
    assert "Oxford-IIIT Pets" in str(info.value) and "download=True" not in str(info.value)


def test_empty_imagenet_class_folders_are_reported(tmp_path):
    (tmp_path / "train" / "n01440764").mkdir(parents=True)
    with pytest.raises(DatasetError, match="ImageNet: no usable dataset") as info:
        build_dataset("imagenet", tmp_path, "train")
    assert "n01440764" in str(info.value) and DATASETS["imagenet"].source in str(info.value)


def test_unknown_names():
    with pytest.raises(DatasetError, match="cifar10, cifar100") as info:
        build_dataset("mnist", "/data", "train")
    assert "'mnist'" in str(info.value) and "voc2007" in str(info.value)
    with pytest.raises(DatasetError, match="trainval"):
        build_dataset("digits", None, "validation")


def test_corrupt_image_is_skipped_with_its_path(tmp_path):
    _write_imagenet(tmp_path, train_per_class=2)
    broken = tmp_path / "train" / "n01443537" / "n01443537_1.JPEG"
    broken.write_bytes(broken.read_bytes()[:40])  # truncated JPEG
    data = build_dataset("imagenet", tmp_path, "trainval", transform=transforms.ToTensor())
    index = [str(path) for path in data.images].index(str(broken))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert data[index] is None
    [warning] = caught
    assert str(warning.message).startswith(f"{broken}: cannot read image (") and "skipped" in str(warning.message)

    good = data[0]
    assert good[0].shape == (3, 8, 8) and good[1] == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        images, targets = collate_readable([data[0], data[index], data[2]])
    assert images.shape == (2, 3, 8, 8) and targets.tolist() == [0, 1]
    assert collate_readable([None, None]) is None


def test_collate_stacks_voc_targets():
    first, second = torch.tensor([1.0, 0.0, -1.0]), torch.tensor([0.0, 1.0, 0.0])
    images, targets = collate_readable([(torch.zeros(3, 4, 4), first), None, (torch.ones(3, 4, 4), second)])
    assert images.shape == (2, 3, 4, 4) and torch.equal(targets, torch.stack([first, second]))
