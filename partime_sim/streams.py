"""Streams: finite, seeded, deterministic sequences of samples ``(x_t, y_t)``.

Why synthetic streams: PARTIME's argument is that pipelined learning with stale gradients works
because a stream is *smooth* (consecutive samples are alike), so studying it needs smooth,
non-i.i.d. streams with a known structure, plus the same samples shuffled as the i.i.d.
baseline. They are generated on the fly from the seed (nothing is downloaded or stored), in
float32 (cast with ``Stream.astype`` for float64 runs). Real data comes in through the adapters
(``from_npz``, ``from_arrays``, ``from_torch_dataset``).

Built-in streams (``STREAMS``; ``make_stream`` builds them at any input shape):

- ``shapes``: a camera watching one object at a time. The object's class (its shape: a
  "flower" with 2 to 6 lobes, shallow or deep) changes only at segment boundaries, every 50 to
  200 frames, always to another class; within a segment the object moves (bouncing off the
  frame's borders), rotates and grows/shrinks smoothly frame to frame. Image inputs ``(C, H, W)``
  are rendered frames (anti-aliased object of a per-segment random colour on a black background,
  plus sensor noise). Vector inputs ``(D,)`` are the 1-D analogue: a tracker that follows the
  object reports its outline as the radius at D angles around its centre (measured from the
  object's own axis, up to a small smooth wobble), scaled by its apparent size, plus noise, so a
  small MLP can learn the class. ``y``: int labels in ``[0, num_outputs)``.
- ``drift``: slowly drifting regression. ``x_t`` is a smooth signal (an AR(1) process with
  correlation 0.98 per step, unit variance), ``y_t = W_t x_t`` with ``W_t = cos(φ_t) A +
  sin(φ_t) B`` turning once every ``DRIFT_PERIOD`` samples (A, B Gaussian, variance 1/D, so
  ``y`` has unit variance). ``y``: float targets ``(N, num_outputs)``, no classes. Where a dense
  map would be too large (``num_outputs x D`` over ``DRIFT_DENSE_MAX``, e.g. a 256x256 output
  map of a 3x256x256 frame: 192 GiB), A and B are Gaussian of rank ``DRIFT_RANK`` instead
  (``U V / sqrt(r D)``, still unit variance).
- ``shuffled:NAME``: the samples of NAME in a seeded random order (the i.i.d. baseline).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from partime_sim.errors import ConfigError

STREAMS: dict[str, str] = {
    "shapes": "smooth (default): moving/rotating shapes, the class changes every 50-200 frames",
    "drift": "smooth regression: smooth x_t, y_t = W_t x_t with W_t drifting slowly",
    "shuffled:NAME": "the samples of stream NAME in a seeded random order (the i.i.d. baseline)",
}
DEFAULT_STREAM = "shapes"
SEGMENT_FRAMES = (50, 200)  # shapes: a class lasts this many frames (inclusive range)
NOISE = 0.02  # shapes: sensor noise (std) per pixel / per outline value
DRIFT_PERIOD = 5000  # drift: samples for W_t to turn once (A -> B -> -A -> -B -> A)
DRIFT_CORRELATION = 0.98  # drift: AR(1) correlation of x_t between consecutive samples
DRIFT_DENSE_MAX = 1 << 24  # drift: largest dense map (outputs x inputs entries); a low-rank map above
DRIFT_RANK = 64  # drift: rank of the map when a dense one would be too large
_RENDER_CHUNK = 512  # frames rendered at once (bounds memory for long image streams)


@dataclass(frozen=True, eq=False)
class Stream:
    """``x``: ``(N, *input_shape)`` samples; ``y``: ``(N,)`` int class labels when ``num_classes``
    is set, else ``(N, out)`` float targets. ``smooth`` says whether the order is the stream's
    natural one (consecutive samples related) rather than shuffled."""

    x: np.ndarray
    y: np.ndarray
    num_classes: int | None
    name: str = "stream"
    smooth: bool = True

    def __post_init__(self) -> None:
        x, y = self.x, self.y
        if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
            raise ConfigError(f"stream {self.name!r}: x and y must be numpy arrays; build it with from_arrays")
        if x.ndim < 2 or len(x) == 0:
            raise ConfigError(f"stream {self.name!r}: x has shape {x.shape}; give (N, *input_shape) with N >= 1")
        if len(y) != len(x):
            raise ConfigError(f"stream {self.name!r}: {len(x)} inputs but {len(y)} targets; give one y per x")
        if self.num_classes is not None:
            if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
                raise ConfigError(f"stream {self.name!r}: class labels must be a 1-D integer array, got "
                                  f"{y.dtype} of shape {y.shape}")
            bad = (y < 0) | (y >= self.num_classes)
            if bad.any():
                raise ConfigError(f"stream {self.name!r}: label {int(y[bad][0])} is outside [0, {self.num_classes}); "
                                  "fix the labels or num_classes")
        elif y.ndim != 2 or not np.issubdtype(y.dtype, np.floating):
            raise ConfigError(f"stream {self.name!r}: regression targets must be a float (N, out) array, got "
                              f"{y.dtype} of shape {y.shape}; or give num_classes for labels")

    def __len__(self) -> int:
        return len(self.x)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    @property
    def num_outputs(self) -> int:
        """What the network must output: one logit per class, or the target's width."""
        return self.num_classes if self.num_classes is not None else int(self.y.shape[1])

    def astype(self, dtype: Any) -> Stream:
        """The stream with ``x`` (and float targets) cast, e.g. to float64 for exact comparisons."""
        y = self.y if self.num_classes is not None else self.y.astype(dtype)
        return replace(self, x=self.x.astype(dtype), y=y)

    def shuffled(self, seed: int = 0) -> Stream:
        """The same samples in a seeded random order (the i.i.d. baseline), named ``shuffled:NAME``."""
        order = _rng(seed, "shuffle").permutation(len(self))
        return replace(self, x=self.x[order], y=self.y[order], name=f"shuffled:{self.name}", smooth=False)


# ---- built-in streams -----------------------------------------------------------------------

def make_stream(name: str, num_samples: int, input_shape: Sequence[int], num_outputs: int, seed: int = 0) -> Stream:
    """Generate ``num_samples`` samples of the built-in stream ``name`` (see the module docstring)
    for a network taking ``input_shape`` samples and producing ``num_outputs`` values (the number of
    classes for a classification stream). Same arguments, same arrays."""
    name = str(name).strip()
    _check_int("num_samples", num_samples, 1)
    _check_int("num_outputs", num_outputs, 1)
    _check_int("seed", seed, 0)
    shape = tuple(input_shape)
    if not shape or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in shape):
        raise ConfigError(f"input_shape={input_shape!r} is invalid; give positive ints, e.g. (32,) or (3, 32, 32)")
    shape = tuple(int(s) for s in shape)
    if name.startswith("shuffled:"):
        return make_stream(name[len("shuffled:"):], num_samples, shape, num_outputs, seed).shuffled(seed)
    if name not in _GENERATORS:
        raise ConfigError(f"stream {name!r} is unknown; use one of {', '.join(STREAMS)} "
                          f"(NAME one of {', '.join(_GENERATORS)})")
    return _GENERATORS[name](int(num_samples), shape, int(num_outputs), _rng(seed, name))


def _check_int(what: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{what}={value!r} is invalid; use an integer >= {minimum}")


def _rng(seed: int, purpose: str) -> np.random.Generator:
    """An independent generator per (seed, purpose): streams don't share random numbers."""
    return np.random.default_rng([int(seed), zlib.crc32(purpose.encode())])


def _shapes(n: int, shape: tuple[int, ...], num_classes: int, rng: np.random.Generator) -> Stream:
    if num_classes < 2:
        raise ConfigError(f"stream 'shapes' needs num_outputs >= 2 classes, got {num_classes}")
    if len(shape) not in (1, 3):
        raise ConfigError(f"stream 'shapes' renders (C, H, W) images or (D,) vectors; input_shape {shape} is "
                          "neither (for a grayscale image use (1, H, W))")
    if len(shape) == 3 and min(shape[1:]) < 8:
        raise ConfigError(f"stream 'shapes': frames of {shape[1]}x{shape[2]} pixels are too small to draw a "
                          "shape; use at least 8x8")
    # segments: a class and a length each; the class always changes at a boundary
    lengths, labels = [], []
    while sum(lengths) < n:
        lengths.append(int(rng.integers(SEGMENT_FRAMES[0], SEGMENT_FRAMES[1] + 1)))
        c = int(rng.integers(num_classes - 1)) if labels else int(rng.integers(num_classes))
        labels.append(c + (c >= labels[-1]) if labels else c)
    segment = np.repeat(np.arange(len(lengths)), lengths)[:n]
    tau = np.arange(n) - np.repeat(np.cumsum([0] + lengths[:-1]), lengths)[:n]  # frame within segment
    label = np.asarray(labels)[segment]
    lobes, depth = _class_shape(label, num_classes)
    s = len(lengths)
    # per-segment pose parameters, then the smooth per-frame pose
    u = lambda lo, hi, size=s: rng.uniform(lo, hi, size)  # noqa: E731
    scale_wave = 1 + 0.15 * np.sin(2 * np.pi * tau / u(60, 200)[segment] + u(0, 2 * np.pi)[segment])
    if len(shape) == 3:
        speed, heading = u(0.005, 0.02), u(0, 2 * np.pi)
        cx = _bounce(u(-0.4, 0.4)[segment] + (speed * np.cos(heading))[segment] * tau, 0.4)
        cy = _bounce(u(-0.4, 0.4)[segment] + (speed * np.sin(heading))[segment] * tau, 0.4)
        angle = u(0, 2 * np.pi)[segment] + (u(0.01, 0.05) * rng.choice([-1, 1], s))[segment] * tau
        radius = u(0.35, 0.5)[segment] * scale_wave
        colour = rng.uniform(0.4, 1.0, (s, shape[0]))[segment]
        x = _render_frames(shape, cx, cy, angle, radius, colour, lobes, depth, rng)
    else:
        wobble = 0.15 * np.sin(2 * np.pi * tau / u(40, 150)[segment] + u(0, 2 * np.pi)[segment])
        theta = 2 * np.pi * np.arange(shape[0]) / shape[0]
        radius = (u(0.6, 1.0)[segment] * scale_wave)[:, None]
        x = radius * _outline(theta[None, :] - wobble[:, None], lobes[:, None], depth[:, None])
        x = (x + NOISE * rng.standard_normal(x.shape)).astype(np.float32)
    return Stream(x, label.astype(np.int64), num_classes, "shapes", smooth=True)


def _class_shape(label: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Class c is a flower with 2 + c % 5 lobes, its depth rising with c // 5 (0.3 to 0.7)."""
    levels = math.ceil(num_classes / 5)
    depth = 0.3 + 0.4 * (label // 5) / max(1, levels - 1)
    return 2 + label % 5, depth


def _outline(theta: np.ndarray, lobes: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Radius of a flower at angle theta, as a fraction of its largest radius."""
    return (1 + depth * np.cos(lobes * theta)) / (1 + depth)


def _bounce(p: np.ndarray, bound: float) -> np.ndarray:
    """Fold a straight path into [-bound, bound], as an object bouncing off the borders."""
    return bound - np.abs(np.mod(p + bound, 4 * bound) - 2 * bound)


def _render_frames(shape: tuple[int, ...], cx: np.ndarray, cy: np.ndarray, angle: np.ndarray, radius: np.ndarray,
                   colour: np.ndarray, lobes: np.ndarray, depth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Anti-aliased frames (coordinates in [-1, 1]; edges about one pixel wide) plus noise."""
    c, h, w = shape
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731 - float32 halves the rendering time
    cx, cy, angle, radius, colour, lobes, depth = map(f32, (cx, cy, angle, radius, colour, lobes, depth))
    u = f32((np.arange(w) + 0.5) / w * 2 - 1)
    v = f32((np.arange(h) + 0.5) / h * 2 - 1)
    edge = np.float32(1.0 / min(h, w))
    out = np.empty((len(cx), c, h, w), np.float32)
    for lo in range(0, len(cx), _RENDER_CHUNK):
        sl = slice(lo, lo + _RENDER_CHUNK)
        dx = u[None, None, :] - cx[sl, None, None]
        dy = v[None, :, None] - cy[sl, None, None]
        theta = np.arctan2(dy, dx) - angle[sl, None, None]
        r = radius[sl, None, None] * _outline(theta, lobes[sl, None, None], depth[sl, None, None])
        mask = 0.5 * (1 + np.tanh((r - np.hypot(dx, dy)) / edge))
        frames = colour[sl, :, None, None] * mask[:, None]
        out[sl] = frames + NOISE * rng.standard_normal(frames.shape, np.float32)
    return out


def _apply_map(x: np.ndarray, num_outputs: int, rng: np.random.Generator) -> np.ndarray:
    """``x @ A.T`` for a fresh Gaussian map A of variance 1/D per output, dense when it fits in
    ``DRIFT_DENSE_MAX`` entries, else of rank ``DRIFT_RANK`` (never formed)."""
    d = x.shape[1]
    if num_outputs * d <= DRIFT_DENSE_MAX:
        return x @ (rng.standard_normal((num_outputs, d)) / math.sqrt(d)).T
    v = rng.standard_normal((DRIFT_RANK, d))
    u = rng.standard_normal((num_outputs, DRIFT_RANK))
    return (x @ v.T) @ u.T / math.sqrt(DRIFT_RANK * d)


def _drift(n: int, shape: tuple[int, ...], num_outputs: int, rng: np.random.Generator) -> Stream:
    d = math.prod(shape)
    rho = DRIFT_CORRELATION
    noise = rng.standard_normal((n, d)) * math.sqrt(1 - rho * rho)
    x = np.empty((n, d))
    x[0] = rng.standard_normal(d)
    for t in range(1, n):
        x[t] = rho * x[t - 1] + noise[t]
    phi = 2 * np.pi * np.arange(n) / DRIFT_PERIOD
    y = np.cos(phi)[:, None] * _apply_map(x, num_outputs, rng) + np.sin(phi)[:, None] * _apply_map(x, num_outputs, rng)
    return Stream(x.reshape(n, *shape).astype(np.float32), y.astype(np.float32), None, "drift", smooth=True)


_GENERATORS = {"shapes": _shapes, "drift": _drift}


# ---- adapters ---------------------------------------------------------------------------------

def from_arrays(x: Any, y: Any = None, *, input_shape: Sequence[int] | None = None, num_classes: int | None = None,
                name: str = "arrays", smooth: bool = True) -> Stream:
    """A stream from arrays ``x`` ``(N, ...)`` and ``y`` ``(N,)`` / ``(N, out)``, or, with ``y``
    omitted, from an iterable of ``(x_t, y_t)`` pairs, in that order.

    Integer ``y`` are class labels (``num_classes`` defaults to ``max + 1``); float ``y`` are
    regression targets unless ``num_classes`` is given (then they must be whole numbers). ``x`` is
    cast to float32 as is (no rescaling of e.g. uint8 pixels). ``input_shape``, when given, is
    checked against the samples.
    """
    if y is None:
        xs, ys = [], []
        for i, pair in enumerate(x):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ConfigError(f"sample {i} is {type(pair).__name__}, not an (x, y) pair; give pairs, or "
                                  "from_arrays(x, y) with two arrays")
            xs.append(_numpy(pair[0]))
            ys.append(_numpy(pair[1]))
        if not xs:
            raise ConfigError(f"stream {name!r}: no samples; give at least one (x, y) pair")
        shapes = {a.shape for a in xs}
        if len(shapes) > 1:
            first = xs[0].shape
            i = next(i for i, a in enumerate(xs) if a.shape != first)
            raise ConfigError(f"stream {name!r}: sample {i} has shape {xs[i].shape}, sample 0 {first}; "
                              "every x must have the same shape")
        x, y = np.stack(xs), np.stack(ys)
    return _to_stream(_numpy(x), _numpy(y), input_shape, num_classes, name, smooth)


def from_npz(path: str | Path, x_key: str = "x", y_key: str = "y", *, input_shape: Sequence[int] | None = None,
             num_classes: int | None = None, smooth: bool = True) -> Stream:
    """A stream from a numpy ``.npz`` file holding ``x`` and ``y`` arrays (see ``from_arrays``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"stream file {str(path)!r} does not exist; check the path")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in (x_key, y_key) if k not in data.files]
            if missing:
                raise ConfigError(f"{str(path)!r} has no array {missing[0]!r} (it has {sorted(data.files)}); "
                                  "pass x_key=/y_key= naming the inputs and targets")
            x, y = data[x_key], data[y_key]
    except (ValueError, OSError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{str(path)!r} is not a readable .npz file ({exc}); save it with numpy.savez") from None
    return _to_stream(x, y, input_shape, num_classes, path.stem, smooth)


def from_torch_dataset(dataset: Any, num_samples: int | None = None, *, input_shape: Sequence[int] | None = None,
                       num_classes: int | None = None, name: str | None = None, smooth: bool = True) -> Stream:
    """A stream from a torch ``Dataset`` of ``(x, y)`` items, in index order (an ``IterableDataset``
    in iteration order): the first ``num_samples`` (all of a map-style dataset by default)."""
    if num_samples is not None:
        _check_int("num_samples", num_samples, 1)
    name = name or type(dataset).__name__
    if hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
        size = len(dataset)
        if num_samples is not None and num_samples > size:
            raise ConfigError(f"num_samples={num_samples} but dataset {name!r} has {size}; ask for at most {size}")
        items: Iterable[Any] = (dataset[i] for i in range(size if num_samples is None else num_samples))
    elif num_samples is None:
        raise ConfigError(f"dataset {name!r} has no length (an IterableDataset?); pass num_samples=")
    else:
        items = islice(iter(dataset), num_samples)
    stream = from_arrays(items, input_shape=input_shape, num_classes=num_classes, name=name, smooth=smooth)
    if num_samples is not None and len(stream) < num_samples:
        raise ConfigError(f"dataset {name!r} ended after {len(stream)} samples; num_samples={num_samples} asks "
                          "for more")
    return stream


def _numpy(a: Any) -> np.ndarray:
    """numpy view of an array, a torch tensor (detached, on the CPU) or a number."""
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def _to_stream(x: np.ndarray, y: np.ndarray, input_shape: Sequence[int] | None, num_classes: int | None,
               name: str, smooth: bool) -> Stream:
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise ConfigError(f"stream {name!r}: x has dtype {x.dtype}; give numeric inputs")
    if x.ndim < 2:
        raise ConfigError(f"stream {name!r}: x has shape {x.shape}; give (N, *input_shape), e.g. (N, 1) for "
                          "scalar inputs")
    if len(x) != len(y):
        raise ConfigError(f"stream {name!r}: x has {len(x)} samples but y has {len(y)}; give one y per x")
    if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
        raise ConfigError(f"stream {name!r}: samples have shape {tuple(x.shape[1:])} but the network takes "
                          f"{tuple(input_shape)}; reshape or resize the data to match")
    if y.ndim == 2 and y.shape[1] == 1 and (num_classes is not None or np.issubdtype(y.dtype, np.integer)):
        y = y[:, 0]
    if num_classes is None and np.issubdtype(y.dtype, np.integer):
        if y.ndim != 1:
            raise ConfigError(f"stream {name!r}: integer y of shape {y.shape}; give (N,) class labels, or float "
                              "targets for regression")
        num_classes = int(y.max()) + 1 if y.size else 0
    if num_classes is not None:
        _check_int("num_classes", num_classes, 1)
        if y.ndim != 1 or not np.all(np.equal(np.mod(y, 1), 0)):
            raise ConfigError(f"stream {name!r}: num_classes={num_classes} needs (N,) whole-number labels, got "
                              f"{y.dtype} of shape {y.shape}")
        y = y.astype(np.int64)
    else:
        if not np.issubdtype(y.dtype, np.number) or y.ndim not in (1, 2):
            raise ConfigError(f"stream {name!r}: y has dtype {y.dtype} and shape {y.shape}; give (N,) labels "
                              "or (N,) / (N, out) float targets")
        y = (y[:, None] if y.ndim == 1 else y).astype(np.float32)
    return Stream(x.astype(np.float32), y, num_classes, name, smooth)
