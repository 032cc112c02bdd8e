"""Staleness derived from a schedule: which weights and which gradient signal every backward uses.

Nothing here knows a schedule by name. The walker reads only the IR (task table, dependencies,
lane order = table order), so a new generator or an imported torch schedule gets its delays for
free, and the emulators can apply exactly the staleness the timing engines time.

Rules (DESIGN.md, "Staleness" and "Exact learning semantics"):

* **Weight version.** Every stage starts at version 0; each OPT of the stage bumps it, in the
  stage's lane (table) order. A task's version is the number of its stage's OPTs before it.
* **Weight stashing.** A backward (B, or BI and BW) uses the weights its forward used: the F of
  the same (stage, sample). ``current_version`` is what the stage holds when the backward runs;
  the two differ where a schedule needs stashing (1f1b; layerpipe during its drain).
* **Weight delay.** An OPT applies the gradients of the B/BW tasks it depends on, updating from
  ``applied_version``; ``weight_delay = applied_version - weight_version`` (updates in between).
* **Gradient signal.** A B/BI of stage k gets its cotangent from the B/BI of stage k+1 it depends
  on (the dependency edge, not the sample index: PARTIME's tick t takes stage k+1's gradient of
  tick t-1, a different sample); a BW reuses its BI's. Following those edges ends at a last-stage
  backward, which differentiates the loss of its own sample: the ``signal_sample``.
  ``signal_mismatch = sample - signal_sample`` (samples between the activation and the loss).
* **Gradient age** (in the stage's own updates): ``gradient_age`` = the stage's weight version
  when the backward runs minus the version it held while the loss task ran, i.e. the stage's
  OPTs issued after the loss task (in the schedule's wave order, its global clock) and before the
  backward. PARTIME's lockstep ticks give S-1-k; a flushed schedule (gpipe, zb-h1) and sequential
  give 0 (no update between a loss and its backprop). For the asynchronous microbatch schedules
  (1f1b, layerpipe) it counts the updates that fit in the backprop latency on the unit-cost
  timeline, so it depends on that clock; ``weight_delay`` is the clock-free measure there.
  ``gradient_age_ticks = tick - loss tick`` is the same age in the schedule's own clock (PARTIME
  ticks, or unit-cost slots for the microbatch schedules): backprop latency that no update
  interleaves (sequential, gpipe) shows up there only.

``staleness_table`` gives one row per backward task; ``staleness_summary`` one steady-state row per
stage. Everything is vectorised: 64 stages x 10^4 samples of partime take a fraction of a second.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from partime_sim.errors import ConfigError, ScheduleError
from partime_sim.schedule import B, BACKWARD_KINDS, BI, BW, F, KINDS, OPT, Schedule

TABLE_COLUMNS = ("stage", "kind", "sample", "tick", "weight_version", "current_version", "applied_version",
                 "weight_delay", "signal_sample", "gradient_age", "gradient_age_ticks", "signal_mismatch")
SUMMARY_KEYS = ("stage", "weight_delay", "gradient_age", "signal_mismatch", "gradient_age_ticks",
                "max_weight_delay", "first_backward_tick")
_GRADIENT_KINDS = (B, BW)  # the tasks whose weight gradient an OPT applies


def staleness_table(schedule: Schedule) -> pd.DataFrame:
    """One row per backward task (B, BI, BW) in table order, with the columns of ``TABLE_COLUMNS``.

    ``applied_version`` and ``weight_delay`` are nullable (``<NA>``) on BI rows, whose result is
    an input gradient sent upstream rather than a weight gradient, and on a gradient no OPT applies.
    """
    s = _require_training(schedule)
    back = np.flatnonzero(_is(s.kind, BACKWARD_KINDS))
    version = weight_versions(s)
    used = version[_forward_of(s, back)]  # weight stashing: the version its forward used
    opt = _applying_opt(s)[back]
    applied = version[np.maximum(opt, 0)]  # masked below where no OPT applies the task
    root = _signal_root(s, back)
    stage, sample, tick = (s.stage[back].astype(np.int64), s.sample[back].astype(np.int64),
                           s.tick[back].astype(np.int64))
    loss_tick = s.tick[root].astype(np.int64)
    return pd.DataFrame({
        "stage": stage,
        "kind": pd.Categorical.from_codes(s.kind[back], categories=list(KINDS)),
        "sample": sample,
        "tick": tick,
        "weight_version": used,
        "current_version": version[back],
        "applied_version": pd.arrays.IntegerArray(applied, opt < 0),
        "weight_delay": pd.arrays.IntegerArray(applied - used, opt < 0),
        "signal_sample": s.sample[root].astype(np.int64),
        "gradient_age": version[back] - _opts_before_wave(s, stage, s.wave[root].astype(np.int64)),
        "gradient_age_ticks": tick - loss_tick,
        "signal_mismatch": sample - s.sample[root],
    })


def staleness_summary(schedule: Schedule) -> list[dict[str, Any]]:
    """Per stage, the steady-state staleness of the gradients it applies, as a list of dicts.

    Each quantity is the (lower) median over the stage's weight-gradient tasks (B, or BW for
    split schedules). Why the median: warm-up and drain touch O(S) tasks per stage (per
    minibatch for flushed schedules) and the steady state O(samples), so with a few times more
    samples than stages (the CLI's default is 8S+16) it is the steady-state value, without
    having to say per schedule where a warm-up ends. Where a quantity never settles (it keeps
    growing along the stream) the median is its typical value and ``max_weight_delay`` shows
    the worst case (also the number of past weight versions an emulator must keep).
    ``first_backward_tick`` is the tick of the stage's first backward of any kind (its warm-up).
    A stage with no backward at all (too few samples) gets ``None``.
    """
    table = staleness_table(schedule)
    first = table.groupby("stage")["tick"].min()
    grads = table[table["kind"].isin([KINDS[k] for k in _GRADIENT_KINDS])]
    stats = {c: _per_stage(grads, c, "median") for c in ("weight_delay", "gradient_age", "signal_mismatch",
                                                         "gradient_age_ticks")}
    stats["max_weight_delay"] = _per_stage(grads, "weight_delay", "max")
    stats["first_backward_tick"] = {int(k): int(v) for k, v in first.items()}
    return [{"stage": k, **{c: v.get(k) for c, v in stats.items()}} for k in range(schedule.num_stages)]


def weight_versions(schedule: Schedule) -> np.ndarray:
    """Per task of the table, the version of its stage's weights when it runs: how many OPTs of
    its stage come before it in table order (the stage's lane order). An OPT's own entry is the
    version it updates from; global tasks (stage -1) get 0."""
    s = schedule
    order = np.argsort(s.stage, kind="stable")
    is_opt = (s.kind[order] == OPT).astype(np.int64)
    before = np.cumsum(is_opt) - is_opt  # OPTs before, over all stages
    stage_sorted = s.stage[order]
    group_start = np.flatnonzero(np.r_[True, stage_sorted[1:] != stage_sorted[:-1]])
    counts = np.diff(np.r_[group_start, order.size])
    version = np.empty(len(s), dtype=np.int64)
    version[order] = before - np.repeat(before[group_start], counts)
    return version


# ---- the walk --------------------------------------------------------------------------------


def _require_training(schedule: Schedule) -> Schedule:
    if schedule.mode != "train":
        raise ConfigError(f"schedule {schedule.name!r} is mode={schedule.mode!r}: staleness needs a training "
                          "schedule; use --mode train (mode='train')")
    return schedule


def _is(kind: np.ndarray, kinds: tuple[int, ...]) -> np.ndarray:
    """``np.isin(kind, kinds)`` by table lookup (kinds are small codes; this is ~10x faster)."""
    lut = np.zeros(len(KINDS), dtype=bool)
    lut[list(kinds)] = True
    return lut[kind]


def _forward_of(s: Schedule, back: np.ndarray) -> np.ndarray:
    """Index of the F of each backward's (stage, sample): the weights it was stashed with."""
    fwd = np.flatnonzero(s.kind == F)
    fidx = np.full((s.num_stages, s.num_samples), -1, dtype=np.int64)
    fidx[s.stage[fwd], s.sample[fwd]] = fwd
    out = fidx[s.stage[back], s.sample[back]]
    if np.any(out < 0):
        i = int(back[np.flatnonzero(out < 0)[0]])
        raise ScheduleError(f"{s.name}: backward {s.task_label(i)} has no forward of stage {s.stage[i]} on sample "
                            f"{s.sample[i]}; every backward needs its F (run Schedule.validate())")
    return out


def _applying_opt(s: Schedule) -> np.ndarray:
    """Per task: the OPT that applies its weight gradient (an OPT <- B/BW edge), or -1."""
    into = np.flatnonzero(s.kind[s.dep_dst] == OPT)
    src, dst = s.dep_src[into].astype(np.int64), s.dep_dst[into].astype(np.int64)
    edge = _is(s.kind[src], _GRADIENT_KINDS)
    g, o = src[edge], dst[edge]
    wrong = s.stage[g] != s.stage[o]
    if np.any(wrong):
        j = int(np.flatnonzero(wrong)[0])
        raise ScheduleError(f"{s.name}: {s.task_label(o[j])} applies the gradient of {s.task_label(g[j])}, another "
                            "stage's weights; an OPT may depend only on its own stage's B/BW")
    twice = np.bincount(g, minlength=len(s)) > 1
    if np.any(twice):
        i = int(np.flatnonzero(twice)[0])
        raise ScheduleError(f"{s.name}: the gradient of {s.task_label(i)} is applied by more than one OPT; "
                            "keep one OPT <- backward edge per gradient")
    applied = np.full(len(s), -1, dtype=np.int64)
    applied[g] = o
    return applied


def _signal_root(s: Schedule, back: np.ndarray) -> np.ndarray:
    """For each backward, the last-stage B/BI whose loss its cotangent carries.

    Each backward's parent is where its cotangent comes from (B/BI <- B/BI of stage k+1; BW <- BI of
    its own stage and sample); a last-stage B/BI is its own parent. Pointer jumping then finds every
    root in log2(S) vectorised steps instead of one step per stage.
    """
    into = np.flatnonzero(_is(s.kind[s.dep_dst], BACKWARD_KINDS))
    src, dst = s.dep_src[into].astype(np.int64), s.dep_dst[into].astype(np.int64)
    ks, kd, stage_s, stage_d = s.kind[src], s.kind[dst], s.stage[src], s.stage[dst]
    from_down = _is(kd, (B, BI)) & _is(ks, (B, BI)) & (stage_s == stage_d + 1)
    from_bi = (kd == BW) & (ks == BI) & (stage_s == stage_d) & (s.sample[src] == s.sample[dst])
    edge = from_down | from_bi
    n_parents = np.bincount(dst[edge], minlength=len(s))
    parent = np.arange(len(s), dtype=np.int64)
    parent[dst[edge]] = src[edge]
    is_loss = _is(s.kind, (B, BI)) & (s.stage == s.num_stages - 1)
    need = np.zeros(len(s), dtype=bool)
    need[back] = ~is_loss[back]
    for bad, what in ((need & (n_parents == 0), "has no cotangent"), (n_parents > 1, "has several cotangents")):
        if np.any(bad):
            i = int(np.flatnonzero(bad)[0])
            source = (f"the BI of stage {s.stage[i]} sample {s.sample[i]}" if s.kind[i] == BW
                      else f"a B/BI of stage {s.stage[i] + 1}")
            raise ScheduleError(f"{s.name}: backward {s.task_label(i)} {what}; it must depend on exactly one "
                                f"cotangent source, {source}")
    local = np.full(len(s), -1, dtype=np.int64)
    local[back] = np.arange(back.size)
    up = local[parent[back]]  # parents as positions in ``back`` (a parent is a backward too)
    while True:  # pointer jumping: after j rounds every task points 2^j links down its chain
        further = up[up]
        if np.array_equal(further, up):
            return back[up]
        up = further


def _opts_before_wave(s: Schedule, stage: np.ndarray, wave: np.ndarray) -> np.ndarray:
    """Per query: how many OPTs of ``stage`` lie in a wave before ``wave`` (the version that stage
    holds while a task of that wave runs; waves order every task of the schedule in time)."""
    opt = np.flatnonzero(s.kind == OPT)
    span = int(s.wave.max(initial=0)) + 1  # (stage, wave) packed into one sortable key
    key = np.sort(s.stage[opt].astype(np.int64) * span + s.wave[opt])
    base = stage.astype(np.int64) * span
    return np.searchsorted(key, base + wave) - np.searchsorted(key, base)


def _per_stage(table: pd.DataFrame, column: str, how: str) -> dict[int, int]:
    """``how`` ("median": the lower median, an actual value; or "max") of ``column`` per stage."""
    values = table[["stage", column]].dropna().astype(np.int64)
    by_stage = values.groupby("stage")[column]
    agg = by_stage.quantile(0.5, interpolation="lower") if how == "median" else by_stage.max()
    return {int(k): int(v) for k, v in agg.items()}
