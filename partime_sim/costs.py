"""What each task of a schedule costs: seconds of compute, of transfer and of waiting for
input, and bytes of memory.

Both timing engines read the same ``TaskCosts``, so randomness (jitter, stragglers, Poisson
arrivals) is drawn once here, seeded, and the engines can be compared number for number.
Memory accounting is also here (``peak_memory``), as one function of the start/end times
that both engines call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from partime_sim.cluster import Cluster
from partime_sim.errors import ConfigError
from partime_sim.network import Network
from partime_sim.partition import Partition
from partime_sim.schedule import B, BARRIER, BI, BW, COMPUTE, F, KINDS, OPT, Schedule

ARRIVALS = ("saturate", "fixed", "poisson")
_COMPUTE_KINDS = (F, B, BI, BW, OPT)  # what a device computes (the idle penalty's tasks)
_STREAMS = ("arrivals", "durations", "stragglers")  # one independent random stream each


def arrival_times(num_samples: int, process: str = "saturate", rate_hz: float | None = None,
                  seed: int = 0) -> np.ndarray:
    """When each sample of the stream arrives: all at 0, every 1/rate s, or Poisson at rate."""
    if process not in ARRIVALS:
        raise ConfigError(f"arrival={process!r} is unknown; use one of {ARRIVALS}")
    if process == "saturate":
        if rate_hz is not None:
            raise ConfigError(f"rate_hz={rate_hz!r} was given with arrival='saturate'; use 'fixed' or 'poisson'")
        return np.zeros(num_samples)
    if rate_hz is None:
        raise ConfigError(f"arrival={process!r} needs rate_hz (samples per second), e.g. rate_hz=30")
    if not (isinstance(rate_hz, (int, float)) and rate_hz > 0 and math.isfinite(rate_hz)):
        raise ConfigError(f"rate_hz={rate_hz!r} must be a finite number > 0")
    if process == "fixed":
        return np.arange(num_samples) / float(rate_hz)
    gaps = _rng(seed, "arrivals").exponential(1.0 / rate_hz, max(num_samples - 1, 0))
    return np.concatenate([[0.0], np.cumsum(gaps)])  # the first sample opens the stream at t = 0


@dataclass(frozen=True, eq=False)
class TaskCosts:
    """Per-task and per-dependency costs, aligned with the schedule's arrays."""

    duration: np.ndarray  # per task: compute seconds (after jitter and stragglers)
    release: np.ndarray  # per task: earliest start (input of a stage-0 F on the device), else 0
    edge_time: np.ndarray  # per dependency: transfer seconds (0 unless it crosses devices)
    transfer: np.ndarray  # per dependency: True where it crosses devices (a SEND in the trace)
    arrival: np.ndarray  # per sample: when it arrives from the stream
    h2d: float  # seconds to copy one sample's input host -> device
    d2h: float  # seconds to copy one sample's output device -> host
    # tasks (the BARRIERs, when the cluster has a close-arrival rule) that take ``close_extra``
    # seconds longer when their last two dependencies are ready within ``close_window`` (arrive_close)
    close_tasks: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    close_extra: float = 0.0
    close_window: float = 0.0
    # compute tasks (True per task) that take idle_extra(idle before them) longer, and the
    # cluster's idle-penalty curve (idle_s, extra_s) from (0, 0); empty: no penalty
    idle_tasks: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    idle_curve: tuple[np.ndarray, np.ndarray] = (np.zeros(1), np.zeros(1))


def idle_extra(idle: np.ndarray, curve: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Seconds a task takes longer after its device sat ``idle`` seconds (``Cluster.idle_penalty``,
    interpolated); both engines ask this of the same idle times."""
    return np.interp(idle, curve[0], curve[1])


def arrive_close(ready: np.ndarray, window: float) -> bool:
    """Whether the last two of a task's dependency-ready times lie within ``window`` seconds
    (``Cluster.barrier_close_window_s``); both engines ask this of the same times."""
    if ready.size < 2:
        return False
    last_two = np.partition(ready, -2)[-2:]
    return bool(last_two[1] - last_two[0] <= window)


def task_costs(
    schedule: Schedule,
    network: Network,
    cluster: Cluster,
    partition: Partition,
    *,
    arrivals: np.ndarray | None = None,
    jitter: float = 0.0,
    straggler_prob: float = 0.0,
    straggler_factor: float = 1.0,
    seed: int = 0,
) -> TaskCosts:
    """Costs of every task and dependency of ``schedule`` (stage k = ``partition`` layers,
    task device = ``cluster.devices[schedule.device]``).

    F/B/BI/BW and transfers scale with ``schedule.params['microbatch_size']`` (default 1);
    an OPT (one update) and a BARRIER do not. A BARRIER costs ``cluster.barrier_s``, or
    ``barrier_close_s`` when its last two arrivals come within ``barrier_close_window_s``
    (decided by the engines, which know the arrivals: ``close_tasks``). A compute task that
    starts after its device sat idle takes ``Cluster.idle_penalty`` longer (decided by the
    engines, which know the idle time: ``idle_tasks``, ``idle_extra``). ``arrivals`` (one
    time per sample, default all 0) plus the host->device copy release each sample's stage-0
    forward.
    """
    _check_noise(jitter, straggler_prob, straggler_factor)
    mb = _microbatch_size(schedule)
    duration = _durations(schedule, network, cluster, partition, mb)
    edge_time, transfer, send_busy, recv_busy = _edges(schedule, network, cluster, partition, mb)
    if send_busy.any():  # what a message costs its sender lengthens the sending task...
        np.add.at(duration, schedule.dep_src, send_busy)
    if recv_busy.any():  # ...and what it costs the receiver, the task that consumes it
        np.add.at(duration, schedule.dep_dst, recv_busy)
    rng = _rng(seed, "durations")
    if jitter > 0:  # lognormal with mean 1 and coefficient of variation `jitter`
        sigma = math.sqrt(math.log1p(jitter * jitter))
        duration *= rng.lognormal(-0.5 * sigma * sigma, sigma, duration.size)
    if straggler_prob > 0:
        duration[_rng(seed, "stragglers").random(duration.size) < straggler_prob] *= straggler_factor

    arrival = np.zeros(schedule.num_samples) if arrivals is None else np.asarray(arrivals, dtype=float)
    if arrival.shape != (schedule.num_samples,):
        raise ConfigError(f"arrivals has shape {arrival.shape}; give one time per sample ({schedule.num_samples})")
    h2d = cluster.host_link.time(network.input_bytes * mb)
    d2h = cluster.host_link.time(network.layers[-1].act_bytes * mb)
    release = np.zeros(len(schedule))
    first = np.flatnonzero((schedule.kind == F) & (schedule.stage == 0))
    release[first] = arrival[schedule.sample[first]] + h2d

    close = np.zeros(0, dtype=np.int64)
    if cluster.barrier_close_window_s > 0:
        close = np.flatnonzero(schedule.kind == BARRIER)
    idle_tasks, curve = np.zeros(0, dtype=bool), (np.zeros(1), np.zeros(1))
    if cluster.idle_penalty:
        idle_tasks = (schedule.device >= 0) & (schedule.lane == COMPUTE) & np.isin(schedule.kind, _COMPUTE_KINDS)
        curve = (np.r_[0.0, [t for t, _ in cluster.idle_penalty]], np.r_[0.0, [x for _, x in cluster.idle_penalty]])
    return TaskCosts(duration, release, edge_time, transfer, arrival, h2d, d2h, close,
                     cluster.barrier_close_s - cluster.barrier_s, cluster.barrier_close_window_s, idle_tasks, curve)


def _check_noise(jitter: float, prob: float, factor: float) -> None:
    if not jitter >= 0 or not math.isfinite(jitter):
        raise ConfigError(f"jitter={jitter!r} must be a coefficient of variation >= 0 (e.g. 0.1)")
    if not 0 <= prob <= 1:
        raise ConfigError(f"straggler_prob={prob!r} must be a probability in [0, 1]")
    if not factor > 0 or not math.isfinite(factor):
        raise ConfigError(f"straggler_factor={factor!r} must be > 0 (3.0 = a straggler takes 3x longer)")


def _rng(seed: int, purpose: str) -> np.random.Generator:
    """An independent seeded stream per purpose, so turning on jitter leaves arrivals unchanged."""
    return np.random.default_rng([int(seed), _STREAMS.index(purpose)])


def _microbatch_size(schedule: Schedule) -> int:
    mb = schedule.params.get("microbatch_size", 1)
    if not (isinstance(mb, (int, np.integer)) and mb >= 1):
        raise ConfigError(f"schedule {schedule.name!r} has microbatch_size={mb!r}; it must be an integer >= 1")
    return int(mb)


def _durations(schedule: Schedule, network: Network, cluster: Cluster, partition: Partition, mb: int) -> np.ndarray:
    """Gather each task's seconds from a (device type, stage, kind) table."""
    S, K = partition.num_stages, len(KINDS)
    starts = np.asarray(partition.bounds[:-1])
    types: dict[tuple[str, float, tuple[float, float, float]], int] = {}
    device_type = np.zeros(cluster.num_devices + 1, dtype=np.int64)  # index -1 (global tasks): any type
    for d, dev in enumerate(cluster.devices):
        device_type[d] = types.setdefault((dev.kind, dev.speed, dev.task_overhead_s), len(types))
    table = np.zeros((len(types), S + 1, K))  # stage row S: tasks without a stage (BARRIER)
    # an optimizer step costs its overhead only on a stage with weights (one without has no
    # optimizer); a network that gives no weight sizes at all is taken to have weights everywhere
    weighted = np.add.reduceat(network.layer_param_bytes(), starts) > 0
    if not weighted.any():
        weighted[:] = True
    for (kind, speed, (ov_f, ov_b, ov_opt)), t in types.items():
        per_layer = np.add.reduceat(network.costs(kind, speed), starts, axis=0)  # (S, 3) fwd, BI, BW
        table[t, :S, F] = per_layer[:, 0] * mb + ov_f
        table[t, :S, BI] = per_layer[:, 1] * mb + ov_b
        table[t, :S, BW] = per_layer[:, 2] * mb + ov_b
        table[t, :S, B] = (per_layer[:, 1] + per_layer[:, 2]) * mb + ov_b
        table[t, :S, OPT] = np.add.reduceat(network.opt_costs(speed), starts) + ov_opt * weighted  # per update
    if schedule.num_devices > 1:  # devices sharing a host slow each other's compute
        table[:, :S] *= cluster.concurrency_slowdown
    table[:, :, BARRIER] = cluster.barrier_s
    flat = schedule.stage.astype(np.int64)  # flat index ((type * (S + 1)) + stage) * K + kind, in place
    flat[flat < 0] = S
    if len(types) > 1:
        flat += device_type[schedule.device] * (S + 1)
    flat *= K
    flat += schedule.kind
    return table.ravel()[flat]


def _edges(schedule: Schedule, network: Network, cluster: Cluster, partition: Partition,
           mb: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per dependency (F sends the stage's output, B/BI its input gradient; a dependency that
    crosses devices is one message): seconds in flight, whether it crosses devices, seconds it
    keeps the sending device busy (the link's ``send_cost_s``, plus bytes / bandwidth on
    ``sender_busy`` links, whose copy is then not in flight) and the receiving one (the link's
    ``recv_cost_s``)."""
    src = schedule.dep_src
    device = schedule.device.astype(np.int16) if cluster.num_devices < 2**15 else schedule.device  # halves the gathers
    dev_src, dev_dst = device[src], device[schedule.dep_dst]
    transfer = dev_src != dev_dst
    transfer &= dev_src >= 0  # global tasks (device -1) move nothing
    transfer &= dev_dst >= 0
    edge, busy, recv = np.zeros(src.size), np.zeros(src.size), np.zeros(src.size)
    links = [cluster.link, *cluster.links.values()]
    if all(link.is_ideal for link in links):
        return edge, transfer, busy, recv
    idx = np.flatnonzero(transfer)
    S, K = partition.num_stages, len(KINDS)
    act = network.act_bytes()
    bounds = np.asarray(partition.bounds)
    sent = np.zeros((S + 1, K))  # bytes per sample by (source stage, source kind); row S: no stage
    sent[:S, F] = act[bounds[1:] - 1]
    sent[:S, B] = sent[:S, BI] = np.r_[network.input_bytes, act[bounds[1:-1] - 1]]
    s = src[idx]
    nbytes = sent[np.where(schedule.stage[s] < 0, S, schedule.stage[s]), schedule.kind[s]] * mb
    if not cluster.links:
        link = cluster.link
        copy = nbytes / link.bandwidth_Bps  # x / inf == 0
        edge[idx] = link.latency_s + (0.0 if link.sender_busy else copy)
        busy[idx] = link.send_cost_s + (copy if link.sender_busy else 0.0)
        recv[idx] = link.recv_cost_s
        return edge, transfer, busy, recv
    # per-pair overrides: look every pair up in a sorted table of link keys (default last)
    D = cluster.num_devices
    keys = np.array([p * D + q for p, q in cluster.links], dtype=np.int64)
    order = np.argsort(keys)
    pair = dev_src[idx].astype(np.int64) * D + dev_dst[idx]
    pos = np.minimum(np.searchsorted(keys[order], pair), keys.size - 1)
    which = np.where(keys[order][pos] == pair, order[pos], keys.size)
    table = (*cluster.links.values(), cluster.link)

    def per_message(name: str) -> np.ndarray:  # the field of each message's link
        return np.array([getattr(lk, name) for lk in table])[which]

    copy, on_sender = nbytes / per_message("bandwidth_Bps"), per_message("sender_busy")
    edge[idx] = per_message("latency_s") + np.where(on_sender, 0.0, copy)
    busy[idx] = per_message("send_cost_s") + np.where(on_sender, copy, 0.0)
    recv[idx] = per_message("recv_cost_s")
    return edge, transfer, busy, recv


# ---- memory ------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class MemorySizes:
    """Bytes a stage holds: one sample's activations (its layers' outputs plus its input) and
    one version of its weights."""

    activation: np.ndarray  # per stage, already times the microbatch size
    weights: np.ndarray  # per stage


def memory_sizes(schedule: Schedule, network: Network, partition: Partition) -> MemorySizes:
    """Per-stage bytes for ``peak_memory``, from the network's layer sizes."""
    act = network.act_bytes().astype(float)
    bounds = np.asarray(partition.bounds)
    inputs = np.r_[network.input_bytes, act[bounds[1:-1] - 1]]
    params = network.layer_param_bytes().astype(float)
    mb = _microbatch_size(schedule)
    return MemorySizes((np.add.reduceat(act, bounds[:-1]) + inputs) * mb, np.add.reduceat(params, bounds[:-1]))


def peak_memory(schedule: Schedule, start: np.ndarray, end: np.ndarray, sizes: MemorySizes) -> dict[int, float]:
    """Peak bytes per device over the run, from the tasks' start/end times.

    * Activations of (stage, sample) are held from its F's start until its backward ends
      (B, or the later of BI/BW); in inference, or with no backward, until the F ends.
    * Weights: version 0 of each stage exists from t = 0; every OPT creates a version when
      it ends; a version is freed once a newer one exists and the last backward of a sample
      whose F used it has ended (weight stashing).

    Memory freed at time t is reusable at t. Everything lives on the device running the
    stage's F.
    """
    S, N = schedule.num_stages, schedule.num_samples
    kind, stage, sample = schedule.kind, schedule.stage, schedule.sample
    held = (sizes.activation > 0) | (sizes.weights > 0)  # stages with anything to account
    f = np.flatnonzero(kind == F)
    f = f[held[stage[f]]]
    if f.size == 0:
        return dict.fromkeys(range(schedule.num_devices), 0.0)
    f_stage = stage[f].astype(np.int64)
    freed = np.empty(S * N)  # per (stage, sample): when its activations go
    freed[f_stage * N + sample[f]] = end[f]
    for k in (B, BI, BW):
        t = np.flatnonzero(kind == k)
        t = t[held[stage[t]]]
        key = stage[t].astype(np.int64) * N + sample[t]
        freed[key] = end[t] if k != BW else np.maximum(freed[key], end[t])  # BW: the later of BI/BW
    f_freed = freed[f_stage * N + sample[f]]

    stage_dev = np.full(S, -1, dtype=np.int64)
    stage_dev[f_stage] = schedule.device[f]
    opt = np.flatnonzero(kind == OPT)
    opt = opt[sizes.weights[stage[opt]] > 0]
    stash = sizes.weights[f_stage] > 0
    versions = _weight_versions(stage[opt].astype(np.int64), end[opt], f_stage[stash], start[f][stash],
                                f_freed[stash], stage_dev, sizes.weights)
    acts = (stage_dev[f_stage], start[f], f_freed, sizes.activation[f_stage])
    intervals = [np.concatenate(cols) for cols in zip(acts, versions)]
    return _peaks(*intervals, schedule.num_devices)


def _order(group: np.ndarray, time: np.ndarray) -> np.ndarray:
    """Permutation sorting by (group, time), stable. Tasks of one lane come time-sorted in
    table order, so a radix sort by group is usually enough; otherwise fall back to lexsort."""
    small = group.size == 0 or (group.min() >= 0 and group.max() < np.iinfo(np.int16).max)
    order = np.argsort(group.astype(np.int16) if small else group, kind="stable")
    g, t = group[order], time[order]
    if np.any((t[1:] < t[:-1]) & (g[1:] == g[:-1])):
        order = order[np.lexsort((t, g))]
    return order


def _weight_versions(o_stage: np.ndarray, o_end: np.ndarray, f_stage: np.ndarray, f_start: np.ndarray,
                     f_freed: np.ndarray, stage_dev: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, ...]:
    """(device, born, freed, bytes) of every weight version of every stage (version 0 too)."""
    S = stage_dev.size
    if o_stage.size == 0:  # inference: one version per stage, for the whole run
        return stage_dev, np.zeros(S), np.full(S, np.inf), np.where(stage_dev >= 0, weights, 0.0)
    o = _order(o_stage, o_end)
    o_stage, o_end = o_stage[o], o_end[o]
    first = np.searchsorted(o_stage, np.arange(S + 1))  # stage s's OPTs: first[s]:first[s + 1]
    count = np.diff(first)
    # version id of (stage s, version v) = first[s] + s + v, for v = 0..count[s]
    vid_stage = np.repeat(np.arange(S), count + 1)
    vid_base = first[vid_stage] + vid_stage
    v = np.arange(vid_stage.size) - vid_base
    # the version a forward uses: how many OPTs of its stage had ended when it started
    fo = _order(f_stage, f_start)
    fs, ft = f_stage[fo], f_start[fo]
    version = np.zeros(fs.size, dtype=np.int64)
    bounds = np.searchsorted(fs, np.arange(S + 1))
    for s in np.flatnonzero((count > 0) & (bounds[1:] > bounds[:-1])):
        lo, hi = bounds[s], bounds[s + 1]
        version[lo:hi] = np.searchsorted(o_end[first[s]:first[s + 1]], ft[lo:hi], side="right")
    ids = first[fs] + fs + version  # sorted: stages in order, versions non-decreasing in time
    last_use = np.full(vid_stage.size, -np.inf)
    if ids.size:
        cut = np.r_[0, np.flatnonzero(np.diff(ids)) + 1]
        last_use[ids[cut]] = np.maximum.reduceat(f_freed[fo], cut)
    opt_of = first[vid_stage] + v  # index of the OPT that supersedes version v
    pad = np.r_[o_end, np.inf]  # index o_end.size (and -1, for v = 0) lands on the pad
    born = np.where(v == 0, 0.0, pad[opt_of - 1])
    newest = v == count[vid_stage]
    freed = np.where(newest, np.inf, np.maximum(pad[opt_of], last_use))
    keep = stage_dev[vid_stage] >= 0
    return stage_dev[vid_stage][keep], born[keep], freed[keep], weights[vid_stage][keep]


def _peaks(device: np.ndarray, born: np.ndarray, freed: np.ndarray, size: np.ndarray,
           num_devices: int) -> dict[int, float]:
    """Peak over time of the bytes alive per device, for intervals [born, freed)."""
    peak = dict.fromkeys(range(num_devices), 0.0)
    live = size > 0
    device, born, freed, size = device[live], born[live], freed[live], size[live]
    bo = _order(device, born)
    done = np.isfinite(freed)
    fo = np.flatnonzero(done)[_order(device[done], freed[done])]
    b_dev, f_dev = device[bo], device[fo]
    b_cut = np.searchsorted(b_dev, np.arange(num_devices + 1))
    f_cut = np.searchsorted(f_dev, np.arange(num_devices + 1))
    for d in np.flatnonzero(b_cut[1:] > b_cut[:-1]):
        b, fr = bo[b_cut[d]:b_cut[d + 1]], fo[f_cut[d]:f_cut[d + 1]]
        alive_after = np.cumsum(size[b])
        gone = np.r_[0.0, np.cumsum(size[fr])][np.searchsorted(freed[fr], born[b], side="right")]
        peak[int(d)] = float(np.max(alive_after - gone))
    return peak
