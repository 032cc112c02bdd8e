"""torch_networks: catalogue specs and user factories as torch nn.Sequential models that match
the catalogue's layers (names, parameter counts, activation sizes)."""

import textwrap

import pytest
import torch
from torch import nn

from partime_sim.catalogue import FLOAT_BYTES, get_network
from partime_sim.errors import ConfigError
from partime_sim.torch_networks import (
    Bottleneck, ResolvedModel, build_network_model, catalogue_input_shape, child_name, load_factory,
    resolve_model,
)

SMALL = ["resnet50@64", "partime-conv300@64", "partime-conv30@32", "mlp", "lenet", "uniform:3:64"]
TORCHVISION_PARAMS = {"resnet50": 25_557_032, "resnet101": 44_549_160, "resnet152": 60_192_808}


def output_bytes(model: nn.Sequential, shape) -> list[int]:
    """Per-child output size of one zero sample, in float32 bytes."""
    x = torch.zeros((1, *shape))
    sizes = []
    model.eval()
    with torch.no_grad():
        for child in model:
            x = child(x)
            sizes.append(x[0].numel() * FLOAT_BYTES)
    return sizes


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("spec", SMALL)
def test_children_are_the_catalogue_layers(spec):
    model, net = build_network_model(spec), get_network(spec)
    assert [name for name, _ in model.named_children()] == [child_name(layer.name) for layer in net.layers]
    assert output_bytes(model, catalogue_input_shape(spec)) == list(net.act_bytes())
    if not spec.startswith("uniform:"):  # the catalogue's uniform:L has no input size
        assert FLOAT_BYTES * torch.Size(catalogue_input_shape(spec)).numel() == net.input_bytes


@pytest.mark.parametrize("spec", ["resnet50@64", "resnet101@64", "resnet152@64", "partime-conv300@64",
                                  "partime-conv30", "mlp", "lenet"])
def test_parameter_counts_match_the_catalogue(spec):
    model, net = build_network_model(spec), get_network(spec)
    assert n_params(model) == net.param_bytes // FLOAT_BYTES
    for (_, child), layer in zip(model.named_children(), net.layers):
        assert n_params(child) * FLOAT_BYTES == layer.param_bytes, layer.name
    if spec.partition("@")[0] in TORCHVISION_PARAMS:
        assert n_params(model) == TORCHVISION_PARAMS[spec.partition("@")[0]]


def test_resnet_structure_is_torchvision_v15():
    model = build_network_model("resnet50@64")
    names = [name for name, _ in model.named_children()]
    assert names[:3] == ["stem", "maxpool", "layer1_0"] and names[-3:] == ["layer4_2", "avgpool", "fc"]
    first = model.layer2_0
    assert isinstance(first, Bottleneck) and first.conv2.stride == (2, 2) and first.conv1.stride == (1, 1)
    assert first.downsample is not None and model.layer2_1.downsample is None
    assert model.fc.in_features == 2048 and model.fc.out_features == 1000


def test_partime_conv_layers():
    model = build_network_model("partime-conv30@16")
    assert len(model) == 30
    conv0, last = model.conv0, model.conv29
    assert isinstance(conv0[1], nn.ReLU) and (conv0[0].in_channels, conv0[0].out_channels) == (3, 32)
    assert conv0[0].kernel_size == (5, 5) and conv0[0].padding == (2, 2)
    assert isinstance(last[1], nn.Sigmoid) and last[0].out_channels == 1
    big = build_network_model("partime-conv300@64")
    assert sum(isinstance(c, nn.MaxPool2d) for c in big) == 6 and isinstance(big.conv_out[1], nn.Sigmoid)


def test_seed_determinism_and_global_rng_untouched():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b = build_network_model("partime-conv30@16", seed=3), build_network_model("partime-conv30@16", seed=3)
    c = build_network_model("partime-conv30@16", seed=4)
    assert torch.equal(torch.get_rng_state(), before)
    for (ka, va), (kb, vb), (_, vc) in zip(a.state_dict().items(), b.state_dict().items(), c.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert not torch.equal(a.conv0[0].weight, c.conv0[0].weight)
    r1, r2 = build_network_model("resnet50@64", seed=1), build_network_model("resnet50@64", seed=1)
    assert torch.equal(r1.layer3_0.conv2.weight, r2.layer3_0.conv2.weight)


def test_dtype():
    model = build_network_model("partime-conv30@16", dtype="float64")
    assert all(p.dtype == torch.float64 for p in model.parameters())
    f32 = build_network_model("partime-conv30@16")
    assert torch.equal(model.conv0[0].weight.float(), f32.conv0[0].weight)


def test_catalogue_input_shape():
    assert catalogue_input_shape("resnet152") == (3, 256, 256)
    assert catalogue_input_shape("resnet50@96") == (3, 96, 96)
    assert catalogue_input_shape("mlp") == (32,)
    assert catalogue_input_shape("uniform:2:64") == (16,)


@pytest.mark.parametrize("spec, words", [("nope", ["'nope'"]), ("resnet50@x", ["'x'"]),
                                         ("lenet@64", ["@64"])])
def test_bad_catalogue_specs(spec, words):
    with pytest.raises(ConfigError) as err:
        build_network_model(spec)
    assert all(w in str(err.value) for w in words)


def test_resolve_catalogue():
    r = resolve_model("resnet50@64", seed=2)
    assert isinstance(r, ResolvedModel)
    assert r.input_shape == (3, 64, 64) and r.name == "resnet50@64" and r.network == get_network("resnet50@64")
    assert len(r.model) == r.network.num_layers
    assert resolve_model("lenet", input_shape=[3, 32, 32]).input_shape == (3, 32, 32)
    with pytest.raises(ConfigError, match=r"\(3, 32, 32\).*\(3, 32, 31\)"):
        resolve_model("lenet", input_shape=(3, 32, 31))


# ---- factories ---------------------------------------------------------------------------

FACTORY = """
import torch
from torch import nn

def make():
    return nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))

def make_with_shape():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)), (3, 8, 8)

def make_module():
    return nn.Linear(2, 2)

def boom():
    raise RuntimeError("no GPU here")

NOT_A_FUNCTION = 3
"""


@pytest.fixture
def factory_file(tmp_path):
    path = tmp_path / "user_net.py"
    path.write_text(textwrap.dedent(FACTORY))
    return path


def test_load_factory(factory_file):
    model = load_factory(f"{factory_file}:make")
    assert isinstance(model, nn.Sequential) and len(model) == 3
    same = load_factory(f"{factory_file}:make", seed=0)
    assert torch.equal(model[0].weight, same[0].weight)  # seeded
    assert not torch.equal(model[0].weight, load_factory(f"{factory_file}:make", seed=1)[0].weight)
    assert isinstance(load_factory(f"{factory_file}:make_with_shape"), nn.Sequential)  # tuple: model part


def test_resolve_factory(factory_file):
    r = resolve_model(f"{factory_file}:make", input_shape=(8,))
    assert r.input_shape == (8,) and r.name == f"{factory_file}:make"
    net = r.network
    assert [layer.name for layer in net.layers] == ["0", "1", "2"]
    assert list(net.act_bytes()) == [16, 16, 8] and net.input_bytes == 32
    assert [layer.param_bytes for layer in net.layers] == [36 * 4, 0, 10 * 4]
    assert all(layer.fwd == layer.bwd_input == layer.bwd_weight == 0 for layer in net.layers)

    r = resolve_model(f"{factory_file}:make_with_shape", dtype="float64")
    assert r.input_shape == (3, 8, 8) and list(r.network.act_bytes()) == [4 * 144, 4 * 144, 4 * 144, 4 * 5]
    assert r.model[0].weight.dtype == torch.float64
    assert r.model.training and r.model[1].num_batches_tracked.item() == 0  # measuring left no trace
    assert resolve_model(f"{factory_file}:make_with_shape", input_shape=(3, 8, 8)).input_shape == (3, 8, 8)


@pytest.mark.parametrize("suffix, words", [
    (":missing", ["'missing'", "make"]),
    (":NOT_A_FUNCTION", ["'NOT_A_FUNCTION'", "type int"]),
    (":make_module", ["make_module", "Linear", "nn.Sequential"]),
    (":boom", ["boom", "no GPU here", "RuntimeError"]),
    ("", ["user_net.py", "path/to/module.py:factory"]),
])
def test_factory_errors(factory_file, suffix, words):
    with pytest.raises(ConfigError) as err:
        load_factory(f"{factory_file}{suffix}")
    assert all(w in str(err.value) for w in words), str(err.value)


def test_factory_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="nowhere.py.*does not exist"):
        load_factory(f"{tmp_path}/nowhere.py:make")
    (tmp_path / "net.txt").write_text("")
    with pytest.raises(ConfigError, match=r"net\.txt.*not a \.py"):
        load_factory(f"{tmp_path}/net.txt:make")
    (tmp_path / "broken.py").write_text("import no_such_module_here\n")
    with pytest.raises(ConfigError, match="broken.py.*no_such_module_here"):
        load_factory(f"{tmp_path}/broken.py:make")


def test_resolve_factory_shape_errors(factory_file):
    with pytest.raises(ConfigError, match="--input-shape") as err:
        resolve_model(f"{factory_file}:make")
    assert "make" in str(err.value)
    with pytest.raises(ConfigError, match=r"\(3, 8, 8\).*\(3, 9, 9\)"):
        resolve_model(f"{factory_file}:make_with_shape", input_shape=(3, 9, 9))
    with pytest.raises(ConfigError, match=r"'0'.*\(7,\)"):
        resolve_model(f"{factory_file}:make", input_shape=(7,))
    with pytest.raises(ConfigError, match=r"\(0, 3\)"):
        resolve_model(f"{factory_file}:make", input_shape=(0, 3))
