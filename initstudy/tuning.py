"""Tuning per scheme, on the validation split only: for each scheme, the setting of the tuned
options (a learning rate, say) whose mean final validation accuracy over seeds is highest, the
range of settings where it trains reliably, and whether the grid should be extended.

Nothing here reads a test number: the report then quotes the test accuracy of the runs at the
chosen setting.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from .errors import InitStudyError
from .results import Comparison, Run
from .stats import mean_ci

STABLE_WITHIN = 0.01  # a setting is in the stable range within 1 point of the scheme's best


@dataclass
class Setting:
    """One scheme at one setting of the tuned options: its runs and their validation scores."""

    values: tuple
    runs: list[Run]
    val_accs: list[float]  # final validation accuracy of each finished run (diverged included)
    val_mean: float
    val_ci: tuple[float, float]
    diverged: int
    failed: int

    @property
    def all_trained(self) -> bool:
        """Every seed finished without diverging (and at least one ran)."""
        return bool(self.runs) and all(r.status == "ok" for r in self.runs)


@dataclass
class Selection:
    """A scheme's settings in grid order, the one chosen on validation, its stable range."""

    scheme: str
    settings: list[Setting]
    best: Setting
    stable: list[Setting] = field(default_factory=list)
    edge: str | None = None  # "lowest" / "highest": the best is at that end of the grid

    @property
    def runs(self) -> list[Run]:
        return self.best.runs


def _setting(values: tuple, runs: list[Run]) -> Setting:
    finished = [r for r in runs if r.finished]
    accs = [a for a in (r.final("val") for r in finished) if a is not None]
    return Setting(values, runs, accs, statistics.mean(accs) if accs else math.nan,
                   mean_ci(accs), sum(r.status == "diverged" for r in runs),
                   sum(r.status == "failed" for r in runs))


def _order(values: tuple) -> tuple:
    """Grid order: numbers by value, anything else (None first) by its text."""
    return tuple((0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v)) for v in values)


def select(comparison: Comparison, baseline: str = "default") -> list[Selection]:
    """Each scheme's selection, the baseline first. Without tuned options every scheme has one
    setting. InitStudyError when a tuned comparison has runs without validation accuracy."""
    selections = []
    for scheme, runs in comparison.by_scheme(baseline).items():
        by_values: dict[tuple, list[Run]] = {}
        for run in runs:
            by_values.setdefault(comparison.setting(run), []).append(run)
        settings = [_setting(v, by_values[v]) for v in sorted(by_values, key=_order)]
        if comparison.tuned:
            blind = [r.path.name for r in runs if r.finished and r.final("val") is None]
            if blind:
                raise InitStudyError(
                    f"tuning {', '.join(comparison.tuned)} needs validation accuracy, which "
                    f"{len(blind)} run(s) lack (e.g. {blind[0]}: trained with --val-size 0 or "
                    f"before runs had a validation split)")
        if comparison.confirmed and len(settings) > 1:
            raise InitStudyError(
                f"a confirmation chooses nothing, but {scheme} has runs at "
                f"{len(settings)} settings ({', '.join(describe_values(comparison, s.values) for s in settings)})")
        scored = [s for s in settings if math.isfinite(s.val_mean)]
        best = max(scored, key=lambda s: s.val_mean) if scored else settings[0]
        stable = [s for s in scored if s.all_trained
                  and s.val_mean >= best.val_mean - STABLE_WITHIN]
        edge = None
        if comparison.tuned and len(settings) > 1 and scored:
            edge = ("lowest" if best is settings[0] else
                    "highest" if best is settings[-1] else None)
        selections.append(Selection(scheme, settings, best, stable, edge))
    return selections


def describe_values(comparison: Comparison, values: tuple) -> str:
    """``lr=0.01`` (``lr=0.01, momentum=0.9`` for several tuned options)."""
    return ", ".join(f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}"
                     for name, value in zip(comparison.tuned, values))
