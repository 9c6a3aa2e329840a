"""Nothing a user made is lost: a finished run is never overwritten by accident, two writers
never share a folder, a failed write is one clear line (and an unfinished run, not a failed
one, for a sweep), and a stopped sweep never says it succeeded."""

import errno
import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from initstudy import runfolder
from initstudy.cli import app
from initstudy.config import RunConfig
from initstudy.study import to_do
from initstudy.worker import run_pack

runner = CliRunner()


def run_cli(data: Path, *args: str):
    return runner.invoke(app, ["run", "--epochs", "1", "--data-dir", str(data), "--device",
                               "cpu", "--batch-size", "50", "-q", *args])


def summary_of(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


@pytest.mark.slow
def test_runs_of_other_options_get_their_own_folders(tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = run_cli(tiny_data, "--scheme", "xavier", "--lr", "0.01")
    second = run_cli(tiny_data, "--scheme", "xavier", "--lr", "0.02")
    assert first.exit_code == 0 and second.exit_code == 0, first.stderr + second.stderr
    folders = sorted((tmp_path / "runs").iterdir())
    assert [f.name for f in folders] == sorted(
        RunConfig(scheme="xavier", lr=lr, epochs=1, batch_size=50).run_id
        for lr in (0.01, 0.02))
    assert all(summary_of(f)["status"] == "ok" for f in folders)
    for result, folder in ((first, "0.01"), (second, "0.02")):  # the printed path says where
        lr = float(folder)
        assert f"-> runs/{RunConfig(scheme='xavier', lr=lr, epochs=1, batch_size=50).run_id}" \
            in result.stdout


@pytest.mark.slow
def test_a_finished_folder_is_never_started_over_by_accident(tiny_data, tmp_path):
    out = tmp_path / "run"
    assert run_cli(tiny_data, "--scheme", "xavier", "--out", str(out)).exit_code == 0
    record = (out / "metrics.jsonl").read_text()

    other = run_cli(tiny_data, "--scheme", "xavier", "--lr", "0.02", "--out", str(out))
    assert other.exit_code == 2
    assert other.stderr.count("\n") == 1 and "holds a finished run of other options" in \
        other.stderr and "--overwrite" in other.stderr
    same = run_cli(tiny_data, "--scheme", "xavier", "--out", str(out))
    assert same.exit_code == 0 and "already done" in same.stdout and "nothing retrained" in \
        same.stdout
    assert (out / "metrics.jsonl").read_text() == record  # untouched

    again = run_cli(tiny_data, "--scheme", "xavier", "--lr", "0.02", "--out", str(out),
                    "--overwrite")
    assert again.exit_code == 0, again.stderr
    assert json.loads((out / "config.json").read_text())["lr"] == 0.02


@pytest.mark.slow
@pytest.mark.parametrize("left", ["interrupted", "failed", "running"])
def test_an_unfinished_folder_is_redone(tiny_data, tmp_path, left):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(RunConfig(scheme="kaiming").to_dict()))
    (out / "summary.json").write_text(json.dumps({"status": left}))
    result = run_cli(tiny_data, "--scheme", "xavier", "--out", str(out))
    assert result.exit_code == 0, result.stderr
    assert summary_of(out)["status"] == "ok" and summary_of(out)["scheme"] == "xavier"


def test_a_second_writer_of_one_folder_refuses(tiny_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".run.lock", "w") as held:  # what a run in another process holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = run_cli(tiny_data, "--scheme", "xavier", "--out", str(out))
    assert result.exit_code == 2
    assert "another initstudy process is writing" in result.stderr
    assert not (out / "summary.json").exists()  # the other writer's folder is left alone


def fail_writes_to(monkeypatch, name: str, code: int = errno.ENOSPC) -> None:
    """Every write of ``name`` in a run folder fails as on a full disk (or with ``code``)."""
    full = OSError(code, os.strerror(code))
    real_open, real_replace, real_write_text = open, os.replace, Path.write_text

    def opened(path, *args, **kwargs):
        if Path(path).name == name:
            raise full
        return real_open(path, *args, **kwargs)

    def replaced(src, dst, *args, **kwargs):
        if Path(dst).name == name:
            raise full
        return real_replace(src, dst, *args, **kwargs)

    def write_text(self, *args, **kwargs):
        if self.name == name:
            raise full
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(runfolder, "open", opened, raising=False)
    monkeypatch.setattr(runfolder.os, "replace", replaced)
    monkeypatch.setattr(Path, "write_text", write_text)


WRITES = ["config.json", "summary.json", "metrics.jsonl", "histograms.jsonl",
          "init_diagnostics.json", "error.txt"]


@pytest.mark.slow
@pytest.mark.parametrize("name", WRITES)
def test_a_failed_write_is_one_line_and_the_run_is_left_unfinished(tiny_data, tmp_path,
                                                                   monkeypatch, name):
    out = tmp_path / "run"
    if name == "error.txt":  # the failure record itself fails: a crash, then a full disk
        fail_writes_to(monkeypatch, "error.txt")
        fail_writes_to(monkeypatch, "histograms.jsonl")
    else:
        fail_writes_to(monkeypatch, name)
    result = run_cli(tiny_data, "--scheme", "xavier", "--out", str(out))
    assert result.exit_code == 2
    assert "Traceback" not in result.output + result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: cannot write ") and "No space left on device" in line
    assert str(out) in line
    summary = json.loads((out / "summary.json").read_text()) if (
        out / "summary.json").exists() else {}
    assert summary.get("status") != "ok"
    if summary.get("status") == "failed":  # where it could still be written it says why
        assert summary["io_error"] is True
    config = RunConfig(scheme="xavier", out=str(out))
    assert to_do([config], retry_failed=False) == [config]  # a sweep redoes it


@pytest.mark.slow
@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOENT, errno.EACCES])
def test_a_read_only_vanished_or_forbidden_folder_is_one_line(tiny_data, tmp_path,
                                                             monkeypatch, code):
    out = tmp_path / "run"
    fail_writes_to(monkeypatch, "metrics.jsonl", code)
    result = run_cli(tiny_data, "--scheme", "xavier", "--out", str(out))
    assert result.exit_code == 2 and "Traceback" not in result.output + result.stderr
    (line,) = result.stderr.splitlines()
    assert line == f"error: cannot write {out / 'metrics.jsonl'}: {os.strerror(code)}"
    assert summary_of(out)["status"] == "failed" and summary_of(out)["io_error"] is True


@pytest.mark.slow
def test_a_worker_whose_writes_fail_leaves_its_run_for_the_next_sweep(tiny_data, tmp_path,
                                                                      monkeypatch):
    configs = [RunConfig(scheme=s, epochs=1, data_dir=str(tiny_data), device="cpu",
                         batch_size=50, quiet=True, out=str(tmp_path / s), wandb="disabled")
               for s in ("xavier", "kaiming")]
    with monkeypatch.context() as m:
        fail_writes_to(m, "histograms.jsonl")
        assert run_pack(configs[:1]) == ["failed"]
    assert run_pack(configs[1:]) == ["ok"]  # the sweep's next run goes on
    assert to_do(configs, retry_failed=False) == configs[:1]
    assert run_pack(configs[:1]) == ["ok"]  # redone on resume
    assert to_do(configs, retry_failed=False) == []


def _mount_tiny(path: Path, size: str) -> bool:
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.slow
def test_a_full_disk_for_real_is_one_line(tiny_data, tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tiny(disk, "48k"):
        pytest.skip("cannot mount a tmpfs here (needs root); the injected-failure tests "
                    "cover each write")
    try:
        result = subprocess.run(
            [sys.executable, "-m", "initstudy.cli", "run", "--epochs", "3", "--data-dir",
             str(tiny_data), "--device", "cpu", "--batch-size", "50", "-q", "--wandb",
             "disabled", "--out", str(disk / "run")], capture_output=True, text=True,
            timeout=300)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        (line,) = [l for l in result.stderr.splitlines() if not l.startswith("data:")]
        assert line.startswith(f"error: cannot write {disk / 'run'}")
        assert "No space left on device" in line
    finally:
        subprocess.run(["umount", str(disk)], check=False)
