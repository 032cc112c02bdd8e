"""The GPU experiment of ``partime-sim paper``, on any machine: its table and text are built from
what a measurement returns (a stand-in here; the real runs need a GPU), stages go one per GPU,
then round-robin, and the experiment is listed only where a GPU is visible."""

import pandas as pd
import pytest

from partime_sim.paper import reproduce
from partime_sim.paper.experiment import Settings
from partime_sim.paper.measured_gpu import measure_streams, measured_gpu, stage_devices


def fake_measure(calls: list):
    """Samples/s that depend on every argument, so a mixed-up row shows."""
    def measure(network, schedule, devices, samples, mode, graphs):
        calls.append((schedule, devices, mode, graphs))
        S = len(devices.split(","))
        base = 100.0 if mode == "infer" else 30.0
        return base * (1.5 if graphs else 1.0) * (1.0 + 0.25 * (S - 1))
    return measure


def test_stage_devices_one_gpu_per_stage_then_round_robin():
    assert stage_devices(3, 1) == "cuda:0,cuda:0,cuda:0"
    assert stage_devices(4, 2) == "cuda:0,cuda:1,cuda:0,cuda:1"
    assert stage_devices(2, 8) == "cuda:0,cuda:1"
    with pytest.raises(ValueError, match="gpus=0"):
        stage_devices(2, 0)


def test_measure_streams_rows_and_speedups():
    calls = []
    table = measure_streams("net", 10, (2, 4), 2, fake_measure(calls))
    # inference eager and graphed, training eager, for 1, 2 and 4 stages
    assert len(table) == len(calls) == 3 * 2 + 3
    assert ("sequential", "cuda:0", "train", False) in calls and ("partime", "cuda:0,cuda:1,cuda:0,cuda:1",
                                                                   "infer", True) in calls
    assert not table[table["mode"] == "train"].cuda_graphs.any()
    row = table[(table["mode"] == "infer") & (table.stages == 4) & table.cuda_graphs].iloc[0]
    assert row.gpus == 2
    assert row.speedup == pytest.approx(1.5 * 1.75)  # over the eager sequential run
    assert row.speedup_vs_graphed == pytest.approx(1.75)  # over the graphed sequential run
    assert table[(table.stages == 1) & ~table.cuda_graphs].speedup.tolist() == [1.0, 1.0]
    assert table[table["mode"] == "train"].speedup_vs_graphed.isna().all()


def test_measured_gpu_experiment_reports_the_measured_numbers(tmp_path):
    settings = Settings(quick=True, figures=tmp_path)
    exp = measured_gpu(settings, fake_measure([]), gpus=1, gpu_name="Fake GPU")
    assert isinstance(exp.table, pd.DataFrame) and set(exp.table.stages) == {1, *settings.gpu_stages}
    assert "**1.50x**" in exp.text  # the graph alone, sequential inference
    assert "2 stages on 1 GPU run it **1.25x** eager and **1.88x** with graphs" in exp.text
    assert "share" in exp.text and "Fake GPU" in exp.setup
    assert exp.figures[0].read_bytes().startswith(b"\x89PNG")
    md = exp.markdown(tmp_path)
    assert md.startswith("## Measured: streams on GPUs") and "**Where and why it differs.**" in md


def test_gpu_experiment_is_listed_only_where_a_gpu_is_visible(monkeypatch):
    monkeypatch.setattr(reproduce, "_gpus", lambda: 0)
    assert "measured on GPU" not in dict(reproduce.experiments())
    monkeypatch.setattr(reproduce, "_gpus", lambda: 1)
    names = [name for name, _ in reproduce.experiments()]
    assert names.index("measured on GPU") == names.index("measured on CPU") + 1
