"""Reports from run folders with known numbers: exact table values, valid figures, a
self-contained HTML page, and never pooling runs that differ in more than scheme and seeds."""

import csv
import json
import math
import re
import struct
from pathlib import Path

import pytest
from scipy import stats as scipy_stats
from typer.testing import CliRunner

from initstudy.cli import app
from initstudy.report import (compare, comparisons, load_runs, make_report, prob_beats,
                              bootstrap_ci)

LAYERS = ["features.0", "features.3", "features.6", "classifer.1", "classifer.4"]


def fake_run(root: Path, scheme: str, seed: int, accs: list[float], status: str = "ok",
             lr: float = 0.01, dataset: str = "mnist-sample", epochs: int = 2) -> Path:
    """A run folder as `train` writes it, with test accuracy ``accs[e]`` after epoch e."""
    folder = root / f"{scheme}-s{seed}-lr{lr}-{dataset}"
    folder.mkdir(parents=True)
    config = {"scheme": scheme, "seed": seed, "data_seed": None, "dataset": dataset,
              "dataset_used": dataset, "train_subset": None, "subset_seed": 0,
              "epochs": epochs, "batch_size": 128, "optimizer": "sgd", "lr": lr,
              "momentum": 0.9, "weight_decay": 0.0, "loss": "ce", "device_used": "cpu",
              "env": {"torch": "2.14.1", "torchvision": "0.29.1", "python": "3.11.7",
                      "initstudy": "0.1.0", "git_commit": "abc123", "git_dirty": False,
                      "hostname": "h", "device_name": "cpu",
                      "started_at": f"2026-11-29T0{seed}:00:00+00:00"}}
    (folder / "config.json").write_text(json.dumps(config))
    epochs, steps = [], []
    for e, acc in enumerate(accs):
        record = {"epoch": e, "step": 10 * e, "train/loss": None if e == 0 else 1.0 / e,
                  "train/acc": None if e == 0 else acc, "test/loss": 2.0 - acc,
                  "test/acc": acc, "lr": lr}
        record |= {f"weight_std/{l}": 0.1 + 0.01 * e for l in LAYERS}
        record |= {f"rel_update/{l}": 0.0 if e == 0 else 0.1 / e for l in LAYERS}
        epochs.append(record)
        if e:
            steps.append({"step": 10 * e, "train/loss": 1.0 / e})
    with open(folder / "metrics.jsonl", "w") as f:
        for record in epochs[:1] + [r for pair in zip(steps, epochs[1:]) for r in pair]:
            f.write(json.dumps(record) + "\n")
    with open(folder / "histograms.jsonl", "w") as f:
        for e in (0, len(accs) - 1):
            for l in LAYERS:
                f.write(json.dumps({"epoch": e, "step": 10 * e, "layer": l, "param": "weight",
                                    "count": 4, "nonfinite": 0, "edges": [0, 1, 2],
                                    "counts": [1, 3]}) + "\n")
                f.write(json.dumps({"epoch": e, "step": 10 * e, "layer": l, "param": "bias",
                                    "count": 2, "nonfinite": 0, "edges": [0, 1, 2],
                                    "counts": [1, 1], "values": [0.1, -0.1]}) + "\n")
    (folder / "init_diagnostics.json").write_text(json.dumps({
        "layers": [{"name": l, "out_std": 1.0 + i, "grad_out_std": 0.1 * (i + 1)}
                   for i, l in enumerate(LAYERS)], "logit_std": 5.0, "max_prob_mean": 0.5}))
    summary = {"status": status, "scheme": scheme, "seed": seed, "wall_seconds": 60.0,
               "test/acc": accs[-1], "test/loss": 2.0 - accs[-1], "train/loss": 0.5}
    if status == "diverged":
        summary |= {"test/loss": None, "train/loss": None, "diverged_step": 7}
    if status == "failed":
        summary = {"status": "failed", "scheme": scheme, "seed": seed, "error": "boom"}
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


@pytest.fixture
def study(tmp_path) -> Path:
    root = tmp_path / "runs"
    for seed, final in enumerate([0.90, 0.92, 0.94]):
        fake_run(root, "default", seed, [0.1, 0.8, final])
    for seed, final in enumerate([0.95, 0.96, 0.97]):
        fake_run(root, "kaiming", seed, [0.1, 0.93, final])
    fake_run(root, "kaiming", 3, [0.1, 0.098], status="diverged")
    fake_run(root, "kaiming", 4, [0.1, 0.5, 0.6], status="failed")
    return root


def test_table_values_are_exact(study):
    (comparison,) = comparisons(load_runs([study]))
    stats, target = compare(comparison, baseline="default", target=0.93)
    assert target == 0.93
    default, kaiming = stats
    assert (default.runs, default.ok, default.diverged, default.failed) == (3, 3, 0, 0)
    assert default.acc_mean == pytest.approx(0.92)
    assert default.acc_std == pytest.approx(0.02)
    assert default.acc_median == pytest.approx(0.92) and default.acc_best == 0.94
    assert default.test_loss == pytest.approx(2.0 - 0.92)
    assert default.epochs_to_target == 2 and default.reached == 1  # only 0.94 reaches 0.93

    # The diverged run counts in the mean at its accuracy; the failed one is counted apart.
    assert (kaiming.runs, kaiming.ok, kaiming.diverged, kaiming.failed) == (5, 3, 1, 1)
    accs = [0.95, 0.96, 0.97, 0.098]
    assert kaiming.accs == accs and kaiming.success == 3 / 5
    assert kaiming.acc_mean == pytest.approx(sum(accs) / 4)
    assert kaiming.acc_median == pytest.approx(0.955) and kaiming.acc_best == 0.97
    assert kaiming.epochs_to_target == pytest.approx((1 + 1 + 1) / 3) and kaiming.reached == 3
    assert kaiming.test_loss == pytest.approx(2.0 - 0.96)  # the diverged run has no loss
    assert kaiming.diff == pytest.approx(sum(accs) / 4 - 0.92)
    assert kaiming.p_beats == pytest.approx((3 * 3 + 0) / 12)  # 0.098 loses to all three
    expected_p = scipy_stats.ttest_ind(accs, [0.90, 0.92, 0.94], equal_var=False).pvalue
    assert kaiming.welch == pytest.approx(expected_p)
    lo, hi = kaiming.diff_ci
    assert lo < kaiming.diff < hi


def test_bootstrap_interval_and_probability_of_beating():
    assert bootstrap_ci([0.5, 0.5, 0.5]) == (0.5, 0.5)
    lo, hi = bootstrap_ci([0.1, 0.2, 0.3, 0.4])
    assert 0.1 <= lo < 0.25 < hi <= 0.4
    assert bootstrap_ci([0.1, 0.2, 0.3, 0.4]) == (lo, hi)  # seeded: the same every time
    assert prob_beats([2, 3], [1, 2]) == (2 + 1.5) / 4


def test_target_chosen_from_the_data(study):
    (comparison,) = comparisons(load_runs([study]))
    _, target = compare(comparison)
    assert target == math.floor(0.95 * 0.92 * 100) / 100  # kaiming's mean is dragged down


def test_runs_that_differ_beyond_scheme_and_seed_are_never_pooled(tmp_path):
    root = tmp_path / "runs"
    for seed in range(2):
        fake_run(root, "default", seed, [0.1, 0.8, 0.9])
        fake_run(root, "default", seed, [0.1, 0.4, 0.5], lr=0.1)
        fake_run(root, "default", seed, [0.1, 0.6, 0.7], dataset="fashion-mnist")
    groups = comparisons(load_runs([root]))
    assert len(groups) == 3 and all(len(g.runs) == 2 for g in groups)
    make_report([root], tmp_path / "report")
    readme = (tmp_path / "report" / "README.md").read_text()
    assert readme.count("## Comparison") == 3
    assert (tmp_path / "report" / "figures" / "c3_test_acc.png").exists()


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


def test_report_files(study, tmp_path):
    out = tmp_path / "report"
    make_report([study], out, target=0.93)
    readme = (out / "README.md").read_text()
    assert "| default | 3 | 3 | 0 | 0 | 3/3 | 92.00 | 2.00 |" in readme
    assert "| kaiming | 5 | 3 | 1 | 1 | 3/5 |" in readme
    figures = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert figures == sorted(["train_loss.png", "test_acc.png", "final_acc.png",
                              "weight_std.png", "rel_update.png", "weight_hist.png",
                              "biases.png", "init_signal.png"])
    for name in figures:
        width, height = png_size(out / "figures" / name)
        assert width > 300 and height > 200
        assert f"(figures/{name})" in readme
    page = (out / "report.html").read_text()
    assert page.count("<img") == len(figures)
    sources = re.findall(r"""(?:src|href)\s*=\s*['"]([^'"]*)""", page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<link" not in page and "<script" not in page and "url(" not in page
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 8 and {r["status"] for r in rows} == {"ok", "diverged", "failed"}
    assert "abc123" in readme and "torch" in readme  # provenance
    assert "| compute hours | 0.12 |" in readme  # 7 x 60 s: the failed run has no time


def test_report_command(study, tmp_path):
    result = CliRunner().invoke(app, ["report", str(study), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0 and (tmp_path / "r" / "report.html").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = CliRunner().invoke(app, ["report", str(empty), "--out", str(tmp_path / "r2")])
    assert bad.exit_code == 2 and "no run folders" in bad.stderr
