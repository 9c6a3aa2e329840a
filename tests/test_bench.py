"""scripts/bench.py end to end on tiny data: every measurement the Speed issue asks for."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"


@pytest.mark.slow
def test_bench_measures_and_writes_every_number(tiny_data, tmp_path):
    study = tmp_path / "tiny.toml"
    study.write_text('name = "tiny"\ndataset = "mnist"\nschemes = ["default", "kaiming"]\n'
                     'seeds = 2\nepochs = 1\n')
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--dataset", "mnist", "--data-dir", str(tiny_data),
         "--images", "192", "--repeats", "1", "--pack", "2,3", "--json", str(out),
         "--study", str(study), "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    numbers = json.loads(out.read_text())
    assert numbers["device"] == "cpu" and numbers["dataset"] == "mnist"
    for name in ("baseline", "baseline_malloc_held", "initstudy"):
        assert numbers[name]["images_per_second"] > 0, name
    assert [r["runs"] for r in numbers["packed"]] == [2, 3]
    assert all(r["images_per_second"] > 0 for r in numbers["packed"])
    fastest = max(numbers["packed"], key=lambda r: r["images_per_second"] * r["runs"])
    assert numbers["best_pack"] == fastest["runs"]
    # FLOPs counted by hand from the layer shapes: multiply-adds of each layer's forward pass
    # (conv1 on the 32x32 padded image -> 28x28, conv2 on 14x14 -> 10x10, conv3 on 5x5 -> 1x1,
    # then the two linears), 2 FLOPs each; backward twice the forward, but for the image's own
    # gradient, which nothing needs.
    macs = [28 * 28 * 128 * 25, 10 * 10 * 128 * 128 * 25, 128 * 128 * 25, 128 * 84, 84 * 10]
    by_hand = 3 * 2 * sum(macs) - 2 * macs[0]
    assert numbers["flops_per_image"] == pytest.approx(by_hand, rel=0.02)
    assert set(numbers["ceiling_by_library"]) == {"matmul", "onednn"}
    assert all(g > 1 for g in numbers["ceiling_by_library"].values())  # GFLOP/s
    # The trainer cannot run much faster than the machine's own matrix product, nor take
    # forever: a broken ratio or unit shows up here, whatever the script computes.
    assert 0 < numbers["initstudy_fraction_of_ceiling"] < 1.5
    assert 0.1 < numbers["initstudy"]["vs_baseline"] < 20
    assert 100 < numbers["peak_rss_mb"] < 1500
    assert numbers["study"]["runs"] == 4 and numbers["study"]["seconds"] > 0
    assert numbers["study"]["device"] == "cpu"  # on the device named, even on a GPU host
    assert numbers["study"]["images_per_second_per_run"] > 0
    for line in ("x baseline", "packed x2", "packed x3", "<- best pack", "ceiling", "peak RSS",
                 "study "):
        assert line in result.stdout, line
