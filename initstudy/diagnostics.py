"""Why an init works: the signal-propagation diagnostics of Glorot & Bengio (2010) and He et
al. (2015), measured on a freshly initialised model and during training."""

from __future__ import annotations

import copy
import math
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import build_model, calls, init_layers, reference_scores
from .runfolder import HISTOGRAM_BINS

DIAG_SEED = 0  # the init diagnostics batch: the same images for every run of a dataset


# Per layer, in this order (``initstudy inspect`` prints them as columns).
LAYER_STATS = ("out_mean", "out_std", "signal_std", "act_std", "dead_frac", "saturated_frac", "grad_out_std",
               "weight_grad_norm")
SATURATED = 0.99  # |tanh| at or above this counts as saturated (its slope is below 0.02)
ACTIVATIONS = (nn.ReLU, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid,
               nn.Softplus, nn.SELU)


def init_diagnostics(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Forward and backward statistics of ``model`` on one batch, before any step.

    Returns ``{"layers": [...], "logit_std", "max_prob_mean", "loss", "batch"}`` with one entry
    per Conv2d/Linear in the order the forward pass calls them: ``name``, and ``LAYER_STATS``:
    ``out_mean``/``out_std`` (the layer's output, before its activation), ``signal_std`` (the
    part of it that depends on the input: each unit's std over the batch, root-mean-square
    over units, so a bias that is the same for every image does not count), ``act_std`` (after
    the activation module called next, None where none is), ``dead_frac`` (after a ReLU: the
    fraction of units, channel x position, zero for the whole batch), ``saturated_frac`` (after
    a tanh: the fraction of values with |tanh| >= SATURATED), ``grad_out_std`` (std of the loss
    gradient w.r.t. the layer's output) and ``weight_grad_norm``. Everything is seen through
    forward hooks on the model's own forward (``reference_scores``). The loss is the
    cross-entropy from the scores; dropout is off (eval mode). ``model`` itself is not touched:
    the measurement runs on a copy whose activations are not in place, so outputs survive.
    """
    probe = copy.deepcopy(model).eval()
    for module in probe.modules():
        if getattr(module, "inplace", False):
            module.inplace = False
    layers = dict(init_layers(probe))
    grad_stds: dict[nn.Module, float] = {}

    def run() -> torch.Tensor:
        return reference_scores(probe, x)

    def watch(module, inputs, output):
        if module in grad_stds or not output.requires_grad:
            return
        grad_stds[module] = math.nan  # the gradient's std is read as it passes (memory)
        output.register_hook(lambda grad: grad_stds.__setitem__(module, grad.std().item()))

    probe.zero_grad(set_to_none=True)
    hooks = [m.register_forward_hook(watch) for m in layers.values()]
    try:
        scores: list[torch.Tensor] = []
        met = calls(probe, lambda: scores.append(run()))
        loss = F.cross_entropy(scores[0], y)
        loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
    report, done = [], set()
    for i, (name, module, out) in enumerate(met):
        if module not in layers.values() or module in done:
            continue
        done.add(module)
        after = met[i + 1][1] if i + 1 < len(met) else None  # the module called next
        act = met[i + 1][2].detach() if isinstance(after, ACTIVATIONS) else None
        grad = module.weight.grad
        report.append({
            "name": name,
            "out_mean": out.mean().item(),
            "out_std": out.std().item(),
            "signal_std": out.detach().var(0).mean().sqrt().item(),
            "act_std": act.std().item() if act is not None else None,
            "dead_frac": ((act == 0).all(0).float().mean().item()
                          if isinstance(after, nn.ReLU) else None),
            "saturated_frac": ((act.abs() >= SATURATED).float().mean().item()
                               if isinstance(after, nn.Tanh) else None),
            "grad_out_std": grad_stds.get(module, math.nan),
            "weight_grad_norm": (torch.linalg.vector_norm(grad).item() if grad is not None
                                 else None),
        })
    logits = scores[0].detach()
    return {"layers": report, "logit_std": logits.std().item(),
            "max_prob_mean": logits.softmax(-1).max(-1).values.mean().item(),
            "loss": loss.item(), "batch": len(y)}


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every Conv2d/Linear weight, to measure an epoch's update against."""
    return {name: layer.weight.detach().clone() for name, layer in init_layers(model)}


def weight_dynamics(model: nn.Module, before: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per layer: ``weight_std/<layer>`` now and ``rel_update/<layer>``,
    ||W_now - W_before|| / ||W_before|| (None where W_before is zero)."""
    stats = {}
    for name, layer in init_layers(model):
        w, w0 = layer.weight.detach(), before[name]
        norm0 = torch.linalg.vector_norm(w0)
        stats[f"weight_std/{name}"] = w.std().item()
        stats[f"rel_update/{name}"] = ((torch.linalg.vector_norm(w - w0) / norm0).item()
                                       if norm0 > 0 else None)
    return stats


def inspect_scheme(spec: str, seed: int = 0, dataset: str = "mnist", data_dir: str | None = None,
                   batch: int = 256, model: str = "lenet") -> tuple[dict[str, Any], nn.Module]:
    """The init diagnostics of a freshly initialised ``model`` (a model spec), on the same fixed
    batch of training images as a run's ``init_diagnostics.json``; returns (report, model)."""
    from .data import random_batch
    from .sources import load_dataset
    from .schemes import apply_scheme

    data = load_dataset(dataset, data_dir).split_validation(None)  # a default run's train set
    draw = lambda n: random_batch(data.train_images, data.train_labels, data.name, n)[0]
    net = apply_scheme(build_model(model), spec, seed=seed, data=draw)
    x, y = random_batch(data.train_images, data.train_labels, data.name, batch,
                        torch.Generator().manual_seed(DIAG_SEED))
    return init_diagnostics(net, x, y) | {"scheme": spec, "model": model,
                                          "dataset": data.name}, net


def histogram(name: str, param: str, values: torch.Tensor) -> dict[str, Any]:
    """A histogram record of one tensor over its finite values (see the module docstring)."""
    flat = values.detach().float().flatten().cpu()
    finite = flat[torch.isfinite(flat)]
    record: dict[str, Any] = {"layer": name, "param": param, "count": flat.numel(),
                              "nonfinite": flat.numel() - finite.numel()}
    if finite.numel() == 0:
        return record | {"mean": None, "std": None, "min": None, "max": None,
                         "edges": [], "counts": []}
    lo, hi = finite.min().item(), finite.max().item()
    if lo == hi:  # a constant tensor: one bin centred on it, as numpy does
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = torch.histogram(finite, bins=HISTOGRAM_BINS, range=(lo, hi))
    if param == "bias":  # few enough to keep: the note plots biases value by value
        record["values"] = _f32(flat)
    stats = torch.stack([finite.mean(), finite.std() if finite.numel() > 1 else
                         torch.tensor(0.0), finite.min(), finite.max()])
    return record | dict(zip(("mean", "std", "min", "max"), _f32(stats))) | {
        "edges": _f32(edges), "counts": [int(c) for c in counts.tolist()]}


def _f32(values: torch.Tensor) -> list[float | None]:
    """float32 values as the shortest decimals that read back to the same float32 (half the
    text of their float64 digits), None where not finite."""
    return [float(str(v)) if np.isfinite(v) else None
            for v in values.detach().float().cpu().numpy()]


def layer_histograms(layers: Iterable[tuple[str, torch.nn.Module]]) -> list[dict[str, Any]]:
    """Histogram records of every weight and bias of the given (name, layer) pairs."""
    records = []
    for name, layer in layers:
        for param in ("weight", "bias"):
            tensor = getattr(layer, param, None)
            if tensor is not None:
                records.append(histogram(name, param, tensor))
    return records
