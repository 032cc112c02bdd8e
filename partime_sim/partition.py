"""Contiguous layer ranges per stage, and a stage -> device map."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from partime_sim.errors import PartitionError


@dataclass(frozen=True)
class Partition:
    """Stage k owns layers ``bounds[k]:bounds[k+1]`` and runs on device ``devices[k]``."""

    bounds: tuple[int, ...]
    devices: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "bounds", tuple(int(b) for b in self.bounds))
        object.__setattr__(self, "devices", tuple(int(d) for d in self.devices))
        b = self.bounds
        if len(b) < 2 or b[0] != 0 or any(hi <= lo for lo, hi in zip(b, b[1:])):
            raise PartitionError(
                f"partition bounds {list(b)} are invalid; they must start at 0 and strictly "
                "increase (every stage owns at least one layer)"
            )
        if len(self.devices) != len(b) - 1:
            raise PartitionError(
                f"partition has {len(b) - 1} stages but {len(self.devices)} devices in its map; "
                "give one device per stage"
            )

    @classmethod
    def from_sizes(cls, sizes: Sequence[int], num_layers: int, devices: Sequence[int] | None = None) -> Partition:
        sizes = [int(s) for s in sizes]
        if any(s < 1 for s in sizes):
            raise PartitionError(f"partition sizes {sizes} include a stage with < 1 layer; every stage needs >= 1")
        if sum(sizes) != num_layers:
            raise PartitionError(
                f"partition sizes {sizes} sum to {sum(sizes)}, but the network has {num_layers} layers; "
                "make them sum to the layer count"
            )
        bounds = [0]
        for s in sizes:
            bounds.append(bounds[-1] + s)
        return cls(tuple(bounds), tuple(devices) if devices is not None else tuple(range(len(sizes))))

    @property
    def num_stages(self) -> int:
        return len(self.bounds) - 1

    @property
    def num_layers(self) -> int:
        return self.bounds[-1]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(hi - lo for lo, hi in zip(self.bounds, self.bounds[1:]))

    def layers(self, stage: int) -> range:
        return range(self.bounds[stage], self.bounds[stage + 1])

    def check_fits(self, num_layers: int, num_devices: int) -> None:
        """Raise PartitionError unless this partition covers ``num_layers`` on ``num_devices``."""
        if self.num_layers != num_layers:
            raise PartitionError(
                f"partition covers {self.num_layers} layers but the network has {num_layers}; "
                "make the stage sizes sum to the layer count"
            )
        bad = [d for d in self.devices if not 0 <= d < num_devices]
        if bad:
            raise PartitionError(
                f"partition maps stages to devices {bad}, but the cluster has devices 0..{num_devices - 1}; "
                "use more devices or fix the map"
            )


def even_partition(num_layers: int, num_stages: int) -> Partition:
    """Equal layer counts (the first ``num_layers % num_stages`` stages get one more)."""
    if not 1 <= num_stages <= num_layers:
        raise PartitionError(
            f"{num_stages} stages for a {num_layers}-layer network is impossible; "
            f"use between 1 and {num_layers} stages or a deeper network"
        )
    q, r = divmod(num_layers, num_stages)
    return Partition.from_sizes([q + (i < r) for i in range(num_stages)], num_layers)
