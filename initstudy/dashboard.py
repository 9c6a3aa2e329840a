"""A report's conclusion in Weights & Biases: one run in the study's group (``job_type`` report)
holding every table of the report as a ``wandb.Table``, every figure as a ``wandb.Image`` with
its caption, and each scheme's headline numbers in the run's summary. The run folders stay the
source of truth: this reads what the report computed, and a wandb failure never stops a report.
"""

from __future__ import annotations

import math
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from .render import Section
from .wandbenv import environ


def _key(text: str) -> str:
    """A wandb key from a heading: ``Against default`` -> ``against_default``."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:60] or "table"


def media(sections: list[Section]) -> tuple[dict[str, Section], dict[str, Section]]:
    """The report's tables and figures by key: ``<comparison>/<heading>`` for what sits under
    a comparison (``c1/against_default``), the heading alone elsewhere; keys made unique."""
    tables: dict[str, Section] = {}
    figures: dict[str, Section] = {}
    part, heading, index = "", "", 0
    for s in sections:
        if s.kind == "h2":
            match = re.match(r"Comparison (\d+)", s.text)
            part = f"c{match.group(1)}/" if match else f"{_key(s.text)}/"
            heading = ""
        elif s.kind == "h3":
            heading = _key(s.text)
        elif s.kind in ("table", "figure"):
            found = tables if s.kind == "table" else figures
            name = (heading or "table") if s.kind == "table" else s.path.stem
            key = f"{part}{name}"
            while key in found:
                index += 1
                key = f"{part}{name}_{index}"
            found[key] = s
    return tables, figures


def headline(analyses: list) -> dict[str, Any]:
    """Per comparison and scheme: setting, test accuracy mean, its interval and n, and the
    verdict against the baseline with its difference (``c1/kaiming/test_acc``...)."""
    out: dict[str, Any] = {}
    for i, analysis in enumerate(analyses, 1):
        for s in analysis.stats:
            prefix = f"c{i}/{s.scheme}/"
            values = {"setting": s.setting, "n": len(s.accs), "test_acc": s.acc_mean,
                      "test_acc_lo": s.acc_ci[0], "test_acc_hi": s.acc_ci[1],
                      "val_acc": s.val_mean, "verdict": s.verdict, "diff": s.diff,
                      "diff_lo": s.diff_ci[0], "diff_hi": s.diff_ci[1]}
            out |= {prefix + k: v for k, v in values.items()
                    if not (isinstance(v, float) and not math.isfinite(v)) and v != ""}
    return out


def log_report(sections: list[Section], analyses: list, out: Path, title: str, group: str,
               project: str, mode: str) -> Path | None:
    """Log the report as one wandb run in ``out``/wandb (a report made again replaces its run
    there, never piles up a second); the run's folder, or None when wandb failed (one
    warning, the report itself is already written)."""
    folder = Path(out) / "wandb"  # where wandb.init(dir=out) keeps its runs
    try:
        shutil.rmtree(folder, ignore_errors=True)
        _log(sections, analyses, Path(out), title, group, project, mode)
        return folder
    except Exception as exc:  # the report is written; the dashboard is a mirror
        print(f"WARNING: wandb failed ({type(exc).__name__}: {exc}); the report in {out} is "
              f"complete without it", file=sys.stderr)
        return None


def _log(sections, analyses, out: Path, title: str, group: str, project: str,
         mode: str) -> None:
    import wandb

    tables, figures = media(sections)
    with environ(WANDB_SILENT="true"):
        run = wandb.init(project=project, dir=str(out), mode=mode, group=group,
                         job_type="report", name=f"report-{group}", notes=title,
                         settings=wandb.Settings(silent=True, console="off"),
                         reinit="create_new")
        try:
            data: dict[str, Any] = {
                f"tables/{k}": wandb.Table(columns=s.header, data=s.rows)
                for k, s in tables.items()}
            data |= {f"figures/{k}": wandb.Image(str(s.path), caption=s.text)
                     for k, s in figures.items()}
            run.log(data)
            run.summary.update(headline(analyses) | {"title": title})
        finally:
            run.finish()
