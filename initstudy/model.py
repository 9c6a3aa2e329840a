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
        return self.classifer[-1](self.document_logits(x))

    def document_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The document's forward, layer by layer in its order, less the final Softmax: for
        looking inside (every ReLU sees its conv's full output). Training uses ``logits``."""
        return self.classifer[:-1](self.features(nn.ZeroPad2d((2, 2, 2, 2))(x)))

    def logits(self, x: torch.Tensor, dropout_mask: torch.Tensor | None = None,
               chunk: int | None = None) -> torch.Tensor:
        """Everything but the final Softmax: the pre-softmax scores a stable loss needs.

        The document's layers, with each max-pool applied before the ReLU in front of it: a
        max commutes with a non-decreasing function, so the values and the gradients are the
        same numbers (both pass through each window's arg-max, and are zero where its maximum
        is <= 0), while the ReLU touches a quarter of them.

        ``dropout_mask`` (batch x 84, already scaled by 1/(1-p)), when given, replaces the
        Dropout layer's own draw, so that a trainer can draw masks from a run's own generator.
        ``chunk``: run the first conv and its pooling on this many images at a time. Its
        output is 0.4 MB per image, 51 MB for a batch of 128, more than a CPU's cache; in
        chunks it is pooled while still cached. The same numbers, but for the order in which
        the first conv's weight gradient is summed over the batch.
        """
        x = nn.ZeroPad2d((2, 2, 2, 2))(x)
        conv1, relu1, pool1, conv2, relu2, pool2, conv3, relu3 = self.features
        if chunk and chunk < len(x):
            x = torch.cat([relu1(pool1(conv1(part))) for part in x.split(chunk)])
        else:
            x = relu1(pool1(conv1(x)))
        x = relu3(conv3(relu2(pool2(conv2(x)))))
        for layer in self.classifer[:-1]:
            x = x * dropout_mask if dropout_mask is not None and isinstance(
                layer, nn.Dropout) else layer(x)
        return x


def init_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs an init scheme acts on: every Conv2d and Linear, in forward order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
