"""Comparison reports: from folders of runs to tables with error bars and the figures a
researcher draws. Reads the saved run folders only; never trains.

Runs are grouped into comparisons by their config minus the scheme and the seeds (and with the
dataset actually used): runs that differ in anything else are never pooled, each comparison
gets its own tables and figures.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import os
import statistics
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from .config import RESULT_FIELDS
from .errors import InitStudyError
from .tracking import read_jsonl

# What must be equal for runs to be compared: the result-deciding options but the scheme and
# the seeds, with the dataset actually used in place of the one asked for.
COMPARE_FIELDS = tuple(f for f in RESULT_FIELDS if f not in ("scheme", "seed", "data_seed",
                                                             "dataset")) + ("dataset_used",)
FINISHED = ("ok", "diverged")
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0  # the intervals are the same every time a report is made


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
    def epochs(self) -> list[dict[str, Any]]:
        return [r for r in self.metrics if "epoch" in r]

    @property
    def steps(self) -> list[dict[str, Any]]:
        return [r for r in self.metrics if "epoch" not in r]

    def histograms(self) -> list[dict[str, Any]]:
        path = self.path / "histograms.jsonl"
        return read_jsonl(path) if path.exists() else []

    def diagnostics(self) -> dict[str, Any] | None:
        path = self.path / "init_diagnostics.json"
        return json.loads(path.read_text()) if path.exists() else None


def load_runs(dirs: list[Path]) -> list[Run]:
    """Every run folder (one holding ``config.json``) in ``dirs`` or one level below; the same
    run id met twice is read once."""
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
            config = json.loads((path / "config.json").read_text())
            summary_path = path / "summary.json"
            summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
            metrics_path = path / "metrics.jsonl"
            metrics = read_jsonl(metrics_path) if metrics_path.exists() else []
            runs.append(Run(path, config, summary, metrics))
    if not runs:
        raise InitStudyError(f"no run folders (with config.json) in {', '.join(map(str, dirs))}")
    return runs


@dataclass
class Comparison:
    """Runs that differ only in scheme and seeds."""

    key: dict[str, Any]
    runs: list[Run]

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


def comparisons(runs: list[Run]) -> list[Comparison]:
    groups: dict[str, list[Run]] = defaultdict(list)
    keys = {}
    for run in runs:
        key = {f: run.config.get(f) for f in COMPARE_FIELDS}
        text = json.dumps(key, sort_keys=True)
        keys[text] = key
        groups[text].append(run)
    return [Comparison(keys[k], v) for k, v in groups.items()]


# ---------------------------------------------------------------------------------------------
# Statistics


def bootstrap_ci(values: list[float], seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean, resampling the runs (seeds)."""
    data = np.asarray(values, dtype=float)
    if len(data) < 2:
        return (float(data[0]), float(data[0])) if len(data) else (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), (BOOTSTRAP_RESAMPLES, len(data)))].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def bootstrap_diff_ci(a: list[float], b: list[float],
                      seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """95% bootstrap interval of mean(a) - mean(b), resampling each group's runs."""
    if not a or not b:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    xa, xb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diffs = (xa[rng.integers(0, len(xa), (BOOTSTRAP_RESAMPLES, len(xa)))].mean(1)
             - xb[rng.integers(0, len(xb), (BOOTSTRAP_RESAMPLES, len(xb)))].mean(1))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return float(lo), float(hi)


def prob_beats(a: list[float], b: list[float]) -> float:
    """P(a run of A beats a run of B): over all pairs, wins plus half the ties."""
    if not a or not b:
        return math.nan
    wins = sum((x > y) + 0.5 * (x == y) for x in a for y in b)
    return wins / (len(a) * len(b))


def welch_p(a: list[float], b: list[float]) -> float:
    """Two-sided p-value of Welch's t-test; NaN where it is undefined (fewer than two runs, or
    no variance in either group)."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2 or (statistics.pstdev(a) == 0 and statistics.pstdev(b) == 0):
        return math.nan
    with warnings.catch_warnings():  # one constant group (all at chance) is a valid case
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def epochs_to(run: Run, target: float) -> int | None:
    """The first epoch whose test accuracy reaches ``target``; None if none does."""
    return next((r["epoch"] for r in run.epochs if (r.get("test/acc") or 0) >= target), None)


def _mean(values: list[float]) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.mean(values) if values else math.nan


@dataclass
class SchemeStats:
    scheme: str
    runs: int
    ok: int
    diverged: int
    failed: int
    unfinished: int
    accs: list[float] = field(repr=False)  # final test accuracy of each finished run
    acc_mean: float
    acc_std: float
    acc_ci: tuple[float, float]
    acc_median: float
    acc_best: float
    test_loss: float  # mean over finished runs with a finite loss
    train_loss: float
    epochs_to_target: float  # mean over runs that reached it
    reached: int
    # Against the baseline (NaN for the baseline itself).
    diff: float = math.nan
    diff_ci: tuple[float, float] = (math.nan, math.nan)
    p_beats: float = math.nan
    welch: float = math.nan

    @property
    def success(self) -> float:
        """The fraction of runs that finished without diverging or failing."""
        return self.ok / self.runs if self.runs else math.nan


def scheme_stats(scheme: str, runs: list[Run], target: float) -> SchemeStats:
    finished = [r for r in runs if r.status in FINISHED]
    accs = [r.summary["test/acc"] for r in finished]  # diverged runs count, at their accuracy
    reached = [e for e in (epochs_to(r, target) for r in finished) if e is not None]
    statuses = [r.status for r in runs]
    return SchemeStats(
        scheme=scheme, runs=len(runs), ok=statuses.count("ok"),
        diverged=statuses.count("diverged"), failed=statuses.count("failed"),
        unfinished=sum(s not in (*FINISHED, "failed") for s in statuses), accs=accs,
        acc_mean=statistics.mean(accs) if accs else math.nan,
        acc_std=statistics.stdev(accs) if len(accs) > 1 else math.nan,
        acc_ci=bootstrap_ci(accs), acc_median=statistics.median(accs) if accs else math.nan,
        acc_best=max(accs) if accs else math.nan,
        test_loss=_mean([r.summary.get("test/loss") for r in finished]),
        train_loss=_mean([r.summary.get("train/loss") for r in finished]),
        epochs_to_target=statistics.mean(reached) if reached else math.nan,
        reached=len(reached))


def choose_target(comparison: Comparison) -> float:
    """A target accuracy from the data: 95% of the best scheme's mean final accuracy, rounded
    down to a whole percent, so that the good schemes reach it and the comparison is of speed."""
    means = [statistics.mean(a) for a in (
        [r.summary["test/acc"] for r in runs if r.status in FINISHED]
        for runs in comparison.by_scheme().values()) if a]
    return math.floor(0.95 * max(means) * 100) / 100 if means else math.nan


def compare(comparison: Comparison, baseline: str = "default",
            target: float | None = None) -> tuple[list[SchemeStats], float]:
    """Per-scheme statistics of one comparison, with differences against ``baseline`` (when it
    is present); returns (stats in the runs' scheme order, target used)."""
    target = choose_target(comparison) if target is None else target
    stats = [scheme_stats(s, runs, target)
             for s, runs in comparison.by_scheme(baseline).items()]
    base = next((s for s in stats if s.scheme == baseline), None)
    if base is not None:
        for s in stats:
            if s is not base:
                s.diff = s.acc_mean - base.acc_mean
                s.diff_ci = bootstrap_diff_ci(s.accs, base.accs)
                s.p_beats = prob_beats(s.accs, base.accs)
                s.welch = welch_p(s.accs, base.accs)
    return stats, target


# ---------------------------------------------------------------------------------------------
# Figures


def _layers(comparison: Comparison) -> list[str]:
    for run in comparison.runs:
        names = [k.split("/", 1)[1] for k in (run.epochs[0] if run.epochs else {})
                 if k.startswith("weight_std/")]
        if names:
            return names
    return []


def figures(comparison: Comparison, stats: list[SchemeStats], folder: Path,
            prefix: str = "", baseline: str = "default") -> list[tuple[str, Path]]:
    """Draw every figure of one comparison into ``folder``; returns (caption, path) pairs."""
    from . import plots

    folder.mkdir(parents=True, exist_ok=True)
    groups = comparison.by_scheme(baseline)
    layers = _layers(comparison)
    made = []

    def add(caption: str, path: Path | None) -> None:
        if path is not None:
            made.append((caption, path))

    add("Train loss against step: mean over seeds, band = ±1 std over seeds.",
        plots.mean_curves({s: [[(r["step"], r["train/loss"]) for r in run.steps] for run in runs]
                           for s, runs in groups.items()}, folder / f"{prefix}train_loss.png",
                          "train loss (cross-entropy, log scale)", "step (batches)",
                          "train loss", logy=True))
    add("Test accuracy against epoch (epoch 0 = at init): mean over seeds, band = ±1 std.",
        plots.mean_curves({s: [[(r["epoch"], 100 * r["test/acc"]) for r in run.epochs
                                if r.get("test/acc") is not None] for run in runs]
                           for s, runs in groups.items()}, folder / f"{prefix}test_acc.png",
                          "test accuracy", "epoch", "test accuracy (%)"))
    add("Final test accuracy of every run (dots) and the mean with its 95% bootstrap interval "
        "over seeds (diamond and bar).",
        plots.final_accuracy({s.scheme: s.accs for s in stats},
                             {s.scheme: s.acc_ci for s in stats},
                             folder / f"{prefix}final_acc.png", "final test accuracy per run"))
    if layers:
        add("Per-layer weight std over epochs (mean over seeds).",
            plots.per_layer_lines(_epoch_series(groups, "weight_std", layers), layers,
                                  folder / f"{prefix}weight_std.png", "weight std per layer",
                                  "weight std"))
        add("Relative update per epoch, ||W_end - W_start|| / ||W_start|| (mean over seeds).",
            plots.per_layer_lines(_epoch_series(groups, "rel_update", layers), layers,
                                  folder / f"{prefix}rel_update.png",
                                  "relative weight update per epoch", "relative update"))
        hists = _first_seed_histograms(groups, layers)
        add("Weight histograms (30 bins, as the note's plt.hist) per layer and scheme, at init "
            "(grey) and after training (blue); first seed of each scheme.",
            plots.histogram_grid({s: h["weight"] for s, h in hists.items()}, layers,
                                 folder / f"{prefix}weight_hist.png",
                                 "weights at init and after training"))
        add("Biases value by output unit (as the note's plt.plot), at init (grey) and after "
            "training (blue); first seed of each scheme.",
            plots.bias_grid({s: h["bias"] for s, h in hists.items()}, layers,
                            folder / f"{prefix}biases.png", "biases at init and after training"))
    profiles = _depth_profiles(groups)
    if profiles:
        add("Signal propagation at init: the forward and backward std per layer "
            "(init_diagnostics.json, mean over seeds).",
            plots.depth_profile(profiles, layers, folder / f"{prefix}init_signal.png"))
    return made


def _epoch_series(groups: dict[str, list[Run]], kind: str, layers: list[str]):
    first = 1 if kind == "rel_update" else 0  # nothing has moved at init
    return {scheme: {layer: [[(r["epoch"], r.get(f"{kind}/{layer}")) for r in run.epochs
                              if r.get(f"{kind}/{layer}") is not None and r["epoch"] >= first]
                             for run in runs]
                     for layer in layers}
            for scheme, runs in groups.items()}


def _first_seed_histograms(groups: dict[str, list[Run]], layers: list[str]):
    result = {}
    for scheme, runs in groups.items():
        run = min(runs, key=lambda r: r.config["seed"])
        records = run.histograms()
        last = max((r["epoch"] for r in records), default=0)
        pick = lambda layer, param, epoch: next(
            (r for r in records if (r["layer"], r["param"], r["epoch"]) == (layer, param, epoch)),
            None)
        result[scheme] = {param: {layer: (pick(layer, param, 0), pick(layer, param, last))
                                  for layer in layers} for param in ("weight", "bias")}
    return result


def _depth_profiles(groups: dict[str, list[Run]]) -> dict[str, dict[str, list[float]]]:
    profiles = {}
    for scheme, runs in groups.items():
        reports = [d for d in (r.diagnostics() for r in runs) if d]
        if reports:
            profiles[scheme] = {key: [statistics.mean(rep["layers"][i][key] for rep in reports)
                                      for i in range(len(reports[0]["layers"]))]
                                for key in ("out_std", "grad_out_std")}
    return profiles


# ---------------------------------------------------------------------------------------------
# Rendering


def _pct(value: float) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.2f}"


def _num(value: float, digits: int = 4) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}g}"


def _interval(ci: tuple[float, float]) -> str:
    return "-" if not all(map(math.isfinite, ci)) else f"[{_pct(ci[0])}, {_pct(ci[1])}]"


def _signed_interval(ci: tuple[float, float]) -> str:
    if not all(map(math.isfinite, ci)):
        return "-"
    return f"[{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]"


def main_table(stats: list[SchemeStats], target: float) -> tuple[list[str], list[list[str]]]:
    header = ["scheme", "runs", "ok", "diverged", "failed", "success", "acc mean (%)",
              "acc std", "95% CI", "median", "best", "test loss",
              f"epochs to {_pct(target)}%", "train loss"]
    rows = [[s.scheme, str(s.runs), str(s.ok), str(s.diverged), str(s.failed),
             f"{s.ok}/{s.runs}", _pct(s.acc_mean), _pct(s.acc_std), _interval(s.acc_ci),
             _pct(s.acc_median), _pct(s.acc_best), _num(s.test_loss),
             f"{_num(s.epochs_to_target, 3)} ({s.reached}/{s.ok + s.diverged})",
             _num(s.train_loss)] for s in stats]
    return header, rows


def baseline_table(stats: list[SchemeStats], baseline: str):
    header = ["scheme", f"Δ acc vs {baseline} (points)", "95% CI", f"P(beats {baseline})",
              "Welch p"]
    rows = [[s.scheme, "-" if not math.isfinite(s.diff) else f"{100 * s.diff:+.2f}",
             _signed_interval(s.diff_ci), _num(s.p_beats, 3), _num(s.welch, 3)]
            for s in stats if s.scheme != baseline]
    return header, rows


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def provenance(runs: list[Run]) -> dict[str, Any]:
    """Versions, commits, devices, dates and compute time of the runs."""
    envs = [r.config.get("env", {}) for r in runs]
    values = lambda key: sorted({str(e.get(key)) for e in envs if e.get(key) is not None})
    starts = sorted(e["started_at"] for e in envs if e.get("started_at"))
    commits = sorted({f"{e.get('git_commit')}{' (dirty)' if e.get('git_dirty') else ''}"
                      for e in envs})
    return {
        "runs": len(runs), "first_started": starts[0] if starts else None,
        "last_started": starts[-1] if starts else None,
        "compute_hours": sum(r.summary.get("wall_seconds") or 0 for r in runs) / 3600,
        "initstudy": values("initstudy"), "torch": values("torch"),
        "torchvision": values("torchvision"), "python": values("python"),
        "git_commits": commits, "devices": sorted({f"{r.config.get('device_used')} "
                                                   f"({r.config.get('env', {}).get('device_name')})"
                                                   for r in runs}),
        "hosts": values("hostname"), "datasets": sorted({str(r.config.get("dataset_used"))
                                                         for r in runs}),
    }


def _common_config(comparison: Comparison) -> list[list[str]]:
    return [[k, json.dumps(v)] for k, v in comparison.key.items()]


def results_rows(runs: list[Run]) -> list[dict[str, Any]]:
    """One row per run for results.csv."""
    rows = []
    for run in runs:
        row = {"run": run.path.name, "scheme": run.scheme, "seed": run.config.get("seed"),
               "data_seed": run.summary.get("data_seed"), "status": run.status}
        row |= {k: run.summary.get(k) for k in ("test/acc", "best/test/acc", "test/loss",
                                                 "train/loss", "diverged_step", "steps",
                                                 "wall_seconds", "images_per_second")}
        row |= {f: run.config.get(f) for f in COMPARE_FIELDS}
        row["device"] = run.config.get("device_used")
        row["git_commit"] = run.config.get("env", {}).get("git_commit")
        rows.append(row)
    return rows


def make_report(dirs: list[Path], out: Path, baseline: str = "default",
                target: float | None = None, title: str | None = None) -> Path:
    """Write ``out``/README.md, report.html (self-contained), figures/*.png and results.csv
    from the run folders in ``dirs``; returns the README's path."""
    runs = load_runs(dirs)
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    for old in (out / "figures").glob("*.png"):
        old.unlink()
    title = title or f"Init study: {', '.join(Path(d).name for d in dirs)}"
    groups = comparisons(runs)
    shown = ", ".join(f"`{os.path.relpath(d, out)}`" for d in dirs)  # as seen from the report
    md = [f"# {title}", "",
          f"{len(runs)} runs from {shown}, in {len(groups)} "
          f"comparison(s). Runs are compared only when everything but the scheme and the seeds "
          f"is equal. Accuracies are percent of the test set; intervals are 95% bootstrap "
          f"intervals over seeds ({BOOTSTRAP_RESAMPLES:,} resamples); diverged runs count in the "
          f"means at their final accuracy, failed runs have none and are counted apart.", ""]
    body = [f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(md[2])}</p>"]
    for i, comparison in enumerate(groups, 1):
        stats, used_target = compare(comparison, baseline, target)
        prefix = f"c{i}_" if len(groups) > 1 else ""
        made = figures(comparison, stats, out / "figures", prefix, baseline)
        head = f"Comparison {i}: {comparison.key['dataset_used']}, {comparison.key['epochs']} " \
               f"epochs, {comparison.key['optimizer']} lr {comparison.key['lr']}"
        best = max((s for s in stats if math.isfinite(s.acc_mean)), key=lambda s: s.acc_mean,
                   default=None)
        headline = (f"Best mean final test accuracy: **{best.scheme}**, {_pct(best.acc_mean)}% "
                    f"(95% CI {_interval(best.acc_ci)}, {best.runs} runs)." if best else "")
        sections = [
            ("Per scheme", main_table(stats, used_target),
             f"`epochs to {_pct(used_target)}%`: mean first epoch at which test accuracy "
             f"reaches the target ({'given' if target is not None else 'chosen as 95% of the best mean, rounded down'}), "
             f"over the runs that reach it (count in brackets)."),
            (f"Against {baseline}", baseline_table(stats, baseline),
             "Δ: difference of mean accuracy in percentage points, with its bootstrap interval; "
             f"P(beats {baseline}): probability that a run of the scheme ends above a run of "
             f"{baseline} (ties count half); Welch p: two-sided Welch's t-test."),
            ("Held equal in this comparison", (["option", "value"], _common_config(comparison)),
             ""),
        ]
        md += [f"## {head}", "", headline, ""]
        body += [f"<h2>{html.escape(head)}</h2>", f"<p>{html.escape(headline.replace('**', ''))}</p>"]
        for name, (header, rows), note in sections:
            if name.startswith("Against") and not rows:
                continue
            md += [f"### {name}", "", _md_table(header, rows), "", note, ""]
            body += [f"<h3>{html.escape(name)}</h3>", _html_table(header, rows),
                     f"<p class='note'>{html.escape(note)}</p>"]
        md += ["### Figures", ""]
        body += ["<h3>Figures</h3>"]
        for caption, path in made:
            md += [f"![{caption}](figures/{path.name})", "", f"*{caption}*", ""]
            data = base64.b64encode(path.read_bytes()).decode()
            body += [f"<figure><img alt='{html.escape(caption)}' "
                     f"src='data:image/png;base64,{data}'><figcaption>{html.escape(caption)}"
                     f"</figcaption></figure>"]
    prov = provenance(runs)
    prov_rows = [[k.replace("_", " "), ", ".join(v) if isinstance(v, list) else
                  (f"{v:.2f}" if isinstance(v, float) else str(v))] for k, v in prov.items()]
    md += ["## Provenance", "", _md_table(["what", "value"], prov_rows), ""]
    body += ["<h2>Provenance</h2>", _html_table(["what", "value"], prov_rows)]
    for d in dirs:
        study = Path(d) / "study.toml"
        if study.exists():
            md += [f"Study file (`{os.path.relpath(study, out)}`):", "", "```toml",
                   study.read_text().strip(), "```", ""]
            body += [f"<p>Study file ({html.escape(os.path.relpath(study, out))}):</p>",
                     f"<pre>{html.escape(study.read_text())}</pre>"]
    md += ["Every run's config (options, versions, commit, device) is in its `config.json`; "
           "one row per run is in [results.csv](results.csv).", "",
           f"Generated {datetime.now().astimezone().isoformat(timespec='seconds')} by "
           f"`initstudy report` from the saved run folders (nothing was retrained)."]
    (out / "README.md").write_text("\n".join(md) + "\n")
    (out / "report.html").write_text(_html_page(title, "\n".join(body)))
    rows = results_rows(runs)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out / "README.md"


def _html_page(title: str, body: str) -> str:
    style = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;"
             "padding:0 1em;color:#222}table{border-collapse:collapse;margin:1em 0;"
             "font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}"
             "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
             "img{max-width:100%}figure{margin:1.5em 0}figcaption{font-size:13px;color:#555}"
             ".note{font-size:13px;color:#555}pre{background:#f6f6f6;padding:1em}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{style}</style></head><body>{body}</body></html>\n")
