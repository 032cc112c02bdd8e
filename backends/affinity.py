"""Each CPU worker process on cores of its own.

The simulator's CPU device is a core (the ``cpu-gloo`` preset; a profile of two CPU processes).
Left to the OS, two busy worker processes and their communication threads share the cores as the
scheduler sees fit: on the 2-core VM of BENCHMARKS.md a worker's task now and then stalled for
3-4 ms (a scheduler slice) behind another process's thread, and lockstep runs (a barrier per
tick, a flush per minibatch) lost 25-45% of their throughput that way. Bound to a core each, as
MPI launchers bind ranks, the run becomes the machine the simulator models.

A worker is bound only where every worker gets cores of its own among those this process may
use (an affinity set by ``taskset``, ``numactl`` or a launcher is respected: the cores are taken
from it); with more worker threads than cores the OS keeps sharing them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable


def worker_cores(rank: int, world: int, threads: int, available: Iterable[int]) -> tuple[int, ...] | None:
    """The cores of worker ``rank`` of ``world`` workers on this host, ``threads`` torch threads
    each: the rank-th block of ``threads`` of the sorted ``available`` cores; None when the
    workers' threads outnumber the cores."""
    cores = sorted(available)
    if not 0 <= rank < world or world * threads > len(cores):
        return None
    return tuple(cores[rank * threads:(rank + 1) * threads])


def bind_worker(rank: int, world: int, threads: int) -> tuple[int, ...] | None:
    """Bind this process to its cores (``worker_cores``); threads it starts afterwards (gloo's,
    torch's) inherit them, so call it first. Returns the cores, or None where nothing changed
    (not enough cores, or no ``sched_setaffinity``: macOS, Windows)."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cores = worker_cores(rank, world, threads, os.sched_getaffinity(0))
    if cores is not None:
        os.sched_setaffinity(0, cores)
    return cores
