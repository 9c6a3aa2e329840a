#!/usr/bin/env python3
"""Training throughput of the document's LeNet: the usual loop against initstudy's trainer,
packed runs, and the device's own matrix-product ceiling. Plain PyTorch timing, one process,
the same model, data and device for every measurement; each is the median of --repeats after
a warm-up.

    python scripts/bench.py                      # a table
    python scripts/bench.py --json bench.json    # and the numbers as JSON
    python scripts/bench.py --study              # on a GPU: also the MNIST study, as one pack
    python scripts/bench.py --pack 1,5,25 --precision tf32   # which pack size trains fastest

baseline  = the loop of PyTorch's MNIST example: a Dataset with per-sample ToTensor and
            Normalize, DataLoader(batch_size=64, shuffle=True), NCHW fp32, loss.item() every step
initstudy = the trainer of `initstudy run`, at its defaults
packed    = --pack runs trained together by the same trainer (per-run images/s), for each
            pack size given; the best is the one with the most images/s for all its runs
ceiling   = fp32 matrix product GFLOP/s, the faster of torch.matmul and (on a CPU) oneDNN
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

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from initstudy import LeNet, RunConfig, apply_scheme
from initstudy.config import PRECISIONS
from initstudy.environment import resolve_device
from initstudy.data import STATS
from initstudy.sources import load_dataset
from initstudy.errors import InitStudyError
from initstudy.study import load_study
from initstudy.environment import numerics
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


def ceiling_gflops(device: torch.device, repeats: int) -> dict[str, float]:
    """Median GFLOP/s of a large fp32 matrix product, by each library that multiplies matrices
    on this device: torch.matmul (cuBLAS; MKL on a CPU) and, on a CPU, oneDNN, which runs a
    1x1 convolution of channels-last data as one. On AMD CPUs MKL takes its AVX2 code and
    oneDNN AVX-512, so the device's ceiling is the faster of the two."""
    n = 4096 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device) for _ in range(2))
    products = {"matmul": lambda: a @ b}
    if device.type == "cpu":
        rows = a.view(1, n, n, 1).contiguous(memory_format=torch.channels_last)  # n positions
        cols = b.view(n, n, 1, 1).contiguous(memory_format=torch.channels_last)
        products["onednn"] = lambda: F.conv2d(rows, cols)
    calls = 10 if device.type == "cuda" else 2
    results = {}
    for name, product in products.items():
        times = []
        for i in range(repeats + 1):
            _sync(device)
            start = time.perf_counter()
            with numerics("fp32", device):  # no TF32 on CUDA, as the trainer's default
                for _ in range(calls):
                    product()
            _sync(device)
            if i:  # the first is warm-up
                times.append((time.perf_counter() - start) / calls)
        results[name] = 2 * n ** 3 / statistics.median(times) / 1e9
    return results


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ExampleDataset(torch.utils.data.Dataset):
    """What torchvision.datasets.MNIST does per sample: a PIL image, then the transforms."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, dataset: str):
        from torchvision import transforms

        mean, std = STATS[dataset]
        self.images, self.labels = images.numpy(), labels.tolist()
        self.transform = transforms.Compose([transforms.ToTensor(),
                                             transforms.Normalize((mean,), (std,))])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i], mode="L")), self.labels[i]


def baseline(data, device: torch.device, images: int, repeats: int) -> float:
    """images/s of the PyTorch MNIST example's loop (median of repeats, after a warm-up)."""
    loader = torch.utils.data.DataLoader(
        ExampleDataset(data.train_images[:images], data.train_labels[:images], data.name),
        batch_size=64, shuffle=True)
    model = apply_scheme(LeNet(), "default", seed=0).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    rates = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        with numerics("fp32", device):  # NCHW fp32: no TF32 on CUDA either
            seen = _example_epoch(loader, model, optimizer, device)
        if i:
            rates.append(seen / (time.perf_counter() - start))
    return statistics.median(rates)


def _example_epoch(loader, model: LeNet, optimizer, device: torch.device) -> int:
    """One epoch of the PyTorch MNIST example's loop; returns the images trained."""
    seen = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad()
        # The document's forward less its final Softmax (cross-entropy takes the scores),
        # not LeNet.logits, which is initstudy's own faster order.
        loss = F.cross_entropy(model.document_logits(x), y)
        loss.backward()
        optimizer.step()
        loss.item()  # the example logs it; it waits for the device every step
        seen += len(y)
    return seen


def trainer(dataset: str, data_dir: str | None, images: int, repeats: int, pack: int,
            device: str, precision: str = "fp32") -> float:
    """Per-run images/s of initstudy's trainer at its defaults (median of repeats of one
    epoch each, after a warm-up), for ``pack`` runs trained together. No validation split:
    ``images`` may be the whole training set, and only training steps are timed."""
    rates = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats + 1):
            configs = [RunConfig(scheme="default", seed=k, dataset=dataset, data_dir=data_dir,
                                 epochs=1, val_size=0, train_subset=images, device=device,
                                 precision=precision, quiet=True,
                                 wandb="disabled", diag_batch=0, out=f"{tmp}/{i}-{k}")
                       for k in range(pack)]
            summaries = train_pack(configs)
            if i:
                rates.append(summaries[0]["images_per_second"])
    return statistics.median(rates)


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
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS,
                        help="of the trainer's rows (the baseline is fp32)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--data-dir", help="data root (as `initstudy run --data-dir`)")
    parser.add_argument("--study", type=Path, nargs="?", const=MNIST_STUDY, metavar="FILE",
                        help="also time a study trained as one pack (default: the six-scheme, "
                        "five-seed MNIST study and LSUV)")
    args = parser.parse_args()

    device = resolve_device(args.device)
    study_runs = len(load_study(args.study).runs) if args.study else 0  # a bad file fails now
    data = load_dataset(args.dataset, args.data_dir)
    flops = flops_per_image(device)
    results = {"device": str(device) + (f" ({torch.cuda.get_device_name(device)})"
                                        if device.type == "cuda" else ""),
               "torch": torch.__version__, "threads": torch.get_num_threads(),
               "dataset": data.name, "images_per_repeat": args.images,
               "repeats": args.repeats, "precision": args.precision, "flops_per_image": flops}
    # The baseline first, while this process's malloc is as a researcher's script finds it:
    # the trainer changes it for good (hold_freed_memory), and is measured after.
    results["baseline"] = {"images_per_second": baseline(data, device, args.images,
                                                          args.repeats)}
    results["initstudy"] = {"images_per_second": trainer(
        args.dataset, args.data_dir, args.images, args.repeats, 1, str(device), args.precision)}
    results["packed"] = [{"runs": k, "images_per_second": trainer(
        args.dataset, args.data_dir, args.images, args.repeats, k, str(device), args.precision)}
        for k in args.pack]
    if device.type == "cpu":  # how much of the gain is the allocator's: the same loop again
        results["baseline_malloc_held"] = {"images_per_second": baseline(
            data, device, args.images, args.repeats)}
    results["ceiling_by_library"] = ceiling_gflops(device, args.repeats)
    results["ceiling_gflops"] = max(results["ceiling_by_library"].values())
    for row in [results["initstudy"], *results["packed"]]:
        rate, runs = row["images_per_second"], row.get("runs", 1)
        row["vs_baseline"] = rate * runs / results["baseline"]["images_per_second"]
        row["gflops"] = rate * runs * flops / 1e9
    results["best_pack"] = max(results["packed"], key=lambda r: r["gflops"])["runs"]
    results["initstudy_fraction_of_ceiling"] = (results["initstudy"]["gflops"]
                                                / results["ceiling_gflops"])
    # wandb offline, as a run's default; a machine without wandb measures without it
    results["peak_rss_wandb"] = "offline" if importlib.util.find_spec("wandb") else "disabled"
    results["peak_rss_mb"] = peak_rss_mb(args.dataset, args.data_dir, str(device),
                                         results["peak_rss_wandb"])
    if args.study:
        results["study"] = study(args.study, study_runs, args.data_dir, device)
        r = results["study"]
        r["fraction_of_ceiling"] = (r["images_per_second_per_run"] * r["runs"] * flops / 1e9
                                    / results["ceiling_gflops"])

    print(f"device {results['device']}, torch {results['torch']}, {results['threads']} threads, "
          f"{data.name}, {flops / 1e9:.3f} GFLOP per training image, trainer in "
          f"{args.precision}")
    print(f"{'':10} {'images/s':>10} {'x baseline':>11} {'GFLOP/s':>9}")
    base = results["baseline"]["images_per_second"]
    print(f"{'baseline':10} {base:10.0f} {1:11.2f} {base * flops / 1e9:9.1f}")
    if "baseline_malloc_held" in results:
        held = results["baseline_malloc_held"]["images_per_second"]
        print(f"{'(baseline':10} {held:10.0f} {held / base:11.2f} {held * flops / 1e9:9.1f}   "
              f"with initstudy's malloc setting, measured after it)")
    for r in [results["initstudy"], *results["packed"]]:
        label = f"packed x{r['runs']}" if "runs" in r else "initstudy"
        best = "  <- best pack" if r.get("runs") == results["best_pack"] else ""
        print(f"{label:10} {r['images_per_second']:10.0f} {r['vs_baseline']:11.2f} "
              f"{r['gflops']:9.1f}   (per run; x baseline and GFLOP/s for all runs){best}")
    by_library = ", ".join(f"{name} {gflops:.0f}"
                           for name, gflops in results["ceiling_by_library"].items())
    print(f"ceiling    {results['ceiling_gflops']:.1f} GFLOP/s (fp32 matrix product: "
          f"{by_library}); initstudy reaches {100 * results['initstudy_fraction_of_ceiling']:.0f}%"
          f" of it")
    print(f"peak RSS of `initstudy run`: {results['peak_rss_mb']:.0f} MB (wandb "
          f"{results['peak_rss_wandb']})")
    if args.study:
        r = results["study"]
        print(f"study {r['study']}: {r['runs']} runs as one pack in {r['seconds']:.0f} s, "
              f"{r['images_per_second_per_run']:.0f} images/s per run, "
              f"{100 * r['fraction_of_ceiling']:.0f}% of the ceiling")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


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


if __name__ == "__main__":
    try:
        main()
    except InitStudyError as exc:
        sys.exit(f"error: {exc}")
