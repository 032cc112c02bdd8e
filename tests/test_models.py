"""Models: catalogue builders, stage splitting, torch -> JAX conversion (float64, exact to rounding)."""

import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from torch import nn

from partime_sim.catalogue import get_network
from partime_sim.errors import ConfigError, PartitionError
from partime_sim.models import (
    UNIFORM_WIDTH, build_torch_model, check_stage_shapes, input_shape, num_classes, num_outputs,
    params_to_torch, split_stages, stage_to_jax, to_jax,
)
from partime_sim.partition import Partition, even_partition

RTOL = 1e-12


@pytest.fixture
def x64():
    """JAX in float64 for the test, restored afterwards."""
    old = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", old)


def close(got, want, rtol=RTOL):
    """Relative agreement; the absolute floor is rtol times the array's scale (entries near 0)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(np.abs(want).max(), 1e-300))


def grads_like(module, grads):
    """A pytree shaped like to_jax's params holding ``grads[id(parameter)]``."""
    if isinstance(module, nn.Sequential):
        return [grads_like(child, grads) for child in module]
    return {name: grads[id(p)] for name, p in module.named_parameters(recurse=False)}


def same_as_torch(module, shape, seed=0):
    """Forward and VJP (input and every parameter) of the converted module, jitted, equal torch's
    in float64 on a random input and cotangent."""
    module = module.double()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, dtype=torch.float64, generator=gen, requires_grad=True)
    out = module(x)
    ct = torch.randn(out.shape, dtype=torch.float64, generator=gen)
    params_t = list(module.parameters())
    gx_t, *gp_t = torch.autograd.grad(out, [x, *params_t], ct, allow_unused=True)
    params, fn = to_jax(module)

    @jax.jit
    def forward_and_vjp(p, x, ct):
        y, vjp = jax.vjp(fn, p, x)
        return y, *vjp(ct)

    y, gp, gx = forward_and_vjp(params, x.detach().numpy(), ct.numpy())
    close(y, out.detach().numpy())
    close(gx, gx_t.numpy())
    want = grads_like(module, {id(p): g.numpy() for p, g in zip(params_t, gp_t)})
    jax.tree.map(close, gp, want)


# ---- every supported layer ------------------------------------------------------------------

LAYERS = {
    "linear": (lambda: nn.Linear(5, 7), (4, 5)),
    "linear-nobias": (lambda: nn.Linear(5, 7, bias=False), (4, 5)),
    "linear-3d": (lambda: nn.Linear(5, 3), (2, 4, 5)),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3), (2, 3, 8, 9)),
    "conv2d-unbatched": (lambda: nn.Conv2d(3, 4, 3, padding=1), (3, 8, 9)),
    "relu": (nn.ReLU, (3, 10)),
    "leaky_relu": (lambda: nn.LeakyReLU(0.2), (3, 10)),
    "tanh": (nn.Tanh, (3, 10)),
    "sigmoid": (nn.Sigmoid, (3, 10)),
    "gelu": (nn.GELU, (3, 10)),
    "gelu-tanh": (lambda: nn.GELU(approximate="tanh"), (3, 10)),
    "maxpool2d": (lambda: nn.MaxPool2d(2), (2, 3, 8, 8)),
    "avgpool2d": (lambda: nn.AvgPool2d(3, 2, 1), (2, 3, 8, 7)),
    "adaptive-1": (lambda: nn.AdaptiveAvgPool2d(1), (2, 3, 6, 4)),
    "adaptive-divides": (lambda: nn.AdaptiveAvgPool2d((3, 2)), (2, 3, 6, 4)),
    "adaptive-uneven": (lambda: nn.AdaptiveAvgPool2d((4, None)), (2, 3, 7, 5)),
    "flatten": (nn.Flatten, (2, 3, 4, 5)),
    "flatten-dims": (lambda: nn.Flatten(0, 2), (2, 3, 4, 5)),
    "unflatten": (lambda: nn.Unflatten(1, (2, -1)), (3, 12)),
    "layer_norm": (lambda: nn.LayerNorm(6), (4, 6)),
    "layer_norm-2d-noaffine": (lambda: nn.LayerNorm((3, 4), eps=1e-3, elementwise_affine=False), (2, 3, 4)),
    "layer_norm-nobias": (lambda: nn.LayerNorm(6, bias=False), (4, 6)),
    "identity": (nn.Identity, (3, 4)),
    "dropout-eval": (lambda: nn.Dropout(0.5).eval(), (3, 4)),
    "dropout2d-eval": (lambda: nn.Dropout2d(0.5).eval(), (2, 3, 4, 4)),
    "nested": (lambda: nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(12, 5)), nn.Tanh(),
                                     nn.Sequential(nn.Linear(5, 3))), (2, 3, 2, 2)),
}


@pytest.mark.parametrize("name", LAYERS)
def test_every_supported_layer_matches_torch_forward_and_vjp(x64, name):
    make, shape = LAYERS[name]
    torch.manual_seed(0)
    module = make()
    with torch.no_grad():  # non-trivial affine parameters where torch initialises them to 1 / 0
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    same_as_torch(module, shape)


def test_elementwise_layers_hold_far_into_the_tails(x64):
    x = np.linspace(-8, 8, 1601)
    for module in (nn.GELU(), nn.GELU(approximate="tanh"), nn.Sigmoid(), nn.Tanh(), nn.LeakyReLU(0.01)):
        params, fn = to_jax(module)
        close(fn(params, x), module(torch.from_numpy(x)).numpy())


def random_conv(rng):
    groups = int(rng.integers(1, 4))
    k = tuple(int(v) for v in rng.integers(1, 5, 2))
    dilation = tuple(int(v) for v in rng.integers(1, 3, 2))
    stride = tuple(int(v) for v in rng.integers(1, 4, 2))
    padding = [int(rng.integers(0, 3)), tuple(int(v) for v in rng.integers(0, 3, 2)), "valid", "same"][rng.integers(4)]
    if padding == "same":
        stride = (1, 1)  # torch allows 'same' only with stride 1
    mode = ["zeros", "zeros", "reflect", "replicate", "circular"][rng.integers(5)]
    conv = nn.Conv2d(groups * int(rng.integers(1, 3)), groups * int(rng.integers(1, 3)), k, stride, padding,
                     dilation, groups, bias=bool(rng.integers(2)), padding_mode=mode)
    return conv, (2, conv.in_channels, int(rng.integers(8, 12)), int(rng.integers(8, 12)))


def random_pool(rng):
    k = tuple(int(v) for v in rng.integers(1, 4, 2))
    stride = None if rng.integers(3) == 0 else tuple(int(v) for v in rng.integers(1, 4, 2))
    padding = tuple(int(rng.integers(0, kk // 2 + 1)) for kk in k)
    ceil = bool(rng.integers(2))
    if rng.integers(2):
        pool = nn.MaxPool2d(k, stride, padding, dilation=tuple(int(v) for v in rng.integers(1, 3, 2)), ceil_mode=ceil)
    else:
        pool = nn.AvgPool2d(k, stride, padding, ceil_mode=ceil, count_include_pad=bool(rng.integers(2)),
                            divisor_override=None if rng.integers(3) else int(rng.integers(1, 6)))
    return pool, (2, 3, int(rng.integers(5, 10)), int(rng.integers(5, 10)))


@pytest.mark.parametrize("seed", range(8))
def test_random_conv2d_configurations_match_torch(x64, seed):
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    conv, shape = random_conv(rng)
    same_as_torch(conv, shape, seed)


@pytest.mark.parametrize("seed", range(8))
def test_random_pool_configurations_match_torch(x64, seed):
    pool, shape = random_pool(np.random.default_rng(100 + seed))
    same_as_torch(pool, shape, seed)  # max-pool gradients go to the same (unique) argmax


@pytest.mark.parametrize("network", ["mlp", "lenet"])
def test_whole_catalogue_models_match_torch_forward_and_backward(x64, network):
    model = build_torch_model(network, seed=3, dtype="float64")
    same_as_torch(model, (2, *input_shape(network)), seed=3)


def test_apply_fn_vmaps_over_stacked_seeds(x64):
    models = [build_torch_model("mlp", seed=s, dtype="float64") for s in range(3)]
    converted = [to_jax(m) for m in models]
    assert all(fn is converted[0][1] for _, fn in converted)  # one apply function per architecture
    stacked = jax.tree.map(lambda *a: np.stack(a), *[p for p, _ in converted])
    x = np.random.default_rng(0).standard_normal((4, 32))
    out = jax.jit(jax.vmap(converted[0][1], in_axes=(0, None)))(stacked, x)
    for s, m in enumerate(models):
        close(out[s], m(torch.from_numpy(x)).detach().numpy())


def test_float32_models_convert_without_x64():
    model = build_torch_model("mlp", seed=0)
    params, fn = to_jax(model)
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(params))
    x = torch.randn(2, 32)
    got = jax.jit(fn)(params, x.numpy())
    assert got.dtype == np.float32
    np.testing.assert_allclose(np.asarray(got), model(x).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_float64_model_without_x64_is_refused_not_rounded():
    assert not jax.config.read("jax_enable_x64")
    with pytest.raises(ConfigError, match="x64"):
        to_jax(nn.Linear(2, 2).double())
    with jax.enable_x64(True):  # the fix the message proposes
        params, _ = to_jax(nn.Linear(2, 2).double())
    assert params["weight"].dtype == np.float64


# ---- round trip -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_round_trip_torch_jax_torch_is_bit_identical(x64, dtype):
    src = build_torch_model("lenet", seed=5, dtype=dtype)
    dst = build_torch_model("lenet", seed=6, dtype=dtype)
    params, _ = to_jax(src)
    params_to_torch(params, dst)
    for (name, a), (_, b) in zip(src.named_parameters(), dst.named_parameters()):
        assert torch.equal(a, b), name
    # and values changed on the JAX side land in torch exactly
    moved = jax.tree.map(lambda a: np.asarray(a) * 0.5 + 1.0, params)
    params_to_torch(moved, dst)
    back = grads_like(dst, {id(p): p.detach().numpy() for p in dst.parameters()})
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), moved, back)


def test_params_of_another_architecture_are_refused():
    params, _ = to_jax(build_torch_model("mlp"))
    with pytest.raises(ConfigError, match="list of 7"):
        params_to_torch(params, build_torch_model("lenet"))
    params[0][0]["weight"] = params[0][0]["weight"][:, :5]
    with pytest.raises(ConfigError, match=r"shape \(64, 5\)"):
        params_to_torch(params, build_torch_model("mlp"))


# ---- refusals -------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, name", [(nn.BatchNorm2d(3), "BatchNorm2d"), (nn.LSTM(4, 4), "LSTM"),
                                       (nn.Softmax(dim=1), "Softmax")])
def test_unsupported_layer_is_named_with_its_path(bad, name):
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), bad))
    with pytest.raises(ConfigError, match=rf"'1\.1' \({name}\).*supported layers: Sequential, Linear, Conv2d"):
        to_jax(model)


def test_subclass_with_its_own_forward_is_refused_but_plain_subclass_accepted():
    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    class MyNet(nn.Sequential):
        pass

    with pytest.raises(ConfigError, match=r"\(Doubled\)"):
        to_jax(nn.Sequential(Doubled(2, 2)))
    params, fn = to_jax(MyNet(nn.Linear(2, 3)))
    assert np.asarray(fn(params, np.ones((1, 2), np.float32))).shape == (1, 3)


def test_dropout_in_training_mode_and_pool_indices_are_refused():
    with pytest.raises(ConfigError, match=r"\.eval\(\)"):
        to_jax(nn.Sequential(nn.Dropout(0.1)))
    to_jax(nn.Dropout(0.0))  # p = 0 is the identity even in training mode
    with pytest.raises(ConfigError, match="return_indices"):
        to_jax(nn.MaxPool2d(2, return_indices=True))


# ---- catalogue models and stages ------------------------------------------------------------

@pytest.mark.parametrize("network", ["mlp", "lenet", "uniform:5", "uniform:3:128"])
def test_children_are_the_catalogue_layers(network):
    model = build_torch_model(network)
    layers = get_network(network).layers
    assert [name for name, _ in model.named_children()] == [layer.name for layer in layers]
    shapes = check_stage_shapes(list(model), input_shape(network))  # one stage per layer
    assert [4 * int(np.prod(s)) for s in shapes] == [layer.act_bytes or 4 * UNIFORM_WIDTH for layer in layers]
    assert shapes[-1] == (num_outputs(network),)


def test_shapes_outputs_and_widths():
    assert input_shape("mlp") == (32,) and input_shape("lenet") == (3, 32, 32)
    assert num_classes("mlp") == num_classes("lenet") == 10
    assert input_shape("uniform:4") == (16,) and num_classes("uniform:4") is None
    assert input_shape("uniform:4:128") == (32,) and num_outputs("uniform:4:128") == 32
    with pytest.raises(ConfigError, match="multiple of 4"):
        input_shape("uniform:4:6")


@pytest.mark.parametrize("network", ["resnet152", "partime-conv30", "nonsense"])
def test_untrainable_or_unknown_network_lists_the_trainable_ones(network):
    with pytest.raises(ConfigError, match=rf"{network}.*mlp, lenet, uniform:L"):
        build_torch_model(network)


def test_initialisation_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    a, b, c = build_torch_model("mlp", 1), build_torch_model("mlp", 1), build_torch_model("mlp", 2)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.fc0[0].weight, c.fc0[0].weight)
    d = build_torch_model("mlp", 1, dtype=torch.float64)
    assert d.fc0[0].weight.dtype == torch.float64
    assert torch.equal(d.fc0[0].weight, a.fc0[0].weight.double())  # same values in either dtype
    with pytest.raises(ConfigError, match="seed"):
        build_torch_model("mlp", -1)
    with pytest.raises(ConfigError, match="float16"):
        build_torch_model("mlp", dtype=torch.float16)


def test_split_stages_then_convert_is_transparent(x64):
    model = build_torch_model("lenet", seed=2, dtype="float64")
    stages = split_stages(model, even_partition(7, 3))
    assert [len(s) for s in stages] == [3, 2, 2]
    assert stages[1][0] is model.pool2  # shared modules, not copies
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    converted = stage_to_jax(stages)

    @jax.jit
    def pipeline(params, y):
        for p, (_, fn) in zip(params, converted):
            y = fn(p, y)
        return y

    close(pipeline([p for p, _ in converted], x.numpy()), model(x).detach().numpy())
    with pytest.raises(PartitionError, match="7 top-level children"):
        split_stages(model, Partition.from_sizes([4, 4], 8))


def test_check_stage_shapes_names_the_stage_that_does_not_fit():
    stages = [nn.Sequential(nn.Linear(4, 5), nn.ReLU()), nn.Sequential(nn.Linear(6, 2))]
    with pytest.raises(ConfigError, match=r"stage 1 \(first layer Linear\(in_features=6.*stage 0's output of "
                                          r"shape \(5,\)"):
        check_stage_shapes(stages, (4,))
    with pytest.raises(ConfigError, match=r"stage 0 .*the input of shape \(3,\)"):
        check_stage_shapes(stages, (3,))
    assert check_stage_shapes(split_stages(build_torch_model("lenet"), even_partition(7, 2)), (3, 32, 32)) == \
        [(16, 5, 5), (10,)]


def test_core_imports_without_torch_or_jax():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['jax'] = None\n"
            "import partime_sim.models as m, partime_sim.streams as s\n"
            "print(m.input_shape('lenet'), len(s.make_stream('shapes', 10, (32,), 10)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["(3,", "32,", "32)", "10"]
