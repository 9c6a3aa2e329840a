"""Studies: grid expansion, GPU slots, resume after a kill, fault isolation, a real sweep."""

import io
import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from rich.console import Console
from rich.progress import Progress
from typer.testing import CliRunner

from initstudy import RunConfig
from initstudy.cli import app
from initstudy.study import StudyError, expand, load_study, plan, status
from initstudy.sweep import (StudyETA, SweepProgress, cpu_slots, gpu_slots, recorded_pace,
                             summary_table)

from helpers import sweep_cmd, tiny_study, wait_for, write_study

REPO = Path(__file__).resolve().parents[1]


def test_grid_expansion_schemes_axes_and_seeds():
    runs = expand({"name": "x", "schemes": ["default", "normal:std=0.01"], "seeds": 3,
                   "lr": [0.01, 0.1], "epochs": 2, "dataset": "mnist-sample"})
    assert len(runs) == 2 * 2 * 3
    assert [(r.scheme, r.lr, r.seed) for r in runs[:4]] == [
        ("default", 0.01, 0), ("default", 0.01, 1), ("default", 0.01, 2), ("default", 0.1, 0)]
    assert all(r.epochs == 2 and r.dataset == "mnist-sample" for r in runs)
    assert len({r.run_id for r in runs}) == 12
    assert [r.seed for r in expand({"schemes": ["xavier"], "seeds": [4, 7]})] == [4, 7]
    assert [r.scheme for r in expand({"scheme": "kaiming"})] == ["kaiming"]


@pytest.mark.parametrize("spec,fragment", [
    ({"schemes": ["default"], "learning_rate": 0.1}, "unknown key(s) learning_rate"),
    ({"schemes": []}, "'scheme' is an empty list"),
    ({"seeds": 0}, "seeds = 0"),
    ({"schemes": ["a"], "scheme": "b"}, "not both"),
    ({"lr": -1}, "learning rate must be a positive number"),
    ({"seeds": [1, 1]}, "repeats a run"),
    ({"lr": "fast"}, "'lr' takes float values, got 'fast'"),
    ({"lr": float("nan")}, "learning rate must be a positive number, got nan"),
    ({"lr": [0.1, float("inf")]}, "learning rate must be a positive number, got inf"),
    ({"schemes": ["default", "kaiming_normall"]}, "unknown scheme 'kaiming_normall'"),
    ({"schemes": ["normal:std=big"]}, "std"),
    ({"schemes": ["xavier"], "grid": [{"lr": [0.1]}, {"lr": -2}]},
     "grid 2: learning rate must be a positive number"),
    ({"grid": {"lr": 0.1}}, "'grid' must be a list of tables"),
    ({"tune": ["optimiser"]}, "tune: cannot tune optimiser"),
])
def test_bad_study_specs(spec, fragment):
    with pytest.raises(StudyError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        expand(spec)


def test_grids_share_the_top_level_options_and_tune_is_read(tmp_path):
    path = write_study(tmp_path, """
        name = "tuned"
        tune = ["lr"]
        seeds = 2
        epochs = 3
        [[grid]]
        schemes = ["default", "xavier"]
        lr = [0.01, 0.1]
        [[grid]]
        schemes = ["custom"]
        lr = [1e-6, 1e-5, 1e-4]
        epochs = 4
    """)
    study = load_study(path)
    assert study.tune == ["lr"] and len(study.runs) == 2 * 2 * 2 + 3 * 2
    assert {(r.scheme, r.lr, r.epochs) for r in study.runs if r.seed == 0} == {
        ("default", 0.01, 3), ("default", 0.1, 3), ("xavier", 0.01, 3), ("xavier", 0.1, 3),
        ("custom", 1e-6, 4), ("custom", 1e-5, 4), ("custom", 1e-4, 4)}


def test_a_bad_scheme_fails_the_dry_run_before_anything_is_listed(tmp_path):
    path = write_study(tmp_path, 'schemes = ["default", "xavir"]\nlr = [0.01, 0.1]\n')
    result = CliRunner().invoke(app, ["sweep", str(path), "--dry-run"])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith(f"error: {path}: unknown scheme 'xavir'")
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize("path", sorted((REPO / "experiments").glob("*.toml")),
                         ids=lambda p: p.name)
def test_every_committed_study_file_plans(path):
    # A study of the repository loads with its checks (a confirmation's tuning runs read,
    # its seeds disjoint from theirs), so a typo is found here and not hours into a sweep.
    study = load_study(path, root=REPO)
    assert study.runs and study.name == path.stem


def test_bad_study_file_names_the_file(tmp_path):
    path = write_study(tmp_path, "name = 'x'\nschemes = [\n")
    with pytest.raises(StudyError, match=str(path)):
        load_study(path)


def test_run_id_depends_only_on_what_decides_the_result():
    base = RunConfig(scheme="kaiming", seed=1)
    same = [RunConfig(scheme="kaiming", seed=1, data_seed=1),
            RunConfig(scheme="kaiming", seed=1, out="x", device="cuda", wandb="online",
                      data_dir="/data", quiet=True, group="g")]
    assert all(c.run_id == base.run_id for c in same)
    assert base.run_id.startswith("kaiming-s1-")
    assert RunConfig(scheme="kaiming", seed=1, lr=0.02).run_id != base.run_id


def test_gpu_slots_pin_each_job_to_its_gpu(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    slots = gpu_slots([0, 1, 3], jobs_per_gpu=2)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0", "0", "1", "1", "3", "3"]
    assert {s.device for s in slots} == {"cuda"} and len({s.name for s in slots}) == 6
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")  # ids are ours, mapped through
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in gpu_slots([0, 1, 3], 1)] == ["4", "5", "7"]


def test_gpu_workers_get_their_share_of_the_host_cores(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    slots = gpu_slots([0, 1], jobs_per_gpu=3, cores=16)  # 6 workers on 16 cores
    assert {(s.env["OMP_NUM_THREADS"], s.env["MKL_NUM_THREADS"]) for s in slots} == {("2", "2")}
    assert gpu_slots([0], jobs_per_gpu=4, cores=2)[0].env["OMP_NUM_THREADS"] == "1"


def test_a_device_failure_before_training_is_a_recorded_failure(tmp_path, tiny_data,
                                                                monkeypatch):
    """CUDA out of memory while moving the dataset (simulated on the CPU): the run is
    'failed' with its error and error.txt, as any crash."""
    from initstudy.data import Dataset
    from initstudy.worker import run_pack

    def no_room(self, device):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 7.00 GiB\nmore")

    monkeypatch.setattr(Dataset, "to", no_room)
    config = RunConfig(scheme="xavier", data_dir=str(tiny_data), epochs=1, device="cpu",
                       quiet=True, out=str(tmp_path / "run"))
    assert run_pack([config]) == ["failed"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == (
        "moving the data and models on cpu failed: OutOfMemoryError: CUDA out of memory. "
        "Tried to allocate 7.00 GiB")
    assert "OutOfMemoryError" in (tmp_path / "run" / "error.txt").read_text()


def test_cpu_slots_divide_the_threads():
    slots = cpu_slots(3, cores=8)
    assert len(slots) == 3 and {s.env["OMP_NUM_THREADS"] for s in slots} == {"2"}
    assert all(s.device == "cpu" and s.env["CUDA_VISIBLE_DEVICES"] == "" for s in slots)
    assert cpu_slots(4, cores=2)[0].env["OMP_NUM_THREADS"] == "1"


@pytest.mark.slow
def test_real_small_sweep_end_to_end_with_wandb_offline(tmp_path, tiny_data, monkeypatch):
    study = tiny_study(tmp_path, tiny_data, ["default", "xavier"])
    out = tmp_path / "out"
    result = subprocess.run(sweep_cmd(study, out, "--wandb", "offline"), capture_output=True,
                            text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "study summary" in result.stderr and "4/4" in result.stderr
    # a log is 120 columns wide: each scheme's row, both means ± std, is one line
    assert re.search(r"│ default .* \d\.\d{4} ± \d\.\d{4} │ +\d\.\d{4} ± \d\.\d{4} │", result.stderr)
    last = result.stderr.strip().splitlines()[-1]  # how to upload the whole study
    assert last.startswith("W&B: the runs were mirrored offline, to ")
    assert f"`wandb sync {out}/*/wandb/offline-run-*`" in last
    runs = plan(load_study(study), out)
    assert [status(c) for c in runs] == ["ok"] * 4
    for config in runs:
        saved = json.loads((Path(config.out) / "config.json").read_text())
        assert saved["group"] == "tiny" and saved["device_used"] == "cpu"
        assert saved["env"]["torch_threads"] == 1  # two workers share the two cores
        offline = list(Path(config.out).glob("wandb/offline-run-*"))
        assert len(offline) == 1  # each worker made its own wandb run
    assert (out / "study.toml").read_text() == study.read_text()
    again = subprocess.run(sweep_cmd(study, out), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "4 already finished, 0 to run" in again.stderr


CRASHING_INIT = """
import os, signal
import torch.nn as nn
def oom(layer):
    raise MemoryError("CUDA out of memory (simulated)")
def killed(layer):
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.slow
def test_a_crashing_run_fails_alone(tmp_path, tiny_data):
    (tmp_path / "crash.py").write_text(CRASHING_INIT)
    study = tiny_study(tmp_path, tiny_data, ["default", f"{tmp_path}/crash.py:oom",
                                             f"{tmp_path}/crash.py:killed"], seeds=1)
    out = tmp_path / "out"
    result = subprocess.run(sweep_cmd(study, out), capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "2 run(s) failed or unfinished" in result.stderr
    runs = {c.scheme.split(":")[-1]: c for c in plan(load_study(study), out)}
    assert status(runs["default"]) == "ok"
    oom = json.loads((Path(runs["oom"].out) / "summary.json").read_text())
    assert oom["status"] == "failed" and "MemoryError" in oom["error"]
    assert "MemoryError" in (Path(runs["oom"].out) / "error.txt").read_text()
    killed = json.loads((Path(runs["killed"].out) / "summary.json").read_text())
    assert killed["status"] == "failed" and "killed by signal 9" in killed["error"]

    rerun = subprocess.run(sweep_cmd(study, out), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 1  # the failed runs are still failed...
    (said,) = [line for line in rerun.stderr.splitlines() if "already finished" in line]
    assert "3 runs, 1 already finished, 2 failed (rerun with --retry-failed), 0 to run -> " \
        f"{out}" in said  # on one line, however long (a log has no terminal width)
    assert json.loads((Path(runs["oom"].out) / "summary.json").read_text()) == oom  # untouched
    retry = subprocess.run(sweep_cmd(study, out, "--retry-failed"), capture_output=True,
                           text=True, timeout=300)
    assert retry.returncode == 1
    assert "3 runs, 1 already finished, 2 to run" in retry.stderr
    assert "MemoryError" in json.loads((Path(runs["oom"].out) / "summary.json").read_text())[
        "error"]  # ...unless asked: retried, and failed again for the same reason


def test_a_studys_eta_is_its_own_pace_counting_down_between_runs(tmp_path):
    clock = [0.0]
    progress = Progress(get_time=lambda: clock[0])
    task_id = progress.add_task("runs", total=10, completed=4, resumed=4, ended_at=0.0,
                                pace=None)
    task, eta = progress.tasks[task_id], StudyETA()
    assert eta.render(task).plain == "-:--:--"  # resumed with 4 done: no pace of its own yet
    clock[0] = 600.0  # its first run ends after 10 min: 5 left at 10 min each
    progress.update(task_id, advance=1, ended_at=600.0)
    assert eta.render(task).plain == "0:50:00"
    clock[0] = 840.0  # and counts down until the next end
    assert eta.render(task).plain == "0:46:00"
    clock[0] = 5000.0  # overdue: never negative
    assert eta.render(task).plain == "0:00:00"

    # Resumed with a recorded pace of 12 min a run: an estimate (~) from the start, counting
    # down, until its own first end sets the pace.
    clock[0] = 0.0
    task_id = progress.add_task("runs", total=10, completed=4, resumed=4, ended_at=0.0,
                                pace=720.0)
    task = progress.tasks[task_id]
    assert eta.render(task).plain == "~1:12:00"
    clock[0] = 300.0
    assert eta.render(task).plain == "~1:07:00"
    clock[0] = 600.0
    progress.update(task_id, advance=1, ended_at=600.0)
    assert eta.render(task).plain == "0:50:00"

    # The sweep's display keeps the fields the column reads as runs end, and each run's line
    # says how far the study is and the time left, for a log that has no bar.
    log = io.StringIO()
    sweep = SweepProgress(total=3, done=1, console=Console(file=log))
    config = RunConfig(out=str(tmp_path / "run"))
    sweep.report("start", config, "running")
    sweep.report("end", config, "failed")
    fields = sweep.progress.tasks[sweep.task].fields
    task = sweep.progress.tasks[sweep.task]
    assert task.completed - fields["resumed"] == 1 and 0 < fields["ended_at"] < 60
    assert "failed 1" in fields["info"]
    config.run_dir.mkdir()
    (config.run_dir / "summary.json").write_text(json.dumps(
        {"status": "failed", "error": "RuntimeError: [/bold] not rich markup " + "x" * 80}))
    sweep.report("start", config, "running")
    sweep.report("end", config, "failed")
    line = log.getvalue().splitlines()[-1]  # one line, wider than the console's 80 columns
    assert line.startswith(f"  failed  {config.run_id}  RuntimeError: [/bold] not rich markup")
    assert re.search(r"x  \(3/3, ETA \d:\d\d:\d\d\)$", line)
    (config.run_dir / "summary.json").write_text(json.dumps(
        {"status": "ok", "val/acc": 0.9856, "test/acc": 0.9876}))
    sweep.report("end", config, "ok")
    line = log.getvalue().splitlines()[-1]
    assert line.startswith(f"      ok  {config.run_id}  val/acc 0.9856  test/acc 0.9876  (")


def test_the_recorded_pace_is_the_finished_runs_median_wall_over_the_runs_at_once(tmp_path):
    runs = [RunConfig(out=str(tmp_path / f"r{i}")) for i in range(5)]
    recorded = [{"status": "ok", "wall_seconds": 900.0},
                {"status": "diverged", "wall_seconds": 300.0},
                {"status": "ok", "wall_seconds": 2000.0},  # paused: the median ignores it
                {"status": "failed", "wall_seconds": 5.0}]  # not a finished run's time
    for config, summary in zip(runs, recorded):
        Path(config.out).mkdir()
        (Path(config.out) / "summary.json").write_text(json.dumps(summary))
    assert recorded_pace(runs, at_once=1) == 900.0
    assert recorded_pace(runs, at_once=2) == 450.0  # two slots, or a pack of two
    assert recorded_pace(runs[3:], at_once=1) is None  # nothing finished: nothing to go by


def test_the_summary_never_pools_accuracy_across_a_schemes_settings(tmp_path):
    # kaiming over a grid of two lrs, xavier at one lr: only xavier's seeds are averaged.
    runs = [RunConfig(scheme=scheme, lr=lr, seed=seed, out=str(tmp_path / f"{scheme}-{lr}-{seed}"))
            for scheme, lrs in (("kaiming", (0.01, 0.1)), ("xavier", (0.01,)))
            for lr in lrs for seed in (0, 1)]
    accs = {("kaiming", 0.01): (0.98, 0.97), ("kaiming", 0.1): (0.11, 0.12),
            ("xavier", 0.01): (0.98, 0.96)}
    for config in runs:
        Path(config.out).mkdir()
        acc = accs[config.scheme, config.lr][config.seed]
        (Path(config.out) / "summary.json").write_text(json.dumps(
            {"status": "ok", "val/acc": acc, "test/acc": acc - 0.01}))
    console = Console(file=io.StringIO(), width=200)
    console.print(summary_table(runs))
    lines = console.file.getvalue().splitlines()
    kaiming = next(line for line in lines if "kaiming" in line)
    xavier = next(line for line in lines if "xavier" in line)
    assert "2 settings" in kaiming and "0.5" not in kaiming  # no mean of 0.98 and 0.11
    assert "0.9700 ± 0.0141" in xavier and "0.9600 ± 0.0141" in xavier
    assert "several settings of lr" in console.file.getvalue()


def workers_of(out: Path) -> list[int]:
    """PIDs of worker processes still running runs in ``out``."""
    result = subprocess.run(["pgrep", "-f", f"initstudy.sweep .*{out}"], capture_output=True,
                            text=True)
    return [int(p) for p in result.stdout.split()]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGKILL", "Ctrl-C", "Ctrl-C, started with SIGINT ignored",
                                 "SIGTERM"])
def test_killed_sweep_resumes_with_every_run_done_exactly_once(tmp_path, tiny_data, how):
    study = tiny_study(tmp_path, tiny_data, ["default", "xavier", "kaiming"], seeds=2,
                       epochs=4)
    out = tmp_path / "out"
    runs = plan(load_study(study), out)
    # A job a script starts with '&' inherits SIGINT ignored, and then Python installs no
    # handler: such a sweep once trained on through Ctrl-C and exited 0 (the suite in CI).
    ignored = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if "ignored" in how \
        else None
    sweep = subprocess.Popen(sweep_cmd(study, out, "--wandb", "disabled"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True, preexec_fn=ignored)
    # Stop it once a run is done while others have not even started: seconds of work left,
    # so the signal cannot arrive as the sweep ends (the trainer is fast on 200 images).
    assert wait_for(lambda: any(status(c) == "ok" for c in runs) and
                    any(status(c) == "pending" for c in runs), timeout=120)
    if how == "SIGKILL":
        sweep.kill()
    elif how == "SIGTERM":  # kill, timeout, a scheduler: the sweep alone gets it
        sweep.terminate()
    else:  # a terminal's Ctrl-C reaches the whole foreground process group
        os.killpg(sweep.pid, signal.SIGINT)
    code = sweep.wait(timeout=60)
    assert code == {"SIGKILL": -9, "SIGTERM": 143}.get(how, 130)
    assert wait_for(lambda: not workers_of(out), timeout=30)  # no orphan trains on
    # What had finished when the sweep and its workers were gone (a run may end between the
    # wait above and the signal).
    finished_before = {c.run_id: (Path(c.out) / "summary.json").read_text()
                       for c in runs if status(c) == "ok"}
    left = {status(c) for c in runs} - {"ok"}
    assert left <= {"running", "pending", "interrupted"} and left
    if how != "SIGKILL":
        assert "running" not in left  # interrupted workers said so

    result = subprocess.run(sweep_cmd(study, out, "--wandb", "disabled"), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"{len(finished_before)} already finished" in result.stderr
    for config in runs:
        assert status(config) == "ok"
        records = [json.loads(line) for line in
                   (Path(config.out) / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in records if "epoch" in r] == [0, 1, 2, 3, 4]  # once each
        for path in Path(config.out).iterdir():
            if path.suffix == ".json":
                json.loads(path.read_text())  # no corrupt file
        assert not list(Path(config.out).glob(".*.tmp"))
    for run_id, text in finished_before.items():  # not redone
        assert (out / run_id / "summary.json").read_text() == text


def test_sweep_cli_dry_run_and_errors(tmp_path, tiny_data):
    study = tiny_study(tmp_path, tiny_data, ["default", "kaiming"], seeds=2, lr=[0.01, 0.1])
    runner = CliRunner()
    result = runner.invoke(app, ["sweep", str(study), "--out", str(tmp_path / "o"), "--dry-run"])
    assert result.exit_code == 0 and "8 runs" in result.stdout and "pending" in result.stdout
    assert not (tmp_path / "o").exists()
    bad = runner.invoke(app, ["sweep", str(tmp_path / "missing.toml")])
    assert bad.exit_code == 2 and bad.stderr.startswith("error: cannot read study file")
    gpus = runner.invoke(app, ["sweep", str(study), "--gpus", "7"])
    assert gpus.exit_code == 2 and "GPU 7 is not visible" in gpus.stderr
    engine = runner.invoke(app, ["sweep", str(study), "--engine", "fast", "--dry-run"])
    assert engine.exit_code == 2 and engine.stderr == (
        "error: unknown engine 'fast'; choose from auto, loop, vmap, bmm\n")


def test_two_sweeps_cannot_share_a_folder(tmp_path):
    from initstudy.sweep import OutLock

    held = OutLock(tmp_path)
    with pytest.raises(StudyError, match="another sweep is running"):
        OutLock(tmp_path)
    del held


@pytest.mark.slow
def test_packed_sweep_trains_runs_together(tmp_path, tiny_data):
    study = tiny_study(tmp_path, tiny_data, ["default", "xavier", "kaiming"], seeds=1)
    out = tmp_path / "out"
    result = subprocess.run(sweep_cmd(study, out, "--pack", "2", "--engine", "bmm",
                                      "--wandb", "disabled"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    runs = plan(load_study(study), out)  # the engine is not in a run's id: the same runs
    assert [status(c) for c in runs] == ["ok"] * 3
    saved = [json.loads((Path(c.out) / "config.json").read_text()) for c in runs]
    assert [c["env"]["pack_size"] for c in saved] == [2, 2, 1]
    assert [c["engine"] for c in saved] == ["bmm"] * 3
    assert [c["env"]["pack_engine"] for c in saved] == ["bmm", "bmm", "loop"]  # one: a loop


def test_packs_group_only_runs_that_may_train_together():
    from initstudy.study import packs

    runs = expand({"schemes": ["default", "xavier", "kaiming"], "seeds": 2, "lr": [0.01, 0.1],
                   "batch_size": [32, 64]})
    units = packs(runs, 8)
    assert sorted(len(u) for u in units) == [4, 4, 8, 8]  # a grid of lrs packs together
    assert all(len({c.batch_size for c in unit}) == 1 for unit in units)
    assert {len({c.lr for c in unit}) for unit in units} == {2}
    assert sorted(c.run_id for u in units for c in u) == sorted(c.run_id for c in runs)
