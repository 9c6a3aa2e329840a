"""The optimizers a run names (``config.OPTIMIZERS``), and a pack's: its runs may differ in
the per-run scalars (``config.PER_RUN``), each run stepping with its own."""

from typing import Callable

import torch

from .config import PER_RUN, RunConfig

# The optimizers behind config.OPTIMIZERS (a test checks the names agree; config names them
# without importing torch).
OPTIMIZERS: dict[str, Callable[[list, RunConfig], torch.optim.Optimizer]] = {
    "sgd": lambda params, c: torch.optim.SGD(params, lr=c.lr, momentum=c.momentum,
                                             weight_decay=c.weight_decay),
    "adam": lambda params, c: torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay)}


def pack_optimizer(stacked: list[torch.Tensor], configs: list[RunConfig]):
    """The optimizer of a pack of runs ``configs`` (one ``optimizer`` for all) over its stacked
    parameters: torch's own where the runs share their per-run scalars; else, for SGD, one
    whole-pack update with each run's own (``StackedSGD``); for any other, one torch optimizer
    per run (``PerRunOptimizer``)."""
    first = configs[0]
    if len({tuple(getattr(c, f) for f in PER_RUN) for c in configs}) == 1:
        return OPTIMIZERS[first.optimizer](stacked, first)
    if first.optimizer == "sgd":
        return StackedSGD(stacked, *([getattr(c, f) for c in configs] for f in PER_RUN))
    return PerRunOptimizer(stacked, [lambda params, c=c: OPTIMIZERS[c.optimizer](params, c)
                                     for c in configs])


class _OverStacked:
    """An optimizer over a pack's stacked parameters, ``self.stacked``; as torch's, its
    ``zero_grad`` drops their gradients."""

    stacked: list[torch.Tensor]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.stacked:
            p.grad = None


class StackedSGD(_OverStacked):
    """``torch.optim.SGD`` (no dampening, no Nesterov) over stacked parameters K x ..., run k
    with its own ``lr[k]``, ``momentum[k]``, ``weight_decay[k]``: ``buf = momentum * buf +
    grad + weight_decay * p`` (``buf = grad + weight_decay * p`` at the first step; a run
    without momentum is the same update with ``momentum`` 0), then ``p -= lr * buf``. Torch's
    update with its terms summed in another order, so equal to rounding; three or four
    whole-pack operations per parameter, where K torch optimizers take K times their own
    (on a GPU, as many kernel launches). Gradients are read, never changed; a parameter
    without one is left as it is, as torch leaves it."""

    def __init__(self, stacked: list[torch.Tensor], lr: list[float], momentum: list[float],
                 weight_decay: list[float]):
        def per_run(values: list[float], p: torch.Tensor) -> torch.Tensor:
            """K values shaped to broadcast over p's runs."""
            return torch.tensor(values, dtype=p.dtype, device=p.device).view(
                -1, *[1] * (p.dim() - 1))

        self.stacked = stacked
        self.lr = [per_run([-v for v in lr], p) for p in stacked]
        self.momentum = [per_run(momentum, p) for p in stacked]
        self.decay = [per_run(weight_decay, p) if any(weight_decay) else None for p in stacked]
        self.buffers: list[torch.Tensor | None] = [None] * len(stacked)

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.stacked):
            if p.grad is None:
                continue
            buf = self.buffers[i]
            if buf is None:
                buf = self.buffers[i] = p.grad.clone()
            else:
                buf.mul_(self.momentum[i]).add_(p.grad)
            if self.decay[i] is not None:
                buf.addcmul_(p, self.decay[i])
            p.addcmul_(buf, self.lr[i])


class PerRunOptimizer(_OverStacked):
    """One torch optimizer per run of a pack, each over leaves that share the storage of that
    run's slice of the pack's stacked parameters: each run steps with its own lr, momentum and
    weight decay by torch's own arithmetic, as it would alone. ``makers[k](params)`` builds
    run k's optimizer."""

    def __init__(self, stacked: list[torch.Tensor], makers: list[Callable]):
        self.stacked = stacked
        self.views = [[p[k].detach().requires_grad_() for p in stacked]
                      for k in range(len(makers))]
        self.optimizers = [make(views) for make, views in zip(makers, self.views)]

    def step(self) -> None:
        for k, (views, optimizer) in enumerate(zip(self.views, self.optimizers)):
            for view, p in zip(views, self.stacked):
                view.grad = None if p.grad is None else p.grad[k]
            optimizer.step()
