"""The wandb mirror, read back from offline files with `wandb leet inspect --json`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from initstudy import RunConfig, train
from initstudy.cli import app
from initstudy.errors import ConfigError
from initstudy.runfolder import read_jsonl
from initstudy.wandbenv import wandb_mode

from helpers import DIAG_BATCH

LAYERS = ["features.0", "features.3", "features.6", "classifer.1", "classifer.4"]
WANDB = Path(sys.executable).with_name("wandb")


def offline_run(tiny_data, tmp_path, name="run", **overrides) -> Path:
    options = dict(scheme="kaiming", data_dir=str(tiny_data), epochs=2, batch_size=50,
                   log_every=2, device="cpu", quiet=True, wandb="offline",
                   diag_batch=DIAG_BATCH, out=str(tmp_path / name))
    train(RunConfig(**(options | overrides)))
    return tmp_path / name


def inspect(run_dir: Path) -> dict[str, list]:
    """The records of the run's offline .wandb file, by type."""
    files = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    out = subprocess.run([str(WANDB), "leet", "inspect", str(files[0]), "--json"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    records: dict[str, list] = {}
    for line in out.splitlines():
        record = json.loads(line)
        records.setdefault(record["type"], []).append(record[record["type"]])
    return records


@pytest.mark.slow
def test_offline_run_is_complete_and_organised(tiny_data, tmp_path):
    run_dir = offline_run(tiny_data, tmp_path, group="smoke")
    records = inspect(run_dir)
    run = records["run"][0]
    assert run["display_name"] == "kaiming-s0" and run["run_group"] == "smoke"
    assert run["job_type"] == "train" and run["tags"] == ["kaiming", "mnist"]
    saved = json.loads((run_dir / "config.json").read_text())
    logged = {k: v for k, v in run["config"]["update"].items() if k != "_wandb"}
    assert logged == json.loads(json.dumps(saved))  # the very dict of config.json

    history = [h["item"] for h in records["history"]]
    keys = set().union(*history)
    for key in ("train/loss", "epoch", "train/loss_epoch", "train/acc", "val/loss", "val/acc",
                "test/loss", "test/acc", "lr"):
        assert key in keys, key
    for layer in LAYERS:
        assert f"grad_norm/{layer}" in keys
        for kind in ("weights", "biases"):
            assert f"{kind}/{layer}.bins" in keys and f"{kind}/{layer}.values" in keys
    epochs = [h for h in history if "epoch" in h]
    assert [h["epoch"] for h in epochs] == [0, 1, 2]
    assert "train/loss" not in epochs[0]  # histograms at init come before any step
    assert epochs[0]["_step"] == 0

    # The histograms are the run folder's, bin for bin.
    local = {(h["epoch"], h["layer"], h["param"]): h
             for h in read_jsonl(run_dir / "histograms.jsonl")}
    for epoch_row in epochs:
        ref = local[(epoch_row["epoch"], "features.0", "weight")]
        assert epoch_row["weights/features.0.values"] == ref["counts"]
        assert epoch_row["weights/features.0.bins"] == pytest.approx(ref["edges"])
    metric_axes = {m.get("name") or m.get("glob_name"): m.get("step_metric")
                   for m in records["metric"]}
    assert metric_axes["test/acc"] == "epoch" and metric_axes["weights/*"] == "epoch"
    assert metric_axes["val/acc"] == "epoch"

    summary = {}
    for update in records["summary"]:
        summary |= update.get("update", {})
    local_summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" == local_summary["status"]
    assert summary["test/acc"] == local_summary["test/acc"]
    for key in ("val/acc", "best_epoch", "best/val/acc", "best/test/acc"):
        assert summary[key] == local_summary[key], key


def test_diverged_run_is_marked_and_its_histograms_logged(tiny_data, tmp_path):
    run_dir = offline_run(tiny_data, tmp_path, scheme="normal:std=10", lr=1e6, epochs=3)
    records = inspect(run_dir)
    summary = {}
    for update in records["summary"]:
        summary |= update.get("update", {})
    assert summary["status"] == "diverged" and summary["diverged_step"] >= 1
    assert records["exit"][0]["exit_code"] == 0


@pytest.mark.slow
def test_a_wandb_failure_mid_run_warns_once_and_training_goes_on(tiny_data, tmp_path,
                                                                 monkeypatch, capsys):
    import wandb

    real_log, calls = wandb.Run.log, []

    def log_until_the_disk_fills(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise OSError(28, "No space left on device")
        return real_log(self, *args, **kwargs)

    monkeypatch.setattr(wandb.Run, "log", log_until_the_disk_fills)
    run_dir = offline_run(tiny_data, tmp_path)
    err = capsys.readouterr().err
    assert err.count("WARNING: wandb failed") == 1 and "No space left" in err
    assert len(calls) == 4  # the mirror stopped calling wandb after the failure
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "ok"
    epochs = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "epoch" in r]
    assert [r["epoch"] for r in epochs] == [0, 1, 2]  # the local record is whole


@pytest.mark.slow
def test_disabled_never_imports_wandb(tiny_data, tmp_path):
    code = (f"import sys; from initstudy import RunConfig, train; "
            f"train(RunConfig(data_dir={str(tiny_data)!r}, epochs=1, device='cpu', quiet=True, "
            f"wandb='disabled', out={str(tmp_path / 'run')!r})); "
            f"print('wandb' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, env=os.environ)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
    assert not (tmp_path / "run" / "wandb").exists()


def test_mode_resolution(monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_mode(None) == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode(None) == "disabled" and wandb_mode("offline") == "offline"
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert wandb_mode(None) == "offline"
    with pytest.raises(ConfigError, match="offline, online, disabled"):
        wandb_mode("sometimes")


def test_online_without_a_key_fails_before_training(tiny_data, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    result = CliRunner().invoke(app, ["run", "--wandb", "online", "--data-dir", str(tiny_data),
                                      "--out", str(tmp_path / "run"), "-q"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "wandb login" in result.stderr and "--wandb offline" in result.stderr
    assert not (tmp_path / "run").exists()


def test_online_without_network_fails_before_training(tiny_data, tmp_path, monkeypatch):
    import wandb

    wandb.teardown()  # wandb caches credentials per process; a fresh process reads them anew
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on port 9
    result = CliRunner().invoke(app, ["run", "--wandb", "online", "--data-dir", str(tiny_data),
                                      "--out", str(tmp_path / "run"), "-q"])
    assert result.exit_code == 2 and "cannot reach http://127.0.0.1:9" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_any_model_is_mirrored_layer_by_layer(tiny_data, tmp_path):
    run_dir = offline_run(tiny_data, tmp_path, model="mlp:depth=3,width=16,act=tanh")
    records = inspect(run_dir)
    run = records["run"][0]
    assert run["display_name"] == "mlp-depth=3-width=16-act=tanh-kaiming-s0"
    assert run["tags"] == ["kaiming", "mnist", "mlp"]
    keys = set().union(*(h["item"] for h in records["history"]))
    for layer in ("layers.1", "layers.3", "layers.5"):
        assert f"grad_norm/{layer}" in keys and f"weights/{layer}.bins" in keys
    summary = {}
    for update in records["summary"]:
        summary |= update.get("update", {})
    assert summary["init/layers.1/saturated_frac"] >= 0 and summary["status"] == "ok"


@pytest.mark.slow
def test_a_report_logs_its_conclusion_as_one_wandb_run(tmp_path):
    from test_report import fake_run

    runs = tmp_path / "runs"
    for seed, (d, k) in enumerate([(0.90, 0.96), (0.91, 0.965), (0.92, 0.97)]):
        fake_run(runs, "default", seed, [0.1, 0.8, d], vals=[0.1, 0.8, d])
        fake_run(runs, "kaiming", seed, [0.1, 0.9, k], vals=[0.1, 0.9, k])
    (runs / "study.toml").write_text('name = "tiny-study"\n')
    out = tmp_path / "report"
    for _ in range(2):  # made twice: still one report run in the folder
        result = CliRunner().invoke(app, ["report", str(runs), "--out", str(out),
                                          "--wandb", "offline"])
        assert result.exit_code == 0, result.output
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    assert f"upload it with `wandb sync {run_dir}`" in result.stderr
    records = inspect(out)
    run = records["run"][0]
    assert run["run_group"] == "tiny-study" and run["job_type"] == "report"
    logged = {k: v for h in records["history"] for k, v in h["item"].items()}
    for key in ("tables/c1/per_scheme", "tables/c1/against_default",
                "tables/c1/held_equal_in_this_comparison", "tables/provenance/table"):
        assert logged[f"{key}._type"] == "table-file", key
    images = {k[:-len("._type")] for k, v in logged.items() if v == "image-file"}
    assert {f"figures/c1/{p.stem}" for p in (out / "figures").glob("*.png")} == images
    assert logged["figures/c1/final_acc.caption"].startswith("Final accuracy on the test")
    summary = {k: v for s in records["summary"] for k, v in s["update"].items()}
    assert summary["c1/kaiming/verdict"] == "better"  # +5.5 points, Welch p < 0.01 at n = 3
    assert summary["c1/kaiming/n"] == 3 and summary["c1/default/test_acc"] == pytest.approx(0.91)
    assert summary["c1/kaiming/diff_lo"] < summary["c1/kaiming/diff"] < summary["c1/kaiming/diff_hi"]


def test_a_wandb_failure_never_stops_a_report(tmp_path, monkeypatch, capsys):
    from initstudy import dashboard
    from initstudy.render import Section

    def broken(*args, **kwargs):
        raise RuntimeError("the service died")

    monkeypatch.setattr(dashboard, "_log", broken)
    assert dashboard.log_report([Section("h1", "t")], [], tmp_path, "t", "g", "p",
                                "offline") is None
    assert "WARNING: wandb failed (RuntimeError: the service died)" in capsys.readouterr().err


def test_a_report_online_checks_key_and_server_before_anything(tmp_path, monkeypatch):
    import wandb

    from test_report import fake_run

    runs = tmp_path / "runs"
    fake_run(runs, "default", 0, [0.1, 0.9])
    wandb.teardown()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on port 9
    result = CliRunner().invoke(app, ["report", str(runs), "--out", str(tmp_path / "r"),
                                      "--wandb", "online"])
    assert result.exit_code == 2 and "cannot reach http://127.0.0.1:9" in result.stderr
    assert not (tmp_path / "r").exists()
    bad = CliRunner().invoke(app, ["report", str(runs), "--out", str(tmp_path / "r"),
                                   "--wandb", "disabled"])
    assert bad.exit_code == 2 and "offline or online" in bad.stderr
