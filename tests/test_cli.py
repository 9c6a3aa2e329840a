"""The ``initstudy`` command end to end on tiny data, and its one-line errors."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from initstudy.cli import app
from initstudy.data import FILES
from initstudy.schemes import SCHEMES

from helpers import wait_for

runner = CliRunner()


def run_cli(*args: str):
    return runner.invoke(app, list(args))


def test_schemes_lists_every_scheme_with_parameters():
    result = run_cli("schemes")
    assert result.exit_code == 0
    for name in SCHEMES:
        assert name in result.stdout
    assert "nonlinearity=relu" in result.stdout and "N(0, 0.5)" in result.stdout


def test_the_documented_scheme_table_is_the_registry():
    docs = (Path(__file__).resolve().parents[1] / "docs" / "schemes.md").read_text()
    table = run_cli("schemes", "--markdown").stdout.strip()
    assert table in docs and table.count("\n") == len(SCHEMES) + 1
    assert "| lsuv |" in table


def _commands(group, path=()):
    """(argv prefix, click command) of every command and sub-group under ``group``."""
    for name, command in group.commands.items():
        yield (*path, name), command
        if hasattr(command, "commands"):
            yield from _commands(command, (*path, name))


def test_every_help_text_shows_whole_on_one_line():
    """Help goes through Rich, which reads '[word...]' as a style and drops it, and keeps a
    docstring's line breaks in a group's list of commands: on a terminal wide enough, each
    command's summary and each option's help must show whole, each on one line."""
    def lines(*argv: str) -> list[str]:
        result = runner.invoke(app, [*argv, "--help"], env={"COLUMNS": "1000"})
        assert result.exit_code == 0, result.output
        return [" ".join(line.replace("│", " ").split()) for line in result.stdout.splitlines()]

    group = typer.main.get_command(app)
    checked = 0
    for argv, command in [((), group), *_commands(group)]:
        shown = lines(*argv)
        texts = [p.help for p in command.params if getattr(p, "help", None)]
        if hasattr(command, "commands"):
            texts += [sub.help.split("\n\n")[0] for sub in command.commands.values()]
        for text in texts:
            assert any(" ".join(text.split()) in line for line in shown), (argv, text)
            checked += 1
    assert checked > 50  # every command's options, not none


@pytest.mark.slow
def test_the_cli_starts_without_matplotlib_or_torch():
    """`initstudy run` and `sweep` (a sweep's parent process) start without matplotlib;
    `report` and `inspect --plot` load it when they draw (their tests). `--help` and `report`
    start without torch too: the commands that train or build a model import it."""
    probe = ("import sys, initstudy.cli; "
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'matplotlib', 'torch'}))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.stdout.strip() == "[]", result.stderr


@pytest.mark.slow
def test_run_end_to_end(tiny_data, tmp_path):
    out = tmp_path / "run"
    result = run_cli("run", "--scheme", "normal:std=0.05", "--seed", "3", "--epochs", "2",
                     "--data-dir", str(tiny_data), "--batch-size", "50", "--lr", "0.01",
                     "--device", "cpu", "--out", str(out), "--quiet")
    assert result.exit_code == 0, result.stderr
    assert "normal-std=0.05-s3: ok" in result.stdout and str(out) in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["seed"] == 3 and summary["epochs"] == 2
    config = json.loads((out / "config.json").read_text())
    assert config["scheme_params"]["std"] == 0.05 and config["batch_size"] == 50
    # The options took effect: weights drawn with std 0.05 at init, 4 steps of 50 an epoch.
    at_init = [json.loads(line) for line in (out / "histograms.jsonl").read_text().splitlines()
               if json.loads(line)["epoch"] == 0 and json.loads(line)["param"] == "weight"]
    assert all(r["std"] == pytest.approx(0.05, rel=0.1) for r in at_init) and len(at_init) == 5
    assert summary["steps"] == 2 * 4  # 183 training images (17 held out) in batches of 50


def test_run_says_where_the_data_came_from_and_prints_validation_and_test(tiny_data, tmp_path):
    out = tmp_path / "run"
    result = run_cli("run", "--epochs", "2", "--data-dir", str(tiny_data), "--device", "cpu",
                     "--out", str(out), "--val-size", "40")
    assert result.exit_code == 0, result.stderr
    raw = tiny_data / "MNIST" / "raw"
    assert (f"data: mnist from {raw} (NOT the official files): 160 train / 40 validation / "
            f"100 test images") in result.stderr
    assert "val acc" in result.stderr and "test acc" in result.stderr  # each epoch's progress
    summary = json.loads((out / "summary.json").read_text())
    line = result.stdout.strip().splitlines()[-1]
    assert f"val/acc {summary['val/acc']:.4f}  test/acc {summary['test/acc']:.4f}" in line
    assert f"best epoch {summary['best_epoch']} by val/acc" in line


def test_val_size_zero_trains_on_every_training_image(tiny_data, tmp_path):
    out = tmp_path / "run"
    result = run_cli("run", "--epochs", "1", "--data-dir", str(tiny_data), "--device", "cpu",
                     "--out", str(out), "--val-size", "0", "-q")
    assert result.exit_code == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val/acc"] is None and summary["best_epoch"] is None
    assert summary["steps"] == 2  # 200 images in batches of 128
    assert "val/acc -" in result.stdout
    bad = run_cli("run", "--data-dir", str(tiny_data), "--device", "cpu", "--val-size", "-1")
    assert bad.exit_code == 2 and "validation size must be >= 0" in bad.stderr


def test_offline_mnist_falls_back_to_the_sample_and_records_it(tmp_path):
    out = tmp_path / "run"
    result = run_cli("run", "--scheme", "kaiming", "--epochs", "1", "--train-subset", "200",
                     "--data-dir", str(tmp_path / "empty"), "--device", "cpu", "--out", str(out),
                     "-q")
    assert result.exit_code == 0, result.stderr
    assert "WARNING" in result.stderr and "mnist-sample" in result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["dataset"] == "mnist" and config["dataset_used"] == "mnist-sample"
    assert config["env"]["train_images"] == 200
    assert json.loads((out / "summary.json").read_text())["dataset"] == "mnist-sample"


def corrupt_data(tmp_path: Path, tiny_data: Path) -> Path:
    path = tiny_data / "MNIST" / "raw" / FILES["train_images"]
    path.write_bytes(path.read_bytes()[:1000])
    return tiny_data


def unwritable(tmp_path: Path) -> str:
    (tmp_path / "a-file").write_text("")
    return str(tmp_path / "a-file" / "run")


BAD_INPUTS = [
    (["--scheme", "bogus"], "unknown scheme 'bogus'"),
    (["--scheme", "kaiming:mode=sideways"], "fan_in or fan_out"),
    (["--lr", "0"], "learning rate must be a positive number"),
    (["--lr", "-0.1"], "learning rate must be a positive number"),
    (["--epochs", "0"], "epochs must be at least 1"),
    (["--batch-size", "-5"], "batch size must be at least 1"),
    (["--strict-data", "--data-dir", "{empty}"], "no mnist files"),
    (["--data-dir", "{corrupt}"], "truncated"),
    (["--device", "cuda:99" if torch.cuda.is_available() else "cuda"], "cuda"),
    (["--out", "{unwritable}"], "cannot write to output folder"),
]


@pytest.mark.parametrize("args,fragment", BAD_INPUTS)
def test_bad_input_is_one_clear_line(tiny_data, tmp_path, args, fragment):
    values = {"{empty}": str(tmp_path / "empty"), "{corrupt}": None, "{unwritable}": None}
    args = [a.replace("{empty}", values["{empty}"]) for a in args]
    if "{corrupt}" in args:
        args[args.index("{corrupt}")] = str(corrupt_data(tmp_path, tiny_data))
    if "{unwritable}" in args:
        args[args.index("{unwritable}")] = unwritable(tmp_path)
    base = ["run", "--epochs", "1", "--device", "cpu", "--data-dir", str(tiny_data), "-q",
            "--out", str(tmp_path / "run")]
    result = run_cli(*base, *args)  # later options override earlier ones
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.slow
def test_a_run_killed_with_sigterm_says_interrupted(tiny_data, tmp_path):
    """kill, timeout or a scheduler's time limit: the run's folder says what happened."""
    out = tmp_path / "run"
    run = subprocess.Popen([sys.executable, "-m", "initstudy.cli", "run", "--epochs", "500",
                            "--data-dir", str(tiny_data), "--device", "cpu", "--wandb",
                            "disabled", "-q", "--out", str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"  # an epoch done: training, not starting up
    assert wait_for(lambda: metrics.exists() and '"epoch": 1' in metrics.read_text(), 120)
    run.terminate()
    assert run.wait(timeout=60) == 143
    assert "interrupted" in run.stderr.read()
    recorded = json.loads((out / "summary.json").read_text())
    assert recorded["status"] == "interrupted" and "Terminated" in recorded["error"]


@pytest.mark.slow
def test_console_script_with_a_users_init_file(tiny_data, tmp_path):
    """The installed entry point, in a fresh process, with `file.py:function`."""
    (tmp_path / "inits.py").write_text(textwrap.dedent("""
        import torch.nn as nn
        def init_weights(layer):
            if type(layer) == nn.Conv2d:
                nn.init.normal_(layer.weight, mean=0, std=0.05)
    """))
    exe = Path(sys.executable).with_name("initstudy")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "initstudy.cli"]
    result = subprocess.run(
        command + ["run", "--scheme", "inits.py:init_weights", "--epochs", "1", "--data-dir",
                   str(tiny_data), "--device", "cpu", "--out", str(tmp_path / "run")],
        cwd=tmp_path, capture_output=True, text=True, env=os.environ | {"COLUMNS": "100"},
        timeout=120)
    assert result.returncode == 0, result.stderr
    assert "inits-init_weights-s0: ok" in result.stdout
    # Not a terminal: one line an epoch, and no progress bar printed after it at the end.
    assert result.stderr.count("epoch 1/1") == 1 and "━" not in result.stderr
    assert json.loads((tmp_path / "run" / "config.json").read_text())["scheme"] == \
        "inits.py:init_weights"
