"""Trainable models: torch ``nn.Sequential`` builders for the catalogue, stage splitting, and a
layer-by-layer conversion to pure JAX functions with the same weights (and back).

Why: the torch reference emulator and the backend run the torch model; the JAX emulator runs
the same arithmetic as ``apply_fn(params, x)``. Converting (rather than re-implementing the
networks in JAX) guarantees both sides start from the *same* initial weights, and lets a user
bring any ``nn.Sequential`` built from the supported layers.

Conventions:

- A model's top-level children are the catalogue network's layers, one to one, in order and
  with the same names, so a ``Partition``'s layer ranges index children directly. A child may
  be an ``nn.Sequential`` (a layer with its fused activation).
- ``apply_fn(params, x)`` computes exactly what ``module(x)`` computes for the same ``x``. The
  built-in models expect a leading batch dimension, as torch modules do: a single sample is
  ``x[None]``. ``apply_fn`` is pure, so ``jit``, ``vmap`` (e.g. over stacked params of several
  seeds) and ``grad``/``vjp`` all apply.
- ``params`` mirrors the module: an ``nn.Sequential`` gives a list (one entry per child), any
  other layer a dict of its own parameters by torch name (``{"weight": ..., "bias": ...}``,
  ``{}`` when it has none), in torch's layout (Linear ``(out, in)``, Conv2d ``OIHW``), as jnp
  arrays of the module's dtype. A float64 module needs JAX's x64 mode (else JAX would silently
  round the weights to float32, so that is refused).
- Layers of the same architecture get the *same* ``apply_fn`` object (built once per
  architecture), so ``jit`` caches keyed on it are shared between seeds and configurations.
- Matmuls and convolutions run at ``Precision.HIGHEST`` (no TF32 on GPUs), as torch does by
  default for float32.

torch and JAX are imported only inside the functions that need them: ``input_shape``,
``num_outputs`` and ``num_classes`` work without either.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

from partime_sim.errors import ConfigError, PartitionError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from partime_sim.partition import Partition

Params = Any  # pytree: list (nn.Sequential) or dict (any other layer) of jnp arrays
ApplyFn = Callable[[Params, Any], Any]
Shape = tuple[int, ...]

UNIFORM_WIDTH = 16  # default width W of ``uniform:L`` (L blocks of Linear(W, W) + ReLU)
TRAINABLE = ("mlp", "lenet", "uniform:L", "uniform:L:ACT_BYTES")
SUPPORTED_LAYERS = (
    "Sequential", "Linear", "Conv2d", "ReLU", "LeakyReLU", "Tanh", "Sigmoid", "GELU", "MaxPool2d",
    "AvgPool2d", "AdaptiveAvgPool2d", "Flatten", "Unflatten", "LayerNorm", "Identity",
    "Dropout (and Dropout1d/2d/3d, AlphaDropout, FeatureAlphaDropout) in eval mode",
)


# ---- catalogue networks as torch models -------------------------------------------------------

def _trainable(network: str) -> tuple[str, int, int]:
    """(kind, layers, width) of a trainable catalogue network, or a ConfigError listing them."""
    from partime_sim.catalogue import MLP_LAYERS, MLP_WIDTH, get_network

    spec = str(network).strip()
    if spec == "mlp":
        return "mlp", MLP_LAYERS, MLP_WIDTH
    if spec == "lenet":
        return "lenet", 7, 0
    if spec.startswith("uniform:"):
        net = get_network(spec)  # validates L and ACT_BYTES
        act = net.layers[0].act_bytes
        if act and act % 4:
            raise ConfigError(f"network {spec!r}: ACT_BYTES={act} is not a whole number of float32 values; "
                              f"use a multiple of 4 (width W = ACT_BYTES / 4), e.g. 'uniform:{net.num_layers}:64'")
        return "uniform", net.num_layers, act // 4 if act else UNIFORM_WIDTH
    raise ConfigError(f"network {spec!r} has no trainable model (the catalogue's other networks carry costs "
                      f"only); use one of {', '.join(TRAINABLE)}, or convert your own nn.Sequential")


def input_shape(network: str) -> Shape:
    """One sample's shape, without the batch dimension: ``(32,)`` for mlp, ``(3, 32, 32)`` for lenet,
    ``(W,)`` for ``uniform:L``."""
    from partime_sim.catalogue import MLP_IN

    kind, _, width = _trainable(network)
    return {"mlp": (MLP_IN,), "lenet": (3, 32, 32), "uniform": (width,)}[kind]


def num_outputs(network: str) -> int:
    """Width of the model's output: 10 for mlp and lenet, W for ``uniform:L``."""
    from partime_sim.catalogue import MLP_OUT

    kind, _, width = _trainable(network)
    return {"mlp": MLP_OUT, "lenet": 10, "uniform": width}[kind]


def num_classes(network: str) -> int | None:
    """Classes of a classification network (its outputs are logits), or None when the output is
    not tied to a task: ``uniform:L`` is a test bed whose loss the stream decides."""
    kind, _, _ = _trainable(network)
    return None if kind == "uniform" else num_outputs(network)


def build_torch_model(network: str, seed: int = 0, dtype: Any = None) -> nn.Sequential:
    """A freshly initialised torch model of a trainable catalogue network.

    - ``mlp``: ``fc0``..``fc7``; ``fc0``-``fc6`` are ``Sequential(Linear, ReLU)``, ``fc7`` is the
      output ``Linear(64, 10)`` (logits).
    - ``lenet``: ``conv1`` ``Sequential(Conv2d(3, 6, 5), ReLU)``, ``pool1`` ``MaxPool2d(2)``,
      ``conv2`` ``Sequential(Conv2d(6, 16, 5), ReLU)``, ``pool2`` ``MaxPool2d(2)``, ``fc1``
      ``Sequential(Flatten, Linear(400, 120), ReLU)``, ``fc2`` ``Sequential(Linear(120, 84), ReLU)``,
      ``fc3`` ``Linear(84, 10)`` (logits).
    - ``uniform:L[:ACT_BYTES]``: ``layer0``..``layer{L-1}``, each ``Sequential(Linear(W, W), ReLU)``
      with W = ACT_BYTES / 4 when given (so activation sizes match the catalogue's), else 16.

    Initialisation is torch's default for each layer, drawn from a generator seeded by ``seed``
    inside ``fork_rng`` (the global RNG is left as it was), in float32 and then cast to ``dtype``
    (a torch dtype or "float32"/"float64"): the same seed gives the same values in either dtype.
    """
    import torch
    from torch import nn

    kind, layers, width = _trainable(network)
    dtype = _torch_dtype(dtype)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed={seed!r} is invalid; use an integer >= 0")
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(int(seed))
        if kind == "mlp":
            from partime_sim.catalogue import MLP_IN, MLP_OUT, MLP_WIDTH

            dims = [MLP_IN] + [MLP_WIDTH] * (layers - 1) + [MLP_OUT]
            children = [(f"fc{i}", nn.Sequential(nn.Linear(a, b), nn.ReLU()))
                        for i, (a, b) in enumerate(zip(dims[:-2], dims[1:-1]))]
            children.append((f"fc{layers - 1}", nn.Linear(dims[-2], dims[-1])))
        elif kind == "lenet":
            children = [
                ("conv1", nn.Sequential(nn.Conv2d(3, 6, 5), nn.ReLU())),
                ("pool1", nn.MaxPool2d(2)),
                ("conv2", nn.Sequential(nn.Conv2d(6, 16, 5), nn.ReLU())),
                ("pool2", nn.MaxPool2d(2)),
                ("fc1", nn.Sequential(nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU())),
                ("fc2", nn.Sequential(nn.Linear(120, 84), nn.ReLU())),
                ("fc3", nn.Linear(84, 10)),
            ]
        else:
            children = [(f"layer{i}", nn.Sequential(nn.Linear(width, width), nn.ReLU())) for i in range(layers)]
        model = nn.Sequential(OrderedDict(children))
    return model.to(dtype)


def _torch_dtype(dtype: Any) -> torch.dtype:
    import torch

    if dtype is None:
        return torch.float32
    named = {"float32": torch.float32, "float64": torch.float64}
    if isinstance(dtype, str):
        if dtype not in named:
            raise ConfigError(f"dtype={dtype!r} is unknown; use 'float32' or 'float64'")
        return named[dtype]
    if dtype not in named.values():
        raise ConfigError(f"dtype={dtype!r} is not supported for models; use torch.float32 or torch.float64")
    return dtype


# ---- stages ---------------------------------------------------------------------------------

def split_stages(model: nn.Sequential, partition: Partition) -> list[nn.Sequential]:
    """Stage k = children ``bounds[k]:bounds[k+1]`` of ``model``, as an ``nn.Sequential``.

    The stages share their modules (and so their parameters) with ``model``: training the
    stages trains the model.
    """
    from torch import nn

    if not isinstance(model, nn.Sequential):
        raise ConfigError(f"model is a {type(model).__name__}; split_stages needs an nn.Sequential whose "
                          "children are the pipeline layers")
    if partition.num_layers != len(model):
        raise PartitionError(
            f"partition sizes {list(partition.sizes)} cover {partition.num_layers} layers but the model has "
            f"{len(model)} top-level children; make the stage sizes sum to {len(model)}"
        )
    b = partition.bounds
    return [model[lo:hi] for lo, hi in zip(b, b[1:])]


def check_stage_shapes(stages: Sequence[nn.Module], input_shape: Sequence[int]) -> list[Shape]:
    """Run one dummy sample (zeros, batch of one) through the stages in order; return each stage's
    output shape (without the batch dimension). A stage that cannot take what reaches it raises a
    ConfigError naming the stage, its first layer and the shape it was given."""
    import torch

    shape = tuple(int(s) for s in input_shape)
    param = next((p for s in stages for p in s.parameters()), None)
    x = torch.zeros((1, *shape), dtype=param.dtype if param is not None else torch.float32,
                    device=param.device if param is not None else "cpu")
    shapes = []
    with torch.no_grad():
        for k, stage in enumerate(stages):
            try:
                x = stage(x)
            except (RuntimeError, ValueError, IndexError) as exc:
                what = "the input" if k == 0 else f"stage {k - 1}'s output"
                first = _first_layer(stage)
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ConfigError(
                    f"stage {k} (first layer {first}) cannot take {what} of shape {tuple(x.shape[1:])}: {reason}; "
                    "move the stage boundary or fix the layer sizes so each stage takes the previous one's output"
                ) from None
            shapes.append(tuple(x.shape[1:]))
    return shapes


def _first_layer(module: nn.Module) -> str:
    """The first leaf layer of a module, as torch prints it (for error messages)."""
    while len(list(module.children())):
        module = next(iter(module.children()))
    return repr(module)


def stage_to_jax(stages: Sequence[nn.Module]) -> list[tuple[Params, ApplyFn]]:
    """``to_jax`` of every stage: the ``(params, apply_fn)`` list the JAX emulator takes."""
    return [to_jax(stage) for stage in stages]


# ---- torch -> JAX ---------------------------------------------------------------------------

def to_jax(module: nn.Module) -> tuple[Params, ApplyFn]:
    """``(params, apply_fn)`` with ``apply_fn(params, x) == module(x)`` (see the module docstring).

    Unsupported layers raise a ConfigError naming the layer's path and class.
    """
    spec = _spec(module, "")
    params = _params(module, spec)
    return params, _build(spec)


def params_to_torch(params: Params, module: nn.Module) -> None:
    """Copy JAX ``params`` (as ``to_jax`` gives them, e.g. after training) into ``module``'s
    parameters in place; values are copied exactly (cast only if the dtypes differ)."""
    import torch

    spec = _spec(module, "")

    def copy(p: Any, m: nn.Module, sp: tuple, path: str) -> None:
        if sp[0] == "seq":
            if not isinstance(p, (list, tuple)) or len(p) != len(sp[1]):
                raise ConfigError(f"params at {_where(path)} should be a list of {len(sp[1])} entries (one per "
                                  f"child of the Sequential), got {_describe(p)}; pass params from to_jax(module)")
            for i, (pc, mc, sc) in enumerate(zip(p, m.children(), sp[1])):
                copy(pc, mc, sc, f"{path}.{i}" if path else str(i))
            return
        own = dict(m.named_parameters(recurse=False))
        if not isinstance(p, Mapping) or set(p) != set(own):
            raise ConfigError(f"params at {_where(path)} ({type(m).__name__}) should be a dict with keys "
                              f"{sorted(own)}, got {_describe(p)}; pass params from to_jax(module)")
        for name, target in own.items():
            value = np.array(p[name])
            if value.shape != tuple(target.shape):
                raise ConfigError(f"params at {_where(path)}.{name} have shape {value.shape}, the module's "
                                  f"{type(m).__name__}.{name} {tuple(target.shape)}; use params of this architecture")
            with torch.no_grad():
                target.copy_(torch.from_numpy(value))

    copy(params, module, spec, "")


def _where(path: str) -> str:
    return f"layer {path!r}" if path else "the model's root"


def _describe(p: Any) -> str:
    if isinstance(p, Mapping):
        return f"a dict with keys {sorted(p)}"
    if isinstance(p, (list, tuple)):
        return f"a {type(p).__name__} of {len(p)}"
    return f"a {type(p).__name__}"


def _params(module: nn.Module, spec: tuple) -> Params:
    """The params pytree of ``module`` (structure given by its spec)."""
    import jax
    import jax.numpy as jnp
    import torch

    if spec[0] == "seq":
        return [_params(child, sc) for child, sc in zip(module.children(), spec[1])]
    out = {}
    for name, p in module.named_parameters(recurse=False):
        if p.dtype == torch.float64 and not jax.config.read("jax_enable_x64"):
            raise ConfigError(
                f"parameter {name!r} of {type(module).__name__} is float64 but JAX's x64 mode is off (JAX would "
                "round it to float32); call jax.config.update('jax_enable_x64', True) or convert inside "
                "`with jax.enable_x64(True):`, or use a float32 model"
            )
        if p.dtype not in (torch.float32, torch.float64):
            raise ConfigError(f"parameter {name!r} of {type(module).__name__} is {p.dtype}; use a float32 or "
                              "float64 model")
        out[name] = jnp.asarray(p.detach().cpu().numpy())
    return out


# A spec is a hashable description of a layer (kind and static hyperparameters); ``_build`` turns
# it into an apply function, once per distinct spec.

def _spec(module: nn.Module, path: str) -> tuple:
    from torch import nn
    from torch.nn.utils import parametrize

    kind = _kind(module)
    name = type(module).__name__
    if kind is None:
        raise ConfigError(f"layer {path or '(root)'!r} ({name}) cannot be converted to JAX; supported layers: "
                          f"{', '.join(SUPPORTED_LAYERS)}. Replace it, or write that stage as a JAX function")
    if parametrize.is_parametrized(module):
        raise ConfigError(f"layer {path or '(root)'!r} ({name}) has parametrizations; remove them "
                          "(torch.nn.utils.parametrize.remove_parametrizations) before converting")
    m: Any = module
    if kind == "seq":
        return ("seq", tuple(_spec(c, f"{path}.{i}" if path else str(i)) for i, c in enumerate(m.children())))
    if kind == "linear":
        return ("linear", m.bias is not None)
    if kind == "conv2d":
        if isinstance(m.padding, str):
            pads = (((0, 0), (0, 0)) if m.padding == "valid" else
                    tuple((d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2)
                          for d, k in zip(m.dilation, m.kernel_size)))
        else:
            pads = tuple((p, p) for p in m.padding)
        return ("conv2d", tuple(m.stride), pads, tuple(m.dilation), m.groups, m.padding_mode, m.bias is not None)
    if kind == "leaky_relu":
        return (kind, float(m.negative_slope))
    if kind == "gelu":
        return (kind, m.approximate)
    if kind == "maxpool2d":
        if m.return_indices:
            raise ConfigError(f"layer {path or '(root)'!r} (MaxPool2d) has return_indices=True; converting it "
                              "is not supported, set return_indices=False")
        return (kind, _pair(m.kernel_size), _pair(m.stride or m.kernel_size), _pair(m.padding),
                _pair(m.dilation), bool(m.ceil_mode))
    if kind == "avgpool2d":
        return (kind, _pair(m.kernel_size), _pair(m.stride or m.kernel_size), _pair(m.padding),
                bool(m.ceil_mode), bool(m.count_include_pad), m.divisor_override)
    if kind == "adaptive_avgpool2d":
        return (kind, _pair(m.output_size))
    if kind == "flatten":
        return (kind, m.start_dim, m.end_dim)
    if kind == "unflatten":
        if isinstance(m.dim, str):
            raise ConfigError(f"layer {path or '(root)'!r} (Unflatten) uses a named dim {m.dim!r}; use an int dim")
        return (kind, m.dim, tuple(m.unflattened_size))
    if kind == "layer_norm":
        return (kind, tuple(m.normalized_shape), float(m.eps))
    if kind == "dropout":
        if m.training and m.p > 0:
            raise ConfigError(
                f"layer {path or '(root)'!r} ({name}) is in training mode; it converts to the identity (eval "
                "mode: the emulators have no dropout noise), so call .eval() on the model (or use p=0)"
            )
        return ("identity",)
    return (kind,)


def _pair(v: Any) -> tuple[Any, Any]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


@lru_cache(maxsize=None)
def _kinds() -> dict[type, str]:
    from torch import nn

    table = {nn.Sequential: "seq", nn.Linear: "linear", nn.Conv2d: "conv2d", nn.ReLU: "relu",
             nn.LeakyReLU: "leaky_relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.GELU: "gelu",
             nn.MaxPool2d: "maxpool2d", nn.AvgPool2d: "avgpool2d", nn.AdaptiveAvgPool2d: "adaptive_avgpool2d",
             nn.Flatten: "flatten", nn.Unflatten: "unflatten", nn.LayerNorm: "layer_norm", nn.Identity: "identity"}
    for cls in (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout):
        table[cls] = "dropout"
    return table


def _kind(module: nn.Module) -> str | None:
    """The supported kind of ``module``: its class, or a subclass that keeps its ``forward``."""
    table = _kinds()
    cls = type(module)
    for base in cls.__mro__:
        if base in table:
            return table[base] if cls.forward is base.forward else None
    return None


_PAD_MODES = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}


@lru_cache(maxsize=None)
def _build(spec: tuple) -> ApplyFn:
    """The pure apply function of a spec (cached: one function object per architecture)."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    hi = lax.Precision.HIGHEST
    kind = spec[0]
    if kind == "seq":
        fns = tuple(_build(s) for s in spec[1])

        def seq(params: Params, x: Any) -> Any:
            for fn, p in zip(fns, params):
                x = fn(p, x)
            return x
        return seq
    if kind == "linear":
        def linear(p: Params, x: Any) -> Any:
            y = jnp.matmul(x, p["weight"].T, precision=hi)
            return y + p["bias"] if "bias" in p else y
        return linear
    if kind == "conv2d":
        _, stride, pads, dilation, groups, mode, _bias = spec

        @_images
        def conv2d(p: Params, x: Any) -> Any:
            padding = pads
            if mode != "zeros":  # torch pads explicitly with the mode, then convolves unpadded
                x = jnp.pad(x, ((0, 0), (0, 0), *pads), mode=_PAD_MODES[mode])
                padding = ((0, 0), (0, 0))
            y = lax.conv_general_dilated(x, p["weight"], stride, padding, rhs_dilation=dilation,
                                         feature_group_count=groups, dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                         precision=hi)
            return y + p["bias"][:, None, None] if "bias" in p else y
        return conv2d
    if kind == "relu":
        return lambda p, x: jax.nn.relu(x)  # gradient 0 at 0, as torch
    if kind == "leaky_relu":
        slope = spec[1]
        return lambda p, x: jnp.where(x > 0, x, x * slope)
    if kind == "tanh":
        return lambda p, x: jnp.tanh(x)
    if kind == "sigmoid":
        return lambda p, x: jax.nn.sigmoid(x)
    if kind == "gelu":
        if spec[1] == "tanh":
            return lambda p, x: jax.nn.gelu(x, approximate=True)
        # torch's formula (not jax.nn.gelu's erfc form), so the two agree far into the negative tail
        return lambda p, x: x * 0.5 * (1.0 + lax.erf(x * (1.0 / math.sqrt(2.0))))
    if kind == "maxpool2d":
        _, kernel, stride, padding, dilation, ceil = spec

        @_images
        def maxpool2d(p: Params, x: Any) -> Any:
            pads = [_pool_pads(n, k, s, q, d, ceil) for n, k, s, q, d in
                    zip(x.shape[-2:], kernel, stride, padding, dilation)]
            if dilation == (1, 1):
                return lax.reduce_window(x, -jnp.inf, lax.max, (1, 1, *kernel), (1, 1, *stride),
                                         ((0, 0), (0, 0), *pads))
            # JAX has no VJP for dilated max windows: gather the window elements and take the first
            # maximum (torch's choice among ties, and where its gradient goes)
            x = jnp.pad(x, ((0, 0), (0, 0), *pads), constant_values=-jnp.inf)
            out = [(n - d * (k - 1) - 1) // s + 1 for n, k, s, d in zip(x.shape[-2:], kernel, stride, dilation)]
            taps = jnp.stack([x[..., i * dilation[0]:i * dilation[0] + (out[0] - 1) * stride[0] + 1:stride[0],
                                j * dilation[1]:j * dilation[1] + (out[1] - 1) * stride[1] + 1:stride[1]]
                              for i in range(kernel[0]) for j in range(kernel[1])])
            return jnp.take_along_axis(taps, jnp.argmax(taps, axis=0)[None], axis=0)[0]
        return maxpool2d
    if kind == "avgpool2d":
        _, kernel, stride, padding, ceil, include_pad, divisor = spec

        @_images
        def avgpool2d(p: Params, x: Any) -> Any:
            sizes = x.shape[-2:]
            pads = [_pool_pads(n, k, s, q, 1, ceil) for n, k, s, q in zip(sizes, kernel, stride, padding)]
            total = lax.reduce_window(x, 0.0, lax.add, (1, 1, *kernel), (1, 1, *stride), ((0, 0), (0, 0), *pads))
            if divisor:
                return total / divisor
            counts = [_window_counts(n, k, s, q, o, include_pad)
                      for n, k, s, q, o in zip(sizes, kernel, stride, padding, total.shape[-2:])]
            return total / jnp.asarray(np.outer(*counts), x.dtype)
        return avgpool2d
    if kind == "adaptive_avgpool2d":
        out_size = spec[1]

        @_images
        def adaptive_avgpool2d(p: Params, x: Any) -> Any:
            mats = [_adaptive_windows(n, n if o is None else o) for n, o in zip(x.shape[-2:], out_size)]
            total = jnp.einsum("nchw,ih,jw->ncij", x, jnp.asarray(mats[0], x.dtype), jnp.asarray(mats[1], x.dtype),
                               precision=hi)
            counts = np.outer(mats[0].sum(1), mats[1].sum(1))
            return total / jnp.asarray(counts, x.dtype)
        return adaptive_avgpool2d
    if kind == "flatten":
        _, start, end = spec

        def flatten(p: Params, x: Any) -> Any:
            s, e = start % max(x.ndim, 1), end % max(x.ndim, 1)
            return x.reshape(*x.shape[:s], math.prod(x.shape[s:e + 1]), *x.shape[e + 1:])
        return flatten
    if kind == "unflatten":
        _, dim, sizes = spec

        def unflatten(p: Params, x: Any) -> Any:
            d = dim % x.ndim
            return x.reshape(*x.shape[:d], *sizes, *x.shape[d + 1:])
        return unflatten
    if kind == "layer_norm":
        _, shape, eps = spec
        axes = tuple(range(-len(shape), 0))

        def layer_norm(p: Params, x: Any) -> Any:
            mean = x.mean(axes, keepdims=True)
            centred = x - mean
            y = centred * lax.rsqrt((centred * centred).mean(axes, keepdims=True) + eps)
            if "weight" in p:
                y = y * p["weight"]
            return y + p["bias"] if "bias" in p else y
        return layer_norm
    if kind == "identity":
        return lambda p, x: x
    raise AssertionError(f"no builder for spec {spec}")  # _spec and _build disagree


def _images(fn: ApplyFn) -> ApplyFn:
    """Accept an unbatched (C, H, W) image as torch's 2-D layers do (add and drop a batch dim)."""
    def wrapped(p: Params, x: Any) -> Any:
        return fn(p, x[None])[0] if x.ndim == 3 else fn(p, x)
    wrapped.__name__ = fn.__name__
    return wrapped


def _pool_pads(size: int, kernel: int, stride: int, pad: int, dilation: int, ceil: bool) -> tuple[int, int]:
    """(low, high) padding giving torch's pooled size: ceil_mode adds room for a last partial window,
    unless it would start in the right padding (torch's rule)."""
    span = dilation * (kernel - 1) + 1
    out = (size + 2 * pad - span) // stride + 1
    if ceil:
        out = -(-(size + 2 * pad - span) // stride) + 1
        if (out - 1) * stride >= size + pad:
            out -= 1
    return pad, pad + max(0, (out - 1) * stride + span - (size + 2 * pad))


def _window_counts(size: int, kernel: int, stride: int, pad: int, out: int, include_pad: bool) -> np.ndarray:
    """torch's average-pool divisor per output position along one axis: the window clipped to the
    padded input (count_include_pad) or to the input itself."""
    start = np.arange(out) * stride - pad
    end = np.minimum(start + kernel, size + pad)
    if not include_pad:
        start, end = np.maximum(start, 0), np.minimum(end, size)
    return (end - start).astype(float)


def _adaptive_windows(size: int, out: int) -> np.ndarray:
    """(out, size) 0/1 matrix of torch's adaptive-pool windows: [floor(i*n/o), ceil((i+1)*n/o))."""
    i = np.arange(out)
    start, end = (i * size) // out, -(-((i + 1) * size) // out)
    j = np.arange(size)
    return ((j >= start[:, None]) & (j < end[:, None])).astype(float)
