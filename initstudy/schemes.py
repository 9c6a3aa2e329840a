"""Initialisation schemes: a registry of small per-layer functions, and ``apply_scheme``.

A scheme is named by a spec string, as on the command line:

- ``NAME`` or ``NAME:key=value,...`` for a built-in (``normal:std=0.01``);
- ``module.path:function`` or ``path/to/file.py:function`` for the user's own function,
  applied with ``model.apply`` exactly as the seed document applies ``init_weights``.

Every built-in acts on each ``Conv2d`` and ``Linear`` layer. Weight schemes take a ``bias``
parameter, the bias policy: ``zeros`` (default), ``keep`` (PyTorch's default bias init) or a
number (a constant). Functions that cannot apply to a layer's weight follow a fixed rule:

- ``eye_`` is defined for 2-D tensors only: on a conv weight ``eye`` uses ``dirac_``, the
  identity of a convolution; ``dirac_`` is defined for 3-5-D tensors only: on a linear weight
  ``dirac`` uses ``eye_``. Both therefore mean "pass the input through where shapes allow".
- ``sparse_`` is defined for 2-D tensors only: on a conv weight it acts on the
  (out, in*kh*kw) matrix view, the same flattening ``orthogonal_`` uses.

Randomness: ``apply_scheme`` runs inside ``torch.random.fork_rng`` seeded with the init seed,
so every draw (PyTorch's default init, the built-ins, a user's function) comes from a
generator seeded by that seed alone, and the caller's RNG state is left as it was.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from .errors import SchemeError
from .model import forward_layers, reference_scores
from .specs import (Param, choice, integer, is_user_spec, load_attr, number, parse_params,
                    positive_integer)


def _bias_policy(text: str) -> float | str:
    if text in ("zeros", "keep"):
        return text
    return number(text)


def _float(default: float | None) -> Param:
    return Param(default, number, "a number")


BIAS = Param("zeros", _bias_policy, "zeros, keep or a number")
POLICY = "policy (bias=zeros)"
FAN_MODE = Param("fan_in", choice("fan_in", "fan_out"), "fan_in or fan_out")
NONLINEARITIES = ("linear", "conv2d", "sigmoid", "tanh", "relu", "leaky_relu", "selu")


@dataclass(frozen=True)
class Scheme:
    """A built-in scheme: ``init(layer, **params)`` re-initialises one Conv2d or Linear in place.

    ``conv``, ``linear`` and ``biases`` describe the effect for the ``initstudy schemes`` table.
    """

    name: str
    init: Callable[..., None]
    conv: str
    linear: str
    biases: str
    params: dict[str, Param] = field(default_factory=dict)
    # Data-dependent schemes: ``data_init(model, images, **params)`` runs after ``init``.
    data_init: Callable[..., None] | None = None


SCHEMES: dict[str, Scheme] = {}


def _register(name: str, init: Callable[..., None], conv: str, linear: str, biases: str,
              data_init: Callable[..., None] | None = None, **params: Param) -> None:
    SCHEMES[name] = Scheme(name, init, conv, linear, biases, params, data_init)


def _set_bias(layer: nn.Module, bias: float | str) -> None:
    """Apply a bias policy (see the module docstring) to one layer."""
    if layer.bias is not None and bias != "keep":
        nn.init.constant_(layer.bias, 0.0 if bias == "zeros" else bias)


def _weight_init(fill: Callable[..., Any]) -> Callable[..., None]:
    """A per-layer init that calls ``fill(weight, **params)`` and then applies the bias policy."""

    def init(layer: nn.Module, bias: float | str = "zeros", **params: Any) -> None:
        fill(layer.weight, **params)
        _set_bias(layer, bias)

    return init


def _identity(weight: torch.Tensor, groups: int = 1) -> None:
    """eye_ on a matrix, dirac_ on a conv kernel: the identity wherever shapes allow."""
    if weight.dim() == 2:
        nn.init.eye_(weight)
    else:
        nn.init.dirac_(weight, groups=groups)


def _sparse(weight: torch.Tensor, sparsity: float, std: float) -> None:
    nn.init.sparse_(weight.view(weight.shape[0], -1), sparsity=sparsity, std=std)


def init_weights(layer):
    """The seed document's per-layer-type rule, verbatim (applied with ``model.apply``)."""
    if type(layer) == nn.Conv2d:
        nn.init.normal_(layer.weight, mean=0, std=0.5)
    elif type(layer) == nn.Linear:
        nn.init.uniform_(layer.weight, a=-0.1, b=0.1)
        nn.init.constant_(layer.bias, 0.1)


def _untouched(layer: nn.Module) -> None:
    """PyTorch's default init: ``apply_scheme`` has already reset every layer with the seed."""


_KAIMING_DOC = "He {dist}: std = gain/sqrt(fan), gain from a, nonlinearity"

_register("default", _untouched, "PyTorch default: kaiming_uniform_(a=sqrt(5))",
          "PyTorch default: kaiming_uniform_(a=sqrt(5))", "PyTorch default: U(+-1/sqrt(fan_in))")
_register("custom", init_weights, "N(0, 0.5)", "U(-0.1, 0.1)",
          "linear 0.1; conv PyTorch default (the document's rule)")
_register("normal", _weight_init(nn.init.normal_), "N(mean, std)", "N(mean, std)", POLICY,
          mean=_float(0.0), std=_float(1.0), bias=BIAS)
_register("uniform", _weight_init(nn.init.uniform_), "U(a, b)", "U(a, b)", POLICY,
          a=_float(0.0), b=_float(1.0), bias=BIAS)
_register("trunc_normal", _weight_init(nn.init.trunc_normal_), "N(mean, std) cut to [a, b]",
          "N(mean, std) cut to [a, b]", POLICY,
          mean=_float(0.0), std=_float(1.0), a=_float(-2.0), b=_float(2.0), bias=BIAS)
_register("constant", _weight_init(nn.init.constant_), "val", "val", POLICY,
          val=_float(None), bias=BIAS)
_register("ones", _weight_init(nn.init.ones_), "1", "1", POLICY, bias=BIAS)
_register("zeros", _weight_init(nn.init.zeros_), "0", "0", POLICY, bias=BIAS)
_register("eye", _weight_init(_identity), "dirac_ (eye_ is 2-D only)", "eye_: identity matrix",
          POLICY, bias=BIAS)
_register("dirac", _weight_init(_identity), "dirac_: centre tap 1 for channel i -> i",
          "eye_ (dirac_ is 3-5-D only)", POLICY,
          groups=Param(1, integer, "a positive integer dividing out_channels"), bias=BIAS)
for _name, _fill in (("xavier", nn.init.xavier_uniform_),
                     ("xavier_uniform", nn.init.xavier_uniform_),
                     ("xavier_normal", nn.init.xavier_normal_)):
    _dist = "uniform" if _fill is nn.init.xavier_uniform_ else "normal"
    _doc = f"Glorot {_dist}: std = gain*sqrt(2/(fan_in+fan_out))"
    _register(_name, _weight_init(_fill), _doc, _doc, POLICY, gain=_float(1.0), bias=BIAS)
for _name, _fill, _nonlinearity in (("kaiming", nn.init.kaiming_normal_, "relu"),
                                    ("kaiming_uniform", nn.init.kaiming_uniform_, "leaky_relu"),
                                    ("kaiming_normal", nn.init.kaiming_normal_, "leaky_relu")):
    _doc = _KAIMING_DOC.format(dist="normal" if _fill is nn.init.kaiming_normal_ else "uniform")
    _register(_name, _weight_init(_fill), _doc, _doc, POLICY, a=_float(0.0), mode=FAN_MODE,
              nonlinearity=Param(_nonlinearity, choice(*NONLINEARITIES),
                                 " | ".join(NONLINEARITIES)),
              bias=BIAS)
_register("orthogonal", _weight_init(nn.init.orthogonal_),
          "orthogonal (out, in*kh*kw) matrix, times gain", "orthogonal matrix, times gain",
          POLICY, gain=_float(1.0), bias=BIAS)
_register("sparse", _weight_init(_sparse), "sparse_ on the (out, in*kh*kw) view",
          "sparse_: N(0, std), a fraction `sparsity` of each column zero", POLICY,
          sparsity=_float(0.1), std=_float(0.01), bias=BIAS)



def _output_var(model: nn.Module, layer: nn.Module, images: torch.Tensor) -> float:
    """Variance of ``layer``'s output on ``images`` (read in the hook, before an in-place
    activation; its first call, where a forward calls it more than once)."""
    seen = []
    hook = layer.register_forward_hook(lambda m, i, out: seen.append(out.var().item()))
    try:
        reference_scores(model, images)
    finally:
        hook.remove()
    return seen[0]


def _lsuv(model: nn.Module, images: torch.Tensor, tol: float, max_iter: int) -> None:
    """LSUV (Mishkin & Matas, 2015): layer by layer in forward order, divide the weights by the
    std of the layer's output on the batch until its variance is within ``tol`` of 1."""
    was_training = model.training
    model.eval()  # no dropout: the same batch gives the same variance
    for _, layer in forward_layers(model, images):
        for _ in range(max_iter):
            var = _output_var(model, layer, images)
            if abs(var - 1) < tol or not math.isfinite(var) or var == 0:
                break  # done, or nothing a rescaling can fix (a dead layer)
            layer.weight.div_(math.sqrt(var))
    model.train(was_training)


_register("lsuv", _weight_init(nn.init.orthogonal_),
          "orthogonal_, then scaled until the output variance on a data batch is 1",
          "same as conv", "zeros", data_init=_lsuv,
          tol=_float(0.1), max_iter=Param(10, positive_integer, "a positive integer"),
          batch=Param(256, positive_integer, "a positive integer (images)"))

# The six schemes a study compares unless told otherwise.
DEFAULT_SCHEMES = ("default", "normal", "xavier", "kaiming", "orthogonal", "custom")


@dataclass(frozen=True)
class ResolvedScheme:
    """A parsed spec: the name, every parameter with defaults filled in, and the function
    that ``model.apply`` calls on each module."""

    name: str
    params: dict[str, Any]
    apply_fn: Callable[[nn.Module], None]
    data_init: Callable[..., None] | None = None


def _known() -> str:
    return ", ".join(SCHEMES)


def resolve(spec: str) -> ResolvedScheme:
    """Parse a spec string (see the module docstring); raise SchemeError listing what is accepted."""
    spec = spec.strip()
    name, _, rest = spec.partition(":")
    if name in SCHEMES:
        scheme = SCHEMES[name]
        params = parse_params("scheme", name, scheme.params, rest, SchemeError)

        layer_params = {k: v for k, v in params.items()
                        if scheme.data_init is None or k == "bias"}

        def apply_fn(module: nn.Module) -> None:
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                scheme.init(module, **layer_params)

        return ResolvedScheme(name, params, apply_fn, scheme.data_init)
    unknown = (f"unknown scheme '{name}'; known schemes: {_known()}; "
               f"or module.path:function / file.py:function for your own")
    if is_user_spec(rest):
        fn = load_attr(name, rest, unknown, SchemeError)
        if not callable(fn):
            raise SchemeError(f"{name}:{rest} is not a function")
        return ResolvedScheme(spec, {}, fn)
    raise SchemeError(unknown)


@contextlib.contextmanager
def _no_autocast():
    """Autocast off on every device type that has it here: an init is always fp32 (under CPU
    autocast a cached bf16 copy of each weight would hide LSUV's in-place rescaling)."""
    with contextlib.ExitStack() as stack:
        for device in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
            stack.enter_context(torch.autocast(device, enabled=False))
        yield


def apply_scheme(model: nn.Module, spec: str, seed: int = 0,
                 data: Callable[[int], torch.Tensor] | None = None) -> nn.Module:
    """Initialise ``model`` in place by ``spec`` from the init seed, and return it.

    Every layer is first reset to PyTorch's default init, then the scheme is applied with
    ``model.apply``; all draws come from the generators of the model's devices, forked and
    seeded with ``seed`` (no other generator is touched, the caller's state is restored), so
    the same seed gives bit-identical weights and parameters a scheme leaves untouched are
    seeded too. The init runs in fp32 outside any autocast, so it never depends on the
    precision a run trains in. Data-dependent schemes (``lsuv``) call ``data(n)`` for ``n``
    normalised training images (drawn inside the seeded fork, so the batch is seeded too).
    """
    resolved = resolve(spec)
    if resolved.data_init is not None and data is None:
        raise SchemeError(f"scheme '{resolved.name}' needs training images: "
                          f"apply_scheme(model, '{spec}', data=lambda n: images[:n])")
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
    with torch.random.fork_rng(devices=cuda), torch.no_grad(), _no_autocast():
        # torch.manual_seed would also (re)seed every CUDA generator, or queue that before
        # CUDA starts: seed only the generators this init draws from.
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        for module in model.modules():
            if module is not model and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        try:
            model.apply(resolved.apply_fn)
            if resolved.data_init is not None:  # its `batch` is how many images to draw
                params = dict(resolved.params)
                resolved.data_init(model, data(params.pop("batch")), **params)
        except Exception as exc:
            raise SchemeError(f"scheme '{spec}' failed: {type(exc).__name__}: {exc}") from exc
    return model


SCHEME_COLUMNS = ("name", "conv weights", "linear weights", "biases", "parameters (defaults)")


def scheme_rows() -> list[tuple[str, ...]]:
    """The registry as table rows (``initstudy schemes``, docs/schemes.md): ``*`` marks the
    schemes a study compares by default."""
    return [(s.name + ("*" if s.name in DEFAULT_SCHEMES else ""), s.conv, s.linear, s.biases,
             ", ".join(f"{k}={'(required)' if p.default is None else p.default}"
                       for k, p in s.params.items())) for s in SCHEMES.values()]


def scheme_table_markdown() -> str:
    rows = ["| " + " | ".join(SCHEME_COLUMNS) + " |", "|" + "---|" * len(SCHEME_COLUMNS)]
    rows += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in scheme_rows()]
    return "\n".join(rows)
