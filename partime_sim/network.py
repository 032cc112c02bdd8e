"""A network is an ordered chain of layers with per-layer costs on a reference device.

Costs are seconds per sample on the reference device (speed 1.0). A device of speed s runs
a layer in cost / s, unless the network carries measured costs for that device class
(``class_costs``), which then take precedence: that is how heterogeneous clusters get
per-class numbers from the profiler.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from partime_sim.errors import ConfigError

COST_FIELDS = ("fwd", "bwd_input", "bwd_weight")


def _check_non_negative(owner: str, name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
        raise ConfigError(f"{owner}: {name}={value!r} is invalid; costs and sizes must be numbers >= 0")


@dataclass(frozen=True)
class Layer:
    """One layer: times in seconds per sample on the reference device, sizes in bytes per sample."""

    name: str
    fwd: float
    bwd_input: float
    bwd_weight: float
    act_bytes: int = 0  # size of this layer's output activation (what crosses a stage boundary)
    param_bytes: int = 0
    flops: float = 0.0  # forward FLOPs per sample (informative; costs are the times above)
    opt: float = 0.0  # optimizer step time for this layer's weights
    kind: str = ""  # "conv", "linear", "pool", ... (informative)

    def __post_init__(self) -> None:
        for name in ("fwd", "bwd_input", "bwd_weight", "act_bytes", "param_bytes", "flops", "opt"):
            _check_non_negative(f"layer {self.name!r}", name, getattr(self, name))


@dataclass(frozen=True)
class Network:
    """An ordered chain of layers; ``input_bytes`` is the size of one input sample."""

    name: str
    layers: tuple[Layer, ...]
    input_bytes: int = 0
    # device class -> per-layer (fwd, bwd_input, bwd_weight) seconds measured on that class
    class_costs: dict[str, tuple[tuple[float, float, float], ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers:
            raise ConfigError(f"network {self.name!r} has no layers; give at least one layer")
        _check_non_negative(f"network {self.name!r}", "input_bytes", self.input_bytes)
        for cls, rows in self.class_costs.items():
            if len(rows) != len(self.layers):
                raise ConfigError(
                    f"network {self.name!r}: class_costs[{cls!r}] has {len(rows)} rows for "
                    f"{len(self.layers)} layers; give one (fwd, bwd_input, bwd_weight) per layer"
                )
            for row in rows:
                for name, value in zip(COST_FIELDS, row):
                    _check_non_negative(f"network {self.name!r} class {cls!r}", name, value)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def flops(self) -> float:
        return float(sum(layer.flops for layer in self.layers))

    @property
    def param_bytes(self) -> int:
        return int(sum(layer.param_bytes for layer in self.layers))

    def costs(self, device_kind: str = "ref", speed: float = 1.0) -> np.ndarray:
        """(L, 3) array of fwd, bwd_input, bwd_weight seconds on a device of this class/speed."""
        if device_kind in self.class_costs:
            return np.asarray(self.class_costs[device_kind], dtype=float)
        if speed <= 0:
            raise ConfigError(f"device speed={speed!r} must be > 0 (1.0 is the reference device)")
        base = np.array([[lay.fwd, lay.bwd_input, lay.bwd_weight] for lay in self.layers], dtype=float)
        return base / speed

    def opt_costs(self, speed: float = 1.0) -> np.ndarray:
        return np.array([lay.opt for lay in self.layers], dtype=float) / speed

    def layer_param_bytes(self) -> np.ndarray:
        """Per-layer weight bytes, as an int64 array of length L (0: a layer without weights)."""
        return np.array([lay.param_bytes for lay in self.layers], dtype=np.int64)

    def act_bytes(self) -> np.ndarray:
        """Per-layer output activation bytes, as an int64 array of length L."""
        return np.array([lay.act_bytes for lay in self.layers], dtype=np.int64)

    # ---- JSON ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "input_bytes": self.input_bytes,
            "layers": [asdict(layer) for layer in self.layers],
            "class_costs": {k: [list(r) for r in v] for k, v in self.class_costs.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Network:
        try:
            layers = tuple(Layer(**layer) for layer in data["layers"])
            class_costs = {k: tuple(tuple(r) for r in v) for k, v in data.get("class_costs", {}).items()}
            return cls(data["name"], layers, data.get("input_bytes", 0), class_costs)
        except (KeyError, TypeError) as exc:
            raise ConfigError(
                f"network JSON is missing or has a bad field ({exc}); expected "
                '{"name": ..., "layers": [{"name", "fwd", "bwd_input", "bwd_weight", ...}]}'
            ) from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Network:
        return cls.from_dict(load_json(path))


def load_json(path: str | Path) -> Any:
    """Read a JSON file, turning a missing file or bad JSON into a ConfigError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"file {str(path)!r} does not exist; check the path") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"file {str(path)!r} is not valid JSON ({exc}); fix or regenerate it") from None
