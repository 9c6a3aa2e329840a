"""K models trained as one: parameters stacked, forward passes vectorised with torch.func."""

import copy

import torch
import torch.nn as nn

from .errors import ConfigError
from .model import dropout_shapes, init_layers, train_scores

CPU_CHUNK = 16  # images per chunk of the LeNet's first conv on a CPU (``LeNet.logits``): 6.4 MB
# of output, pooled while it is in cache (the sizes tried: docs/performance.md). GPUs run it whole.


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

    def __init__(self, net: nn.Module, chunk: int | None):
        super().__init__()
        self.net, self.chunk, self.feed = net, chunk, []

    def forward(self, x: torch.Tensor, masks: tuple = ()) -> torch.Tensor:
        self.feed[:] = list(masks)
        return train_scores(self.net, x, self.chunk)


class Pack:
    """K models of one architecture trained as one: their parameters stacked along a new first
    dimension (``torch.func.stack_module_state``) and their forward passes vectorised with
    ``vmap``. Each model keeps its own weights, data and dropout masks; gradients of a sum of
    per-model losses are each model's own. K = 1 is plain training (no vmap, channels-last).
    The models must all be on one device; on a CPU the LeNet's first conv runs in chunks of
    CPU_CHUNK. Models with batch norm cannot be packed (vmap cannot update a running
    statistic per model): ConfigError for K > 1."""

    def __init__(self, models: list[nn.Module], compile: bool = False):
        from torch.func import functional_call, stack_module_state, vmap

        self.size = len(models)
        if self.size > 1 and any(isinstance(m, nn.modules.batchnorm._NormBase)
                                 for m in models[0].modules()):
            raise ConfigError("models with batch norm cannot be trained as a pack (vmap cannot "
                              "update their running statistics per run): use --pack 1")
        dropouts = dropout_shapes(models[0])
        self.dropouts = [(p, shape) for _, p, shape in dropouts]
        self._weights = [f"net.{name}.weight" for name, _ in init_layers(models[0])]
        cpu = next(models[0].parameters()).device.type == "cpu"
        wrapped = [_Scores(m, CPU_CHUNK if cpu else None) for m in models]
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

        if self.size == 1:
            # One model needs no vmap, and can run its convolutions channels-last (NHWC),
            # which oneDNN and cuDNN run faster than NCHW: the same numbers, in another order.
            # Conv weights are laid out channels-last too (a leaf with those strides keeps
            # them, and so do its gradients and the optimizer's in-place updates).
            # (empty_like + copy_, since contiguous() keeps the strides of a one-channel
            # kernel, which count as both layouts, and then convs pick NCHW.)
            for name, t in self.params.items():
                if t.dim() == 5:
                    nhwc = torch.empty_like(t[0], memory_format=torch.channels_last)
                    self.params[name] = nhwc.copy_(t[0].detach()).unsqueeze(0).requires_grad_()
            one = lambda tree: {name: t[0] for name, t in tree.items()}
            nhwc = lambda x: x.contiguous(memory_format=torch.channels_last)
            self._train = lambda p, b, x, m: train_logits(
                one(p), one(b), nhwc(x[0]), tuple(mask[0] for mask in m)).unsqueeze(0)
            self._eval = lambda p, b, x: eval_logits(one(p), one(b), nhwc(x)).unsqueeze(0)
        else:
            self._train = vmap(train_logits)
            self._eval = vmap(eval_logits, in_dims=(0, 0, None))
        if compile:
            self._train = torch.compile(self._train)
            self._eval = torch.compile(self._eval)

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
        ``draw_masks`` (one K x B x shape tensor per dropout layer)."""
        return self._train(self.params, self.buffers, x, tuple(masks))

    def eval_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Eval-mode scores, K x B x 10, of the same inputs B x 1 x 28 x 28 for every model."""
        return self._eval(self.params, self.buffers, x)

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
