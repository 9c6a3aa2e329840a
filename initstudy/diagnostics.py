"""Why an init works: the signal-propagation diagnostics of Glorot & Bengio (2010) and He et
al. (2015), measured on a freshly initialised model and during training."""

from __future__ import annotations

import copy
import math
from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import LeNet, init_layers
from .runfolder import HISTOGRAM_BINS

DIAG_SEED = 0  # the init diagnostics batch: the same images for every run of a dataset


def init_diagnostics(model: LeNet, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Forward and backward statistics of ``model`` on one batch, before any step.

    Returns ``{"layers": [...], "logit_std", "max_prob_mean", "loss", "batch"}`` with one entry
    per Conv2d/Linear in forward order: ``name``, ``out_mean`` and ``out_std`` (the layer's
    output before its activation), ``act_std`` (after the ReLU that follows, None where none
    does), ``dead_frac`` (fraction of ReLU units, channel x position, that are zero for the whole
    batch), ``grad_out_std`` (std of the loss gradient w.r.t. the layer's output) and
    ``weight_grad_norm``. The loss is the cross-entropy from the logits; dropout is off (eval
    mode) so the numbers do not depend on a dropout draw. ``model`` itself is not touched: the
    measurement runs on a copy whose ReLUs are not in place, so outputs survive to be measured.
    """
    probe = copy.deepcopy(model).eval()
    for module in probe.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    layers = init_layers(probe)
    relu_after = _relu_after(probe)
    outputs: dict[str, torch.Tensor] = {}
    activations: dict[str, torch.Tensor] = {}
    grad_stds: dict[str, float] = {}
    hooks = []
    for name, layer in layers:
        def keep(module, inputs, output, name=name):
            outputs[name] = output.detach()
            # The gradient's std is read as it passes; retaining whole gradients costs memory.
            output.register_hook(lambda grad, name=name: grad_stds.__setitem__(
                name, grad.std().item()))
        hooks.append(layer.register_forward_hook(keep))
        if name in relu_after:
            hooks.append(relu_after[name].register_forward_hook(
                lambda module, inputs, output, name=name: activations.__setitem__(name, output)))
    try:
        probe.zero_grad(set_to_none=True)
        logits = probe.document_logits(x)  # the ReLUs must see the convs' whole outputs
        loss = F.cross_entropy(logits, y)
        loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
    report = []
    for name, layer in layers:
        out = outputs[name]
        act = activations.get(name)
        report.append({
            "name": name,
            "out_mean": out.mean().item(),
            "out_std": out.std().item(),
            "act_std": act.detach().std().item() if act is not None else None,
            "dead_frac": ((act.detach() == 0).all(0).float().mean().item()
                          if act is not None else None),
            "grad_out_std": grad_stds[name],
            "weight_grad_norm": torch.linalg.vector_norm(layer.weight.grad).item(),
        })
    logits = logits.detach()
    return {"layers": report, "logit_std": logits.std().item(),
            "max_prob_mean": logits.softmax(-1).max(-1).values.mean().item(),
            "loss": loss.item(), "batch": len(y)}


def _relu_after(model: nn.Module) -> dict[str, nn.ReLU]:
    """For each Conv2d/Linear, the ReLU that follows it in its Sequential, if one does."""
    found = {}
    for seq_name, seq in model.named_children():
        children = list(seq.named_children()) if isinstance(seq, nn.Sequential) else []
        for (name, module), (_, following) in zip(children, children[1:]):
            if isinstance(module, (nn.Conv2d, nn.Linear)) and isinstance(following, nn.ReLU):
                found[f"{seq_name}.{name}"] = following
    return found


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
                   batch: int = 256) -> tuple[dict[str, Any], LeNet]:
    """The init diagnostics of a freshly initialised LeNet, on the same fixed batch of training
    images as a run's ``init_diagnostics.json``; returns (report, model)."""
    from .data import random_batch
    from .sources import load_dataset
    from .schemes import apply_scheme

    data = load_dataset(dataset, data_dir).split_validation(None)  # a default run's train set
    draw = lambda n: random_batch(data.train_images, data.train_labels, data.name, n)[0]
    model = apply_scheme(LeNet(), spec, seed=seed, data=draw)
    x, y = random_batch(data.train_images, data.train_labels, data.name, batch,
                        torch.Generator().manual_seed(DIAG_SEED))
    return init_diagnostics(model, x, y) | {"scheme": spec, "dataset": data.name}, model


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
        record["values"] = [v if math.isfinite(v) else None for v in flat.tolist()]
    return record | {
        "mean": finite.mean().item(),
        "std": finite.std().item() if finite.numel() > 1 else 0.0,
        "min": finite.min().item(), "max": finite.max().item(),
        "edges": edges.tolist(), "counts": [int(c) for c in counts.tolist()],
    }


def layer_histograms(layers: Iterable[tuple[str, torch.nn.Module]]) -> list[dict[str, Any]]:
    """Histogram records of every weight and bias of the given (name, layer) pairs."""
    records = []
    for name, layer in layers:
        for param in ("weight", "bias"):
            tensor = getattr(layer, param, None)
            if tensor is not None:
                records.append(histogram(name, param, tensor))
    return records
