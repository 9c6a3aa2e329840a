"""What a run runs on: the device it asks for, resolved; its numerics (TF32, autocast) and the
host's memory allocator; and everything besides its config that makes it reproducible
(versions, git commit, host, device)."""

from __future__ import annotations

import ast
import contextlib
import ctypes
import importlib.metadata
import importlib.util
import os
import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from ._version import __version__
from .errors import ConfigError


def resolve_device(spec: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> a usable device, or ConfigError saying why not."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"unknown device '{spec}'; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(f"unsupported device '{spec}'; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"device '{spec}' asked for, but no CUDA GPU is usable here "
                          f"(torch.cuda.is_available() is False); use --device cpu or auto")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ConfigError(f"device '{spec}' asked for, but only {count} CUDA device(s) are "
                          f"visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')})")
    return device


def _git(folder: Path, *args: str) -> str | None:
    try:
        result = subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True,
                                timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def source_state(package: Path = Path(__file__).parent) -> tuple[str | None, bool | None]:
    """The git commit of the code in ``package`` and whether that code differs from it (a
    tracked file changed, or a file git does not ignore added, in ``package`` itself); None
    for each where git does not track the package (no checkout, or a checkout that merely
    holds it, as a project's ignored virtual environment does). A study's run folders,
    untracked in its checkout while it runs, are not the code that ran, and do not count."""
    if not _git(package, "ls-files", "--", "."):
        return None, None
    status = _git(package, "status", "--porcelain", "--", ".")
    return _git(package, "rev-parse", "HEAD"), bool(status) if status is not None else None


def environment(device: torch.device) -> dict[str, Any]:
    """What besides the config makes a run reproducible: versions, git commit, host, device."""
    commit, dirty = source_state()
    return {
        "initstudy": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": version_of("torchvision"),
        "cuda": torch.version.cuda,
        "git_commit": commit,
        "git_dirty": dirty,
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else cpu_name()),
        # What decides whether a GPU run repeats bit for bit (docs/records.md).
        "compute_capability": (".".join(map(str, torch.cuda.get_device_capability(device)))
                               if device.type == "cuda" else None),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # PyTorch's vector ISA
        "native_bf16": native_bf16(device),
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "torch_threads": torch.get_num_threads(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "argv": sys.argv,
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def cpu_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model as Linux names it, with its family and model numbers where it gives
    them (a virtual machine may name two generations alike: "AMD EPYC"); elsewhere what
    Python knows of the processor."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in cpuinfo.read_text().splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields.setdefault(key.strip(), value.strip())  # the first processor's
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']} model {fields['model']})"
    return name


def version_of(package: str) -> str | None:
    """``package.__version__`` as the package would say it (local label included, e.g.
    0.29.1+cu130), read from its ``version.py`` without importing it: importing torchvision
    takes seconds, paid by every run's process, which never uses it. Else the installed
    distribution's version; None where it is not installed."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    try:
        for node in ast.parse(Path(spec.origin).with_name("version.py").read_text()).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__"
                                                    for t in node.targets):
                return ast.literal_eval(node.value)
    except (OSError, SyntaxError, ValueError):
        pass
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:  # a module, not an installed package
        return None


def native_bf16(device: torch.device) -> bool:
    """Whether the device multiplies bf16 in hardware: a GPU from Ampere (compute capability
    8.0) on, a CPU with AVX512-BF16 or AMX. Elsewhere bf16 is emulated, and slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


HEAP_KEEP = 256 << 20  # bytes of freed memory malloc may keep for reuse; see hold_freed_memory


def hold_freed_memory() -> bool:
    """Make glibc's malloc serve large blocks from its heap and keep up to HEAP_KEEP bytes of
    freed memory there, instead of mapping fresh pages for each block and handing them back
    to the OS when it is freed; return whether malloc took it (False where it is not glibc's).

    A CPU training step allocates and frees ~100 MB of activations (the first conv's output
    alone is 51 MB at batch 128). By default each of those blocks is a new mmap, paid for by
    one page fault per 4 kB (docs/performance.md). Blocks the heap cannot grow for still fall
    back to mmap. Process-wide; results unchanged.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    # <malloc.h>: M_MMAP_MAX = -4 (0: no mmap for blocks the heap can hold),
    # M_TRIM_THRESHOLD = -1 (free memory at the heap's top kept before trimming)
    return mallopt(-4, 0) == 1 and mallopt(-1, HEAP_KEEP) == 1


# The TF32 switches of the matmuls and convs a run uses, in torch's fp32_precision API (the
# legacy allow_tf32 flags raise once a user has set this one, so they are never touched).
TF32_SWITCHES = (torch.backends.cuda.matmul, torch.backends.cudnn.conv)


@contextlib.contextmanager
def numerics(precision: str, device: torch.device):
    """fp32 runs CUDA matmuls and convs in full fp32 ("ieee"): PyTorch's own default lets
    cuDNN convs use TF32, which rounds their inputs to 10 mantissa bits. tf32 allows TF32 in
    both; bf16 runs the forward pass under autocast. Each switch is restored to exactly what it
    was ("none", inherit, included)."""
    saved = [switch.fp32_precision for switch in TF32_SWITCHES]
    for switch in TF32_SWITCHES:
        switch.fp32_precision = "tf32" if precision == "tf32" else "ieee"
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            yield
    finally:
        for switch, value in zip(TF32_SWITCHES, saved):
            switch.fp32_precision = value


def on_device(device: torch.device, what: str, step: Callable[[], Any]) -> Any:
    """Run ``step``; a CUDA failure in it (out of memory, a GPU busy in exclusive mode, no
    kernels for this GPU in the installed wheel) becomes one ConfigError line."""
    try:
        return step()
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if device.type != "cuda" and not isinstance(exc, torch.OutOfMemoryError):
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ConfigError(f"{what} on {device} failed: {type(exc).__name__}: {first}") from exc
