"""One what-if timing study (network x schedule x devices x cluster): the glue the CLI,
the demo and notebooks share, so a configuration means the same thing everywhere."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from partime_sim.errors import ConfigError, PartitionError
from partime_sim.network import Network
from partime_sim.partition import Partition, even_partition
from partime_sim.schedule import Schedule

PARTITIONERS = ("minmax", "block", "even")


@dataclass(frozen=True)
class StudyConfig:
    network: str
    schedule: str
    devices: int
    samples: int = 256
    microbatches: int | None = None
    mode: str = "train"
    engine: str = "fast"
    cluster: str = "ideal"
    partition: str = "minmax"
    jitter: float = 0.0
    stragglers: float = 0.0
    straggler_factor: float = 3.0
    arrival_rate: float | None = None
    poisson: bool = False
    seed: int = 0

    @classmethod
    def from_args(cls, args: argparse.Namespace, devices: int) -> StudyConfig:
        fields = {k: getattr(args, k) for k in cls.__dataclass_fields__ if k != "devices" and hasattr(args, k)}
        return cls(devices=devices, **fields)


@dataclass(frozen=True)
class StudyResult:
    summary: dict[str, Any]
    trace: pd.DataFrame
    schedule: Schedule
    partition: Partition


def resolve_schedule(spec: str, stages: int, samples: int, mode: str, microbatches: int | None) -> Schedule:
    """A generator name, or a file holding a schedule in the text form (validated)."""
    from partime_sim.generators import generate

    path = Path(spec)
    if not path.is_file():
        return generate(spec, stages, samples, mode, microbatches=microbatches)
    sched = Schedule.from_text(path.read_text()).validate()
    if sched.num_stages != stages:
        raise ConfigError(f"schedule file {spec!r} has {sched.num_stages} stages but --devices is {stages}; make them equal")
    return sched


def resolve_partition(spec: str, network: Network, cluster: Any, stages: int, mode: str) -> Partition:
    """minmax / block / even, or explicit stage sizes such as '10,10,10'."""
    from partime_sim.partition import partition_block, partition_minmax

    if stages > network.num_layers:
        raise PartitionError(
            f"{stages} stages for network {network.name!r} with {network.num_layers} layers is impossible; "
            f"use at most {network.num_layers} devices or a deeper network"
        )
    if spec == "minmax":
        return partition_minmax(network, cluster, stages, mode=mode)
    if spec == "block":
        return partition_block(network, stages, mode=mode)
    if spec == "even":
        return even_partition(network.num_layers, stages)
    try:
        sizes = [int(s) for s in spec.split(",")]
    except ValueError:
        raise ConfigError(f"--partition {spec!r} is unknown; use one of {PARTITIONERS} or stage sizes like 10,10,10") from None
    if len(sizes) != stages:
        raise PartitionError(f"--partition {spec!r} has {len(sizes)} stages but --devices is {stages}; give one size per stage")
    return Partition.from_sizes(sizes, network.num_layers)


def run_study(cfg: StudyConfig, progress: bool = False) -> StudyResult:
    from partime_sim.catalogue import get_network
    from partime_sim.cluster import load_cluster
    from partime_sim.metrics import summarize
    from partime_sim.simulate import simulate

    network = get_network(cfg.network)
    sched = resolve_schedule(cfg.schedule, cfg.devices, cfg.samples, cfg.mode, cfg.microbatches)
    cluster = load_cluster(cfg.cluster, max(sched.num_devices, cfg.devices))
    partition = resolve_partition(cfg.partition, network, cluster, sched.num_stages, cfg.mode)
    if sched.num_devices == 1:  # e.g. sequential: every stage on device 0
        partition = Partition(partition.bounds, (0,) * partition.num_stages)
    arrival = "saturate" if cfg.arrival_rate is None else ("poisson" if cfg.poisson else "fixed")
    sim = simulate(sched, network, cluster, partition, engine=cfg.engine, arrival=arrival, rate_hz=cfg.arrival_rate,
                   jitter=cfg.jitter, straggler_prob=cfg.stragglers, straggler_factor=cfg.straggler_factor,
                   seed=cfg.seed, progress=progress)
    metrics = summarize(sim.trace, baseline_makespan=sim.baseline_makespan, num_devices=sched.num_devices,
                        peak_memory=sim.peak_memory)
    summary = {
        "network": network.name,
        "schedule": cfg.schedule,
        "mode": cfg.mode,
        "devices": sched.num_devices,
        "stages": sched.num_stages,
        **{k: v for k, v in metrics.items() if k != "devices"},
        "partition": list(partition.sizes),
        "engine": cfg.engine,
        "cluster": cfg.cluster,
        "memory_exceeded": list(sim.memory_exceeded),
    }
    return StudyResult(summary, sim.trace, sched, partition)


