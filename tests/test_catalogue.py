"""Catalogue networks: analytic costs against published numbers, names, errors, JSON."""

import math

import numpy as np
import pytest

from partime_sim.catalogue import (
    CATALOGUE, FLOAT_BYTES, REF_MEM_BW, REF_PEAK_FLOPS, bottleneck, conv2d, get_network, linear,
    list_networks, max_pool, roofline,
)
from partime_sim.errors import ConfigError
from partime_sim.network import Layer, Network

ALL = ["uniform:8", *CATALOGUE]


# ---- layer helpers -----------------------------------------------------------------------

def test_conv2d_counts_flops_params_and_output_shape_by_hand():
    b = conv2d("c", (3, 8, 8), 4, 3, padding=1)
    assert b.out_shape == (4, 8, 8)
    assert b.flops == 2 * (4 * 8 * 8) * (3 * 3 * 3)  # 2 x MACs
    assert b.params == 4 * 3 * 3 * 3 + 4
    assert b.act_bytes == 4 * 8 * 8 * FLOAT_BYTES
    strided = conv2d("s", (3, 9, 9), 4, 3, stride=2, bias=False, batch_norm=True)
    assert strided.out_shape == (4, 4, 4) and strided.params == 4 * 27 + 2 * 4
    grouped = conv2d("g", (8, 4, 4), 8, 3, padding=1, groups=8, bias=False)
    assert grouped.params == 8 * 9


def test_roofline_takes_the_slower_of_compute_and_memory():
    assert roofline(REF_PEAK_FLOPS, 1.0) == pytest.approx(1.0)
    assert roofline(1.0, REF_MEM_BW * 2) == pytest.approx(2.0)
    fc = linear("fc", 1000, 1000)  # 2 FLOP per 4-byte weight: memory-bound
    assert fc.time == pytest.approx(FLOAT_BYTES * (1000 + 1000 + fc.params) / REF_MEM_BW)
    big = conv2d("c", (32, 256, 256), 32, 5, padding=2)  # ~200 FLOP/byte: compute-bound
    assert big.time == pytest.approx(big.flops / REF_PEAK_FLOPS)


def test_bottleneck_adds_projection_only_when_shapes_change():
    first = bottleneck("b", (64, 56, 56), 64)  # 64 -> 256 channels: projection shortcut
    same = bottleneck("b", (256, 56, 56), 64)
    assert first.params - same.params == (256 * 64 + 2 * 256) - (64 * 256 - 64 * 64)
    down = bottleneck("d", (256, 56, 56), 128, stride=2)
    assert down.out_shape == (512, 28, 28)


def test_window_that_does_not_fit_is_a_config_error():
    with pytest.raises(ConfigError, match="larger input resolution"):
        max_pool("p", (32, 1, 1), 2)
    with pytest.raises(ConfigError, match="groups=3"):
        conv2d("g", (8, 4, 4), 8, 3, groups=3)


# ---- published numbers -------------------------------------------------------------------

@pytest.mark.parametrize("name, gmacs, mparams", [
    ("resnet50", 4.09, 25.557), ("resnet101", 7.80, 44.549), ("resnet152@224", 11.51, 60.193),
])
def test_resnets_match_torchvision_flops_and_params(name, gmacs, mparams):
    # torchvision's model card: GFLOPS (multiply-adds) and parameter counts at 224x224
    net = get_network(name)
    assert net.flops / 2 == pytest.approx(gmacs * 1e9, rel=0.02)  # 2 FLOPs per multiply-add
    assert net.param_bytes / FLOAT_BYTES == pytest.approx(mparams * 1e6, rel=1e-4)


def test_layer_counts_follow_the_pipeline_unit_rules():
    counts = {n: get_network(n).num_layers for n in ALL}
    # resnets: stem + maxpool + one layer per bottleneck + avgpool + fc
    assert counts["resnet50"] == 4 + 3 + 4 + 6 + 3
    assert counts["resnet101"] == 4 + 3 + 4 + 23 + 3
    assert counts["resnet152"] == 4 + 3 + 8 + 36 + 3
    assert counts["partime-conv30"] == 30 and counts["partime-conv300"] == 300
    assert counts["lenet"] == 7 and counts["mlp"] >= 8 and counts["uniform:8"] == 8


def test_partime_conv_nets_have_the_papers_shapes():
    conv30 = get_network("partime-conv30")
    assert conv30.input_bytes == 3 * 256 * 256 * FLOAT_BYTES
    hidden = 32 * 256 * 256 * FLOAT_BYTES  # same spatial size throughout (padding 2)
    assert [l.act_bytes for l in conv30.layers[:-1]] == [hidden] * 29
    assert conv30.layers[-1].act_bytes == 256 * 256 * FLOAT_BYTES
    assert conv30.layers[5].param_bytes == (32 * 32 * 25 + 32) * FLOAT_BYTES
    conv300 = get_network("partime-conv300")
    kinds = [l.kind for l in conv300.layers]
    assert kinds.count("maxpool") == 6 and kinds.count("conv") == 293 and kinds[-1] == "avgpool"
    assert conv300.layers[-1].act_bytes == FLOAT_BYTES  # one channel, globally pooled
    assert conv300.layers[-2].act_bytes == 4 * 4 * FLOAT_BYTES  # 256 / 2**6 = 4


def test_resolution_suffix_scales_flops_not_params():
    base, big = get_network("resnet50"), get_network("resnet50@256")
    assert big.param_bytes == base.param_bytes
    assert big.flops / base.flops == pytest.approx((256 / 224) ** 2, rel=0.05)
    assert big.input_bytes == 3 * 256 * 256 * FLOAT_BYTES and big.name == "resnet50@256"
    assert get_network("resnet152").input_bytes == 3 * 256 * 256 * FLOAT_BYTES  # PARTIME V.C
    assert get_network("resnet50@32").num_layers == 20  # CIFAR-sized input still fits


@pytest.mark.parametrize("name", ALL)
def test_every_catalogue_network_has_sane_costs(name):
    net = get_network(name)
    costs = net.costs()
    assert costs.shape == (net.num_layers, 3) and np.all(costs >= 0) and np.all(costs[:, 0] > 0)
    assert np.array_equal(costs[:, 1], costs[:, 0])  # bwd_input ~ fwd
    if name.startswith("uniform"):
        assert np.all(costs == 1e-3) and np.all(net.act_bytes() == 0)
        return
    assert np.all(net.act_bytes() > 0) and net.input_bytes > 0
    for layer in net.layers:  # weightless layers (pools) have no weight gradient
        assert (layer.bwd_weight > 0) == (layer.param_bytes > 0)
        assert layer.opt == pytest.approx(7 * layer.param_bytes / REF_MEM_BW)


def test_list_networks_rows():
    rows = list_networks()
    assert [r["name"] for r in rows] == ALL
    for row in rows:
        assert set(row) == {"name", "layers", "flops", "params", "input_shape", "description"}
        net = get_network(row["name"])
        assert row["layers"] == net.num_layers and row["params"] * FLOAT_BYTES == net.param_bytes
    by_name = {r["name"]: r for r in rows}
    assert by_name["lenet"]["params"] == 62006 and by_name["mlp"]["input_shape"] == "32"


# ---- names and errors --------------------------------------------------------------------

def test_uniform_variants():
    net = get_network("uniform:4:4096")
    assert net.num_layers == 4 and net.act_bytes().tolist() == [4096] * 4 and net.name == "uniform:4:4096"


@pytest.mark.parametrize("spec, shown", [
    ("uniform:0", "'0'"), ("uniform:x", "'x'"), ("uniform:2.5", "'2.5'"), ("uniform:4:-1", "'-1'"),
    ("uniform:", "''"), ("uniform:1:2:3", "malformed"), ("resnet50@abc", "'abc'"), ("resnet50@0", "'0'"),
    ("lenet@64", "fixed input size"), ("partime-conv300@32", "larger input resolution"),
])
def test_bad_specs_name_the_value(spec, shown):
    with pytest.raises(ConfigError, match=shown.replace(".", r"\.")):
        get_network(spec)


def test_unknown_network_lists_known_names():
    with pytest.raises(ConfigError) as err:
        get_network("resnet18")
    msg = str(err.value)
    assert "'resnet18'" in msg and all(n in msg for n in CATALOGUE) and "uniform:L" in msg


def test_json_file_round_trip_and_errors(tmp_path):
    net = get_network("lenet")
    net = Network(net.name, net.layers, net.input_bytes, {"cpu": tuple((1.0, 2.0, 3.0) for _ in net.layers)})
    path = tmp_path / "lenet.json"
    net.save(path)
    assert get_network(str(path)) == net
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        get_network(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        get_network(str(tmp_path / "missing.json"))
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"name": "x"}')
    with pytest.raises(ConfigError, match="missing or has a bad field"):
        get_network(str(wrong))


def test_negative_cost_in_json_names_the_value(tmp_path):
    data = get_network("uniform:2").to_dict()
    data["layers"][1]["bwd_input"] = -0.5
    path = tmp_path / "neg.json"
    path.write_text(__import__("json").dumps(data))
    with pytest.raises(ConfigError, match=r"bwd_input=-0\.5"):
        get_network(str(path))
    with pytest.raises(ConfigError, match=r"fwd=-1"):
        Layer("l", -1, 0, 0)


# ---- heterogeneous devices ---------------------------------------------------------------

def test_speed_scales_costs_and_class_costs_override():
    net = get_network("partime-conv30")
    ref = net.costs()
    assert np.allclose(net.costs("fast-gpu", speed=2.0), ref / 2)
    measured = tuple((float(i), 0.5, 0.25) for i in range(net.num_layers))
    het = Network(net.name, net.layers, net.input_bytes, {"cpu-core": measured})
    assert np.array_equal(het.costs("cpu-core", speed=123.0), np.array(measured))  # speed ignored
    assert np.allclose(het.costs("h100-sxm", speed=2.0), ref / 2)  # other classes still scale
    with pytest.raises(ConfigError, match="speed=0"):
        net.costs("x", speed=0)


# ---- cross-check against torch (skipped without torch) -----------------------------------

def _torch_units(model, x):
    """Output numel of every weight/pool module (activations are fused into them here)."""
    import torch

    sizes = []
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(o.numel()))
             for m in model.modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.MaxPool2d, torch.nn.AdaptiveAvgPool2d))]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return sizes, sum(p.numel() for p in model.parameters())


def test_conv300_and_lenet_match_torch_modules():
    torch = pytest.importorskip("torch")
    nn = torch.nn
    # PARTIME experimentB.generate_network(300, pool_every=50), at 64x64 to stay fast
    mods = [nn.Conv2d(3, 32, 5, padding=2), nn.ReLU()]
    for i in range(297):
        mods += [nn.MaxPool2d(2, 2)] if i % 50 == 0 else [nn.Conv2d(32, 32, 5, padding=2), nn.ReLU()]
    mods += [nn.Conv2d(32, 1, 5, padding=2), nn.Sigmoid(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    sizes, params = _torch_units(nn.Sequential(*mods), torch.zeros(1, 3, 64, 64))
    net = get_network("partime-conv300@64")
    assert [l.act_bytes // FLOAT_BYTES for l in net.layers] == sizes
    assert net.param_bytes // FLOAT_BYTES == params
    # PARTIME experimentD.gen_net (LeNet-style)
    lenet = nn.Sequential(nn.Conv2d(3, 6, 5), nn.MaxPool2d(2, 2), nn.Conv2d(6, 16, 5), nn.MaxPool2d(2, 2),
                          nn.Flatten(), nn.Linear(400, 120), nn.Linear(120, 84), nn.Linear(84, 10))
    sizes, params = _torch_units(lenet, torch.zeros(1, 3, 32, 32))
    net = get_network("lenet")
    assert [l.act_bytes // FLOAT_BYTES for l in net.layers] == sizes and net.param_bytes // FLOAT_BYTES == params
    assert math.prod((3, 32, 32)) * FLOAT_BYTES == net.input_bytes
