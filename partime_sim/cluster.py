"""Devices and the links between them.

A transfer of ``b`` bytes over a link takes ``latency_s + b / bandwidth_Bps``. Each
directed device pair has its own link resource unless links name a shared ``medium``
(e.g. one PCIe switch), in which case the DES engine makes them contend for it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from partime_sim.errors import ConfigError
from partime_sim.network import load_json


@dataclass(frozen=True)
class Device:
    name: str
    kind: str = "ref"  # device class: selects Network.class_costs when present
    speed: float = 1.0  # relative to the reference device the network costs are given for
    memory_bytes: float = math.inf
    copy_engines: int = 1

    def __post_init__(self) -> None:
        if not self.speed > 0:
            raise ConfigError(f"device {self.name!r}: speed={self.speed!r} must be > 0")
        if not self.memory_bytes > 0:
            raise ConfigError(f"device {self.name!r}: memory_bytes={self.memory_bytes!r} must be > 0")


@dataclass(frozen=True)
class Link:
    latency_s: float = 0.0
    bandwidth_Bps: float = math.inf
    medium: str | None = None  # links with the same medium share one resource (contention)

    def __post_init__(self) -> None:
        if not self.latency_s >= 0:
            raise ConfigError(f"link latency_s={self.latency_s!r} must be >= 0")
        if not self.bandwidth_Bps > 0:
            raise ConfigError(f"link bandwidth_Bps={self.bandwidth_Bps!r} must be > 0 (inf for ideal)")

    def time(self, nbytes: float) -> float:
        return self.latency_s + (0.0 if math.isinf(self.bandwidth_Bps) else nbytes / self.bandwidth_Bps)

    @property
    def is_ideal(self) -> bool:
        return self.latency_s == 0 and math.isinf(self.bandwidth_Bps)


@dataclass(frozen=True)
class Cluster:
    """Devices, a default device<->device link, per-pair overrides, a host link per device."""

    name: str
    devices: tuple[Device, ...]
    link: Link = Link()
    links: dict[tuple[int, int], Link] = field(default_factory=dict)  # (src, dst) overrides
    host_link: Link = Link()  # host<->device copies (H2D of inputs, D2H of outputs)
    barrier_s: float = 0.0  # cost of one global barrier (lockstep schedules)

    def __post_init__(self) -> None:
        object.__setattr__(self, "devices", tuple(self.devices))
        if not self.devices:
            raise ConfigError(f"cluster {self.name!r} has no devices; give at least one")
        if not self.barrier_s >= 0:
            raise ConfigError(f"cluster {self.name!r}: barrier_s={self.barrier_s!r} must be >= 0")
        for src, dst in self.links:
            for idx in (src, dst):
                if not 0 <= idx < len(self.devices):
                    raise ConfigError(
                        f"cluster {self.name!r}: link ({src}, {dst}) names device {idx}, "
                        f"but devices are 0..{len(self.devices) - 1}"
                    )

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def link_between(self, src: int, dst: int) -> Link:
        return self.links.get((src, dst), self.link)

    def transfer_time(self, src: int, dst: int, nbytes: float) -> float:
        return 0.0 if src == dst else self.link_between(src, dst).time(nbytes)

    def link_resource(self, src: int, dst: int) -> tuple[Any, ...]:
        """Key of the resource a src->dst transfer occupies (shared medium or directed pair)."""
        medium = self.link_between(src, dst).medium
        return ("medium", medium) if medium is not None else ("pair", src, dst)

    # ---- JSON ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "devices": [asdict(d) for d in self.devices],
            "link": asdict(self.link),
            "links": [{"src": s, "dst": d, **asdict(lk)} for (s, d), lk in self.links.items()],
            "host_link": asdict(self.host_link),
            "barrier_s": self.barrier_s,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Cluster:
        try:
            links = {}
            for row in data.get("links", []):
                row = dict(row)
                links[(int(row.pop("src")), int(row.pop("dst")))] = Link(**row)
            return cls(
                name=data["name"],
                devices=tuple(Device(**d) for d in data["devices"]),
                link=Link(**data.get("link", {})),
                links=links,
                host_link=Link(**data.get("host_link", {})),
                barrier_s=data.get("barrier_s", 0.0),
            )
        except (KeyError, TypeError) as exc:
            raise ConfigError(
                f"cluster JSON is missing or has a bad field ({exc}); expected "
                '{"name": ..., "devices": [{"name": ...}], "link": {...}}'
            ) from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1, default=str))

    @classmethod
    def load(cls, path: str | Path) -> Cluster:
        return cls.from_dict(load_json(path))


def ideal_cluster(num_devices: int) -> Cluster:
    """Identical reference devices, zero-cost links: the analytic baseline."""
    return Cluster("ideal", tuple(Device(f"dev{i}") for i in range(num_devices)))
