"""The Slurm backend against a real single-node cluster (scripts/slurm_local.sh, run by .ci/run).

Skipped, saying why, where no Slurm cluster answers."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from initstudy.study import load_study, plan, status

from helpers import tiny_study, wait_for


def slurm_up() -> str | None:
    """None if a Slurm cluster answers here, else why not."""
    if not shutil.which("sinfo"):
        return "no Slurm here (sinfo not found): run scripts/slurm_local.sh install && start"
    result = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    if result.returncode != 0 or not any(s in result.stdout for s in ("idle", "mixed", "alloc")):
        return f"Slurm does not answer ({result.stderr.strip() or result.stdout.strip()}): " \
               f"run scripts/slurm_local.sh start"
    return None


pytestmark = pytest.mark.skipif(slurm_up() is not None, reason=str(slurm_up()))


def slurm_cmd(study: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "initstudy.cli", "sweep", str(study), "--out", str(out),
            "--backend", "slurm", "--wandb", "disabled", "--time", "10", *extra]


@pytest.mark.slow
def test_slurm_job_array_lands_in_the_same_layout(tmp_path, tiny_data):
    study = tiny_study(tmp_path, tiny_data, ["default", "xavier", "kaiming"], seeds=1)
    out = tmp_path / "out"
    result = subprocess.run(slurm_cmd(study, out, "--runs-per-task", "2"), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "submitted job array" in result.stderr and "(2 tasks)" in result.stderr
    assert "sacct" not in result.stderr  # no accounting noise
    runs = plan(load_study(study), out)
    assert [status(c) for c in runs] == ["ok"] * 3
    for config in runs:  # the layout of a local sweep: reports don't care where runs ran
        assert {"config.json", "metrics.jsonl", "histograms.jsonl", "summary.json"} <= \
            {p.name for p in Path(config.out).iterdir()}
        assert json.loads((Path(config.out) / "config.json").read_text())["env"]["argv"]


@pytest.mark.slow
def test_preempted_task_is_requeued_and_resumes(tmp_path, tiny_data):
    """Two runs in one task; the task is preempted (SIGUSR2, as Slurm signals before it kills)
    while the second run trains. submitit requeues it; the first run is not redone."""
    study = tiny_study(tmp_path, tiny_data, ["default", "xavier"], seeds=1, epochs=8)
    out = tmp_path / "out"
    first, second = plan(load_study(study), out)
    sweep = subprocess.Popen(slurm_cmd(study, out, "--runs-per-task", "2"),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert wait_for(lambda: status(first) == "ok" and status(second) == "running", 300)
    first_summary = (Path(first.out) / "summary.json").read_text()
    job_id = next(p.name for p in (out / ".slurm").iterdir()  # submitit's <array>_<task>
                  if p.is_dir() and p.name[0].isdigit())
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    assert wait_for(lambda: status(second) == "interrupted", 60)
    # Slurm holds a requeued job back for two minutes (BeginTime); let it start now.
    assert wait_for(lambda: "BeginTime" in subprocess.run(
        ["squeue", "-h", "-j", job_id, "-o", "%r"], capture_output=True, text=True).stdout, 60)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
    output, _ = sweep.communicate(timeout=600)
    assert sweep.returncode == 0, output
    assert status(second) == "ok"
    assert (Path(first.out) / "summary.json").read_text() == first_summary  # not redone
    epochs = [json.loads(line).get("epoch") for line in
              (Path(second.out) / "metrics.jsonl").read_text().splitlines()]
    assert [e for e in epochs if e is not None] == list(range(9))  # redone once, whole
    logs = " ".join(p.read_text() for p in (out / ".slurm").rglob("*.err"))
    assert "Caught signal SIGUSR2" in logs  # submitit checkpointed and requeued the task
