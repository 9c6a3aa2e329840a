"""Studies: a grid of runs from a TOML file, scheduled over GPUs, CPU workers or Slurm.

A study file names the study, the schemes (spec strings), the seeds (a count or a list) and any
run option by its ``RunConfig`` field name; a list value on an option is an axis of the grid.
``[[grid]]`` tables, when present, are grids of their own that share the top-level options
(each scheme its own range of learning rates, say); the study is all of them. ``tune`` names
the options a report tunes per scheme (``report --tune``). Every scheme spec and option is
checked when the file is read, before any run starts.
Each run lives in ``OUT/<run id>/`` (``RunConfig.run_id``, stable for the same result-deciding
options), so rerunning a sweep skips what finished (``ok`` or ``diverged``), redoes what died
(``running``, ``interrupted`` or no folder) and retries ``failed`` runs only when asked.

Local runs each get a fresh worker process (``python -m initstudy.sweep CONFIGS_JSON``), or a
pack of them with ``--pack K`` (trained together, ``train_pack``): a crash, an OOM or a killed
worker fails that run (or pack) alone. Workers die with the sweep (PR_SET_PDEATHSIG),
and a lock on ``OUT`` stops two sweeps from writing the same folder.
"""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import PACK_FIELDS, RunConfig, check_tune
from .errors import InitStudyError, RunFailed
from .schemes import resolve
from .tracking import write_json_atomic
from .training import train_pack

DONE = ("ok", "diverged")
# Options a study may not set: each run's folder and the trainer's own records.
NOT_STUDY_OPTIONS = ("out", "quiet", "group", "dataset_used", "device_used", "scheme_params", "env")
STUDY_OPTIONS = tuple(f.name for f in dataclasses.fields(RunConfig)
                      if f.name not in NOT_STUDY_OPTIONS)
STUDY_KEYS = ("name", "tune", "grid")  # the study's own keys, besides schemes, seeds and options


class StudyError(InitStudyError):
    """A study file that cannot be read or expanded."""


@dataclass
class Study:
    name: str
    runs: list[RunConfig]  # planned: ``out`` is set by the sweep
    source: str = ""  # the study file's text, for provenance
    tune: list[str] = field(default_factory=list)  # options a report tunes per scheme


def load_study(path: Path) -> Study:
    """Read and expand a study file; StudyError names the file and what is wrong."""
    try:
        text = Path(path).read_text()
        spec = tomllib.loads(text)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise StudyError(f"cannot read study file {path}: {exc}") from None
    try:
        return Study(spec.get("name", Path(path).stem), expand(spec), text, tune_options(spec))
    except StudyError as exc:
        raise StudyError(f"{path}: {exc}") from None


def tune_options(spec: dict[str, Any]) -> list[str]:
    """A study's ``tune`` list, checked: run options that decide a result."""
    tune = spec.get("tune", [])
    try:
        return check_tune([tune] if isinstance(tune, str) else tune)
    except InitStudyError as exc:
        raise StudyError(f"tune: {exc}") from None


def expand(spec: dict[str, Any]) -> list[RunConfig]:
    """The runs of a study spec: each grid (the top level, or each ``[[grid]]`` table over the
    top-level options) expanded schemes x every list-valued option x seeds, in that order.
    Every scheme spec and option is checked here, before anything runs."""
    tune_options(spec)
    spec = {k: v for k, v in spec.items() if k not in ("name", "tune")}
    grids = spec.pop("grid", None)
    if grids is None:
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
    for spec_text in dict.fromkeys(c.scheme for c in runs):
        try:
            resolve(spec_text)
        except InitStudyError as exc:
            raise StudyError(str(exc)) from None
    return runs


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
    """The study's runs, each with its folder in ``out`` and the sweep-wide options set."""
    return [dataclasses.replace(c, out=str(out / c.run_id), group=study.name, quiet=True,
                                **overrides) for c in study.runs]


def status(config: RunConfig) -> str:
    """A planned run's status from its folder: ``pending`` when there is none yet."""
    return _summary(config).get("status", "pending")


def to_do(runs: list[RunConfig], retry_failed: bool) -> list[RunConfig]:
    """Runs still to run: neither finished nor (unless retrying) failed."""
    skip = DONE if retry_failed else (*DONE, "failed")
    return [c for c in runs if status(c) not in skip]


# ---------------------------------------------------------------------------------------------
# Local scheduling


@dataclass
class Slot:
    """Where one worker runs: its device and the environment that pins it there."""

    name: str
    device: str
    env: dict[str, str] = field(default_factory=dict)


def _threads(workers: int, cores: int | None) -> dict[str, str]:
    """Each of ``workers`` processes' share of the host's cores, as torch's thread settings."""
    threads = str(max(1, (cores or os.cpu_count() or 1) // workers))
    return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def gpu_slots(gpus: list[int], jobs_per_gpu: int, cores: int | None = None) -> list[Slot]:
    """``jobs_per_gpu`` slots per GPU. GPU ids are the ones this process sees; each worker sees
    only its GPU (as ``cuda:0``) through CUDA_VISIBLE_DEVICES, mapped through ours if it is set,
    and its share of the host's cores for its CPU work (an init's forward passes, say)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    physical = visible.split(",") if visible else None
    threads = _threads(len(gpus) * jobs_per_gpu, cores)
    slots = []
    for gpu in gpus:
        device_id = physical[gpu] if physical else str(gpu)
        for job in range(jobs_per_gpu):
            slots.append(Slot(f"gpu{gpu}.{job}", "cuda",
                              {"CUDA_VISIBLE_DEVICES": device_id} | threads))
    return slots


def cpu_slots(workers: int, cores: int | None = None) -> list[Slot]:
    """``workers`` CPU slots sharing the cores: torch threads divided between them."""
    env = {"CUDA_VISIBLE_DEVICES": ""} | _threads(workers, cores)
    return [Slot(f"cpu{i}", "cpu", dict(env)) for i in range(workers)]


def visible_gpus() -> list[int]:
    import torch

    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def _die_with_parent() -> None:
    """In the worker, before exec: get SIGKILL when the sweep dies, so no orphan keeps training
    a run that the next sweep will redo."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


@dataclass
class Worker:
    configs: list[RunConfig]  # one run, or a pack trained together
    slot: Slot
    process: subprocess.Popen


class OutLock:
    """An exclusive lock on a sweep's folder, released when the process ends however it ends."""

    def __init__(self, out: Path):
        out.mkdir(parents=True, exist_ok=True)
        self.file = open(out / ".sweep.lock", "w")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StudyError(f"another sweep is running on {out}; wait for it or use "
                             f"another --out") from None


def packs(runs: list[RunConfig], size: int) -> list[list[RunConfig]]:
    """Runs grouped into packs of at most ``size`` that may train together (equal in all but
    scheme and seeds), in the runs' order."""
    groups: dict[str, list[RunConfig]] = {}
    for config in runs:
        key = json.dumps([getattr(config, f) for f in PACK_FIELDS])
        groups.setdefault(key, []).append(config)
    return [group[i:i + size] for group in groups.values() for i in range(0, len(group), size)]


def run_local(units: list[list[RunConfig]], slots: list[Slot], report=None) -> None:
    """Run each unit (a run, or a pack of runs trained together) in its own worker process on
    a free slot, until all have ended.

    ``report(event, config, status)`` is called per run with "start" and "end". A worker that
    dies without recording a result (killed, out of memory) leaves its runs ``failed`` with its
    exit code and the tail of its log. Ctrl-C interrupts the workers (they record
    ``interrupted``), waits for them and re-raises.
    """
    pending: deque[list[RunConfig]] = deque(units)
    free = list(slots)
    running: list[Worker] = []
    report = report or (lambda *args: None)
    try:
        while pending or running:
            while pending and free:
                unit, slot = pending.popleft(), free.pop(0)
                running.append(_start(unit, slot))
                for config in unit:
                    report("start", config, "running")
            time.sleep(0.1)
            for worker in [w for w in running if w.process.poll() is not None]:
                running.remove(worker)
                free.append(worker.slot)
                for config, run_status in zip(worker.configs, _finish(worker)):
                    report("end", config, run_status)
    except KeyboardInterrupt:
        for worker in running:
            worker.process.send_signal(signal.SIGINT)
        for worker in running:
            try:
                worker.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
            _finish(worker, ended_as="interrupted")  # one caught before it could say so
        raise


def _start(unit: list[RunConfig], slot: Slot) -> Worker:
    unit = [dataclasses.replace(config, device=slot.device) for config in unit]
    for config in unit:
        Path(config.out).mkdir(parents=True, exist_ok=True)
    log = open(Path(unit[0].out) / "worker.log", "w")  # a pack logs in its first run's folder
    process = subprocess.Popen(
        [sys.executable, "-m", "initstudy.sweep", json.dumps([c.to_dict() for c in unit])],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env=os.environ | slot.env | {"PYTHONUNBUFFERED": "1"}, preexec_fn=_die_with_parent)
    log.close()
    return Worker(unit, slot, process)


def _finish(worker: Worker, ended_as: str = "failed") -> list[str]:
    """The ended worker's run statuses, recording ``ended_as`` where the worker could not."""
    code = worker.process.returncode
    why = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
    log = Path(worker.configs[0].out) / "worker.log"
    tail = log.read_text(errors="replace").strip().splitlines()[-5:] if log.exists() else []
    statuses = []
    for config in worker.configs:
        current = status(config)
        if current not in (*DONE, "failed", "interrupted"):
            record_failure(config, f"worker {why}" + (f": {tail[-1]}" if tail else ""),
                           ended_as)
            current = ended_as
        statuses.append(current)
    return statuses


def record_failure(config: RunConfig, error: str, ended_as: str = "failed") -> None:
    """Mark a run ``failed`` (or ``interrupted``) when its own process could not: it died, or
    never started training, or was stopped before it had recorded anything."""
    folder = Path(config.out)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "error.txt").exists():  # the run's own traceback, where it wrote one
        (folder / "error.txt").write_text(error + "\n")
    write_json_atomic(folder / "summary.json", {
        "status": ended_as, "run_name": config.run_name, "scheme": config.scheme,
        "seed": config.seed, "dataset": config.dataset, "epochs": config.epochs,
        "error": error})


def run_pack(configs: list[RunConfig]) -> list[str]:
    """Train planned runs together in this process, recording any failure; their statuses."""
    try:
        return [summary["status"] for summary in train_pack(configs)]
    except RunFailed:
        return ["failed"] * len(configs)  # train_pack recorded it, traceback included
    except InitStudyError as exc:  # before training: missing data, bad device...
        for config in configs:
            record_failure(config, str(exc))
        return ["failed"] * len(configs)


# ---------------------------------------------------------------------------------------------
# Slurm


class SlurmChunk:
    """A Slurm task: trains its planned runs in turn (in packs of ``pack``), skipping finished
    ones. On preemption or timeout submitit calls ``checkpoint`` and requeues the same chunk,
    which then resumes at the first unfinished run (a half-done run starts over)."""

    def __init__(self, pack: int = 1):
        self.pack = pack

    def __call__(self, configs: list[dict[str, Any]]) -> None:
        import torch

        if os.environ.get("SLURM_CPUS_PER_TASK"):  # use what Slurm gave this task, no more
            torch.set_num_threads(int(os.environ["SLURM_CPUS_PER_TASK"]))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        todo = [dataclasses.replace(RunConfig.from_dict(data), device=device)
                for data in configs]
        for unit in packs([c for c in todo if status(c) not in DONE], self.pack):
            run_pack(unit)

    def checkpoint(self, configs: list[dict[str, Any]]):
        import submitit

        return submitit.helpers.DelayedSubmission(self, configs)


def submit_slurm(runs: list[RunConfig], out: Path, partition: str | None = None,
                 gpus_per_task: int = 0, time_min: int = 60, mem: str | None = None,
                 runs_per_task: int = 1, cpus_per_task: int = 1, pack: int = 1) -> list:
    """Submit ``runs`` as one Slurm job array, ``runs_per_task`` runs per task (trained in
    packs of ``pack``); return the submitit jobs."""
    try:
        import submitit
    except ImportError:
        raise StudyError("--backend slurm needs submitit: pip install submitit") from None
    executor = submitit.SlurmExecutor(folder=out / ".slurm" / "%j", max_num_timeout=5)
    executor.update_parameters(
        job_name=f"initstudy-{out.name}", partition=partition, time=time_min, mem=mem,
        gpus_per_task=gpus_per_task or None, cpus_per_task=cpus_per_task,
        signal_delay_s=60)
    chunks = [[c.to_dict() for c in runs[i:i + runs_per_task]]
              for i in range(0, len(runs), runs_per_task)]
    try:
        return executor.map_array(SlurmChunk(pack), chunks)
    except Exception as exc:  # sbatch missing or refusing: say so in one line
        raise StudyError(f"Slurm submission failed: {type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}") from None


def slurm_pending(array_id: str) -> bool:
    """Whether any task of the job array is still queued or running (requeued ones included).
    Asks squeue directly: submitit's status calls go through sacct, which a cluster without
    accounting answers only with warnings."""
    result = subprocess.run(["squeue", "-h", "-j", array_id, "-o", "%i"], capture_output=True,
                            text=True)
    return result.returncode == 0 and bool(result.stdout.strip())


def wait_slurm(jobs: list, runs: list[RunConfig], report=None, poll_s: float = 2.0) -> None:
    """Wait for the job array to leave the queue, reporting runs as their folders change."""
    report = report or (lambda *args: None)
    array_ids = sorted({job.job_id.split("_")[0] for job in jobs})
    seen: dict[str, str] = {}
    while True:
        queued = any(slurm_pending(array_id) for array_id in array_ids)
        for config in runs:
            current = status(config)
            if current != seen.get(config.run_id, "pending"):
                report("end" if current in (*DONE, "failed") else "start", config, current)
            seen[config.run_id] = current
        if not queued:
            return
        time.sleep(poll_s)


# ---------------------------------------------------------------------------------------------
# The whole sweep


def sweep(study: Study, out: Path, backend: str = "local", gpus: list[int] | None = None,
          jobs_per_gpu: int = 1, workers: int | None = None, retry_failed: bool = False,
          pack: int = 1, slurm: dict[str, Any] | None = None,
          overrides: dict[str, Any] | None = None, console=None) -> dict[str, int]:
    """Run every unfinished run of ``study`` into ``out`` and return the count of each status.

    ``backend`` "local": on ``gpus`` (default: all visible) with ``jobs_per_gpu`` workers each,
    or without GPUs on ``workers`` CPU processes (default 1). "slurm": one job array through
    submitit, ``slurm`` holding partition, gpus_per_task, time_min, mem, runs_per_task.
    ``pack``: runs trained together in one process (``train_pack``), where they may be.
    ``overrides`` sets run options for every run (wandb mode, data folder...).
    """
    from rich.console import Console

    console = console or Console(stderr=True)
    lock = OutLock(out)  # noqa: F841 (held until the sweep returns)
    (out / "study.toml").write_text(study.source)  # provenance for reports
    runs = plan(study, out, **(overrides or {}))
    todo = to_do(runs, retry_failed)
    console.print(f"study [bold]{study.name}[/]: {len(runs)} runs, {len(runs) - len(todo)} "
                  f"already finished, {len(todo)} to run -> {out}")
    with SweepProgress(len(runs), len(runs) - len(todo), console) as progress:
        if backend == "slurm":
            jobs = submit_slurm(todo, out, pack=pack, **(slurm or {}))
            console.print(f"submitted job array {jobs[0].job_id.split('_')[0]} "
                          f"({len(jobs)} tasks)" if jobs else "nothing to submit")
            wait_slurm(jobs, todo, progress.report)
        else:
            gpus = visible_gpus() if gpus is None else gpus
            slots = gpu_slots(gpus, jobs_per_gpu) if gpus else cpu_slots(workers or 1)
            run_local(packs(todo, pack), slots, progress.report)
    counts: dict[str, int] = {}
    for config in runs:
        counts[status(config)] = counts.get(status(config), 0) + 1
    console.print(summary_table(runs))
    return counts


class SweepProgress:
    """A progress bar over the whole study (done / running / failed / total, ETA) and a line
    for each run that ends."""

    def __init__(self, total: int, done: int, console):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.progress = Progress(TextColumn("runs"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                 TextColumn("ETA"), TimeRemainingColumn(), console=console)
        self.task = self.progress.add_task("runs", total=total, completed=done, info="")
        self.running: set[str] = set()
        self.failed = 0

    def __enter__(self) -> "SweepProgress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def report(self, event: str, config: RunConfig, run_status: str) -> None:
        if event == "start":
            self.running.add(config.run_id)
        else:
            self.running.discard(config.run_id)
            self.failed += run_status == "failed"
            self.progress.advance(self.task)
            summary = _summary(config)
            acc = summary.get("test/acc")
            detail = f"test/acc {acc:.4f}" if isinstance(acc, float) else summary.get("error", "")
            self.progress.console.print(f"{run_status:>8}  {config.run_id}  {detail}")
        self.progress.update(self.task, info=f"running {len(self.running)}  "
                                              f"failed {self.failed}")


def _summary(config: RunConfig) -> dict[str, Any]:
    """A planned run's summary.json, or {} when it has none (yet)."""
    try:
        return json.loads((Path(config.out) / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def plan_table(runs: list[RunConfig]):
    """The runs of a plan with what varies between them and their current status."""
    from rich.table import Table

    varying = [f for f in STUDY_OPTIONS
               if len({json.dumps(getattr(c, f)) for c in runs}) > 1 and f != "seed"]
    table = Table(title=f"{len(runs)} runs")
    for column in ("run id", *varying, "seed", "status"):
        table.add_column(column)
    for config in runs:
        table.add_row(config.run_id, *(str(getattr(config, f)) for f in varying),
                      str(config.seed), status(config))
    return table


def summary_table(runs: list[RunConfig]):
    """Per scheme: how many runs ended how, and the final test accuracy over finished ones."""
    import statistics

    from rich.table import Table

    table = Table(title="study summary")
    for column in ("scheme", "runs", "ok", "diverged", "failed", "not done", "test/acc"):
        table.add_column(column, justify="left" if column == "scheme" else "right")
    by_scheme: dict[str, list[dict[str, Any]]] = {}
    for config in runs:
        by_scheme.setdefault(config.scheme, []).append(_summary(config))
    for scheme, summaries in by_scheme.items():
        statuses = [s.get("status", "pending") for s in summaries]
        accs = [s["test/acc"] for s in summaries if s.get("status") in DONE]
        acc = (f"{statistics.mean(accs):.4f} ± {statistics.stdev(accs):.4f}" if len(accs) > 1
               else f"{accs[0]:.4f}" if accs else "-")
        not_done = sum(st not in (*DONE, "failed") for st in statuses)
        table.add_row(scheme, str(len(statuses)), str(statuses.count("ok")),
                      str(statuses.count("diverged")), str(statuses.count("failed")),
                      str(not_done), acc)
    return table


def _worker_main(argv: list[str]) -> int:
    """``python -m initstudy.sweep CONFIGS_JSON``: one run or pack in a fresh process."""
    configs = [RunConfig.from_dict(data) for data in json.loads(argv[1])]
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    try:
        results = run_pack(configs)
    except KeyboardInterrupt:
        return 130
    return 0 if all(result in DONE for result in results) else 1


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv))
