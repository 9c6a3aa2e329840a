"""``RunConfig``: the one typed description of a run, saved as ``config.json`` and sent to wandb."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

DATASETS = ("mnist", "fashion-mnist", "mnist-sample")
OPTIMIZERS = ("sgd", "adam")
LOSSES = ("ce", "prob-ce")
# The fields that decide a run's numbers. Where the data, logs or device are is not among them,
# so a study finds its finished runs again wherever it runs.
RESULT_FIELDS = ("scheme", "model", "seed", "data_seed", "dataset", "val_size", "train_subset",
                 "subset_seed", "epochs", "batch_size", "optimizer", "lr", "momentum",
                 "weight_decay", "loss", "precision")
DEFAULT_MODEL = "lenet"  # the document's; runs of it keep the ids they had before models
# The optimizer's per-run scalars: runs of one pack may differ in them, each stepping with its
# own (optim.pack_optimizer).
PER_RUN = ("lr", "momentum", "weight_decay")
# What runs trained together as one pack must share: all but the scheme, the seeds and PER_RUN.
PACK_FIELDS = tuple(f for f in RESULT_FIELDS
                    if f not in ("scheme", "seed", "data_seed", *PER_RUN)) + (
    "data_dir", "strict_data", "device", "log_every", "diag_batch", "compile", "engine")
PRECISIONS = ("fp32", "tf32", "bf16")
ENGINES = ("auto", "loop", "vmap", "bmm")  # how a pack trains (pack.Pack)
WANDB_MODES = ("offline", "online", "disabled")
# What a study may tune per scheme (a report chooses their values on the validation split).
TUNABLE = tuple(f for f in RESULT_FIELDS if f not in ("scheme", "seed", "data_seed"))
MARGIN_POINTS = 0.1  # default equivalence margin of a report, accuracy points (docs/statistics.md)


def check_margin(points: float | None) -> float:
    """An equivalence margin in accuracy points (``MARGIN_POINTS`` for None); ConfigError
    unless it is a positive number below 100."""
    points = MARGIN_POINTS if points is None else points
    if not (isinstance(points, (int, float)) and 0 < points < 100):
        raise ConfigError(f"margin must be a number of accuracy points in (0, 100), got "
                          f"{points!r}")
    return float(points)


def check_tune(tune: list[str]) -> list[str]:
    """``tune`` if every name is a tunable run option, else ConfigError listing them."""
    bad = [t for t in tune if t not in TUNABLE]
    if bad:
        raise ConfigError(f"cannot tune {', '.join(map(str, bad))}; tunable options: "
                          f"{', '.join(TUNABLE)}")
    return list(tune)


def option(default: Any, help: str, choices: tuple[str, ...] | None = None,
           flags: tuple[str, ...] | None = None) -> Any:
    """A run option: its default, and the help and choices the command line shows (the CLI's
    options are made from these fields)."""
    return field(default=default, metadata={"help": help, "choices": choices, "flags": flags})


def options() -> list[dataclasses.Field]:
    """RunConfig's fields that are options (the rest the trainer fills in)."""
    return [f for f in dataclasses.fields(RunConfig) if "help" in f.metadata]


@dataclass
class RunConfig:
    """Everything that decides a run. Fields after ``quiet`` are filled in by the trainer and
    record what actually ran (dataset after any fallback, device, versions, git commit); a
    confirmation study sets ``chosen_by``.

    Defaults (SGD, lr 0.01, momentum 0.9, batch 128, 10 epochs): the textbook setting, stable
    under PyTorch's default, xavier, kaiming and orthogonal inits; plain SGD keeps the effect of
    the init visible, where Adam's per-parameter step sizes hide the weights' scale (docs/run.md).
    """

    scheme: str = option("default", "Init scheme spec, e.g. kaiming, normal:std=0.01, "
                         "mymodule:init_weights (initstudy schemes lists them).")
    model: str = option(DEFAULT_MODEL, "Model spec: lenet (the document's), "
                        "mlp:depth=D,width=W,act=relu|tanh, cnn:depth=D,channels=C,act=relu|tanh, "
                        "or module.path:Class / file.py:Class[:key=value,...] (initstudy models "
                        "lists them).")
    seed: int = option(0, "Init seed (and data seed unless --data-seed).")
    data_seed: int | None = option(None, "Seed of batch order and dropout (default: --seed).")
    dataset: str = option("mnist", "Dataset asked for (dataset_used records what ran).",
                          choices=DATASETS)
    data_dir: str | None = option(None, "Data root holding MNIST/raw or FashionMNIST/raw "
                                  "(default: $INITSTUDY_DATA, then the cache).")
    strict_data: bool = option(False, "Refuse the mnist-sample fallback.")
    val_size: int | None = option(None, "Training images held out for validation, stratified, "
                                  "the same for every run (0: none) (default: a twelfth, "
                                  "5,000 of MNIST).")
    train_subset: int | None = option(None, "Train on a stratified subset of N of the "
                                      "remaining training images.")
    subset_seed: int = option(0, "Seed of the subset choice (fixed, so every run of a study "
                              "sees the same subset).")
    epochs: int = option(10, "Epochs to train.")
    batch_size: int = option(128, "Training batch size.")
    optimizer: str = option("sgd", "Optimizer.", choices=OPTIMIZERS)
    lr: float = option(0.01, "Learning rate.")
    momentum: float = option(0.9, "SGD momentum.")
    weight_decay: float = option(0.0, "Weight decay.")
    loss: str = option("ce", "ce: cross-entropy from the logits; prob-ce: CrossEntropyLoss on "
                       "the softmax output (the double softmax).", choices=LOSSES)
    device: str = option("auto", "auto | cpu | cuda | cuda:N.")
    log_every: int = option(50, "Steps between train/loss records.")
    diag_batch: int = option(256, "Images for the init diagnostics, a fixed seeded batch "
                             "(0: skip them).")
    precision: str = option("fp32", "fp32 | tf32 (CUDA matmuls and convs) | bf16 (autocast); "
                            "fp32 for numbers that go into a report.", choices=PRECISIONS)
    compile: bool = option(False, "torch.compile the forward passes.")
    engine: str = option("auto", "How a pack of runs trains: loop (each run's step in turn, "
                         "as alone), vmap (all runs as one vectorised step), bmm (the LeNet's "
                         "layers as batched matrix products; other models: vmap); auto: loop "
                         "on a CPU, vmap on a GPU.", choices=ENGINES)
    out: str | None = option(None, "Run folder (default: runs/<run id>, the scheme, seed and "
                             "a hash of the options that decide the result).")
    overwrite: bool = option(False, "Train again into a run folder that holds a finished run "
                             "(its record is replaced).")
    wandb: str | None = option(None, "wandb mode (default: $WANDB_MODE, else offline).",
                               choices=WANDB_MODES)
    wandb_project: str = option("initstudy", "wandb project.")
    wandb_entity: str | None = option(None, "wandb entity.")
    wandb_dir: str | None = option(None, "wandb folder (default: inside the run folder).")
    group: str | None = option(None, "wandb group, a study's name (default: adhoc).")
    quiet: bool = option(False, "No progress bars.", flags=("--quiet", "-q"))
    # Set by a confirmation study (study.confirm): the study that chose the tuned options.
    chosen_by: dict[str, Any] | None = None
    # Resolved by the trainer: what actually ran.
    dataset_used: str | None = None
    device_used: str | None = None
    scheme_params: dict[str, Any] | None = None
    model_params: dict[str, Any] | None = None
    env: dict[str, Any] = field(default_factory=dict)

    @property
    def effective_data_seed(self) -> int:
        return self.seed if self.data_seed is None else self.data_seed

    def summary_head(self, status: str, dataset: str) -> dict[str, Any]:
        """The fields every summary.json begins with, whoever writes it (the trainer, or a
        sweep recording a run that could not)."""
        return {"status": status, "run_name": self.run_name, "scheme": self.scheme,
                "model": self.model, "seed": self.seed, "data_seed": self.effective_data_seed, "dataset": dataset,
                "epochs": self.epochs}

    @property
    def run_name(self) -> str:
        """``<scheme>-s<seed>`` (``<model>-<scheme>-s<seed>`` for a model but the LeNet), with
        the specs made safe for a folder name."""
        model = "" if self.model == DEFAULT_MODEL else f"{slug(self.model)}-"
        return f"{model}{slug(self.scheme)}-s{self.seed}"

    @property
    def run_id(self) -> str:
        """``<run name>-<8 hex>``: stable for the same result-deciding fields (RESULT_FIELDS)."""
        fields = {f: getattr(self, f) for f in RESULT_FIELDS}
        fields["data_seed"] = self.effective_data_seed  # None and seed are the same run
        if self.model == DEFAULT_MODEL:
            del fields["model"]
        key = json.dumps(fields, sort_keys=True)
        return f"{self.run_name}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"

    @property
    def run_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / self.run_id

    def validate(self) -> None:
        """Raise ConfigError on any option outside its range."""
        checks = [
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}"),
            (self.lr > 0 and math.isfinite(self.lr),
             f"learning rate must be a positive number, got {self.lr}"),
            (self.momentum >= 0, f"momentum must be non-negative, got {self.momentum}"),
            (self.weight_decay >= 0, f"weight decay must be non-negative, got {self.weight_decay}"),
            (self.log_every >= 1, f"log interval must be at least 1, got {self.log_every}"),
            (self.diag_batch >= 0, f"diagnostics batch must be >= 0, got {self.diag_batch}"),
            (self.val_size is None or self.val_size >= 0,
             f"validation size must be >= 0, got {self.val_size}"),
            (self.train_subset is None or self.train_subset >= 1,
             f"train subset must be at least 1, got {self.train_subset}"),
        ] + [(getattr(self, f.name) in f.metadata["choices"] + (None,),
              f"unknown {f.name.replace('_', ' ')} '{getattr(self, f.name)}'; choose from "
              f"{', '.join(f.metadata['choices'])}")
             for f in options() if f.metadata["choices"]]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def slug(spec: str) -> str:
    """A folder-safe form of a spec: ``normal:std=0.01`` -> ``normal-std=0.01``."""
    target, sep, rest = spec.partition(":")
    if target.endswith(".py"):
        target = Path(target).stem  # a file path would nest folders
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "-", target + sep + rest).strip("-")
