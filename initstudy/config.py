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
RESULT_FIELDS = ("scheme", "seed", "data_seed", "dataset", "val_size", "train_subset",
                 "subset_seed", "epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay", "loss",
                 "precision")
# What runs trained together as one pack must share: all but the scheme and the seeds.
PACK_FIELDS = tuple(f for f in RESULT_FIELDS if f not in ("scheme", "seed", "data_seed")) + (
    "data_dir", "strict_data", "device", "log_every", "diag_batch", "compile")
PRECISIONS = ("fp32", "tf32", "bf16")
# What a study may tune per scheme (a report chooses their values on the validation split).
TUNABLE = tuple(f for f in RESULT_FIELDS if f not in ("scheme", "seed", "data_seed"))


def check_tune(tune: list[str]) -> list[str]:
    """``tune`` if every name is a tunable run option, else ConfigError listing them."""
    bad = [t for t in tune if t not in TUNABLE]
    if bad:
        raise ConfigError(f"cannot tune {', '.join(map(str, bad))}; tunable options: "
                          f"{', '.join(TUNABLE)}")
    return list(tune)


@dataclass
class RunConfig:
    """Everything that decides a run. Fields after ``quiet`` are filled in by the trainer and
    record what actually ran (dataset after any fallback, device, versions, git commit).

    Defaults (SGD, lr 0.01, momentum 0.9, batch 128, 10 epochs): the textbook setting, stable
    under PyTorch's default, xavier, kaiming and orthogonal inits; plain SGD keeps the effect of
    the init visible, where Adam's per-parameter step sizes hide the weights' scale (README).
    """

    scheme: str = "default"  # a spec string, see initstudy.schemes
    seed: int = 0  # init seed; also the data seed unless data_seed is given
    data_seed: int | None = None  # batch order and dropout; None means "same as seed"
    dataset: str = "mnist"  # asked for; see dataset_used
    data_dir: str | None = None
    strict_data: bool = False  # refuse the mnist-sample fallback
    val_size: int | None = None  # training images held out for validation; None: a twelfth
    train_subset: int | None = None  # stratified subset of the rest of the training set
    subset_seed: int = 0  # fixed by default, so every run of a study sees the same subset
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.0
    loss: str = "ce"  # "ce": cross-entropy from logits; "prob-ce": CrossEntropyLoss on softmax
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    log_every: int = 50  # steps between train/loss records
    diag_batch: int = 256  # images for the init diagnostics (a fixed seeded batch); 0: none
    precision: str = "fp32"  # fp32 | tf32 (CUDA matmuls and convs) | bf16 (autocast)
    compile: bool = False  # torch.compile the forward passes
    out: str | None = None  # run folder; None means runs/<run name>
    wandb: str | None = None  # offline | online | disabled; None: $WANDB_MODE, else offline
    wandb_project: str = "initstudy"
    wandb_entity: str | None = None
    wandb_dir: str | None = None  # None: inside the run folder
    group: str | None = None  # the study's name; None: "adhoc"
    quiet: bool = False
    # Resolved by the trainer.
    dataset_used: str | None = None
    device_used: str | None = None
    scheme_params: dict[str, Any] | None = None
    env: dict[str, Any] = field(default_factory=dict)

    @property
    def effective_data_seed(self) -> int:
        return self.seed if self.data_seed is None else self.data_seed

    @property
    def run_name(self) -> str:
        """``<scheme>-s<seed>``, with the spec made safe for a folder name."""
        return f"{slug(self.scheme)}-s{self.seed}"

    @property
    def run_id(self) -> str:
        """``<run name>-<8 hex>``: stable for the same result-deciding fields (RESULT_FIELDS)."""
        fields = {f: getattr(self, f) for f in RESULT_FIELDS}
        fields["data_seed"] = self.effective_data_seed  # None and seed are the same run
        key = json.dumps(fields, sort_keys=True)
        return f"{self.run_name}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"

    @property
    def run_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / self.run_name

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
            (self.optimizer in OPTIMIZERS,
             f"unknown optimizer '{self.optimizer}'; choose from {', '.join(OPTIMIZERS)}"),
            (self.loss in LOSSES, f"unknown loss '{self.loss}'; choose from {', '.join(LOSSES)}"),
            (self.dataset in DATASETS,
             f"unknown dataset '{self.dataset}'; choose from {', '.join(DATASETS)}"),
            (self.precision in PRECISIONS,
             f"unknown precision '{self.precision}'; choose from {', '.join(PRECISIONS)}"),
        ]
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
    """A folder-safe form of a scheme spec: ``normal:std=0.01`` -> ``normal-std=0.01``."""
    target, sep, rest = spec.partition(":")
    if target.endswith(".py"):
        target = Path(target).stem  # a file path would nest folders
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "-", target + sep + rest).strip("-")
