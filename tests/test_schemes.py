"""Each built-in scheme against its formula, on the real layers of the document's LeNet, of a
plain MLP and of a plain CNN."""

import math
import textwrap

import pytest
import torch
import torch.nn as nn

from initstudy import LeNet, apply_scheme
from initstudy.errors import SchemeError
from initstudy.model import build_model, init_layers
from initstudy.schemes import DEFAULT_SCHEMES, SCHEMES, resolve


MODELS = ["lenet", "mlp:depth=4,width=200", "cnn:depth=3,channels=32"]


@pytest.fixture(params=MODELS)
def model(request) -> str:
    return request.param


def layers(spec: str, seed: int = 0, model: str = "lenet"):
    return init_layers(apply_scheme(build_model(model), spec, seed=seed))


def fans(weight: torch.Tensor) -> tuple[int, int]:
    receptive = weight[0, 0].numel() if weight.dim() > 2 else 1
    return weight.shape[1] * receptive, weight.shape[0] * receptive


def std_tolerance(weight: torch.Tensor) -> float:
    """Relative tolerance for a sample std: 4 standard errors (1/sqrt(2n)), at least 3%."""
    return max(0.03, 4 / math.sqrt(2 * weight.numel()))


@pytest.mark.parametrize("spec,gain", [("kaiming", math.sqrt(2)),
                                       ("kaiming_normal:nonlinearity=relu", math.sqrt(2)),
                                       ("kaiming_normal", math.sqrt(2)),  # leaky_relu, a=0
                                       ("kaiming_normal:a=1", 1.0)])
def test_kaiming_normal_std_is_gain_over_sqrt_fan_in(spec, gain, model):
    for name, layer in layers(spec, model=model):
        fan_in, _ = fans(layer.weight)
        expected = gain / math.sqrt(fan_in)
        assert layer.weight.std().item() == pytest.approx(expected,
                                                          rel=std_tolerance(layer.weight)), name
        assert layer.weight.mean().abs().item() < 0.1 * expected
        assert (layer.bias == 0).all()


def test_kaiming_uniform_fan_out_bound(model):
    for name, layer in layers("kaiming_uniform:a=0.1,mode=fan_out", model=model):
        _, fan_out = fans(layer.weight)
        bound = math.sqrt(3) * math.sqrt(2 / (1 + 0.1 ** 2)) / math.sqrt(fan_out)
        assert layer.weight.abs().max().item() <= bound
        assert layer.weight.abs().max().item() > 0.95 * bound, name


@pytest.mark.parametrize("spec,gain", [("xavier", 1.0), ("xavier_uniform:gain=2", 2.0)])
def test_xavier_uniform_bound(spec, gain, model):
    for name, layer in layers(spec, model=model):
        fan_in, fan_out = fans(layer.weight)
        bound = gain * math.sqrt(6 / (fan_in + fan_out))
        assert layer.weight.abs().max().item() <= bound
        assert layer.weight.abs().max().item() > 0.95 * bound, name


def test_xavier_normal_std(model):
    for name, layer in layers("xavier_normal", model=model):
        fan_in, fan_out = fans(layer.weight)
        expected = math.sqrt(2 / (fan_in + fan_out))
        assert layer.weight.std().item() == pytest.approx(expected,
                                                          rel=std_tolerance(layer.weight)), name


@pytest.mark.parametrize("gain", [1.0, 0.5])
def test_orthogonal_rows_or_columns_are_orthonormal(gain, model):
    for name, layer in layers(f"orthogonal:gain={gain}", model=model):
        w = layer.weight.reshape(layer.weight.shape[0], -1).double() / gain
        gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        assert torch.allclose(gram, torch.eye(len(gram), dtype=gram.dtype), atol=1e-5), name


def test_custom_is_the_documents_rule_exactly(model):
    custom = dict(layers("custom", seed=4, model=model))
    default = dict(layers("default", seed=4, model=model))
    for name, layer in custom.items():
        if isinstance(layer, nn.Conv2d):
            assert layer.weight.std().item() == pytest.approx(0.5, rel=std_tolerance(layer.weight))
            assert torch.equal(layer.bias, default[name].bias)  # conv bias untouched
        else:
            assert layer.weight.min() >= -0.1 and layer.weight.max() <= 0.1
            assert layer.weight.max() > 0.09 and layer.weight.min() < -0.09
            assert (layer.bias == 0.1).all()


def test_custom_matches_the_documents_code_run_by_hand():
    torch.manual_seed(3)
    model = LeNet()

    def init_weights(layer):  # the document's function
        if type(layer) == nn.Conv2d:
            nn.init.normal_(layer.weight, mean=0, std=0.5)
        elif type(layer) == nn.Linear:
            nn.init.uniform_(layer.weight, a=-0.1, b=0.1)
            nn.init.constant_(layer.bias, 0.1)

    model.apply(init_weights)
    ours = apply_scheme(LeNet(), "custom", seed=3)
    for a, b in zip(model.state_dict().values(), ours.state_dict().values()):
        assert torch.equal(a, b)


def test_default_is_pytorchs_own_init_seeded():
    torch.manual_seed(7)
    constructed = LeNet()
    ours = apply_scheme(LeNet(), "default", seed=7)
    for a, b in zip(constructed.state_dict().values(), ours.state_dict().values()):
        assert torch.equal(a, b)


def test_normal_is_standard_normal_with_zero_biases(model):
    for name, layer in layers("normal", model=model):
        assert layer.weight.std().item() == pytest.approx(1.0, rel=std_tolerance(layer.weight))
        assert (layer.bias == 0).all()
    for name, layer in layers("normal:std=0.01,mean=0.5", model=model):
        assert layer.weight.mean().item() == pytest.approx(0.5, abs=0.002)


def test_uniform_and_trunc_normal_stay_in_their_bounds(model):
    for _, layer in layers("uniform:a=-0.3,b=0.2", model=model):
        assert layer.weight.min() >= -0.3 and layer.weight.max() <= 0.2
    for _, layer in layers("trunc_normal:std=1,a=-0.5,b=0.5", model=model):
        assert layer.weight.min() >= -0.5 and layer.weight.max() <= 0.5


def test_constant_ones_zeros_and_bias_policies(model):
    for _, layer in layers("constant:val=0.25,bias=-1", model=model):
        assert (layer.weight == 0.25).all() and (layer.bias == -1).all()
    for _, layer in layers("ones", model=model):
        assert (layer.weight == 1).all() and (layer.bias == 0).all()
    for _, layer in layers("zeros", model=model):
        assert (layer.weight == 0).all() and (layer.bias == 0).all()
    default = dict(layers("default", seed=2, model=model))
    for name, layer in layers("zeros:bias=keep", seed=2, model=model):
        assert torch.equal(layer.bias, default[name].bias)


@pytest.mark.parametrize("spec", ["eye", "dirac"])
def test_identity_schemes_dirac_on_convs_eye_on_linears(spec, model):
    for name, layer in layers(spec, model=model):
        w = layer.weight
        if w.dim() == 4:
            expected = torch.zeros_like(w)
            for i in range(min(w.shape[0], w.shape[1])):
                expected[i, i, w.shape[2] // 2, w.shape[3] // 2] = 1  # the kernel's centre tap
        else:
            expected = torch.eye(*w.shape)
        assert torch.equal(w, expected), name


def test_dirac_groups():
    conv = dict(layers("dirac:groups=2"))["features.3"].weight  # 128 in, 128 out
    assert conv.sum().item() == 64 * 2  # each group of 64 outputs passes 64 inputs through


def test_sparse_zeros_a_fraction_of_each_column(model):
    for name, layer in layers("sparse:sparsity=0.5,std=0.02", model=model):
        w = layer.weight.reshape(layer.weight.shape[0], -1)
        zeros_per_column = (w == 0).sum(0)
        assert (zeros_per_column == math.ceil(0.5 * w.shape[0])).all(), name


@pytest.mark.parametrize("name", list(SCHEMES))
def test_every_scheme_applies_and_is_bit_reproducible(name, model):
    spec = "constant:val=0.5" if name == "constant" else name
    images = lambda n: torch.randn(n, 1, 28, 28)  # for lsuv; drawn in the seeded fork too
    a = apply_scheme(build_model(model), spec, seed=11, data=images).state_dict()
    b = apply_scheme(build_model(model), spec, seed=11, data=images).state_dict()
    for key in a:
        assert torch.isfinite(a[key]).all()
        assert torch.equal(a[key], b[key]), key


def test_different_seeds_differ_and_the_callers_rng_is_untouched():
    model = LeNet()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = apply_scheme(model, "kaiming", seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    b = apply_scheme(LeNet(), "kaiming", seed=1)
    assert not torch.equal(a.features[0].weight, b.features[0].weight)


def test_the_six_default_schemes_are_registered():
    assert set(DEFAULT_SCHEMES) <= set(SCHEMES)
    documents_table = {"uniform", "normal", "constant", "ones", "zeros", "eye", "dirac",
                       "xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal",
                       "orthogonal", "trunc_normal", "sparse"}
    assert documents_table <= set(SCHEMES)


@pytest.mark.parametrize("spec,fragments", [
    ("nope", ["unknown scheme 'nope'", "kaiming", "orthogonal", "custom"]),
    ("normal:sd=0.1", ["no parameter 'sd'", "mean, std, bias"]),
    ("normal:std=abc", ["bad value 'abc'", "a number"]),
    ("kaiming:mode=fan_mid", ["bad value 'fan_mid'", "fan_in or fan_out"]),
    ("kaiming:nonlinearity=gelu", ["bad value 'gelu'", "relu"]),
    ("normal:bias=sometimes", ["zeros, keep or a number"]),
    ("normal:std", ["needs a value"]),
    ("constant", ["needs val"]),
    ("normal:std=inf", ["bad value 'inf'"]),
])
def test_bad_specs_say_what_is_accepted(spec, fragments):
    with pytest.raises(SchemeError) as info:
        resolve(spec)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_failing_scheme_is_a_scheme_error():
    with pytest.raises(SchemeError, match="dirac:groups=3"):  # 128 channels not divisible by 3
        apply_scheme(LeNet(), "dirac:groups=3")


def test_user_function_from_a_module_and_from_a_file(tmp_path, monkeypatch):
    source = textwrap.dedent("""
        import torch.nn as nn
        def init_weights(layer):
            if type(layer) == nn.Linear:
                nn.init.constant_(layer.weight, 0.5)
                nn.init.normal_(layer.bias)
    """)
    (tmp_path / "my_inits.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    by_module = apply_scheme(LeNet(), "my_inits:init_weights", seed=5)
    by_file = apply_scheme(LeNet(), str(tmp_path / "my_inits.py") + ":init_weights", seed=5)
    default = apply_scheme(LeNet(), "default", seed=5)
    for model in (by_module, by_file):
        assert (model.classifer[1].weight == 0.5).all()
        assert torch.equal(model.features[0].weight, default.features[0].weight)
    # The user's draws come from the init seed too.
    assert torch.equal(by_module.classifer[1].bias, by_file.classifer[1].bias)


@pytest.mark.parametrize("spec,fragment", [
    ("no_such_module_xyz:init", "no importable module"),
    ("missing_file.py:init", "not found"),
    ("math:no_such_function", "has no 'no_such_function'"),
])
def test_user_function_errors(spec, fragment):
    with pytest.raises(SchemeError, match=fragment):
        resolve(spec)
