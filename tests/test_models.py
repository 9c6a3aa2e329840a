"""The model seam: built-in plain nets, a user's own class, the errors, and every piece of the
trainer (pack, dropout, run ids, CLI) on models other than the LeNet."""

import copy
import json
import subprocess
import textwrap

import pytest
import torch
import torch.nn as nn
from typer.testing import CliRunner

from initstudy import LeNet, RunConfig, apply_scheme, build_model
from initstudy.cli import app
from initstudy.errors import ConfigError, ModelError
from initstudy.model import MLP, PlainCNN, dropout_shapes, init_layers, resolve_model
from initstudy.pack import Pack
from initstudy.study import StudyError, expand

from helpers import assert_packed_step_is_each_models_own, sweep_cmd, tiny_study


@pytest.mark.parametrize("depth,width,act", [(1, 16, "relu"), (2, 256, "relu"), (30, 64, "tanh")])
def test_mlp_has_depth_linear_layers_and_maps_images_to_ten_scores(depth, width, act):
    model = build_model(f"mlp:depth={depth},width={width},act={act}")
    assert isinstance(model, MLP)
    layers = [m for _, m in init_layers(model)]
    assert len(layers) == depth and all(isinstance(m, nn.Linear) for m in layers)
    assert layers[0].in_features == 784 and layers[-1].out_features == 10
    assert all(m.out_features == width for m in layers[:-1])
    acts = [m for m in model.modules() if isinstance(m, (nn.ReLU, nn.Tanh))]
    assert len(acts) == depth - 1 and all(type(a) is {"relu": nn.ReLU, "tanh": nn.Tanh}[act]
                                          for a in acts)
    assert not any(isinstance(m, (nn.Dropout, nn.BatchNorm1d, nn.LayerNorm))
                   for m in model.modules())
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_cnn_is_a_plain_stack_of_3x3_convs_then_a_linear_classifier():
    model = build_model("cnn:depth=4,channels=8,act=tanh")
    assert isinstance(model, PlainCNN)
    layers = [m for _, m in init_layers(model)]
    convs, linear = layers[:-1], layers[-1]
    assert len(convs) == 4 and all(isinstance(c, nn.Conv2d) and c.kernel_size == (3, 3)
                                   and c.out_channels == 8 for c in convs)
    assert convs[0].in_channels == 1 and isinstance(linear, nn.Linear)
    assert linear.in_features == 8 * 28 * 28 and linear.out_features == 10
    assert sum(isinstance(m, nn.Tanh) for m in model.modules()) == 4
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_lenet_is_the_default_and_unchanged():
    assert RunConfig().model == "lenet"
    model = build_model("lenet")
    assert type(model) is LeNet and str(model) == str(LeNet())
    assert dropout_shapes(model) == [("classifer.3", 0.1, (84,))]


def test_defaults_are_filled_in_and_recorded():
    assert resolve_model("mlp").params == {"depth": 3, "width": 256, "act": "relu"}
    assert resolve_model("cnn:act=tanh").params == {"depth": 5, "channels": 16, "act": "tanh"}


USER_MODELS = textwrap.dedent("""
    import torch.nn as nn

    class Tiny(nn.Module):
        def __init__(self, hidden=8, p=0.0):
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(),
                                      nn.Dropout(p), nn.Linear(hidden, 10))

        def forward(self, x):
            return self.body(x)

    class FiveScores(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(784, 5)

        def forward(self, x):
            return self.fc(x.flatten(1))

    class Pair(Tiny):
        def forward(self, x):
            return self.body(x), 0

    class Normed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(784, 10)
            self.bn = nn.BatchNorm1d(10)

        def forward(self, x):
            return self.bn(self.fc(x.flatten(1)))

    class ChannelDrop(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout2d(0.1)
            self.fc = nn.Linear(784, 10)

        def forward(self, x):
            return self.fc(self.drop(x).flatten(1))

    class Broken(nn.Module):
        def __init__(self):
            raise RuntimeError("no GPU here")

    def not_a_module():
        return 42
""")


@pytest.fixture
def user_models(tmp_path, monkeypatch):
    path = tmp_path / "my_models.py"
    path.write_text(USER_MODELS)
    monkeypatch.chdir(tmp_path)
    return path


def test_a_users_class_from_a_file_or_a_module_with_parameters(user_models):
    by_file = build_model(f"{user_models}:Tiny")
    by_module = build_model("my_models:Tiny:hidden=12,p=0.2")
    assert by_file.body[1].out_features == 8 and by_module.body[1].out_features == 12
    assert resolve_model("my_models:Tiny:hidden=12,p=0.2").params == {"hidden": 12, "p": 0.2}
    assert dropout_shapes(by_module) == [("body.3", 0.2, (12,))]
    model = apply_scheme(by_module, "kaiming", seed=0)
    assert (model.body[1].bias == 0).all()


@pytest.mark.parametrize("spec,fragments", [
    ("resnet", ["unknown model 'resnet'", "lenet", "mlp", "cnn", "module.path:Class"]),
    ("mlp:layers=3", ["no parameter 'layers'", "depth, width, act"]),
    ("mlp:depth=0", ["bad value '0'", "positive integer"]),
    ("mlp:act=gelu", ["bad value 'gelu'", "relu or tanh"]),
    ("cnn:channels", ["needs a value"]),
    ("my_models:FiveScores", ["N x 10 class scores", "shape (2, 5)"]),
    ("my_models:Pair", ["N x 10 class scores", "returned a tuple"]),
    ("my_models:Broken", ["cannot build", "no GPU here"]),
    ("my_models:not_a_module", ["built a int, not a torch.nn.Module"]),
    ("my_models:ChannelDrop", ["only nn.Dropout", "drop is a Dropout2d"]),
    ("my_models:Missing", ["has no 'Missing'"]),
    ("my_models:Tiny:hidden", ["expected key=value"]),
    ("no_such_models_xyz:Net", ["unknown model", "no importable module"]),
    ("missing.py:Net", ["not found"]),
])
def test_bad_models_are_one_clear_error(user_models, spec, fragments):
    with pytest.raises(ModelError) as info:
        build_model(spec)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_a_packed_step_on_an_mlp_with_dropout_is_each_models_own(user_models):
    """The pack's contract for any model: dropout masks are the trainer's, per model."""
    models = [apply_scheme(build_model("my_models:Tiny:hidden=16,p=0.3"), s, seed=i)
              for i, s in enumerate(("kaiming", "xavier", "orthogonal"))]
    x, y = torch.randn(3, 8, 1, 28, 28), torch.randint(0, 10, (3, 8))
    generators = [torch.Generator().manual_seed(k) for k in range(3)]
    masks = Pack(models).draw_masks(8, generators, torch.device("cpu"))
    assert len(masks) == 1 and masks[0].shape == (3, 8, 16)
    assert torch.allclose(masks[0].unique(), torch.tensor([0.0, 1 / 0.7]))

    assert_packed_step_is_each_models_own(models, x, y, masks)
    for k, model in enumerate(models):  # the mask is dropout: those hidden units zeroed
        with torch.no_grad():
            hidden = torch.relu(model.body[1](x[k].flatten(1))) * masks[0][k]
            assert torch.allclose(Pack([model]).logits(x[k:k + 1], (masks[0][k:k + 1],))[0],
                                  model.body[4](hidden), atol=1e-5)


def test_dropout_shapes_probe_the_model_on_its_own_device(user_models):
    """A pack is built from models already on the training device: the probe image must go
    there too (a CPU image met CUDA weights on the first GPU run). The meta device stands in
    for a GPU here: any device but the CPU."""
    assert dropout_shapes(LeNet().to("meta")) == [("classifer.3", 0.1, (84,))]
    assert dropout_shapes(LeNet().double()) == [("classifer.3", 0.1, (84,))]  # and its dtype
    tiny = build_model("my_models:Tiny:hidden=16,p=0.3").to("meta")
    assert [shape for _, _, shape in dropout_shapes(tiny)] == [(16,)]


def test_a_vmap_pack_says_why_not_for_batch_norm_and_a_loop_pack_trains_it(user_models):
    models = [apply_scheme(build_model("my_models:Normed"), "kaiming", seed=k) for k in range(2)]
    with pytest.raises(ConfigError, match="batch norm cannot be trained as a vmap pack.*"
                       "--engine loop"):
        Pack(models, engine="vmap")
    assert Pack(models[:1]).eval_logits(torch.randn(4, 1, 28, 28)).shape == (1, 4, 10)
    # Looped, each model updates its own running statistics, as it does alone.
    x, y = torch.randn(2, 8, 1, 28, 28), torch.randint(0, 10, (2, 8))
    pack = Pack([copy.deepcopy(m) for m in models], engine="loop")
    pack.forward_backward(x, y, (), nn.functional.cross_entropy)
    for k, model in enumerate(models):
        nn.functional.cross_entropy(model(x[k]), y[k]).backward()
        assert torch.allclose(pack.buffers["net.bn.running_mean"][k], model.bn.running_mean)
        assert int(pack.buffers["net.bn.num_batches_tracked"][k]) == 1
        assert torch.allclose(pack.params["net.fc.weight"].grad[k], model.fc.weight.grad,
                              atol=1e-6)


def test_model_counts_in_the_run_id_but_lenet_runs_keep_theirs():
    # The id this run had before models existed (reports/mnist-lenet-tuned holds it).
    lenet = RunConfig(scheme="default", seed=1, dataset="mnist", epochs=3, lr=0.0316)
    assert lenet.run_id == "default-s1-ac11f294" and lenet.run_name == "default-s1"
    mlp = RunConfig(scheme="default", seed=1, dataset="mnist", epochs=3, lr=0.0316,
                    model="mlp:depth=30")
    assert mlp.run_id != "default-s1-ac11f294" and mlp.run_name == "mlp-depth=30-default-s1"
    assert RunConfig(model="mlp:depth=20").run_id != RunConfig(model="mlp:depth=30").run_id


def test_a_study_checks_its_models_before_anything_runs(tmp_path, tiny_data, user_models):
    with pytest.raises(StudyError, match="N x 10 class scores"):  # built, not only parsed
        expand({"model": ["mlp", "my_models:FiveScores"]})
    with pytest.raises(StudyError, match="unknown model 'resnet'"):
        expand({"schemes": ["default"], "model": ["mlp", "resnet"]})
    with pytest.raises(StudyError, match="no parameter 'layers'"):
        expand({"model": "mlp:layers=3"})
    runs = expand({"schemes": ["default", "kaiming"], "seeds": 2,
                   "model": ["mlp:depth=2", "mlp:depth=5"]})
    assert len(runs) == 8 and len({r.run_id for r in runs}) == 8


def test_cli_trains_inspects_and_lists_any_model(tiny_data, tmp_path, user_models):
    runner = CliRunner()
    listed = runner.invoke(app, ["models"])
    assert listed.exit_code == 0 and all(n in listed.stdout for n in ("lenet", "mlp", "cnn"))
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", "--model", "mlp:depth=4,width=32,act=tanh", "--scheme",
                                 "lsuv", "--data-dir", str(tiny_data), "--epochs", "2",
                                 "--batch-size", "50", "--device", "cpu", "--quiet",
                                 "--wandb", "disabled", "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "mlp:depth=4,width=32,act=tanh"
    assert config["model_params"] == {"depth": 4, "width": 32, "act": "tanh"}
    assert config["env"]["cpu_path"] is None  # the LeNet's CPU paths are the LeNet's alone
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["model"] == config["model"]
    diag = json.loads((out / "init_diagnostics.json").read_text())
    assert [layer["name"] for layer in diag["layers"]] == [f"layers.{i}" for i in (1, 3, 5, 7)]
    assert all(0 <= layer["saturated_frac"] <= 1 for layer in diag["layers"][:-1])
    records = [json.loads(line) for line in (out / "histograms.jsonl").read_text().splitlines()]
    assert {r["layer"] for r in records} == {"layers.1", "layers.3", "layers.5", "layers.7"}
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "grad_norm/layers.7" in next(r for r in metrics if "epoch" not in r)
    user = runner.invoke(app, ["run", "--model", "my_models:Tiny:hidden=16,p=0.2", "--epochs",
                               "1", "--data-dir", str(tiny_data), "--device", "cpu", "--quiet",
                               "--wandb", "disabled", "--out", str(tmp_path / "user")])
    assert user.exit_code == 0, user.stderr
    inspected = runner.invoke(app, ["inspect", "--model", "cnn:depth=3,channels=4",
                                    "--scheme", "kaiming", "--dataset", "mnist-sample"])
    assert inspected.exit_code == 0, inspected.stderr
    assert "features.4" in inspected.stdout and "classifier.1" in inspected.stdout
    bad = runner.invoke(app, ["run", "--model", "my_models:FiveScores", "--data-dir",
                              str(tiny_data), "--device", "cpu", "--out", str(tmp_path / "b")])
    assert bad.exit_code == 2 and "N x 10 class scores" in bad.stderr
    assert bad.stderr.count("\n") == 1  # one line, no traceback


@pytest.mark.slow
def test_a_tiny_depth_sweep_ends_in_a_report_with_a_depth_figure(tmp_path, tiny_data):
    """End to end as a user runs it: `initstudy sweep` of a depth axis (packed), then
    `initstudy report`: the axis table and figures, and each depth a comparison of its own."""
    study = tiny_study(tmp_path, tiny_data, ["default", "kaiming"], seeds=2, epochs=1,
                       model=["mlp:depth=2,width=16", "mlp:depth=6,width=16"],
                       lr=[0.01, 0.1], tune=["lr"])
    out = tmp_path / "runs"
    swept = subprocess.run(sweep_cmd(study, out, "--pack", "4", "--wandb", "disabled"),
                           capture_output=True, text=True, timeout=300)
    assert swept.returncode == 0, swept.stderr
    folders = [p for p in out.iterdir() if p.is_dir()]
    assert len(folders) == 2 * 2 * 2 * 2
    assert all(json.loads((p / "summary.json").read_text())["status"] == "ok" for p in folders)
    result = CliRunner().invoke(app, ["report", str(out), "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.stderr
    text = (tmp_path / "report" / "README.md").read_text()
    assert "## Along depth" in text and "| scheme | depth=2 | depth=6 |" in text
    assert "mlp:depth=6,width=16" in text  # each depth a comparison of its own, never pooled
    figures = {p.name for p in (tmp_path / "report" / "figures").iterdir()}
    assert {"axis_depth.png", "axis_depth_signal_1.png"} <= figures


def test_axes_are_the_numbers_that_vary_and_the_rest_make_panels():
    from pathlib import Path

    from initstudy.axes import find_axes
    from initstudy.results import Run, comparisons
    from initstudy.tuning import select

    def run(model, params, scheme, lr, seed, acc):
        config = {"scheme": scheme, "model": model, "model_params": params, "seed": seed,
                  "lr": lr, "epochs": 1, "dataset_used": "mnist"}
        return Run(Path(f"{model}-{scheme}-{lr}-{seed}"), config,
                   {"status": "ok", "val/acc": acc, "test/acc": acc}, [])

    runs = []
    for act, depths in (("relu", (2, 10, 30)), ("tanh", (5, 30))):
        for depth in depths:
            spec = f"mlp:depth={depth},act={act}"
            params = {"depth": depth, "width": 256, "act": act}
            for scheme in ("default", "kaiming"):
                for lr, bonus in ((0.01, 0.0), (0.1, 0.05)):
                    runs += [run(spec, params, scheme, lr, s, 0.5 + bonus + s / 100)
                             for s in range(3)]
    analysed = [(c, select(c)) for c in comparisons(runs, ("lr",))]
    (axis,) = find_axes(analysed)
    assert axis.name == "depth" and axis.of_model
    assert set(axis.panels) == {"act=relu", "act=tanh"}
    relu = axis.panels["act=relu"]
    assert [p.value for p in relu] == [2, 10, 30]
    assert all(s.best.values == (0.1,) for p in relu for s in p.selections)  # chosen on val
