"""Contiguous layer ranges per stage, a stage -> device map, and the partitioners.

Cost model (every partitioner here is judged by it; ``stage_times`` computes it):

- Compute: stage k runs on device ``devices[k]``; its compute time is the sum over its
  layers of ``Network.costs(device.kind, device.speed)``: ``fwd`` in mode ``"infer"``,
  ``fwd + bwd_input + bwd_weight + opt`` in mode ``"train"`` (the streaming schedules update
  after every sample, so a parameter-heavy stage pays its optimizer step every tick). So
  heterogeneous devices (other speeds, or measured per-class costs) give the same layers a
  different cost.
- Transfers: a stage k < S-1 ending at layer j-1 sends that layer's ``act_bytes`` to stage
  k+1's device; in training a stage k >= 1 starting at layer i sends the gradient of its
  input (the same size, ``act_bytes`` of layer i-1) back to stage k-1's device. Each takes
  ``cluster.transfer_time(src, dst, bytes)``, 0 on the same device.
- Stage cost = compute + the transfers it sends; the bottleneck = the largest stage cost.
  Transfers are counted as not overlapped with compute: conservative, and what PARTIME's
  lockstep ticks do (a tick ends when every copy has landed).

Partitioners: ``partition_minmax`` (exact: smallest possible bottleneck), ``partition_block``
(PARTIME's block-partition heuristic) and ``even_partition`` (equal layer counts, which is
PARTIME's ``compute_naive_balance``); ``compare_partitioners`` says how far apart they are.
A device named by two stages counts as two independent stages here (their loads are not
added): give every stage its own device to model a pipeline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from partime_sim.errors import ConfigError, PartitionError

if TYPE_CHECKING:
    from partime_sim.cluster import Cluster
    from partime_sim.network import Network

MODES = ("train", "infer")
# The min-max DP evaluates stage costs in blocks of at most this many elements (memory cap).
_CHUNK_ELEMS = 1 << 20


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
    """Equal layer counts (the first ``num_layers % num_stages`` stages get one more), which is
    what PARTIME's ``compute_naive_balance`` (common.py, used in its experiment A) does."""
    _check_stages(num_layers, num_stages)
    q, r = divmod(num_layers, num_stages)
    return Partition.from_sizes([q + (i < r) for i in range(num_stages)], num_layers)


# ---- input checks -----------------------------------------------------------------------

def _check_stages(num_layers: int, num_stages: int) -> None:
    if isinstance(num_stages, bool) or not isinstance(num_stages, (int, np.integer)) \
            or not 1 <= num_stages <= num_layers:
        raise PartitionError(
            f"{num_stages} stages for a {num_layers}-layer network is impossible; "
            f"use between 1 and {num_layers} stages or a deeper network"
        )


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"mode={mode!r} is unknown; use 'train' or 'infer'")


def _stage_devices(cluster: Cluster, num_stages: int, devices: Sequence[int] | None) -> tuple[int, ...]:
    """The stage -> device map: ``devices`` checked against the cluster, or 0..S-1."""
    n = cluster.num_devices
    if devices is None:
        if num_stages > n:
            raise PartitionError(
                f"{num_stages} stages need {num_stages} devices but cluster {cluster.name!r} has {n}; "
                "use a cluster with more devices or pass devices= (one device index per stage)"
            )
        return tuple(range(num_stages))
    devices = tuple(int(d) for d in devices)
    if len(devices) != num_stages:
        raise PartitionError(
            f"devices={list(devices)} has {len(devices)} entries for {num_stages} stages; give one device per stage"
        )
    bad = [d for d in devices if not 0 <= d < n]
    if bad:
        raise PartitionError(
            f"devices={list(devices)} names {bad}, but cluster {cluster.name!r} has devices 0..{n - 1}; "
            "use existing device indices or a bigger cluster"
        )
    return devices


# ---- cost model ---------------------------------------------------------------------------

def _layer_compute(costs: np.ndarray, mode: str) -> np.ndarray:
    """Per-layer compute seconds from an (L, 3) fwd/bwd_input/bwd_weight array."""
    return costs[:, 0].copy() if mode == "infer" else costs[:, 0] + costs[:, 1] + costs[:, 2]


class _StageCosts:
    """Stage k on ``devices[k]`` owning layers [i, j) costs
    ``(prefix[k][j] - prefix[k][i]) + send[k][j] + grad[k][i]``.

    One formula, used by the DP and by ``stage_times`` alike, so the bottleneck the DP
    optimises is bit for bit the one ``bottleneck`` reports (and brute force compares).
    ``i`` and ``j`` may be broadcasting index arrays.
    """

    def __init__(self, network: Network, cluster: Cluster, devices: tuple[int, ...], mode: str) -> None:
        # nbytes[j] = output bytes of layer j-1: what a stage ending at j sends forward and
        # what a stage starting at j sends back as a gradient (index 0 is never sent)
        nbytes = np.concatenate([[0.0], network.act_bytes().astype(float)])
        zeros = np.zeros_like(nbytes)
        prefixes: dict[tuple[str, float], np.ndarray] = {}
        links: dict[Any, np.ndarray] = {None: zeros}  # Link -> times; None: same device

        def link_times(src: int, dst: int) -> np.ndarray:
            link = None if src == dst else cluster.link_between(src, dst)
            if link not in links:
                links[link] = _transfer_times(cluster, src, dst, nbytes)
            return links[link]

        self.prefix: list[np.ndarray] = []
        self.send: list[np.ndarray] = []
        self.grad: list[np.ndarray] = []
        last = len(devices) - 1
        for k, d in enumerate(devices):
            dev = cluster.devices[d]
            key = (dev.kind, dev.speed)
            if key not in prefixes:
                compute = _layer_compute(network.costs(dev.kind, dev.speed), mode)
                if mode == "train":
                    compute = compute + network.opt_costs(dev.speed)
                prefixes[key] = np.concatenate([[0.0], np.cumsum(compute)])
            self.prefix.append(prefixes[key])
            self.send.append(link_times(d, devices[k + 1]) if k < last else zeros)
            self.grad.append(link_times(d, devices[k - 1]) if mode == "train" and k > 0 else zeros)

    def cost(self, k: int, i: Any, j: Any) -> Any:
        prefix = self.prefix[k]
        return (prefix[j] - prefix[i]) + self.send[k][j] + self.grad[k][i]


def _transfer_times(cluster: Cluster, src: int, dst: int, nbytes: np.ndarray) -> np.ndarray:
    """``cluster.transfer_time(src, dst, b)`` for every b in ``nbytes``, vectorised."""
    if src == dst:
        return np.zeros_like(nbytes)
    link = cluster.link_between(src, dst)
    if math.isinf(link.bandwidth_Bps):
        return np.full_like(nbytes, link.latency_s)
    return link.latency_s + nbytes / link.bandwidth_Bps


def stage_times(network: Network, cluster: Cluster, partition: Partition, mode: str = "train") -> np.ndarray:
    """(S,) stage costs in seconds: compute + transfers sent (see the module docstring)."""
    _check_mode(mode)
    partition.check_fits(network.num_layers, cluster.num_devices)
    sc = _StageCosts(network, cluster, partition.devices, mode)
    b = partition.bounds
    return np.array([sc.cost(k, b[k], b[k + 1]) for k in range(partition.num_stages)], dtype=float)


def bottleneck(network: Network, cluster: Cluster, partition: Partition, mode: str = "train") -> float:
    """The largest stage cost: the steady-state time per sample of a pipeline on this partition."""
    return float(stage_times(network, cluster, partition, mode).max())


# ---- exact min-max --------------------------------------------------------------------

def partition_minmax(network: Network, cluster: Cluster, num_stages: int, mode: str = "train",
                     devices: Sequence[int] | None = None) -> Partition:
    """The contiguous partition with the smallest possible bottleneck (transfers included).

    Stage k runs on ``devices[k]`` (default: device k). Exact dynamic programme over
    (stage, end layer); a greedy or a binary search on a greedy feasibility test would be
    wrong here because a stage's cost is not monotone in its range (ending one layer later
    can send a smaller activation). Among optimal partitions it returns the most balanced
    one (smallest sum of squared stage costs); remaining ties go to the earliest boundaries.

    Speed: a stage whose compute alone exceeds an upper bound (the better of two quick
    partitions) cannot be optimal, so the DP only scans stages of at most ``band`` layers:
    time O(S W band) with W = L - S + 1, memory O(S W). 1024 layers on 1024 stages, or a
    balanced network on any stage count, takes well under a second; the worst case (layers
    with no compute, so the band is all of W) is O(S W^2).
    """
    _check_mode(mode)
    num_layers = network.num_layers
    _check_stages(num_layers, num_stages)
    devices = _stage_devices(cluster, num_stages, devices)
    sc = _StageCosts(network, cluster, devices, mode)
    upper = min(_max_cost(sc, b) for b in _quick_bounds(sc, num_layers, num_stages))
    best = _minmax_bottleneck(sc, num_layers, num_stages, _band(sc, num_layers, num_stages, upper))
    bounds = _most_balanced(sc, num_layers, num_stages, best, _band(sc, num_layers, num_stages, best))
    return Partition(bounds, devices)


def _quick_bounds(sc: _StageCosts, num_layers: int, num_stages: int) -> list[np.ndarray]:
    """Equal layer counts, and equal compute on stage 0's device: cheap upper bounds."""
    prefix = sc.prefix[0]
    proportional = np.searchsorted(prefix, prefix[-1] * np.arange(num_stages + 1) / num_stages)
    return [np.array(even_partition(num_layers, num_stages).bounds), _at_least_one_layer(proportional, num_layers)]


def _max_cost(sc: _StageCosts, bounds: np.ndarray) -> float:
    return max(float(sc.cost(k, bounds[k], bounds[k + 1])) for k in range(len(bounds) - 1))


def _at_least_one_layer(bounds: np.ndarray, num_layers: int) -> np.ndarray:
    """Non-decreasing bounds moved as little as possible so every block has >= 1 layer."""
    b = np.clip(np.asarray(bounds, dtype=np.int64), 0, num_layers)
    b[0], b[-1] = 0, num_layers
    k = np.arange(b.size)
    b = np.maximum.accumulate(b - k) + k  # b[k] >= b[k-1] + 1, pushing right
    b[-1] = num_layers
    return np.minimum.accumulate((b - k)[::-1])[::-1] + k  # b[k] <= b[k+1] - 1, pulling left


def _band(sc: _StageCosts, num_layers: int, num_stages: int, limit: float) -> int:
    """Most layers any stage costing <= limit can own (its compute alone must fit), plus one."""
    width = num_layers - num_stages + 1
    if not math.isfinite(limit):
        return width
    band, first = 1, np.arange(num_layers + 1)
    for prefix in {id(p): p for p in sc.prefix}.values():
        margin = 1e-9 * (prefix[-1] + limit)  # covers rounding in the DP's prefix differences
        last = np.searchsorted(prefix, prefix + (limit + margin), side="right") - 1
        band = max(band, int((last - first).max()) + 1)
    return min(band, width)


def _candidates(sc: _StageCosts, k: int, num_stages: int, width: int,
                band: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Stage k's candidate ranges in row chunks: yields (b, a, valid, cost).

    Row b: stage k ends at j = k + 1 + b. Column e: it owns d = band - e layers, so starts at
    i = j - d = k + a (a indexes the previous stage's DP row; valid when a >= 0). Columns
    run from the earliest start to the latest, so argmin's first hit is the earliest start.
    Only the final stage's row j = L matters, so it alone is computed.
    """
    first = width - 1 if k == num_stages - 1 else 0
    step = max(1, _CHUNK_ELEMS // band)
    d = np.arange(band, 0, -1)
    for b0 in range(first, width, step):
        b = np.arange(b0, min(width, b0 + step))
        a = b[:, None] + 1 - d[None, :]
        valid = a >= 0
        a = np.maximum(a, 0)
        yield b, a, valid, sc.cost(k, k + a, (k + 1 + b)[:, None])


def _minmax_bottleneck(sc: _StageCosts, num_layers: int, num_stages: int, band: int) -> float:
    """best[k][j] = min_i max(best[k-1][i], cost_k(i, j)); returns best[S-1][L]."""
    width = num_layers - num_stages + 1
    prev = sc.cost(0, 0, np.arange(1, width + 1))  # stage 0 owns layers [0, j), j = 1 + b
    for k in range(1, num_stages):
        cur = np.full(width, np.inf)
        for b, a, valid, cost in _candidates(sc, k, num_stages, width, band):
            m = np.maximum(cost, prev[a])
            m[~valid] = np.inf
            cur[b] = m.min(axis=1)
        prev = cur
    return float(prev[width - 1])


def _most_balanced(sc: _StageCosts, num_layers: int, num_stages: int, best: float, band: int) -> tuple[int, ...]:
    """Bounds minimising the sum of squared stage costs among those with every stage <= best."""
    width = num_layers - num_stages + 1
    c0 = sc.cost(0, 0, np.arange(1, width + 1))
    prev = np.where(c0 <= best, c0 * c0, np.inf)
    choice = np.zeros((num_stages, width), dtype=np.int64)  # stage k's start, as a
    for k in range(1, num_stages):
        cur = np.full(width, np.inf)
        for b, a, valid, cost in _candidates(sc, k, num_stages, width, band):
            total = prev[a] + cost * cost
            total[~valid | (cost > best)] = np.inf
            e = total.argmin(axis=1)
            rows = np.arange(b.size)
            choice[k, b] = a[rows, e]
            cur[b] = total[rows, e]
        prev = cur
    assert np.isfinite(prev[width - 1]), "min-max DP found no partition within its own optimum"
    bounds, a = [num_layers], width - 1
    for k in range(num_stages - 1, 0, -1):
        a = int(choice[k, a])
        bounds.append(k + a)
    return tuple(reversed(bounds + [0]))


# ---- PARTIME's block-partition heuristic ------------------------------------------------

def partition_block(network: Network, num_stages: int, mode: str = "train") -> Partition:
    """PARTIME's block partition (``_sequence_block_partitions`` in sailab-code/partime
    ``partime/balancing.py``, used for its experiments B and C).

    It normalises per-layer times to [0, 1] (``(t - min) / (max - min)``), starts from
    blocks of ``L // S`` layers (the last takes the rest), and runs the local search of
    Barany & Grinberg, "Block partitions of sequences" (arXiv 1308.2452): while the largest
    block sum M exceeds the smallest m by more than 1, the smallest block takes one layer
    from its neighbour on the side of a largest block. It ignores transfers and device
    speeds (PARTIME balances times measured on one device).

    Layer times are reference-device compute times in ``mode`` (PARTIME measured forward
    passes, i.e. ``mode="infer"``; ``"train"`` is the natural extension to training).
    Blocks may go empty during the search, as in the paper. Where PARTIME's code would
    fail we differ:

    - constant times (it divides by zero) count 1 each, so blocks balance by layer count;
    - a block next to an empty one takes the layer of the nearest non-empty block
      (PARTIME's indices would cross);
    - block sums are exactly rounded (``math.fsum``): with rounded sums the search can
      cycle forever, passing a weight-1 layer back and forth because 0 + 1 summed to just
      over 1; a state seen before also stops it;
    - blocks still empty at the end take a layer from their neighbours (PARTIME would
      build an empty stage);
    - it runs on the layers only: PARTIME adds the host copies as two extra items, then
      subtracts them from blocks 0 and 1 (which looks like a slip for 0 and -1).
    """
    _check_mode(mode)
    num_layers = network.num_layers
    _check_stages(num_layers, num_stages)
    times = _layer_compute(network.costs(), mode)
    lo, hi = float(times.min()), float(times.max())
    weights = (times - lo) / (hi - lo) if hi > lo else np.ones(num_layers)
    w = weights.tolist()
    bounds = np.array([num_layers // num_stages * x for x in range(num_stages)] + [num_layers])

    def block_sum(k: int) -> float:  # exactly rounded: no rounding-made imbalance or cycle
        return math.fsum(w[bounds[k]:bounds[k + 1]])

    sums = np.array([block_sum(k) for k in range(num_stages)])
    p = int(sums.argmax())  # a largest block; it stays largest until it gives a layer away
    seen: set[bytes] = set()
    for _ in range(10 * num_layers * num_stages + 100):  # safety nets: a move limit and a cycle check
        q = int(sums.argmin())
        state = bounds.tobytes() + bytes([p > q])
        if sums[p] <= sums[q] + 1.0 or state in seen:
            break
        seen.add(state)
        if p < q:  # q takes the last layer before it; empty blocks in between stay empty
            first = int(np.searchsorted(bounds, bounds[q], side="left"))
            bounds[first:q + 1] -= 1
            donor = first - 1
        else:  # q takes the first layer after it
            stop = int(np.searchsorted(bounds, bounds[q + 1], side="right"))
            bounds[q + 1:stop] += 1
            donor = stop - 1
        sums[q], sums[donor] = block_sum(q), block_sum(donor)
        if donor == p:
            p = int(sums.argmax())
    bounds = _at_least_one_layer(bounds, num_layers)
    return Partition(tuple(int(b) for b in bounds), tuple(range(num_stages)))


# ---- report -----------------------------------------------------------------------------

def compare_partitioners(network: Network, cluster: Cluster, num_stages: int, mode: str = "train") -> dict[str, Any]:
    """Bottlenecks of min-max, PARTIME's block heuristic and equal layer counts on stages
    0..S-1 of ``cluster``, and by how much min-max beats the heuristic:
    ``improvement_pct = 100 * (block - minmax) / block`` (0 when both are 0)."""
    minmax = partition_minmax(network, cluster, num_stages, mode)
    block = partition_block(network, num_stages, mode)
    even = even_partition(network.num_layers, num_stages)
    b_minmax, b_block, b_even = (bottleneck(network, cluster, p, mode) for p in (minmax, block, even))
    return {
        "minmax_bottleneck_s": b_minmax,
        "block_bottleneck_s": b_block,
        "even_bottleneck_s": b_even,
        "improvement_pct": 100.0 * (b_block - b_minmax) / b_block if b_block > 0 else 0.0,
        "minmax_sizes": list(minmax.sizes),
        "block_sizes": list(block.sizes),
    }
