"""The baseline a bench holds initstudy's trainer to: the training loop of PyTorch's MNIST
example, as a researcher's script runs it (torchvision's per-sample transforms, a DataLoader,
NCHW fp32, the loss read back every step), timed an epoch at a time (scripts/bench.py)."""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F

from initstudy import LeNet, apply_scheme
from initstudy.data import STATS
from initstudy.environment import numerics


class ExampleDataset(torch.utils.data.Dataset):
    """What torchvision.datasets.MNIST does per sample: a PIL image, then the transforms."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, dataset: str):
        from torchvision import transforms

        mean, std = STATS[dataset]
        self.images, self.labels = images.numpy(), labels.tolist()
        self.transform = transforms.Compose([transforms.ToTensor(),
                                             transforms.Normalize((mean,), (std,))])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i], mode="L")), self.labels[i]


def baseline(data, device: torch.device, images: int) -> Callable[[], float]:
    """A function timing one epoch of the PyTorch MNIST example's loop: its images/s."""
    loader = torch.utils.data.DataLoader(
        ExampleDataset(data.train_images[:images], data.train_labels[:images], data.name),
        batch_size=64, shuffle=True)
    model = apply_scheme(LeNet(), "default", seed=0).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def epoch() -> float:
        start = time.perf_counter()
        with numerics("fp32", device):  # NCHW fp32: no TF32 on CUDA either
            seen = _example_epoch(loader, model, optimizer, device)
        return seen / (time.perf_counter() - start)

    return epoch


def _example_epoch(loader, model: LeNet, optimizer, device: torch.device) -> int:
    """One epoch of the PyTorch MNIST example's loop; returns the images trained."""
    seen = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad()
        # The document's forward less its final Softmax (cross-entropy takes the scores),
        # not LeNet.logits, which is initstudy's own faster order.
        loss = F.cross_entropy(model.document_logits(x), y)
        loss.backward()
        optimizer.step()
        loss.item()  # the example logs it; it waits for the device every step
        seen += len(y)
    return seen
