"""summarize() and the Perfetto export on hand-built traces whose answers are known by hand."""

import io
import json

import numpy as np
import pandas as pd
import pytest

from partime_sim.metrics import METRIC_KEYS, summarize
from partime_sim.perfetto import to_chrome_trace, write_chrome_trace
from partime_sim.schedule import KINDS, LANES
from partime_sim.trace import make_trace


def trace_of(rows, source="predicted"):
    """Rows as (device, lane, stage, kind, sample, tick, start, end) with lane/kind by name."""
    cols = list(zip(*rows)) if rows else [()] * 8
    device, lane, stage, kind, sample, tick, start, end = (list(c) for c in cols)
    return make_trace(device=device, lane=[LANES.index(x) for x in lane], stage=stage,
                      kind=[KINDS.index(x) for x in kind], sample=sample, tick=tick, start=start, end=end,
                      source=source)


# Two stages on two devices, two samples. Stage 1 is twice as fast as stage 0.
#   d0 copy:    H2D0 [0, .5]  H2D1 [.5, 1]
#   d0 compute:      0F0 [.5, 1.5]  0F1 [1.5, 2.5]
#   d0 send:                  S0 [1.5, 2]   S1 [2.5, 3]
#   d1 compute:                   1F0 [2, 2.5]    1F1 [3, 3.5]
#   d1 copy:                          D2H0 [2.5, 3]   D2H1 [3.5, 4]
PIPELINE = [
    (0, "copy", 0, "H2D", 0, 0, 0.0, 0.5),
    (0, "copy", 0, "H2D", 1, 1, 0.5, 1.0),
    (0, "compute", 0, "F", 0, 0, 0.5, 1.5),
    (0, "compute", 0, "F", 1, 1, 1.5, 2.5),
    (0, "send", 0, "SEND", 0, 0, 1.5, 2.0),
    (0, "send", 0, "SEND", 1, 1, 2.5, 3.0),
    (1, "compute", 1, "F", 0, 1, 2.0, 2.5),
    (1, "compute", 1, "F", 1, 2, 3.0, 3.5),
    (1, "copy", 1, "D2H", 0, 1, 2.5, 3.0),
    (1, "copy", 1, "D2H", 1, 2, 3.5, 4.0),
]


def test_two_device_pipeline_by_hand():
    m = summarize(trace_of(PIPELINE), baseline_makespan=3.0)
    assert m["samples"] == 2
    assert m["makespan_s"] == 4.0
    assert m["throughput_sps"] == 0.5
    assert m["devices"] == 2
    assert m["utilization"] == [0.5, 0.25]  # d0 busy 2 s, d1 busy 1 s, of 4 s
    assert m["bubble_fraction"] == pytest.approx(1 - 3 / 8)
    assert m["transfer_busy"] == [0.25, 0.0]
    assert m["speedup"] == 0.75 and m["efficiency"] == 0.375
    # latencies 3.0 (sample 0) and 3.5 (sample 1)
    assert m["latency_p50_s"] == pytest.approx(3.25)
    assert m["latency_p99_s"] == pytest.approx(np.percentile([3.0, 3.5], 99))
    assert m["peak_memory_bytes"] is None


def test_keys_are_fixed_and_json_serialisable():
    m = summarize(trace_of(PIPELINE), baseline_makespan=3.0, peak_memory={np.int64(0): np.float64(5.0)})
    assert tuple(m) == METRIC_KEYS
    assert json.loads(json.dumps(m)) == m


def test_no_baseline_means_no_speedup():
    m = summarize(trace_of(PIPELINE))
    assert m["speedup"] is None and m["efficiency"] is None


def test_latency_percentiles_match_numpy():
    rng = np.random.default_rng(0)
    n = 257
    arrive = np.sort(rng.uniform(0, 10, n))
    latency = rng.exponential(0.3, n)
    rows = [(0, "copy", 0, "H2D", i, i, arrive[i], arrive[i] + 0.01) for i in range(n)]
    rows += [(0, "compute", 0, "F", i, i, arrive[i] + 0.01, arrive[i] + 0.02) for i in range(n)]
    rows += [(0, "copy", 0, "D2H", i, i, arrive[i] + latency[i] - 0.01, arrive[i] + latency[i]) for i in range(n)]
    m = summarize(trace_of(rows))
    assert m["samples"] == n
    assert m["latency_p50_s"] == pytest.approx(np.percentile(latency, 50), rel=1e-12)
    assert m["latency_p99_s"] == pytest.approx(np.percentile(latency, 99), rel=1e-12)


def test_latency_falls_back_to_first_and_last_stage_forwards():
    rows = [(s, "compute", s, "F", i, i + s, i + s, i + s + 1.0 + 0.5 * i) for i in range(3) for s in range(3)]
    m = summarize(trace_of(rows))
    # sample i: first F starts at i, last F (stage 2) ends at i + 3 + 0.5 i -> latency 3 + 0.5 i
    assert m["samples"] == 3
    assert m["latency_p50_s"] == pytest.approx(3.5)
    assert m["latency_p99_s"] == pytest.approx(np.percentile([3.0, 3.5, 4.0], 99))


def test_barrier_rows_belong_to_no_device():
    barriers = [(-1, "compute", -1, "BARRIER", -1, t, float(t), float(t)) for t in range(4)]
    plain, with_barriers = summarize(trace_of(PIPELINE)), summarize(trace_of(PIPELINE + barriers))
    assert with_barriers == plain
    # a barrier still spans time: one ending after every task stretches the makespan
    late = summarize(trace_of(PIPELINE + [(-1, "compute", -1, "BARRIER", -1, 9, 4.0, 5.0)]))
    assert late["makespan_s"] == 5.0 and late["devices"] == 2
    assert late["utilization"] == [0.4, 0.2]


def test_idle_devices_count_with_zero_utilization():
    m = summarize(trace_of(PIPELINE), num_devices=3, peak_memory={0: 10, 1: 20.5})
    assert m["devices"] == 3
    assert m["utilization"] == [0.5, 0.25, 0.0]
    assert m["transfer_busy"] == [0.25, 0.0, 0.0]
    assert m["bubble_fraction"] == pytest.approx(1 - 3 / 12)
    assert m["peak_memory_bytes"] == [10.0, 20.5, 0.0]
    # by default devices are 0..highest busy one, so a gap is an idle device
    gap = summarize(trace_of([(0, "compute", 0, "F", 0, 0, 0.0, 1.0), (2, "compute", 1, "F", 0, 1, 1.0, 2.0)]))
    assert gap["devices"] == 3 and gap["utilization"] == [0.5, 0.0, 0.5]


def test_num_devices_smaller_than_the_trace_is_an_error():
    with pytest.raises(ValueError, match="device 1 but num_devices=1"):
        summarize(trace_of(PIPELINE), num_devices=1)


def test_missing_columns_are_named():
    with pytest.raises(ValueError, match=r"lacks columns \['end'\].*make_trace"):
        summarize(trace_of(PIPELINE).drop(columns="end"))


def test_unknown_kind_is_named():
    bad = trace_of(PIPELINE).astype({"kind": str})
    bad.loc[0, "kind"] = "FWD"
    with pytest.raises(ValueError, match="'FWD'"):
        summarize(bad)


def test_trace_read_back_from_csv_gives_the_same_metrics():
    buf = io.StringIO()
    trace_of(PIPELINE).to_csv(buf, index=False)
    buf.seek(0)
    assert summarize(pd.read_csv(buf), baseline_makespan=3.0) == summarize(trace_of(PIPELINE), baseline_makespan=3.0)


def test_samples_counted_from_forwards_without_copy_rows():
    rows = [(0, "compute", 0, "F", i, i, float(i), i + 1.0) for i in (0, 1, 1, 4)]
    assert summarize(trace_of(rows))["samples"] == 3


def test_overlapping_measured_intervals_are_merged():
    rows = [
        (0, "compute", 0, "BI", 0, 0, 5.0, 6.0),  # listed out of start order on purpose
        (0, "compute", 0, "F", 0, 0, 0.0, 2.0),
        (0, "compute", 0, "BW", 0, 0, 1.0, 3.0),  # overlaps F by 1 s
        (1, "compute", 1, "F", 0, 0, 0.0, 6.0),
        (1, "compute", 1, "B", 0, 0, 1.0, 2.0),  # nested inside F
        (1, "compute", 1, "OPT", -1, 0, 2.5, 3.0),  # nested too
    ]
    m = summarize(trace_of(rows))
    assert m["utilization"] == [pytest.approx(4 / 6), 1.0]


def test_union_of_random_intervals_matches_brute_force():
    rng = np.random.default_rng(1)
    n = 400
    device = rng.integers(0, 4, n)
    start = np.round(rng.uniform(0, 50, n), 1)
    end = start + np.round(rng.exponential(2.0, n), 1)
    rows = [(int(d), "compute", 0, "F", i, i, s, e) for i, (d, s, e) in enumerate(zip(device, start, end))]
    m = summarize(trace_of(rows), num_devices=4)
    makespan = end.max() - start.min()
    for d in range(4):
        busy, reach = 0.0, -np.inf
        for s, e in sorted(zip(start[device == d], end[device == d])):
            busy += max(0.0, e - max(s, reach))
            reach = max(reach, e)
        assert m["utilization"][d] == pytest.approx(busy / makespan, rel=1e-12)


def gpipe_rows(stages, microbatches, fwd=1.0, bwd=2.0):
    """GPipe training, one stage per device: all forwards, flush, backwards in reverse order."""
    rows = []
    for s in range(stages):
        for m in range(microbatches):
            rows.append((s, "compute", s, "F", m, s + m, (s + m) * fwd, (s + m + 1) * fwd))
    flush = (microbatches + stages - 1) * fwd
    for s in range(stages):
        for j, m in enumerate(reversed(range(microbatches))):
            t = flush + bwd * ((stages - 1 - s) + j)
            rows.append((s, "compute", s, "B", m, microbatches + stages - 1 + (stages - 1 - s) + j, t, t + bwd))
    return rows


def test_gpipe_gantt_written_by_hand():
    # S=2, M=2, F=1, B=2:  d0: 0F0 0F1 . . . 0B1 0B1 0B0 0B0;  d1: . 1F0 1F1 1B1 1B1 1B0 1B0 . .
    rows = [
        (0, "compute", 0, "F", 0, 0, 0.0, 1.0), (0, "compute", 0, "F", 1, 1, 1.0, 2.0),
        (1, "compute", 1, "F", 0, 1, 1.0, 2.0), (1, "compute", 1, "F", 1, 2, 2.0, 3.0),
        (1, "compute", 1, "B", 1, 3, 3.0, 5.0), (1, "compute", 1, "B", 0, 4, 5.0, 7.0),
        (0, "compute", 0, "B", 1, 4, 5.0, 7.0), (0, "compute", 0, "B", 0, 5, 7.0, 9.0),
    ]
    assert sorted(rows) == sorted(gpipe_rows(2, 2))
    m = summarize(trace_of(rows))
    assert m["makespan_s"] == 9.0 and m["utilization"] == [6 / 9, 6 / 9]
    assert m["bubble_fraction"] == pytest.approx(1 / 3, rel=1e-15)


@pytest.mark.parametrize("stages, microbatches", [(1, 1), (2, 1), (2, 4), (4, 8), (5, 13), (8, 3)])
def test_gpipe_bubble_fraction_is_analytic(stages, microbatches):
    m = summarize(trace_of(gpipe_rows(stages, microbatches)))
    assert m["makespan_s"] == 3.0 * (microbatches + stages - 1)
    assert m["bubble_fraction"] == pytest.approx((stages - 1) / (microbatches + stages - 1), rel=1e-12, abs=1e-15)


def test_empty_trace_has_no_rates():
    m = summarize(trace_of([]))
    assert m["samples"] == 0 and m["makespan_s"] == 0.0 and m["devices"] == 0
    assert m["throughput_sps"] is None and m["bubble_fraction"] is None and m["latency_p50_s"] is None
    assert m["utilization"] == []


# ---- Perfetto / Chrome trace export ------------------------------------------------------------


def test_chrome_trace_round_trips_through_json(tmp_path):
    rows = PIPELINE + [(0, "compute", 0, "OPT", -1, 3, 2.5, 2.75), (-1, "compute", -1, "BARRIER", -1, 3, 4.0, 4.0)]
    path = write_chrome_trace(trace_of(rows), tmp_path / "run.json")
    doc = json.loads(path.read_text())
    events = doc["traceEvents"]
    complete = [e for e in events if e["ph"] == "X"]
    assert len(complete) == len(rows)
    by_name = {e["name"]: e for e in complete}
    assert set(by_name) >= {"0F1", "1F0", "0H2D0", "1D2H1", "0SEND1", "0OPT", "BARRIER"}
    f01 = by_name["0F1"]
    assert f01["ts"] == pytest.approx(1.5e6) and f01["dur"] == pytest.approx(1.0e6)
    assert f01["args"] == {"stage": 0, "sample": 1, "tick": 1, "source": "predicted"}
    assert by_name["0SEND1"]["pid"] == f01["pid"] and by_name["0SEND1"]["tid"] != f01["tid"]
    assert by_name["1F0"]["pid"] != f01["pid"]
    meta = [e for e in events if e["ph"] == "M"]
    process = {e["pid"]: e["args"]["name"] for e in meta if e["name"] == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in meta if e["name"] == "thread_name"}
    assert process[f01["pid"]] == "predicted device 0"
    assert process[by_name["1F0"]["pid"]] == "predicted device 1"
    assert process[by_name["BARRIER"]["pid"]] == "predicted global"
    assert threads[(f01["pid"], f01["tid"])] == "compute"
    assert threads[(f01["pid"], by_name["0SEND1"]["tid"])] == "send"
    assert threads[(f01["pid"], by_name["0H2D0"]["tid"])] == "copy"


def test_predicted_and_measured_do_not_collide():
    both = pd.concat([trace_of(PIPELINE), trace_of(PIPELINE, source="measured")], ignore_index=True)
    events = to_chrome_trace(both)["traceEvents"]
    complete = [e for e in events if e["ph"] == "X"]
    assert len(complete) == 2 * len(PIPELINE)
    pids = {src: {e["pid"] for e in complete if e["args"]["source"] == src} for src in ("predicted", "measured")}
    assert len(pids["predicted"]) == 2 and len(pids["measured"]) == 2
    assert not pids["predicted"] & pids["measured"]
    names = {e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert names == {"predicted device 0", "predicted device 1", "measured device 0", "measured device 1"}


def test_written_file_is_the_dict_and_non_finite_times_are_refused(tmp_path):
    trace = trace_of(PIPELINE)
    assert json.loads(write_chrome_trace(trace, tmp_path / "t.json").read_text()) == to_chrome_trace(trace)
    trace.loc[3, "end"] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        to_chrome_trace(trace)
