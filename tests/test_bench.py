"""scripts/bench.py end to end on tiny data: every measurement the Speed issue asks for."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from initstudy import kernels
from initstudy.environment import native_bf16
from initstudy.pack import cpu_path

from helpers import DIAG_BATCH

BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"


@pytest.fixture
def script(monkeypatch):
    """Imports scripts/NAME.py by NAME, with scripts/ on the path as when the script runs."""
    monkeypatch.syspath_prepend(str(BENCH.parent))
    return importlib.import_module


@pytest.mark.slow
def test_bench_measures_and_writes_every_number(tiny_data, tmp_path, script):
    study = tmp_path / "tiny.toml"
    study.write_text('name = "tiny"\ndataset = "mnist"\nschemes = ["default", "kaiming"]\n'
                     f'seeds = 2\nepochs = 1\ndiag_batch = {DIAG_BATCH}\n')
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--dataset", "mnist", "--data-dir", str(tiny_data),
         "--images", "64", "--repeats", "1", "--pack", "1,2", "--engines", "loop,vmap,bmm",
         "--precision", "fp32,bf16", "--json", str(out), "--study", str(study),
         "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    numbers = json.loads(out.read_text())
    assert numbers["device"].startswith("cpu (") and numbers["dataset"] == "mnist"
    assert numbers["cpu_path"] == {"loop": cpu_path("loop"), "vmap": cpu_path("vmap"),
                                   "bmm": None}  # bmm writes out the layers itself
    assert numbers["kernel_vector_bits"] == kernels.vector_bits()
    for name in ("baseline", "baseline_malloc_held"):
        assert numbers[name]["images_per_second"] > 0, name
    assert set(numbers["precisions"]) == {"fp32", "bf16"}
    for precision, table in numbers["precisions"].items():
        rows = table["rows"]
        assert [r["variant"] for r in rows] == ["one run", "loop x2", "vmap x2", "bmm x2"]
        assert [r["runs"] for r in rows] == [1, 2, 2, 2]
        assert all(r["images_per_second"] > 0 for r in rows)
        assert all(r["peak_gpu_gb"] is None for r in rows)  # a GPU's number only
        assert rows[0]["vs_in_turn"] == 1 and rows[0]["vs_in_turn_range"] == [1, 1]
        assert all(r["vs_in_turn_range"][0] <= r["vs_in_turn"] <= r["vs_in_turn_range"][1]
                   for r in rows)
        assert all(r["vs_in_turn_ci"] is None and r["share_ci"] is None
                   for r in rows)  # 1 repeat: no 95% interval
        best = max(rows, key=lambda r: r["share_of_ceiling"])
        assert table["best_pack"] == best["variant"]
        assert script("bench").fastest([numbers], precision) == best  # the setting a study runs at
        assert set(table["ceiling_by_library"]) == {"matmul", "onednn"}
        assert all(g > 0 for g in table["ceiling_by_library"].values())  # GFLOP/s
        assert table["emulated"] == (precision == "bf16" and not native_bf16(
            torch.device("cpu")))
        assert all(r["share_of_ceiling"] > 0 for r in rows)
        if not table["emulated"]:  # (an emulated bf16's convs can outrun its matmul)
            # The trainer cannot run much faster than the machine's own matrix product: a
            # ratio in percent or a unit off by 1e3 shows up here. The bound is loose, since a
            # study sharing these 2 cores slows a 0.1 s repeat and the products beside it by
            # different amounts; the share's arithmetic has its own exact test below.
            assert all(r["share_of_ceiling"] < 4 for r in rows), precision
            assert all(r["gflops"] < 4 * table["ceiling_gflops"] for r in rows)
    # gpu_check's choice of setting for a study: the fastest row across benches, by the CLI.
    fp32 = max(numbers["precisions"]["fp32"]["rows"], key=lambda r: r["share_of_ceiling"])
    other = tmp_path / "other.json"
    faster = dict(fp32, engine="bmm", runs=2, share_of_ceiling=fp32["share_of_ceiling"] + 1)
    other.write_text(json.dumps({"precisions": {"fp32": {"rows": [faster]}}}))
    picked = subprocess.run([sys.executable, str(BENCH), "--precision", "fp32", "--fastest",
                             str(out), str(other)], capture_output=True, text=True, timeout=120)
    assert picked.stdout == "2 bmm\n", picked.stderr
    # FLOPs counted by hand from the layer shapes: multiply-adds of each layer's forward pass
    # (conv1 on the 32x32 padded image -> 28x28, conv2 on 14x14 -> 10x10, conv3 on 5x5 -> 1x1,
    # then the two linears), 2 FLOPs each; backward twice the forward, but for the image's own
    # gradient, which nothing needs.
    macs = [28 * 28 * 128 * 25, 10 * 10 * 128 * 128 * 25, 128 * 128 * 25, 128 * 84, 84 * 10]
    by_hand = 3 * 2 * sum(macs) - 2 * macs[0]
    assert numbers["flops_per_image"] == pytest.approx(by_hand, rel=0.02)
    assert 100 < numbers["peak_rss_mb"] < 1500
    assert numbers["study"]["runs"] == 4 and numbers["study"]["seconds"] > 0
    assert numbers["study"]["device"] == "cpu"  # on the device named, even on a GPU host
    assert numbers["study"]["images_per_second_per_run"] > 0
    for line in (f"the LeNet's CPU path: loop {cpu_path('loop')}, vmap", "fp32: ceiling", "bf16", "one run", "loop x2", "vmap x2",
                 "x in turn", "(95% CI)", "(< 6 reps)", "<- best pack", "peak RSS", "study "):
        assert line in result.stdout, line
    # progress while it measures: each repeat's shares, as that repeat ends
    for line in ("repeat 1/1: fp32 baseline ", "repeat 1/1: fp32 one run ",
                 ", bf16 bmm x2 ", "repeat 1/1: fp32 baseline, malloc held "):
        assert line in result.stderr, line


def test_timed_epochs_read_the_training_images_and_a_few_test_images(tiny_data, tmp_path,
                                                                     script, monkeypatch):
    """The trainer evaluates the test split untimed at init and after each epoch, so the bench
    hands it the first --images training images and only HELD_OUT test images; more images
    than the dataset has is an error, not a smaller bench."""
    from initstudy.sources import load_dataset

    bench = script("bench")
    assert bench.HELD_OUT <= 100  # of MNIST's 10,000
    monkeypatch.setattr(bench, "HELD_OUT", 10)  # of the tiny data's 100
    data = load_dataset("mnist", str(tiny_data))
    cut = load_dataset("mnist", str(bench.bench_root(data, 64, tmp_path / "root")))
    assert torch.equal(cut.train_images, data.train_images[:64])
    assert torch.equal(cut.train_labels, data.train_labels[:64])
    assert torch.equal(cut.test_images, data.test_images[:10])
    assert torch.equal(cut.test_labels, data.test_labels[:10])
    too_many = subprocess.run([sys.executable, str(BENCH), "--dataset", "mnist", "--data-dir",
                               str(tiny_data), "--images", "201", "--device", "cpu"],
                              capture_output=True, text=True, timeout=120)
    assert too_many.returncode == 1
    assert "--images 201 is more than mnist's 200 training images" in too_many.stderr


def test_a_share_of_the_ceiling_is_taken_beside_each_repeat(script):
    """A CPU whose clock halves between repeats: each repeat is held to the ceiling measured
    beside it, so the share stays what it is (0.8), where one ceiling for all would say 0.6."""
    ceilings = iter([{"a": 100.0, "b": 90.0}] * 2 + [{"a": 50.0, "b": 40.0}] * 2)
    rates = iter([0.0, 80.0, 40.0])  # a warm-up, then the repeats (GFLOP/s at 1 per image)
    got, = script("ceiling").beside_ceiling([lambda: next(rates)], [1.0],
                                            lambda: next(ceilings), repeats=2)
    assert got["share_of_ceiling"] == pytest.approx(0.8)
    assert got["shares"] == pytest.approx([0.8, 0.8])
    assert got["images_per_second"] == pytest.approx(60.0)
    assert len(got["ceilings"]) == 4


def test_a_pack_is_timed_beside_the_run_it_is_held_against(script):
    """Rows take turns within a repeat (one run, the pack, one run, ...), and "x in turn" is
    the median of each repeat's pack share over the one run's of the same repeat: 1.0 here
    (0.9 to 1.1), where the ratio of the two medians (0.66 / 0.6) would say 1.1."""
    ceiling, calls = script("ceiling"), []

    def timed(name: str, rates: list[float]):
        feed = iter(rates)
        return lambda: calls.append(name) or next(feed)

    one = timed("one", [1.0, 80.0, 40.0, 60.0])  # a warm-up, then 3 repeats
    pack = timed("pack", [1.0, 40.0, 18.0, 33.0])  # per run, 2 runs: 1.0, 0.9, 1.1 of one's
    rows = ceiling.beside_ceiling([one, pack], [1.0, 2.0], lambda: {"a": 100.0}, repeats=3)
    assert calls == ["one", "pack"] + ["one", "pack"] * 3
    assert [r["shares"] for r in rows] == [pytest.approx([0.8, 0.4, 0.6]),
                                           pytest.approx([0.8, 0.36, 0.66])]
    assert ceiling.in_turn(rows[1]["shares"], rows[0]["shares"]) == pytest.approx([1.0, 0.9, 1.1])
    assert ceiling.in_turn(rows[0]["shares"], rows[0]["shares"]) == [1, 1, 1]


def test_the_interval_of_x_in_turn_covers_the_median_as_stated(script):
    """Over 2,000 benches of 6, 11 and 25 repeats drawn from a skewed distribution (a VM's
    slow bursts: lognormal), the interval holds the true median as often as its two order
    statistics do for any distribution (the binomial chance that the median falls between
    them: 0.969, 0.988 and 0.957), never under 95%; it is None under 6 repeats, and narrows
    as repeats grow."""
    import numpy as np
    from scipy.stats import binom

    median_interval = script("ceiling").median_interval
    rng = np.random.default_rng(0)
    widths = []
    for n in (6, 11, 25):
        low, high = median_interval(list(range(1, n + 1)))  # the ranks it takes
        exact = binom.cdf(high - 1, n, 0.5) - binom.cdf(low - 1, n, 0.5)
        assert exact >= 0.95
        draws = rng.lognormal(0.0, 0.15, size=(2000, n))
        intervals = np.array([median_interval(list(d)) for d in draws])
        covered = np.mean((intervals[:, 0] <= 1.0) & (1.0 <= intervals[:, 1]))
        assert abs(covered - exact) < 0.015, (n, covered, exact)  # 3 standard errors
        widths.append(np.median(intervals[:, 1] - intervals[:, 0]))
    assert widths[0] > widths[1] > widths[2]
    assert median_interval([1.0] * 5) is None
    assert median_interval([1.0] * 6) == [1.0, 1.0]
