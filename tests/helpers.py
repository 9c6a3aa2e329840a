"""Helpers the tests share: tiny IDX datasets written on the fly, and tiny study files."""

import gzip
import json
import struct
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

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


def write_study(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def sweep_cmd(study: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "initstudy.cli", "sweep", str(study), "--out", str(out),
            "--gpus", "none", "--workers", "2", *extra]


# Images of a tiny run's init diagnostics: a real run's 256 (all 183 tiny training images here)
# cost each of the suite's many runs ~2 s of a forward and backward through the unfused LeNet.
DIAG_BATCH = 32


def tiny_study(tmp_path, tiny_data, schemes, seeds=2, epochs=1, **extra) -> Path:
    options = dict(name="tiny", data_dir=str(tiny_data), dataset="mnist", schemes=schemes,
                   seeds=seeds, epochs=epochs, batch_size=50, lr=0.01, device="cpu",
                   diag_batch=DIAG_BATCH) | extra
    return write_study(tmp_path, "".join(f"{k} = {json.dumps(v)}\n" for k, v in options.items()))


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def assert_packed_step_is_each_models_own(models, x, y, masks) -> None:
    """One step of a pack, in every engine, gives each model the loss and gradients it gets
    alone (loop: its own forward and backward on its slice; vmap: one grouped computation;
    bmm: the LeNet's layers as batched products, vmap for other models), equal to rounding.
    In float64, on copies: in float32 a last-bit difference can flip a max-pool's arg-max at a
    near tie, which routes a whole gradient term elsewhere (seen: 2.4% of a layer's largest
    gradient, 1 draw in 10)."""
    import copy

    import torch
    from initstudy.config import ENGINES
    from initstudy.pack import Pack, resolve_engine

    models = [copy.deepcopy(m).double() for m in models]
    x, masks = x.double(), tuple(m.double() for m in masks)
    ce = torch.nn.functional.cross_entropy

    def step(pack, xs, ys, ms):
        losses, _ = pack.forward_backward(xs, ys, ms, ce)
        return losses, {n: p.grad for n, p in pack.params.items()}

    for engine in ENGINES[1:]:
        packed = Pack(copy.deepcopy(models), engine=engine)
        assert packed.engine == resolve_engine(engine, True, len(models), type(models[0]))
        packed_losses, packed_grads = step(packed, x, y, masks)
        for k, model in enumerate(models):
            loss, grads = step(Pack([copy.deepcopy(model)]), x[k:k + 1], y[k:k + 1],
                               tuple(m[k:k + 1] for m in masks))
            assert torch.allclose(packed_losses[k], loss[0], rtol=1e-10), engine
            for name, grad in grads.items():
                assert torch.allclose(packed_grads[name][k], grad[0], rtol=1e-8,
                                      atol=1e-12), (engine, name)
