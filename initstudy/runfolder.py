"""A run's folder, the source of truth that reports read: its layout, and writes that a kill
never leaves half-done.

Layout of ``<run dir>/``:

- ``config.json``: the resolved ``RunConfig`` (``config.RunConfig.to_dict``).
- ``metrics.jsonl``: one JSON object a line. Step records ``{"step", "train/loss",
  "grad_norm/<layer>"...}`` every ``log_every`` steps and at each epoch's end (the mean loss
  since the previous record; each layer's weight-gradient norm at that step); epoch records ``{"epoch",
  "step", "train/loss", "train/acc", "test/loss", "test/acc", "lr", "weight_std/<layer>"...,
  "rel_update/<layer>"...}``, epoch 0 being the model at init (its train/* are null: nothing
  was trained yet). ``rel_update`` is ||W_end - W_start|| / ||W_start|| over the epoch.
- ``histograms.jsonl``: one line per parameter tensor at init (epoch 0) and after every epoch:
  ``{"epoch", "step", "layer", "param" ("weight"|"bias"), "count", "nonfinite", "mean",
  "std", "min", "max", "edges" (31 floats), "counts" (30 ints)}``, 30 bins over the finite
  values, as the document's ``plt.hist(..., bins=30)``; bias records also hold ``values``,
  every bias in order (null where not finite), for the document's ``plt.plot`` of biases.
- ``summary.json``: ``status`` (running | ok | diverged | failed | interrupted) and the final
  numbers. A run killed outright stays ``running``.
- ``init_diagnostics.json``: signal propagation at init (see ``diagnostics.init_diagnostics``).
- ``error.txt``: the traceback of a failed run.

JSON files are replaced atomically (write to a temporary file, fsync, rename), so a killed
run leaves the previous complete version, never half a file. JSONL records are appended one
whole line per write and flushed; readers skip a final line cut short by a kill.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import os
from pathlib import Path
from typing import Any

from .errors import ConfigError

STATUSES = ("running", "ok", "diverged", "failed", "interrupted")  # summary.json's status
FINISHED = ("ok", "diverged")  # a result: a sweep never redoes these, a report compares them
HISTOGRAM_BINS = 30  # histograms.jsonl: the seed document's plt.hist(..., bins=30)


def write_json_atomic(path: Path, data: Any) -> None:
    """Replace ``path`` with ``data`` as JSON in one rename, so readers see old or new, never
    half. Non-finite numbers are written as null, so every JSON reader can read the file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_finite_or_none(data), f, indent=2, default=str, allow_nan=False)
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
        for partial in self.path.glob(".*.tmp"):  # of a JSON write killed before its rename
            partial.unlink(missing_ok=True)
        shutil.rmtree(self.path / "wandb", ignore_errors=True)  # and one wandb run, not two

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


def _finite_or_none(data: Any) -> Any:
    """JSON has no NaN or Infinity: store non-finite numbers as null, at any depth."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _finite_or_none(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite_or_none(v) for v in data]
    return data
