"""The ``des`` timing engine: a SimPy discrete-event simulation of a schedule.

Every (device, lane) is one process that issues its tasks in table order, so a lane is a
capacity-1 resource with in-order issue; a global task (BARRIER) is a process of its own.
A task waits for each of its dependencies; a dependency that crosses devices is a transfer
started when its source ends. With ``contention`` a transfer holds its link resource
(``Cluster.link_resource``: a directed pair, or a medium shared by several links) for its
whole time, so transfers on one medium queue up in request order; without it a transfer is
a pure delay and the result equals the ``fast`` engine's. Samples arrive from a stream
process; the stage-0 forward of a sample waits for its arrival plus the host->device copy.

Transfers and copies are callbacks rather than processes, which keeps ~10^5 tasks to a few
seconds; beyond that use the ``fast`` engine. Memory is accounted from the resulting times
by ``costs.peak_memory``, the one function both engines share.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import simpy

from partime_sim.cluster import Cluster
from partime_sim.costs import TaskCosts, arrive_close, idle_extra
from partime_sim.errors import ScheduleError
from partime_sim.schedule import F, LANES, Schedule

_BAR_STEP = 512  # tasks per progress-bar update


def run_des(
    schedule: Schedule,
    costs: TaskCosts,
    cluster: Cluster,
    *,
    contention: bool = True,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Simulate; return task start and end times and, per transfer (``costs.transfer``, in
    dependency order), the time it got its link."""
    return _Simulation(schedule, costs, cluster, contention, progress).run()


class _Simulation:
    def __init__(self, schedule: Schedule, costs: TaskCosts, cluster: Cluster, contention: bool,
                 progress: bool) -> None:
        self.env = env = simpy.Environment()
        self.schedule, self.costs, self.cluster, self.contention = schedule, costs, cluster, contention
        # every event a task or transfer will need exists up front, so waiting is just `yield`
        n = len(schedule)
        self.start = np.full(n, np.nan)
        self.end = np.full(n, np.nan)
        self.duration = costs.duration.tolist()
        self.done = [env.event() for _ in range(n)]
        self.ready = [env.event() for _ in range(schedule.num_samples)]  # input on the device
        src = schedule.dep_src.tolist()
        transfers = np.flatnonzero(costs.transfer)
        self.send_start = np.full(transfers.size, np.nan)
        self.send_time = costs.edge_time[transfers].tolist()
        self.send_pair = list(zip(schedule.device[schedule.dep_src[transfers]].tolist(),
                                  schedule.device[schedule.dep_dst[transfers]].tolist()))
        self.resources: dict[Any, simpy.Resource] = {}
        # what each dependency's destination waits for: the source, or the transfer's arrival
        waits: list[simpy.Event] = [self.done[s] for s in src]
        self.outgoing: dict[int, list[tuple[int, simpy.Event]]] = {}
        for j, dep in enumerate(transfers.tolist()):
            arrival = env.event()
            waits[dep] = arrival
            self.outgoing.setdefault(src[dep], []).append((j, arrival))
        cut = np.searchsorted(schedule.dep_dst, np.arange(n + 1)).tolist()
        self.waits = [waits[cut[i]:cut[i + 1]] for i in range(n)]
        # a close-arrival task's inputs: when each is ready (its source's end plus edge time)
        self.close_inputs = {i: (schedule.dep_src[cut[i]:cut[i + 1]], costs.edge_time[cut[i]:cut[i + 1]])
                             for i in costs.close_tasks.tolist()}
        first = (schedule.kind == F) & (schedule.stage == 0)
        self.input_of = dict(zip(np.flatnonzero(first).tolist(), schedule.sample[first].tolist()))
        self.bar = _bar(n, progress)
        self.finished = 0

    def run(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        env, s = self.env, self.schedule
        env.process(self._stream())
        key = s.device.astype(np.int64) * len(LANES) + s.lane
        order = np.argsort(key, kind="stable")
        cuts = np.flatnonzero(np.diff(key[order])) + 1
        for group in np.split(order, cuts):
            if group.size == 0:
                continue
            if s.device[group[0]] < 0:  # global tasks: no lane, each runs on its own
                for i in group.tolist():
                    env.process(self._lane([i]))
            else:
                env.process(self._lane(group.tolist()))
        env.run()
        if self.bar is not None:
            self.bar.update(self.finished % _BAR_STEP)
            self.bar.close()
        stuck = np.flatnonzero(np.isnan(self.end))
        if stuck.size:
            raise ScheduleError(
                f"{s.name}: the simulation stopped with task {s.task_label(int(stuck[0]))} (and {stuck.size - 1} more) "
                "never run (deadlock); run schedule.validate() to find the broken order"
            )
        return self.start, self.end, self.send_start

    def _stream(self) -> Iterator[simpy.Event]:
        """Samples arrive at their times; each is copied to its device (h2d) in the background."""
        env, h2d = self.env, self.costs.h2d
        arrival = self.costs.arrival.tolist()
        for m in np.argsort(self.costs.arrival, kind="stable").tolist():
            delay = arrival[m] - env.now
            if delay > 0:
                yield env.timeout(delay)
            _after(env, h2d, self.ready[m].succeed)

    def _lane(self, tasks: list[int]) -> Iterator[simpy.Event]:
        env = self.env
        idle_tasks = self.costs.idle_tasks.tolist() if self.costs.idle_tasks.any() else None
        last_end = 0.0  # the lane's previous task's end: what a compute task sat idle since
        for i in tasks:
            for event in self.waits[i]:
                if event.callbacks is not None:  # not processed yet
                    yield event
            if i in self.input_of:
                ready = self.ready[self.input_of[i]]
                if ready.callbacks is not None:
                    yield ready
            self.start[i] = env.now
            duration = self.duration[i]
            if i in self.close_inputs:
                srcs, edges = self.close_inputs[i]
                if arrive_close(self.end[srcs] + edges, self.costs.close_window):
                    duration += self.costs.close_extra
            if idle_tasks is not None and idle_tasks[i]:  # a core left idle comes back slow
                duration += float(idle_extra(np.array([env.now - last_end]), self.costs.idle_curve)[0])
            if duration > 0:
                yield env.timeout(duration)
            self.end[i] = last_end = env.now
            self.done[i].succeed()
            for j, arrival in self.outgoing.get(i, ()):
                self._send(j, arrival)
            self._tick()

    def _send(self, j: int, arrival: simpy.Event) -> None:
        """Start transfer j now: hold its link (with contention) for its time, then arrive."""
        env, seconds = self.env, self.send_time[j]
        if not self.contention or seconds == 0:  # a pure delay (a free transfer takes no link)
            self.send_start[j] = env.now
            _after(env, seconds, arrival.succeed)
            return
        key = self.cluster.link_resource(*self.send_pair[j])
        link = self.resources.get(key)
        if link is None:
            link = self.resources[key] = simpy.Resource(env, capacity=1)
        request = link.request()

        def granted(_: simpy.Event) -> None:
            self.send_start[j] = env.now

            def arrived(_: simpy.Event) -> None:
                link.release(request)
                arrival.succeed()

            env.timeout(seconds).callbacks.append(arrived)

        request.callbacks.append(granted)

    def _tick(self) -> None:
        self.finished += 1
        if self.bar is not None and self.finished % _BAR_STEP == 0:
            self.bar.update(_BAR_STEP)


def _after(env: simpy.Environment, delay: float, action: Callable[[], Any]) -> None:
    """Call ``action`` ``delay`` seconds from now (at once when the delay is 0)."""
    if delay > 0:
        env.timeout(delay).callbacks.append(lambda _: action())
    else:
        action()


def _bar(total: int, progress: bool):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="des engine", unit="task", unit_scale=True, leave=False)
