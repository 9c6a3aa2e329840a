"""Mirroring a run to Weights & Biases (keys in docs/records.md), and the ``Tracker`` through which
the trainer reports to the run folder and the mirror at once."""

from __future__ import annotations

import sys
from typing import Any, Callable, Iterable

import torch

from .config import DEFAULT_MODEL, RunConfig
from .diagnostics import layer_histograms
from .runfolder import RunFolder, write_json_atomic

EPOCH_KEYS = ("train/loss_epoch", "train/acc", "val/loss", "val/acc", "test/loss", "test/acc",
              "lr")


class WandbMirror:
    """Mirrors one run to wandb (keys in docs/records.md). wandb is a mirror, never the record: any
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
            tags=[scheme_name, config.dataset_used] + (
                [config.model.partition(":")[0]] if config.model != DEFAULT_MODEL else []),
            config=config.to_dict(),
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
