"""Studies on a Slurm cluster: one job array through submitit, each task training its runs in
turn, resumed after preemption; and waiting for the array while reporting progress."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from .config import RunConfig
from .runfolder import FINISHED
from .study import StudyError, packs, status
from .worker import run_pack


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
        for unit in packs([c for c in todo if status(c) not in FINISHED], self.pack):
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
                report("end" if current in (*FINISHED, "failed") else "start", config, current)
            seen[config.run_id] = current
        if not queued:
            return
        time.sleep(poll_s)
