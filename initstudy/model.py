"""The LeNet of the seed document, kept verbatim so its printout and state_dict match, and a
pack of them trained together."""

import copy

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


CPU_CHUNK = 16  # images per chunk of the first conv on a CPU (``LeNet.logits``): 6.4 MB of
# output. Measured on 2 EPYC cores at batch 128: 8, 16, 32, 64, 128 -> 1390, 1560, 1500, 1420,
# 1400 images/s. GPUs run it whole (unmeasured there: chunks would add kernel launches).


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
