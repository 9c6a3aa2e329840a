"""The LeNet's CPU kernels: the operators' numbers, in every dtype they take, for any number of
threads; and where they cannot be built, the operators, saying why."""

import os
import platform
import time

import pytest
import torch
import torch.nn as nn

from initstudy import kernels
from initstudy.kernels import first_block, pool_relu

pytestmark = pytest.mark.skipif(kernels.kernel() is None,
                                reason=f"the kernels do not build here: {kernels.why_not()}")


def operators(conv, x):
    return torch.relu(nn.functional.max_pool2d(conv(x), 2))


def images(n, dtype, background=False):
    """N x 1 x 32 x 32 zero-padded images; with ``background``, MNIST-like: a constant
    background, so that most pool windows hold four equal values (ties)."""
    x = torch.randn(n, 1, 28, 28, dtype=dtype)
    if background:
        x[:, :, :8], x[:, :, 20:], x[:, :, :, :8], x[:, :, :, 20:] = (-0.4242,) * 4
    return nn.functional.pad(x, (2, 2, 2, 2))


@pytest.mark.parametrize("background", [False, True], ids=["noise", "ties"])
def test_values_and_gradients_are_the_operators_in_float64(background):
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 128, 5).double()
    x = images(37, torch.float64, background)  # 37: a short last chunk of the backward's sums
    expected = operators(conv, x)
    out = first_block(conv, x)
    assert out.shape == expected.shape and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, expected, rtol=1e-12, atol=1e-13)
    g = torch.randn_like(expected)
    want = torch.autograd.grad((expected * g).sum(), [conv.weight, conv.bias])
    got = torch.autograd.grad((out * g).sum(), [conv.weight, conv.bias])
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_float32_is_the_operators_to_rounding_and_the_same_for_any_thread_count():
    torch.manual_seed(1)
    conv, x = nn.Conv2d(1, 128, 5), images(64, torch.float32, background=True)
    assert torch.allclose(first_block(conv, x), operators(conv, x), rtol=1e-5, atol=1e-5)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out = first_block(conv, x)
            results.append((out, *torch.autograd.grad(out.square().sum(),
                                                      [conv.weight, conv.bias])))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_under_bf16_autocast_it_is_autocasts_convolution_with_exact_gradient_sums():
    """bf16 output of bf16-rounded operands, as autocast's convolution; the gradients summed
    in fp32 then rounded to bf16: within bf16's rounding (2^-8) of the exact sum of the same
    bf16 operands."""
    torch.manual_seed(2)
    conv, x = nn.Conv2d(1, 128, 5), images(64, torch.float32)
    with torch.autocast("cpu", torch.bfloat16):
        out, expected = first_block(conv, x), operators(conv, x)
    assert out.dtype == expected.dtype == torch.bfloat16
    assert torch.allclose(out.float(), expected.float(), rtol=2 ** -7, atol=2 ** -7)
    g = torch.randn_like(out)
    weight, bias = torch.autograd.grad((out * g).float().sum(), [conv.weight, conv.bias])
    assert weight.dtype == torch.float32 and torch.equal(weight, weight.bfloat16().float())
    exact = nn.Conv2d(1, 128, 5).double()
    exact.load_state_dict({k: v.bfloat16().double() for k, v in conv.state_dict().items()})
    want = torch.autograd.grad((operators(exact, x.bfloat16().double()) * g.double()).sum(),
                               [exact.weight, exact.bias])
    for a, b in zip((weight, bias), want):
        assert (a.double() - b).norm() / b.norm() < 2 ** -8


def test_nan_weights_give_nan_outputs():
    """A diverged run stays visibly diverged: NaN wins the pool, as in PyTorch."""
    conv = nn.Conv2d(1, 128, 5)
    with torch.no_grad():
        conv.weight[3] = float("nan")
    out = first_block(conv, images(2, torch.float32))
    assert out[:, 3].isnan().all() and not out[:, 4].isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_pool_relu_is_the_operators_exactly(dtype):
    """A max chooses and a ReLU clips: the same numbers bit for bit, gradients included, with
    the same tie-breaking (whole rows of equal values here) and NaN winning its window."""
    torch.manual_seed(3)
    x = torch.randn(5, 32, 10, 10).round(decimals=1).to(dtype)  # rounding makes ties
    x[:, :, :2] = 0.5
    x[0, 3, 4, 4] = float("nan")
    x = x.to(memory_format=torch.channels_last)
    mine, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = pool_relu(mine), torch.relu(nn.functional.max_pool2d(theirs, 2))
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out.nan_to_num(-1), expected.nan_to_num(-1)) and out[0, 3, 2, 2].isnan()
    g = torch.randn(expected.shape).to(dtype)
    out.backward(g)
    expected.backward(g)
    assert torch.equal(mine.grad, theirs.grad)


def test_the_operators_pass_torch_librarys_checks():
    """Fake shapes that match the real ones, an autograd registration, and no aliasing, as
    torch.compile relies on."""
    conv = nn.Conv2d(1, 128, 5)
    torch.library.opcheck(kernels._first_block, (images(3, torch.float32), conv.weight,
                                                 conv.bias, False))
    torch.library.opcheck(kernels._pool_relu,
                          (torch.randn(2, 16, 4, 6, requires_grad=True),))


def test_other_shapes_and_dtypes_are_refused():
    with pytest.raises(ValueError, match="1->128 5x5 conv"):
        first_block(nn.Conv2d(1, 64, 5), images(2, torch.float32))
    with pytest.raises(ValueError, match="with a bias"):
        first_block(nn.Conv2d(1, 128, 5, bias=False), images(2, torch.float32))
    with pytest.raises(ValueError, match="float32 or float64"):
        first_block(nn.Conv2d(1, 128, 5).half(), images(2, torch.float32).half())
    with pytest.raises(ValueError, match="C a multiple of 16"):
        pool_relu(torch.randn(2, 12, 4, 4))
    with pytest.raises(ValueError, match="H, W even"):
        pool_relu(torch.randn(2, 16, 5, 4))


def test_the_build_is_cached_per_cpu_and_a_missing_compiler_is_a_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    try:
        kernels._load.cache_clear()
        folder = tmp_path / "initstudy" / "kernels"
        folder.mkdir(parents=True)
        # What killed builds leave (a finished or failed one removes its own): the next build
        # removes one older than a build may last, and leaves a younger one, maybe under way.
        stale, young = folder / ".kernels-0123.so.111", folder / ".kernels-4567.so.222"
        for partial in (stale, young):
            partial.write_text("half a library")
        os.utime(stale, (0, time.time() - kernels.BUILD_SECONDS - 60))
        assert kernels.kernel() is not None
        built = sorted(folder.iterdir())
        assert built[0] == young and len(built) == 2 and built[1].suffix == ".so"
        young.unlink()
        kernels._load.cache_clear()
        monkeypatch.setattr(kernels, "_cpu_flags", lambda: "flags: another cpu")
        assert kernels.kernel() is not None
        built = list(folder.iterdir())
        assert len(built) == 2 and all(b.suffix == ".so" for b in built)  # no partial left
        kernels._load.cache_clear()
        monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
        assert kernels.kernel() is None and "no C++ compiler" in kernels.why_not()
        with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
            first_block(nn.Conv2d(1, 128, 5), images(2, torch.float32))
    finally:
        kernels._load.cache_clear()


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 registers")
def test_the_vectors_are_as_wide_as_the_cpus_registers():
    # 512-bit vectors on a CPU with 256-bit registers made the kernels several times slower
    # than PyTorch's operators there (docs/performance.md): the width follows the CPU.
    flags = kernels._cpu_flags().split()
    assert kernels.vector_bits() == (512 if "avx512f" in flags else 256)
