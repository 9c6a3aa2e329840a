"""Comparison reports: from folders of runs to tables with error bars and the figures a
researcher draws. Reads the saved run folders only; never trains.

Each comparison (``results.comparisons``) is analysed on its own (``analysis.compare``): with
tuned options (``--tune lr``), each scheme at the setting chosen on the validation split; every
test number quoted is that of the runs at the chosen setting, and no choice reads a test number.
p-values against the baseline are Holm-adjusted over the schemes compared. A study's axes
(``axes``: depth, say) get tables and figures of their own, before the comparisons.
"""

from __future__ import annotations

import csv
import math
import os
from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

from .analysis import Analysis, compare
from .axes import Axis, axis_order, find_axes, schemes_of
from .config import DEFAULT_MODEL, check_margin, check_tune
from .dashboard import log_report
from .errors import InitStudyError
from .figures import axis_figures, figures, split_name
from .render import Section, count, interval, num, pct, signed_interval, to_html, to_markdown
from .results import (Run, compare_key, comparisons, confirmation, load_runs, study_margin,
                      study_name, study_tune)
from .stats import LEVEL
from .tuning import STABLE_WITHIN, describe_values
from .wandbenv import check_wandb_online


def _device(config: dict) -> str:
    """Where a run computed, as far as its record says: the device type and name, and on a CPU
    its vector unit and the LeNet's path (each computes in its own order: docs/records.md)."""
    env = config.get("env") or {}
    detail = [env.get("device_name")] + [env.get(key) for key in ("cpu_capability", "cpu_path")
                                         if env.get(key)]
    return f"{(config.get('device_used') or '?').split(':')[0]} ({', '.join(map(str, detail))})"


def _devices(runs: list[Run]) -> list[str]:
    """Each device the runs computed on, with how many runs of each scheme it trained: whether
    a device is spread evenly over the schemes or stands in for one of them."""
    by_device: dict[str, Counter] = defaultdict(Counter)
    for run in runs:
        by_device[_device(run.config)][run.scheme] += 1
    return [f"{device}: {count(n.total(), 'run')} ("
            + ", ".join(f"{scheme} {k}" for scheme, k in sorted(n.items())) + ")"
            for device, n in sorted(by_device.items())]


def main_table(analysis: Analysis) -> tuple[list[str], list[list[str]]]:
    tuned = bool(analysis.comparison.tuned)
    split = "val" if analysis.split == "val" else "test"
    chosen = "set by its tuning study" if analysis.comparison.confirmed else "chosen on validation"
    header = (["scheme"] + ([chosen] if tuned else []) +
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
    header = ["scheme", "verdict", f"Δ test acc vs {baseline} (points)", "Welch 95% CI",
              "n", f"P(beats {baseline})", "Welch p", "Holm p", "TOST p", "TOST Holm p",
              "detectable Δ (points)", f"n for ±{100 * analysis.margin:.2g}"]
    rows = [[s.scheme, s.verdict or "-",
             "-" if not math.isfinite(s.diff) else f"{100 * s.diff:+.2f}",
             signed_interval(s.diff_ci), f"{len(s.accs)} vs {len(base.accs)}",
             num(s.p_beats, 3), num(s.welch, 3), num(s.welch_holm, 3), num(s.tost, 3),
             num(s.tost_holm, 3), "-" if not math.isfinite(s.detectable) else
             f"{100 * s.detectable:.2f}", "-" if s.n_needed is None else str(s.n_needed)]
            for base in [s for s in analysis.stats if s.scheme == baseline]
            for s in analysis.stats if s is not base]
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


def confirmation_tables(analysis: Analysis) -> list[Section]:
    """Where a confirmation's settings came from: the tuning study, its split, epochs and
    seeds, against this comparison's own."""
    comparison = analysis.comparison
    records = comparison.chosen_by
    rows = [[s.scheme, s.setting, str(r.get("study")), str(r.get("on")), str(r.get("epochs")),
             ", ".join(map(str, r.get("seeds") or [])),
             f"{pct(r.get('val_acc'))} (n = {r.get('n')})"]
            for s in analysis.stats for r in [records.get(s.scheme, {})]]
    seeds = sorted({r.config.get("seed") for r in comparison.runs})
    studies = sorted({str(r.get("study")) for r in records.values()})
    epochs = " or ".join(count(e, "epoch")
                         for e in sorted({r.get("epochs") for r in records.values()}, key=str))
    return [Section("h3", "Settings confirmed"), Section(
        "text", f"A confirmation: each scheme's {', '.join(comparison.tuned)} was chosen on "
        f"validation by {', '.join(studies)} at {epochs}; these runs train "
        f"{count(comparison.key.get('epochs'), 'epoch')} at seeds {seeds[0]} to {seeds[-1]}, "
        f"none of which that study used. This report chooses nothing and quotes only its own "
        f"runs."),
        Section("table", "", ["scheme", "setting", "chosen by", "on", "at epochs",
                              "tuning seeds", "its val acc (%)"], rows)]


def axis_sections(axis: Axis, folder: Path, baseline: str) -> list[Section]:
    """Along one axis of the study: a table per panel and the figures."""
    first = next(iter(axis.panels.values()))[0].comparison
    chosen = (f"at its {', '.join(first.tuned)} chosen on validation (in brackets)"
              if first.tuned else "")
    sections = [Section("h2", f"Along {axis.name}"), Section(
        "text", f"The comparisons below differ in {axis.name}"
        f"{' (and in what labels each table)' if len(axis.panels) > 1 else ''}; here each "
        f"scheme {chosen}, its mean final validation accuracy (%) over seeds with the 95% "
        f"Student-t interval; (k/n div): k of its n seeds diverged. Nothing here reads a test "
        f"number.")]
    for label, points in axis.panels.items():
        rows = []
        for scheme in schemes_of(axis, baseline):
            row = [scheme]
            for point in points:
                sel = next((s for s in point.selections if s.scheme == scheme), None)
                best = sel.best if sel else None
                row.append("" if best is None else
                           f"{pct(best.val_mean)} {interval(best.val_ci)}"
                           f"{f' ({describe_values(point.comparison, best.values)})' if first.tuned else ''}"
                           f"{f' ({best.diverged}/{len(best.runs)} div)' if best.diverged else ''}")
            rows.append(row)
        if label:
            sections.append(Section("h3", label))
        sections.append(Section("table", "", ["scheme"] + [f"{axis.name}={p.value:g}"
                                                           for p in points], rows))
    sections += [Section("figure", caption, path=path)
                 for caption, path in axis_figures(axis, folder, baseline)]
    return sections


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
        "git_commits": commits, "devices": sorted({_device(r.config) for r in runs}),
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
    model = key.get("model") or DEFAULT_MODEL
    options = ", ".join(comparison.tuned)
    head = (f"Comparison {index}: {'' if model == DEFAULT_MODEL else model + ', '}"
            f"{key['dataset_used']}, {count(key['epochs'], 'epoch')}, "
            f"{key.get('precision') or 'fp32'}, {key['optimizer']} " + (
                f"at each scheme's {options} chosen by its tuning study" if comparison.confirmed
                else f"at each scheme's best {options} (chosen on validation)" if comparison.tuned
                else f"lr {key['lr']}"))
    best = analysis.best
    on = "validation" if analysis.split == "val" else "test"
    headline = (f"Highest mean final {on} accuracy: **{best.scheme}**"
                f"{' at ' + best.setting if best.setting else ''}, test accuracy "
                f"{pct(best.acc_mean)}% (95% CI {interval(best.acc_ci)}, n = {len(best.accs)} "
                f"runs)." if best and not comparison.confirmed else "")
    split = "validation" if analysis.split == "val" else "test"
    sections = [Section("h2", head), Section("text", headline)]
    devices = _devices(comparison.runs)
    if len(devices) > 1:
        sections.append(Section("text", f"**Mixed devices:** this comparison's runs ran on "
                                f"{'; '.join(devices)}. Runs on different devices, CPU "
                                f"vector units or CPU paths are not bit-identical "
                                f"(docs/records.md); "
                                f"their seeds differ by float rounding as well as by chance."))
    if analysis.split == "test":
        sections.append(Section("text", "These runs have no validation split (made before "
                                "runs had one, or with --val-size 0): the best scheme and the "
                                "target below are read off the test split, so they describe "
                                "these runs and select nothing."))
    if comparison.confirmed:
        sections += confirmation_tables(analysis)
    elif comparison.tuned:
        sections += tuning_tables(analysis)
    sections += [
        Section("h3", "Per scheme" + (" at its chosen setting" if comparison.tuned else "")),
        Section("table", f"val acc: final accuracy on the {split_name(analysis, 'val')} ('-': "
                f"no validation split); test "
                f"acc: final accuracy on the {split_name(analysis, 'test')} (mean, std, 95% "
                f"Student-t interval, median and best over seeds). `epochs to "
                f"{pct(analysis.target)}% {analysis.split}`: mean first epoch at which the "
                f"{split} accuracy reaches the target ("
                f"{'given' if given_target else f'95% of the best {split} mean, rounded down'}),"
                f" over the runs that reach it (count in brackets).", *main_table(analysis)),
    ]
    header, rows = baseline_table(analysis, baseline)
    if rows:
        sections += [Section("h3", f"Against {baseline}"), Section(
            "table", f"Δ: difference of mean final test accuracy in percentage points"
            f"{', each scheme and ' + baseline + ' at their own chosen settings' if comparison.tuned else ''}"
            f", with Welch's {LEVEL:.0%} interval; n: runs of the scheme vs {baseline}; "
            f"P(beats {baseline}): probability that a run of the scheme ends above a run of "
            f"{baseline} (ties count half); Welch p: two-sided Welch's t-test; TOST p: two "
            f"one-sided Welch tests that Δ lies within ±{100 * analysis.margin:.2g} points (the "
            f"equivalence margin); Holm p: each adjusted by Holm's method over the {len(rows)} "
            f"schemes compared. Verdict at {1 - LEVEL:.2g}: better or worse when Welch's Holm p "
            f"is below it, equivalent when TOST's Holm p is, else inconclusive. Detectable Δ: "
            f"the smallest difference this design detects with 80% power (two-sided Welch at "
            f"{analysis.power_alpha:.2g}, Holm's first step, at the observed spreads and n); "
            f"n for ±{100 * analysis.margin:.2g}: runs per scheme that would detect a difference "
            f"of the margin at the same power (docs/statistics.md).", header, rows)]
    sections += [Section("h3", "Held equal in this comparison"),
                 Section("table", "", ["option", "value"],
                         [[k, str(v)] for k, v in key.items()]),
                 Section("h3", "Figures")]
    sections += [Section("figure", caption, path=path)
                 for caption, path in figures(analysis, folder, prefix)]
    return sections


def make_report(dirs: list[Path], out: Path, baseline: str = "default",
                target: float | None = None, title: str | None = None,
                tune: list[str] | None = None, margin: float | None = None,
                wandb: str | None = None) -> Path:
    """Write ``out``/README.md, report.html (self-contained), figures/*.png and results.csv
    from the run folders in ``dirs``; returns the README's path. ``tune``: options chosen per
    scheme on validation (default: the ``tune`` of the study files in ``dirs``). ``margin``:
    the equivalence margin in accuracy points (default: the study files' ``margin``, else
    ``stats.MARGIN_POINTS``). ``wandb`` "offline" / "online": the report is also logged as one
    W&B run in the study's group (``dashboard``); online checks the key and server first."""
    if wandb == "online":
        check_wandb_online()
    runs = load_runs(dirs)
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    for old in (out / "figures").glob("*.png"):
        old.unlink()
    confirmed = confirmation(runs)
    if confirmed and tune:
        raise InitStudyError("these runs confirm a tuning study's settings: a report of them "
                             "chooses nothing, so it takes no --tune")
    tuned = confirmed or tuple(check_tune(study_tune(dirs) if tune is None else tune))
    margin = check_margin(study_margin(dirs) if margin is None else margin)
    title = title or f"Init study: {', '.join(Path(d).name for d in dirs)}"
    groups = sorted(comparisons(runs, tuned, bool(confirmed)), key=axis_order)
    shown = ", ".join(f"`{os.path.relpath(d, out)}`" for d in dirs)  # as seen from the report
    intro = (f"{len(runs)} runs from {shown}, in {count(len(groups), 'comparison')}. Runs are "
             f"compared only when everything but the scheme"
             f"{', the seeds and the tuned ' + ', '.join(tuned) if tuned else ' and the seeds'}"
             f" is equal. Accuracies are percent of the split named. Intervals of a mean over "
             f"seeds are {LEVEL:.0%} Student-t intervals, and of a difference Welch's; verdicts "
             f"against {baseline} use Welch's test and TOST within ±{margin:g} points, "
             f"Holm-adjusted (docs/statistics.md). Diverged runs count in the means at their "
             f"final accuracy, failed runs have none and are counted apart."
             + (" Each scheme's setting was chosen by its tuning study (below); nothing here is "
                "chosen." if confirmed else
                " Each scheme's setting is chosen on the validation split (highest mean final "
                "validation accuracy over seeds); the test split is only reported." if tuned
                else ""))
    unfinished = [r for r in runs if not r.finished and r.status != "failed"]
    if unfinished:
        intro += (f" **{count(len(unfinished), 'run')} had not finished** when this report was "
                  f"made (status running or interrupted); they count as unfinished.")
    sections = [Section("h1", title), Section("text", intro)]
    analyses = [compare(comparison, baseline, target, margin / 100) for comparison in groups]
    for axis in find_axes([(a.comparison, a.selections) for a in analyses]):
        sections += axis_sections(axis, out / "figures", baseline)
    for i, analysis in enumerate(analyses, 1):
        prefix = f"c{i}_" if len(groups) > 1 else ""
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
    if wandb in ("offline", "online"):
        group = study_name(dirs) or next((r.config.get("group") for r in runs
                                          if r.config.get("group")), "adhoc")
        project = next((r.config.get("wandb_project") for r in runs
                        if r.config.get("wandb_project")), "initstudy")
        log_report(sections, analyses, out, title, group, project, wandb)
    return out / "README.md"
