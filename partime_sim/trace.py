"""The trace schema shared by predicted (simulator) and measured (backend) runs.

One row per executed task: ``device, lane, stage, kind, sample, tick, start, end, source``
(times in seconds from the run start). Besides the schedule's own tasks a trace holds:

* ``SEND`` rows (lane ``send``, on the sending device) for every cross-device transfer that
  takes time (none on ideal links), with the stage/sample/tick of the task whose output is sent;
* one ``H2D`` row per sample (lane ``copy``, device of stage 0): ``start`` is the sample's
  arrival, ``end`` when its input is on the device;
* one ``D2H`` row per sample (lane ``copy``, device of the last stage): ends when the
  sample's output is back on the host. Per-sample latency is D2H.end - H2D.start.

Rows with ``device == -1`` are global (BARRIER) and belong to no device.
``lane``, ``kind`` and ``source`` are pandas categoricals (cheap for 10^7 rows).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from partime_sim.schedule import KINDS, LANES

TRACE_COLUMNS = ("device", "lane", "stage", "kind", "sample", "tick", "start", "end", "source")
SOURCES = ("predicted", "measured")


def make_trace(
    *,
    device: np.ndarray,
    lane: np.ndarray,
    stage: np.ndarray,
    kind: np.ndarray,
    sample: np.ndarray,
    tick: np.ndarray,
    start: np.ndarray,
    end: np.ndarray,
    source: str,
) -> pd.DataFrame:
    """Build a trace from integer codes (``lane``/``kind`` index LANES/KINDS)."""
    if source not in SOURCES:
        raise ValueError(f"source={source!r}; use one of {SOURCES}")
    n = len(start)
    return pd.DataFrame(
        {
            "device": np.asarray(device, dtype=np.int32),
            "lane": pd.Categorical.from_codes(np.asarray(lane, dtype=np.int8), LANES),
            "stage": np.asarray(stage, dtype=np.int32),
            "kind": pd.Categorical.from_codes(np.asarray(kind, dtype=np.int8), KINDS),
            "sample": np.asarray(sample, dtype=np.int32),
            "tick": np.asarray(tick, dtype=np.int32),
            "start": np.asarray(start, dtype=np.float64),
            "end": np.asarray(end, dtype=np.float64),
            "source": pd.Categorical.from_codes(np.full(n, SOURCES.index(source), dtype=np.int8), SOURCES),
        },
        columns=list(TRACE_COLUMNS),
        copy=False,  # 10^7-row traces: don't consolidate the columns into new blocks
    )


def check_trace(trace: pd.DataFrame) -> None:
    """Raise ValueError unless ``trace`` has exactly the schema's columns."""
    missing = [c for c in TRACE_COLUMNS if c not in trace.columns]
    if missing:
        raise ValueError(f"trace lacks columns {missing}; build it with partime_sim.trace.make_trace")
