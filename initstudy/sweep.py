"""Running a study: every unfinished run, each in a fresh worker process on a free slot (a GPU,
a share of the CPU cores) or as a Slurm job array, with a progress display.

Local runs each get a fresh worker process (``python -m initstudy.worker``, configs on stdin), or a
pack of them with ``--pack K`` (trained together, ``train_pack``): a crash, an OOM or a killed
worker fails that run (or pack) alone. Ctrl-C or SIGTERM stops the workers, whose runs say
``interrupted``; workers die with the sweep however it ends (PR_SET_PDEATHSIG). A lock on
``OUT`` stops two sweeps from writing the same folder.
"""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeElapsedColumn)
from rich.text import Text

from .config import RunConfig
from .runfolder import FINISHED
from .slurm import submit_slurm, wait_slurm
from .study import STUDY_OPTIONS, Study, StudyError, _summary, packs, plan, status, to_do
from .wandbenv import wandb_mode
from .worker import record_failure


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


def run_local(units: list[list[RunConfig]], slots: list[Slot], report=None) -> None:
    """Run each unit (a run, or a pack of runs trained together) in its own worker process on
    a free slot, until all have ended.

    ``report(event, config, status)`` is called per run with "start" and "end". A worker that
    dies without recording a result (killed, out of memory) leaves its runs ``failed`` with its
    exit code and the tail of its log. Ctrl-C (or SIGTERM, which the CLI raises as
    ``Terminated``) interrupts the workers (they record ``interrupted``), waits for them and
    re-raises.
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
        [sys.executable, "-m", "initstudy.worker"], stdout=log, stderr=subprocess.STDOUT,
        stdin=subprocess.PIPE, text=True,
        env=os.environ | slot.env | {"PYTHONUNBUFFERED": "1"}, preexec_fn=_die_with_parent)
    log.close()
    try:
        process.stdin.write(json.dumps([c.to_dict() for c in unit]))
        process.stdin.close()
    except BrokenPipeError:  # it died before reading: _finish records how it ended
        pass
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
        if current not in (*FINISHED, "failed", "interrupted"):
            record_failure(config, f"worker {why}" + (f": {tail[-1]}" if tail else ""),
                           ended_as)
            current = ended_as
        statuses.append(current)
    return statuses


# ---------------------------------------------------------------------------------------------
# The whole sweep


def sweep(study: Study, out: Path, backend: str = "local", gpus: list[int] | None = None,
          jobs_per_gpu: int = 1, workers: int | None = None, retry_failed: bool = False,
          pack: int = 1, slurm: dict[str, Any] | None = None,
          overrides: dict[str, Any] | None = None) -> dict[str, int]:
    """Run every unfinished run of ``study`` into ``out`` and return the count of each status.

    ``backend`` "local": on ``gpus`` (default: all visible) with ``jobs_per_gpu`` workers each,
    or without GPUs on ``workers`` CPU processes (default 1). "slurm": one job array through
    submitit, ``slurm`` holding partition, gpus_per_task, time_min, mem, runs_per_task.
    ``pack``: runs trained together in one process (``train_pack``), where they may be.
    ``overrides`` sets run options for every run (wandb mode, data folder...).
    """
    from rich.console import Console

    console = Console(stderr=True)
    if not console.is_terminal:  # a log (nohup, Slurm): rich's 80 columns would wrap the summary
        console.width = 120
    lock = OutLock(out)  # noqa: F841 (held until the sweep returns)
    (out / "study.toml").write_text(study.source)  # provenance for reports
    runs = plan(study, out, **(overrides or {}))
    todo = to_do(runs, retry_failed)
    finished = sum(status(c) in FINISHED for c in runs)
    failed = len(runs) - finished - len(todo)  # kept, unless --retry-failed
    console.print(f"study [bold]{study.name}[/]: {len(runs)} runs, {finished} already finished"
                  + (f", {failed} failed (rerun with --retry-failed)" if failed else "")
                  + f", {len(todo)} to run -> {out}", soft_wrap=True)
    slots: list[Slot] = []
    if backend != "slurm":
        gpus = visible_gpus() if gpus is None else gpus
        slots = gpu_slots(gpus, jobs_per_gpu) if gpus else cpu_slots(workers or 1)
    # Slurm decides how many tasks run at once, so only a local sweep can start from a pace.
    pace = recorded_pace(runs, len(slots) * pack) if slots else None
    with SweepProgress(len(runs), len(runs) - len(todo), console, pace) as progress:
        if backend == "slurm":
            jobs = submit_slurm(todo, out, pack=pack, **(slurm or {}))
            console.print(f"submitted job array {jobs[0].job_id.split('_')[0]} "
                          f"({len(jobs)} tasks)" if jobs else "nothing to submit")
            wait_slurm(jobs, todo, progress.report)
        else:
            run_local(packs(todo, pack), slots, progress.report)
    console.print(summary_table(runs))
    return dict(Counter(status(c) for c in runs))


def recorded_pace(runs: list[RunConfig], at_once: int) -> float | None:
    """Seconds per run with ``at_once`` runs training together, from the median recorded wall
    time of the runs already finished (a pack records its own wall in each of its runs); None
    when none has finished."""
    walls = [s["wall_seconds"] for s in map(_summary, runs)
             if s.get("status") in FINISHED and isinstance(s.get("wall_seconds"), (int, float))]
    return statistics.median(walls) / at_once if walls else None


class SweepProgress:
    """A progress bar over the whole study (done / running / failed / total, ETA) and a line
    for each run that ends. ``pace``: seconds per run to estimate from until a run of this
    sweep ends (``recorded_pace``)."""

    def __init__(self, total: int, done: int, console, pace: float | None = None):
        self.progress = Progress(TextColumn("runs"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                 TextColumn("ETA"), StudyETA(), console=console)
        self.task = self.progress.add_task("runs", total=total, completed=done, info="",
                                           resumed=done, ended_at=0.0, pace=pace)
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
            self.progress.update(self.task, advance=1,
                                 ended_at=self.progress.tasks[self.task].elapsed)
            summary = _summary(config)
            # validation first, as `initstudy run` prints it: the split anything is chosen on
            detail = "  ".join(f"{key} {summary[key]:.4f}" for key in ("val/acc", "test/acc")
                               if isinstance(summary.get(key), float)) or summary.get("error", "")
            # The count and time left on the line too: a sweep's log (nohup, Slurm) has no bar.
            # One line however long (an error's text), read as text, not rich markup.
            task = self.progress.tasks[self.task]
            self.progress.console.print(f"{run_status:>8}  {config.run_id}  {detail}  "
                                        f"({task.completed:.0f}/{task.total:.0f}, ETA "
                                        f"{StudyETA().render(task).plain})",
                                        soft_wrap=True, markup=False)
        self.progress.update(self.task, info=f"running {len(self.running)}  "
                                              f"failed {self.failed}")


class StudyETA(ProgressColumn):
    """Time left at this sweep's own pace (the seconds to its last run's end over the runs ended
    by then), counting down between ends. Until its first run ends, a resumed sweep goes by the
    finished runs' recorded ``pace``, marked ``~``. rich's own estimate looks back 30 s, and
    runs take minutes: it never had two ends to go on."""

    def render(self, task) -> Text:
        ended, at = task.completed - task.fields["resumed"], task.fields["ended_at"]
        pace, mark = (at / ended, "") if ended else (task.fields["pace"], "~")
        if pace is None or task.elapsed is None:
            return Text("-:--:--", style="progress.remaining")
        left = max(0.0, pace * (task.total - task.completed) - (task.elapsed - at))
        return Text(mark + str(timedelta(seconds=round(left))), style="progress.remaining")


def offline_records(runs: list[RunConfig]) -> list[str]:
    """Where the runs mirrored offline keep their wandb records, as globs for `wandb sync`
    (``OUT/*/wandb/offline-run-*``)."""
    return sorted({f"{Path(c.wandb_dir) if c.wandb_dir else Path(c.out).parent / '*'}"
                   f"/wandb/offline-run-*" for c in runs if wandb_mode(c.wandb) == "offline"})


def _varying(runs: list[RunConfig], aside: tuple[str, ...] = ("seed",)) -> list[str]:
    """The study options that differ between ``runs``, those ``aside`` aside."""
    return [f for f in STUDY_OPTIONS if f not in aside
            and len({json.dumps(getattr(c, f)) for c in runs}) > 1]


def plan_table(runs: list[RunConfig]):
    """The runs of a plan with what varies between them and their current status."""
    from rich.table import Table

    varying = _varying(runs)
    table = Table(title=f"{len(runs)} runs")
    for column in ("run id", *varying, "seed", "status"):
        table.add_column(column)
    for config in runs:
        table.add_row(config.run_id, *(str(getattr(config, f)) for f in varying),
                      str(config.seed), status(config))
    return table


def summary_table(runs: list[RunConfig]):
    """Per scheme: how many runs ended how and, where its runs share one setting (they differ
    only by seed), the mean ± std over seeds of their final accuracies. A scheme over a grid
    gets its number of settings instead: a mean across settings means nothing, and choosing
    one (on validation) is the report's job."""
    from rich.table import Table

    varying = _varying(runs, aside=("seed", "scheme"))
    table = Table(title="study summary")
    for column in ("scheme", "runs", "ok", "diverged", "failed", "not done", "val/acc",
                   "test/acc"):
        table.add_column(column, justify="left" if column == "scheme" else "right")
    by_scheme: dict[str, list[RunConfig]] = {}
    for config in runs:
        by_scheme.setdefault(config.scheme, []).append(config)
    for scheme, configs in by_scheme.items():
        summaries = [_summary(c) for c in configs]
        statuses = [s.get("status", "pending") for s in summaries]
        settings = len({json.dumps([getattr(c, f) for f in varying]) for c in configs})
        if settings > 1:
            table.caption = (f"a scheme over several settings of {', '.join(varying)}: its "
                             f"accuracy at the one chosen on validation is in `initstudy report`")
        accs = ([f"{settings} settings", "-"] if settings > 1 else
                [_spread([s.get(key) for s in summaries if s.get("status") in FINISHED])
                 for key in ("val/acc", "test/acc")])
        not_done = sum(st not in (*FINISHED, "failed") for st in statuses)
        table.add_row(scheme, str(len(statuses)), str(statuses.count("ok")),
                      str(statuses.count("diverged")), str(statuses.count("failed")),
                      str(not_done), *accs)
    return table


def _spread(values: list[float | None]) -> str:
    """``mean ± std`` of the numbers among ``values`` (one number alone; "-" for none)."""
    numbers = [v for v in values if isinstance(v, (int, float))]
    return (f"{statistics.mean(numbers):.4f} ± {statistics.stdev(numbers):.4f}"
            if len(numbers) > 1 else f"{numbers[0]:.4f}" if numbers else "-")
