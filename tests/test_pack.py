"""Packing: runs trained together with torch.func give the metrics of each trained alone."""

import copy
import json

import pytest
import torch

from initstudy import RunConfig, train
from initstudy.errors import ConfigError
from initstudy.model import LeNet
from initstudy import kernels
from initstudy.model import CPU_CHUNK
from initstudy.pack import Pack, cpu_path
from initstudy.schemes import apply_scheme
from initstudy.runfolder import read_jsonl
from initstudy.optim import OPTIMIZERS, PerRunOptimizer, StackedSGD, pack_optimizer
from initstudy.training import train_pack

from helpers import DIAG_BATCH, assert_packed_step_is_each_models_own, write_dataset


def configs(tiny_data, root, **overrides):
    common = dict(data_dir=str(tiny_data), epochs=2, batch_size=32, lr=0.01, log_every=3,
                  device="cpu", quiet=True, diag_batch=DIAG_BATCH) | overrides
    return [RunConfig(scheme="kaiming", seed=0, out=str(root / "a"), **common),
            RunConfig(scheme="xavier", seed=1, data_seed=7, out=str(root / "b"), **common),
            RunConfig(scheme="orthogonal", seed=2, out=str(root / "c"), **common)]


def close(a, b, rel):
    """Equal up to ``rel``, recursively over dicts; other values exactly."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], rel) for k in a)
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=rel, abs=1e-6, nan_ok=True)
    return a == b


def test_a_packed_step_computes_each_runs_own_gradients():
    """The contract, tightly: one step of a pack gives each model the loss and the gradients
    it gets alone, in both engines (the loop: each run's own step on its slice; vmap: one
    grouped convolution, the same sums in another order), equal to rounding on any CPU."""
    models = [apply_scheme(LeNet(), s, seed=i) for i, s in enumerate(("kaiming", "xavier",
                                                                      "orthogonal"))]
    x = torch.randn(3, 16, 1, 28, 28)
    y = torch.randint(0, 10, (3, 16))
    masks = ((torch.rand(3, 16, 84) > 0.1).float() / 0.9,)

    assert_packed_step_is_each_models_own(models, x, y, masks)


def mixed(data, root, engine="auto"):
    """``configs``' three runs, each with its own lr, momentum and weight decay."""
    runs = configs(data, root, engine=engine)
    for c, (lr, m, wd) in zip(runs, [(0.01, 0.9, 0.0), (0.03, 0.5, 1e-4), (0.003, 0.9, 0.0)]):
        c.lr, c.momentum, c.weight_decay = lr, m, wd
    return runs


@pytest.fixture(scope="module")
def solo_mixed(tmp_path_factory):
    """``mixed``'s runs trained alone, once for every engine held against them: their data
    root, the folder of their runs, their summaries."""
    root = tmp_path_factory.mktemp("mixed")
    data = write_dataset(root / "data")
    return data, root / "solo", [train(c) for c in mixed(data, root / "solo")]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["auto", "bmm"])
def test_packed_runs_record_what_solo_runs_do(solo_mixed, tmp_path, engine):
    """End to end: the same records, steps, init and data order; the first logged loss (3
    steps in) equal to float rounding. Later numbers drift apart as training amplifies the
    rounding (seen: 2e-3 relative after two epochs on an AVX2 CPU, 3e-4 with AVX-512), so
    they are held to 5%: what packing must not change is the run, not its last bits. In the
    CPU's own engine (the loop) and in bmm, the GPU's candidate, run here on the CPU."""
    data, solo_root, solo = solo_mixed
    packed = train_pack(mixed(data, tmp_path / "packed", engine))
    for p, s, name in zip(packed, solo, "abc"):
        assert p["status"] == s["status"] and p["steps"] == s["steps"]
        for key in ("test/acc", "test/loss", "val/acc", "train/loss"):
            assert close(p[key], s[key], 5e-2), (name, key)
        pm = read_jsonl(tmp_path / "packed" / name / "metrics.jsonl")
        sm = read_jsonl(solo_root / name / "metrics.jsonl")
        assert [sorted(r) for r in pm] == [sorted(r) for r in sm], name
        assert [(r.get("epoch"), r["step"]) for r in pm] == [(r.get("epoch"), r["step"])
                                                             for r in sm]
        first = next(i for i, r in enumerate(pm) if "epoch" not in r)
        assert close(pm[first]["train/loss"], sm[first]["train/loss"], 1e-4), name
        assert pm[0] == sm[0] or close(pm[0], sm[0], 1e-5)  # at init: evaluation only
        pd = json.loads((tmp_path / "packed" / name / "init_diagnostics.json").read_text())
        sd = json.loads((solo_root / name / "init_diagnostics.json").read_text())
        assert pd == sd  # the same init, bit for bit
    env = json.loads((tmp_path / "packed" / "a" / "config.json").read_text())["env"]
    assert env["pack_size"] == 3 and env["pack_engine"] == {"auto": "loop", "bmm": "bmm"}[engine]
    # Different inits, orders and dropout masks really give different runs.
    assert packed[0]["test/loss"] != packed[1]["test/loss"]


@pytest.mark.slow
def test_a_diverging_run_does_not_disturb_its_pack(tiny_data, tmp_path):
    # At lr 1e6, zeros stays finite (only the output bias moves, by bounded gradients);
    # N(0, 10^2) weights blow up.
    good, bad = (RunConfig(scheme=s, data_dir=str(tiny_data), epochs=2, batch_size=32, lr=1e6,
                           log_every=2, device="cpu", quiet=True, diag_batch=0,
                           out=str(tmp_path / name)) for s, name in
                 (("zeros", "good"), ("normal:std=10", "bad")))
    packed = train_pack([good, bad])
    alone = train(RunConfig(**{**good.__dict__, "out": str(tmp_path / "alone")}))
    assert packed[1]["status"] == "diverged"
    assert packed[0]["status"] == "ok"
    assert close(packed[0]["test/loss"], alone["test/loss"], 1e-3)  # zeros: only a bias moves


def test_pack_members_must_differ_only_in_scheme_seeds_and_optimizer_scalars(tiny_data,
                                                                             tmp_path):
    a, b, _ = configs(tiny_data, tmp_path)
    b.batch_size = 64
    with pytest.raises(ConfigError, match="'batch_size' differs"):
        train_pack([a, b])


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_a_packed_step_with_each_runs_own_lr_momentum_and_decay_is_each_runs_own(name):
    """The optimizer's side of the contract, in float64: two steps of a pack whose runs differ
    in lr, momentum and weight decay leave each run's weights where its solo steps with
    torch's optimizer do (SGD: one whole-pack update; others: one torch optimizer per run),
    and leave the gradients as the backward pass made them."""
    torch.manual_seed(0)
    runs = [RunConfig(scheme="default", optimizer=name, lr=lr, momentum=m, weight_decay=wd)
            for lr, m, wd in [(0.1, 0.9, 0.0), (0.01, 0.0, 1e-3), (0.5, 0.5, 1e-2)]]
    models = [apply_scheme(LeNet(), s, seed=i).double() for i, s in
              enumerate(("kaiming", "xavier", "orthogonal"))]
    x = torch.randn(3, 8, 1, 28, 28, dtype=torch.float64)
    y = torch.randint(0, 10, (3, 8))
    masks = ((torch.rand(3, 8, 84) > 0.1).double() / 0.9,)

    def two_steps(pack, optimizer, xs, ys, ms):
        for _ in range(2):
            optimizer.zero_grad(set_to_none=True)
            logits = pack.logits(xs, ms)
            sum(torch.nn.functional.cross_entropy(l, t) for l, t in zip(logits, ys)).backward()
            grads = [p.grad.clone() for p in pack.parameters()]
            optimizer.step()
            assert all(torch.equal(g, p.grad) for g, p in zip(grads, pack.parameters()))
        return pack

    packed = Pack([copy.deepcopy(m) for m in models])
    optimizer = pack_optimizer(packed.parameters(), runs)
    assert isinstance(optimizer, {"sgd": StackedSGD, "adam": PerRunOptimizer}[name])
    packed = two_steps(packed, optimizer, x, y, masks)
    for k, (model, run) in enumerate(zip(models, runs)):
        alone = Pack([copy.deepcopy(model)])
        alone = two_steps(alone, OPTIMIZERS[name](alone.parameters(), run), x[k:k + 1],
                          y[k:k + 1], tuple(m[k:k + 1] for m in masks))
        for param, p in alone.params.items():
            assert torch.allclose(packed.params[param][k], p[0], rtol=1e-9, atol=1e-12), param
        moved = packed.params["net.classifer.4.weight"][k] - model.classifer[4].weight
        assert moved.abs().max() > 0  # it trained


def test_a_pack_whose_runs_share_their_scalars_steps_with_torchs_own_optimizer():
    runs = [RunConfig(scheme=s, lr=0.03) for s in ("default", "kaiming")]
    stacked = Pack([LeNet(), LeNet()]).parameters()
    assert isinstance(pack_optimizer(stacked, runs), torch.optim.SGD)


def test_pack_forward_equals_each_model():
    models = [apply_scheme(LeNet(), s, seed=i) for i, s in enumerate(("kaiming", "orthogonal"))]
    pack = Pack(models)
    x = torch.randn(2, 5, 1, 28, 28)
    masks = (torch.ones(2, 5, 84),)
    logits = pack.logits(x, masks)
    assert pack.cpu_path == cpu_path("loop")
    for k, model in enumerate(models):
        assert torch.allclose(logits[k], model.eval().logits(x[k], pack.cpu_path), atol=1e-5)
        assert torch.allclose(pack.eval_logits(x[0])[k], model.logits(x[0], pack.cpu_path),
                              atol=1e-5)
        for a, b in zip(pack.model(k).state_dict().values(), model.state_dict().values()):
            assert torch.equal(a, b)


@pytest.mark.slow
def test_pack_evaluation_memory_is_bounded(monkeypatch):
    """A pass of a pack's evaluation holds at most the CPU's EVAL_BATCH images x runs, whatever
    K (a GPU's bound, larger, is the same rule: not run here)."""
    import initstudy.training as training

    sizes = []
    real = training.batches

    def spy(images, labels, dataset, batch_size):
        sizes.append(batch_size)
        return real(images, labels, dataset, batch_size)

    monkeypatch.setattr(training, "batches", spy)
    images = torch.randint(0, 255, (130, 28, 28), dtype=torch.uint8)
    labels = torch.arange(130) % 10
    for k in (1, 4, 35):
        pack = Pack([apply_scheme(LeNet(), "xavier", seed=s) for s in range(k)])
        results = training.evaluate(pack, images, labels, "mnist")
        assert len(results) == k and all(0 <= acc <= 1 for _, acc in results)
        bound = training.EVAL_BATCH["cpu"]
        assert sizes[-1] * k <= bound and sizes[-1] == bound // k


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "no-kernel"])
@pytest.mark.parametrize("isa", ["AVX512", "AVX2", "DEFAULT"])
@pytest.mark.parametrize("engine", ["loop", "vmap"])
def test_the_cpu_path_is_the_kernel_in_the_loop_engine_else_by_the_vector_isa(
        monkeypatch, engine, isa, kernel):
    """The CPU path's rule: the first-block kernel wherever it builds, in the loop engine;
    else oneDNN's convolution where PyTorch runs AVX-512 code (env.cpu_capability), the
    matrix product elsewhere; so one machine always computes a seed's run the same way. A
    pack's step follows it."""
    import initstudy.model as model

    if kernel and kernels.kernel() is None:
        pytest.skip(f"the LeNet's CPU kernels do not build here: {kernels.why_not()}")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: isa)
    monkeypatch.setattr(kernels, "kernel", kernels.kernel if kernel else lambda: None)
    expected = ("fused" if kernel and engine == "loop" else
                "conv" if isa == "AVX512" else "matmul")
    assert cpu_path(engine) == expected
    calls = []
    for name in ("first_block", "_first_conv_as_matmul"):
        real = getattr(model, name)
        monkeypatch.setattr(model, name, lambda conv, x, real=real, name=name:
                            calls.append((name, len(x))) or real(conv, x))
    pack = Pack([LeNet(), LeNet()], engine=engine)
    assert pack.cpu_path == expected
    pack.forward_backward(torch.randn(2, 20, 1, 28, 28), torch.randint(0, 10, (2, 20)),
                          (torch.ones(2, 20, 84),), torch.nn.functional.cross_entropy)
    runs = 2 if engine == "loop" else 1  # vmap: one call for both runs
    assert calls == {"fused": [("first_block", 20)] * runs,
                     "matmul": [("_first_conv_as_matmul", CPU_CHUNK),
                                ("_first_conv_as_matmul", 20 - CPU_CHUNK)] * runs,
                     "conv": []}[expected]


def test_only_the_lenet_takes_a_cpu_path_and_no_other_model_builds_the_kernels(monkeypatch):
    from initstudy.model import build_model

    def no_kernels():
        raise AssertionError("a pack of MLPs asked for the LeNet's kernels")

    monkeypatch.setattr(kernels, "kernel", no_kernels)
    pack = Pack([build_model("mlp"), build_model("mlp")], engine="loop")
    assert pack.cpu_path is None
    losses, _ = pack.forward_backward(torch.randn(2, 4, 1, 28, 28), torch.randint(0, 10, (2, 4)),
                                      (), torch.nn.functional.cross_entropy)
    assert losses.shape == (2,) and torch.isfinite(losses).all()


def test_the_bmm_engine_takes_the_lenet_and_sends_other_models_to_vmap():
    """The engine rule: one run is a loop of one; auto is the loop on a CPU and vmap on a GPU;
    bmm writes out the LeNet's layers, so it takes the LeNet and a subclass that keeps its
    scores, and any other model trains with vmap."""
    from initstudy.model import MLP
    from initstudy.pack import resolve_engine

    class Wider(LeNet):  # its own scores: bmm cannot know its layers
        def logits(self, x, cpu_path=None, chunk=CPU_CHUNK):
            return 2 * super().logits(x, cpu_path, chunk)

    class Renamed(LeNet):
        pass

    assert resolve_engine("bmm", False, 1, LeNet) == "loop"
    assert [resolve_engine("auto", cpu, 4, LeNet) for cpu in (True, False)] == ["loop", "vmap"]
    assert [resolve_engine("bmm", False, 4, m) for m in (LeNet, Renamed, Wider, MLP)] == [
        "bmm", "bmm", "vmap", "vmap"]
    with pytest.raises(ConfigError, match="unknown engine 'fast'.*loop, vmap, bmm"):
        resolve_engine("fast", True, 2, LeNet)
    pack = Pack([LeNet(), LeNet()], engine="bmm")
    assert (pack.engine, pack.cpu_path) == ("bmm", None)  # its own layers, no CPU path


def test_a_bmm_pack_trains_in_bf16_under_autocast():
    """bf16 (autocast) reaches the bmm engine's products: the scores come out in bf16, close to
    fp32's, and the fp32 weights get fp32 gradients."""
    models = [apply_scheme(LeNet(), "kaiming", seed=k) for k in range(2)]
    x, y = torch.randn(2, 8, 1, 28, 28), torch.randint(0, 10, (2, 8))
    masks = (torch.ones(2, 8, 84),)
    pack = Pack(models, engine="bmm")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = pack.logits(x, masks)
        pack.forward_backward(x, y, masks, torch.nn.functional.cross_entropy)
    assert low.dtype == torch.bfloat16
    assert torch.allclose(low.float(), pack.logits(x, masks), atol=0.1)
    assert all(p.grad.dtype == torch.float32 for p in pack.parameters())


def test_a_bmm_pack_of_another_model_says_it_trains_with_vmap(tiny_data, tmp_path, capsys):
    runs = [RunConfig(scheme="kaiming", seed=k, model="mlp:depth=2", data_dir=str(tiny_data),
                      epochs=1, batch_size=32, device="cpu", engine="bmm", diag_batch=0,
                      wandb="disabled", out=str(tmp_path / str(k))) for k in range(2)]
    # The CPU's auto would be the loop: vmap here is the fallback from bmm.
    assert all(r["status"] == "ok" for r in train_pack(runs))
    saved = json.loads((tmp_path / "0" / "config.json").read_text())
    assert saved["engine"] == "bmm" and saved["env"]["pack_engine"] == "vmap"
    assert "the bmm engine writes out the LeNet's layers only: this pack of mlp trains " \
           "with vmap" in capsys.readouterr().err
