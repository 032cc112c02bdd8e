"""The schedule IR: which task runs on which device and lane, in which order, after what.

A schedule is a columnar task table (numpy arrays, so 10^7 tasks stay cheap) plus explicit
dependencies ``dep_src[i] -> dep_dst[i]``. Rules every schedule obeys (``validate``):

* Each (device, lane) runs its tasks one at a time in *table order* (the issue order).
  Device -1 is "global" (a BARRIER): no lane, no device cost.
* Tasks are grouped in *waves* (``wave``, non-decreasing along the table): every
  dependency and every lane predecessor lies in a strictly earlier wave. A wave function
  is a proof that the graph is acyclic and that the issue orders cannot deadlock, and it
  lets the fast engine evaluate a whole wave with one vectorised step.
* Bytes are not stored: a cross-device dependency out of an ``F`` carries stage k's output
  activation, one out of ``B``/``BI`` carries stage k's input gradient (the cost model
  derives the sizes from the network and partition).

The compact text form writes a task as ``{stage}{KIND}{sample}@{tick}:d{device}[.{lane}]``
(``2F0@2:d2`` = stage 2 forward of sample 0 at tick 2 on device 2, as
torch.distributed.pipelining writes ``2F0``), and parses back exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from partime_sim.errors import ScheduleError

KINDS = ("F", "B", "BI", "BW", "OPT", "SEND", "RECV", "H2D", "D2H", "BARRIER")
LANES = ("compute", "send", "recv", "copy")
F, B, BI, BW, OPT, SEND, RECV, H2D, D2H, BARRIER = range(len(KINDS))
COMPUTE, SEND_LANE, RECV_LANE, COPY = range(len(LANES))
MODES = ("train", "infer")
BACKWARD_KINDS = (B, BI, BW)

_COLUMNS = ("stage", "kind", "sample", "tick", "device", "lane", "wave")
_DTYPES = {"stage": np.int32, "kind": np.int8, "sample": np.int32, "tick": np.int32,
           "device": np.int32, "lane": np.int8, "wave": np.int32}


def index_dtype(num_tasks: int) -> type:
    """Task indices in dependency arrays: int32 while it fits (half the memory of 10^7-task graphs)."""
    return np.int32 if num_tasks < np.iinfo(np.int32).max else np.int64


@dataclass(frozen=True, eq=False)
class Schedule:
    """A validated-on-demand task graph; build it with ``Schedule.build``."""

    name: str
    mode: str
    num_stages: int
    num_samples: int  # samples of the stream, or microbatches
    num_devices: int
    stage: np.ndarray
    kind: np.ndarray
    sample: np.ndarray  # -1 where a task is not tied to one sample (OPT, BARRIER)
    tick: np.ndarray
    device: np.ndarray  # -1 for global tasks (BARRIER)
    lane: np.ndarray
    wave: np.ndarray
    dep_src: np.ndarray  # sorted by dep_dst
    dep_dst: np.ndarray
    # partime-style schedules drop the backward of warm-up samples (no gradient reaches them)
    partial_backward: bool = False
    params: dict[str, Any] = field(default_factory=dict)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        name: str,
        mode: str,
        num_stages: int,
        num_samples: int,
        num_devices: int,
        tasks: dict[str, Any],
        dep_src: Any,
        dep_dst: Any,
        *,
        partial_backward: bool = False,
        params: dict[str, Any] | None = None,
    ) -> Schedule:
        """Make a schedule from column arrays (table order = issue order per lane).

        ``tasks`` holds ``stage, kind, sample, tick, device`` and optionally ``lane`` (default
        compute) and ``wave``. Without ``wave`` the waves are computed (Kahn's algorithm) and
        the table is reordered by wave, which keeps each lane's issue order.
        """
        if mode not in MODES:
            raise ScheduleError(f"mode={mode!r} is unknown; use one of {MODES}")
        n = len(tasks["stage"])
        cols = {c: np.asarray(tasks[c], dtype=_DTYPES[c]) for c in ("stage", "kind", "sample", "tick", "device")}
        cols["lane"] = np.asarray(tasks.get("lane", np.zeros(n)), dtype=np.int8)
        for c, arr in cols.items():
            if arr.shape != (n,):
                raise ScheduleError(f"task column {c!r} has shape {arr.shape}, expected ({n},)")
        src = np.asarray(dep_src, dtype=index_dtype(n))
        dst = np.asarray(dep_dst, dtype=index_dtype(n))
        if src.shape != dst.shape:
            raise ScheduleError(f"dep_src has {src.size} entries but dep_dst {dst.size}; pair them up")
        if src.size and (src.min() < 0 or dst.min() < 0 or src.max() >= n or dst.max() >= n):
            raise ScheduleError(f"a dependency names a task outside 0..{n - 1}")
        if tasks.get("wave") is None:
            wave = _compute_waves(n, src, dst, _lane_prev(cols["device"], cols["lane"]))
            order = np.argsort(wave, kind="stable")
            inverse = np.empty(n, dtype=np.int64)
            inverse[order] = np.arange(n)
            cols = {c: a[order] for c, a in cols.items()}
            cols["wave"] = wave[order].astype(np.int32)
            src, dst = inverse[src].astype(index_dtype(n)), inverse[dst].astype(index_dtype(n))
        else:
            cols["wave"] = np.asarray(tasks["wave"], dtype=np.int32)
        if dst.size > 1 and np.any(dst[1:] < dst[:-1]):
            by_dst = np.argsort(dst, kind="stable")
            src, dst = src[by_dst], dst[by_dst]
        return cls(name, mode, int(num_stages), int(num_samples), int(num_devices), **cols,
                   dep_src=src, dep_dst=dst, partial_backward=partial_backward, params=dict(params or {}))

    # ---- views --------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.stage.size)

    @property
    def lane_prev(self) -> np.ndarray:
        """Index of the previous task on the same (device, lane), or -1."""
        return _lane_prev(self.device, self.lane)

    def task_label(self, i: int) -> str:
        stage = "" if self.stage[i] < 0 else str(self.stage[i])
        sample = "" if self.sample[i] < 0 else str(self.sample[i])
        label = f"{stage}{KINDS[self.kind[i]]}{sample}@{self.tick[i]}"
        if self.device[i] >= 0:
            label += f":d{self.device[i]}"
        if self.lane[i] != COMPUTE:
            label += f".{LANES[self.lane[i]]}"
        return label

    def same_as(self, other: Schedule) -> bool:
        """Exact equality of every field and column (the text round-trip criterion)."""
        head = ("name", "mode", "num_stages", "num_samples", "num_devices", "partial_backward")
        if any(getattr(self, h) != getattr(other, h) for h in head):
            return False
        return all(np.array_equal(getattr(self, c), getattr(other, c)) for c in (*_COLUMNS, "dep_src", "dep_dst"))

    # ---- validation ---------------------------------------------------------------------
    def validate(self) -> Schedule:
        """Check every rule of the IR; raise ScheduleError naming the first broken one."""
        n, S, N = len(self), self.num_stages, self.num_samples
        if S < 1 or N < 1 or self.num_devices < 1:
            raise ScheduleError(f"{self.name}: stages={S}, samples={N}, devices={self.num_devices} must all be >= 1")
        _check_range(self, "kind", 0, len(KINDS) - 1)
        _check_range(self, "lane", 0, len(LANES) - 1)
        _check_range(self, "device", -1, self.num_devices - 1)
        _check_range(self, "sample", -1, N - 1)
        _check_range(self, "stage", -1, S - 1)
        glob = self.device < 0
        if np.any(glob & (self.kind != BARRIER)):
            i = int(np.flatnonzero(glob & (self.kind != BARRIER))[0])
            raise ScheduleError(f"{self.name}: task {self.task_label(i)} has no device; only BARRIER may be global")
        # waves: non-decreasing in table order, every edge into a strictly later wave
        if n and np.any(np.diff(self.wave) < 0):
            i = int(np.flatnonzero(np.diff(self.wave) < 0)[0]) + 1
            raise ScheduleError(f"{self.name}: task {self.task_label(i)} is listed after a later wave; sort by wave")
        bad = self.wave[self.dep_src] >= self.wave[self.dep_dst]
        if np.any(bad):
            j = int(np.flatnonzero(bad)[0])
            raise ScheduleError(
                f"{self.name}: dependency {self.task_label(self.dep_src[j])} -> {self.task_label(self.dep_dst[j])} "
                "does not go forward in time (cycle or wrong order); fix the generator's order"
            )
        prev = self.lane_prev
        has = prev >= 0
        if np.any(self.wave[prev[has]] >= self.wave[has]):
            i = int(np.flatnonzero(has)[np.flatnonzero(self.wave[prev[has]] >= self.wave[has])[0]])
            raise ScheduleError(
                f"{self.name}: task {self.task_label(i)} is issued after {self.task_label(prev[i])} on the same lane "
                "but they can run at the same time or in the other order (deadlock); reorder the lane"
            )
        self._validate_coverage()
        self._validate_unique_labels()
        return self

    def _validate_coverage(self) -> None:
        S, N = self.num_stages, self.num_samples
        fwd = self.kind == F
        counts = np.zeros((S, N), dtype=np.int64)
        np.add.at(counts, (self.stage[fwd], self.sample[fwd]), 1)
        _expect_once(self, counts, "F")
        if self.mode == "infer":
            if np.any(np.isin(self.kind, (B, BI, BW, OPT))):
                raise ScheduleError(f"{self.name}: an inference schedule has backward/OPT tasks; use mode='train'")
            fidx = np.full((S, N), -1, dtype=np.int64)
        else:
            per_kind = {}
            for k in BACKWARD_KINDS:
                sel = self.kind == k
                c = np.zeros((S, N), dtype=np.int64)
                np.add.at(c, (self.stage[sel], self.sample[sel]), 1)
                per_kind[k] = c
            fused, split_i, split_w = per_kind[B], per_kind[BI], per_kind[BW]
            if np.any(split_i != split_w) or np.any(fused * split_i):
                s, m = np.argwhere((split_i != split_w) | (fused * split_i > 0))[0]
                raise ScheduleError(
                    f"{self.name}: stage {s} sample {m} has B={fused[s, m]}, BI={split_i[s, m]}, BW={split_w[s, m]}; "
                    "a backward is either one B or one BI plus one BW"
                )
            total = fused + split_i
            if self.partial_backward:
                if np.any(total > 1):
                    s, m = np.argwhere(total > 1)[0]
                    raise ScheduleError(f"{self.name}: stage {s} sample {m} has {total[s, m]} backwards; at most 1")
            else:
                _expect_once(self, total, "backward (B or BI+BW)")
            fidx = np.full((S, N), -1, dtype=np.int64)
        # data flow: F(k, m) for k >= 1 depends on F(k-1, m)
        fidx[self.stage[fwd], self.sample[fwd]] = np.flatnonzero(fwd)
        into_f = fwd[self.dep_dst] & (self.stage[self.dep_dst] >= 1) & fwd[self.dep_src]
        ok = np.zeros(len(self), dtype=bool)
        d = self.dep_dst[into_f]
        s = self.dep_src[into_f]
        good = (self.stage[s] == self.stage[d] - 1) & (self.sample[s] == self.sample[d])
        ok[d[good]] = True
        missing = fwd & (self.stage >= 1) & ~ok
        if np.any(missing):
            i = int(np.flatnonzero(missing)[0])
            raise ScheduleError(
                f"{self.name}: {self.task_label(i)} does not depend on the forward of stage {self.stage[i] - 1} "
                "for the same sample; add that dependency"
            )

    def _validate_unique_labels(self) -> None:
        """(stage, kind, sample, tick) names a task uniquely: the text form relies on it."""
        cols = [self.stage.astype(np.int64) + 1, self.kind.astype(np.int64), self.sample.astype(np.int64) + 1,
                self.tick.astype(np.int64) - int(self.tick.min(initial=0))]
        key = np.zeros(len(self), dtype=np.int64)
        for col in cols:  # mixed-radix packing into one int64 (checked not to overflow)
            radix = int(col.max(initial=0)) + 1
            if int(key.max(initial=0)) >= (1 << 62) // radix:
                raise ScheduleError(f"{self.name}: too large to check for duplicate tasks")
            key = key * radix + col
        order = np.argsort(key, kind="stable")
        dup = np.flatnonzero(key[order[1:]] == key[order[:-1]])
        if dup.size:
            i = int(order[dup[0] + 1])
            raise ScheduleError(f"{self.name}: task {self.task_label(i)} appears more than once")

    # ---- text form ----------------------------------------------------------------------
    def to_text(self) -> str:
        head = (f"schedule {self.name} {self.mode} stages={self.num_stages} samples={self.num_samples} "
                f"devices={self.num_devices} partial_backward={int(self.partial_backward)}")
        starts = np.flatnonzero(np.r_[True, np.diff(self.wave) != 0]) if len(self) else np.array([], int)
        lines = [head, "tasks: " + " ".join(self.task_label(i) for i in range(len(self))),
                 "waves: " + " ".join(f"{self.wave[i]}+{c}" for i, c in zip(starts, np.diff(np.r_[starts, len(self)])))]
        for dst, group in _groups(self.dep_dst):
            lines.append(f"{self.task_label(dst)} <- " + " ".join(self.task_label(i) for i in self.dep_src[group]))
        return "\n".join(lines) + "\n"

    @classmethod
    def from_text(cls, text: str) -> Schedule:
        lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip() and not ln.startswith("#")]
        try:
            _, name, mode, *kv = lines[0].split()
            head = dict(item.split("=", 1) for item in kv)
            tokens = lines[1].removeprefix("tasks:").split()
        except (IndexError, ValueError):
            raise ScheduleError("schedule text must start with 'schedule NAME MODE key=value...' and a 'tasks:' line") from None
        cols = {c: [] for c in ("stage", "kind", "sample", "tick", "device", "lane")}
        index: dict[str, int] = {}
        for i, tok in enumerate(tokens):
            for c, v in zip(cols, _parse_token(tok)):
                cols[c].append(v)
            index[tok] = i
        wave = None
        rest = lines[2:]
        if rest and rest[0].startswith("waves:"):
            wave = np.concatenate([np.full(int(c), int(w)) for w, c in (p.split("+") for p in rest[0][6:].split())] or [[]])
            rest = rest[1:]
        src, dst = [], []
        for ln in rest:
            target, _, sources = ln.partition("<-")
            d = _lookup(index, target.strip())
            for tok in sources.split():
                src.append(_lookup(index, tok))
                dst.append(d)
        try:
            return cls.build(name, mode, int(head["stages"]), int(head["samples"]), int(head["devices"]),
                             {**cols, "wave": wave}, src, dst, partial_backward=bool(int(head.get("partial_backward", 0))))
        except KeyError as exc:
            raise ScheduleError(f"schedule header lacks {exc}; write stages=, samples=, devices=") from None


_TOKEN = re.compile(r"^(\d*)(BARRIER|OPT|SEND|RECV|H2D|D2H|BI|BW|F|B)(\d*)@(-?\d+)(?::d(-?\d+))?(?:\.(\w+))?$")


def _parse_token(tok: str) -> tuple[int, int, int, int, int, int]:
    m = _TOKEN.match(tok)
    if not m:
        raise ScheduleError(f"cannot parse task {tok!r}; write e.g. '2F0@2:d2' (stage, kind, sample @tick :device)")
    stage, kind, sample, tick, device, lane = m.groups()
    if lane is not None and lane not in LANES:
        raise ScheduleError(f"task {tok!r} names lane {lane!r}; lanes are {LANES}")
    return (int(stage) if stage else -1, KINDS.index(kind), int(sample) if sample else -1, int(tick),
            int(device) if device is not None else -1, LANES.index(lane) if lane else COMPUTE)


def _lookup(index: dict[str, int], tok: str) -> int:
    if tok not in index:
        raise ScheduleError(f"dependency names task {tok!r}, which is not in the 'tasks:' line")
    return index[tok]


def _check_range(s: Schedule, col: str, lo: int, hi: int) -> None:
    arr = getattr(s, col)
    bad = (arr < lo) | (arr > hi)
    if np.any(bad):
        i = int(np.flatnonzero(bad)[0])
        raise ScheduleError(f"{s.name}: task {i} has {col}={arr[i]}, outside {lo}..{hi}")


def _expect_once(s: Schedule, counts: np.ndarray, what: str) -> None:
    bad = counts != 1
    if np.any(bad):
        st, m = np.argwhere(bad)[0]
        raise ScheduleError(
            f"{s.name}: stage {st} sample {m} has {counts[st, m]} {what} tasks; every stage needs exactly one per sample"
        )


def _groups(sorted_keys: np.ndarray):
    """Yield (key, slice) for runs of equal values in a sorted array."""
    if sorted_keys.size == 0:
        return
    cuts = np.flatnonzero(np.diff(sorted_keys)) + 1
    starts = np.r_[0, cuts]
    ends = np.r_[cuts, sorted_keys.size]
    for a, b in zip(starts, ends):
        yield int(sorted_keys[a]), slice(int(a), int(b))


def _lane_prev(device: np.ndarray, lane: np.ndarray) -> np.ndarray:
    """Previous task on the same (device, lane) in table order; -1 for the first and for globals."""
    n = device.size
    key = device.astype(np.int64) * len(LANES) + lane
    small = key.max(initial=0) < np.iinfo(np.int16).max
    order = np.argsort(key.astype(np.int16) if small else key, kind="stable")
    prev = np.full(n, -1, dtype=np.int64)
    if n > 1:
        same = key[order[1:]] == key[order[:-1]]
        prev[order[1:][same]] = order[:-1][same]
    prev[device < 0] = -1
    return prev


def _ranges(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Concatenation of arange(lo[i], hi[i]) for all i, without a Python loop."""
    counts = hi - lo
    starts = np.repeat(lo - np.cumsum(counts) + counts, counts)
    return starts + np.arange(int(counts.sum()))


def _compute_waves(n: int, src: np.ndarray, dst: np.ndarray, prev: np.ndarray) -> np.ndarray:
    """Longest-path level of every task over deps + lane order (Kahn's algorithm, vectorised per level)."""
    has = prev >= 0
    all_src = np.concatenate([src, prev[has]])
    all_dst = np.concatenate([dst, np.flatnonzero(has)])
    indeg = np.bincount(all_dst, minlength=n)
    order = np.argsort(all_src, kind="stable")
    succ = all_dst[order]
    ptr = np.searchsorted(all_src[order], np.arange(n + 1))
    wave = np.zeros(n, dtype=np.int64)
    frontier = np.flatnonzero(indeg == 0)
    seen, level = 0, 0
    while frontier.size:
        wave[frontier] = level
        seen += frontier.size
        nxt = succ[_ranges(ptr[frontier], ptr[frontier + 1])]
        np.subtract.at(indeg, nxt, 1)
        frontier = np.unique(nxt[indeg[nxt] == 0])
        level += 1
    if seen != n:
        stuck = int(np.flatnonzero(indeg > 0)[0])
        raise ScheduleError(
            f"schedule has a cycle or a deadlocking issue order (task {stuck} can never start); "
            "check its dependencies against the order of each lane"
        )
    return wave
