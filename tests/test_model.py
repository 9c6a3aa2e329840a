"""The model is the document's: same printout, same parameter names, same computation."""

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from initstudy import LeNet, kernels
from initstudy.model import CPU_PATHS

SEED_DOC = Path(__file__).resolve().parents[2] / "shared" / "seed" / "000_b1b145f78847737f.txt"

# The document's printout of print(model), leading spaces stripped (the document lost them).
DOCUMENT_PRINTOUT = """\
LeNet(
(features): Sequential(
(0): Conv2d(1, 128, kernel_size=(5, 5), stride=(1, 1))
(1): ReLU(inplace=True)
(2): MaxPool2d(kernel_size=2, stride=2, padding=0, dilation=1, ceil_mode=False)
(3): Conv2d(128, 128, kernel_size=(5, 5), stride=(1, 1))
(4): ReLU(inplace=True)
(5): MaxPool2d(kernel_size=2, stride=2, padding=0, dilation=1, ceil_mode=False)
(6): Conv2d(128, 128, kernel_size=(5, 5), stride=(1, 1))
(7): ReLU(inplace=True)
)
(classifer): Sequential(
(0): Flatten(start_dim=1, end_dim=-1)
(1): Linear(in_features=128, out_features=84, bias=True)
(2): ReLU(inplace=True)
(3): Dropout(p=0.1, inplace=False)
(4): Linear(in_features=84, out_features=10, bias=True)
(5): Softmax(dim=-1)
)
)"""


class DocumentLeNet(nn.Module):
    """The document's class, verbatim but for indentation."""

    def __init__(self):
        super(DocumentLeNet, self).__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 128, 5, 1), nn.ReLU(True), nn.MaxPool2d(2, 2),
            nn.Conv2d(128, 128, 5, 1), nn.ReLU(True), nn.MaxPool2d(2, 2),
            nn.Conv2d(128, 128, 5, 1), nn.ReLU(True),
        )
        self.classifer = nn.Sequential(
            nn.Flatten(), nn.Linear(128, 84), nn.ReLU(True), nn.Dropout(0.1),
            nn.Linear(84, 10), nn.Softmax(-1)
        )

    def forward(self, x):
        x = nn.ZeroPad2d((2, 2, 2, 2))(x)
        x = self.features(x)
        x = self.classifer(x)
        return x


def stripped_lines(text: str) -> list[str]:
    return [line.strip() for line in text.strip().splitlines()]


def test_printout_matches_the_document_line_for_line():
    """Against the printout kept here, so it runs wherever the project is cloned; where the
    seed document sits beside the checkout, that copy is checked against it too."""
    assert stripped_lines(str(LeNet())) == stripped_lines(DOCUMENT_PRINTOUT)
    if SEED_DOC.is_file():
        doc = SEED_DOC.read_text().splitlines()
        start = doc.index("print(model)") + 1
        printed = doc[start:start + len(DOCUMENT_PRINTOUT.splitlines())]
        assert stripped_lines("\n".join(printed)) == stripped_lines(DOCUMENT_PRINTOUT)


def test_document_weights_load_and_compute_the_same_function():
    torch.manual_seed(0)
    theirs = DocumentLeNet().eval()
    ours = LeNet().eval()
    ours.load_state_dict(theirs.state_dict())  # strict: same names, `classifer` included
    x = torch.randn(4, 1, 28, 28)
    assert torch.allclose(ours(x), theirs(x), atol=1e-6)
    assert torch.allclose(ours.logits(x).softmax(-1), theirs(x), atol=1e-6)


def test_pooling_before_relu_gives_bit_identical_values_and_gradients():
    torch.manual_seed(0)
    theirs, ours = DocumentLeNet().eval(), LeNet().eval()  # eval: no dropout draws
    ours.load_state_dict(theirs.state_dict())
    # Digits on a blank border: the first conv's output is exactly its bias there, so the
    # pooling windows hold ties, and many of their maxima are negative (the ReLU's zeros).
    x = torch.zeros(8, 1, 28, 28)
    x[:, :, 6:22, 6:22] = torch.randn(8, 1, 16, 16)
    y = torch.randint(0, 10, (8,))
    theirs_logits = theirs.classifer[:-1](theirs.features(nn.ZeroPad2d(2)(x)))
    assert torch.equal(ours.document_logits(x), theirs_logits)
    ours_logits = ours.logits(x)
    assert torch.equal(ours_logits, theirs_logits)
    nn.functional.cross_entropy(theirs_logits, y).backward()
    nn.functional.cross_entropy(ours_logits, y).backward()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.equal(a.grad, b.grad), name
    assert (ours.features[0].bias.grad != 0).all()


@pytest.mark.parametrize("cpu_path", CPU_PATHS)
def test_the_cpu_paths_give_the_same_values_and_gradients(cpu_path):
    """Each CPU path (the first block as one kernel, or in chunks of images, 37 here for a
    short last chunk, as oneDNN's convolution or a matrix product; the last conv as a matrix
    product): the same numbers as the layers themselves to rounding. In float64, where no
    near-tie of a max-pool can flip its arg-max on a last-bit difference."""
    if cpu_path == "fused" and kernels.kernel() is None:
        pytest.skip(f"the LeNet's CPU kernels do not build here: {kernels.why_not()}")
    torch.manual_seed(0)
    whole, fast = LeNet().double().eval(), LeNet().double().eval()
    fast.load_state_dict(whole.state_dict())
    x, y = torch.randn(37, 1, 28, 28, dtype=torch.float64), torch.randint(0, 10, (37,))
    logits = whole.logits(x)
    fast_logits = fast.logits(x, cpu_path, chunk=8)
    assert torch.allclose(fast_logits, logits, rtol=1e-12, atol=1e-12)
    nn.functional.cross_entropy(logits, y).backward()
    nn.functional.cross_entropy(fast_logits, y).backward()
    for (name, a), b in zip(fast.named_parameters(), whole.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-10, atol=1e-14), name
    assert fast.features[0].weight.grad.abs().max() > 0


def test_an_unknown_cpu_path_is_an_error_naming_the_known_ones():
    with pytest.raises(ValueError, match="fused, conv, matmul"):
        LeNet().logits(torch.randn(2, 1, 28, 28), "simd")


def test_padding_is_in_forward_not_a_submodule():
    assert not any(isinstance(m, nn.ZeroPad2d) for m in LeNet().modules())


def test_output_is_a_probability_distribution_over_ten_classes():
    probs = LeNet().eval()(torch.randn(3, 1, 28, 28))
    assert probs.shape == (3, 10)
    assert torch.allclose(probs.sum(1), torch.ones(3), atol=1e-6)
    assert (probs >= 0).all()
