"""The profiler: per-layer measurements, the link fit, the profile file, and the simulator
loading it (network and cluster from one file). Timings are only compared with each other
(ratios, > 0), never with a wall-clock limit."""

import dataclasses
import json
import math
import time
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from partime_sim.backends.profiler import (
    IDLE_POINTS_S,
    BARRIER_CLOSE_WINDOW_S, MESSAGE_COST_MAX_S, Profile, backend_message_costs_apply, calibrate_message_costs,
    cost_for_throughput, fit_link,
    load_profile, profile, profile_layers, profile_links, with_message_costs,
)
from partime_sim.catalogue import get_network
from partime_sim.cli import main
from partime_sim.cluster import Cluster, Device, Link, load_cluster
from partime_sim.errors import ConfigError
from partime_sim.generators import generate
from partime_sim.models import build_torch_model, input_shape
from partime_sim.partition import even_partition
from partime_sim.simulate import simulate

FAST = dict(warmup=1, repeats=3)
QUICK_PROFILE = dict(FAST, calibration_s=0.0)  # calibration runs of the fewest samples


def _output_bytes(model: nn.Sequential, shape: tuple[int, ...]) -> list[int]:
    x, sizes = torch.zeros((1, *shape)), []
    with torch.no_grad():
        for child in model:
            x = child(x)
            sizes.append(x[0].numel() * x.element_size())
    return sizes


# ---- layers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mlp", "lenet"])
def test_one_layer_per_child_with_real_sizes_and_times(name):
    model = build_torch_model(name)
    before = [p.detach().clone() for p in model.parameters()]
    shape = input_shape(name)
    net = profile_layers(model, shape, name=name, **FAST)
    assert [lay.name for lay in net.layers] == [n for n, _ in model.named_children()]
    assert [lay.act_bytes for lay in net.layers] == _output_bytes(model, shape)
    assert [lay.param_bytes for lay in net.layers] == [sum(p.numel() * 4 for p in c.parameters()) for c in model]
    assert net.input_bytes == math.prod(shape) * 4
    for lay, child in zip(net.layers, model):
        has_weights = any(True for _ in child.parameters())
        assert lay.fwd > 0 and lay.bwd_input > 0  # the first child's BI too (its input is made to require grad)
        assert (lay.bwd_weight > 0) == has_weights and (lay.opt > 0) == has_weights
    if name == "lenet":
        assert [lay.kind for lay in net.layers[:2]] == ["Conv2d+ReLU", "MaxPool2d"]
        assert net.layers[1].bwd_weight == 0.0
    rows = net.class_costs["cpu"]
    assert rows == tuple((lay.fwd, lay.bwd_input, lay.bwd_weight) for lay in net.layers)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # timed SGD steps ran on a copy


def test_heavier_layer_measures_slower():
    model = nn.Sequential()
    model.add_module("light", nn.Linear(64, 64))
    model.add_module("heavy", nn.Sequential(nn.Linear(64, 2048), nn.Linear(2048, 2048)))
    light, heavy = profile_layers(model, (64,), warmup=2, repeats=7).layers
    for field in ("fwd", "bwd_input", "bwd_weight", "opt"):
        assert getattr(heavy, field) > 3 * getattr(light, field), field


def test_threads_are_set_while_timing_and_restored():
    seen = []

    class Probe(nn.Linear):
        def forward(self, x):
            seen.append(torch.get_num_threads())
            return super().forward(x)

    saved = torch.get_num_threads()
    profile_layers(nn.Sequential(Probe(4, 4)), (4,), threads=1, **FAST)
    assert set(seen) == {1} and torch.get_num_threads() == saved


@pytest.mark.parametrize("kwargs, shown", [
    (dict(repeats=0), "repeats=0"), (dict(warmup=-1), "warmup=-1"), (dict(device="tpu:0"), "'tpu:0'"),
    (dict(threads=0), "threads=0"), (dict(dtype="float16"), "float16"),
])
def test_bad_settings_name_the_value(kwargs, shown):
    with pytest.raises(ConfigError, match=shown):
        profile_layers(build_torch_model("mlp"), (32,), **kwargs)


def test_wrong_input_shape_names_the_layer():
    with pytest.raises(ConfigError, match="'fc0'.*shape \\(7,\\)"):
        profile_layers(build_torch_model("mlp"), (7,), **FAST)


# ---- links -----------------------------------------------------------------------------------

def test_fit_recovers_latency_and_bandwidth_exactly():
    sizes = 4.0 * 4.0 ** np.arange(12)
    link = fit_link(sizes, 57e-6 + sizes / 4.1e9)
    assert link.latency_s == pytest.approx(57e-6, rel=1e-9)
    assert link.bandwidth_Bps == pytest.approx(4.1e9, rel=1e-9)
    through_origin = fit_link(sizes, sizes / 2e9)  # no fixed cost
    assert through_origin.latency_s == pytest.approx(0, abs=1e-15) and through_origin.bandwidth_Bps == pytest.approx(2e9)
    flat = fit_link(sizes, np.full(sizes.shape, 3e-5))  # size does not matter: bandwidth inf
    assert flat.latency_s == pytest.approx(3e-5) and flat.bandwidth_Bps == math.inf


def test_fit_keeps_both_figures_non_negative():
    sizes = np.array([1e3, 1e6, 1e7])
    link = fit_link(sizes, 1e-9 * sizes - 1e-7 * np.array([0, 1, 0]) + 1e-6)  # noisy: tends to a negative slope
    assert link.latency_s >= 0 and link.bandwidth_Bps > 0
    falling = fit_link([1.0, 1e6], [2e-3, 1e-3])  # larger is faster: only a constant fits with bandwidth >= 0
    assert falling.bandwidth_Bps == math.inf and falling.latency_s > 0
    with pytest.raises(ConfigError, match="times > 0"):
        fit_link([1, 2], [0.0, 1.0])


def test_gloo_link_between_two_processes():
    # medians of 15 round trips: of 3, two 2-ms stalls on a loaded CI machine once made the
    # 4-byte point the slowest and the fit's latency 0
    links = profile_links(["cpu"], "distributed", sizes=[4, 4096, 65536], warmup=1, repeats=15)
    assert links.link.latency_s > 0 and 0 < links.link.bandwidth_Bps
    assert links.host_link == Link() and links.barrier_s > 0
    assert links.barrier_close_s >= links.barrier_s  # both arriving at once: timed too, never below
    assert [p[0] for p in links.points["cpu->cpu"]] == [4.0, 4096.0, 65536.0]
    # a message takes CPU time at both ends (the sender's write, the receiver's gloo thread)
    assert links.link.sender_busy and links.link.send_cost_s > 0 and links.link.recv_cost_s > 0


def test_inference_links_time_one_way_traffic():
    """Inference messages go one way: the tick's messages and the message costs are timed so,
    each end measured where it computes longer (the link still fits, the figures are >= 0)."""
    links = profile_links(["cpu"], "distributed", sizes=[4, 4096], warmup=1, repeats=5, mode="infer")
    assert links.barrier_close_s >= links.barrier_s > 0
    assert links.link.send_cost_s >= 0 and links.link.recv_cost_s >= 0 and links.link.latency_s > 0


def test_ticks_compute_then_meet_with_the_last_arrival_late(monkeypatch):
    """Each round both ranks compute first, rank 0 later by a cycling skew, send the tick's
    message, stamp their arrival, meet at the barrier and take the peer's message; a barrier that
    costs 1 ms and a receive that waits 0.25 ms go on 1.25 ms after the arrival. A fake clock, so
    that a loaded machine cannot stretch the figures."""
    from partime_sim.backends import profiler

    clock_ns = [0]
    events: list[float | str] = []  # seconds computed, and the barriers and messages

    def busy(seconds: float) -> None:
        events.append(seconds)
        clock_ns[0] += round(seconds * 1e9)

    class FakeDist:
        @staticmethod
        def barrier() -> None:
            events.append("barrier")
            clock_ns[0] += 1_000_000

    class FakeMessages:
        def send(self) -> None:
            events.append("send")

        def receive(self) -> None:
            events.append("receive")
            clock_ns[0] += 250_000

        def close(self) -> None:
            events.append("close")

    monkeypatch.setattr(profiler, "time", SimpleNamespace(perf_counter_ns=lambda: clock_ns[0]))
    monkeypatch.setattr(profiler, "_busy", busy)
    monkeypatch.setattr(profiler, "BARRIER_COMPUTE_S", 2e-4)
    stamps = profiler._tick_stamps(0, FakeDist, rounds=12, skews=(0.0, 2e-3), messages=FakeMessages())
    assert np.diff(stamps, axis=1).ravel().tolist() == [1_250_000] * 12
    # rank 0 computes before each barrier, later by the cycling skew, and sends before it
    assert events == [2e-4, "send", "barrier", "receive", 2e-4 + 2e-3, "send", "barrier", "receive"] * 6 + ["close"]
    events.clear()
    stamps = profiler._tick_stamps(1, FakeDist, rounds=3, skews=(0.0, 2e-3))
    assert events == [2e-4, "barrier"] * 3 and np.diff(stamps, axis=1).ravel().tolist() == [1_000_000] * 3


def test_tick_cost_is_the_last_to_go_on_after_the_last_to_arrive():
    """Per round: max over ranks of (go on) - max over ranks of (arrival); the warm-up rounds
    are dropped and the blocks' means have their median taken."""
    from partime_sim.backends.profiler import BARRIER_BLOCKS, _tick_cost

    rounds = 2 + 2 * BARRIER_BLOCKS
    r0 = np.zeros((rounds, 2), dtype=np.int64)
    r1 = np.zeros((rounds, 2), dtype=np.int64)
    r0[:, 0], r0[:, 1] = 10_000, 12_000  # rank 0 arrives last, leaves first...
    r1[:, 0], r1[:, 1] = 5_000, 13_000  # ...rank 1 waits for its message a little longer
    r0[:2, 1] = 10**9  # a stalled warm-up round counts for nothing
    assert _tick_cost([r0, r1], warmup=2) == pytest.approx(3e-6, rel=1e-12)


def test_tick_skews_are_quantiles_of_two_jittered_stages_arrival_gap_within_bounds():
    from partime_sim.backends.profiler import BARRIER_MAX_SKEW_S, BARRIER_MIN_SKEW_S, tick_skews

    skews = tick_skews(2e-3, 0.27, points=10)
    assert len(skews) == 10 and list(skews) == sorted(skews) and skews == tick_skews(2e-3, 0.27, points=10)
    # |X - Y| of two lognormal stage times: its median is ~0.95 sigma * stage time for a small spread
    assert 0.5 * 0.27 * 2e-3 < np.median(skews) < 1.5 * 0.27 * 2e-3
    assert min(skews) == BARRIER_MIN_SKEW_S < skews[-1]  # the closest arrivals: floored
    assert tick_skews(2e-4, 0.0) == (BARRIER_MIN_SKEW_S,) == tick_skews(0.0, 0.3)  # no spread: the floor
    assert set(tick_skews(1e-4, 0.2)) == {BARRIER_MIN_SKEW_S}  # short ticks: all floored
    assert max(tick_skews(1.0, 0.5)) == BARRIER_MAX_SKEW_S  # long ticks: capped


def test_idle_penalty_is_the_extra_time_after_each_idle_and_never_falls():
    """A task that takes 0.6 ms longer after its core idled 2 ms or more: the 3 ms point shows the
    0.6 ms, the short idles (nothing to see, but a loaded machine's sleeps overshoot) stay small."""
    from partime_sim.backends.profiler import idle_penalty_points

    last = [time.perf_counter()]

    def task() -> None:
        now = time.perf_counter()
        end = now + 3e-4 + (6e-4 if now - last[0] > 2e-3 else 0.0)
        while time.perf_counter() < end:
            pass
        last[0] = time.perf_counter()

    curve = dict(idle_penalty_points(task, seconds=1.0))
    assert list(curve) == list(IDLE_POINTS_S)
    assert curve[3e-3] == pytest.approx(6e-4, abs=1.5e-4)
    assert curve[5e-5] < 2e-4 and curve[1e-4] < 2e-4 and curve[3e-4] < 2e-4
    assert list(curve.values()) == sorted(curve.values())  # more idle never costs less


def test_busy_keeps_computing_for_the_time_asked():
    from partime_sim.backends import profiler

    start = time.perf_counter()
    profiler._busy(3e-3)
    assert time.perf_counter() - start >= 3e-3


def test_local_link_is_a_handoff_without_copy():
    links = profile_links("cpu,cpu", "local", warmup=1, repeats=5)
    assert links.link.latency_s > 0 and links.link.bandwidth_Bps == math.inf and links.barrier_s > 0
    assert links.barrier_close_s == 0  # threads of one process: no close-arrival rule measured
    with pytest.raises(ConfigError, match="'pigeon'"):
        profile_links(["cpu"], "pigeon")


# ---- the profile file and the simulator ------------------------------------------------------

def _profile() -> Profile:
    """A profile with measured layers and a known link (no processes spawned)."""
    net = profile_layers(build_torch_model("mlp"), (32,), name="mlp[cpu]", **FAST)
    devices = tuple(Device(f"cpu:{i}", "cpu") for i in range(2))
    return Profile(net, Cluster("profiled", devices, link=Link(6e-5, 4e9), barrier_s=2e-4, barrier_close_s=9e-4,
                                barrier_close_window_s=2e-5), {"repeats": 3})


def test_profile_file_round_trips_and_the_simulator_loads_it(tmp_path):
    prof = _profile()
    path = tmp_path / "p.json"
    prof.save(path)
    assert json.loads(path.read_text())["kind"] == "partime-sim-profile"
    assert load_profile(path) == prof
    assert get_network(str(path)) == prof.network
    assert load_cluster(str(path), 2) == prof.cluster
    four = load_cluster(str(path), 4)
    assert [d.kind for d in four.devices] == ["cpu"] * 4 and {d.speed for d in four.devices} == {1.0}
    assert four.link == prof.cluster.link and four.barrier_s == pytest.approx(2 * 2e-4)  # 2 dissemination rounds
    assert four.barrier_close_s == pytest.approx(2 * 9e-4) and four.barrier_close_window_s == 2e-5
    assert load_cluster(str(path), 1).num_devices == 1
    sched = generate("partime", 4, 20, "train")
    result = simulate(sched, get_network(str(path)), four, even_partition(8, 4))
    trace = result.trace
    fwd = trace[(trace["kind"] == "F") & (trace["stage"] == 0)]
    measured = sum(row[0] for row in prof.network.class_costs["cpu"][:2])  # even split: 2 layers per stage
    assert (fwd["end"] - fwd["start"]).to_numpy() == pytest.approx(measured, rel=1e-9)
    assert result.makespan > 0


def test_not_a_profile_is_a_clear_error(tmp_path):
    plain = tmp_path / "net.json"
    get_network("mlp").save(plain)
    with pytest.raises(ConfigError, match="not a partime-sim profile"):
        load_profile(plain)
    half = tmp_path / "half.json"
    half.write_text(json.dumps({"kind": "partime-sim-profile", "network": _profile().network.to_dict()}))
    with pytest.raises(ConfigError, match="no 'cluster' section"):
        load_cluster(str(half), 2)


def test_profile_end_to_end_with_catalogue_flops():
    prof = profile("lenet", ["cpu"], transport="local", **QUICK_PROFILE)
    catalogue = get_network("lenet")
    assert [lay.name for lay in prof.network.layers] == [lay.name for lay in catalogue.layers]
    assert [lay.flops for lay in prof.network.layers] == [lay.flops for lay in catalogue.layers]
    assert [lay.act_bytes for lay in prof.network.layers] == [lay.act_bytes for lay in catalogue.layers]
    assert list(prof.network.class_costs) == ["cpu"]
    assert [d.kind for d in prof.cluster.devices] == ["cpu", "cpu"]  # a pipeline needs two workers
    assert {"date", "machine", "torch", "threads", "repeats"} <= prof.meta.keys() and prof.meta["threads"] == 1
    # two local workers (threads) computing at once share cores and the GIL: measured, never < 1
    assert prof.cluster.concurrency_slowdown == prof.meta["concurrency_slowdown"] >= 1.0
    assert set(prof.meta["jitter"]) == {"cpu"} and prof.meta["jitter"]["cpu"] >= 0
    assert prof.meta["calibration_samples"] == {"cpu": 120}  # calibration_s=0: the fewest samples


def test_profile_a_factory_module(tmp_path):
    module = tmp_path / "mine.py"
    module.write_text("from torch import nn\n\ndef build():\n"
                      "    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))\n")
    # direct timings: calibration may leave the cheapest layer (the Tanh) at 0 beyond its per-task overhead
    prof = profile(f"{module}:build", "cpu", transport="local", input_shape=(8,), calibrated=False, **FAST)
    assert [lay.act_bytes for lay in prof.network.layers] == [64, 64, 8]
    assert prof.network.layers[1].bwd_weight == 0 and prof.network.layers[1].bwd_input > 0


# ---- command line ----------------------------------------------------------------------------

def test_cli_profile_writes_a_file_simulate_accepts(capsys, tmp_path):
    path = tmp_path / "mlp.json"
    assert main(["profile", "--network", "mlp", "--device", "cpu", "--repeats", "3", "--warmup", "1",
                 "--calibration-seconds", "0", "--mode", "infer", "--no-pin-cores", "--out", str(path)]) == 0
    out = capsys.readouterr().out
    assert load_profile(path).meta["pin_cores"] is False  # its processes left to the OS, as asked
    assert load_profile(path).meta["calibration_samples"] == {"cpu": 120}
    assert load_profile(path).meta["mode"] == "infer"  # calibrated on inference runs
    assert "fc7" in out and "latency" in out and f"--network {path} --cluster {path}" in out
    assert "compute after an idle core" not in out and load_profile(path).cluster.idle_penalty == ()  # not asked
    prof = load_profile(path)
    link, points = prof.cluster.link, prof.meta["link_points"]["cpu->cpu"]
    assert link.latency_s > 0 and link.bandwidth_Bps > 0 and link.sender_busy  # gloo between two processes
    # 16 MiB takes longer than 4 B (the fit itself is checked exactly above; three repeats on a
    # loaded 2-core CI machine once left it a constant fit)
    assert points[-1][0] == 2**24 and points[-1][1] > points[0][1]
    # the barrier as timed with both processes arriving at once applies within the close window
    assert prof.cluster.barrier_close_s >= prof.cluster.barrier_s > 0
    assert prof.cluster.barrier_close_window_s == BARRIER_CLOSE_WINDOW_S
    assert main(["simulate", "--network", str(path), "--cluster", str(path), "--schedule", "partime",
                 "--devices", "2", "--samples", "50", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["devices"] == 2 and row["makespan_s"] > 0


@pytest.mark.parametrize("argv, needle", [
    (["--device", "tpu:0"], "'tpu:0'"),
    (["--device", "cpu", "--repeats", "0"], "0 must be >= 1"),
    (["--device", "cpu", "--input-shape", "3xx2"], "'3xx2'"),
    (["--device", "cpu", "--out", "p.txt"], "p.txt"),
    (["--device", "cpu", "--calibration-seconds", "-1"], "-1.0 must be >= 0"),
])
def test_cli_bad_input_is_one_line(capsys, argv, needle):
    try:
        code = main(["profile", "--network", "mlp", *argv])
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and needle in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_calibration_from_backend_runs_gives_nonnegative_costs_and_overheads() -> None:
    from partime_sim.backends.profiler import calibrate, profile_layers
    from partime_sim.models import build_torch_model

    model = build_torch_model("mlp", 0)
    direct = profile_layers(model, (32,), "cpu", warmup=1, repeats=3)
    net, overhead, jitter = calibrate(direct, model, (32,), samples=16)
    assert [l.name for l in net.layers] == [l.name for l in direct.layers]
    assert len(overhead) == 3 and min(overhead) >= 0
    assert math.isfinite(jitter) and jitter >= 0  # coefficient of variation of the task times
    assert all(l.fwd >= 0 and l.bwd_input >= 0 and l.bwd_weight >= 0 for l in net.layers)
    assert sum(l.fwd + l.bwd_input + l.bwd_weight for l in net.layers) > 0
    assert net.class_costs["cpu"][0] == (net.layers[0].fwd, net.layers[0].bwd_input, net.layers[0].bwd_weight)


def test_calibration_runs_last_the_asked_seconds_within_bounds() -> None:
    from partime_sim.backends.profiler import (
        CALIBRATION_MAX_SAMPLES, CALIBRATION_SAMPLES, calibration_samples,
    )
    from partime_sim.network import Layer, Network

    # 0.2 + 0.3 + 0.4 + 0.1 ms per sample in training, 0.2 ms in inference
    net = Network("n", (Layer("a", 2e-4, 3e-4, 4e-4, opt=1e-4),), input_bytes=4)
    assert calibration_samples(net, "train", 1.0) == math.ceil(1.0 * 4 / 3 / 1e-3)  # first quarter is warm-up
    assert calibration_samples(net, "infer", 0.2) == math.ceil(0.2 * 4 / 3 / 2e-4)
    assert calibration_samples(net, "train", 0.0) == CALIBRATION_SAMPLES
    assert calibration_samples(net, "infer", 60.0) == CALIBRATION_MAX_SAMPLES
    big = Network("big", net.layers, input_bytes=2**20)  # 1 MiB per sample: 256 of them at most
    assert calibration_samples(big, "infer", 60.0) == 256 and calibration_samples(big, "infer", 0.02) == 134
    with pytest.raises(ConfigError, match="seconds=-1"):
        calibration_samples(net, "train", -1.0)


def test_profile_records_the_calibration_length() -> None:
    from partime_sim.backends.profiler import CALIBRATION_MAX_SAMPLES, CALIBRATION_SAMPLES

    # mlp's layers take well under 0.1 ms per sample, so 0.3 s needs more than the fewest samples
    prof = profile("mlp", ["cpu"], transport="local", warmup=1, repeats=3, calibration_s=0.3, idle_penalty=True)
    (samples,) = prof.meta["calibration_samples"].values()
    assert CALIBRATION_SAMPLES < samples <= CALIBRATION_MAX_SAMPLES
    # asked to, a CPU profile measures the idle penalty of its cores: a curve that never falls, in the JSON too
    idle = prof.cluster.idle_penalty
    assert [t for t, _ in idle] == list(IDLE_POINTS_S) and all(x >= 0 for _, x in idle)
    assert all(a <= b for (_, a), (_, b) in zip(idle, idle[1:])) and prof.meta["idle_penalty"] == [list(p) for p in idle]


def test_calibration_splits_the_measured_runs_exactly(monkeypatch) -> None:
    """Per-layer and whole-model task means (us) given, the decomposition checked by hand."""
    import partime_sim.backends.profiler as P

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    direct = profile_layers(model, (4,), **FAST)
    per_layer = np.array([[100.0, 200.0, 50.0], [30.0, 60.0, 5.0], [120.0, 220.0, 60.0]]) * 1e-6
    whole = np.array([[100.0, 380.0, 80.0]]) * 1e-6
    runs = iter([(per_layer, 0.1), (whole, 0.2)])
    monkeypatch.setattr(P, "_backend_task_stats", lambda *a, **k: next(runs))
    net, overhead, jitter = P.calibrate(direct, model, (4,), samples=8)
    cost = np.array([(lay.fwd, lay.bwd_input + lay.bwd_weight, lay.opt) for lay in net.layers]) * 1e6
    # forward: (250 - 100) / 2 = 75 exceeds the cheapest task (30): capped there, the rest scaled
    # to the whole run's 100; backward: (480 - 380) / 2 = 50; optimizer: the two layers with
    # weights, (110 - 80) / 1 = 30, the ReLU steps nothing
    assert np.allclose(np.array(overhead) * 1e6, [30.0, 50.0, 30.0])
    assert np.allclose(cost[:, 0], np.array([70.0, 0.0, 90.0]) * 70 / 160)
    assert np.allclose(cost[:, 1], [150.0, 10.0, 170.0]) and np.allclose(cost[:, 2], [20.0, 0.0, 30.0])
    assert np.allclose(cost.sum(axis=0) + np.array(overhead) * 1e6, whole[0] * 1e6)  # one stage: the whole run
    assert jitter == 0.2


@pytest.mark.parametrize("transport", ["local", "distributed"])
def test_concurrency_slowdown_alternates_rounds_and_is_never_below_one(transport) -> None:
    from partime_sim.backends.profiler import concurrency_slowdown

    slowdown = concurrency_slowdown("mlp", 2, transport, samples=16, rounds=2)
    assert math.isfinite(slowdown) and slowdown >= 1.0


def test_concurrency_rounds_must_be_a_positive_integer() -> None:
    from partime_sim.backends.profiler import concurrency_slowdown

    with pytest.raises(ConfigError, match="rounds=0"):
        concurrency_slowdown("mlp", 2, "local", rounds=0)
    with pytest.raises(ConfigError, match="device='cuda:0' with transport 'distributed'.*transport='local'"):
        concurrency_slowdown("mlp", 2, "distributed", device="cuda:0")


def test_concurrent_worker_reports_every_round_alone_on_rank_zero_only() -> None:
    import queue
    import threading

    from partime_sim.backends.profiler import _concurrent_worker

    for rank in (0, 1):
        out: queue.Queue = queue.Queue()
        _concurrent_worker("mlp", 0, "float32", (32,), "train", 16, 1, 3, False, rank, 2, threading.Barrier(1), out)
        status, (got_rank, alone, together) = out.get_nowait()
        assert status == "ok" and got_rank == rank
        assert len(together) == 3 and min(together) > 0
        assert len(alone) == (3 if rank == 0 else 0) and all(a > 0 for a in alone)


def test_cli_profile_idle_penalty_is_measured_when_asked(capsys, tmp_path):
    path = tmp_path / "mlp.json"
    assert main(["profile", "--network", "mlp", "--device", "cpu", "--transport", "local", "--repeats", "3",
                 "--warmup", "1", "--calibration-seconds", "0", "--idle-penalty", "--out", str(path)]) == 0
    assert "compute after an idle core takes longer by" in capsys.readouterr().out
    assert [t for t, _ in load_profile(path).cluster.idle_penalty] == list(IDLE_POINTS_S)


# ---- message costs fitted to backend runs ------------------------------------------------------

def test_cost_for_throughput_inverts_a_falling_prediction_and_clamps_to_its_ends() -> None:
    def sps(cost_s: float) -> float:  # a stage of 1 ms paying two message ends
        return 1.0 / (1e-3 + 2 * cost_s)

    resolution = MESSAGE_COST_MAX_S / 2**14
    assert abs(cost_for_throughput(sps, sps(1.5e-4)) - 1.5e-4) <= resolution
    assert cost_for_throughput(sps, 2 * sps(0.0)) <= resolution  # faster than free messages: 0
    assert cost_for_throughput(sps, sps(5 * MESSAGE_COST_MAX_S)) >= MESSAGE_COST_MAX_S - resolution


def test_with_message_costs_charges_every_link_at_both_ends() -> None:
    prof = _profile()
    prof = dataclasses.replace(prof, cluster=dataclasses.replace(prof.cluster, links={(0, 1): Link(1e-4, 1e9)}))
    charged = with_message_costs(prof, 1.2e-4)
    for link in (charged.cluster.link, *charged.cluster.links.values()):
        assert (link.send_cost_s, link.recv_cost_s) == (1.2e-4, 1.2e-4)
    assert charged.cluster.link.latency_s == prof.cluster.link.latency_s and charged.meta["message_cost_s"] == 1.2e-4
    assert prof.cluster.link.send_cost_s == 0.0  # the given profile is left as it was


def test_with_message_costs_charges_each_barrier_round_a_token_once() -> None:
    from partime_sim.cluster import resize_profiled

    prof = _profile()
    prof = dataclasses.replace(prof, meta={**prof.meta, "barrier_per_round_s": 2e-4, "barrier_close_per_round_s": 9e-4})
    charged = with_message_costs(prof, 1e-4)
    assert charged.cluster.barrier_s == pytest.approx(3e-4) and charged.cluster.barrier_close_s == pytest.approx(1e-3)
    assert charged.meta["barrier_token_s"] == 1e-4
    again = with_message_costs(charged, 5e-5)  # from the measured barrier, not on top of an earlier token
    assert again.cluster.barrier_s == pytest.approx(2.5e-4) and again.cluster.barrier_close_s == pytest.approx(9.5e-4)
    plain = with_message_costs(charged, 1e-4, tokens=False)
    assert (plain.cluster.barrier_s, plain.cluster.barrier_close_s) == (2e-4, 9e-4)
    assert plain.meta["barrier_token_s"] == 0.0
    four = resize_profiled(charged.cluster, 4)  # two dissemination rounds: two tokens per rank
    assert four.barrier_s == pytest.approx(2 * 3e-4)
    sched = generate("partime", 2, 20, "infer")
    tokened, untokened = (simulate(sched, prof.network, p.cluster, even_partition(prof.network.num_layers, 2)).makespan
                          for p in (charged, plain))
    assert tokened > untokened  # 21 barriers, each 0.1 ms dearer


def test_backend_message_costs_need_cpu_processes_on_the_distributed_transport() -> None:
    prof = _profile()
    assert backend_message_costs_apply({"mode": "infer", "transport": "distributed", "devices": ["cpu", "cpu"]})
    for meta in ({"mode": "eval", "transport": "distributed", "devices": ["cpu", "cpu"]},
                 {"mode": "train", "transport": "local", "devices": ["cpu", "cpu"]},
                 {"mode": "train", "transport": "distributed", "devices": ["cuda:0", "cuda:1"]}):
        with pytest.raises(ConfigError, match="--message-costs measured"):
            calibrate_message_costs(dataclasses.replace(prof, meta=meta))
    ok = {"mode": "train", "transport": "distributed", "devices": ["cpu", "cpu"]}
    with pytest.raises(ConfigError, match="runs=0"):
        calibrate_message_costs(dataclasses.replace(prof, meta=ok), runs=0)


def test_a_backend_run_slower_than_any_message_cost_explains_warns_and_clamps(monkeypatch) -> None:
    import partime_sim.backends.run as run_module
    import partime_sim.metrics as metrics

    monkeypatch.setattr(run_module, "run_config", lambda cfg: (None, SimpleNamespace(trace=None)))
    real_summarize = metrics.summarize

    def summarize(trace, **kwargs):  # the faked run: 1 sample/s, a stalled machine; the simulator's as they are
        return {"throughput_sps": 1.0} if trace is None else real_summarize(trace, **kwargs)

    monkeypatch.setattr(metrics, "summarize", summarize)
    meta = {"spec": "mlp", "mode": "train", "transport": "distributed", "devices": ["cpu", "cpu"]}
    with pytest.warns(RuntimeWarning, match="machine was probably busy"):
        fitted = calibrate_message_costs(dataclasses.replace(_profile(), meta=meta), runs=1, samples=40)
    assert fitted.meta["message_cost_s"] >= MESSAGE_COST_MAX_S * (1 - 2.0**-13)


def test_message_costs_are_fitted_to_the_schedule_asked_for(monkeypatch) -> None:
    import partime_sim.backends.run as run_module
    import partime_sim.metrics as metrics
    from partime_sim.analysis.compare import predict

    meta = {"spec": "mlp", "mode": "train", "transport": "distributed", "devices": ["cpu", "cpu"]}
    prof = dataclasses.replace(_profile(), meta=meta)
    free, dear = (predict(with_message_costs(prof, c), "layerpipe", 2, 40, "train")[0]["throughput_sps"]
                  for c in (0.0, MESSAGE_COST_MAX_S))
    target = (free + dear) / 2  # the faked runs: halfway between free and the dearest messages
    ran: list[str] = []
    monkeypatch.setattr(run_module, "run_config", lambda cfg: (ran.append(cfg.schedule), SimpleNamespace(trace=None)))
    real_summarize = metrics.summarize
    monkeypatch.setattr(metrics, "summarize", lambda trace, **kw: {"throughput_sps": target} if trace is None
                        else real_summarize(trace, **kw))
    fitted = calibrate_message_costs(prof, runs=2, samples=40, schedule="layerpipe")
    assert ran == ["layerpipe", "layerpipe"] and fitted.meta["message_cost_calibration"]["schedule"] == "layerpipe"
    assert 0 < fitted.meta["message_cost_s"] < MESSAGE_COST_MAX_S
    assert predict(fitted, "layerpipe", 2, 40, "train")[0]["throughput_sps"] == pytest.approx(target, rel=1e-3)


def test_backend_message_cost_makes_the_profile_predict_the_pipedream_runs(tmp_path) -> None:
    from partime_sim.analysis.compare import predict

    meta = {"spec": "mlp", "mode": "train", "transport": "distributed", "devices": ["cpu", "cpu"], "seed": 0,
            "dtype": "float32", "threads": 1, "pin_cores": True}
    prof = dataclasses.replace(_profile(), meta=meta)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fitted = calibrate_message_costs(prof, runs=1, samples=80)
    record = fitted.meta["message_cost_calibration"]
    assert record["schedule"] == "pipedream" and sum(record["partition"]) == prof.network.num_layers
    assert len(record["throughput_sps"]) == 1 and record["throughput_sps"][0] > 0
    cost = fitted.meta["message_cost_s"]
    assert fitted.cluster.link.send_cost_s == fitted.cluster.link.recv_cost_s == cost
    target = record["throughput_sps"][0]
    predicted = predict(fitted, "pipedream", 2, 80, "train")[0]["throughput_sps"]
    resolution = MESSAGE_COST_MAX_S / 2**14
    clamped_high = [w for w in caught if "clamped" in str(w.message)]
    if cost <= resolution:  # the run beat free messages: nothing to charge
        assert predict(prof, "pipedream", 2, 80, "train")[0]["throughput_sps"] <= target * 1.01
    elif cost >= MESSAGE_COST_MAX_S - resolution:  # a busy machine (CI's other worker): slower than any cost explains
        assert predicted >= target * 0.99 and clamped_high, "a clamped fit must warn that the machine was busy"
    else:
        assert predicted == pytest.approx(target, rel=0.01) and not clamped_high
    fitted.save(tmp_path / "fitted.json")  # the record is plain JSON: a saved profile keeps its fitted cost
    assert load_profile(tmp_path / "fitted.json").cluster.link.send_cost_s == cost

