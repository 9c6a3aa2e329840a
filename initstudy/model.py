"""The models a run can train, and the seam every model meets.

A model spec names one, as schemes are named (``initstudy models`` lists them):

- ``lenet``: the seed document's LeNet, verbatim (its printout and state_dict match), the
  default;
- ``mlp:depth=D,width=W,act=relu|tanh``: D Linear layers, no normalisation, no dropout;
- ``cnn:depth=D,channels=C,act=relu|tanh``: D 3x3 convolutions (padding 1), no
  normalisation, then one Linear classifier;
- ``module.path:Class`` or ``path/to/file.py:Class`` (``...:Class:key=value,...`` for its
  arguments): the user's own, built with ``Class(**params)``.

The seam: a model maps N x 1 x 28 x 28 images (``INPUT_SHAPE``) to N x 10 class scores (its
forward's output; the LeNet's pre-softmax scores, ``reference_scores``); the layers an init
acts on are its Conv2d and Linear modules (``init_layers``); its dropout is its ``nn.Dropout``
modules, whose masks a trainer may draw itself (``dropout_shapes``). Everything else
(diagnostics, LSUV, the trainer) sees a model through forward hooks and these functions only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
import torch.nn as nn

from .errors import ModelError
from .kernels import first_block, pool_relu
from .specs import (Param, choice, is_user_spec, literal_params, load_attr, parse_params,
                    positive_integer)

INPUT_SHAPE = (1, 28, 28)  # channels, height, width: what every model takes
CLASSES = 10
CPU_PATHS = ("fused", "conv", "matmul")  # how a CPU runs the LeNet: ``LeNet.logits``
CPU_CHUNK = 16  # images per chunk of the LeNet's first conv on the operator paths: 6.4 MB of
# output, pooled while it is in cache (the sizes tried: docs/performance.md)


class LeNet(nn.Module):
    """The document's LeNet for 1x28x28 inputs; ``forward`` returns class probabilities.

    The attribute is spelled ``classifer`` as in the document, so that weights saved by the
    document's code load here. The zero padding is created in ``forward`` (not registered as a
    submodule), exactly as the document does, so ``print(LeNet())`` matches its printout.
    """

    def __init__(self):
        super(LeNet, self).__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 128, 5, 1),
            nn.ReLU(True),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(128, 128, 5, 1),
            nn.ReLU(True),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(128, 128, 5, 1),
            nn.ReLU(True),
        )
        self.classifer = nn.Sequential(
            nn.Flatten(),
            nn.Linear(128, 84),
            nn.ReLU(True),
            nn.Dropout(0.1),
            nn.Linear(84, 10),
            nn.Softmax(-1)
        )

    def forward(self, x):
        return self.classifer[-1](self.document_logits(x))

    def document_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The document's forward, layer by layer in its order, less the final Softmax: for
        looking inside (every ReLU sees its conv's full output). Training uses ``logits``."""
        return self.classifer[:-1](self.features(nn.ZeroPad2d((2, 2, 2, 2))(x)))

    def logits(self, x: torch.Tensor, cpu_path: str | None = None,
               chunk: int = CPU_CHUNK) -> torch.Tensor:
        """Everything but the final Softmax: the pre-softmax scores a stable loss needs.

        The document's layers, with each max-pool applied before the ReLU in front of it: a
        max commutes with a non-decreasing function, so the values and the gradients are the
        same numbers (both pass through each window's arg-max, and are zero where its maximum
        is <= 0), while the ReLU touches a quarter of them.

        ``cpu_path`` (one of CPU_PATHS; None on a GPU) is how a CPU runs the first block
        (conv, pool, ReLU), whose 0.4 MB of conv output per image is what a CPU step waits
        on: ``fused``, one kernel (``kernels.first_block``), and the second pool and ReLU as
        another (``kernels.pool_relu``); ``conv``, oneDNN's convolution on
        ``chunk`` images at a time, pooled while still in cache; ``matmul``, the same chunks
        with the conv as the thin matrix product it is (``_first_conv_as_matmul``), for CPUs
        whose oneDNN runs a one-channel convolution far below their speed. On every CPU path
        the last conv, whose 5x5 input gives one output position, runs as the product it is
        (``_last_conv_as_matmul``). The same values up to float rounding: those products sum
        in another order, as do the weight gradients over the batch.
        """
        if cpu_path not in (None, *CPU_PATHS):
            raise ValueError(f"unknown CPU path '{cpu_path}'; known: {', '.join(CPU_PATHS)}")
        x = nn.ZeroPad2d((2, 2, 2, 2))(x)
        conv1, relu1, pool1, conv2, relu2, pool2, conv3, relu3 = self.features
        if cpu_path == "fused":
            x = pool_relu(conv2(first_block(conv1, x)))
        else:
            if cpu_path is None:
                x = relu1(pool1(conv1(x)))
            else:
                first = ((lambda part: _first_conv_as_matmul(conv1, part))
                         if cpu_path == "matmul" else conv1)
                x = torch.cat([relu1(pool1(first(part))) for part in x.split(chunk)])
            x = relu2(pool2(conv2(x)))
        x = relu3(_last_conv_as_matmul(conv3, x) if cpu_path else conv3(x))
        return self.classifer[:-1](x)


def _first_conv_as_matmul(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for a one-channel, stride-1, unpadded convolution, as the matrix product of
    x's 5x5 patches (im2col, ``F.unfold``) with the weights: N x C x H x W, laid out
    channels-last (the product's rows are the output positions), as the next layers want."""
    n, (kh, kw) = len(x), conv.kernel_size
    height, width = x.shape[-2] - kh + 1, x.shape[-1] - kw + 1
    patches = nn.functional.unfold(x, conv.kernel_size).transpose(1, 2)  # N x HW x 25
    y = torch.addmm(conv.bias, patches.reshape(-1, kh * kw), conv.weight.reshape(-1, kh * kw).t())
    return y.view(n, height, width, -1).permute(0, 3, 1, 2)


def _last_conv_as_matmul(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for an unpadded convolution whose kernel covers all of x (one output
    position): a Linear layer on x's values, N x C x 1 x 1. Input and weights are flattened
    in channels-last order, which is a view of both where they are laid out so."""
    flat = x.permute(0, 2, 3, 1).reshape(len(x), -1)
    weight = conv.weight.permute(0, 2, 3, 1).reshape(len(conv.weight), -1)
    return nn.functional.linear(flat, weight, conv.bias).view(len(x), -1, 1, 1)


ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


class MLP(nn.Module):
    """``depth`` Linear layers, ``width`` units wide, the activation after each but the last;
    no normalisation, no dropout: the plain deep nets of Glorot & Bengio and He et al."""

    def __init__(self, depth: int, width: int, act: str):  # defaults: MODELS["mlp"]
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        fan_in = INPUT_SHAPE[0] * INPUT_SHAPE[1] * INPUT_SHAPE[2]
        for _ in range(depth - 1):
            layers += [nn.Linear(fan_in, width), ACTIVATIONS[act]()]
            fan_in = width
        layers.append(nn.Linear(fan_in, CLASSES))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class PlainCNN(nn.Module):
    """``depth`` 3x3 convolutions of ``channels`` channels (padding 1, so every layer sees
    28x28), the activation after each, then one Linear classifier; no normalisation, no
    pooling, no dropout."""

    def __init__(self, depth: int, channels: int, act: str):  # defaults: MODELS["cnn"]
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = INPUT_SHAPE[0]
        for _ in range(depth):
            layers += [nn.Conv2d(in_channels, channels, 3, padding=1), ACTIVATIONS[act]()]
            in_channels = channels
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(channels * INPUT_SHAPE[1] * INPUT_SHAPE[2], CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@dataclass(frozen=True)
class ModelKind:
    """A built-in model: its class, what it is (for ``initstudy models``), its parameters."""

    name: str
    build: Callable[..., nn.Module]
    describe: str
    params: dict[str, Param]


_ACT = Param("relu", choice(*ACTIVATIONS), " or ".join(ACTIVATIONS))
MODELS = {kind.name: kind for kind in (
    ModelKind("lenet", LeNet, "the seed document's LeNet: 3 convs 5x5 of 128 channels, "
              "2 Linear, dropout 0.1, softmax output (verbatim)", {}),
    ModelKind("mlp", MLP, "plain MLP: depth Linear layers of width units, act between them",
              {"depth": Param(3, positive_integer, "a positive integer (Linear layers)"),
               "width": Param(256, positive_integer, "a positive integer (units)"),
               "act": _ACT}),
    ModelKind("cnn", PlainCNN, "plain CNN: depth 3x3 convs of channels channels, act after "
              "each, then a Linear classifier",
              {"depth": Param(5, positive_integer, "a positive integer (conv layers)"),
               "channels": Param(16, positive_integer, "a positive integer"),
               "act": _ACT}),
)}


@dataclass(frozen=True)
class ResolvedModel:
    """A parsed model spec: its name, every parameter (defaults filled in), its builder, and
    (from ``check_model``) the class of the model it built."""

    spec: str
    name: str
    params: dict[str, Any]
    make: Callable[[], Any]
    built: type | None = None


def resolve_model(spec: str) -> ResolvedModel:
    """Parse a model spec (see the module docstring); ModelError lists what is accepted."""
    spec = spec.strip()
    name, _, rest = spec.partition(":")
    if name in MODELS:
        kind = MODELS[name]
        params = parse_params("model", name, kind.params, rest, ModelError)
        return ResolvedModel(spec, name, params, lambda: kind.build(**params))
    unknown = (f"unknown model '{name}'; known models: {', '.join(MODELS)}; or "
               f"module.path:Class / file.py:Class[:key=value,...] for your own")
    attr, _, args = rest.partition(":")
    if not is_user_spec(attr):
        raise ModelError(unknown)
    cls = load_attr(name, attr, unknown, ModelError)
    if not callable(cls):
        raise ModelError(f"{name}:{attr} is not a class")
    params = literal_params(args, f"model {name}:{attr}", ModelError)
    return ResolvedModel(spec, f"{name}:{attr}", params, lambda: cls(**params))


def build_model(spec: str) -> nn.Module:
    """A fresh model from its spec (default init), checked against the seam: an nn.Module
    mapping N x 1 x 28 x 28 images to N x 10 scores, with a Conv2d or Linear layer and no
    dropout but nn.Dropout; anything else is one ModelError saying what came out."""
    resolved = resolve_model(spec)
    try:
        model = resolved.make()
    except Exception as exc:
        raise ModelError(f"cannot build model '{spec}': {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"model '{spec}' built a {type(model).__name__}, not a torch.nn.Module")
    if not init_layers(model):
        raise ModelError(f"model '{spec}' has no Conv2d or Linear layer for a scheme to act on")
    other = [n for n, m in model.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd)
             and type(m) is not nn.Dropout]
    if other:
        raise ModelError(f"model '{spec}': only nn.Dropout is supported (each run draws its "
                         f"own element-wise masks); {other[0]} is a "
                         f"{type(model.get_submodule(other[0])).__name__}")
    x = torch.zeros(2, *INPUT_SHAPE)
    was_training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(x)
    except Exception as exc:
        raise ModelError(f"model '{spec}' fails on a batch of 2 x {' x '.join(map(str, INPUT_SHAPE))} "
                         f"images: {type(exc).__name__}: {exc}") from exc
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, CLASSES):
        got = (f"a tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor)
               else f"a {type(out).__name__}")
        raise ModelError(f"model '{spec}' must map N x {' x '.join(map(str, INPUT_SHAPE))} "
                         f"images to N x {CLASSES} class scores; for N = 2 it returned {got}")
    return model


def check_model(spec: str) -> ResolvedModel:
    """The parsed spec, once a model built from it has passed ``build_model``'s checks; the
    build draws from a forked RNG, so the caller's random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        built = type(build_model(spec))
    return replace(resolve_model(spec), built=built)


def reference_scores(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's own forward as class scores: the LeNet's layers in the document's order
    less its final Softmax (every ReLU sees its conv's whole output); any other model's
    ``forward``. For looking inside: diagnostics and LSUV."""
    return model.document_logits(x) if isinstance(model, LeNet) else model(x)


def train_scores(model: nn.Module, x: torch.Tensor, cpu_path: str | None = None) -> torch.Tensor:
    """The class scores training uses: the LeNet's fast path (``LeNet.logits``, with a CPU's
    path where ``cpu_path`` is given), any other model's ``forward``."""
    if isinstance(model, LeNet):
        return model.logits(x, cpu_path)
    return model(x)


def init_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs an init scheme acts on: every Conv2d and Linear, in the order
    the model registers them (``forward_layers`` gives the order a forward pass meets them)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def calls(model: nn.Module, run: Callable[[], Any],
          keep: Callable[[nn.Module], bool] = lambda m: True) -> list[tuple[str, nn.Module, Any]]:
    """(name, module, output) of every leaf module that ``keep`` accepts, in the order ``run()``
    calls them: the seam's view of a forward pass, through forward hooks."""
    seen: list[tuple[str, nn.Module, Any]] = []
    hooks = [m.register_forward_hook(lambda mod, i, out, name=n: seen.append((name, mod, out)))
             for n, m in model.named_modules() if not list(m.children()) and keep(m)]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def forward_layers(model: nn.Module, x: torch.Tensor) -> list[tuple[str, nn.Module]]:
    """The init layers in the order a forward pass on ``x`` first calls them (LSUV's order)."""
    layers = dict(init_layers(model))
    with torch.no_grad():
        met = calls(model, lambda: reference_scores(model, x), lambda m: m in layers.values())
    return list(dict.fromkeys((name, module) for name, module, _ in met))


def dropout_shapes(model: nn.Module) -> list[tuple[str, float, tuple[int, ...]]]:
    """(name, p, shape of one image's mask) of each nn.Dropout, in the order the training
    forward calls them: the masks a trainer draws for a batch (the LeNet: one, 84 units)."""
    was_training = model.training
    weight = next(model.parameters())  # the probe goes where the model is, in its dtype
    image = torch.zeros(1, *INPUT_SHAPE, device=weight.device, dtype=weight.dtype)
    try:
        with torch.no_grad():
            met = calls(model.eval(), lambda: train_scores(model, image),
                        lambda m: isinstance(m, nn.Dropout))
    finally:
        model.train(was_training)
    names = [name for name, _, _ in met]
    again = [name for i, name in enumerate(names) if name in names[:i]]
    if again:
        raise ModelError(f"dropout {again[0]} is called more than once per forward pass; "
                         f"each call needs its own mask")
    return [(name, module.p, tuple(out.shape[1:])) for name, module, out in met]
