"""The IDX reader, the mnist-sample, the validation split, subsets and batches."""

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from initstudy.data import (FILES, VAL_SPLIT_SEED, batches, default_val_size, mnist_sample,
                            normalise, parse_idx, read_bytes, read_idx_folder,
                            stratified_split)
from initstudy.sources import load_dataset
from initstudy.errors import DataError

from helpers import make_digits, write_dataset, write_idx


def read_idx(path: Path, kind: str) -> torch.Tensor:
    """One IDX file read as the package reads each file of a folder."""
    return parse_idx(read_bytes(path), kind, path)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    images, labels = make_digits(30, seed=0)
    suffix = ".gz" if gz else ""
    img = read_idx(write_idx(tmp_path / f"img{suffix}", images), "images")
    lab = read_idx(write_idx(tmp_path / f"lab{suffix}", labels), "labels")
    assert img.dtype == torch.uint8 and img.shape == (30, 28, 28)
    assert np.array_equal(img.numpy(), images)
    assert lab.dtype == torch.int64 and lab.tolist() == labels.tolist()


def corrupt(tmp_path: Path, kind: str) -> Path:
    images, _ = make_digits(10, seed=0)
    good_img = write_idx(tmp_path / "good-img", images)
    bad = tmp_path / f"bad-{kind}"
    if kind == "magic":
        write_idx(bad, images, magic=2049)
    elif kind == "truncated":
        bad.write_bytes(good_img.read_bytes()[:-100])
    elif kind == "trailing":
        bad.write_bytes(good_img.read_bytes() + b"\0" * 7)
    elif kind == "header":
        bad.write_bytes(good_img.read_bytes()[:9])
    elif kind == "size":
        write_idx(bad, np.zeros((3, 32, 32)))
    elif kind == "gzip":
        bad = tmp_path / "bad.gz"
        bad.write_bytes(gzip.compress(good_img.read_bytes())[:-20])
    elif kind == "label":
        write_idx(bad, np.array([1, 2, 12]))
    return bad


@pytest.mark.parametrize("kind,fragment", [
    ("magic", "magic number 2049, expected 2051"), ("truncated", "truncated"),
    ("trailing", "trailing bytes"), ("header", "truncated header"),
    ("size", "32x32, expected 28x28"), ("gzip", "cannot read"),
])
def test_corrupt_image_files_are_one_clear_error_naming_the_file(tmp_path, kind, fragment):
    bad = corrupt(tmp_path, kind)
    with pytest.raises(DataError) as info:
        read_idx(bad, "images")
    assert str(bad) in str(info.value) and fragment in str(info.value)


def test_labels_outside_0_to_9_are_an_error(tmp_path):
    bad = corrupt(tmp_path, "label")
    with pytest.raises(DataError, match="label 12 outside 0-9"):
        read_idx(bad, "labels")


def test_image_and_label_counts_must_match(tmp_path):
    root = write_dataset(tmp_path, n_train=50)
    raw = root / "MNIST" / "raw"
    write_idx(raw / FILES["train_labels"], np.zeros(49))
    with pytest.raises(DataError, match="49 labels for 50 images"):
        read_idx_folder(raw)


def test_a_folder_with_a_missing_file_is_an_error_not_a_fallback(tmp_path):
    root = write_dataset(tmp_path)
    (root / "MNIST" / "raw" / FILES["test_labels"]).unlink()
    with pytest.raises(DataError, match="missing t10k-labels-idx1-ubyte"):
        load_dataset("mnist", data_dir=str(root))


def test_mnist_sample_is_real_stratified_and_fixed():
    a, b = mnist_sample(), mnist_sample()
    assert a.train_images.shape == (4000, 28, 28) and a.test_images.shape == (1000, 28, 28)
    assert torch.bincount(a.train_labels).tolist() == [400] * 10
    assert torch.bincount(a.test_labels).tolist() == [100] * 10
    assert torch.equal(a.test_images, b.test_images)
    assert a.train_images.float().mean().item() / 255 == pytest.approx(0.13, abs=0.01)


def test_stratified_split_keeps_proportions_and_is_seeded():
    labels = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    chosen, rest = stratified_split(labels, 10, seed=0)
    assert torch.bincount(labels[chosen]).tolist() == [6, 3, 1]
    assert sorted(chosen.tolist() + rest.tolist()) == list(range(100))
    assert torch.equal(chosen, stratified_split(labels, 10, seed=0)[0])
    assert not torch.equal(chosen, stratified_split(labels, 10, seed=1)[0])


def test_subset_is_stratified(tiny_data):
    dataset = load_dataset("mnist", data_dir=str(tiny_data)).subset_train(50, seed=0)
    assert torch.bincount(dataset.train_labels).tolist() == [5] * 10
    with pytest.raises(DataError, match="outside 1..200"):
        load_dataset("mnist", data_dir=str(tiny_data)).subset_train(500, seed=0)


def test_batches_are_in_order_and_normalised_on_the_fly():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1).expand(10, 28, 28).contiguous()
    labels = torch.arange(10)
    assert [y.tolist() for _, y in batches(images, labels, "mnist", 4)] == [
        [0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    x, y = next(batches(images, labels, "mnist", 10))
    assert x.shape == (10, 1, 28, 28) and x.dtype == torch.float32
    assert torch.allclose(x[:, 0, 0, 0], (torch.arange(10) / 255 - 0.1307) / 0.3081)
    assert torch.equal(normalise(images[:2], "mnist"), x[:2])


def test_validation_split_is_stratified_fixed_and_a_twelfth_by_default(tiny_data):
    full = load_dataset("mnist", data_dir=str(tiny_data))
    assert default_val_size(60000) == 5000 and default_val_size(4000) == 333
    split = full.split_validation(None)
    assert split.sizes == {"train": 183, "val": 17, "test": 100}  # round(200 / 12) = 17
    val, rest = stratified_split(full.train_labels, 17, VAL_SPLIT_SEED)
    assert torch.equal(split.val_labels, full.train_labels[val])
    assert torch.equal(split.train_images, full.train_images[rest])
    # Every class is represented as in the whole training set (20 each: 1 or 2 held out).
    assert set(torch.bincount(split.val_labels, minlength=10).tolist()) <= {1, 2}
    again = load_dataset("mnist", data_dir=str(tiny_data)).split_validation(None)
    assert torch.equal(again.val_images, split.val_images)  # no seed of the run enters
    assert full.split_validation(0).sizes == {"train": 200, "val": 0, "test": 100}
    with pytest.raises(DataError, match="validation size 200 is outside 0..199"):
        full.split_validation(200)


def test_train_subset_is_drawn_from_what_validation_left(tiny_data):
    split = load_dataset("mnist", data_dir=str(tiny_data)).split_validation(50)
    subset = split.subset_train(100, seed=0)
    held = {tuple(img.flatten().tolist()) for img in split.val_images}
    assert subset.sizes == {"train": 100, "val": 50, "test": 100}
    assert not any(tuple(img.flatten().tolist()) in held for img in subset.train_images)
    with pytest.raises(DataError, match="outside 1..150.*50 held out for validation"):
        split.subset_train(151, seed=0)
