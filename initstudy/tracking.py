"""Where a run is recorded: its folder (the source of truth: reports read it) and a wandb mirror.

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

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from .config import RunConfig
from .errors import ConfigError

HISTOGRAM_BINS = 30


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
    if param == "bias":  # few enough to keep: the note plots biases value by value
        record["values"] = [v if math.isfinite(v) else None for v in flat.tolist()]
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


WANDB_MODES = ("offline", "online", "disabled")
_WANDB_ALIASES = {"dryrun": "offline", "run": "online"}  # older WANDB_MODE spellings
EPOCH_KEYS = ("train/loss_epoch", "train/acc", "val/loss", "val/acc", "test/loss", "test/acc",
              "lr")


def wandb_mode(flag: str | None) -> str:
    """The wandb mode: the flag, else ``$WANDB_MODE``, else offline; ConfigError if unknown."""
    mode = flag or os.environ.get("WANDB_MODE") or "offline"
    mode = _WANDB_ALIASES.get(mode, mode)
    if mode not in WANDB_MODES:
        raise ConfigError(f"unknown wandb mode '{mode}'; choose from {', '.join(WANDB_MODES)}")
    return mode


@contextlib.contextmanager
def _environ(**values: str):
    """Set environment variables for the duration of a block (wandb reads its settings there)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_wandb_online() -> None:
    """Fail fast, before any training, when online logging cannot work: no API key, or the
    server does not answer within 5 s."""
    import socket
    from urllib.parse import urlparse

    import wandb

    # The flag wins over a WANDB_MODE that would make wandb skip the check; no chatter.
    with _environ(WANDB_MODE="online", WANDB_SILENT="true"):
        has_key = wandb.login(prompt=False, verify=False)
        url = urlparse(os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url)
    if not has_key:
        raise ConfigError("wandb online needs an API key: run `wandb login` (or set "
                          "WANDB_API_KEY), or use --wandb offline and `wandb sync` later")
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=5).close()
    except OSError as exc:
        raise ConfigError(f"wandb online: cannot reach {url.geturl()} ({exc}); use --wandb "
                          f"offline and `wandb sync` later") from None


class WandbMirror:
    """Mirrors one run to wandb (keys in the README). wandb is a mirror, never the record: any
    wandb failure warns once, turns the mirror off and lets training go on."""

    def __init__(self, config: RunConfig, scheme_name: str):
        self.run = None
        try:
            self._start(config, scheme_name)
        except Exception as exc:  # a mirror must never stop training
            self._give_up(exc)

    def _start(self, config: RunConfig, scheme_name: str) -> None:
        import wandb

        self.run = wandb.init(
            project=config.wandb_project, entity=config.wandb_entity,
            dir=str(config.wandb_dir or config.run_dir), mode=config.wandb,
            name=config.run_name, group=config.group or "adhoc", job_type="train",
            tags=[scheme_name, config.dataset_used], config=config.to_dict(),
            settings=wandb.Settings(silent=True, console="off"), reinit="create_new")
        self.run.define_metric("epoch")
        for key in (*EPOCH_KEYS, "weights/*", "biases/*", "weight_std/*", "rel_update/*"):
            self.run.define_metric(key, step_metric="epoch")

    def _give_up(self, exc: Exception) -> None:
        print(f"WARNING: wandb failed ({type(exc).__name__}: {exc}); training goes on without "
              f"it, the run folder keeps everything", file=sys.stderr)
        self.run = None

    def _call(self, fn: Callable[[], None]) -> None:
        if self.run is None:
            return
        try:
            fn()
        except Exception as exc:
            self._give_up(exc)

    def log(self, data: dict[str, Any], step: int) -> None:
        data = {k: v for k, v in data.items() if v is not None}
        self._call(lambda: self.run.log(data, step=step))

    def log_histograms(self, epoch: int, step: int, records: list[dict[str, Any]]) -> None:
        def log() -> None:
            import wandb

            data: dict[str, Any] = {"epoch": epoch}
            for r in records:
                if r["counts"]:  # no finite value: nothing to draw, `nonfinite` says why
                    key = f"{'weights' if r['param'] == 'weight' else 'biases'}/{r['layer']}"
                    data[key] = wandb.Histogram(np_histogram=(r["counts"], r["edges"]))
            self.run.log(data, step=step)

        self._call(log)

    def finish(self, summary: dict[str, Any]) -> None:
        def finish() -> None:
            self.run.summary.update(summary)
            self.run.finish(exit_code=1 if summary["status"] == "failed" else 0)

        self._call(finish)


class Tracker:
    """Where the trainer reports: the run folder, mirrored to wandb unless it is disabled."""

    def __init__(self, folder: RunFolder, mirror: WandbMirror | None = None):
        self.folder, self.mirror = folder, mirror

    def step(self, step: int, loss: float, grad_norms: dict[str, float | None]) -> None:
        record = {"step": step, "train/loss": loss} | grad_norms
        self.folder.log_metrics(record)
        if self.mirror:
            self.mirror.log({k: v for k, v in record.items() if k != "step"}, step)

    def epoch(self, record: dict[str, Any]) -> None:
        self.folder.log_metrics(record)
        if self.mirror:
            data = {k: v for k, v in record.items() if k not in ("step", "train/loss")}
            self.mirror.log(data | {"train/loss_epoch": record["train/loss"]}, record["step"])

    def init_diagnostics(self, report: dict[str, Any]) -> None:
        write_json_atomic(self.folder.path / "init_diagnostics.json", report)
        if self.mirror:
            flat = {f"init/{k}": v for k, v in report.items() if k != "layers"}
            for layer in report["layers"]:
                flat |= {f"init/{layer['name']}/{k}": v for k, v in layer.items() if k != "name"}
            self.mirror.log(flat, 0)

    def histograms(self, epoch: int, step: int,
                   layers: Iterable[tuple[str, torch.nn.Module]]) -> None:
        records = layer_histograms(layers)
        self.folder.log_histograms(epoch, step, records)
        if self.mirror:
            self.mirror.log_histograms(epoch, step, records)

    def summary(self, summary: dict[str, Any], final: bool = True) -> None:
        self.folder.write_summary(summary)
        if final and self.mirror:
            self.mirror.finish(summary)
