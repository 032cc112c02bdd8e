"""``simulate``: the front door of the timing engines. Checks the inputs, draws the costs
once, runs the chosen engine and writes the predicted trace (trace.py's schema)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pandas as pd

from partime_sim.cluster import Cluster
from partime_sim.costs import TaskCosts, arrival_times, memory_sizes, peak_memory, task_costs
from partime_sim.errors import ConfigError, PartitionError
from partime_sim.network import Network
from partime_sim.partition import Partition
from partime_sim.schedule import COPY, D2H, F, H2D, SEND, SEND_LANE, Schedule
from partime_sim.trace import make_trace

ENGINES = ("fast", "des")


@dataclass(frozen=True, eq=False)
class SimResult:
    """A predicted run: its trace, what it is compared with, and its memory needs."""

    trace: pd.DataFrame
    schedule: Schedule
    baseline_makespan: float  # the `sequential` schedule on device 0: the speed-up reference
    peak_memory: dict[int, float]  # device -> bytes
    memory_exceeded: list[int]  # devices whose peak is above their memory_bytes

    @property
    def makespan(self) -> float:
        """Seconds from the start (t = 0, when the first sample arrives) to the last end."""
        return float(self.trace["end"].max()) if len(self.trace) else 0.0


def simulate(
    schedule: Schedule,
    network: Network,
    cluster: Cluster,
    partition: Partition,
    *,
    engine: str = "fast",
    arrival: str = "saturate",
    rate_hz: float | None = None,
    jitter: float = 0.0,
    straggler_prob: float = 0.0,
    straggler_factor: float = 1.0,
    contention: bool = True,
    seed: int = 0,
    validate: bool = False,
    progress: bool = False,
) -> SimResult:
    """Predict the timing of ``schedule`` running ``network`` split by ``partition`` on
    ``cluster`` (task devices are the schedule's; the partition gives each stage's layers).

    ``engine='fast'`` is exact when links are uncontended and ignores contention; ``'des'``
    models it unless ``contention=False`` (then both give the same times). ``arrival`` is
    'saturate' (every sample there at t = 0), 'fixed' or 'poisson' at ``rate_hz``; jitter and
    stragglers perturb task durations (seeded, see ``costs.task_costs``).
    """
    if engine not in ENGINES:
        raise ConfigError(f"engine={engine!r} is unknown; use one of {ENGINES}")
    _check_fits(schedule, network, cluster, partition)
    if validate:
        schedule.validate()
    arrivals = arrival_times(schedule.num_samples, arrival, rate_hz, seed)
    costs = task_costs(schedule, network, cluster, partition, arrivals=arrivals, jitter=jitter,
                       straggler_prob=straggler_prob, straggler_factor=straggler_factor, seed=seed)
    if engine == "fast":
        from partime_sim.engine_fast import run_fast

        start, end = run_fast(schedule, costs, progress=progress)
        send_start = None  # every transfer leaves when its source ends
    else:
        from partime_sim.engine_des import run_des

        start, end, send_start = run_des(schedule, costs, cluster, contention=contention, progress=progress)
    peak = peak_memory(schedule, start, end, memory_sizes(schedule, network, partition))
    exceeded = [d for d, used in peak.items() if used > cluster.devices[d].memory_bytes]
    return SimResult(
        trace=_trace(schedule, costs, start, end, send_start),
        schedule=schedule,
        baseline_makespan=baseline_makespan(schedule, network, cluster, arrivals),
        peak_memory=peak,
        memory_exceeded=exceeded,
    )


def _check_fits(schedule: Schedule, network: Network, cluster: Cluster, partition: Partition) -> None:
    if partition.num_stages != schedule.num_stages:
        raise PartitionError(
            f"partition has {partition.num_stages} stages but schedule {schedule.name!r} has {schedule.num_stages}; "
            "partition the network into as many stages as the schedule has"
        )
    partition.check_fits(network.num_layers, cluster.num_devices)
    if cluster.num_devices < schedule.num_devices:
        raise ConfigError(
            f"schedule {schedule.name!r} uses {schedule.num_devices} devices but cluster {cluster.name!r} has "
            f"{cluster.num_devices}; give a cluster with at least {schedule.num_devices} devices"
        )


def baseline_makespan(schedule: Schedule, network: Network, cluster: Cluster, arrivals: np.ndarray) -> float:
    """Makespan of the whole network as one stage on device 0 (the `sequential` schedule,
    same mode, samples, microbatch size and arrivals; no jitter), by the fast engine."""
    from partime_sim.engine_fast import run_fast
    from partime_sim.generators import generate

    seq = generate("sequential", 1, schedule.num_samples, schedule.mode)
    if "microbatch_size" in schedule.params:
        seq = dataclasses.replace(seq, params={**seq.params, "microbatch_size": schedule.params["microbatch_size"]})
    whole = Partition((0, network.num_layers), (0,))
    costs = task_costs(seq, network, cluster, whole, arrivals=arrivals)
    _, end = run_fast(seq, costs)
    last = (seq.kind == F) & (seq.stage == seq.num_stages - 1)
    return float(max(end.max(initial=0.0), (end[last] + costs.d2h).max(initial=0.0)))


def _trace(schedule: Schedule, costs: TaskCosts, start: np.ndarray, end: np.ndarray,
           send_start: np.ndarray | None) -> pd.DataFrame:
    """Task rows in table order, then one SEND per transfer, one H2D and one D2H per sample."""
    s = schedule
    # a SEND row per transfer that takes time (ideal links move nothing worth a row), with the
    # labels of the task whose output moves
    timed = costs.edge_time[costs.transfer] > 0
    send = s.dep_src[costs.transfer][timed]
    send_time = costs.edge_time[costs.transfer][timed]
    send_start = end[send] if send_start is None else send_start[timed]
    h2d = _by_sample(s, (s.kind == F) & (s.stage == 0))
    d2h = _by_sample(s, (s.kind == F) & (s.stage == s.num_stages - 1))
    arrival = costs.arrival[s.sample[h2d]]

    def labels(column: np.ndarray) -> np.ndarray:
        return np.concatenate([column, column[send], column[h2d], column[d2h]])

    def codes(task_codes: np.ndarray, *extra_codes: int) -> np.ndarray:
        extra = [np.full(rows.size, c, dtype=np.int8) for rows, c in zip((send, h2d, d2h), extra_codes)]
        return np.concatenate([task_codes, *extra])

    return make_trace(
        device=labels(s.device), stage=labels(s.stage), sample=labels(s.sample), tick=labels(s.tick),
        lane=codes(s.lane, SEND_LANE, COPY, COPY),
        kind=codes(s.kind, SEND, H2D, D2H),
        start=np.concatenate([start, send_start, arrival, end[d2h]]),
        end=np.concatenate([end, send_start + send_time, arrival + costs.h2d,
                            end[d2h] + costs.d2h]),
        source="predicted",
    )


def _by_sample(schedule: Schedule, mask: np.ndarray) -> np.ndarray:
    """Indices of the masked tasks, ordered by sample."""
    idx = np.flatnonzero(mask)
    return idx[np.argsort(schedule.sample[idx], kind="stable")]
