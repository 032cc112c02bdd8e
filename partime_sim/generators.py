"""Schedule generators: pure functions ``(name, stages, samples, mode) -> Schedule``.

Every generator writes the same IR (see ``schedule.py``) so the timing engines, the staleness
walker and the backends never special-case a schedule. Conventions shared by all of them:

* stage k runs on ``devices[k]`` (default k) on the compute lane; ``sequential`` puts every
  stage on device 0;
* ``sample`` is the sample (= microbatch) a task processes, -1 for OPT and BARRIER;
* ``tick`` is the generator's clock: PARTIME's tick for ``partime``/``partime-async``, and for
  the others the slot of the ideal unit-cost timeline (F = B = BI = BW = 1 slot, OPT = 0);
* dependencies are the data flow only (the lane order is the table order):
  F(k,m) <- F(k-1,m); B(k,m) and BI(k,m) <- F(k,m) and the input gradient of stage k+1;
  BW(k,m) <- BI(k,m) (the weight gradient reuses the cotangent BI consumed, as torch's
  ``backward_weight`` does); OPT <- every B/BW of its stage since that stage's previous OPT;
* waves are given here (never recomputed by ``Schedule.build``): PARTIME's from its ticks,
  the others from the unit-cost timeline (an OPT sits between its backward and the next task).

``partime`` is built in closed form with numpy (10^7 tasks in well under a second); the
others are replayed on the unit-cost timeline, vectorised over stages, one step per slot.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from partime_sim.errors import ConfigError, ScheduleError
from partime_sim.schedule import B, BARRIER, BI, BW, F, MODES, OPT, Schedule, index_dtype

SCHEDULES: dict[str, str] = {
    "sequential": "one device runs every stage in turn, per-sample SGD (the baseline)",
    "partime": "PARTIME: lockstep ticks with a global barrier, every stage F+B on a different sample each tick",
    "partime-async": "PARTIME's tasks and data flow without the barrier: each stage goes when its inputs are there",
    "gpipe": "GPipe: fill all microbatches, drain all backwards, one synchronous update per minibatch (flush)",
    "1f1b": "PipeDream 1F1B: one forward one backward, update after every backward, weight stashing, no flush",
    "pipedream": "alias of 1f1b",
    "zb-h1": "zero-bubble ZB-H1 (Qi et al. 2024): BI/BW split, W passes fill the tail, flush per minibatch",
    "layerpipe": "LayerPipe: 1F1B with BI/BW split, BI sent upstream at once, its BW next, update after every BW",
}
ALIASES = {"pipedream": "1f1b"}


def generate(
    name: str,
    num_stages: int,
    num_samples: int,
    mode: str = "train",
    *,
    microbatches: int | None = None,
    devices: Sequence[int] | None = None,
) -> Schedule:
    """Build schedule ``name`` for ``num_stages`` stages and ``num_samples`` samples (microbatches).

    ``microbatches`` is the minibatch size of the flushed schedules (gpipe, zb-h1; default: all
    samples in one minibatch); the streaming schedules have no minibatch and ignore it.
    """
    if name not in SCHEDULES:
        raise ConfigError(f"schedule {name!r} is unknown; use one of {', '.join(SCHEDULES)}")
    S = _positive("num_stages", num_stages)
    N = _positive("num_samples", num_samples)
    if mode not in MODES:
        raise ConfigError(f"mode={mode!r} is unknown; use one of {MODES}")
    M = N if microbatches is None else min(_positive("microbatches", microbatches), N)
    canon = ALIASES.get(name, name)
    if canon == "sequential":
        if devices is not None:
            raise ConfigError("sequential runs every stage on device 0; drop devices=")
        return _sequential(S, N, mode)
    dev = _device_map(devices, S)
    if canon in ("partime", "partime-async"):
        return _partime(canon, S, N, mode, dev, barrier=canon == "partime", partial=True)
    if mode == "infer":  # every other schedule just streams the forwards
        return _partime(canon, S, N, mode, dev, barrier=False, partial=False)
    if canon == "gpipe":
        return _flushed(canon, S, N, M, dev, _orders_gpipe)
    if canon == "zb-h1":
        return _flushed(canon, S, N, M, dev, _orders_zb_h1)
    if canon == "1f1b":
        stage, kind, sample, tick = _play_orders(*_orders_1f1b(S, N), S, N)
    else:  # layerpipe
        stage, kind, sample, tick = _play_orders(*_orders_layerpipe(S, N), S, N)
    return _finish(canon, S, N, dev, stage, kind, sample, tick)


def _positive(what: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{what}={value!r} is invalid; give an integer >= 1")
    return int(value)


def _device_map(devices: Sequence[int] | None, S: int) -> np.ndarray:
    """Stage -> device as an array; one stage per device (a shared device needs its own order)."""
    if devices is None:
        return np.arange(S, dtype=np.int32)
    dev = np.asarray(list(devices))
    if dev.shape != (S,) or not np.issubdtype(dev.dtype, np.integer):
        raise ConfigError(f"devices={list(devices)!r} must list one integer device per stage ({S} stages)")
    if dev.min() < 0 or np.unique(dev).size != S:
        raise ConfigError(f"devices={list(devices)!r} must be distinct and >= 0; use 'sequential' for one device")
    return dev.astype(np.int32)


# ---- small numpy helpers ------------------------------------------------------------------
def _ranges(starts: np.ndarray, counts: np.ndarray, dtype=np.int64) -> np.ndarray:
    """Concatenation of ``arange(s, s + c)`` for every (s, c), without a Python loop."""
    counts = np.asarray(counts, dtype=np.int64)
    first = np.cumsum(counts) - counts
    return np.repeat((np.asarray(starts) - first).astype(dtype), counts) + np.arange(int(counts.sum()), dtype=dtype)


def _exclusive_cumsum(a: np.ndarray) -> np.ndarray:
    out = np.zeros(a.size + 1, dtype=np.int64)
    np.cumsum(a, out=out[1:])
    return out


# ---- partime / partime-async (closed form) -------------------------------------------------
_SEG_KINDS = np.array([F, B, OPT, BARRIER], dtype=np.int8)  # a tick's segments, in table order
_COLS = ("stage", "kind", "sample", "tick", "device", "lane", "wave")
_COL_DTYPES = (np.int32, np.int8, np.int32, np.int32, np.int32, np.int8, np.int32)


class _PartimeLayout:
    """Where every tick's tasks and incoming edges sit in the table, from closed forms.

    Tick t holds the segments [F, B, OPT, BARRIER]: F on stages flo..fhi (those with an input),
    B and OPT on stages blo..fhi (from tick 2S-2-k on, only on a real activation), one barrier.
    """

    def __init__(self, S: int, N: int, train: bool, barrier: bool) -> None:
        T = N + S - 1  # ticks 0..N+S-2: until the last stage has the loss of the last sample
        t = np.arange(T, dtype=np.int64)
        flo, fhi = np.maximum(0, t - N + 1), np.minimum(t, S - 1)
        fc = fhi - flo + 1
        bc = np.maximum(0, fhi - np.maximum(flo, 2 * S - 2 - t) + 1) if train else np.zeros(T, dtype=np.int64)
        blo = fhi - bc + 1
        self.S, self.T, self.t, self.barrier = S, T, t, barrier
        self.flo, self.fc, self.blo, self.bc = flo, fc, blo, bc
        self.count = np.stack([fc, bc, bc, np.full(T, int(barrier))], axis=1)  # (T, 4)
        self.start = np.stack([flo, blo, blo, np.full(T, -1)], axis=1)
        self.wave = (np.cumsum(self.count.ravel() > 0) - 1).reshape(T, 4)  # one wave per non-empty segment
        self.off = _exclusive_cumsum(self.count.sum(axis=1))  # first task of tick t (T+1 entries)
        self.seg = self.off[:-1, None] + np.cumsum(self.count, axis=1) - self.count  # first task of each segment
        # incoming edges per tick: F <- F(k-1,t-1) [k>=1], BARRIER(t-1) [t>=1]; B <- F, B(k+1,t-1) [k<S-1];
        # OPT <- B; BARRIER <- F of stages without backward and every OPT (one per busy device)
        has_bar = barrier & (t >= 1)
        edges = (fc - (flo == 0)) + has_bar * fc + 2 * bc - ((bc > 0) & (fhi == S - 1)) + bc + barrier * fc
        self.eoff = _exclusive_cumsum(edges)

    def steady(self) -> tuple[int, int]:
        """Ticks [a, b) with the full layout (every stage busy), t >= 1: they differ only by a shift."""
        full = (self.fc == self.S) & (self.bc == self.count[:, 1].max()) & (self.t >= 1)
        idx = np.flatnonzero(full)
        return (int(idx[0]), int(idx[-1]) + 1) if idx.size else (0, 0)


def _partime(name: str, S: int, N: int, mode: str, dev: np.ndarray, *, barrier: bool, partial: bool,
             fast: bool = True) -> Schedule:
    """PARTIME's tick t: stage k does F on sample t-k and, from tick 2S-2-k on, B on that same
    activation with the cotangent stage k+1 produced at tick t-1, then OPT.

    The barrier of tick t depends on the last task of every busy device (its OPT, or its F when it
    has no backward; the lane order covers the rest) and the first task of every device at tick t+1
    (always its F) depends on it: with the lane order, every task of t+1 waits for every task of t.
    Steady ticks are one pattern shifted, written with broadcasting (``fast``); the rest tick by tick.
    """
    lay = _PartimeLayout(S, N, mode == "train", barrier)
    n, n_edges = int(lay.off[-1]), int(lay.eoff[-1])
    cols = {c: np.empty(n, dtype=d) for c, d in zip(_COLS, _COL_DTYPES)}
    src = np.empty(n_edges, dtype=index_dtype(n))
    dst = np.empty(n_edges, dtype=index_dtype(n))
    a, b = lay.steady() if fast else (0, 0)
    if b - a >= 3:  # ticks a, a+1 explicitly, then a+2..b-1 as shifted copies of tick a+1
        _partime_ticks(lay, dev, cols, src, dst, 0, a + 2)
        _partime_shift(lay, cols, src, dst, a + 1, b)
        _partime_ticks(lay, dev, cols, src, dst, b, lay.T)
    else:
        _partime_ticks(lay, dev, cols, src, dst, 0, lay.T)
    return Schedule.build(name, mode, S, N, int(dev.max()) + 1, cols, src, dst,
                          partial_backward=partial and mode == "train")


def _partime_ticks(lay: _PartimeLayout, dev: np.ndarray, cols: dict, src: np.ndarray, dst: np.ndarray,
                   ta: int, tb: int) -> None:
    """Write ticks ta..tb-1: every column is a ``repeat``/``arange`` over the segments, and every
    edge class is scattered into its slot of the destination's group (edges sorted by destination)."""
    if ta >= tb:
        return
    S, t = lay.S, lay.t[ta:tb]
    lo, hi = int(lay.off[ta]), int(lay.off[tb])
    counts = lay.count[ta:tb].ravel()
    stage = _ranges(lay.start[ta:tb].ravel(), counts, np.int32)
    kind = np.repeat(np.tile(_SEG_KINDS, tb - ta), counts)
    tick = np.repeat(np.repeat(t.astype(np.int32), 4), counts)
    cols["stage"][lo:hi] = stage
    cols["kind"][lo:hi] = kind
    cols["tick"][lo:hi] = tick
    cols["wave"][lo:hi] = np.repeat(lay.wave[ta:tb].ravel(), counts)
    cols["lane"][lo:hi] = 0
    sample = tick - stage
    sample[kind >= OPT] = -1
    cols["sample"][lo:hi] = sample
    device = dev[stage]
    device[stage < 0] = -1
    cols["device"][lo:hi] = device

    fc, bc, seg = lay.count[ta:tb, 0], lay.count[ta:tb, 1], lay.seg[ta:tb]
    indeg = np.zeros(hi - lo, dtype=np.int64)
    pos_f = _ranges(seg[:, 0], fc)
    tf = np.repeat(t, fc)
    kf = stage[pos_f - lo].astype(np.int64)
    has_up = kf >= 1
    has_bar = (tf >= 1) & lay.barrier
    indeg[pos_f - lo] = has_up.astype(np.int64) + has_bar
    pos_b = _ranges(seg[:, 1], bc)
    tb_ = np.repeat(t, bc)
    kb = stage[pos_b - lo].astype(np.int64)
    has_down = kb < S - 1
    indeg[pos_b - lo] = 1 + has_down
    pos_o = pos_b + np.repeat(bc, bc)
    indeg[pos_o - lo] = 1
    pos_bar = seg[:, 3]
    if lay.barrier:
        indeg[pos_bar - lo] = fc
    ptr = lay.eoff[ta] + _exclusive_cumsum(indeg)
    assert ptr[-1] == lay.eoff[tb], "partime edge count out of step with its closed form"
    at = ptr[:-1]
    # F(k,t) <- F(k-1,t-1), then <- BARRIER(t-1)
    up_t = tf[has_up]
    src[at[pos_f[has_up] - lo]] = lay.seg[up_t - 1, 0] + (kf[has_up] - 1 - lay.flo[up_t - 1])
    if lay.barrier:
        src[at[pos_f[has_bar] - lo] + has_up[has_bar]] = lay.seg[tf[has_bar] - 1, 3]
    # B(k,t) <- F(k,t), then <- B(k+1,t-1): the cotangent stage k+1 made one tick earlier
    src[at[pos_b - lo]] = lay.seg[tb_, 0] + (kb - lay.flo[tb_])
    dn_t = tb_[has_down]
    src[at[pos_b[has_down] - lo] + 1] = lay.seg[dn_t - 1, 1] + (kb[has_down] + 1 - lay.blo[dn_t - 1])
    src[at[pos_o - lo]] = pos_b  # OPT(k,t) <- B(k,t)
    if lay.barrier:  # BARRIER(t) <- F of the devices without backward, OPT of the others
        only_f = fc - bc
        src[_ranges(at[pos_bar - lo], only_f)] = _ranges(seg[:, 0], only_f)
        src[_ranges(at[pos_bar - lo] + only_f, bc)] = _ranges(seg[:, 2], bc)
    dst[lay.eoff[ta]:lay.eoff[tb]] = np.repeat(np.arange(lo, hi, dtype=np.int64), indeg)


def _partime_shift(lay: _PartimeLayout, cols: dict, src: np.ndarray, dst: np.ndarray, p: int, tb: int) -> None:
    """Ticks p+1..tb-1 as copies of tick p (written already) shifted by i ticks: same stages, kinds
    and devices; tick, sample (F, B), wave and every task index move by a constant per tick."""
    size, esize = int(lay.off[p + 1] - lay.off[p]), int(lay.eoff[p + 1] - lay.eoff[p])
    rows = tb - p - 1
    i = np.arange(1, rows + 1, dtype=np.int64)[:, None]
    lo, hi = int(lay.off[p]), int(lay.off[p + 1])
    view = {c: a[hi:hi + rows * size].reshape(rows, size) for c, a in cols.items()}
    for c in ("stage", "kind", "device", "lane"):
        np.copyto(view[c], cols[c][lo:hi])
    np.add(cols["tick"][lo:hi], i, out=view["tick"], casting="unsafe")
    np.add(cols["wave"][lo:hi], i * int(lay.wave[p + 1, 0] - lay.wave[p, 0]), out=view["wave"], casting="unsafe")
    has_sample = cols["sample"][lo:hi] >= 0
    np.add(cols["sample"][lo:hi], i * has_sample, out=view["sample"], casting="unsafe")
    elo, ehi = int(lay.eoff[p]), int(lay.eoff[p + 1])
    np.add(src[elo:ehi], i * size, out=src[ehi:ehi + rows * esize].reshape(rows, esize))
    np.add(dst[elo:ehi], i * size, out=dst[ehi:ehi + rows * esize].reshape(rows, esize))


# ---- sequential (closed form) --------------------------------------------------------------
def _sequential(S: int, N: int, mode: str) -> Schedule:
    """Per sample: F of stages 0..S-1, then (training) B and OPT of stages S-1..0, on device 0."""
    k = np.arange(S)
    if mode == "infer":
        stage = np.tile(k, N)
        kind = np.full(S * N, F, dtype=np.int8)
        sample = np.repeat(np.arange(N), S)
        tick = np.arange(S * N)
    else:
        rev = k[::-1]
        block_stage = np.concatenate([k, np.repeat(rev, 2)])
        block_kind = np.concatenate([np.full(S, F), np.tile([B, OPT], S)]).astype(np.int8)
        block_slot = np.concatenate([k, S + np.repeat(np.arange(S), 2) + np.tile([0, 1], S)])
        stage = np.tile(block_stage, N)
        kind = np.tile(block_kind, N)
        sample = np.repeat(np.arange(N), 3 * S)
        tick = np.tile(block_slot, N) + 2 * S * sample
        sample = np.where(kind == OPT, -1, sample)
    return _finish("sequential", S, N, np.zeros(S, dtype=np.int32), stage, kind, sample, tick, mode=mode)


# ---- issue orders of the microbatch schedules ----------------------------------------------
Orders = tuple[np.ndarray, np.ndarray]  # (kind, microbatch), each (stages, max length), -1 padded


def _pad(rows: list[tuple[np.ndarray, np.ndarray]]) -> Orders:
    L = max(r[0].size for r in rows)
    kinds = np.full((len(rows), L), -1, dtype=np.int8)
    mbs = np.full((len(rows), L), -1, dtype=np.int64)
    for s, (kd, mb) in enumerate(rows):
        kinds[s, :kd.size] = kd
        mbs[s, :mb.size] = mb
    return kinds, mbs


def _steady(slots: list[tuple[int, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Interleave per-step slots ``(kind, microbatch per step, present per step)`` row by row."""
    kd = np.array([[s[0]] * s[1].size for s in slots], dtype=np.int8).T
    mb = np.stack([s[1] for s in slots], axis=1)
    keep = np.stack([s[2] for s in slots], axis=1)
    return kd[keep], mb[keep]


def _orders_1f1b(S: int, N: int) -> Orders:
    """PipeDream 1F1B: min(S-k, N) warm-up forwards, then B, OPT, F repeated, then drain."""
    rows = []
    for k in range(S):
        w = min(S - k, N)
        j = np.arange(N)
        kd, mb = _steady([(B, j, j >= 0), (OPT, -np.ones_like(j), j >= 0), (F, w + j, w + j < N)])
        rows.append((np.concatenate([np.full(w, F, np.int8), kd]), np.concatenate([np.arange(w), mb])))
    return _pad(rows)


def _orders_layerpipe(S: int, N: int) -> Orders:
    """LayerPipe: 1F1B's structure with the backward split. Stage k does min(S-k, N) warm-up
    forwards, then BI, BW, OPT, F repeated, then the drain's BI, BW, OPT. BI comes first and its
    input gradient goes upstream the moment it ends; the BW of the same microbatch follows at once
    (before the next F) and every BW is applied by its own OPT (asynchronous, weight stashing).

    What this reproduces of the paper (Unnikrishnan & Parhi, arXiv 2108.06629): the intra-layer
    split (the gradient's critical path never waits for a BW: the upstream stage gets its cotangent
    after BI instead of after BI+BW, which shortens fill and drain) and the delayed-gradient
    updates, whose delays the staleness walker derives (stage k: S-1-k, as 1F1B). Not modelled as
    tasks: running BI and BW on parallel hardware (here they share one compute lane) and the
    inter-layer split of BI across two consecutive processors, which is load balancing left to
    the partitioner.
    """
    rows = []
    for k in range(S):
        w = min(S - k, N)
        j = np.arange(N)
        kd, mb = _steady([(BI, j, j >= 0), (BW, j, j >= 0), (OPT, -np.ones_like(j), j >= 0),
                          (F, w + j, w + j < N)])
        rows.append((np.concatenate([np.full(w, F, np.int8), kd]), np.concatenate([np.arange(w), mb])))
    return _pad(rows)


def _orders_gpipe(S: int, M: int) -> Orders:
    """GPipe, one minibatch: all forwards, all backwards (microbatch order), one OPT."""
    row = (np.concatenate([np.full(M, F), np.full(M, B), [OPT]]).astype(np.int8),
           np.concatenate([np.arange(M), np.arange(M), [-1]]))
    return _pad([row] * S)


def _orders_zb_h1(S: int, M: int) -> Orders:
    """ZB-H1, one minibatch: stage k does 1F1B's min(S-k, M) warm-up forwards, then per step
    BI(j), BW(j-k) (its weight passes lag k steps), F; the k+1 deferred BW fill the tail.
    With F = BI = BW every device idles (S-1)(T_F + T_BI - T_W) (Qi et al., Fig. 3), a third of 1F1B's.
    """
    rows = []
    for k in range(S):
        w = min(S - k, M)
        j = np.arange(M)
        kd, mb = _steady([(BI, j, j >= 0), (BW, j - k, j >= k), (F, w + j, w + j < M)])
        tail = np.arange(max(0, M - k), M)
        rows.append((np.concatenate([np.full(w, F), kd, np.full(tail.size, BW), [OPT]]).astype(np.int8),
                     np.concatenate([np.arange(w), mb, tail, [-1]])))
    return _pad(rows)


# ---- the unit-cost timeline ----------------------------------------------------------------
class _Recorder:
    """Collects the tasks of each slot; slots come in time order, so the result is wave-sorted."""

    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, int]] = []

    def add(self, stage: np.ndarray, kind: np.ndarray | int, mb: np.ndarray | int, tick: int) -> None:
        if stage.size:
            self.parts.append((stage, np.broadcast_to(kind, stage.shape), np.broadcast_to(mb, stage.shape), tick))

    def arrays(self) -> tuple[np.ndarray, ...]:
        stage = np.concatenate([p[0] for p in self.parts])
        kind = np.concatenate([p[1] for p in self.parts]).astype(np.int8)
        mb = np.concatenate([p[2] for p in self.parts])
        tick = np.repeat([p[3] for p in self.parts], [p[0].size for p in self.parts])
        return stage, kind, mb, tick


def _play_orders(kinds: np.ndarray, mbs: np.ndarray, S: int, N: int) -> tuple[np.ndarray, ...]:
    """Run fixed per-stage issue orders on the unit-cost timeline: each slot, every stage whose
    next task has its inputs starts it (one vector step per slot). Returns stage, kind, sample, tick."""
    L = kinds.shape[1]
    length = (kinds >= 0).sum(axis=1)
    rows = np.arange(S)
    up, down = np.maximum(rows - 1, 0), np.minimum(rows + 1, S - 1)
    never = np.iinfo(np.int64).max
    f_end = np.full((S, N), never)
    b_end = np.full((S, N), never)  # end of B or BI: the input gradient stage k sends upstream
    ptr = np.zeros(S, dtype=np.int64)
    rec = _Recorder()
    t = 0
    while True:
        live = ptr < length
        if not live.any():
            break
        head = np.where(live, kinds[rows, np.minimum(ptr, L - 1)], -1)
        opt = head == OPT  # zero cost: runs the moment its backward has ended
        rec.add(rows[opt], OPT, -1, t)
        ptr[opt] += 1
        live = ptr < length
        p = np.minimum(ptr, L - 1)
        head = np.where(live, kinds[rows, p], -1)
        m = np.maximum(mbs[rows, p], 0)
        is_f = head == F
        is_b = (head == B) | (head == BI)
        go = is_f & ((rows == 0) | (f_end[up, m] <= t))
        go |= is_b & (f_end[rows, m] <= t) & ((rows == S - 1) | (b_end[down, m] <= t))
        go |= (head == BW) & (b_end[rows, m] <= t)
        if not go.any() and not opt.any():
            raise ScheduleError(f"issue orders deadlock at slot {t} (stages {rows[live][:8].tolist()} wait); "
                                "fix the generator's order")
        r = rows[go]
        rec.add(r, head[go], m[go], t)
        f_end[rows[go & is_f], m[go & is_f]] = t + 1
        b_end[rows[go & is_b], m[go & is_b]] = t + 1
        ptr[go] += 1
        t += 1
    return rec.arrays()


def _flushed(name: str, S: int, N: int, M: int, dev: np.ndarray, orders: Callable[[int, int], Orders]) -> Schedule:
    """Minibatches of M microbatches (the last may be smaller), each a copy of one template timeline
    shifted just past the previous minibatch on every stage (the flush)."""
    sizes = [M] * (N // M) + ([N % M] if N % M else [])
    templates = {m: _play_orders(*orders(S, m), S, m) for m in set(sizes)}
    span = {}  # per template: first start and last end of every stage
    for m, (stage, kind, _, tick) in templates.items():
        by_stage = np.argsort(stage, kind="stable")
        first = _exclusive_cumsum(np.bincount(stage, minlength=S))[:-1]
        end = tick + (kind != OPT)
        span[m] = (np.minimum.reduceat(tick[by_stage], first), np.maximum.reduceat(end[by_stage], first))
    cols: list[list[np.ndarray]] = [[], [], [], []]
    offset, base, prev = 0, 0, None
    for m in sizes:
        if prev is not None:
            offset += int(np.max(span[prev][1] - span[m][0]))
        stage, kind, mb, tick = templates[m]
        for c, a in zip(cols, (stage, kind, np.where(mb >= 0, mb + base, -1), tick + offset)):
            c.append(a)
        base += m
        prev = m
    stage, kind, sample, tick = (np.concatenate(c) for c in cols)
    return _finish(name, S, N, dev, stage, kind, sample, tick, params={"microbatches": M})


# ---- shared finishing: waves, data-flow dependencies, build ---------------------------------
def _finish(name: str, S: int, N: int, dev: np.ndarray, stage, kind, sample, tick, *, mode: str = "train",
            params: dict | None = None) -> Schedule:
    """Order the tasks by the unit-cost timeline, derive waves and data-flow deps, build."""
    stage = np.asarray(stage, dtype=np.int64)
    kind = np.asarray(kind, dtype=np.int8)
    sample = np.asarray(sample, dtype=np.int64)
    tick = np.asarray(tick, dtype=np.int64)
    key = 2 * tick - (kind == OPT)  # OPT: after its backward ended, before the lane's next task
    if key.size > 1 and np.any(key[1:] < key[:-1]):
        order = np.argsort(key, kind="stable")
        stage, kind, sample, tick, key = stage[order], kind[order], sample[order], tick[order], key[order]
    wave = np.cumsum(np.r_[True, key[1:] != key[:-1]]) - 1
    src, dst = _data_deps(S, N, stage, kind, sample)
    return Schedule.build(
        name, mode, S, N, int(dev.max()) + 1,
        dict(stage=stage, kind=kind, sample=sample, tick=tick, device=dev[stage],
             lane=np.zeros(stage.size, dtype=np.int8), wave=wave),
        src, dst, params=params,
    )


def _data_deps(S: int, N: int, stage: np.ndarray, kind: np.ndarray,
               sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Data-flow edges of a microbatch schedule (see the module docstring), sorted by destination."""
    n = stage.size
    idx = np.arange(n, dtype=np.int64)
    is_f = kind == F
    is_b = (kind == B) | (kind == BI)
    fidx = np.full((S, N), -1, dtype=np.int64)
    bidx = np.full((S, N), -1, dtype=np.int64)
    fidx[stage[is_f], sample[is_f]] = idx[is_f]
    bidx[stage[is_b], sample[is_b]] = idx[is_b]
    f_up = idx[is_f & (stage >= 1)]
    b_all = idx[is_b]
    b_down = idx[is_b & (stage < S - 1)]
    w_all = idx[kind == BW]
    srcs = [fidx[stage[f_up] - 1, sample[f_up]], fidx[stage[b_all], sample[b_all]],
            bidx[stage[b_down] + 1, sample[b_down]], bidx[stage[w_all], sample[w_all]]]
    dsts = [f_up, b_all, b_down, w_all]
    # OPT <- every weight-gradient task (B or BW) of its stage since the previous OPT
    by_stage = np.argsort(stage, kind="stable")  # each stage's tasks in lane (table) order
    is_opt = kind[by_stage] == OPT
    nxt = np.minimum.accumulate(np.where(is_opt, np.arange(n), n)[::-1])[::-1]
    grads = np.flatnonzero(np.isin(kind[by_stage], (B, BW)))
    if grads.size:
        if nxt[grads].max() >= n or np.any(stage[by_stage[nxt[grads]]] != stage[by_stage[grads]]):
            raise ScheduleError("a stage ends with a backward that no OPT applies; end every stage with an OPT")
        srcs.append(by_stage[grads])
        dsts.append(by_stage[nxt[grads]])
    src, dst = np.concatenate(srcs), np.concatenate(dsts)
    if np.any(src < 0):
        raise ScheduleError("a task's input is missing from the schedule; check the generator's orders")
    order = np.argsort(dst, kind="stable")
    return src[order], dst[order]
