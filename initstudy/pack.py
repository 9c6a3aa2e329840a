"""K LeNets trained as one: parameters stacked, forward passes vectorised with torch.func."""

import copy

import torch
import torch.nn as nn

from .model import LeNet


CPU_CHUNK = 16  # images per chunk of the first conv on a CPU (``LeNet.logits``): 6.4 MB of
# output, pooled while it is in cache (the sizes tried: docs/performance.md). GPUs run it whole.


class _Logits(nn.Module):
    """A module whose forward is ``LeNet.logits``, for ``torch.func.functional_call``."""

    def __init__(self, net: LeNet, chunk: int | None):
        super().__init__()
        self.net, self.chunk = net, chunk

    def forward(self, x: torch.Tensor, dropout_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.net.logits(x, dropout_mask, self.chunk)


class LeNetPack:
    """K LeNets trained as one: their parameters stacked along a new first dimension
    (``torch.func.stack_module_state``) and their forward passes vectorised with ``vmap``.
    Each model keeps its own weights, data and dropout masks; gradients of a sum of per-model
    losses are each model's own. K = 1 is plain training (no vmap, channels-last). The
    models must all be on one device; on a CPU the first conv runs in chunks of CPU_CHUNK."""

    def __init__(self, models: list[LeNet], compile: bool = False):
        from torch.func import functional_call, stack_module_state, vmap

        cpu = models[0].classifer[1].weight.device.type == "cpu"
        wrapped = [_Logits(m, CPU_CHUNK if cpu else None) for m in models]
        self.params, self.buffers = stack_module_state(wrapped)
        train_base = copy.deepcopy(wrapped[0]).to("meta")
        eval_base = copy.deepcopy(train_base).eval()
        self.size = len(models)
        self.hidden = models[0].classifer[1].out_features  # units under the Dropout
        self.dropout_p = models[0].classifer[3].p

        def train_logits(params, buffers, x, mask):
            return functional_call(train_base, (params, buffers), (x, mask))

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
            self._train = lambda p, b, x, m: train_logits(one(p), one(b), nhwc(x[0]),
                                                          m[0]).unsqueeze(0)
            self._eval = lambda p, b, x: eval_logits(one(p), one(b), nhwc(x)).unsqueeze(0)
        else:
            self._train = vmap(train_logits)
            self._eval = vmap(eval_logits, in_dims=(0, 0, None))
        if compile:
            self._train = torch.compile(self._train)
            self._eval = torch.compile(self._eval)

    def parameters(self) -> list[torch.Tensor]:
        return list(self.params.values())

    def logits(self, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Training logits, K x B x 10, of inputs K x B x 1 x 28 x 28 with dropout masks
        K x B x hidden."""
        return self._train(self.params, self.buffers, x, masks)

    def eval_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Eval-mode logits, K x B x 10, of the same inputs B x 1 x 28 x 28 for every model."""
        return self._eval(self.params, self.buffers, x)

    def weight_grad_norms(self) -> torch.Tensor:
        """K x layers: the norm of each model's weight gradient, layer by layer."""
        grads = [p.grad for name, p in self.params.items() if name.endswith(".weight")]
        return torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads], 1)

    def model(self, k: int) -> LeNet:
        """A LeNet holding a copy of model ``k``'s current weights (on their device)."""
        net = LeNet()
        net.load_state_dict({name.removeprefix("net."): p[k].detach()
                             for name, p in {**self.params, **self.buffers}.items()})
        return net.to(next(iter(self.params.values())).device)
