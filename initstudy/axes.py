"""A study's axes: the numeric things that vary between its comparisons (a model's depth or
width, an untuned learning rate), and along each, every scheme at its chosen setting.

A comparison's coordinates are what it holds equal (``Comparison.key``), with the model spec
split into its kind and its parameters as the runs recorded them (``mlp:depth=30`` ->
``model=mlp, depth=30, width=256, act=relu``). A coordinate that differs between comparisons
and is a number in all of them is an axis; the other differing coordinates (``act``, say) make
panels. Read off the validation split like the rest of the tuning: nothing here reads a test
number. No torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .config import DEFAULT_MODEL
from .results import Comparison
from .tuning import Selection

MODEL_COORDINATE = "model"


@dataclass
class Point:
    """One comparison on an axis: the axis value and each scheme's selection there."""

    value: float
    comparison: Comparison
    selections: list[Selection]


@dataclass
class Axis:
    """An axis of the study: its name, whether it changes the model, its panels (label ->
    points in axis order; label "" when nothing else varies)."""

    name: str
    of_model: bool
    panels: dict[str, list[Point]]


def coordinates(comparison: Comparison) -> dict[str, Any]:
    """What the comparison holds equal, the model spec split into kind and parameters."""
    coords = {k: v for k, v in comparison.key.items() if k != MODEL_COORDINATE}
    spec = comparison.key.get(MODEL_COORDINATE) or DEFAULT_MODEL
    coords[MODEL_COORDINATE] = spec.partition(":")[0]
    params = comparison.runs[0].config.get("model_params") or {}
    return coords | {name: value for name, value in params.items() if name not in coords}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def axis_order(comparison: Comparison) -> tuple:
    """A sort key: comparisons in the order of their coordinates, numbers by value (depth 2
    before depth 10), anything else by its text."""
    return tuple((name, (0, value, "") if _number(value) else (1, 0, str(value)))
                 for name, value in sorted(coordinates(comparison).items()))


def find_axes(analysed: list[tuple[Comparison, list[Selection]]]) -> list[Axis]:
    """Every axis along which at least two comparisons differ in it alone (within a panel)."""
    coords = [coordinates(c) for c, _ in analysed]
    names = list(dict.fromkeys(k for c in coords for k in c))
    varying = [k for k in names if len({json.dumps(c.get(k), sort_keys=True)
                                        for c in coords}) > 1]
    model_params = {k for c, _ in analysed for k in
                    (c.runs[0].config.get("model_params") or {})}
    axes = []
    for name in varying:
        if not all(_number(c.get(name)) for c in coords):
            continue
        others = [k for k in varying if k != name]
        panels: dict[str, list[Point]] = {}
        for c, (comparison, selections) in zip(coords, analysed):
            label = ", ".join(f"{k}={c.get(k)}" for k in others)
            panels.setdefault(label, []).append(Point(c[name], comparison, selections))
        panels = {label: sorted(points, key=lambda p: p.value)
                  for label, points in panels.items()
                  if len({p.value for p in points}) == len(points) > 1}
        if panels:
            axes.append(Axis(name, name in model_params, panels))
    return axes


def schemes_of(axis: Axis, baseline: str = "default") -> list[str]:
    """The schemes met along an axis, the baseline first, as the comparisons order them."""
    found = [s.scheme for points in axis.panels.values() for p in points for s in p.selections]
    return sorted(dict.fromkeys(found), key=lambda s: (s != baseline, found.index(s)))
