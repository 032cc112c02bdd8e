"""Built-in networks, with per-layer costs computed analytically from layer shapes.

Why analytic: a what-if study needs plausible per-layer costs before any hardware is
touched. Each pipeline *layer* (the unit of partitioning) is priced by a roofline on the
reference device below: ``time = max(flops / peak, bytes_moved / bandwidth)``, summed over
the kernels the layer runs. The profiler (backends) replaces these numbers with measured
ones when real hardware is at hand.

Conventions, so the numbers can be checked against published ones:

- FLOPs count a multiply-add as 2 (so ResNet-50 at 224x224, "4.1 GFLOPs" in MACs, is
  ~8.2 GFLOP here); a pooling layer counts 1 FLOP per window element it reads.
  Normalisation, activations and residual adds are not counted as FLOPs (they are < 1%
  of a ResNet's), but a residual add's memory traffic is.
- Activation functions and batch norm are fused into the preceding conv/linear (one
  layer); a ResNet bottleneck block is one layer; stem, pools and fc are layers too.
- Everything is float32 (4 bytes); a kernel moves its input, output and weights once.
- Backward: ``bwd_input ~ fwd`` (same FLOPs, transposed), ``bwd_weight ~ fwd`` for layers
  with weights and 0 without. ``opt`` is one Adam step: read p, g, m, v and write p, m, v,
  memory-bound, ``7 * param_bytes / bandwidth``.

A roofline ignores kernel-launch overhead (a few microseconds per kernel on a GPU), so tiny
networks (``lenet``, ``mlp``) come out far faster than any real run: profile them instead.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from partime_sim.errors import ConfigError
from partime_sim.network import Layer, Network, load_json

# Reference device: NVIDIA H100 SXM5 80GB. Source: NVIDIA H100 Tensor Core GPU datasheet
# (FP32 67 TFLOPS without tensor cores; HBM3 3.35 TB/s; 80 GB). Every cost in the catalogue
# is a time on this device; a Device of speed s runs it in cost / s (see cluster.py).
REF_DEVICE_NAME = "NVIDIA H100 SXM5 80GB"
REF_PEAK_FLOPS = 67e12  # float32 FLOP/s, CUDA cores (no TF32 tensor cores)
REF_MEM_BW = 3.35e12  # bytes/s, HBM3
REF_MEMORY_BYTES = 80 * 2**30
FLOAT_BYTES = 4
ADAM_TRAFFIC = 7  # float32 tensors read or written per parameter by one Adam step

Shape = tuple[int, ...]  # (C, H, W) for images, (N,) for vectors


def roofline(flops: float, bytes_moved: float, peak_flops: float = REF_PEAK_FLOPS,
             mem_bw: float = REF_MEM_BW) -> float:
    """Seconds for one kernel: bound by compute or by memory traffic, whichever is slower."""
    return max(flops / peak_flops, bytes_moved / mem_bw)


@dataclass(frozen=True)
class Block:
    """Analytic cost of one pipeline layer on the reference device (one sample)."""

    name: str
    kind: str
    out_shape: Shape
    flops: float  # forward FLOPs (see the module docstring for the convention)
    params: int  # parameter count
    time: float  # forward seconds on the reference device (sum of kernel rooflines)

    @property
    def act_bytes(self) -> int:
        return math.prod(self.out_shape) * FLOAT_BYTES

    def to_layer(self) -> Layer:
        param_bytes = self.params * FLOAT_BYTES
        return Layer(
            name=self.name, fwd=self.time, bwd_input=self.time,
            bwd_weight=self.time if self.params else 0.0,
            act_bytes=self.act_bytes, param_bytes=param_bytes, flops=float(self.flops),
            opt=ADAM_TRAFFIC * param_bytes / REF_MEM_BW, kind=self.kind,
        )


# ---- layer cost helpers --------------------------------------------------------------

def _out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    out = (size + 2 * padding - kernel) // stride + 1
    if out < 1:
        raise ConfigError(
            f"a {kernel}x{kernel} window (stride {stride}, padding {padding}) does not fit a "
            f"{size}-pixel input; use a larger input resolution"
        )
    return out


def _kernel(flops: float, in_elems: int, out_elems: int, params: int) -> float:
    return roofline(flops, FLOAT_BYTES * (in_elems + out_elems + params))


def conv2d(name: str, in_shape: Shape, out_ch: int, kernel: int, stride: int = 1, padding: int = 0,
           groups: int = 1, bias: bool = True, batch_norm: bool = False) -> Block:
    """A conv (+ fused batch norm and activation): 2 * MACs FLOPs, weights + bias + BN affine."""
    in_ch, h, w = in_shape
    if in_ch % groups or out_ch % groups:
        raise ConfigError(f"conv {name!r}: groups={groups} must divide in_ch={in_ch} and out_ch={out_ch}")
    ho, wo = _out_size(h, kernel, stride, padding), _out_size(w, kernel, stride, padding)
    macs = out_ch * ho * wo * (in_ch // groups) * kernel * kernel
    params = out_ch * (in_ch // groups) * kernel * kernel + (out_ch if bias else 0) + (2 * out_ch if batch_norm else 0)
    out = (out_ch, ho, wo)
    return Block(name, "conv", out, 2 * macs, params, _kernel(2 * macs, in_ch * h * w, math.prod(out), params))


def linear(name: str, in_features: int, out_features: int, bias: bool = True) -> Block:
    """A fully connected layer (+ fused activation)."""
    macs = in_features * out_features
    params = macs + (out_features if bias else 0)
    return Block(name, "linear", (out_features,), 2 * macs, params,
                 _kernel(2 * macs, in_features, out_features, params))


def pool2d(name: str, in_shape: Shape, kernel: int, stride: int | None = None, padding: int = 0,
           kind: str = "maxpool") -> Block:
    """Max or average pooling: one FLOP per window element read; memory-bound in practice."""
    if kind not in ("maxpool", "avgpool"):
        raise ConfigError(f"pool kind {kind!r} is unknown; use 'maxpool' or 'avgpool'")
    ch, h, w = in_shape
    stride = kernel if stride is None else stride
    out = (ch, _out_size(h, kernel, stride, padding), _out_size(w, kernel, stride, padding))
    flops = math.prod(out) * kernel * kernel
    return Block(name, kind, out, flops, 0, _kernel(flops, ch * h * w, math.prod(out), 0))


def max_pool(name: str, in_shape: Shape, kernel: int, stride: int | None = None, padding: int = 0) -> Block:
    return pool2d(name, in_shape, kernel, stride, padding, "maxpool")


def avg_pool(name: str, in_shape: Shape, kernel: int, stride: int | None = None, padding: int = 0) -> Block:
    return pool2d(name, in_shape, kernel, stride, padding, "avgpool")


def adaptive_avg_pool(name: str, in_shape: Shape) -> Block:
    """Global average pooling to 1x1, flattened to a (C,) vector (the flatten is free)."""
    ch, h, w = in_shape
    flops = ch * h * w
    return Block(name, "avgpool", (ch,), flops, 0, _kernel(flops, ch * h * w, ch, 0))


def bottleneck(name: str, in_shape: Shape, planes: int, stride: int = 1) -> Block:
    """A ResNet v1.5 bottleneck (torchvision): 1x1, 3x3 (strided), 1x1 convs with BN, an
    optional 1x1 projection shortcut, and the residual add; one pipeline layer."""
    in_ch = in_shape[0]
    c1 = conv2d(f"{name}.conv1", in_shape, planes, 1, bias=False, batch_norm=True)
    c2 = conv2d(f"{name}.conv2", c1.out_shape, planes, 3, stride, 1, bias=False, batch_norm=True)
    c3 = conv2d(f"{name}.conv3", c2.out_shape, 4 * planes, 1, bias=False, batch_norm=True)
    parts = [c1, c2, c3]
    if stride != 1 or in_ch != 4 * planes:
        parts.append(conv2d(f"{name}.downsample", in_shape, 4 * planes, 1, stride, bias=False, batch_norm=True))
    out_elems = math.prod(c3.out_shape)
    add_time = roofline(0, FLOAT_BYTES * 3 * out_elems)  # read both branches, write the sum
    return Block(name, "bottleneck", c3.out_shape, sum(p.flops for p in parts), sum(p.params for p in parts),
                 sum(p.time for p in parts) + add_time)


# ---- catalogue networks --------------------------------------------------------------

def _network(name: str, input_shape: Shape, blocks: list[Block]) -> Network:
    return Network(name, tuple(b.to_layer() for b in blocks), math.prod(input_shape) * FLOAT_BYTES)


def uniform(num_layers: int, act_bytes: int = 0, name: str | None = None) -> Network:
    """L identical layers, fwd = bwd_input = bwd_weight = 1 ms: the analytic test bed."""
    layer = dict(fwd=1e-3, bwd_input=1e-3, bwd_weight=1e-3, act_bytes=act_bytes, kind="uniform")
    return Network(name or f"uniform:{num_layers}",
                   tuple(Layer(name=f"layer{i}", **layer) for i in range(num_layers)))


def partime_conv30(res: int = 256, name: str = "partime-conv30") -> Network:
    """PARTIME V.A (sailab-code/partime experimentA.py): 5x5 convs, 32 channels, stride 1,
    padding 2 (same size throughout), ReLU; 3 input channels; the output conv has 1 channel
    and a sigmoid (the paper's smallest output setting). 30 convs: input, 28 hidden, output.
    (The official script builds 31 convs for ``layers=30``: one more hidden conv.)"""
    blocks = [conv2d("conv0", (3, res, res), 32, 5, padding=2)]
    blocks += [conv2d(f"conv{i}", blocks[-1].out_shape, 32, 5, padding=2) for i in range(1, 29)]
    blocks.append(conv2d("conv29", blocks[-1].out_shape, 1, 5, padding=2))
    return _network(name, (3, res, res), blocks)


def partime_conv300(res: int = 256, name: str = "partime-conv300") -> Network:
    """PARTIME V.B (experimentB.py, ``layers=300, pool_every=50``): input conv 3->32, then
    297 units where every 50th is a 2x2 max pool (6 pools) and the rest are 32->32 5x5
    convs (padding 2, ReLU), then a 32->1 conv with sigmoid and a global average pool."""
    blocks = [conv2d("conv0", (3, res, res), 32, 5, padding=2)]
    for i in range(297):
        prev = blocks[-1].out_shape
        blocks.append(max_pool(f"pool{i}", prev, 2) if i % 50 == 0 else conv2d(f"conv{i + 1}", prev, 32, 5, padding=2))
    blocks.append(conv2d("conv_out", blocks[-1].out_shape, 1, 5, padding=2))
    blocks.append(adaptive_avg_pool("avgpool", blocks[-1].out_shape))
    return _network(name, (3, res, res), blocks)


RESNET_DEPTHS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3), "resnet152": (3, 8, 36, 3)}


def resnet(depth_name: str, res: int = 224, num_classes: int = 1000, name: str | None = None) -> Network:
    """torchvision ResNet (v1.5) as PARTIME flattens it (extras/networks.py): stem conv,
    max pool, one layer per bottleneck block, global average pool, fc."""
    blocks = [conv2d("stem", (3, res, res), 64, 7, 2, 3, bias=False, batch_norm=True)]
    blocks.append(max_pool("maxpool", blocks[-1].out_shape, 3, 2, 1))
    for stage, (planes, count) in enumerate(zip((64, 128, 256, 512), RESNET_DEPTHS[depth_name])):
        for i in range(count):
            stride = 2 if stage > 0 and i == 0 else 1
            blocks.append(bottleneck(f"layer{stage + 1}.{i}", blocks[-1].out_shape, planes, stride))
    blocks.append(adaptive_avg_pool("avgpool", blocks[-1].out_shape))
    blocks.append(linear("fc", 2048, num_classes))
    return _network(name or depth_name, (3, res, res), blocks)


def lenet(name: str = "lenet") -> Network:
    """LeNet-style CIFAR net of PARTIME V.D (experimentD.py ``gen_net``): 32x32x3 input,
    conv 5x5 6, pool, conv 5x5 16, pool, fc 120, fc 84, fc 10 (activations fused)."""
    blocks = [conv2d("conv1", (3, 32, 32), 6, 5)]
    blocks.append(max_pool("pool1", blocks[-1].out_shape, 2))
    blocks.append(conv2d("conv2", blocks[-1].out_shape, 16, 5))
    blocks.append(max_pool("pool2", blocks[-1].out_shape, 2))
    blocks += [linear("fc1", 16 * 5 * 5, 120), linear("fc2", 120, 84), linear("fc3", 84, 10)]
    return _network(name, (3, 32, 32), blocks)


MLP_IN, MLP_WIDTH, MLP_OUT, MLP_LAYERS = 32, 64, 10, 8


def mlp(name: str = "mlp") -> Network:
    """Small MLP for the learning studies: 32 inputs, 7 hidden layers of 64 (ReLU fused),
    10 outputs; 8 linear layers so up to 8 stages fit."""
    dims = [MLP_IN] + [MLP_WIDTH] * (MLP_LAYERS - 1) + [MLP_OUT]
    return _network(name, (MLP_IN,), [linear(f"fc{i}", a, b) for i, (a, b) in enumerate(zip(dims, dims[1:]))])


@dataclass(frozen=True)
class _Entry:
    build: Callable[[int | None, str], Network]  # (resolution or None, canonical name) -> Network
    input_shape: str
    description: str
    default_res: int | None = None  # None: no @RES suffix accepted


CATALOGUE: dict[str, _Entry] = {
    "partime-conv30": _Entry(partime_conv30, "3x256x256",
                             "PARTIME V.A: 30 convs 5x5, 32 channels, same-size 256x256 frames", 256),
    "partime-conv300": _Entry(partime_conv300, "3x256x256",
                              "PARTIME V.B: 300 layers (293 convs 5x5 32ch, 6 max pools, global pool)", 256),
    "resnet50": _Entry(lambda r, n: resnet("resnet50", r, name=n), "3x224x224", "ResNet-50 (torchvision v1.5)", 224),
    "resnet101": _Entry(lambda r, n: resnet("resnet101", r, name=n), "3x224x224", "ResNet-101 (torchvision v1.5)", 224),
    "resnet152": _Entry(lambda r, n: resnet("resnet152", r, name=n), "3x256x256",
                        "ResNet-152 at 256x256, PARTIME V.C (inference)", 256),
    "lenet": _Entry(lambda r, n: lenet(n), "3x32x32", "LeNet-style CIFAR-10 net, PARTIME V.D"),
    "mlp": _Entry(lambda r, n: mlp(n), "32", "MLP 32-64x7-10, 8 layers, for learning studies"),
}
KNOWN = ["uniform:L", "uniform:L:ACT_BYTES", *CATALOGUE, "NAME@RES (image nets)", "FILE.json"]


def _parse_int(text: str, what: str, spec: str, minimum: int, example: str) -> int:
    if not re.fullmatch(r"\d+", text) or int(text) < minimum:
        raise ConfigError(f"network {spec!r}: {what} {text!r} must be an integer >= {minimum}, e.g. {example!r}")
    return int(text)


PROFILE_KIND = "partime-sim-profile"  # top-level "kind" of a profiler output (backends/profiler.py)


def is_profile(data: Any) -> bool:
    """Whether loaded JSON is a profile file: one file holding a measured network and cluster."""
    return isinstance(data, dict) and data.get("kind") == PROFILE_KIND


def profile_part(data: dict[str, Any], key: str, path: str | Path) -> dict[str, Any]:
    """The ``network`` or ``cluster`` section of a loaded profile file, or a ConfigError naming the file."""
    part = data.get(key)
    if not isinstance(part, dict):
        raise ConfigError(f"profile file {str(path)!r} has no {key!r} section; "
                          "regenerate it with 'partime-sim profile ... --out FILE.json'")
    return part


def get_network(spec: str) -> Network:
    """A catalogue network by name (``uniform:8``, ``resnet50@256``...), a Network JSON file, or a
    profile file from ``partime-sim profile`` (its measured network)."""
    spec = str(spec).strip()
    if spec.endswith(".json"):
        data = load_json(spec)
        return Network.from_dict(profile_part(data, "network", spec) if is_profile(data) else data)
    if spec.startswith("uniform:"):
        parts = spec.split(":")
        if len(parts) not in (2, 3):
            raise ConfigError(f"network {spec!r} is malformed; use 'uniform:L' or 'uniform:L:ACT_BYTES'")
        layers = _parse_int(parts[1], "layer count L", spec, 1, "uniform:8")
        act = _parse_int(parts[2], "ACT_BYTES", spec, 0, "uniform:8:4096") if len(parts) == 3 else 0
        return uniform(layers, act, name=spec)
    base, _, res_text = spec.partition("@")
    entry = CATALOGUE.get(base)
    if entry is None:
        raise ConfigError(f"network {spec!r} is unknown; use one of {', '.join(KNOWN)}")
    if not res_text:
        return entry.build(entry.default_res, spec)
    if entry.default_res is None:
        raise ConfigError(f"network {base!r} has a fixed input size; drop the '@{res_text}' suffix")
    return entry.build(_parse_int(res_text, "resolution", spec, 1, f"{base}@{entry.default_res}"), spec)


def list_networks() -> list[dict[str, Any]]:
    """One row per catalogue network (``uniform:8`` stands for the family): what the CLI lists."""
    rows = []
    for name, shape, desc in [("uniform:8", "-", "L identical 1 ms layers (uniform:L[:ACT_BYTES])")] + [
            (n, e.input_shape, e.description) for n, e in CATALOGUE.items()]:
        net = get_network(name)
        rows.append({"name": name, "layers": net.num_layers, "flops": net.flops,
                     "params": net.param_bytes // FLOAT_BYTES, "input_shape": shape, "description": desc})
    return rows
