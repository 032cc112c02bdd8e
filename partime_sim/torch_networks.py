"""Any network spec -> a torch ``nn.Sequential`` for real runs.

Why: the backend and the profiler run real modules, and the simulator reasons about the
catalogue's ``Network``. Both must describe the same chain of layers, so every model here has
one top-level child per catalogue layer, in order, with the catalogue's name (a ``.`` becomes
``_``, since torch forbids dots in module names: ResNet's ``layer1.0`` is child ``layer1_0``;
see ``child_name``). A ``Partition``'s layer ranges then index the children directly.

Specs:

- a catalogue network (``uniform:L[:ACT_BYTES]``, ``mlp``, ``lenet``, ``partime-conv30[@RES]``,
  ``partime-conv300[@RES]``, ``resnet50/101/152[@RES]``): ``build_network_model``;
- ``path/to/module.py:factory``, a function of no arguments returning an ``nn.Sequential`` or
  ``(nn.Sequential, input_shape)``: ``load_factory``.

``resolve_model`` takes either and returns the model with its input shape and its ``Network``.
This module is torch-only; the core never imports it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import math
import sys
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from partime_sim.catalogue import CATALOGUE, FLOAT_BYTES, RESNET_DEPTHS, get_network
from partime_sim.errors import ConfigError
from partime_sim.models import _torch_dtype, build_torch_model
from partime_sim.models import input_shape as _trainable_input_shape
from partime_sim.network import Layer, Network

Shape = tuple[int, ...]

PARTIME_CHANNELS = 32  # channels of the PARTIME conv nets' hidden 5x5 convs
PARTIME_NETS = ("partime-conv30", "partime-conv300")
TRAINABLE_NETS = ("mlp", "lenet")  # plus uniform:L; built by models.build_torch_model
_FACTORY_IDS = itertools.count()


def child_name(layer_name: str) -> str:
    """The model child that stands for catalogue layer ``layer_name`` (torch forbids ``.``)."""
    return layer_name.replace(".", "_")


# ---- catalogue networks -----------------------------------------------------------------

def build_network_model(spec: str, seed: int = 0, dtype: Any = "float32") -> nn.Sequential:
    """A freshly initialised torch model of catalogue network ``spec``.

    - ``uniform:L[:ACT_BYTES]``, ``mlp``, ``lenet``: ``models.build_torch_model`` (``uniform:L``
      is L blocks ``Sequential(Linear(W, W), ReLU)`` with W = ACT_BYTES / 4, or 16 without
      ACT_BYTES, whose catalogue act_bytes are then 0).
    - ``partime-conv30``/``partime-conv300``: each conv is ``Sequential(Conv2d(., 32, 5,
      padding=2), ReLU)``, the last one ``Sequential(Conv2d(32, 1, 5, padding=2), Sigmoid)``; the
      conv300's pools are ``MaxPool2d(2)`` and its ``avgpool`` is ``Sequential(AdaptiveAvgPool2d(1),
      Flatten)`` (a (1,) output, as the catalogue counts it).
    - ``resnet50/101/152``: torchvision's ResNet v1.5 (same parameters, same init), flattened:
      ``stem`` ``Sequential(Conv2d 7x7/2, BatchNorm2d, ReLU)``, ``maxpool``, one ``Bottleneck``
      per block (``layer1_0``...), ``avgpool`` ``Sequential(AdaptiveAvgPool2d(1), Flatten)``, ``fc``.

    The weights depend only on ``seed`` (drawn inside ``fork_rng``: the global RNG is left as it
    was), in float32 then cast to ``dtype`` ("float32"/"float64" or a torch dtype).
    """
    net = get_network(spec)  # validates the spec (unknown name, bad @RES...)
    base = _base(spec)
    if base in TRAINABLE_NETS or base.startswith("uniform:"):
        return build_torch_model(spec, seed, dtype)
    dtype = _torch_dtype(dtype)
    with _seeded(seed):
        if base in PARTIME_NETS:
            children = _partime_children(net)
        elif base in RESNET_DEPTHS:
            children = _resnet_children(base, num_classes=net.layers[-1].act_bytes // FLOAT_BYTES)
        else:
            raise ConfigError(f"network {spec!r} carries costs only and has no torch model; use a catalogue "
                              f"name ({', '.join(['uniform:L', *CATALOGUE])}) or 'path/to/module.py:factory'")
    return nn.Sequential(OrderedDict(children)).to(dtype)


def _base(spec: str) -> str:
    return str(spec).strip().partition("@")[0]


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator for the block, restoring the global RNG state afterwards."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed={seed!r} is invalid; use an integer >= 0")
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(int(seed))
        yield


def _partime_children(net: Network) -> list[tuple[str, nn.Module]]:
    """The PARTIME conv nets, layer by layer from the catalogue (which decides where pools go)."""
    last_conv = max(i for i, layer in enumerate(net.layers) if layer.kind == "conv")
    children, channels = [], 3
    for i, layer in enumerate(net.layers):
        if layer.kind == "conv":
            out = 1 if i == last_conv else PARTIME_CHANNELS
            act = nn.Sigmoid() if i == last_conv else nn.ReLU()
            module: nn.Module = nn.Sequential(nn.Conv2d(channels, out, 5, padding=2), act)
            channels = out
        elif layer.kind == "maxpool":
            module = nn.MaxPool2d(2)
        elif layer.kind == "avgpool":
            module = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        else:
            raise AssertionError(f"no torch layer for {layer.kind!r} in {net.name}")  # catalogue changed
        children.append((child_name(layer.name), module))
    return children


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck (stride on the 3x3 conv), same attribute names, so
    its parameters are torchvision's: 1x1, 3x3, 1x1 convs with batch norm, an optional 1x1
    projection shortcut, the residual add and a ReLU."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


def _resnet_children(depth_name: str, num_classes: int) -> list[tuple[str, nn.Module]]:
    """torchvision's ResNet with the catalogue's layer split and names (``catalogue.resnet``)."""
    children: list[tuple[str, nn.Module]] = [
        ("stem", nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True))),
        ("maxpool", nn.MaxPool2d(3, 2, 1)),
    ]
    channels = 64
    for stage, (planes, count) in enumerate(zip((64, 128, 256, 512), RESNET_DEPTHS[depth_name])):
        for i in range(count):
            stride = 2 if stage > 0 and i == 0 else 1
            children.append((child_name(f"layer{stage + 1}.{i}"), Bottleneck(channels, planes, stride)))
            channels = planes * Bottleneck.expansion
    children.append(("avgpool", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())))
    children.append(("fc", nn.Linear(channels, num_classes)))
    for _, child in children:  # torchvision's init (BatchNorm's default is already 1, 0)
        for m in child.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return children


def catalogue_input_shape(spec: str) -> Shape:
    """One input sample's shape (no batch dimension) of catalogue network ``spec``: the
    catalogue's ``C x H x W`` with ``@RES`` replacing H and W; ``(W,)`` for ``uniform:L``."""
    get_network(spec)  # validates
    base, _, res = str(spec).strip().partition("@")
    if base in TRAINABLE_NETS or base.startswith("uniform:"):
        return _trainable_input_shape(spec)
    if base not in CATALOGUE:
        raise ConfigError(f"network {spec!r} is not a catalogue name, so it has no known input shape; use one "
                          f"of {', '.join(['uniform:L', *CATALOGUE])}")
    shape = tuple(int(s) for s in CATALOGUE[base].input_shape.split("x"))
    return (*shape[:-2], int(res), int(res)) if res else shape


# ---- user factories ---------------------------------------------------------------------

def load_factory(spec: str, seed: int = 0) -> nn.Sequential:
    """The ``nn.Sequential`` that ``factory()`` of ``path/to/module.py:factory`` returns.

    The file is imported by path under a fresh module name (it need not be on ``sys.path``), and
    ``factory()`` runs with torch's RNG seeded by ``seed`` (global RNG left as it was), so its
    default initialisation is reproducible. A factory may also return ``(model, input_shape)``;
    ``resolve_model`` uses that shape.
    """
    return _call_factory(spec, seed)[0]


def _call_factory(spec: str, seed: int) -> tuple[nn.Sequential, Shape | None]:
    """(model, input_shape or None) from a factory spec; every failure is a ConfigError."""
    path_text, sep, func = str(spec).strip().rpartition(":")
    usage = "use 'path/to/module.py:factory' (a function of no arguments returning an nn.Sequential)"
    if not sep or not path_text or not func:
        raise ConfigError(f"model {spec!r} does not name a factory function; {usage}")
    path = Path(path_text)
    if path.suffix != ".py":
        raise ConfigError(f"model {spec!r}: {path_text!r} is not a .py file; {usage}")
    if not path.is_file():
        raise ConfigError(f"model {spec!r}: file {path_text!r} does not exist; check the path")
    module = _import_path(path, spec)
    factory = getattr(module, func, None)
    if factory is None:
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                        and getattr(v, "__module__", None) == module.__name__)
        raise ConfigError(f"model {spec!r}: {path_text!r} has no function {func!r}; "
                          f"define it or use one of {public or 'its functions'}")
    if not callable(factory):
        raise ConfigError(f"model {spec!r}: {func!r} in {path_text!r} is of type {type(factory).__name__}, not a "
                          "function; point at a function of no arguments returning an nn.Sequential")
    try:
        with _seeded(seed):
            result = factory()
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - any user error becomes one clear ConfigError
        raise ConfigError(f"model {spec!r}: {func}() raised {type(exc).__name__}: {exc}; fix the factory") from exc
    shape = None
    if isinstance(result, tuple) and len(result) == 2:
        result, shape = result
        shape = _check_shape(shape, f"the input shape returned by {spec!r}")
    if not isinstance(result, nn.Sequential):
        raise ConfigError(f"model {spec!r}: {func}() returned a {type(result).__name__}; return an nn.Sequential "
                          "(its top-level children are the pipeline layers) or (nn.Sequential, input_shape)")
    return result, shape


def _import_path(path: Path, spec: str) -> Any:
    """Import a .py file by path as a new module (registered in sys.modules so dataclasses and
    pickling inside it work)."""
    name = f"partime_sim_factory_{next(_FACTORY_IDS)}_{path.stem}"
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise ConfigError(f"model {spec!r}: cannot import {str(path)!r}; give a Python source file")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module
    try:
        loader_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001
        del sys.modules[name]
        raise ConfigError(f"model {spec!r}: importing {str(path)!r} raised {type(exc).__name__}: {exc}; "
                          "fix the module") from exc
    return module


def _check_shape(shape: Any, what: str) -> Shape:
    """A tuple of positive ints, or a ConfigError naming ``what`` and the value."""
    try:
        dims = tuple(shape)
        ok = bool(dims) and all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0
                                for d in dims)
    except TypeError:
        ok = False
    if not ok:
        raise ConfigError(f"{what} {shape!r} is invalid; give one sample's shape without the batch dimension, "
                          "a tuple of positive ints such as (3, 32, 32)")
    return tuple(int(d) for d in dims)


def _measured_network(name: str, model: nn.Sequential, input_shape: Shape) -> Network:
    """A Network with one zero-cost Layer per top-level child, sizes in float32 bytes from one
    forward of a batch-of-one zero input (in eval mode, so batch norm's statistics stay put)."""
    param = next(model.parameters(), None)
    x = torch.zeros((1, *input_shape), dtype=param.dtype if param is not None else torch.float32,
                    device=param.device if param is not None else "cpu")
    modes = [(m, m.training) for m in model.modules()]
    layers, prev = [], "the input"
    model.eval()
    try:
        with torch.no_grad():
            for cname, child in model.named_children():
                try:
                    x = child(x)
                except Exception as exc:  # noqa: BLE001
                    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    raise ConfigError(
                        f"model {name!r}: layer {cname!r} ({type(child).__name__}) cannot take {prev} of shape "
                        f"{tuple(x.shape[1:])}: {reason}; "
                        "fix the layer sizes or the input shape (--input-shape)") from None
                if not isinstance(x, torch.Tensor):
                    raise ConfigError(f"model {name!r}: layer {cname!r} returned a {type(x).__name__}; each "
                                      "top-level child must return one tensor (the next layer's input)")
                layers.append(Layer(name=cname, fwd=0.0, bwd_input=0.0, bwd_weight=0.0,
                                    act_bytes=x[0].numel() * FLOAT_BYTES,
                                    param_bytes=sum(p.numel() for p in child.parameters()) * FLOAT_BYTES,
                                    kind=type(child).__name__))
                prev = f"{cname!r}'s output"
    finally:
        for m, training in modes:
            m.training = training
    if not layers:
        raise ConfigError(f"model {name!r} is an empty nn.Sequential; give it at least one layer")
    return Network(name, tuple(layers), math.prod(input_shape) * FLOAT_BYTES)


# ---- either ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ResolvedModel:
    """A runnable model and what the simulator knows about it."""

    model: nn.Sequential
    input_shape: Shape  # one sample, no batch dimension
    network: Network  # one layer per top-level child of ``model``
    name: str


def is_factory_spec(spec: str) -> bool:
    """True for ``path/to/module.py:factory`` (and a bare ``.py``, to explain what is missing)."""
    spec = str(spec).strip()
    return ".py:" in spec or spec.endswith(".py")


def resolve_model(spec: str, seed: int = 0, dtype: Any = "float32",
                  input_shape: Sequence[int] | None = None) -> ResolvedModel:
    """The model, input shape and Network of a catalogue name or a ``module.py:factory`` spec.

    Catalogue specs give the catalogue's Network and input shape (``input_shape``, if given, must
    agree). A factory's input shape is the one it returns or ``input_shape``; its Network is
    measured (zero costs: profile for times). ``dtype`` applies to both.
    """
    spec = str(spec).strip()
    given = None if input_shape is None else _check_shape(input_shape, "input_shape (--input-shape)")
    if is_factory_spec(spec):
        model, returned = _call_factory(spec, seed)
        if returned is not None and given is not None and returned != given:
            raise ConfigError(f"model {spec!r} returns input shape {returned} but --input-shape is {given}; "
                              "drop --input-shape or make them agree")
        shape = returned or given
        if shape is None:
            raise ConfigError(f"model {spec!r} does not say its input shape; pass --input-shape (e.g. 3x32x32) "
                              "or return (model, input_shape) from the factory")
        model = model.to(_torch_dtype(dtype))
        return ResolvedModel(model, shape, _measured_network(spec, model, shape), spec)
    model = build_network_model(spec, seed, dtype)  # first: it explains specs without a torch model
    shape = catalogue_input_shape(spec)
    if given is not None and given != shape:
        raise ConfigError(f"network {spec!r} takes input shape {shape}, not --input-shape {given}; drop "
                          "--input-shape (image nets take another resolution as NAME@RES)")
    network = get_network(spec)
    return ResolvedModel(model, shape, network, network.name)
