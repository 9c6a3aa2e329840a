"""The LeNet's CPU kernels (``kernels.cpp``), as custom operators with their backward:
``first_block``, its first conv (one channel into 128, 5x5), 2x2 max-pool and ReLU as one;
``pool_relu``, a 2x2 max-pool and ReLU.

Why: PyTorch's operators write the first conv's whole output (0.4 MB an image in fp32), read
it back to pool it and keep the pool's int64 indices for the backward, so that block, 2% of
the LeNet's FLOPs, took a fifth of a CPU training step in fp32 and half of one in bf16. The
kernels pool each output while it is in registers and keep one byte per pooled value for the
backward (docs/performance.md).

They are compiled on first use with the system's C++ compiler (``$CXX``, else ``c++``) for this
CPU (``-march=native``; OpenMP from torch's own runtime, which is already loaded) into the
cache folder, named by a hash of the source, the flags, the compiler's version and the CPU's
flags, so that a cache shared between machines never hands one a build for another. Where
that fails, ``kernel()`` is None and ``why_not()`` says why; the LeNet then keeps PyTorch's
operators.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from .sources import cache_root

SOURCE = Path(__file__).with_name("kernels.cpp")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
# gcc and clang use 256-bit vectors by default even where the CPU has 512-bit ones.
WIDE = ["-mprefer-vector-width=512"]
CHANNELS, KERNEL, SIDE, POOLED = 128, 5, 32, 14  # out channels, kernel, padded input, output
BUILD_SECONDS = 300
C_TYPES = {torch.float32: "float", torch.float64: "double", torch.bfloat16: "bfloat16"}


def kernel() -> ctypes.CDLL | None:
    """The compiled kernels (a ctypes library), built on first use; None where they cannot be
    (``why_not``)."""
    lib, _ = _load()
    return lib


def why_not() -> str | None:
    """Why ``kernel()`` is None, in a line; None where the kernels are there."""
    return _load()[1]


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    cxx = os.environ.get("CXX", "c++")
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                                 check=True, timeout=60).stdout
        flags = FLAGS + (WIDE if platform.machine() in ("x86_64", "AMD64") else [])
        key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(flags), version,
                                        _cpu_flags()]).encode()).hexdigest()[:16]
        path = cache_root() / "kernels" / f"kernels-{key}.so"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_partials(path.parent)
            # Built beside its place and moved in whole: workers that build at once never
            # load half a file.
            partial = path.with_name(f".{path.name}.{os.getpid()}")
            try:
                subprocess.run([cxx, *flags, str(SOURCE), "-o", str(partial)],
                               capture_output=True, text=True, check=True, timeout=BUILD_SECONDS)
                os.replace(partial, path)
            finally:
                partial.unlink(missing_ok=True)
        lib = ctypes.CDLL(str(path))
    except FileNotFoundError:
        return None, f"no C++ compiler ('{cxx}'; set $CXX)"
    except subprocess.CalledProcessError as exc:
        lines = (exc.stderr or exc.stdout or "").strip().splitlines()
        first = next((line for line in lines if "error" in line), lines[0] if lines else exc)
        return None, f"'{cxx}' failed on {SOURCE.name}: {first}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"cannot build or load {SOURCE.name}: {exc}"
    sizes = [ctypes.c_int() for _ in range(4)]
    lib.first_block_sizes(*map(ctypes.byref, sizes))
    if [s.value for s in sizes] != [CHANNELS, KERNEL, SIDE, POOLED]:
        return None, f"{path.name} was built for other sizes: {[s.value for s in sizes]}"
    return lib, None


def _remove_stale_partials(folder: Path) -> None:
    """Remove the half-built libraries in ``folder`` that are older than a build may last:
    left by builds that were killed (a finished or failed one removes its own). A younger
    one may be another process's build under way, on this machine or on another sharing the
    cache."""
    for partial in folder.glob(".kernels-*.so.*"):
        try:
            if time.time() - partial.stat().st_mtime > BUILD_SECONDS:
                partial.unlink()
        except OSError:
            pass  # gone meanwhile, or not ours to remove: the build goes on regardless


def vector_bits() -> int | None:
    """The width of the kernels' vectors in bits: 512 on a CPU with AVX-512, else 256 (AVX2's
    registers); None where the kernels are not there."""
    return None if kernel() is None else 8 * kernel().vector_bytes()


def _cpu_flags() -> str:
    """The CPU's feature flags (Linux), else what Python knows of the processor."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def first_block(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``relu(max_pool2d(conv(x), 2))`` for the LeNet's first conv and x, N x 1 x 32 x 32 (the
    zero-padded images) on the CPU: N x 128 x 14 x 14, laid out channels-last. The gradients
    reach conv's weight and bias (not x). In float32 and float64 the kernel computes in x's
    dtype; under CPU autocast to bfloat16, as autocast's convolution does: input, weight and
    bias rounded to bf16, the products summed in fp32, the output and the gradients bf16.

    The same values as the operators up to float rounding (the taps are summed in another
    order), the same tie-breaking (the first of equal maxima takes the gradient); the same
    numbers for any number of threads. RuntimeError where the kernel is missing."""
    if (tuple(conv.weight.shape) != (CHANNELS, 1, KERNEL, KERNEL) or conv.bias is None
            or x.shape[1:] != (1, SIDE, SIDE)):
        raise ValueError(f"first_block takes a 1->{CHANNELS} {KERNEL}x{KERNEL} conv with a bias "
                         f"and N x 1 x {SIDE} x {SIDE} inputs, not {tuple(conv.weight.shape)} "
                         f"and {tuple(x.shape)}")
    bf16 = torch.is_autocast_enabled("cpu")
    if bf16 and torch.get_autocast_dtype("cpu") != torch.bfloat16:
        raise ValueError("first_block runs under CPU autocast to bfloat16 only")
    if conv.weight.dtype not in (torch.float32, torch.float64) or conv.weight.device.type != "cpu":
        raise ValueError(f"first_block computes in float32 or float64 on the CPU, not "
                         f"{conv.weight.dtype} on {conv.weight.device}")
    out, _ = _first_block(x.to(conv.weight.dtype), conv.weight, conv.bias, bf16)
    return out.permute(0, 3, 1, 2)


def pool_relu(x: torch.Tensor) -> torch.Tensor:
    """``relu(max_pool2d(x, 2))`` of x, N x C x H x W on the CPU (H and W even, C a multiple
    of 16; float32, float64 or bfloat16; channels-last, or it is copied so), its result laid
    out channels-last. The same numbers as the operators (a max chooses, it does not round),
    the same tie-breaking; the gradient reaches x. RuntimeError where the kernel is missing."""
    n, c, h, w = x.shape
    if h % 2 or w % 2 or c % 16 or x.dtype not in C_TYPES or x.device.type != "cpu":
        raise ValueError(f"pool_relu takes N x C x H x W with H, W even and C a multiple of 16, "
                         f"float32, float64 or bfloat16 on the CPU, not {tuple(x.shape)} "
                         f"{x.dtype} on {x.device}")
    out, _ = _pool_relu(x)
    return out.permute(0, 3, 1, 2)


def _pointer(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _call(name: str, dtype: torch.dtype, *args) -> None:
    """kernels.cpp's ``name_<C type of dtype>`` on tensors (as pointers) and ints."""
    if kernel() is None:
        raise RuntimeError(f"the LeNet's CPU kernels are not available: {why_not()}")
    entry = getattr(kernel(), f"{name}_{C_TYPES[dtype]}")
    entry(*(_pointer(a) if isinstance(a, torch.Tensor) else ctypes.c_int(a) for a in args),
          ctypes.c_int(torch.get_num_threads()))


def _operands(t: torch.Tensor, bf16: bool) -> torch.Tensor:
    """t as the kernel multiplies it: rounded to bf16 (held as fp32) under bf16 autocast."""
    return t.detach().to(torch.bfloat16).float() if bf16 else t.detach()


# The operators: opaque to torch.compile, with their own backward. Outputs are channels-last
# arrays (N x H x W x C); the wrappers above view them as N x C x H x W.
@torch.library.custom_op("initstudy::first_block", mutates_args=(), device_types="cpu")
def _first_block(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    images = _operands(x, bf16).reshape(len(x), SIDE, SIDE).contiguous()
    taps = _operands(weight, bf16).reshape(CHANNELS, -1).t().contiguous()  # 25 x 128, tap-major
    out, won = _first_block_fake(x, weight, bias, bf16)
    _call("forward", out.dtype, images, taps, _operands(bias, bf16).contiguous(), out, won,
          len(x))
    return out, won


@_first_block.register_fake
def _first_block_fake(x, weight, bias, bf16):
    shape = (len(x), POOLED, POOLED, CHANNELS)
    return (x.new_empty(shape, dtype=torch.bfloat16 if bf16 else x.dtype),
            x.new_empty(shape, dtype=torch.uint8))


@torch.library.custom_op("initstudy::first_block_backward", mutates_args=(), device_types="cpu")
def _first_block_backward(x: torch.Tensor, won: torch.Tensor, grad: torch.Tensor,
                          bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    images = _operands(x, bf16).reshape(len(x), SIDE, SIDE).contiguous()
    if grad.dtype != images.dtype and (grad.dtype, images.dtype) != (torch.bfloat16, torch.float32):
        grad = grad.to(images.dtype)  # the kernel reads bf16 or the images' own dtype
    taps, bias = x.new_empty(KERNEL * KERNEL, CHANNELS), x.new_empty(CHANNELS)
    _call("backward", grad.dtype, images, grad.contiguous(), won, len(x), taps, bias)
    if bf16:  # autocast's convolution hands its fp32 weights bf16 gradients
        taps, bias = taps.to(torch.bfloat16).float(), bias.to(torch.bfloat16).float()
    return taps.t().contiguous().view(CHANNELS, 1, KERNEL, KERNEL), bias


@_first_block_backward.register_fake
def _first_block_backward_fake(x, won, grad, bf16):
    return x.new_empty(CHANNELS, 1, KERNEL, KERNEL), x.new_empty(CHANNELS)


def _first_block_setup(ctx, inputs, output):
    x, _, _, bf16 = inputs
    ctx.save_for_backward(x, output[1])
    ctx.bf16 = bf16


def _first_block_grad(ctx, grad, _):
    x, won = ctx.saved_tensors
    weight, bias = _first_block_backward(x, won, grad, ctx.bf16)
    return None, weight, bias, None


_first_block.register_autograd(_first_block_grad, setup_context=_first_block_setup)


@torch.library.custom_op("initstudy::pool_relu", mutates_args=(), device_types="cpu")
def _pool_relu(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out, won = _pool_relu_fake(x)
    n, c, h, w = x.shape
    _call("pool_forward", x.dtype, x.permute(0, 2, 3, 1).contiguous(), out, won, n, h, w, c)
    return out, won


@_pool_relu.register_fake
def _pool_relu_fake(x):
    n, c, h, w = x.shape
    shape = (n, h // 2, w // 2, c)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.uint8)


@torch.library.custom_op("initstudy::pool_relu_backward", mutates_args=(), device_types="cpu")
def _pool_relu_backward(grad: torch.Tensor, won: torch.Tensor) -> torch.Tensor:
    gx = _pool_relu_backward_fake(grad, won)
    n, h, w, c = gx.shape
    _call("pool_backward", grad.dtype, grad.contiguous(), won, gx, n, h, w, c)
    return gx


@_pool_relu_backward.register_fake
def _pool_relu_backward_fake(grad, won):
    n, h, w, c = grad.shape
    return grad.new_empty(n, 2 * h, 2 * w, c)


def _pool_relu_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _pool_relu_grad(ctx, grad, _):
    return _pool_relu_backward(grad, ctx.saved_tensors[0]).permute(0, 3, 1, 2)


_pool_relu.register_autograd(_pool_relu_grad, setup_context=_pool_relu_setup)
