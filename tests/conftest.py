"""Shared fixtures: tiny IDX datasets written on the fly, and hermetic environment settings."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from initstudy.data import FILES


def write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> Path:
    """Write a uint8 array as an IDX file (gzip when the name ends in .gz)."""
    array = np.asarray(array, dtype=np.uint8)
    magic = magic if magic is not None else 0x0800 + array.ndim
    body = struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(body) if path.suffix == ".gz" else body)
    return path


def make_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable synthetic 28x28 images: class k lights a bar at row 2+2k, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    images = rng.integers(0, 60, size=(n, 28, 28))
    for i, k in enumerate(labels):
        images[i, 2 + 2 * k: 4 + 2 * k, 4:24] = 255
    return images.astype(np.uint8), labels.astype(np.uint8)


def write_dataset(root: Path, folder: str = "MNIST", n_train: int = 200, n_test: int = 100,
                  gz: bool = False) -> Path:
    """A tiny dataset in torchvision's layout ``root/folder/raw``; returns ``root``."""
    raw = root / folder / "raw"
    suffix = ".gz" if gz else ""
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        images, labels = make_digits(n, seed)
        write_idx(raw / (FILES[f"{split}_images"] + suffix), images)
        write_idx(raw / (FILES[f"{split}_labels"] + suffix), labels)
    return root


@pytest.fixture(autouse=True)
def hermetic(monkeypatch, tmp_path):
    """No downloads, no wandb network, no cache or data folders outside the test."""
    monkeypatch.setenv("INITSTUDY_NO_DOWNLOAD", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("INITSTUDY_DATA", raising=False)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    """A data root with a 200/100-image MNIST-layout dataset."""
    return write_dataset(tmp_path / "data")
