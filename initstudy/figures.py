"""The figures of a report: what each comparison's runs look like, drawn by ``plots`` from the
saved records of the runs at each scheme's chosen setting."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .axes import Axis, schemes_of
from .results import Run

if TYPE_CHECKING:
    from .analysis import Analysis

MOST_LAYERS = 6  # per-layer figures of deeper models show this many layers, evenly spaced
# The sensitivity figure's second panel: the top this many points (of accuracy, in %), where
# schemes that all train are told apart.
ZOOM_POINTS = 3.0


def _shown(layers: list[str]) -> list[str]:
    """All the layers, or MOST_LAYERS of them evenly spaced from the first to the last."""
    if len(layers) <= MOST_LAYERS:
        return layers
    step = (len(layers) - 1) / (MOST_LAYERS - 1)
    return [layers[round(i * step)] for i in range(MOST_LAYERS)]


def _layers(runs: list[Run]) -> list[str]:
    for run in runs:
        names = [k.split("/", 1)[1] for k in (run.epochs[0] if run.epochs else {})
                 if k.startswith("weight_std/")]
        if names:
            return names
    return []


def _steps_per_epoch(run: Run) -> int | None:
    images = (run.config.get("env") or {}).get("train_images")
    return -(-images // run.config["batch_size"]) if images and run.config.get("batch_size") \
        else None


def _divergences(groups: dict[str, list[Run]], x_of, y_of) -> dict[str, list[tuple]]:
    """Where each diverged run stopped, as (x, y) points for the curve figures."""
    marks: dict[str, list[tuple]] = {}
    for scheme, runs in groups.items():
        for run in runs:
            step = run.summary.get("diverged_step")
            if run.status == "diverged" and step:
                point = (x_of(run, step), y_of(run))
                if None not in point:
                    marks.setdefault(scheme, []).append(point)
    return marks


def split_name(analysis: "Analysis", split: str) -> str:
    n = analysis.comparison.key.get(f"{split}_images")
    name = "validation" if split == "val" else "test"
    return f"{name} split, {n:,} images" if n else f"{name} split"


def figures(analysis: "Analysis", folder: Path, prefix: str = "") -> list[tuple[str, Path]]:
    """Draw every figure of one comparison into ``folder``; returns (caption, path) pairs."""
    from . import plots

    folder.mkdir(parents=True, exist_ok=True)
    groups = {sel.scheme: sel.runs for sel in analysis.selections}
    runs = [r for rs in groups.values() for r in rs]
    every_layer = _layers(runs)
    layers = _shown(every_layer)
    some = (f" ({len(layers)} of the {len(every_layer)} layers, evenly spaced)"
            if len(layers) < len(every_layer) else "")
    at = " (each scheme at its chosen setting)" if analysis.comparison.tuned else ""
    made = []

    def add(caption: str, path: Path | None) -> None:
        if path is not None:
            made.append((caption, path))

    if analysis.comparison.tuned and not analysis.comparison.confirmed:
        option = analysis.comparison.tuned[0]
        lines = _sensitivity_lines(analysis)
        top = max((p["hi"] for line in lines.values() for p in line if math.isfinite(p["hi"])),
                  default=100.0)
        zoom = f"within {ZOOM_POINTS:g} points of the best"
        add(f"Sensitivity: final validation accuracy ({split_name(analysis, 'val')}) against "
            f"{option}, over the whole range (left) and {zoom} (right); mean over seeds with "
            f"its 95% Student-t band; a cross marks a setting where a seed diverged, a ring the "
            f"setting chosen.",
            plots.band_lines({"every value tried": lines, zoom: lines}, option,
                             f"validation accuracy against {option}",
                             folder / f"{prefix}sensitivity.png",
                             logx=all(isinstance(v, (int, float)) and v > 0 for sel in
                                      analysis.selections for s in sel.settings
                                      for v in s.values[:1]),
                             ylims={zoom: (top - ZOOM_POINTS, top + 0.1 * ZOOM_POINTS)}))
    last_loss = lambda run: next((r["train/loss"] for r in reversed(run.steps)
                                  if r.get("train/loss") is not None), None)
    add("Train loss (training split) against step: mean over seeds, band = ±1 std; × where a "
        f"run diverged{at}.",
        plots.mean_curves({s: [[(r["step"], r["train/loss"]) for r in run.steps] for run in rs]
                           for s, rs in groups.items()}, folder / f"{prefix}train_loss.png",
                          "train loss (cross-entropy, log scale)", "step (batches)",
                          "train loss", logy=True,
                          marks=_divergences(groups, lambda run, step: step, last_loss)))
    for split in ("val", "test") if analysis.split == "val" else ("test",):
        epoch_of = lambda run, step: step / _steps_per_epoch(run) if _steps_per_epoch(run) \
            else None
        acc_at_end = lambda run: 100 * run.final(split) if run.final(split) is not None else None
        add(f"Accuracy on the {split_name(analysis, split)} against epoch (epoch 0 = at init): "
            f"mean over seeds, band = ±1 std; × where a run diverged (its accuracy there){at}.",
            plots.mean_curves({s: [[(r["epoch"], 100 * r[f"{split}/acc"]) for r in run.epochs
                                    if r.get(f"{split}/acc") is not None] for run in rs]
                               for s, rs in groups.items()}, folder / f"{prefix}{split}_acc.png",
                              f"{'validation' if split == 'val' else 'test'} accuracy", "epoch",
                              f"{split} accuracy (%)",
                              marks=_divergences(groups, epoch_of, acc_at_end)))
    add(f"Final accuracy on the {split_name(analysis, 'test')} of every run (dots) and the "
        f"mean with its 95% Student-t interval over seeds (diamond and bar){at}.",
        plots.final_accuracy({s.scheme: s.accs for s in analysis.stats},
                             {s.scheme: s.acc_ci for s in analysis.stats},
                             folder / f"{prefix}final_acc.png",
                             "final test accuracy per run"))
    if layers:
        add(f"Per-layer weight std over epochs (mean over seeds){some}{at}.",
            plots.per_layer_lines(_epoch_series(groups, "weight_std", layers), layers,
                                  folder / f"{prefix}weight_std.png", "weight std per layer",
                                  "weight std"))
        add(f"Relative update per epoch, ||W_end - W_start|| / ||W_start|| (mean over seeds)"
            f"{some}{at}.",
            plots.per_layer_lines(_epoch_series(groups, "rel_update", layers), layers,
                                  folder / f"{prefix}rel_update.png",
                                  "relative weight update per epoch", "relative update"))
        hists = _first_seed_histograms(groups, layers)
        add("Weight histograms (30 bins, as the note's plt.hist) per layer and scheme, at init "
            "(grey) and after training (blue; where it left the init's scale, as in a diverged "
            f"run, its range is written in the panel); first seed of each scheme{some}{at}.",
            plots.histogram_grid({s: h["weight"] for s, h in hists.items()}, layers,
                                 folder / f"{prefix}weight_hist.png",
                                 "weights at init and after training"))
        add("Biases value by output unit (as the note's plt.plot), at init (grey) and after "
            f"training (blue); first seed of each scheme{some}{at}.",
            plots.bias_grid({s: h["bias"] for s, h in hists.items()}, layers,
                            folder / f"{prefix}biases.png", "biases at init and after training"))
    profiles = _depth_profiles(groups)
    if profiles:
        add(_signal_caption(profiles), plots.depth_profile(
            profiles, folder / f"{prefix}init_signal.png", _diagnostics_batch(groups)))
    return made


def _signal_caption(profiles: dict[str, dict[str, Any]]) -> str:
    signal = all(p["forward_key"] == "signal_std" for p in profiles.values())
    forward = ("the std over images of its output (the input's signal: a bias that is the same "
               "for every image does not count)" if signal else "the std of its output")
    return (f"Signal propagation at init: per layer in forward order, {forward}, and the std "
            f"of the loss gradient at its output (init_diagnostics.json, training images, mean "
            f"over seeds); log scale.")


def axis_figures(axis: Axis, folder: Path, baseline: str = "default") -> list[tuple[str, Path]]:
    """An axis of the study (``axes.find_axes``): validation accuracy along it, each scheme at
    its chosen setting; for a model's axis, the signal at init in the largest model."""
    from . import plots

    schemes = schemes_of(axis, baseline)
    panels = {label: {scheme: [
        {"x": p.value, "mean": 100 * s.best.val_mean, "lo": 100 * s.best.val_ci[0],
         "hi": 100 * s.best.val_ci[1], "diverged": s.best.diverged, "n": len(s.best.runs)}
        for p in points for s in p.selections if s.scheme == scheme]
        for scheme in schemes} for label, points in axis.panels.items()}
    values = [p.value for points in axis.panels.values() for p in points]
    logx = min(values) > 0 and max(values) / min(values) >= 20
    tuned = next(iter(axis.panels.values()))[0].comparison.tuned
    at = f" at its {', '.join(tuned)} chosen on validation" if tuned else ""
    made = [(f"Final validation accuracy against {axis.name}: each scheme{at}, mean over seeds "
             f"with its 95% Student-t band (n per point in the legend); a cross where a seed "
             f"diverged.",
             plots.band_lines(panels, axis.name, f"validation accuracy against {axis.name}",
                              folder / f"axis_{axis.name}.png", logx=logx))]
    if axis.of_model:
        for i, (label, points) in enumerate(axis.panels.items()):
            largest = points[-1]
            groups = {s.scheme: s.runs for s in largest.selections}
            profiles = _depth_profiles(groups)
            if profiles:
                where = f"{axis.name}={largest.value:g}" + (f", {label}" if label else "")
                made.append((f"At {where}: " + _signal_caption(profiles), plots.depth_profile(
                    profiles, folder / f"axis_{axis.name}_signal_{i + 1}.png",
                    _diagnostics_batch(groups), title=where)))
    return made


def _sensitivity_lines(analysis: "Analysis") -> dict[str, list[dict[str, Any]]]:
    return {sel.scheme: [{"x": s.values[0], "mean": 100 * s.val_mean,
                          "lo": 100 * s.val_ci[0], "hi": 100 * s.val_ci[1],
                          "diverged": s.diverged, "n": len(s.runs), "chosen": s is sel.best}
                         for s in sel.settings] for sel in analysis.selections}


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


def _diagnostics_batch(groups: dict[str, list[Run]]) -> int | None:
    """The images the runs' init diagnostics were measured on, when all agree."""
    sizes = {(r.diagnostics() or {}).get("batch") for runs in groups.values() for r in runs}
    return sizes.pop() if len(sizes) == 1 else None


def _depth_profiles(groups: dict[str, list[Run]]) -> dict[str, dict[str, Any]]:
    """Per scheme, the layers and the mean over seeds of the forward signal (``signal_std``;
    ``out_std`` for runs recorded before it existed) and of ``grad_out_std``, per layer."""
    profiles = {}
    for scheme, runs in groups.items():
        reports = [d for d in (r.diagnostics() for r in runs) if d]
        if reports:
            layers = reports[0]["layers"]
            forward = "signal_std" if all("signal_std" in layer for rep in reports
                                           for layer in rep["layers"]) else "out_std"
            mean = lambda key, i: statistics.mean(rep["layers"][i][key] for rep in reports)
            profiles[scheme] = {"layers": [layer["name"] for layer in layers],
                                "forward_key": forward,
                                "forward": [mean(forward, i) for i in range(len(layers))],
                                "backward": [mean("grad_out_std", i)
                                             for i in range(len(layers))]}
    return profiles
