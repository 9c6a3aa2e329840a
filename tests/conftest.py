"""Shared fixtures: hermetic environment settings and a tiny dataset (helpers.py writes it)."""

from pathlib import Path

import pytest

from helpers import write_dataset


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
