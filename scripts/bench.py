#!/usr/bin/env python3
"""Training throughput of the document's LeNet: the usual loop against initstudy's trainer, one
run and packs of runs in each engine, in each precision, each beside the device's own
matrix-product ceiling. Plain PyTorch timing, one process, the same model, data and device for
every measurement; each is the median of --repeats after a warm-up.

    python scripts/bench.py                      # a table per precision
    python scripts/bench.py --json bench.json    # and the numbers as JSON
    python scripts/bench.py --pack 2,4,8 --engines loop,vmap,bmm --precision fp32,bf16
    python scripts/bench.py --study              # on a GPU: also the MNIST study, as one pack

baseline  = the loop of PyTorch's MNIST example (scripts/example_loop.py): a Dataset with
            per-sample ToTensor and Normalize, DataLoader(batch_size=64, shuffle=True), NCHW
            fp32, loss.item() every step
one run   = the trainer of `initstudy run`, at its defaults, in the precision of its table
loop xK,  = K runs trained together by the same trainer in that engine (pack.Pack): images/s
vmap xK     per run and for all K; "x in turn" is the pack's share of the ceiling over one
            run's in the same repeat, i.e. against the same K runs trained one after another:
            the median over repeats, with its 95% interval (distribution-free; it needs 6
            repeats or more), and in the JSON the repeats' range; a share of the ceiling has
            its 95% interval too
ceiling   = the precision's matrix-product GFLOP/s (fp32, TF32 on CUDA for tf32, bf16), the
            faster of torch.matmul and (on a CPU) oneDNN, measured just before and after each
            repeat: a share is each repeat's GFLOP/s over the mean of its two, so a CPU whose
            clock or neighbours change during the bench still gets a fair share
repeats   = a table's rows take turns: one run, each pack, one run again, ..., so that a pack
            and the run it is held against are timed side by side
best pack = the row whose runs together reach the largest share of the ceiling (--fastest
            FILE...: the fastest row of several benches, for a study to run at)
GPU memory= on a GPU, the most memory PyTorch held while a row's pack trained, all its runs
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ceiling import beside_ceiling, ceiling, emulated, in_turn, median_interval  # scripts/
from example_loop import baseline  # scripts/
from initstudy import LeNet, RunConfig
from initstudy.config import ENGINES, PRECISIONS
from initstudy.data import FILES, Dataset, idx_bytes
from initstudy.environment import cpu_name, resolve_device
from initstudy.errors import InitStudyError
from initstudy.kernels import vector_bits
from initstudy.pack import lenet_path
from initstudy.sources import folders, load_dataset
from initstudy.study import load_study
from initstudy.training import train_pack

MNIST_STUDY = Path(__file__).resolve().parents[1] / "experiments" / "mnist-lenet.toml"


def flops_per_image(device: torch.device) -> float:
    """Forward and backward FLOPs of one training image, counted by PyTorch."""
    model = LeNet().to(device)
    x = torch.randn(64, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (64,), device=device)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model.logits(x), y).backward()
    return counter.get_total_flops() / 64


HELD_OUT = 100  # test images a timed epoch evaluates (untimed), at init and after the epoch


def bench_root(data: Dataset, images: int, folder: Path) -> Path:
    """A data root in ``folder`` holding ``data``'s first ``images`` training images and first
    ``HELD_OUT`` test images as `mnist` IDX files, for the timed epochs to read. The trainer
    evaluates the whole test split at init and after each epoch, outside the timed steps; on
    full MNIST those 20,000 images were most of a bench's wall time."""
    raw = folders("mnist", str(folder))[0]
    raw.mkdir(parents=True)
    for split, n in (("train", images), ("test", HELD_OUT)):
        for kind in ("images", "labels"):
            tensor = getattr(data, f"{split}_{kind}")[:n].to(torch.uint8)
            (raw / FILES[f"{split}_{kind}"]).write_bytes(idx_bytes(tensor.numpy()))
    return folder


class Trainer:
    """Called, trains ``pack`` runs together for one epoch of the training images under
    ``root`` (``bench_root``) at the trainer's defaults in ``engine`` and returns their per-run
    images/s (training steps only; no validation split, so every image trains). On a GPU
    ``peak_gb`` is the most memory PyTorch held in any call
    (``torch.cuda.max_memory_allocated``, GB): what a pack of that size and engine needs there."""

    def __init__(self, root: Path, pack: int, device: torch.device, precision: str,
                 engine: str):
        self.peak_gb = 0.0 if device.type == "cuda" else None
        self.device, self.options = device, dict(
            dataset="mnist", data_dir=str(root), epochs=1, val_size=0, device=str(device),
            precision=precision, engine=engine, quiet=True, wandb="disabled", diag_batch=0)
        self.pack = pack

    def __call__(self) -> float:
        if self.peak_gb is not None:
            torch.cuda.reset_peak_memory_stats(self.device)
        with tempfile.TemporaryDirectory() as tmp:
            rate = train_pack([RunConfig(scheme="default", seed=k, out=f"{tmp}/{k}",
                                         **self.options)
                               for k in range(self.pack)])[0]["images_per_second"]
        if self.peak_gb is not None:
            self.peak_gb = max(self.peak_gb, torch.cuda.max_memory_allocated(self.device) / 1e9)
        return rate


def peak_rss_mb(dataset: str, data_dir: str | None, device: str, wandb: str) -> float:
    """Peak resident memory of `initstudy run` at its defaults (2 epochs; wandb in mode
    ``wandb``; its service is a process of its own, not counted), in MB: the child's own VmHWM,
    read as it exits (Linux). getrusage's children maxrss would count this process's memory
    too, which a forked child starts with."""
    report = ("import atexit, sys; atexit.register(lambda: print('VmHWM', [l.split()[1] for l in "
              "open('/proc/self/status') if l.startswith('VmHWM')][0], file=sys.stderr)); "
              "from initstudy.cli import main; sys.argv[0] = 'initstudy'; main()")
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-c", report, "run", "--dataset", dataset, "--epochs", "2",
                   "--device", device, "--wandb", wandb, "-q", "--out", tmp]
        result = subprocess.run(command + (["--data-dir", data_dir] if data_dir else []),
                                capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"`initstudy run` failed (exit {result.returncode}):\n{result.stderr[-2000:]}")
    line = next(l for l in result.stderr.splitlines() if l.startswith("VmHWM"))
    return int(line.split()[1]) / 1024  # kB


def study(path: Path, runs: int, data_dir: str | None, device: torch.device) -> dict:
    """Run the study ``path`` (of ``runs`` runs) as one pack (``initstudy sweep``) on
    ``device``, the device every other number is measured on, into a temporary folder: the
    whole time in seconds, processes and data loading included, and the median per-run
    images/s of its runs."""
    gpus = str(device.index or 0) if device.type == "cuda" else "none"
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "initstudy.cli", "sweep", str(path), "--out", tmp,
                   "--pack", str(runs), "--wandb", "disabled", "--gpus", gpus]
        start = time.perf_counter()
        subprocess.run(command + (["--data-dir", data_dir] if data_dir else []), check=True)
        seconds = time.perf_counter() - start
        rates = [json.loads(f.read_text())["images_per_second"]
                 for f in Path(tmp).glob("**/summary.json")]
    return {"study": str(path), "device": str(device), "runs": runs, "seconds": seconds,
            "images_per_second_per_run": statistics.median(rates)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="mnist-sample")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--images", type=int, default=2000, help="images per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pack", type=_sizes, default=[4], metavar="K[,K...]",
                        help="pack sizes to time (default 4)")
    parser.add_argument("--engines", type=_choices(ENGINES[1:]), default=list(ENGINES[1:]),
                        metavar="E[,E...]",
                        help=f"pack engines to time (default {','.join(ENGINES[1:])})")
    parser.add_argument("--precision", type=_choices(PRECISIONS), default=["fp32"],
                        metavar="P[,P...]", help="precisions of the trainer's tables (fp32, "
                        "tf32 on CUDA, bf16; the baseline is fp32)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--data-dir", help="data root (as `initstudy run --data-dir`)")
    parser.add_argument("--study", type=Path, nargs="?", const=MNIST_STUDY, metavar="FILE",
                        help="also time a study trained as one pack (default: the six-scheme, "
                        "five-seed MNIST study and LSUV)")
    parser.add_argument("--fastest", type=Path, nargs="+", metavar="JSON",
                        help="measure nothing: print the runs and engine of the fastest row, "
                        "in the first --precision, of these benches' --json files")
    args = parser.parse_args()
    if args.fastest:
        row = fastest([json.loads(path.read_text()) for path in args.fastest], args.precision[0])
        print(row["runs"], row["engine"])
        return

    device = resolve_device(args.device)
    if "tf32" in args.precision and device.type != "cuda":
        sys.exit("error: tf32 is a CUDA precision; on a CPU time fp32 or bf16")
    study_runs = len(load_study(args.study).runs) if args.study else 0  # a bad file fails now
    data = load_dataset(args.dataset, args.data_dir)
    if args.images > len(data.train_labels):
        sys.exit(f"error: --images {args.images} is more than {data.name}'s "
                 f"{len(data.train_labels)} training images")
    held = tempfile.TemporaryDirectory(prefix="bench-")  # removed as the bench exits
    root = bench_root(data, args.images, Path(held.name))
    flops = flops_per_image(device)
    results = {"device": device_name(device), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "dataset": data.name,
               "images_per_repeat": args.images, "repeats": args.repeats,
               "flops_per_image": flops,
               # how this CPU runs the LeNet in each engine (LeNet.logits; docs/performance.md)
               "cpu_path": ({engine: lenet_path(LeNet, engine, True) for engine in ENGINES[1:]}
                            if device.type == "cpu" else None),
               "kernel_vector_bits": vector_bits() if device.type == "cpu" else None}
    fp32_ceiling = ceiling(device, "fp32")
    # The baseline first, while this process's malloc is as a researcher's script finds it:
    # the trainer changes it for good (hold_freed_memory), and is measured after.
    results["baseline"], = beside_ceiling([baseline(data, device, args.images)], [flops / 1e9],
                                          fp32_ceiling, args.repeats, ["fp32 baseline"])
    results["precisions"] = {}
    for precision in args.precision:
        ceiling_now = ceiling(device, precision)
        rows = [{"variant": "one run", "runs": 1, "engine": "loop"}] + [
            {"variant": f"{engine} x{k}", "runs": k, "engine": engine}
            for k in args.pack if k > 1 for engine in args.engines]
        trainers = [Trainer(root, row["runs"], device, precision, row["engine"])
                    for row in rows]
        timed = beside_ceiling(trainers, [row["runs"] * flops / 1e9 for row in rows],
                               ceiling_now, args.repeats,
                               [f"{precision} {row['variant']}" for row in rows])
        for row, numbers, measured in zip(rows, timed, trainers):
            row |= numbers
            row["peak_gpu_gb"] = measured.peak_gb
            row["gflops"] = row["images_per_second"] * row["runs"] * flops / 1e9
            ratios = in_turn(row["shares"], rows[0]["shares"])
            row["vs_in_turn"] = statistics.median(ratios)
            row["vs_in_turn_range"] = [min(ratios), max(ratios)]  # how far repeats disagree
            row["vs_in_turn_ci"] = median_interval(ratios)
        seen = [c for row in rows for c in row.pop("ceilings")]
        by_library = {name: statistics.median(c[name] for c in seen) for name in seen[0]}
        results["precisions"][precision] = {
            "rows": rows, "ceiling_by_library": by_library,
            "ceiling_gflops": max(by_library.values()),
            "emulated": emulated(precision, device),
            "best_pack": max(rows, key=_speed)["variant"]}
    results["baseline"].pop("ceilings")
    if device.type == "cpu":  # how much of the gain is the allocator's: the same loop again
        results["baseline_malloc_held"], = beside_ceiling(
            [baseline(data, device, args.images)], [flops / 1e9], fp32_ceiling, args.repeats,
            ["fp32 baseline, malloc held"])
        results["baseline_malloc_held"].pop("ceilings")
    # wandb offline, as a run's default; a machine without wandb measures without it
    results["peak_rss_wandb"] = "offline" if importlib.util.find_spec("wandb") else "disabled"
    results["peak_rss_mb"] = peak_rss_mb(args.dataset, args.data_dir, str(device),
                                         results["peak_rss_wandb"])
    if args.study:
        results["study"] = study(args.study, study_runs, args.data_dir, device)
        r, first = results["study"], results["precisions"][args.precision[0]]
        r["fraction_of_ceiling"] = (r["images_per_second_per_run"] * r["runs"] * flops / 1e9
                                    / first["ceiling_gflops"])
    print_results(results, flops, args.precision[0] if args.study else None)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def _speed(row: dict) -> float:
    """How fast a row trained, all its runs together: its share of the ceiling."""
    return row["share_of_ceiling"]


def fastest(benches: list[dict], precision: str) -> dict:
    """The row of ``precision`` that trained fastest across benches' results (``--json``):
    the setting a study runs at (its ``runs``, the pack size, and ``engine``)."""
    return max((row for bench in benches for row in bench["precisions"][precision]["rows"]),
               key=_speed)


def print_results(results: dict, flops: float, study_precision: str | None) -> None:
    print(f"device {results['device']}, torch {results['torch']}, {results['threads']} threads, "
          f"{results['dataset']}, {flops / 1e9:.3f} GFLOP per training image, "
          f"{results['images_per_repeat']} images x {results['repeats']} repeats")
    if results["cpu_path"]:
        print("the LeNet's CPU path: " + ", ".join(f"{engine} {path or 'its own layers'}"
                                                    for engine, path
                                                    in results["cpu_path"].items())
              + (f" (the kernels' vectors: {results['kernel_vector_bits']} bits)"
                 if results["kernel_vector_bits"] else ""))
    base = results["baseline"]
    print(f"baseline (PyTorch's MNIST example, fp32): {base['images_per_second']:.0f} images/s, "
          f"{100 * base['share_of_ceiling']:.0f}% of the fp32 ceiling")
    if "baseline_malloc_held" in results:
        held = results["baseline_malloc_held"]
        print(f"  the same loop after initstudy's malloc setting: "
              f"{held['images_per_second']:.0f} images/s "
              f"({held['images_per_second'] / base['images_per_second']:.2f}x)")
    for precision, table in results["precisions"].items():
        by_library = ", ".join(f"{name} {gflops:.1f}"
                               for name, gflops in table["ceiling_by_library"].items())
        emulated = " (emulated: no bf16 arithmetic on this device)" if table["emulated"] else ""
        print(f"\n{precision}{emulated}: ceiling {table['ceiling_gflops']:.1f} GFLOP/s (median; "
              f"{by_library})")
        print(f"{'':10} {'images/s':>9} {'all runs':>9} {'GFLOP/s':>8} {'ceiling':>8} "
              f"{'(95% CI)':>11} {'x in turn':>9} {'(95% CI)':>11} {'x baseline':>10}"
              f"{' GPU memory' if table['rows'][0]['peak_gpu_gb'] is not None else ''}")
        for r in table["rows"]:
            best = "  <- best pack" if r["variant"] == table["best_pack"] else ""
            total = r["images_per_second"] * r["runs"]
            share_ci = _interval(r["share_ci"], 100, "{:.0f}-{:.0f}%")
            in_turn_ci = _interval(r["vs_in_turn_ci"], 1, "{:.2f}-{:.2f}")
            memory = f" {r['peak_gpu_gb']:7.1f} GB" if r["peak_gpu_gb"] is not None else ""
            print(f"{r['variant']:10} {r['images_per_second']:9.0f} {total:9.0f} "
                  f"{r['gflops']:8.1f} {100 * r['share_of_ceiling']:7.0f}% {share_ci:>11} "
                  f"{r['vs_in_turn']:9.2f} {in_turn_ci:>11} "
                  f"{total / base['images_per_second']:10.2f}{memory}{best}")
    print(f"\npeak RSS of `initstudy run`: {results['peak_rss_mb']:.0f} MB (wandb "
          f"{results['peak_rss_wandb']})")
    if study_precision:
        r = results["study"]
        print(f"study {r['study']}: {r['runs']} runs as one pack in {r['seconds']:.0f} s, "
              f"{r['images_per_second_per_run']:.0f} images/s per run, "
              f"{100 * r['fraction_of_ceiling']:.0f}% of the {study_precision} ceiling")


def _interval(bounds: list[float] | None, scale: float, form: str) -> str:
    return form.format(*(scale * b for b in bounds)) if bounds else "(< 6 reps)"


def device_name(device: torch.device) -> str:
    """The device with its model: the GPU's name, or the CPU's (as a run records it) and the
    widest vector instructions PyTorch uses on it."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({cpu_name()}, {torch.backends.cpu.get_cpu_capability()})"


def _sizes(text: str) -> list[int]:
    """``4`` or ``1,5,25``: positive pack sizes."""
    try:
        sizes = [int(k) for k in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"pack sizes are positive integers, e.g. 1,5,25; "
                                         f"got {text!r}")
    return sizes


def _choices(known: tuple[str, ...]) -> Callable[[str], list[str]]:
    """A parser of ``a,b``: names from ``known``."""
    def parse(text: str) -> list[str]:
        names = text.split(",")
        bad = [n for n in names if n not in known]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad)}; choose from "
                                             f"{', '.join(known)}")
        return names
    return parse


if __name__ == "__main__":
    try:
        main()
    except InitStudyError as exc:
        sys.exit(f"error: {exc}")
