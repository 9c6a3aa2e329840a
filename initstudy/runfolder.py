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
- ``.run.lock``: held (``flock``) by the process writing the folder, so a second one refuses.

A folder that holds a finished run (``ok`` or ``diverged``) is never started over by
accident: for the same options (run id) ``RunFolder`` raises ``AlreadyDone``, for others a
``ConfigError``, unless asked to overwrite. ``running``, ``interrupted`` and ``failed`` folders
are redone. A write that fails (no space, read-only, vanished) raises ``WriteError`` naming the
path; a run that failed so says ``"io_error": true`` in its summary where that can still be
written, and a sweep redoes it.

JSON files are replaced atomically (write to a temporary file, fsync, rename), so a killed
run leaves the previous complete version, never half a file. JSONL records are appended one
whole line per write and flushed; readers skip a final line cut short by a kill.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .config import RunConfig
from .errors import AlreadyDone, ConfigError, WriteError

FINISHED = ("ok", "diverged")  # a result: a sweep never redoes these, a report compares them
HISTOGRAM_BINS = 30  # histograms.jsonl: the seed document's plt.hist(..., bins=30)


def write_json_atomic(path: Path, data: Any) -> None:
    """Replace ``path`` with ``data`` as JSON in one rename, so readers see old or new, never
    half. Non-finite numbers are written as null, so every JSON reader can read the file.
    WriteError when it cannot be written."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(_finite_or_none(data), f, indent=2, default=str, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp:
            try:
                Path(tmp).unlink(missing_ok=True)
            except OSError:
                pass  # the folder is gone or read-only: nothing of ours is left in it
        if isinstance(exc, OSError):
            raise WriteError(path, exc) from None
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


def finished_run(path: Path) -> tuple[str, dict[str, Any]] | None:
    """(run id, summary) of the finished run (``ok``/``diverged``) a folder holds, or None."""
    try:
        summary = json.loads((path / "summary.json").read_text())
        config = RunConfig.from_dict(json.loads((path / "config.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return (config.run_id, summary) if summary.get("status") in FINISHED else None


class RunFolder:
    """Writes one run's folder (layout in the module docstring), holding its lock until
    ``close``. AlreadyDone / ConfigError for a folder holding a finished run (of ``run_id`` /
    of other options) unless ``overwrite``; ConfigError when another process writes it."""

    def __init__(self, path: Path, run_id: str, overwrite: bool = False):
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.path / ".run.lock", "w")
        except OSError as exc:
            raise ConfigError(f"cannot write to output folder {self.path}: "
                              f"{exc.strerror or exc}") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            raise ConfigError(f"another initstudy process is writing {self.path}; wait for "
                              f"it or choose another --out") from None
        done = None if overwrite else finished_run(self.path)
        if done:
            self.close()
            done_id, summary = done
            if done_id == run_id:
                raise AlreadyDone(self.path, summary)
            raise ConfigError(f"{self.path} holds a finished run of other options ({done_id}, "
                              f"not {run_id}): choose another --out, or --overwrite to "
                              f"replace it")
        self._start_fresh()

    def _start_fresh(self) -> None:
        for name in ("metrics.jsonl", "histograms.jsonl", "error.txt"):
            (self.path / name).unlink(missing_ok=True)  # a rerun starts a fresh record
        for partial in self.path.glob(".*.tmp"):  # of a JSON write killed before its rename
            partial.unlink(missing_ok=True)
        shutil.rmtree(self.path / "wandb", ignore_errors=True)  # and one wandb run, not two

    def close(self) -> None:
        """Release the folder's lock (the process's end releases it too)."""
        self._lock.close()

    def write_config(self, config: dict[str, Any]) -> None:
        write_json_atomic(self.path / "config.json", config)

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json_atomic(self.path / "summary.json", summary)

    def write_error(self, text: str) -> None:
        try:
            (self.path / "error.txt").write_text(text)
        except OSError as exc:
            raise WriteError(self.path / "error.txt", exc) from None

    def _append(self, name: str, records: list[dict[str, Any]]) -> None:
        lines = "".join(json.dumps(_finite_or_none(r)) + "\n" for r in records)
        try:
            with open(self.path / name, "a") as f:
                f.write(lines)  # one write: a kill loses whole records, not half lines
        except OSError as exc:
            raise WriteError(self.path / name, exc) from None

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
