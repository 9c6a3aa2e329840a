"""scripts/bench.py end to end on tiny data: every measurement the Speed issue asks for."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"


def test_bench_measures_and_writes_every_number(tiny_data, tmp_path):
    study = tmp_path / "tiny.toml"
    study.write_text('name = "tiny"\ndataset = "mnist"\nschemes = ["default", "kaiming"]\n'
                     'seeds = 2\nepochs = 1\n')
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--dataset", "mnist", "--data-dir", str(tiny_data),
         "--images", "192", "--repeats", "1", "--pack", "2", "--json", str(out),
         "--study", str(study), "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    numbers = json.loads(out.read_text())
    assert numbers["device"] == "cpu" and numbers["dataset"] == "mnist"
    for name in ("baseline", "baseline_malloc_held", "initstudy", "packed"):
        assert numbers[name]["images_per_second"] > 0, name
    assert numbers["packed"]["runs"] == 2
    assert 0.2 < numbers["flops_per_image"] / 1e9 < 0.3  # 0.258 GFLOP, forward and backward
    assert set(numbers["ceiling_by_library"]) == {"matmul", "onednn"}
    assert numbers["ceiling_gflops"] == max(numbers["ceiling_by_library"].values())
    initstudy = numbers["initstudy"]
    assert initstudy["gflops"] == initstudy["images_per_second"] * numbers["flops_per_image"] / 1e9
    assert numbers["initstudy_fraction_of_ceiling"] == initstudy["gflops"] / numbers[
        "ceiling_gflops"]
    assert initstudy["vs_baseline"] == (initstudy["images_per_second"]
                                        / numbers["baseline"]["images_per_second"])
    assert 100 < numbers["peak_rss_mb"] < 1500
    assert numbers["study"]["runs"] == 4 and numbers["study"]["seconds"] > 0
    assert numbers["study"]["device"] == "cpu"  # on the device named, even on a GPU host
    assert numbers["study"]["images_per_second_per_run"] > 0
    for line in ("x baseline", "packed x2", "ceiling", "peak RSS", "study "):
        assert line in result.stdout, line
