"""The IDX reader, where data is looked for, the mnist-sample fallback, subsets and batches."""

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from initstudy.data import (DEBIAN_FASHION, FILES, batches, load_dataset, mnist_sample,
                            normalise, read_idx, read_idx_folder, stratified_split)
from initstudy.errors import DataError

from conftest import make_digits, write_dataset, write_idx


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


def test_search_order_data_dir_then_env_then_cache(tmp_path, monkeypatch):
    first = write_dataset(tmp_path / "first", n_train=20)
    second = write_dataset(tmp_path / "second", n_train=30)
    cache = write_dataset(tmp_path / "cache" / "initstudy", n_train=40)  # XDG_CACHE_HOME
    monkeypatch.setenv("INITSTUDY_DATA", str(second))
    assert len(load_dataset("mnist", data_dir=str(first)).train_labels) == 20
    assert len(load_dataset("mnist").train_labels) == 30
    monkeypatch.delenv("INITSTUDY_DATA")
    dataset = load_dataset("mnist")
    assert len(dataset.train_labels) == 40 and dataset.source == str(cache / "MNIST" / "raw")


def test_fashion_mnist_layout_and_gzip(tmp_path):
    root = write_dataset(tmp_path, folder="FashionMNIST", gz=True, n_train=60)
    dataset = load_dataset("fashion-mnist", data_dir=str(root))
    assert dataset.name == "fashion-mnist" and len(dataset.train_labels) == 60


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="Debian's dataset-fashion-mnist "
                    "package is not installed (.ci/run installs it)")
def test_debian_fashion_mnist_is_found_and_complete():
    dataset = load_dataset("fashion-mnist")
    assert dataset.source == str(DEBIAN_FASHION)
    assert dataset.train_images.shape == (60000, 28, 28)
    assert dataset.test_images.shape == (10000, 28, 28)
    assert torch.bincount(dataset.train_labels).tolist() == [6000] * 10


def test_mnist_falls_back_loudly_to_the_sample(tmp_path, capsys):
    dataset = load_dataset("mnist", data_dir=str(tmp_path / "empty"))
    assert dataset.name == "mnist-sample"
    err = capsys.readouterr().err
    assert "WARNING" in err and "mnist-sample" in err and "--strict-data" in err


def test_strict_data_refuses_the_fallback(tmp_path):
    with pytest.raises(DataError, match="no mnist files"):
        load_dataset("mnist", data_dir=str(tmp_path / "empty"), strict=True)


def test_download_is_tried_into_the_first_root(tmp_path, monkeypatch):
    import initstudy.data as data

    calls = []

    def fake_download(name, root):
        calls.append((name, root))
        write_dataset(root, n_train=10)
        return None

    monkeypatch.setattr(data, "_download", fake_download)
    dataset = load_dataset("mnist", data_dir=str(tmp_path / "dl"), download=True)
    assert calls == [("mnist", tmp_path / "dl")] and dataset.name == "mnist"


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


def test_batches_are_a_seeded_permutation_normalised_on_the_fly():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1).expand(10, 28, 28).contiguous()
    labels = torch.arange(10)
    order = lambda seed: [y.tolist() for _, y in batches(
        images, labels, "mnist", 4, torch.Generator().manual_seed(seed))]
    assert order(0) == order(0) and order(0) != order(1)
    assert sorted(sum(order(0), [])) == list(range(10)) and len(order(0)[-1]) == 2
    x, y = next(batches(images, labels, "mnist", 10))
    assert x.shape == (10, 1, 28, 28) and x.dtype == torch.float32
    assert torch.allclose(x[:, 0, 0, 0], (torch.arange(10) / 255 - 0.1307) / 0.3081)
    assert torch.equal(normalise(images[:2], "mnist"), x[:2])
