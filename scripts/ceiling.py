"""The device's own ceiling, and rates measured beside it: the GFLOP/s of a large matrix
product in a precision, by each library that multiplies matrices on the device, measured just
before and after each repeat of what is timed; the share of the ceiling each repeat reached,
and distribution-free intervals of the medians (scripts/bench.py prints them)."""

from __future__ import annotations

import math
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F
from scipy.stats import quantile_test

from initstudy.environment import native_bf16, numerics

CEILING_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16}


def emulated(precision: str, device: torch.device) -> bool:
    """Whether ``precision`` is bf16 on a device without bf16 arithmetic of its own."""
    return precision == "bf16" and not native_bf16(device)


def ceiling(device: torch.device, precision: str) -> Callable[[], dict[str, float]]:
    """A function measuring, in a fraction of a second, the GFLOP/s of a large matrix product
    in ``precision`` by each library that multiplies matrices on this device: torch.matmul
    (cuBLAS; MKL on a CPU) and, on a CPU, oneDNN, which runs a 1x1 convolution of
    channels-last data as one. (On AMD CPUs with AVX-512, MKL takes its AVX2 code and oneDNN
    AVX-512, so the device's ceiling is the faster of the two.)"""
    dtype = CEILING_DTYPES[precision]
    n = largest = 4096 if device.type == "cuda" else 2048
    if emulated(precision, device):
        # An emulated bf16 (0.3 GFLOP/s on an AVX2 CPU): as large a product as it multiplies
        # in about 50 ms, so it is measured in seconds too. Any other precision keeps one size,
        # since a size chosen by timing shrinks when the machine is busy, and a small product
        # runs far below the device's speed.
        n = 256
        while n < largest and _seconds(2 * n, dtype, device) < 0.05:
            n *= 2
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    products = {"matmul": lambda: a @ b}
    if device.type == "cpu":
        rows = a.view(1, n, n, 1).contiguous(memory_format=torch.channels_last)  # n positions
        cols = b.view(n, n, 1, 1).contiguous(memory_format=torch.channels_last)
        products["onednn"] = lambda: F.conv2d(rows, cols)
    calls = 10 if device.type == "cuda" else 2

    def measure() -> dict[str, float]:
        results = {}
        for name, product in products.items():
            with numerics("tf32" if precision == "tf32" else "fp32", device):
                product()  # warm
                _sync(device)
                start = time.perf_counter()
                for _ in range(calls):
                    product()
                _sync(device)
            results[name] = 2 * n ** 3 * calls / (time.perf_counter() - start) / 1e9
        return results

    return measure


def _seconds(n: int, dtype: torch.dtype, device: torch.device) -> float:
    """Seconds of one n x n matrix product, estimated from one of half the size (x 8)."""
    a = torch.randn(n // 2, n // 2, device=device, dtype=dtype)
    a @ a
    _sync(device)
    start = time.perf_counter()
    a @ a
    _sync(device)
    return 8 * (time.perf_counter() - start)


def beside_ceiling(measures: list[Callable[[], float]], gflops_per_unit: list[float],
                   ceiling_now: Callable[[], dict[str, float]], repeats: int,
                   labels: list[str] | None = None) -> list[dict]:
    """Each of ``measures()`` (a rate) after a warm-up, ``repeats`` times, each time between two
    ceiling measurements, the measures taking turns within a repeat so that runs compared
    with each other are timed minutes apart at most, not a whole table apart. Per measure: the
    median rate, the share of the ceiling of each repeat (its GFLOP/s, ``rate *
    gflops_per_unit``, over the mean of the ceilings just before and after it) and their
    median with its 95% interval (``median_interval``), and the ceilings seen, by library.
    With ``labels`` (one per measure), each repeat's shares go to stderr as it ends: a bench
    can take most of an hour, and prints its tables only at the end."""
    for measure in measures:
        measure()
    rows = [{"rates": [], "shares": [], "ceilings": []} for _ in measures]
    for _ in range(repeats):
        for measure, gflops, row in zip(measures, gflops_per_unit, rows):
            before = ceiling_now()
            rate = measure()
            after = ceiling_now()
            row["ceilings"] += [before, after]
            row["shares"].append(rate * gflops / statistics.mean([max(before.values()),
                                                                  max(after.values())]))
            row["rates"].append(rate)
        if labels:
            print(f"repeat {len(rows[0]['shares'])}/{repeats}: " + ", ".join(
                f"{label} {row['shares'][-1]:.0%}" for label, row in zip(labels, rows)),
                file=sys.stderr, flush=True)
    return [{"images_per_second": statistics.median(row.pop("rates")),
             "share_of_ceiling": statistics.median(row["shares"]),
             "share_ci": median_interval(row["shares"]), **row} for row in rows]


def in_turn(shares: list[float], one_run: list[float]) -> list[float]:
    """A pack's share of the ceiling over one run's, repeat by repeat (the two timed in the same
    repeat): K runs packed against the same K runs trained one after another."""
    return [s / o for s, o in zip(shares, one_run)]


def median_interval(ratios: list[float], level: float = 0.95) -> list[float] | None:
    """The distribution-free interval of the median of ``ratios`` at ``level`` (two order
    statistics; scipy's ``quantile_test``): it covers the median at least ``level`` of the
    time whatever the repeats' distribution, a VM's bursts included. None where there are too
    few repeats for that level (under 6 for 95%)."""
    interval = quantile_test(ratios, p=0.5).confidence_interval(level)
    return None if math.isnan(interval.low) else [float(interval.low), float(interval.high)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
