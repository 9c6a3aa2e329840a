"""The LeNet of the seed document, kept verbatim so its printout and state_dict match."""

import torch
import torch.nn as nn


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
        return self.classifer[-1](self.logits(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Everything but the final Softmax: the pre-softmax scores a stable loss needs."""
        x = nn.ZeroPad2d((2, 2, 2, 2))(x)
        x = self.features(x)
        for layer in self.classifer[:-1]:
            x = layer(x)
        return x


def init_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs an init scheme acts on: every Conv2d and Linear, in forward order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
