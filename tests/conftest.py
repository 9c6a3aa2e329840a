"""Shared fixtures: hermetic environment settings and a tiny dataset (helpers.py writes it)."""

from pathlib import Path

import pytest

from helpers import write_dataset


@pytest.fixture(scope="session")
def kernels_cache(tmp_path_factory) -> Path:
    """One folder of built CPU kernels for the whole session: each test's fresh cache would
    otherwise compile them again in its first process that trains a LeNet."""
    return tmp_path_factory.mktemp("kernels")


@pytest.fixture(autouse=True)
def hermetic(monkeypatch, tmp_path, kernels_cache):
    """No downloads, no wandb network, no cache or data folders outside the test (but for the
    session's built kernels, which a test of the build replaces with its own cache)."""
    monkeypatch.setenv("INITSTUDY_NO_DOWNLOAD", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "cache" / "initstudy").mkdir(parents=True)
    (tmp_path / "cache" / "initstudy" / "kernels").symlink_to(kernels_cache)
    monkeypatch.delenv("INITSTUDY_DATA", raising=False)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    """A data root with a 200/100-image MNIST-layout dataset."""
    return write_dataset(tmp_path / "data")
