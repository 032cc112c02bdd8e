"""Binding CPU worker processes to cores of their own (backends/affinity.py)."""

from __future__ import annotations

import os

import pytest

from partime_sim.backends.affinity import bind_worker, worker_cores


def test_workers_get_consecutive_blocks_of_the_available_cores() -> None:
    available = {7, 3, 5, 1}  # e.g. a taskset; sorted: 1, 3, 5, 7
    assert [worker_cores(r, 2, 2, available) for r in range(2)] == [(1, 3), (5, 7)]
    assert [worker_cores(r, 4, 1, available) for r in range(4)] == [(1,), (3,), (5,), (7,)]
    assert worker_cores(0, 1, 3, available) == (1, 3, 5)


def test_no_binding_when_the_workers_threads_outnumber_the_cores() -> None:
    assert worker_cores(0, 3, 1, {0, 1}) is None
    assert worker_cores(1, 2, 2, {0, 1, 2}) is None
    assert worker_cores(2, 2, 1, {0, 1, 2, 3}) is None  # no such rank


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no sched_setaffinity on this OS")
def test_bind_worker_restricts_this_process_and_is_undone_by_restoring() -> None:
    saved = os.sched_getaffinity(0)
    try:
        cores = bind_worker(0, 1, 1)
        assert cores == (min(saved),)
        assert os.sched_getaffinity(0) == {min(saved)}
        assert bind_worker(0, len(saved) + 1, 1) is None  # more workers than cores: left as is
        assert os.sched_getaffinity(0) == {min(saved)}
    finally:
        os.sched_setaffinity(0, saved)
