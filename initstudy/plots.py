"""Figures, drawn with matplotlib's non-interactive backend into PNG files."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, none opened
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .runfolder import HISTOGRAM_BINS  # noqa: E402



def layer_pictures(models: dict[str, Any], layer: str, path: Path) -> Path:
    """The seed document's two pictures of one layer, one column per scheme: a 30-bin histogram
    of its weights and a line plot of its biases (index against value)."""
    import torch

    fig, axes = plt.subplots(2, len(models), figsize=(4.5 * len(models), 7), squeeze=False)
    for column, (scheme, model) in enumerate(models.items()):
        module = dict(model.named_modules())[layer]
        weights = module.weight.detach().float().cpu().flatten()
        weights = weights[torch.isfinite(weights)]
        top, bottom = axes[0][column], axes[1][column]
        top.hist(weights.numpy(), bins=HISTOGRAM_BINS)
        top.set(title=f"{scheme}: {layer}.weight", xlabel="weight value", ylabel="count")
        if module.bias is not None:
            bottom.plot(module.bias.detach().float().cpu().numpy())
        bottom.set(title=f"{scheme}: {layer}.bias", xlabel="output unit", ylabel="bias value")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _colors(schemes: list[str]) -> dict[str, Any]:
    cmap = plt.get_cmap("tab10")
    return {s: cmap(i % 10) for i, s in enumerate(schemes)}


def _density(record: dict) -> list[float]:
    """Histogram counts as a probability density (area 1)."""
    total = sum(record["counts"])
    return [c / (total * (hi - lo)) for c, lo, hi in
            zip(record["counts"], record["edges"], record["edges"][1:])]


def _legend(ax, **kwargs) -> None:
    if ax.get_legend_handles_labels()[0]:  # nothing drawn, no empty legend
        ax.legend(**kwargs)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _mean_band(runs: list[list[tuple[float, float]]]) -> tuple[list, list, list]:
    """Mean and sample std (n - 1, as the tables' std) over runs at each x that any run has
    (runs that stopped early, like diverged ones, drop out of the later points; one run, no
    band)."""
    by_x: dict[float, list[float]] = {}
    for points in runs:
        for x, y in points:
            if y is not None and math.isfinite(y):
                by_x.setdefault(x, []).append(y)
    xs = sorted(by_x)
    means = [statistics.mean(by_x[x]) for x in xs]
    stds = [statistics.stdev(by_x[x]) if len(by_x[x]) > 1 else 0.0 for x in xs]
    return xs, means, stds


def mean_curves(series: dict[str, list[list[tuple[float, float]]]], path: Path, title: str,
                xlabel: str, ylabel: str, logy: bool = False,
                marks: dict[str, list[tuple[float, float]]] | None = None) -> Path:
    """One line per scheme: the mean over its runs, with a band of +-1 std over runs. Short
    series get a dot per point, so that a run stopped after one point still shows; ``marks``
    are drawn as crosses (where runs diverged)."""
    fig, ax = plt.subplots(figsize=(8, 5))
    marks = marks or {}
    for scheme, color in _colors(list(series)).items():
        xs, means, stds = _mean_band(series[scheme])
        points = [p for p in marks.get(scheme, []) if p[1] is not None and math.isfinite(p[1])
                  and (not logy or p[1] > 0)]
        if points:
            ax.scatter(*zip(*points), marker="x", s=60, color=color, zorder=3)
        if not xs:
            continue
        n = len(series[scheme])
        diverged = f", {len(marks.get(scheme, []))} diverged ×" if marks.get(scheme) else ""
        ax.plot(xs, means, color=color, marker="o" if len(xs) <= 15 else None, ms=3,
                label=f"{scheme} (n={n}{diverged})")
        lo = [m - s for m, s in zip(means, stds)]
        if logy:  # a band below zero cannot be drawn on a log axis
            lo = [max(v, m * 0.05) for v, m in zip(lo, means)]
        ax.fill_between(xs, lo, [m + s for m, s in zip(means, stds)], color=color, alpha=0.2)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if logy:
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs and steps are whole
    ax.grid(alpha=0.3)
    _legend(ax, fontsize=8)
    return _save(fig, path)


def per_layer_lines(series: dict[str, dict[str, list[list[tuple[float, float]]]]],
                    layers: list[str], path: Path, title: str, ylabel: str,
                    logy: bool = True) -> Path:
    """One panel per layer, one line per scheme (mean over runs) against epoch."""
    fig, axes = plt.subplots(1, len(layers), figsize=(3.6 * len(layers), 3.8), squeeze=False)
    colors = _colors(list(series))
    for ax, layer in zip(axes[0], layers):
        for scheme, color in colors.items():
            xs, means, _ = _mean_band(series[scheme].get(layer, []))
            if xs:
                ax.plot(xs, means, marker="o", ms=3, color=color, label=scheme)
        ax.set(title=layer, xlabel="epoch", ylabel=ylabel)
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    _legend(axes[0][-1], fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


OFF_SCALE = 20  # a final spread this many times the init's is drawn as text, not to scale


def _span(values: list[float]) -> tuple[float, float] | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return (min(finite), max(finite)) if finite else None


def _off_scale(ax, init: tuple[float, float] | None, final: tuple[float, float] | None,
               nonfinite: int, axis: str) -> bool:
    """Keep the panel on the init's scale when the final values left it (a diverged run's
    weights reach 1e23): say the final range in the panel instead. True when it did. A
    constant init (zero biases) sets no scale: its finite final values are drawn as they are."""
    if init is None or (init[0] == init[1] and not nonfinite):
        return False
    width = init[1] - init[0] or max(abs(init[0]), 0.05)  # a constant init: its own size
    if not nonfinite and final is not None and final[1] - final[0] <= OFF_SCALE * width:
        return False
    text = (f"final: {nonfinite} non-finite" if nonfinite and final is None else
            f"final spans [{final[0]:.3g}, {final[1]:.3g}]" + (f", {nonfinite} non-finite"
                                                              if nonfinite else ""))
    pad = 0.1 * width
    (ax.set_xlim if axis == "x" else ax.set_ylim)(init[0] - pad, init[1] + pad)
    ax.text(0.02, 0.95, text + "\n(off this scale)", transform=ax.transAxes, fontsize=7,
            va="top", color="tab:red")
    return True


def _grid(records: dict[str, dict[str, tuple[dict, dict]]], layers: list[str], path: Path,
          title: str, draw, xlabel: str, ylabel: str) -> Path:
    """Rows: schemes; columns: layers. ``draw(ax, init, final)`` draws the init and the final
    record (``records[scheme][layer] = (init, final)``, either may be None) of each panel."""
    schemes = list(records)
    fig, axes = plt.subplots(len(schemes), len(layers), squeeze=False,
                             figsize=(3.2 * len(layers), 2.3 * len(schemes)))
    for row, scheme in enumerate(schemes):
        for col, layer in enumerate(layers):
            ax = axes[row][col]
            draw(ax, *(records[scheme].get(layer) or (None, None)))
            ax.set_title(f"{scheme}: {layer}", fontsize=9)
            ax.tick_params(labelsize=7)
            if row == len(schemes) - 1:
                ax.set_xlabel(xlabel, fontsize=8)
            if col == 0:
                ax.set_ylabel(ylabel, fontsize=8)
    _legend(axes[0][-1], fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def histogram_grid(records: dict[str, dict[str, tuple[dict, dict]]], layers: list[str],
                   path: Path, title: str) -> Path:
    """The 30-bin weight histograms at init and after training, per scheme and layer, as
    densities, since the two have bins of different widths."""
    def draw(ax, init, final):
        span = lambda r: (r["edges"][0], r["edges"][-1]) if r and r["counts"] else None
        hidden = final is not None and _off_scale(ax, span(init), span(final),
                                                  final.get("nonfinite", 0), "x")
        for record, label, color in ((init, "init", "tab:gray"), (final, "final", "tab:blue")):
            if record and record["counts"] and not (label == "final" and hidden):
                ax.stairs(_density(record), record["edges"], fill=label == "init",
                          alpha=0.5 if label == "init" else 1, color=color,
                          label=f"{label} (epoch {record['epoch']})")

    return _grid(records, layers, path, title, draw, "weight value", "density")


def bias_grid(records: dict[str, dict[str, tuple[dict, dict]]], layers: list[str], path: Path,
              title: str) -> Path:
    """The note's ``plt.plot`` of biases, value by output unit, at init and after training."""
    def draw(ax, init, final):
        values = lambda r: r.get("values") if r else None
        hidden = values(final) is not None and _off_scale(
            ax, _span(values(init) or []), _span(values(final)),
            sum(v is None for v in values(final)), "y")
        shown = []
        for record, label, color in ((init, "init", "tab:gray"), (final, "final", "tab:blue")):
            if values(record) and not (label == "final" and hidden):
                ax.plot([math.nan if v is None else v for v in values(record)], color=color,
                        lw=1, label=label)
                shown += values(record)
        span = _span(shown)
        if not hidden and span and span[1] - span[0] <= 1e-6 * max(1.0, abs(span[0])):
            pad = max(0.5 * abs(span[0]), 0.05)  # all one value: show it, not float noise
            ax.set_ylim(span[0] - pad, span[1] + pad)

    return _grid(records, layers, path, title, draw, "output unit", "bias value")


def depth_profile(profiles: dict[str, dict[str, Any]], path: Path, images: int | None = None,
                  title: str | None = None) -> Path:
    """Forward and backward signal against depth, per scheme (``figures._depth_profiles``)."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    layers = max((p["layers"] for p in profiles.values()), key=len)
    for scheme, color in _colors(list(profiles)).items():
        for ax, key in zip(axes, ("forward", "backward")):
            values = profiles[scheme][key]
            ax.plot(range(len(values)), values, marker="o" if len(values) <= 15 else None,
                    ms=4, color=color, label=scheme)
    signal = all(p["forward_key"] == "signal_std" for p in profiles.values())
    forward = ("forward: std over images of each layer's output" if signal else
               "forward: std of each layer's output (before activation)")
    many = len(layers) > 6  # then numbers: 1 = the first layer, as depth is counted
    every = max(1, math.ceil(len(layers) / 12))  # at most a dozen tick labels
    for ax, what in zip(axes, (forward, "backward: std of the loss gradient at each layer's "
                                        "output")):
        ax.set(title=what, ylabel="std (log scale)",
               xlabel=(f"layer number in forward order ({layers[0]} ... {layers[-1]})"
                       if many else "layer (forward order)"))
        ticks = range(0, len(layers), every) if many else range(len(layers))
        ax.set_xticks(ticks, [str(i + 1) if many else layers[i] for i in ticks], fontsize=8)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.title.set_fontsize(10)
    _legend(axes[1], fontsize=8)
    fig.suptitle("signal propagation at init" + (f", {title}" if title else "") +
                 " (mean over seeds" + (f", {images} training images)" if images else ")"))
    return _save(fig, path)


def final_accuracy(points: dict[str, list[float]], intervals: dict[str, tuple[float, float]],
                   path: Path, title: str) -> Path:
    """Each run's final test accuracy as a dot, the mean with its 95% Student-t interval."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (scheme, color) in enumerate(_colors(list(points)).items()):
        accs = [100 * a for a in points[scheme]]
        ax.scatter([i] * len(accs), accs, color=color, alpha=0.6, s=18)
        if accs:
            mean = statistics.mean(accs)
            lo, hi = (100 * v for v in intervals[scheme])
            ax.errorbar(i + 0.15, mean, yerr=[[mean - lo], [hi - mean]], fmt="D",
                        color="black", ms=5, capsize=4)
    ax.set_xticks(range(len(points)), list(points), rotation=20)
    ax.set(title=title, ylabel="final test accuracy (%)", xlabel="scheme")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def band_lines(panels: dict[str, dict[str, list[dict[str, Any]]]], xlabel: str, title: str,
               path: Path, logx: bool = False,
               ylims: dict[str, tuple[float, float]] | None = None) -> Path:
    """Validation accuracy against a number, one panel per label and one line per scheme: the
    mean over seeds at each value (``{"x", "mean", "lo", "hi", "diverged", "n"}``, optionally
    ``"chosen"``) with its interval band, a cross where a seed diverged, a ring where
    ``chosen``. ``ylims`` limits the y axis of the panels it names (a zoom)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(9 if len(panels) == 1 else 7 * len(panels),
                                                      5.5), squeeze=False)
    same = len({tuple(lines) for lines in panels.values()}) == 1  # then one legend says it all
    for i, (ax, (label, lines)) in enumerate(zip(axes[0], panels.items())):
        for scheme, color in _colors(list(lines)).items():
            points = sorted((p for p in lines[scheme] if math.isfinite(p["mean"])),
                            key=lambda p: p["x"])
            if not points:
                continue
            xs = [p["x"] for p in points]
            ns = sorted({p["n"] for p in points})
            ax.plot(xs, [p["mean"] for p in points], color=color, marker="o", ms=4,
                    label=f"{scheme} (n={'-'.join(map(str, ns[::max(1, len(ns) - 1)]))} per "
                          f"value)")
            ax.fill_between(xs, [p["lo"] for p in points], [p["hi"] for p in points],
                            color=color, alpha=0.15)
            bad = [p for p in points if p["diverged"]]
            if bad:
                ax.scatter([p["x"] for p in bad], [p["mean"] for p in bad], marker="x", s=90,
                           color=color, zorder=3)
            chosen = [p for p in points if p.get("chosen")]
            ax.scatter([p["x"] for p in chosen], [p["mean"] for p in chosen], s=160,
                       facecolors="none", edgecolors=color, linewidths=2, zorder=3)
        ax.scatter([], [], marker="x", color="black", label="a seed diverged")
        if any(p.get("chosen") for line in lines.values() for p in line):
            ax.scatter([], [], s=160, facecolors="none", edgecolors="black", label="chosen")
        if logx:
            ax.set_xscale("log")
        values = sorted({p["x"] for line in lines.values() for p in line})
        if len(values) <= 12:  # label the values tried, as written, not powers of ten
            ax.set_xticks(values, [f"{v:g}" for v in values], rotation=45 if len(values) > 6
                          else 0)
            ax.minorticks_off()
        ax.set(title=label or title, xlabel=xlabel + (" (log scale)" if logx else ""),
               ylabel="final validation accuracy (%)")
        if label in (ylims or {}):
            _zoom(ax, lines, ylims[label], logx)
        ax.grid(alpha=0.3)
        if i == 0 or not same:
            _legend(ax, fontsize=8, loc="best")
    if len(panels) > 1:
        fig.suptitle(title)
    return _save(fig, path)


def _zoom(ax, lines: dict[str, list[dict[str, Any]]], ylim: tuple[float, float],
          logx: bool) -> None:
    """Limit ``ax`` to ``ylim`` and to the values whose mean falls inside it."""
    ax.set_ylim(*ylim)
    inside = [p["x"] for line in lines.values() for p in line if ylim[0] <= p["mean"] <= ylim[1]]
    if inside:
        lo, hi = min(inside), max(inside)
        ax.set_xlim(*((lo / 1.5, hi * 1.5) if logx else
                      (lo - 0.05 * (hi - lo or 1), hi + 0.05 * (hi - lo or 1))))
