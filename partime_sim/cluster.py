"""Devices and the links between them.

A transfer of ``b`` bytes over a link takes ``latency_s + b / bandwidth_Bps``. Each
directed device pair has its own link resource unless links name a shared ``medium``
(e.g. one PCIe switch), in which case the DES engine makes them contend for it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from partime_sim.catalogue import REF_PEAK_FLOPS, is_profile, profile_part
from partime_sim.errors import ConfigError
from partime_sim.network import load_json


@dataclass(frozen=True)
class Device:
    name: str
    kind: str = "ref"  # device class: selects Network.class_costs when present
    speed: float = 1.0  # relative to the reference device the network costs are given for
    memory_bytes: float = math.inf
    copy_engines: int = 1
    # seconds every (forward, backward, optimizer-step) task costs on top of its layers' costs:
    # the runtime's per-task work (Python, autograd, launch), measured by the profiler
    task_overhead_s: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "task_overhead_s", tuple(float(v) for v in self.task_overhead_s))
        if len(self.task_overhead_s) != 3 or not all(v >= 0 for v in self.task_overhead_s):
            raise ConfigError(f"device {self.name!r}: task_overhead_s={self.task_overhead_s!r} must be three "
                              "seconds >= 0 (forward, backward, optimizer step)")
        if not self.speed > 0:
            raise ConfigError(f"device {self.name!r}: speed={self.speed!r} must be > 0")
        if not self.memory_bytes > 0:
            raise ConfigError(f"device {self.name!r}: memory_bytes={self.memory_bytes!r} must be > 0")


@dataclass(frozen=True)
class Link:
    latency_s: float = 0.0
    bandwidth_Bps: float = math.inf
    medium: str | None = None  # links with the same medium share one resource (contention)
    # the bytes / bandwidth part of a transfer keeps the *sending* device busy (CPU processes over
    # TCP: the sending thread writes the data into the socket); only the latency is in flight
    sender_busy: bool = False
    # seconds every message costs the sending device on top of that, and the receiving one
    # (communication threads run on the cores the stages compute on), measured while both compute
    send_cost_s: float = 0.0
    recv_cost_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.latency_s >= 0:
            raise ConfigError(f"link latency_s={self.latency_s!r} must be >= 0")
        if not self.bandwidth_Bps > 0:
            raise ConfigError(f"link bandwidth_Bps={self.bandwidth_Bps!r} must be > 0 (inf for ideal)")
        for name in ("send_cost_s", "recv_cost_s"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"link {name}={value!r} must be a finite number of seconds >= 0")

    def time(self, nbytes: float) -> float:
        return self.latency_s + (0.0 if math.isinf(self.bandwidth_Bps) else nbytes / self.bandwidth_Bps)

    @property
    def is_ideal(self) -> bool:
        return self.latency_s == 0 and math.isinf(self.bandwidth_Bps) and self.send_cost_s == 0 == self.recv_cost_s


@dataclass(frozen=True)
class Cluster:
    """Devices, a default device<->device link, per-pair overrides, a host link per device."""

    name: str
    devices: tuple[Device, ...]
    link: Link = Link()
    links: dict[tuple[int, int], Link] = field(default_factory=dict)  # (src, dst) overrides
    host_link: Link = Link()  # host<->device copies (H2D of inputs, D2H of outputs)
    barrier_s: float = 0.0  # cost of one global barrier (lockstep schedules)
    # a barrier whose last two arrivals come within barrier_close_window_s of each other costs
    # barrier_close_s instead (0 window: never). Measured on a VM: an arrival that lands just as
    # the earlier one's core is going idle can miss its wake-up for milliseconds
    barrier_close_s: float = 0.0
    barrier_close_window_s: float = 0.0
    # compute tasks take this factor longer when a schedule runs on more than one device: the
    # devices share one host's cores, caches and memory bandwidth (measured by the profiler)
    concurrency_slowdown: float = 1.0
    # a compute task that starts after its device sat idle for t seconds takes longer: ``extra``
    # interpolated from these (idle_s, extra_s) points (from (0, 0); held beyond the last). A
    # core left idle (blocked on a message or a barrier) comes back slow: caches, clock, a VM's
    # vCPU descheduled; on a 2-core VM a lenet forward ran +0.05 ms after 0.1 ms idle and +0.4 ms
    # after 3 ms (measured by the profiler; empty: no penalty)
    idle_penalty: tuple[tuple[float, float], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "devices", tuple(self.devices))
        if not self.devices:
            raise ConfigError(f"cluster {self.name!r} has no devices; give at least one")
        if not self.barrier_s >= 0:
            raise ConfigError(f"cluster {self.name!r}: barrier_s={self.barrier_s!r} must be >= 0")
        for name in ("barrier_close_s", "barrier_close_window_s"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"cluster {self.name!r}: {name}={value!r} must be a finite number of seconds >= 0")
        if self.barrier_close_window_s > 0 and self.barrier_close_s < self.barrier_s:
            raise ConfigError(f"cluster {self.name!r}: barrier_close_s={self.barrier_close_s!r} is below "
                              f"barrier_s={self.barrier_s!r}; a close arrival costs at least a barrier "
                              "(or set barrier_close_window_s=0 to turn the rule off)")
        if not (self.concurrency_slowdown >= 1.0 and math.isfinite(self.concurrency_slowdown)):
            raise ConfigError(f"cluster {self.name!r}: concurrency_slowdown={self.concurrency_slowdown!r} must be "
                              "a finite factor >= 1 (1.0 = devices do not slow each other)")
        object.__setattr__(self, "idle_penalty", _idle_points(self.name, self.idle_penalty))
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
            "barrier_close_s": self.barrier_close_s,
            "barrier_close_window_s": self.barrier_close_window_s,
            "concurrency_slowdown": self.concurrency_slowdown,
            "idle_penalty": [list(p) for p in self.idle_penalty],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Cluster:
        try:
            links = {}
            for row in data.get("links", []):
                row = dict(row)
                key = (int(row.pop("src")), int(row.pop("dst")))  # pop before Link(**row) runs
                links[key] = Link(**row)
            return cls(
                name=data["name"],
                devices=tuple(Device(**d) for d in data["devices"]),
                link=Link(**data.get("link", {})),
                links=links,
                host_link=Link(**data.get("host_link", {})),
                barrier_s=data.get("barrier_s", 0.0),
                barrier_close_s=data.get("barrier_close_s", 0.0),
                barrier_close_window_s=data.get("barrier_close_window_s", 0.0),
                concurrency_slowdown=data.get("concurrency_slowdown", 1.0),
                idle_penalty=data.get("idle_penalty", ()),
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


def barrier_rounds(num_devices: int) -> int:
    """Message rounds of a dissemination barrier: ceil(log2 n) (Hensgen, Finkel & Manber 1988)."""
    return math.ceil(math.log2(num_devices)) if num_devices > 1 else 0


def ideal_cluster(num_devices: int) -> Cluster:
    """Identical reference devices, zero-cost links: the analytic baseline."""
    return Cluster("ideal", tuple(Device(f"dev{i}") for i in range(num_devices)))


# ---- presets ---------------------------------------------------------------------------
# Speeds are fp32 peak FLOP/s relative to the reference device of catalogue.py (H100 SXM5):
# the catalogue networks are mostly compute-bound on its roofline, so the compute ratio is
# the one that matters; for memory-bound work use per-class costs (Network.class_costs).
# Bandwidths are per direction; each directed device pair is its own link (switched fabric).
GiB = 2**30


@dataclass(frozen=True)
class Preset:
    """Per-device figures of a homogeneous cluster; ``cluster_preset`` builds one of any size."""

    description: str
    kind: str
    peak_flops: float
    memory_bytes: float
    link: Link
    host_link: Link
    copy_engines: int = 1

    def build(self, name: str, num_devices: int) -> Cluster:
        speed = self.peak_flops / REF_PEAK_FLOPS
        devices = tuple(Device(f"{self.kind}:{i}", self.kind, speed, self.memory_bytes, self.copy_engines)
                        for i in range(num_devices))
        # dissemination barrier: one message latency per round
        barrier_s = barrier_rounds(num_devices) * self.link.latency_s
        return Cluster(name, devices, link=self.link, host_link=self.host_link, barrier_s=barrier_s)


_PRESETS: dict[str, Preset] = {
    "h100-nvlink": Preset(
        "H100 SXM5 80GB (the reference device) in one NVLink 4 switch domain, PCIe Gen5 host link",
        kind="h100-sxm",
        peak_flops=REF_PEAK_FLOPS,  # NVIDIA H100 datasheet: FP32 67 TFLOPS (SXM5)
        memory_bytes=80 * GiB,  # H100 datasheet: 80 GB HBM3
        # H100 datasheet: NVLink 900 GB/s total = 450 GB/s each way (p2pBandwidthLatencyTest
        # reaches ~376 GB/s, NVIDIA/nccl#1264); NCCL send/recv latency ~3 us (NVIDIA/nccl#1487)
        link=Link(latency_s=3e-6, bandwidth_Bps=450e9),
        # H100 datasheet: PCIe Gen5 128 GB/s = 64 GB/s each way; a copy's fixed cost is a few us
        # (cuda-samples#230 p2pBandwidthLatencyTest: 2-7 us for host-involved copies)
        host_link=Link(latency_s=5e-6, bandwidth_Bps=64e9),
        copy_engines=2,  # CUDA guide, asyncEngineCount 2: one H2D and one D2H copy overlap compute
    ),
    "h100-pcie": Preset(
        "H100 PCIe 80GB, GPU-to-GPU over PCIe Gen5 (no NVLink bridge)",
        kind="h100-pcie",
        peak_flops=51e12,  # NVIDIA H100 datasheet: FP32 51 TFLOPS (PCIe card)
        memory_bytes=80 * GiB,  # H100 datasheet: 80 GB HBM2e
        # PCIe Gen5 x16: 128 GB/s = 64 GB/s each way (H100 datasheet); peer latency between
        # NVLink P2P (~2 us) and copies staged through the host (11-20 us), cuda-samples#230
        link=Link(latency_s=10e-6, bandwidth_Bps=64e9),
        host_link=Link(latency_s=5e-6, bandwidth_Bps=64e9),  # same PCIe Gen5 x16 slot
        copy_engines=2,
    ),
    "a100-nvlink": Preset(
        "A100 SXM4 80GB in one NVLink 3 switch domain (DGX/HGX A100), PCIe Gen4 host link",
        kind="a100-sxm",
        peak_flops=19.5e12,  # NVIDIA A100 datasheet: FP32 19.5 TFLOPS
        memory_bytes=80 * GiB,  # A100 datasheet: 80 GB HBM2e
        # A100 datasheet: NVLink 600 GB/s total = 300 GB/s each way; P2P write latency ~3 us
        # on DGX-A100 (NVIDIA/nccl-tests#123)
        link=Link(latency_s=3e-6, bandwidth_Bps=300e9),
        host_link=Link(latency_s=5e-6, bandwidth_Bps=32e9),  # A100 datasheet: PCIe Gen4 64 GB/s = 32 each way
        copy_engines=2,
    ),
    "cpu-gloo": Preset(
        "one CPU core per stage, processes talking torch.distributed gloo over TCP loopback",
        kind="cpu-core",
        # one x86 core with 2 x 256-bit FMA pipes: 32 fp32 FLOP/cycle at ~3.1 GHz ~ 100 GFLOP/s;
        # measured 101 GFLOP/s (1024^2 sgemm, torch 2.13, 1 thread, AMD EPYC Zen 4 KVM guest)
        peak_flops=100e9,
        memory_bytes=math.inf,  # host RAM is shared; set memory_bytes in a JSON cluster to cap it
        # gloo send/recv ping-pong measured on the same 2-vCPU guest: ~220 us one-way for 4 B,
        # ~4 GB/s for 16-64 MB (cf. pytorch/pytorch#8766: ~70 us p50 for 4 KB between local
        # processes on bare metal; meta-pytorch/torchft#199: ~2.4 GB/s for 40 MB over gloo TCP)
        link=Link(latency_s=200e-6, bandwidth_Bps=4e9),
        host_link=Link(),  # inputs are already in host memory: no copy
    ),
}

PRESETS: dict[str, str] = {
    "ideal": "reference devices (H100 SXM5 roofline), zero-cost links and barriers: the analytic baseline",
    **{name: p.description for name, p in _PRESETS.items()},
}


def _check_count(num_devices: int) -> None:
    if isinstance(num_devices, bool) or not isinstance(num_devices, int) or num_devices < 1:
        raise ConfigError(f"num_devices={num_devices!r} is invalid; give an integer >= 1")


def cluster_preset(name: str, num_devices: int) -> Cluster:
    """A named homogeneous cluster of ``num_devices`` devices (see ``PRESETS``)."""
    _check_count(num_devices)
    if name == "ideal":
        return ideal_cluster(num_devices)
    if name not in _PRESETS:
        raise ConfigError(f"cluster preset {name!r} is unknown; use one of {', '.join(PRESETS)} or a cluster JSON file")
    return _PRESETS[name].build(name, num_devices)


def load_cluster(spec: str, num_devices: int) -> Cluster:
    """A preset name, a Cluster JSON file (``*.json``) with at least ``num_devices`` devices, or a
    profile file from ``partime-sim profile`` (see ``resize_profiled``)."""
    spec = str(spec).strip()
    if not spec.endswith(".json"):
        return cluster_preset(spec, num_devices)
    data = load_json(spec)
    if is_profile(data):
        return resize_profiled(Cluster.from_dict(profile_part(data, "cluster", spec)), num_devices)
    cluster = Cluster.from_dict(data)
    if cluster.num_devices < num_devices:
        raise ConfigError(
            f"cluster file {spec!r} has {cluster.num_devices} devices but {num_devices} are needed; "
            "add devices to the file or use fewer"
        )
    return cluster


def _idle_points(name: str, points: Any) -> tuple[tuple[float, float], ...]:
    """``Cluster.idle_penalty`` as a tuple of (idle_s, extra_s) with idle_s > 0 increasing and
    extra_s >= 0, all finite."""
    try:
        pts = tuple((float(t), float(x)) for t, x in points)
    except (TypeError, ValueError):
        raise ConfigError(f"cluster {name!r}: idle_penalty={points!r} must be a list of (idle_s, extra_s) "
                          "pairs, e.g. [[1e-4, 5e-5], [3e-3, 4e-4]]") from None
    idle = [t for t, _ in pts]
    if not all(math.isfinite(t) and math.isfinite(x) and t > 0 and x >= 0 for t, x in pts) or \
            any(b <= a for a, b in zip(idle, idle[1:])):
        raise ConfigError(f"cluster {name!r}: idle_penalty={points!r} needs finite idle_s > 0 in increasing "
                          "order and extra_s >= 0 (seconds)")
    return pts


def resize_profiled(cluster: Cluster, num_devices: int) -> Cluster:
    """A profiled cluster with ``num_devices`` devices.

    The same count returns it as measured. Another count gives ``num_devices`` copies of its
    first device (the profiled device class, so the network's measured costs apply, speed 1.0)
    joined by its default link, with its host link, and its barrier costs rescaled by dissemination
    rounds: a profile of two CPU processes already says what any pair of them costs, so one
    profile serves every device count (per-pair overrides are dropped). The concurrency
    slowdown is kept as measured (for the profiled number of concurrent devices), and so is the
    idle penalty (a property of one core).
    """
    _check_count(num_devices)
    if num_devices == cluster.num_devices:
        return cluster
    first = cluster.devices[0]
    devices = tuple(dataclasses.replace(first, name=f"{first.kind}:{i}") for i in range(num_devices))
    rounds, measured = barrier_rounds(num_devices), max(barrier_rounds(cluster.num_devices), 1)
    return Cluster(cluster.name, devices, link=cluster.link, host_link=cluster.host_link,
                   barrier_s=rounds * (cluster.barrier_s / measured),
                   barrier_close_s=rounds * (cluster.barrier_close_s / measured),
                   barrier_close_window_s=cluster.barrier_close_window_s,
                   concurrency_slowdown=cluster.concurrency_slowdown, idle_penalty=cluster.idle_penalty)
