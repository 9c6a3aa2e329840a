"""Saved runs as a report reads them: run folders, and the comparisons they fall into.

Runs are compared only when everything that decides a result but the scheme, the seeds and the
tuned options is equal, with the dataset actually used and the split sizes actually used, so
runs that differ in anything else are never pooled.
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import DEFAULT_MODEL, RESULT_FIELDS
from .errors import InitStudyError
from .runfolder import FINISHED, read_jsonl

SPLITS = ("train_images", "val_images", "test_images")  # recorded in config.json's env


@dataclass
class Run:
    """One run folder as saved: its config, summary and epoch/step records."""

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]

    @property
    def scheme(self) -> str:
        return self.config["scheme"]

    @property
    def status(self) -> str:
        return self.summary.get("status", "running")

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    @property
    def epochs(self) -> list[dict[str, Any]]:
        return [r for r in self.metrics if "epoch" in r]

    @property
    def steps(self) -> list[dict[str, Any]]:
        return [r for r in self.metrics if "epoch" not in r]

    def final(self, split: str) -> float | None:
        """The final accuracy on ``split`` ("val" or "test"); None where it was not measured."""
        value = self.summary.get(f"{split}/acc")
        return value if isinstance(value, (int, float)) and math.isfinite(value) else None

    def histograms(self) -> list[dict[str, Any]]:
        path = self.path / "histograms.jsonl"
        return read_jsonl(path) if path.exists() else []

    def diagnostics(self) -> dict[str, Any] | None:
        path = self.path / "init_diagnostics.json"
        try:
            return json.loads(path.read_text()) if path.exists() else None
        except ValueError:
            return None


def _read_run(path: Path) -> Run:
    config = json.loads((path / "config.json").read_text())
    if not isinstance(config, dict) or "scheme" not in config:
        raise ValueError("config.json holds no run config")
    summary_path = path / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    metrics_path = path / "metrics.jsonl"
    metrics = read_jsonl(metrics_path) if metrics_path.exists() else []
    return Run(path, config, summary, metrics)


def load_runs(dirs: list[Path], warn=None) -> list[Run]:
    """Every run folder (one holding ``config.json``) in ``dirs`` or one level below; the same
    run id met twice is read once. A folder that cannot be read (a corrupt or half-written
    JSON file) is skipped with one warning naming it."""
    warn = warn or (lambda message: print(message, file=sys.stderr))
    runs, seen = [], set()
    for root in map(Path, dirs):
        if not root.is_dir():
            raise InitStudyError(f"no such runs folder: {root}")
        candidates = [root] if (root / "config.json").exists() else sorted(
            p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        for path in candidates:
            if not (path / "config.json").exists() or path.name in seen:
                continue
            seen.add(path.name)
            try:
                runs.append(_read_run(path))
            except (OSError, ValueError, KeyError) as exc:
                warn(f"WARNING: skipping run folder {path}: cannot be read "
                     f"({type(exc).__name__}: {exc})")
    if not runs:
        raise InitStudyError(f"no run folders (with config.json) in {', '.join(map(str, dirs))}")
    return runs


def _study_files(dirs: list[Path]) -> list[dict[str, Any]]:
    """The study files (``study.toml``, written by the sweep) in ``dirs`` that can be read."""
    import tomllib

    specs = []
    for d in dirs:
        path = Path(d) / "study.toml"
        if path.exists():
            try:
                specs.append(tomllib.loads(path.read_text()))
            except (OSError, tomllib.TOMLDecodeError):
                continue
    return specs


def study_name(dirs: list[Path]) -> str | None:
    """The ``name`` of the first study file in ``dirs`` that has one."""
    return next((spec["name"] for spec in _study_files(dirs) if spec.get("name")), None)


def study_tune(dirs: list[Path]) -> list[str]:
    """The ``tune`` list of the study files in ``dirs``."""
    tune: list[str] = []
    for spec in _study_files(dirs):
        value = spec.get("tune", [])
        tune += [value] if isinstance(value, str) else list(value)
    return list(dict.fromkeys(tune))


def study_margin(dirs: list[Path]) -> float | None:
    """The equivalence ``margin`` (accuracy points) of the study files in ``dirs``, or None;
    InitStudyError when they disagree."""
    margins = {float(m) for m in (spec.get("margin") for spec in _study_files(dirs))
               if isinstance(m, (int, float))}
    if len(margins) > 1:
        raise InitStudyError(f"the study files give different margins ({sorted(margins)}): "
                             f"give one with --margin")
    return margins.pop() if margins else None


def confirmation(runs: list[Run]) -> tuple[str, ...]:
    """The options a confirmation's runs were set to by their tuning study (``chosen_by``),
    or () for runs of no confirmation; InitStudyError when only some runs are confirmations
    (a confirmation's report quotes its own runs only)."""
    records = [r.config.get("chosen_by") for r in runs]
    confirming = [r for r in records if r]
    if confirming and len(confirming) != len(runs):
        raise InitStudyError(f"{len(confirming)} of {len(runs)} runs confirm a tuning study's "
                             f"settings and the rest do not: report a confirmation's runs on "
                             f"their own")
    return tuple(dict.fromkeys(k for r in confirming for k in r.get("options", {})))


@dataclass
class Comparison:
    """Runs that differ only in scheme, seeds and the ``tuned`` options. In a confirmation
    (``confirmed``) the tuned options were set per scheme by a tuning study: nothing is
    chosen."""

    key: dict[str, Any]
    runs: list[Run]
    tuned: tuple[str, ...] = ()
    confirmed: bool = False

    @property
    def chosen_by(self) -> dict[str, dict[str, Any]]:
        """Per scheme, the tuning study's record of its choice (confirmations only)."""
        return {r.scheme: r.config["chosen_by"] for r in self.runs
                if r.config.get("chosen_by")}

    @property
    def schemes(self) -> list[str]:
        return list(dict.fromkeys(r.scheme for r in self.runs))

    def by_scheme(self, first: str = "default") -> dict[str, list[Run]]:
        """Runs by scheme: ``first`` (the baseline) leads, the others follow by name."""
        groups: dict[str, list[Run]] = defaultdict(list)
        for run in sorted(self.runs, key=lambda r: (r.scheme != first, r.scheme,
                                                    r.config.get("seed", 0))):
            groups[run.scheme].append(run)
        return dict(groups)

    def setting(self, run: Run) -> tuple:
        """The run's values of the tuned options."""
        return tuple(run.config.get(f) for f in self.tuned)


def compare_key(run: Run, tuned: tuple[str, ...] = ()) -> dict[str, Any]:
    """What must be equal for runs to be compared: the result-deciding options but the scheme,
    the seeds and the tuned ones, with the dataset and split sizes actually used."""
    skip = {"scheme", "seed", "data_seed", "dataset", *tuned}
    key = {f: run.config.get(f) for f in RESULT_FIELDS if f not in skip}
    if "model" in key:  # runs made before models were a choice trained the LeNet
        key["model"] = key["model"] or DEFAULT_MODEL
    key["dataset_used"] = run.config.get("dataset_used")
    env = run.config.get("env") or {}
    key |= {s: env.get(s) for s in SPLITS}
    return key


def comparisons(runs: list[Run], tuned: tuple[str, ...] = (),
                confirmed: bool = False) -> list[Comparison]:
    groups: dict[str, list[Run]] = defaultdict(list)
    keys = {}
    for run in runs:
        key = compare_key(run, tuned)
        text = json.dumps(key, sort_keys=True)
        keys[text] = key
        groups[text].append(run)
    return [Comparison(keys[k], v, tuned, confirmed) for k, v in groups.items()]
