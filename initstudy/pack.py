"""K models trained as one: parameters stacked, forward passes vectorised with torch.func or,
for the LeNet, written out as batched matrix products."""

import copy
from typing import Callable

import torch
import torch.nn as nn

from .config import ENGINES
from .errors import ConfigError
from . import kernels
from .model import LeNet, dropout_shapes, init_layers, train_scores

def cpu_path(engine: str) -> str:
    """How this CPU runs the LeNet (``LeNet.logits``, one of CPU_PATHS) in a pack of this
    engine (``resolve_engine``'s): ``fused``, the LeNet's kernels, in the loop engine
    wherever it builds (vmap cannot take it); else PyTorch's operators, ``conv`` where
    PyTorch runs AVX-512 code, whose oneDNN convolution is the faster there, ``matmul``
    elsewhere (all measured: docs/performance.md). A fixed rule, not a timing, so that one
    machine always computes a seed's run the same way."""
    if engine == "loop" and kernels.kernel() is not None:
        return "fused"
    return "conv" if torch.backends.cpu.get_cpu_capability() == "AVX512" else "matmul"


def lenet_path(model_class: type, engine: str, cpu: bool) -> str | None:
    """How a pack of ``model_class`` runs on a CPU (``cpu``) in ``engine``: ``cpu_path(engine)``
    for the LeNet, or a subclass, which trains through ``LeNet.logits`` (``train_scores``);
    None on a GPU, in the bmm engine (which writes the layers out itself), and for any other
    model, which never asks for (and builds) the kernels."""
    lenet = issubclass(model_class, LeNet) and engine != "bmm"
    return cpu_path(engine) if cpu and lenet else None


def bmm_takes(model_class: type) -> bool:
    """Whether the bmm engine can train ``model_class``: the LeNet, or a subclass that keeps
    its scores (``LeNet.logits``), whose layers ``lenet_bmm`` writes out."""
    return issubclass(model_class, LeNet) and model_class.logits is LeNet.logits


class _MaskFeed(nn.Module):
    """Stands in for an nn.Dropout inside a pack: multiplies by the next of the masks the
    trainer drew for this forward pass, so each run's dropout comes from its own generator."""

    def __init__(self, feed: list):
        super().__init__()
        self.feed = feed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.feed.pop(0)


class _Scores(nn.Module):
    """A module whose forward is ``train_scores`` of the model, for ``functional_call``; in
    training the model's nn.Dropout layers multiply by the masks given to forward."""

    def __init__(self, net: nn.Module, cpu_path: str | None):
        super().__init__()
        self.net, self.feed, self.cpu_path = net, [], cpu_path

    def forward(self, x: torch.Tensor, masks: tuple = ()) -> torch.Tensor:
        self.feed[:] = list(masks)
        return train_scores(self.net, x, self.cpu_path)


class Pack:
    """K models of one architecture trained as one: their parameters stacked along a new first
    dimension (``torch.func.stack_module_state``), each model keeping its own weights, data and
    dropout masks, and gradients that are each model's own. Two engines (``ENGINES``):

    - ``loop``: each model's forward and backward in turn, on its slice of the stacked
      parameters, with its convolutions channels-last (NHWC), which oneDNN and cuDNN run
      faster than NCHW: the same arithmetic as training it alone, and one model's
      activations in memory at a time. A CPU's engine (one LeNet already keeps a CPU busy),
      and K = 1's.
    - ``vmap``: one forward and backward for all K (``torch.func.vmap``; convolutions become
      grouped ones): a GPU's engine, where one LeNet leaves the chip idle; K models'
      activations at once. Models with batch norm cannot take it (vmap cannot update a
      running statistic per model): ConfigError, naming the loop engine.
    - ``bmm``: the LeNet's layers written out for all K at once as batched matrix products
      (``lenet_bmm``: each convolution one ``baddbmm`` of the K runs' patches with their
      weights), for GPUs, whose grouped convolutions run far below their dense speed; any
      other model trains with ``vmap`` instead (``resolve_engine``).

    ``auto`` is ``loop`` on a CPU, else ``vmap``. The models must all be on one device; on a
    CPU the LeNet takes the path ``lenet_path`` names (``LeNet.logits``), and
    ``self.cpu_path`` is None for any other model."""

    def __init__(self, models: list[nn.Module], compile: bool = False, engine: str = "auto"):
        from torch.func import functional_call, stack_module_state, vmap

        self.size = len(models)
        cpu = next(models[0].parameters()).device.type == "cpu"
        self.engine = resolve_engine(engine, cpu, self.size, type(models[0]))
        if self.engine == "vmap" and any(isinstance(m, nn.modules.batchnorm._NormBase)
                                         for m in models[0].modules()):
            raise ConfigError("models with batch norm cannot be trained as a vmap pack (vmap "
                              "cannot update their running statistics per run): use "
                              "--engine loop or --pack 1")
        dropouts = dropout_shapes(models[0])
        self.dropouts = [(p, shape) for _, p, shape in dropouts]
        self._weights = [f"net.{name}.weight" for name, _ in init_layers(models[0])]
        self.cpu_path = lenet_path(type(models[0]), self.engine, cpu)
        wrapped = [_Scores(m, self.cpu_path) for m in models]
        self.params, self.buffers = stack_module_state(wrapped)
        self._template = copy.deepcopy(models[0]).to("meta")
        train_base = copy.deepcopy(wrapped[0]).to("meta")
        for name, _, _ in dropouts:
            train_base.net.set_submodule(name, _MaskFeed(train_base.feed))
        eval_base = copy.deepcopy(wrapped[0]).to("meta").eval()

        def train_logits(params, buffers, x, masks):
            return functional_call(train_base, (params, buffers), (x, masks))

        def eval_logits(params, buffers, x):
            return functional_call(eval_base, (params, buffers), (x,))

        if self.engine == "loop":
            # Each model's conv weights channels-last (a slice with those strides keeps them,
            # and its gradient and the optimizer's in-place updates do too), and its inputs.
            self.params = {name: _channels_last_slices(t) if t.dim() == 5 else t
                           for name, t in self.params.items()}
            self._train, self._eval = train_logits, eval_logits
        elif self.engine == "bmm":
            self._train = lambda params, buffers, x, masks: lenet_bmm(params, x, masks)
            self._eval = lambda params, buffers, x: lenet_bmm(
                params, x.expand(self.size, *x.shape), ())
        else:
            self._train = vmap(train_logits)
            self._eval = vmap(eval_logits, in_dims=(0, 0, None))
        if compile:
            self._train = torch.compile(self._train)
            self._eval = torch.compile(self._eval)

    def _run(self, k: int) -> tuple[dict, dict]:
        """Model k's parameters and buffers: views of its slices of the stacked ones."""
        return ({name: t[k] for name, t in self.params.items()},
                {name: t[k] for name, t in self.buffers.items()})

    def parameters(self) -> list[torch.Tensor]:
        return list(self.params.values())

    def draw_masks(self, batch: int, generators: list[torch.Generator],
                   device: torch.device) -> tuple[torch.Tensor, ...]:
        """Inverted-dropout masks for one batch, K x batch x shape per dropout layer, each run's
        drawn from its own generator (scaled by 1/(1-p), as nn.Dropout scales)."""
        return tuple(torch.stack([torch.rand(batch, *shape, generator=g, device=device)
                                  for g in generators]).ge_(p).div_(1 - p)
                     for p, shape in self.dropouts)

    def logits(self, x: torch.Tensor, masks: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
        """Training scores, K x B x 10, of inputs K x B x 1 x 28 x 28 with the dropout masks of
        ``draw_masks`` (one K x B x shape tensor per dropout layer); differentiable in the
        stacked parameters."""
        if self.engine != "loop":
            return self._train(self.params, self.buffers, x, tuple(masks))
        return torch.stack([self._train(*self._run(k), _nhwc(x[k]),
                                        tuple(mask[k] for mask in masks))
                            for k in range(self.size)])

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, masks: tuple[torch.Tensor, ...],
                         objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """One training step's forward and backward: each model's loss ``objective(scores,
        labels)`` on its batch (x: K x B x 1 x 28 x 28, y: K x B), and each parameter's
        ``.grad`` set to every model's gradient of its own loss (replacing any there; None
        for a parameter no model uses). Returns the K losses and the K x B x 10 scores,
        detached. The loop engine holds one model's activations at a time."""
        if self.engine != "loop":
            logits = self.logits(x, masks)
            losses = torch.func.vmap(objective)(_at_least_fp32(logits), y)
            losses.sum().backward()  # each run's gradient is its own loss's
            return losses.detach(), logits.detach()
        names = list(self.params)
        grads: dict[str, list] = {name: [] for name in names}  # per run; None: not used
        losses, scores = [], []
        for k in range(self.size):
            params, buffers = self._run(k)
            logits = self._train(params, buffers, _nhwc(x[k]), tuple(m[k] for m in masks))
            loss = objective(_at_least_fp32(logits), y[k])
            for name, grad in zip(names, torch.autograd.grad(
                    loss, [params[n] for n in names], allow_unused=True)):
                grads[name].append(grad)
            losses.append(loss.detach())
            scores.append(logits.detach())
        for name, t in self.params.items():
            t.grad = _stacked(grads[name], t)
        return torch.stack(losses), torch.stack(scores)

    def eval_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Eval-mode scores, K x B x 10, of the same inputs B x 1 x 28 x 28 for every model."""
        if self.engine != "loop":
            return self._eval(self.params, self.buffers, x)
        x = _nhwc(x)
        return torch.stack([self._eval(*self._run(k), x) for k in range(self.size)])

    def weight_grad_norms(self) -> torch.Tensor:
        """K x layers: the norm of each model's weight gradient, layer by layer."""
        grads = [self.params[name].grad for name in self._weights]  # None: a layer not used
        return torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) if g is not None
                            else torch.zeros(self.size, device=self.params[name].device)
                            for name, g in zip(self._weights, grads)], 1)

    def model(self, k: int) -> nn.Module:
        """A model holding a copy of model ``k``'s current weights (on their device)."""
        net = copy.deepcopy(self._template)
        net.load_state_dict({name.removeprefix("net."): p[k].detach().clone()
                             for name, p in {**self.params, **self.buffers}.items()}, assign=True)
        return net


def _stacked(grads: list[torch.Tensor | None], like: torch.Tensor) -> torch.Tensor | None:
    """The runs' gradients of one stacked parameter as one tensor laid out as ``like`` (zeros
    for a run that does not use it), None where no run does; one run's is its own (no copy)."""
    if all(g is None for g in grads):
        return None
    if len(grads) == 1:
        return grads[0].unsqueeze(0)
    stacked = torch.empty_like(like)
    for slot, grad in zip(stacked, grads):
        if grad is None:
            slot.zero_()
        else:
            slot.copy_(grad)
    return stacked


def resolve_engine(engine: str, cpu: bool, size: int, model_class: type) -> str:
    """The engine a pack of ``size`` models of ``model_class`` trains with: ``engine`` (one of
    ENGINES), ``auto`` being loop on a CPU and vmap elsewhere, bmm being vmap for a model it
    cannot take (``bmm_takes``); one model is always a loop of one."""
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine '{engine}'; choose from {', '.join(ENGINES)}")
    if size == 1 or engine == "loop" or (engine == "auto" and cpu):
        return "loop"
    return "bmm" if engine == "bmm" and bmm_takes(model_class) else "vmap"


def lenet_bmm(params: dict[str, torch.Tensor], x: torch.Tensor,
              masks: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """K LeNets' training scores (``LeNet.logits``, pool before ReLU) in one pass: the stacked
    parameters of ``Pack.params`` (K x ... each), inputs K x B x 1 x 28 x 28, the dropout masks
    of ``Pack.draw_masks`` (none: eval mode) -> K x B x 10. Activations stay channels-last
    (K x B x H x W x C) so that each convolution is one ``baddbmm`` over the K runs and the
    next one's patches are a view of its output."""
    def p(name: str) -> torch.Tensor:
        return params[f"net.{name}"]

    k, b = x.shape[:2]
    h = nn.functional.pad(x, (2, 2, 2, 2))
    h = h.view(k, b, *h.shape[-2:], 1)  # one channel: NCHW is NHWC
    for conv in ("features.0", "features.3"):
        h = _pool_nhwc(_conv_bmm(h, p(f"{conv}.weight"), p(f"{conv}.bias"))).relu()
    h = _conv_bmm(h, p("features.6.weight"), p("features.6.bias")).view(k, b, -1).relu()
    h = torch.baddbmm(p("classifer.1.bias").unsqueeze(1), h,
                      p("classifer.1.weight").transpose(1, 2)).relu()
    for mask in masks:
        h = h * mask
    return torch.baddbmm(p("classifer.4.bias").unsqueeze(1), h,
                         p("classifer.4.weight").transpose(1, 2))


def _conv_bmm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """K unpadded stride-1 convolutions, one per run: x K x B x H x W x C, weight K x O x C x
    kh x kw, bias K x O -> K x B x H' x W' x O, as one batched product of each run's patches
    (im2col: ``Tensor.unfold`` views, laid out by the reshape) with its weights."""
    k, b, _, _, c = x.shape
    out, _, kh, kw = weight.shape[1:]
    patches = x.unfold(2, kh, 1).unfold(3, kw, 1)  # K x B x H' x W' x C x kh x kw
    height, width = patches.shape[2:4]
    y = torch.baddbmm(bias.unsqueeze(1), patches.reshape(k, b * height * width, c * kh * kw),
                      weight.reshape(k, out, c * kh * kw).transpose(1, 2))
    return y.view(k, b, height, width, out)


def _pool_nhwc(x: torch.Tensor) -> torch.Tensor:
    """2x2 max-pooling of K x B x H x W x C, by ``max_pool2d`` on its channels-last view, so
    that a tie's gradient goes where a single model's goes (one arg-max, not shared)."""
    k, b, height, width, c = x.shape
    y = nn.functional.max_pool2d(x.view(k * b, height, width, c).permute(0, 3, 1, 2), 2)
    return y.permute(0, 2, 3, 1).reshape(k, b, height // 2, width // 2, c)


def _channels_last_slices(t: torch.Tensor) -> torch.Tensor:
    """A leaf copy of stacked conv weights K x O x I x H x W whose every slice [k] is laid out
    channels-last. (empty + permute, since contiguous() keeps the strides of a one-channel
    kernel, which count as both layouts, and then convs pick NCHW.)"""
    k, o, i, h, w = t.shape
    out = torch.empty(k, o, h, w, i, dtype=t.dtype, device=t.device).permute(0, 1, 4, 2, 3)
    return out.copy_(t.detach()).requires_grad_(t.requires_grad)


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """Scores for the loss: bf16 ones (autocast) in fp32, fp32 and fp64 as they are."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))
