"""Figures, drawn with matplotlib's non-interactive backend into PNG files."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, none opened
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

HIST_BINS = 30  # the seed document's plt.hist(..., bins=30)


def layer_pictures(models: dict[str, torch.nn.Module], layer: str, path: Path) -> Path:
    """The seed document's two pictures of one layer, one column per scheme: a 30-bin histogram
    of its weights and a line plot of its biases (index against value)."""
    fig, axes = plt.subplots(2, len(models), figsize=(4.5 * len(models), 7), squeeze=False)
    for column, (scheme, model) in enumerate(models.items()):
        module = dict(model.named_modules())[layer]
        weights = module.weight.detach().float().cpu().flatten()
        weights = weights[torch.isfinite(weights)]
        top, bottom = axes[0][column], axes[1][column]
        top.hist(weights.numpy(), bins=HIST_BINS)
        top.set(title=f"{scheme}: {layer}.weight", xlabel="weight value", ylabel="count")
        if module.bias is not None:
            bottom.plot(module.bias.detach().float().cpu().numpy())
        bottom.set(title=f"{scheme}: {layer}.bias", xlabel="output unit", ylabel="bias value")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
