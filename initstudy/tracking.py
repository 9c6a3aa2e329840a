"""The run folder: the local, authoritative record of a run (reports read it, never wandb).

Layout of ``<run dir>/``:

- ``config.json``: the resolved ``RunConfig`` (``config.RunConfig.to_dict``).
- ``metrics.jsonl``: one JSON object a line. Step records ``{"step", "train/loss"}`` every
  ``log_every`` steps (the mean loss since the previous record); epoch records ``{"epoch",
  "step", "train/loss", "train/acc", "test/loss", "test/acc", "lr"}``, epoch 0 being the
  model at init (its train/* are null: nothing was trained yet).
- ``histograms.jsonl``: one line per parameter tensor at init (epoch 0) and after every epoch:
  ``{"epoch", "step", "layer", "param" ("weight"|"bias"), "count", "nonfinite", "mean",
  "std", "min", "max", "edges" (31 floats), "counts" (30 ints)}``, 30 bins over the finite
  values, as the document's ``plt.hist(..., bins=30)``.
- ``summary.json``: ``status`` (running | ok | diverged | failed) and the final numbers.
- ``error.txt``: the traceback of a failed run.

JSON files are replaced atomically (write to a temporary file, fsync, rename), so a killed
run leaves the previous complete version, never half a file. JSONL records are appended one
whole line per write and flushed; readers skip a final line cut short by a kill.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch

from .errors import ConfigError

HISTOGRAM_BINS = 30


def write_json_atomic(path: Path, data: Any) -> None:
    """Replace ``path`` with ``data`` as JSON in one rename, so readers see old or new, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL file, skipping a last line cut short by a killed writer."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if line.endswith("\n"):  # a complete but invalid line is corruption, not a kill
                    raise
    return records


def histogram(name: str, param: str, values: torch.Tensor) -> dict[str, Any]:
    """A histogram record of one tensor over its finite values (see the module docstring)."""
    flat = values.detach().float().flatten().cpu()
    finite = flat[torch.isfinite(flat)]
    record: dict[str, Any] = {"layer": name, "param": param, "count": flat.numel(),
                              "nonfinite": flat.numel() - finite.numel()}
    if finite.numel() == 0:
        return record | {"mean": None, "std": None, "min": None, "max": None,
                         "edges": [], "counts": []}
    lo, hi = finite.min().item(), finite.max().item()
    if lo == hi:  # a constant tensor: one bin centred on it, as numpy does
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = torch.histogram(finite, bins=HISTOGRAM_BINS, range=(lo, hi))
    return record | {
        "mean": finite.mean().item(),
        "std": finite.std().item() if finite.numel() > 1 else 0.0,
        "min": finite.min().item(), "max": finite.max().item(),
        "edges": edges.tolist(), "counts": [int(c) for c in counts.tolist()],
    }


def layer_histograms(layers: Iterable[tuple[str, torch.nn.Module]]) -> list[dict[str, Any]]:
    """Histogram records of every weight and bias of the given (name, layer) pairs."""
    records = []
    for name, layer in layers:
        for param in ("weight", "bias"):
            tensor = getattr(layer, param, None)
            if tensor is not None:
                records.append(histogram(name, param, tensor))
    return records


class RunFolder:
    """Writes one run's folder (layout in the module docstring)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(f"cannot write to output folder {self.path}: "
                              f"{exc.strerror or exc}") from None
        for name in ("metrics.jsonl", "histograms.jsonl", "error.txt"):
            (self.path / name).unlink(missing_ok=True)  # a rerun starts a fresh record

    def write_config(self, config: dict[str, Any]) -> None:
        write_json_atomic(self.path / "config.json", config)

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json_atomic(self.path / "summary.json", summary)

    def write_error(self, text: str) -> None:
        (self.path / "error.txt").write_text(text)

    def _append(self, name: str, records: list[dict[str, Any]]) -> None:
        lines = "".join(json.dumps(_finite_or_none(r)) + "\n" for r in records)
        with open(self.path / name, "a") as f:
            f.write(lines)  # one write: a kill loses whole records, not half lines

    def log_metrics(self, record: dict[str, Any]) -> None:
        self._append("metrics.jsonl", [record])

    def log_histograms(self, epoch: int, step: int, records: list[dict[str, Any]]) -> None:
        self._append("histograms.jsonl", [{"epoch": epoch, "step": step} | r for r in records])


def _finite_or_none(record: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN or Infinity: store non-finite numbers as null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()}
