"""Comparison reports: from folders of runs to tables with error bars and the figures a
researcher draws. Reads the saved run folders only; never trains.

Each comparison (``results.comparisons``) is analysed on its own. With tuned options
(``--tune lr``), each scheme is shown at the setting chosen on the validation split
(``tuning.select``); every test number quoted is that of the runs at the chosen setting, and no
choice reads a test number. p-values against the baseline are Holm-adjusted over the schemes
compared.
"""

from __future__ import annotations

import csv
import math
import os
import statistics
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .config import check_tune
from .figures import figures, split_name
from .render import Section, interval, num, pct, signed_interval, to_html, to_markdown
from .results import Comparison, Run, compare_key, comparisons, load_runs, study_tune
from .stats import (BOOTSTRAP_RESAMPLES, bootstrap_ci, bootstrap_diff_ci, holm, prob_beats,
                    welch_p)
from .tuning import STABLE_WITHIN, Selection, describe_values, select


def _mean(values: list[float | None]) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.mean(values) if values else math.nan


@dataclass
class SchemeStats:
    """One scheme at its chosen setting: final test accuracy over seeds and the rest."""

    scheme: str
    setting: str  # the chosen values of the tuned options ("" when nothing is tuned)
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
    val_mean: float  # final validation accuracy, mean over finished runs
    val_ci: tuple[float, float]
    test_loss: float  # mean over finished runs with a finite loss
    train_loss: float
    epochs_to_target: float  # mean over runs that reached it
    reached: int
    # Against the baseline (NaN for the baseline itself).
    diff: float = math.nan
    diff_ci: tuple[float, float] = (math.nan, math.nan)
    p_beats: float = math.nan
    welch: float = math.nan
    welch_holm: float = math.nan

    @property
    def success(self) -> float:
        """The fraction of runs that finished without diverging or failing."""
        return self.ok / self.runs if self.runs else math.nan


@dataclass
class Analysis:
    """What a report says about one comparison."""

    comparison: Comparison
    selections: list[Selection]
    stats: list[SchemeStats]
    target: float
    split: str  # the split the target and "epochs to target" are measured on

    @property
    def best(self) -> SchemeStats | None:
        """The scheme with the highest mean final accuracy on the selection split (validation
        where the runs have it): the winner is never picked on the test set."""
        key = (lambda s: s.val_mean) if self.split == "val" else (lambda s: s.acc_mean)
        scored = [s for s in self.stats if math.isfinite(key(s))]
        return max(scored, key=key) if scored else None


def epochs_to(run: Run, target: float, split: str) -> int | None:
    """The first epoch whose accuracy on ``split`` reaches ``target``; None if none does."""
    return next((r["epoch"] for r in run.epochs if (r.get(f"{split}/acc") or 0) >= target),
                None)


def selection_split(runs: list[Run]) -> str:
    """"val" when every finished run measured validation accuracy, else "test" (runs made
    before validation splits existed, or with --val-size 0)."""
    finished = [r for r in runs if r.finished]
    return "val" if finished and all(r.final("val") is not None for r in finished) else "test"


def choose_target(selections: list[Selection], split: str) -> float:
    """A target accuracy from the data: 95% of the best scheme's mean final accuracy on
    ``split``, rounded down to a whole percent, so that the good schemes reach it and the
    comparison is of speed."""
    means = [_mean([r.final(split) for r in sel.runs if r.finished]) for sel in selections]
    means = [m for m in means if math.isfinite(m)]
    return math.floor(0.95 * max(means) * 100) / 100 if means else math.nan


def scheme_stats(comparison: Comparison, selection: Selection, target: float,
                 split: str) -> SchemeStats:
    runs = selection.runs
    finished = [r for r in runs if r.finished]
    accs = [a for a in (r.final("test") for r in finished) if a is not None]
    vals = [a for a in (r.final("val") for r in finished) if a is not None]
    reached = [e for e in (epochs_to(r, target, split) for r in finished) if e is not None]
    statuses = [r.status for r in runs]
    return SchemeStats(
        scheme=selection.scheme, setting=describe_values(comparison, selection.best.values),
        runs=len(runs), ok=statuses.count("ok"), diverged=statuses.count("diverged"),
        failed=statuses.count("failed"),
        unfinished=sum(not r.finished and r.status != "failed" for r in runs), accs=accs,
        acc_mean=statistics.mean(accs) if accs else math.nan,
        acc_std=statistics.stdev(accs) if len(accs) > 1 else math.nan,
        acc_ci=bootstrap_ci(accs), acc_median=statistics.median(accs) if accs else math.nan,
        acc_best=max(accs) if accs else math.nan,
        val_mean=statistics.mean(vals) if vals else math.nan, val_ci=bootstrap_ci(vals),
        test_loss=_mean([r.summary.get("test/loss") for r in finished]),
        train_loss=_mean([r.summary.get("train/loss") for r in finished]),
        epochs_to_target=statistics.mean(reached) if reached else math.nan,
        reached=len(reached))


def compare(comparison: Comparison, baseline: str = "default",
            target: float | None = None) -> Analysis:
    """Each scheme at its chosen setting, with differences against ``baseline`` at the
    baseline's own chosen setting (when it is present), p-values Holm-adjusted."""
    selections = select(comparison, baseline)
    split = selection_split(comparison.runs)
    target = choose_target(selections, split) if target is None else target
    stats = [scheme_stats(comparison, sel, target, split) for sel in selections]
    base = next((s for s in stats if s.scheme == baseline), None)
    if base is not None:
        others = [s for s in stats if s is not base]
        for s in others:
            s.diff = s.acc_mean - base.acc_mean
            s.diff_ci = bootstrap_diff_ci(s.accs, base.accs)
            s.p_beats = prob_beats(s.accs, base.accs)
            s.welch = welch_p(s.accs, base.accs)
        for s, adjusted in zip(others, holm([s.welch for s in others])):
            s.welch_holm = adjusted
    return Analysis(comparison, selections, stats, target, split)


# ---------------------------------------------------------------------------------------------
# Tables


def main_table(analysis: Analysis) -> tuple[list[str], list[list[str]]]:
    tuned = bool(analysis.comparison.tuned)
    split = "val" if analysis.split == "val" else "test"
    header = (["scheme"] + (["chosen on validation"] if tuned else []) +
              ["runs", "ok", "diverged", "failed", "success", "val acc (%)", "test acc (%)",
               "test std", "test 95% CI", "test median", "test best", "test loss",
               f"epochs to {pct(analysis.target)}% {split}", "train loss"])
    rows = [[s.scheme] + ([s.setting] if tuned else []) +
            [str(s.runs), str(s.ok), str(s.diverged), str(s.failed), f"{s.ok}/{s.runs}",
             pct(s.val_mean), pct(s.acc_mean), pct(s.acc_std), interval(s.acc_ci),
             pct(s.acc_median), pct(s.acc_best), num(s.test_loss),
             f"{num(s.epochs_to_target, 3)} ({s.reached}/{s.ok + s.diverged})",
             num(s.train_loss)] for s in analysis.stats]
    return header, rows


def baseline_table(analysis: Analysis, baseline: str):
    header = ["scheme", f"Δ test acc vs {baseline} (points)", "95% CI", f"P(beats {baseline})",
              "Welch p", "Holm-adjusted p"]
    rows = [[s.scheme, "-" if not math.isfinite(s.diff) else f"{100 * s.diff:+.2f}",
             signed_interval(s.diff_ci), num(s.p_beats, 3), num(s.welch, 3),
             num(s.welch_holm, 3)]
            for s in analysis.stats if s.scheme != baseline]
    return header, rows


def tuning_tables(analysis: Analysis) -> list[Section]:
    """The grid (validation accuracy of every setting) and each scheme's stable range."""
    comparison = analysis.comparison
    values = sorted({s.values for sel in analysis.selections for s in sel.settings},
                    key=lambda v: [(0, x, "") if isinstance(x, (int, float)) else (1, 0, str(x))
                                   for x in v])
    label = lambda v: describe_values(comparison, v).replace(", ", " ")
    grid_rows = []
    for sel in analysis.selections:
        cells = {s.values: s for s in sel.settings}
        row = [sel.scheme]
        for v in values:
            s = cells.get(v)
            row.append("" if s is None else
                       f"{pct(s.val_mean)}{' *' if s is sel.best else ''}"
                       f"{f' ({s.diverged}/{len(s.runs)} div)' if s.diverged else ''}")
        grid_rows.append(row)
    stable_rows = []
    for sel in analysis.selections:
        stable = ", ".join(describe_values(comparison, s.values) for s in sel.stable) or "none"
        note = (f"best at the {sel.edge} value tried: extend the grid "
                f"{'down' if sel.edge == 'lowest' else 'up'}" if sel.edge else "")
        stable_rows.append([sel.scheme, describe_values(comparison, sel.best.values),
                            pct(sel.best.val_mean), interval(sel.best.val_ci), stable,
                            f"{len(sel.stable)}/{len(sel.settings)}", note])
    return [
        Section("h3", "Validation accuracy over the grid"),
        Section("table", "Mean final validation accuracy (%) over seeds at each setting; * the "
                "setting chosen for the scheme (highest mean; diverged runs count at their "
                "accuracy); (k/n div): k of n seeds diverged.",
                ["scheme"] + [label(v) for v in values], grid_rows),
        Section("h3", "Chosen setting and stable range"),
        Section("table", f"Stable range: the settings at which every seed trained without "
                f"diverging and the mean validation accuracy is within {100 * STABLE_WITHIN:g} "
                f"point of the scheme's best. Chosen and stable settings are read off the "
                f"validation split only.",
                ["scheme", "chosen", "val acc (%)", "95% CI", "stable range", "stable / tried",
                 "note"], stable_rows),
    ]


def provenance(runs: list[Run]) -> dict[str, Any]:
    """Versions, commits, devices, data, dates and compute time of the runs."""
    envs = [r.config.get("env") or {} for r in runs]
    values = lambda key: sorted({str(e.get(key)) for e in envs if e.get(key) is not None})
    starts = sorted(e["started_at"] for e in envs if e.get("started_at"))
    commits = sorted({f"{e.get('git_commit')}{' (dirty)' if e.get('git_dirty') else ''}"
                      for e in envs})
    official = {e.get("data_official") for e in envs}
    return {
        "runs": len(runs), "first_started": starts[0] if starts else None,
        "last_started": starts[-1] if starts else None,
        "compute_hours": sum(r.summary.get("wall_seconds") or 0 for r in runs) / 3600,
        "initstudy": values("initstudy"), "torch": values("torch"),
        "torchvision": values("torchvision"), "python": values("python"),
        "git_commits": commits, "devices": sorted({f"{r.config.get('device_used')} "
                                                   f"({(r.config.get('env') or {}).get('device_name')})"
                                                   for r in runs}),
        "hosts": values("hostname"), "datasets": sorted({str(r.config.get("dataset_used"))
                                                         for r in runs}),
        "data_sources": values("data_source"),
        "official_data_sha256": ", ".join(sorted({"verified" if o else "no" if o is False
                                                  else "not recorded" for o in official})),
    }


def results_rows(runs: list[Run]) -> list[dict[str, Any]]:
    """One row per run for results.csv."""
    rows = []
    for run in runs:
        row = {"run": run.path.name, "scheme": run.scheme, "seed": run.config.get("seed"),
               "data_seed": run.summary.get("data_seed"), "status": run.status}
        row |= {k: run.summary.get(k) for k in (
            "val/acc", "test/acc", "best_epoch", "best/val/acc", "best/test/acc", "test/loss",
            "train/loss", "diverged_step", "steps", "wall_seconds", "images_per_second")}
        row |= {"lr": run.config.get("lr")} | compare_key(run)
        row["device"] = run.config.get("device_used")
        row["git_commit"] = (run.config.get("env") or {}).get("git_commit")
        rows.append(row)
    return rows


def _comparison_sections(analysis: Analysis, index: int, prefix: str, folder: Path,
                         baseline: str, given_target: bool) -> list[Section]:
    comparison = analysis.comparison
    key = comparison.key
    head = (f"Comparison {index}: {key['dataset_used']}, {key['epochs']} epochs, "
            f"{key['optimizer']} " + (f"at each scheme's best {', '.join(comparison.tuned)} "
                                      f"(chosen on validation)" if comparison.tuned
                                      else f"lr {key['lr']}"))
    best = analysis.best
    on = "validation" if analysis.split == "val" else "test"
    headline = (f"Highest mean final {on} accuracy: **{best.scheme}**"
                f"{' at ' + best.setting if best.setting else ''}, test accuracy "
                f"{pct(best.acc_mean)}% (95% CI {interval(best.acc_ci)}, n = {len(best.accs)} "
                f"runs)." if best else "")
    split = "validation" if analysis.split == "val" else "test"
    sections = [Section("h2", head), Section("text", headline)]
    devices = sorted({f"{(r.config.get('device_used') or '?').split(':')[0]} "
                      f"({(r.config.get('env') or {}).get('device_name')})"
                      for r in comparison.runs})
    if len(devices) > 1:
        sections.append(Section("text", f"**Mixed devices:** this comparison's runs ran on "
                                f"{', '.join(devices)}. Runs on different device types or "
                                f"models are not bit-identical (docs/records.md); "
                                f"their seeds differ by float rounding as well as by chance."))
    if analysis.split == "test":
        sections.append(Section("text", "These runs have no validation split (made before "
                                "runs had one, or with --val-size 0): the best scheme and the "
                                "target below are read off the test split, so they describe "
                                "these runs and select nothing."))
    if comparison.tuned:
        sections += tuning_tables(analysis)
    sections += [
        Section("h3", "Per scheme" + (" at its chosen setting" if comparison.tuned else "")),
        Section("table", f"val acc: final accuracy on the {split_name(analysis, 'val')} ('-': "
                f"no validation split); test "
                f"acc: final accuracy on the {split_name(analysis, 'test')} (mean, std, 95% "
                f"bootstrap interval, median and best over seeds). `epochs to "
                f"{pct(analysis.target)}% {analysis.split}`: mean first epoch at which the "
                f"{split} accuracy reaches the target ("
                f"{'given' if given_target else f'95% of the best {split} mean, rounded down'}),"
                f" over the runs that reach it (count in brackets).", *main_table(analysis)),
    ]
    header, rows = baseline_table(analysis, baseline)
    if rows:
        sections += [Section("h3", f"Against {baseline}"), Section(
            "table", f"Δ: difference of mean final test accuracy in percentage points, with "
            f"its bootstrap interval{', each scheme and ' + baseline + ' at their own chosen settings' if comparison.tuned else ''}; "
            f"P(beats {baseline}): probability that a run of the scheme ends above a run of "
            f"{baseline} (ties count half); Welch p: two-sided Welch's t-test; Holm-adjusted "
            f"p: Welch p adjusted by Holm's method for the {len(rows)} schemes compared with "
            f"{baseline}.", header, rows)]
    sections += [Section("h3", "Held equal in this comparison"),
                 Section("table", "", ["option", "value"],
                         [[k, str(v)] for k, v in key.items()]),
                 Section("h3", "Figures")]
    sections += [Section("figure", caption, path=path)
                 for caption, path in figures(analysis, folder, prefix)]
    return sections


def make_report(dirs: list[Path], out: Path, baseline: str = "default",
                target: float | None = None, title: str | None = None,
                tune: list[str] | None = None) -> Path:
    """Write ``out``/README.md, report.html (self-contained), figures/*.png and results.csv
    from the run folders in ``dirs``; returns the README's path. ``tune``: options chosen per
    scheme on validation (default: the ``tune`` of the study files in ``dirs``)."""
    runs = load_runs(dirs)
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    for old in (out / "figures").glob("*.png"):
        old.unlink()
    tuned = tuple(check_tune(study_tune(dirs) if tune is None else tune))
    title = title or f"Init study: {', '.join(Path(d).name for d in dirs)}"
    groups = comparisons(runs, tuned)
    shown = ", ".join(f"`{os.path.relpath(d, out)}`" for d in dirs)  # as seen from the report
    intro = (f"{len(runs)} runs from {shown}, in {len(groups)} comparison(s). Runs are compared "
             f"only when everything but the scheme"
             f"{', the seeds and the tuned ' + ', '.join(tuned) if tuned else ' and the seeds'}"
             f" is equal. Accuracies are "
             f"percent of the split named; intervals are 95% bootstrap intervals over seeds "
             f"({BOOTSTRAP_RESAMPLES:,} resamples); diverged runs count in the means at their "
             f"final accuracy, failed runs have none and are counted apart."
             + (" Each scheme's setting is chosen on the validation split (highest mean final "
                "validation accuracy over seeds); the test split is only reported." if tuned
                else ""))
    unfinished = [r for r in runs if not r.finished and r.status != "failed"]
    if unfinished:
        intro += (f" **{len(unfinished)} run(s) had not finished** when this report was made "
                  f"(status running or interrupted); they count as unfinished.")
    sections = [Section("h1", title), Section("text", intro)]
    for i, comparison in enumerate(groups, 1):
        prefix = f"c{i}_" if len(groups) > 1 else ""
        analysis = compare(comparison, baseline, target)
        sections += _comparison_sections(analysis, i, prefix, out / "figures", baseline,
                                         target is not None)
    prov = provenance(runs)
    sections += [Section("h2", "Provenance"), Section(
        "table", "", ["what", "value"],
        [[k.replace("_", " "), ", ".join(v) if isinstance(v, list) else
          (f"{v:.2f}" if isinstance(v, float) else str(v))] for k, v in prov.items()])]
    for d in dirs:
        study = Path(d) / "study.toml"
        if study.exists():
            sections += [Section("text", f"Study file (`{os.path.relpath(study, out)}`):"),
                         Section("code", study.read_text())]
    sections += [
        Section("text", "Every run's config (options, versions, commit, device, data source) is "
                "in its `config.json`; one row per run is in [results.csv](results.csv)."),
        Section("text", f"Generated {datetime.now().astimezone().isoformat(timespec='seconds')}"
                f" by `initstudy report` from the saved run folders (nothing was retrained).")]
    (out / "README.md").write_text(to_markdown(sections, out))
    (out / "report.html").write_text(to_html(sections, title))
    rows = results_rows(runs)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    return out / "README.md"
