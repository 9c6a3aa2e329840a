"""Reports from run folders with known numbers: exact table values, valid figures, a
self-contained HTML page, and never pooling runs that differ in more than scheme and seeds."""

import csv
import json
import math
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats
from typer.testing import CliRunner

from initstudy.cli import app
from initstudy.analysis import compare
from initstudy.report import make_report
from initstudy.results import comparisons, load_runs
from initstudy.stats import holm, mean_ci, prob_beats

LAYERS = ["features.0", "features.3", "features.6", "classifer.1", "classifer.4"]


def fake_run(root: Path, scheme: str, seed: int, accs: list[float], status: str = "ok",
             lr: float = 0.01, dataset: str = "mnist-sample", epochs: int = 2,
             vals: list[float] | None = None) -> Path:
    """A run folder as `train` writes it, with test accuracy ``accs[e]`` after epoch e and,
    when given, validation accuracy ``vals[e]`` (else none: a run from before validation)."""
    folder = root / f"{scheme}-s{seed}-lr{lr}-{dataset}"
    folder.mkdir(parents=True)
    config = {"scheme": scheme, "seed": seed, "data_seed": None, "dataset": dataset,
              "dataset_used": dataset, "train_subset": None, "subset_seed": 0,
              "epochs": epochs, "batch_size": 128, "optimizer": "sgd", "lr": lr,
              "momentum": 0.9, "weight_decay": 0.0, "loss": "ce", "device_used": "cpu",
              "env": {"torch": "2.14.1", "torchvision": "0.29.1", "python": "3.11.7",
                      "initstudy": "0.1.0", "git_commit": "abc123", "git_dirty": False,
                      "hostname": "h", "device_name": "cpu",
                      "started_at": f"2026-11-29T0{seed}:00:00+00:00",
                      "train_images": 1000, "val_images": 100 if vals else 0,
                      "test_images": 500}}
    (folder / "config.json").write_text(json.dumps(config))
    epochs, steps = [], []
    for e, acc in enumerate(accs):
        record = {"epoch": e, "step": 10 * e, "train/loss": None if e == 0 else 1.0 / e,
                  "train/acc": None if e == 0 else acc, "test/loss": 2.0 - acc,
                  "test/acc": acc, "lr": lr}
        if vals:
            record |= {"val/acc": vals[e], "val/loss": 2.0 - vals[e]}
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
               "test/acc": accs[-1], "test/loss": 2.0 - accs[-1], "train/loss": 0.5,
               "val/acc": vals[-1] if vals else None}
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
    analysis = compare(comparison, baseline="default", target=0.93)
    stats, target = analysis.stats, analysis.target
    assert target == 0.93 and analysis.split == "test"  # these runs have no validation
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
    assert kaiming.accs == accs
    assert kaiming.acc_mean == pytest.approx(sum(accs) / 4)
    assert kaiming.acc_median == pytest.approx(0.955) and kaiming.acc_best == 0.97
    assert kaiming.epochs_to_target == pytest.approx((1 + 1 + 1) / 3) and kaiming.reached == 3
    assert kaiming.test_loss == pytest.approx(2.0 - 0.96)  # the diverged run has no loss
    assert kaiming.diff == pytest.approx(sum(accs) / 4 - 0.92)
    assert kaiming.p_beats == pytest.approx((3 * 3 + 0) / 12)  # 0.098 loses to all three
    expected_p = scipy_stats.ttest_ind(accs, [0.90, 0.92, 0.94], equal_var=False).pvalue
    assert kaiming.welch == pytest.approx(expected_p)
    assert kaiming.welch_holm == pytest.approx(expected_p)  # one scheme compared: no change
    expected_ci = scipy_stats.ttest_ind(accs, [0.90, 0.92, 0.94],
                                        equal_var=False).confidence_interval(0.95)
    assert kaiming.diff_ci == pytest.approx((expected_ci.low, expected_ci.high))
    # The interval and the p beside it agree: 0 is inside exactly when p >= 0.05.
    assert (kaiming.diff_ci[0] <= 0 <= kaiming.diff_ci[1]) == (kaiming.welch >= 0.05)
    assert kaiming.verdict == "inconclusive"  # one seed diverged: the spread is wide
    assert default.acc_ci == pytest.approx(tuple(scipy_stats.ttest_1samp(
        [0.90, 0.92, 0.94], 0.92).confidence_interval(0.95)))


def test_mean_interval_and_probability_of_beating():
    assert mean_ci([0.5, 0.5, 0.5]) == (0.5, 0.5)  # no spread: the value itself
    assert all(math.isnan(x) for x in mean_ci([0.5]))  # one run: no interval
    lo, hi = mean_ci([0.1, 0.2, 0.3, 0.4])
    assert hi - lo == pytest.approx(2 * scipy_stats.t.ppf(0.975, 3) * scipy_stats.sem(
        [0.1, 0.2, 0.3, 0.4]))
    assert prob_beats([2, 3], [1, 2]) == (2 + 1.5) / 4
    assert prob_beats([0.99] * 3, [0.99] * 4) == 0.5  # all tied: a coin
    rng = np.random.default_rng(0)
    for _ in range(20):  # wins plus half the ties, pair by pair, with ties common
        a, b = (rng.integers(0, 4, rng.integers(1, 7)).tolist() for _ in "ab")
        assert prob_beats(a, b) == pytest.approx(
            sum((x > y) + (x == y) / 2 for x in a for y in b) / (len(a) * len(b)))


def test_target_chosen_from_the_data(study):
    (comparison,) = comparisons(load_runs([study]))
    target = compare(comparison).target
    assert target == math.floor(0.95 * 0.92 * 100) / 100  # kaiming's mean is dragged down


@pytest.mark.slow
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
    assert "| default | 3 | 3 | 0 | 0 | 3/3 | - | 92.00 | 2.00 |" in readme  # no validation
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


@pytest.mark.slow
def test_report_command(study, tmp_path):
    result = CliRunner().invoke(app, ["report", str(study), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0 and (tmp_path / "r" / "report.html").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = CliRunner().invoke(app, ["report", str(empty), "--out", str(tmp_path / "r2")])
    assert bad.exit_code == 2 and "no run folders" in bad.stderr


@pytest.fixture
def tuned_study(tmp_path) -> Path:
    """default and kaiming over a learning-rate grid, with validation accuracy. At default's
    lr 0.1 validation is best but test is worse than at 0.01: a report that peeked at the
    test split would choose differently."""
    root = tmp_path / "runs"
    grid = {  # scheme -> lr -> (final val accs over seeds, final test accs over seeds)
        "default": {0.01: ([0.90, 0.91, 0.92], [0.95, 0.96, 0.97]),
                    0.1: ([0.93, 0.94, 0.95], [0.91, 0.92, 0.93])},
        "kaiming": {0.001: ([0.80, 0.81, 0.82], [0.80, 0.81, 0.82]),
                    0.01: ([0.96, 0.97, 0.975], [0.96, 0.97, 0.98]),
                    0.1: ([0.1, 0.1, 0.96], [0.1, 0.1, 0.96])},
    }
    for scheme, by_lr in grid.items():
        for lr, (vals, tests) in by_lr.items():
            for seed, (val, test) in enumerate(zip(vals, tests)):
                diverged = scheme == "kaiming" and lr == 0.1 and seed < 2
                fake_run(root, scheme, seed, [0.1, test - 0.05, test], lr=lr,
                         vals=[0.1, val - 0.05, val], status="diverged" if diverged else "ok")
    (root / "study.toml").write_text('name = "t"\ntune = ["lr"]\nschemes = ["default"]\n')
    return root


def test_tuning_chooses_on_validation_and_reports_test_of_that_choice(tuned_study):
    (comparison,) = comparisons(load_runs([tuned_study]), tuned=("lr",))
    analysis = compare(comparison)
    default, kaiming = analysis.selections
    assert default.best.values == (0.1,) and kaiming.best.values == (0.01,)
    stats = {s.scheme: s for s in analysis.stats}
    assert stats["default"].setting == "lr=0.1"
    assert stats["default"].acc_mean == pytest.approx(0.92)  # test at lr 0.1, not at 0.01
    assert stats["default"].val_mean == pytest.approx(0.94)
    assert stats["kaiming"].acc_mean == pytest.approx(0.97)
    assert stats["kaiming"].diff == pytest.approx(0.97 - 0.92)
    # Stable range: every seed trained and within a point of the best mean validation acc.
    assert [s.values for s in default.stable] == [(0.1,)]
    assert [s.values for s in kaiming.stable] == [(0.01,)]  # 0.1 diverged twice
    assert default.edge == "highest" and kaiming.edge is None
    assert kaiming.settings[-1].diverged == 2
    assert analysis.best.scheme == "kaiming" and analysis.split == "val"


@pytest.mark.slow
def test_tuned_report_names_splits_tables_and_figures(tuned_study, tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["report", str(tuned_study), "--out", str(out)])
    assert result.exit_code == 0, result.output  # tune = ["lr"] comes from study.toml
    readme = (out / "README.md").read_text()
    assert "at each scheme's best lr (chosen on validation)" in readme
    assert "| default | lr=0.1 | 94.00 | [91.52, 96.48] | lr=0.1 | 1/2 | best at the highest " \
           "value tried: extend the grid up |" in readme
    assert "| kaiming | 81.00 | 96.83 * | 38.67 (2/3 div) |" in readme
    assert "| Holm p | TOST p | TOST Holm p |" in readme and "| verdict |" in readme
    assert "Student-t intervals" in readme and "within ±0.1 points" in readme
    assert "validation split, 100 images" in readme
    assert "test split, 500 images" in readme
    figures = {p.name for p in (out / "figures").glob("*.png")}
    assert {"sensitivity.png", "val_acc.png", "test_acc.png"} <= figures
    assert "![Sensitivity: final validation accuracy" in readme
    assert "over the whole range (left) and within 3 points of the best (right)" in readme
    # The same folder untuned: lr differs, so each lr is its own comparison.
    untuned = CliRunner().invoke(app, ["report", str(tuned_study), "--out", str(tmp_path / "u"),
                                       "--tune", "lr", "--tune", "momentum"])
    assert untuned.exit_code == 0, untuned.output
    bad = CliRunner().invoke(app, ["report", str(tuned_study), "--out", str(tmp_path / "b"),
                                   "--tune", "optimiser"])
    assert bad.exit_code == 2 and "cannot tune optimiser" in bad.stderr


def test_tuning_needs_validation_accuracy(study, tmp_path):
    result = CliRunner().invoke(app, ["report", str(study), "--out", str(tmp_path / "r"),
                                      "--tune", "lr"])
    assert result.exit_code == 2 and "needs validation accuracy" in result.stderr


def test_holm_adjustment():
    assert holm([0.01, 0.04, 0.03, math.nan]) == pytest.approx([0.03, 0.06, 0.06, math.nan],
                                                               nan_ok=True)
    assert holm([0.5, 0.9]) == [1.0, 1.0]  # capped at 1, and never below a smaller p's
    assert holm([]) == []


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["summary", "config", "metrics"])
def test_unreadable_run_folders_are_skipped_with_one_warning(study, tmp_path, damage):
    broken = next(p for p in study.iterdir() if p.name.startswith("default-s0"))
    {"summary": broken / "summary.json", "config": broken / "config.json",
     "metrics": broken / "metrics.jsonl"}[damage].write_text('{"status": "o')
    result = CliRunner().invoke(app, ["report", str(study), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    if damage == "metrics":  # a torn last JSONL line is what a kill leaves: read the rest
        assert "WARNING" not in result.stderr
        return
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and str(broken) in warnings[0]
    assert "Traceback" not in result.output
    assert "| default | 2 | 2 |" in (tmp_path / "r" / "README.md").read_text()


def test_curve_bands_are_the_tables_sample_std_over_the_runs_at_each_point():
    from initstudy.plots import _mean_band

    runs = [[(1, 0.2), (2, 0.5)], [(1, 0.4), (2, math.nan)], [(1, 0.9)]]  # two stop early
    xs, means, stds = _mean_band(runs)
    assert xs == [1, 2] and means == pytest.approx([0.5, 0.5])
    assert stds == pytest.approx([np.std([0.2, 0.4, 0.9], ddof=1), 0.0])  # one run: no band


def test_weight_panels_keep_the_init_scale_when_the_final_weights_blow_up():
    import matplotlib.pyplot as plt

    from initstudy.plots import _off_scale

    fig, ax = plt.subplots()
    assert _off_scale(ax, (-1.0, 1.0), (-3e23, 5e23), 0, "x")
    assert ax.get_xlim() == pytest.approx((-1.2, 1.2))
    assert "final spans [-3e+23, 5e+23]" in ax.texts[0].get_text()
    fig2, ax2 = plt.subplots()
    assert not _off_scale(ax2, (-1.0, 1.0), (-1.5, 1.5), 0, "x")  # on scale: drawn as is
    # Zero biases at init set no scale: trained biases are drawn, not called off-scale...
    assert not _off_scale(ax2, (0.0, 0.0), (-0.02, 0.01), 0, "y")
    assert not _off_scale(ax2, (0.1, 0.1), (-85.5, 3.2), 0, "y")
    # ...unless they went non-finite: then the panel keeps a scale around the init.
    fig3, ax3 = plt.subplots()
    assert _off_scale(ax3, (0.0, 0.0), None, 84, "y")
    assert ax3.get_ylim() == pytest.approx((-0.005, 0.005))
    plt.close("all")


def test_bias_panels_show_trained_biases_and_constant_ones(monkeypatch, tmp_path):
    """Kaiming's zero biases at init must not hide the trained ones (a panel scaled to 1e-13);
    biases that never moved from 0.1 show as a line at 0.1, not as float noise."""
    from initstudy import plots

    saved = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path: saved.setdefault("axes", fig.axes))
    zero, trained = {"values": [0.0] * 4}, {"values": [-0.02, 0.01, 0.005, 0.0]}
    still = {"values": [0.1] * 4}
    plots.bias_grid({"kaiming": {"fc": (zero, trained)}, "custom": {"fc": (still, still)}},
                    ["fc"], tmp_path / "b.png", "biases")
    kaiming, custom = saved["axes"]
    lo, hi = kaiming.get_ylim()
    assert lo <= -0.02 and hi >= 0.01 and not kaiming.texts  # drawn, nothing "off this scale"
    lo, hi = custom.get_ylim()
    assert lo < 0.1 - 0.01 and hi > 0.1 + 0.01


@pytest.mark.slow
def test_runs_of_two_precisions_are_two_comparisons_each_named_by_its_precision(tmp_path):
    root = tmp_path / "runs"
    for seed in range(2):
        for precision, accs in (("fp32", [0.1, 0.8, 0.9]), ("bf16", [0.1, 0.7, 0.8])):
            folder = fake_run(root / precision, "default", seed, accs)
            config = json.loads((folder / "config.json").read_text()) | {"precision": precision}
            (folder / "config.json").write_text(json.dumps(config))
            folder.rename(root / f"{folder.name}-{precision}")
    groups = comparisons(load_runs([root]))
    assert sorted(g.key["precision"] for g in groups) == ["bf16", "fp32"]
    assert all({r.config["precision"] for r in g.runs} == {g.key["precision"]} for g in groups)
    make_report([root], tmp_path / "r")
    readme = (tmp_path / "r" / "README.md").read_text()
    assert readme.count("## Comparison") == 2
    assert "2 epochs, fp32, sgd" in readme and "2 epochs, bf16, sgd" in readme


def test_a_comparison_that_mixes_device_types_says_so(tmp_path):
    root = tmp_path / "runs"
    for seed in range(2):
        folder = fake_run(root, "default", seed, [0.1, 0.8, 0.9])
        if seed:
            config = json.loads((folder / "config.json").read_text())
            config |= {"device_used": "cuda:0"}
            config["env"]["device_name"] = "NVIDIA H200"
            (folder / "config.json").write_text(json.dumps(config))
    make_report([root], tmp_path / "r")
    readme = (tmp_path / "r" / "README.md").read_text()
    assert ("**Mixed devices:** this comparison's runs ran on cpu (cpu): 1 run (default 1); "
            "cuda (NVIDIA H200): 1 run (default 1)") in readme
    fake_run(tmp_path / "same", "default", 0, [0.1, 0.8, 0.9])
    make_report([tmp_path / "same"], tmp_path / "r2")
    assert "Mixed devices" not in (tmp_path / "r2" / "README.md").read_text()
    # Two CPUs, or two ways of running the LeNet on one, round differently too.
    cpus = [("default", "AVX512"), ("default", "AVX2"), ("kaiming", "AVX2"), ("kaiming", "AVX2")]
    for seed, (scheme, capability) in enumerate(cpus):
        folder = fake_run(tmp_path / "cpus", scheme, seed, [0.1, 0.8, 0.9])
        config = json.loads((folder / "config.json").read_text())
        config["env"] |= {"cpu_capability": capability, "cpu_path": "fused"}
        (folder / "config.json").write_text(json.dumps(config))
    make_report([tmp_path / "cpus"], tmp_path / "r3")
    readme = (tmp_path / "r3" / "README.md").read_text()
    assert ("ran on cpu (cpu, AVX2, fused): 3 runs (default 1, kaiming 2); "
            "cpu (cpu, AVX512, fused): 1 run (default 1)" in readme)
    # The provenance table names the devices as the comparison does.
    assert "| devices | cpu (cpu, AVX2, fused), cpu (cpu, AVX512, fused) |" in readme


def test_runs_recorded_before_models_existed_compare_with_lenet_runs():
    from pathlib import Path

    from initstudy.results import Run, comparisons

    old = Run(Path("old"), {"scheme": "default", "seed": 0, "lr": 0.01}, {"status": "ok"}, [])
    new = Run(Path("new"), {"scheme": "kaiming", "seed": 0, "lr": 0.01, "model": "lenet"},
              {"status": "ok"}, [])
    (comparison,) = comparisons([old, new])
    assert comparison.key["model"] == "lenet"


def test_make_report_script_leaves_an_unfinished_study_for_later(tmp_path):
    """scripts/make_report.py remakes every committed report, but not one whose study is still
    being run across sessions: counted by finished folders against the study file's runs."""
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "scripts" / "make_report.py"
    spec = importlib.util.spec_from_file_location("make_report", script)
    make_report_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_report_script)
    runs = tmp_path / "runs"
    runs.mkdir()
    assert make_report_script.unfinished(runs) is None  # no study file: an old report
    (runs / "study.toml").write_text('name = "two"\nschemes = ["default", "xavier"]\n'
                                     'seeds = 2\ndataset = "mnist-sample"\n')
    fake_run(runs, "default", 0, [0.5, 0.9])
    fake_run(runs, "default", 1, [0.5, 0.9], status="diverged")
    killed = fake_run(runs, "xavier", 0, [0.5, 0.9], status="running")
    assert make_report_script.unfinished(runs) == "2 of 4 runs finished"
    fake_run(runs, "xavier", 1, [0.5, 0.9])
    assert make_report_script.unfinished(runs) == "3 of 4 runs finished"
    summary = json.loads((killed / "summary.json").read_text()) | {"status": "ok"}
    (killed / "summary.json").write_text(json.dumps(summary))  # resumed and finished
    assert make_report_script.unfinished(runs) is None


def test_sensitivity_zoom_panel_is_limited_to_the_top(monkeypatch, tmp_path):
    """The right panel shows the top 3 points, where schemes that all train differ."""
    from initstudy import plots

    saved = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path: saved.setdefault("axes", fig.axes))
    line = [{"x": x, "mean": m, "lo": m - 0.2, "hi": m + 0.2, "diverged": 0, "n": 3}
            for x, m in ((0.01, 98.0), (0.1, 98.5), (1.0, 10.0))]
    plots.band_lines({"all": {"a": line}, "top": {"a": line}}, "lr", "t", tmp_path / "s.png",
                     logx=True, ylims={"top": (95.7, 99.0)})
    full, zoom = saved["axes"]
    assert zoom.get_ylim() == (95.7, 99.0) and full.get_ylim()[0] < 10
    assert full.get_xscale() == zoom.get_xscale() == "log"
    assert zoom.get_xlim() == pytest.approx((0.01 / 1.5, 0.1 * 1.5))  # lr 1 is off the top
    assert full.get_xlim()[1] > 1
    assert full.get_legend() is not None and zoom.get_legend() is None  # the same lines
