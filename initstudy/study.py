"""Study files: a grid of runs from a TOML file, and where each planned run stands.

A study file names the study, the schemes (spec strings), the seeds (a count or a list) and any
run option by its ``RunConfig`` field name (``model`` too); a list value on an option is an
axis of the grid.
``[[grid]]`` tables, when present, are grids of their own that share the top-level options
(each scheme its own range of learning rates, say); the study is all of them. ``tune`` names
the options a report tunes per scheme (``report --tune``); ``margin`` is a report's
equivalence margin in accuracy points. ``confirm`` names the runs folder of a tuning study:
each scheme then trains at the setting that study chose on validation, on seeds it never
used, and each run records the choice in ``chosen_by`` (docs/studies.md). Every scheme spec
and option is checked when the file is read, before any run starts.

Each run lives in ``OUT/<run id>/`` (``RunConfig.run_id``, stable for the same result-deciding
options), so rerunning a sweep skips what finished (``ok`` or ``diverged``), redoes what died
(``running``, ``interrupted`` or no folder) and retries ``failed`` runs only when asked.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import PACK_FIELDS, RunConfig, check_margin, check_tune
from .errors import InitStudyError
from .model import check_model
from .results import Comparison, comparisons, load_runs, study_tune
from .runfolder import FINISHED
from .schemes import resolve
from .tuning import select

# Options a study may not set: each run's folder and the trainer's own records.
NOT_STUDY_OPTIONS = ("out", "overwrite", "quiet", "group", "chosen_by", "dataset_used", "device_used",
                     "scheme_params", "model_params", "env")
STUDY_OPTIONS = tuple(f.name for f in dataclasses.fields(RunConfig)
                      if f.name not in NOT_STUDY_OPTIONS)
# The study's own keys, besides schemes, seeds and options.
STUDY_KEYS = ("name", "tune", "margin", "confirm", "grid")


class StudyError(InitStudyError):
    """A study file that cannot be read or expanded."""


@dataclass
class Study:
    name: str
    runs: list[RunConfig]  # planned: ``out`` is set by the sweep
    source: str = ""  # the study file's text, for provenance
    tune: list[str] = field(default_factory=list)  # options a report tunes per scheme


def load_study(path: Path, root: Path | None = None) -> Study:
    """Read and expand a study file; StudyError names the file and what is wrong. ``root``:
    where the paths in it (``confirm``) start (default: the current directory)."""
    try:
        text = Path(path).read_text()
        spec = tomllib.loads(text)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise StudyError(f"cannot read study file {path}: {exc}") from None
    try:
        return Study(spec.get("name", Path(path).stem), expand(spec, root), text,
                     tune_options(spec))
    except StudyError as exc:
        raise StudyError(f"{path}: {exc}") from None


def tune_options(spec: dict[str, Any]) -> list[str]:
    """A study's ``tune`` list, checked: run options that decide a result."""
    tune = spec.get("tune", [])
    try:
        return check_tune([tune] if isinstance(tune, str) else tune)
    except InitStudyError as exc:
        raise StudyError(f"tune: {exc}") from None


def expand(spec: dict[str, Any], root: Path | None = None) -> list[RunConfig]:
    """The runs of a study spec: each grid (the top level, or each ``[[grid]]`` table over the
    top-level options) expanded schemes x every list-valued option x seeds, in that order; with
    ``confirm``, each scheme at its chosen setting (``confirmed``). Every scheme and model spec
    and every option is checked here, before anything runs."""
    tune_options(spec)
    try:
        check_margin(spec.get("margin"))
    except InitStudyError as exc:
        raise StudyError(str(exc)) from None
    spec = {k: v for k, v in spec.items() if k not in ("name", "tune", "margin")}
    grids = spec.pop("grid", None)
    confirm = spec.pop("confirm", None)
    if confirm is not None:
        if grids is not None:
            raise StudyError("a confirmation ('confirm') takes no [[grid]]: its settings come "
                             "from the tuning study")
        runs = confirmed(spec, Path(root or ".") / str(confirm), str(confirm))
    elif grids is None:
        runs = _expand_grid(spec)
    else:
        if not (isinstance(grids, list) and grids and all(isinstance(g, dict) for g in grids)):
            raise StudyError("'grid' must be a list of tables ([[grid]] sections)")
        runs = []
        for i, grid in enumerate(grids, 1):
            try:
                runs += _expand_grid(spec | grid)
            except StudyError as exc:
                raise StudyError(f"grid {i}: {exc}") from None
    ids = [c.run_id for c in runs]
    if len(set(ids)) != len(ids):
        raise StudyError("the grid repeats a run (the same options twice in a list)")
    # A model is built once here (milliseconds): one that does not fit the seam fails now.
    specs = [(resolve, c.scheme) for c in runs] + [(check_model, c.model) for c in runs]
    for check, spec_text in dict.fromkeys(specs):
        try:
            check(spec_text)
        except InitStudyError as exc:
            raise StudyError(str(exc)) from None
    return runs


def confirmed(spec: dict[str, Any], folder: Path, given: str) -> list[RunConfig]:
    """A confirmation's runs: each scheme of ``spec`` at the setting its tuning study (the runs
    in ``folder``) chose on validation, at ``spec``'s seeds, which must be new to that study,
    seed by seed; each run's ``chosen_by`` records the choice."""
    if not folder.is_dir():
        raise StudyError(f"confirm: no such runs folder {given}")
    tuning_runs = load_runs([folder])
    tuned = study_tune([folder])
    if not tuned:
        raise StudyError(f"confirm: the study in {given} tunes nothing (its study.toml has no "
                         f"'tune'), so it chose no setting to confirm")
    given_tuned = [t for t in tuned if t in spec]
    if given_tuned:
        raise StudyError(f"confirm: {', '.join(given_tuned)} is chosen by the tuning study; "
                         f"remove it from this study")
    rest = {k: v for k, v in spec.items() if k not in ("schemes", "scheme")}
    probe = _expand_grid(rest)  # the seeds and options, checked
    used = {r.config.get(k) for r in tuning_runs for k in ("seed", "data_seed")} - {None}
    reused = sorted(({c.seed for c in probe} | {c.effective_data_seed for c in probe}) & used)
    if reused:
        raise StudyError(f"confirm: seed(s) {', '.join(map(str, reused))} were used by the "
                         f"tuning study in {given}; a confirmation needs fresh seeds")
    schemes = spec.get("schemes", spec.get("scheme", "default"))
    schemes = schemes if isinstance(schemes, list) else [schemes]
    found = {}
    for comparison in _confirmed_comparisons(comparisons(tuning_runs, tuple(tuned)), rest,
                                             given):
        for sel in select(comparison):
            found.setdefault(sel.scheme, []).append((comparison, sel))
    per_scheme = []
    for scheme in schemes:
        matches = found.get(scheme, [])
        if len(matches) != 1:
            differ = _differ([c for c, _ in matches])
            raise StudyError(
                f"confirm: scheme {scheme} is in {len(matches)} comparisons of {given} "
                f"(a confirmation needs exactly one); that study has "
                f"{', '.join(sorted(found)) or 'no runs'}"
                + (f"; they differ in {', '.join(differ)}: give this study one value of it"
                   if differ else ""))
        comparison, sel = matches[0]
        chosen = dict(zip(tuned, sel.best.values))
        record = {"study": tuning_runs[0].config.get("group") or folder.parent.name,
                  "runs": given, "on": "validation", "options": chosen,
                  "val_acc": sel.best.val_mean if math.isfinite(sel.best.val_mean) else None,
                  "n": len(sel.best.val_accs),
                  "epochs": comparison.key.get("epochs"),
                  "seeds": sorted({r.config.get("seed") for r in comparison.runs}),
                  "edge": sel.edge}
        per_scheme.append([dataclasses.replace(c, chosen_by=record)
                           for c in _expand_grid(rest | {"scheme": scheme} | chosen)])
    # Seed by seed across the schemes, so that a confirmation stopped part-way is balanced.
    return [c for same_seed in zip(*per_scheme) for c in same_seed]


def _differ(found: list[Comparison]) -> list[str]:
    """The options in which comparisons differ: the axes that split a study."""
    return sorted({k for c in found for k in c.key
                   if len({json.dumps(d.key.get(k), sort_keys=True) for d in found}) > 1})


def _confirmed_comparisons(found: list[Comparison], spec: dict[str, Any],
                           given: str) -> list[Comparison]:
    """The comparisons of a tuning study (in ``given``) that a confirmation ``spec`` confirms:
    where that study's comparisons differ in an option (an axis such as the model), the ones
    at the confirmation's own value of it. Options they share (epochs...) may differ."""
    for option in [k for k in _differ(found) if k in spec]:
        values = sorted({str(c.key.get(option)) for c in found})
        if isinstance(spec[option], list):
            raise StudyError(f"confirm: give one {option}, not a list: the comparisons of "
                             f"{given} differ in it ({', '.join(values)})")
        found = [c for c in found if c.key.get(option) == spec[option]]
        if not found:
            raise StudyError(f"confirm: {given} has no comparison at {option} = "
                             f"{spec[option]!r}; it has {', '.join(values)}")
    return found


def _expand_grid(spec: dict[str, Any]) -> list[RunConfig]:
    spec = dict(spec)
    for plural, singular in (("schemes", "scheme"), ("seeds", "seed")):
        if plural in spec:
            if singular in spec:
                raise StudyError(f"give '{plural}' or '{singular}', not both")
            spec[singular] = spec.pop(plural)
    unknown = sorted(set(spec) - set(STUDY_OPTIONS))
    if unknown:
        raise StudyError(f"unknown key(s) {', '.join(unknown)}; a study takes "
                         f"{', '.join(STUDY_KEYS)}, schemes, seeds and the run options "
                         f"{', '.join(STUDY_OPTIONS)}")
    seeds = spec.pop("seed", 1)
    if isinstance(seeds, int):
        if seeds < 1:
            raise StudyError(f"seeds = {seeds}: give a count of at least 1 or a list")
        seeds = list(range(seeds))
    schemes = spec.pop("scheme", "default")
    axes = {"scheme": schemes if isinstance(schemes, list) else [schemes]}
    axes |= {k: v if isinstance(v, list) else [v] for k, v in spec.items()}
    axes["seed"] = seeds if isinstance(seeds, list) else [seeds]
    for key, values in axes.items():
        if not values:
            raise StudyError(f"'{key}' is an empty list")
    for key, values in axes.items():
        default = getattr(RunConfig, key, None)  # the class attribute holds the default
        for value in values:
            if default is not None and not (isinstance(value, type(default)) or
                                            isinstance(default, float) and isinstance(value, int)):
                raise StudyError(f"'{key}' takes {type(default).__name__} values, got {value!r}")
    runs = []
    for values in itertools.product(*axes.values()):
        config = RunConfig(**dict(zip(axes, values)))
        try:
            config.validate()
        except InitStudyError as exc:
            raise StudyError(str(exc)) from None
        runs.append(config)
    return runs


def plan(study: Study, out: Path, **overrides: Any) -> list[RunConfig]:
    """The study's runs, each with its folder in ``out`` and the sweep-wide options set;
    ConfigError, before anything runs, for an option outside its range."""
    runs = [dataclasses.replace(c, out=str(out / c.run_id), group=study.name, quiet=True,
                                **overrides) for c in study.runs]
    if runs:  # each run passed at expand; the overrides, the same in all, are checked once
        runs[0].validate()
    return runs


def status(config: RunConfig) -> str:
    """A planned run's status from its folder: ``pending`` when there is none yet."""
    return _summary(config).get("status", "pending")


def to_do(runs: list[RunConfig], retry_failed: bool) -> list[RunConfig]:
    """Runs still to run: neither finished nor (unless retrying) failed; a run that failed
    because its record could not be written (``io_error``) is unfinished, not failed."""
    def pending(config: RunConfig) -> bool:
        summary = _summary(config)
        state = summary.get("status", "pending")
        return state not in FINISHED and (retry_failed or state != "failed"
                                          or bool(summary.get("io_error")))
    return [c for c in runs if pending(c)]


def _summary(config: RunConfig) -> dict[str, Any]:
    """A planned run's summary.json, or {} when it has none (yet)."""
    try:
        return json.loads((Path(config.out) / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def packs(runs: list[RunConfig], size: int) -> list[list[RunConfig]]:
    """Runs grouped into packs of at most ``size`` that may train together (equal in all but
    scheme, seeds and the optimizer's per-run scalars), in the runs' order."""
    groups: dict[str, list[RunConfig]] = {}
    for config in runs:
        key = json.dumps([getattr(config, f) for f in PACK_FIELDS])
        groups.setdefault(key, []).append(config)
    return [group[i:i + size] for group in groups.values() for i in range(0, len(group), size)]
