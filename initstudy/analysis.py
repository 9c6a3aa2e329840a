"""Each comparison analysed: every scheme at its chosen setting (``tuning.select``), its final
test accuracy over seeds with Student-t intervals, and the differences from the baseline at the
baseline's own chosen setting: Welch intervals and p, TOST for equivalence within the margin,
both Holm-adjusted over the schemes compared, a verdict, and the design's power
(docs/statistics.md). Every test number is that of the runs at the setting chosen on
validation; no choice reads a test number. No torch.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from .config import MARGIN_POINTS
from .results import Comparison, Run
from .stats import ALPHA, detectable, holm, mean_ci, n_to_detect, prob_beats, verdict, welch
from .tuning import Selection, describe_values, select


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
    diff_ci: tuple[float, float] = (math.nan, math.nan)  # Welch's interval at LEVEL
    p_beats: float = math.nan
    welch: float = math.nan
    welch_holm: float = math.nan
    tost: float = math.nan  # TOST's p for equivalence within the margin
    tost_holm: float = math.nan
    verdict: str = ""
    detectable: float = math.nan  # smallest difference detected at 80% power, this design
    n_needed: int | None = None  # runs per scheme that would detect the margin


@dataclass
class Analysis:
    """What a report says about one comparison."""

    comparison: Comparison
    selections: list[Selection]
    stats: list[SchemeStats]
    target: float
    split: str  # the split the target and "epochs to target" are measured on
    margin: float = MARGIN_POINTS / 100  # equivalence margin, as a fraction of accuracy
    family: int = 0  # schemes compared with the baseline (Holm's family)

    @property
    def power_alpha(self) -> float:
        """The level the power figures assume: Holm's first (strictest) step, alpha / m."""
        return ALPHA / max(self.family, 1)

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
        acc_ci=mean_ci(accs), acc_median=statistics.median(accs) if accs else math.nan,
        acc_best=max(accs) if accs else math.nan,
        val_mean=statistics.mean(vals) if vals else math.nan, val_ci=mean_ci(vals),
        test_loss=_mean([r.summary.get("test/loss") for r in finished]),
        train_loss=_mean([r.summary.get("train/loss") for r in finished]),
        epochs_to_target=statistics.mean(reached) if reached else math.nan,
        reached=len(reached))


def compare(comparison: Comparison, baseline: str = "default", target: float | None = None,
            margin: float = MARGIN_POINTS / 100) -> Analysis:
    """Each scheme at its chosen setting, with differences against ``baseline`` at the
    baseline's own chosen setting (when it is present): Welch and TOST (within ±``margin``,
    a fraction of accuracy), Holm-adjusted over the schemes compared, and a verdict."""
    selections = select(comparison, baseline)
    split = selection_split(comparison.runs)
    target = choose_target(selections, split) if target is None else target
    stats = [scheme_stats(comparison, sel, target, split) for sel in selections]
    base = next((s for s in stats if s.scheme == baseline), None)
    analysis = Analysis(comparison, selections, stats, target, split, margin)
    if base is None:
        return analysis
    others = [s for s in stats if s is not base]
    analysis.family = len(others)
    for s in others:
        d = welch(s.accs, base.accs, margin)
        s.diff, s.diff_ci, s.welch, s.tost = d.diff, d.ci, d.p, d.tost_p
        s.p_beats = prob_beats(s.accs, base.accs)
    for s, p, t in zip(others, holm([s.welch for s in others]), holm([s.tost for s in others])):
        s.welch_holm, s.tost_holm = p, t
        s.verdict = verdict(s.diff, p, t, margin)
        s.detectable = detectable(s.acc_std, base.acc_std, len(s.accs), len(base.accs),
                                  analysis.power_alpha)
        s.n_needed = n_to_detect(margin, s.acc_std, base.acc_std, analysis.power_alpha)
    return analysis
