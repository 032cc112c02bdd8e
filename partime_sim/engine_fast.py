"""The ``fast`` timing engine: exact longest-path evaluation of a schedule, one numpy step
per wave.

A task starts at the latest of its release, the end of its lane predecessor and, for each
dependency, ``end[src] + edge_time``; it ends ``duration`` later (a close-arrival task,
``TaskCosts.close_tasks``, ``close_extra`` more when its last two inputs are close; a compute
task, ``TaskCosts.idle_tasks``, ``idle_extra`` more after its device sat idle). Waves
are contiguous in the table and every input of a wave lies in an earlier wave, so a wave is
one gather and one segmented max (``np.maximum.reduceat``) over its dependencies, which are
contiguous too because they are sorted by destination. The engine trusts the waves
(``Schedule.validate`` checks them). It gives the DES engine's times whenever links are
uncontended, at numpy speed: partime with 1024 stages x 10,000 samples (10^7 tasks, 22k
waves) takes about half a second on 2 cores.
"""

from __future__ import annotations

import numpy as np

from partime_sim.costs import TaskCosts, arrive_close, idle_extra
from partime_sim.schedule import LANES, Schedule

_PROGRESS_MIN_WAVES = 20_000  # below this the bar would cost more than it tells


def run_fast(schedule: Schedule, costs: TaskCosts, *, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Start and end time of every task (arrays aligned with the schedule's table)."""
    n = len(schedule)
    if n and schedule.device.min() == schedule.device.max() >= 0 and schedule.lane.min() == schedule.lane.max():
        return _one_lane(costs)  # e.g. sequential: one wave per task, cheaper as a plain loop
    src, dst = schedule.dep_src, schedule.dep_dst
    wave_cut = _wave_cuts(schedule.wave)
    dep_cut = np.searchsorted(dst, wave_cut)  # deps into wave w: dep_cut[w]:dep_cut[w + 1]
    num_deps = np.bincount(dst, minlength=n)
    first_dep = np.cumsum(num_deps) - num_deps
    # reduceat cannot express an empty segment: in a wave with tasks without dependencies,
    # reduce over the others only (their positions inside the wave, listed here)
    no_dep_waves = np.unique(np.searchsorted(wave_cut, np.flatnonzero(num_deps == 0), side="right") - 1)
    with_deps = {int(w): np.flatnonzero(num_deps[wave_cut[w]:wave_cut[w + 1]]) for w in no_dep_waves}
    # A lane runs one task per wave at most, so "end of the lane predecessor" is the last end
    # written to the lane's slot. Slots 0..len(LANES)-1 belong to global tasks (no lane) and
    # are zeroed after every wave.
    slot = (schedule.device.astype(np.int64) + 1) * len(LANES) + schedule.lane
    lane_end = np.zeros((schedule.num_devices + 1) * len(LANES))

    close = _close_by_wave(costs, wave_cut, first_dep, num_deps, dep_cut)
    end = np.empty(n)
    start = np.empty(n)
    duration, release, edge = costs.duration, costs.release, costs.edge_time
    has_edge, has_release = bool(np.any(edge)), bool(np.any(release))
    idle_tasks = costs.idle_tasks if costs.idle_tasks.any() else None
    bar = _bar(wave_cut.size - 1, progress)
    cuts, dcuts = wave_cut.tolist(), dep_cut.tolist()  # Python ints slice faster
    for w in range(len(cuts) - 1):
        a, b, da, db = cuts[w], cuts[w + 1], dcuts[w], dcuts[w + 1]
        lanes = slot[a:b]
        m = lane_end[lanes]
        if db > da:
            v = end[src[da:db]]
            if has_edge:
                v += edge[da:db]
            local = first_dep[a:b] - da  # each task's first dependency inside the segment
            if w in with_deps:
                has = with_deps[w]
                dep_max = np.zeros(b - a)
                dep_max[has] = np.maximum.reduceat(v, local[has])
            else:
                dep_max = np.maximum.reduceat(v, local)
            np.maximum(m, dep_max, out=m)
        if has_release:
            np.maximum(m, release[a:b], out=m)
        start[a:b] = m
        dur = duration[a:b]
        if w in close:  # a barrier whose last two arrivals are close costs more
            dur = dur.copy()
            for k, lo, hi in close[w]:
                if arrive_close(v[lo:hi], costs.close_window):
                    dur[k] += costs.close_extra
        if idle_tasks is not None:  # a compute task after its device sat idle (lane_end: previous end)
            sel = idle_tasks[a:b]
            if sel.any():
                dur = dur.copy()
                dur[sel] += idle_extra(m[sel] - lane_end[lanes[sel]], costs.idle_curve)
        m += dur
        end[a:b] = m
        lane_end[lanes] = m
        lane_end[: len(LANES)] = 0.0
        if bar is not None and w % 1024 == 1023:
            bar.update(1024)
    if bar is not None:
        bar.close()
    return start, end


def _close_by_wave(costs: TaskCosts, wave_cut: np.ndarray, first_dep: np.ndarray, num_deps: np.ndarray,
                   dep_cut: np.ndarray) -> dict[int, list[tuple[int, int, int]]]:
    """Per wave, its ``costs.close_tasks`` as (position in the wave, first and end of their
    dependencies in the wave's dependency segment)."""
    close: dict[int, list[tuple[int, int, int]]] = {}
    tasks = costs.close_tasks[num_deps[costs.close_tasks] >= 2]  # fewer inputs: nothing to be close
    waves = np.searchsorted(wave_cut, tasks, side="right") - 1
    lo = first_dep[tasks] - dep_cut[waves]
    for w, k, a, b in zip(waves.tolist(), (tasks - wave_cut[waves]).tolist(), lo.tolist(),
                          (lo + num_deps[tasks]).tolist()):
        close.setdefault(w, []).append((k, a, b))
    return close


def _one_lane(costs: TaskCosts) -> tuple[np.ndarray, np.ndarray]:
    """All tasks on one lane of one device: every dependency is implied by the lane order
    (and free, being on one device), so a task starts at max(release, previous end); a compute
    task that waited for its release pays the idle penalty."""
    penalized = costs.idle_tasks.tolist() if costs.idle_tasks.any() else None
    n = costs.duration.size
    start, end, t = np.empty(n), np.empty(n), 0.0
    for i, (release, duration) in enumerate(zip(costs.release.tolist(), costs.duration.tolist())):
        s = max(t, release)
        if penalized is not None and penalized[i]:
            duration += float(idle_extra(np.array([s - t]), costs.idle_curve)[0])
        start[i], t = s, s + duration
        end[i] = t
    return start, end


def _wave_cuts(wave: np.ndarray) -> np.ndarray:
    """Table positions where each non-empty wave starts, plus the table length."""
    if wave.size == 0:
        return np.zeros(1, dtype=np.int64)
    cuts = np.searchsorted(wave, np.arange(int(wave[0]), int(wave[-1]) + 2))
    return np.unique(cuts)


def _bar(total: int, progress: bool):
    if not progress or total < _PROGRESS_MIN_WAVES:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="fast engine", unit="wave", unit_scale=True, leave=False)
