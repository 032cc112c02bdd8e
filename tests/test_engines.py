"""The timing engines and ``simulate``: fast == des (to 1e-9 s) on every generator when links
are uncontended, both equal a plain-Python longest-path oracle on random graphs, link
contention in des, the cost model, arrivals, memory accounting, and the trace."""

import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from partime_sim.cluster import Cluster, Device, Link, ideal_cluster
from partime_sim.costs import arrival_times, idle_extra, memory_sizes, peak_memory, task_costs
from partime_sim.engine_des import run_des
from partime_sim.engine_fast import run_fast
from partime_sim.errors import ConfigError, PartitionError, ScheduleError
from partime_sim.generators import SCHEDULES, generate
from partime_sim.network import Layer, Network
from partime_sim.partition import Partition, even_partition
from partime_sim.schedule import B, BARRIER, BI, BW, F, OPT, Schedule
from partime_sim.simulate import simulate
from partime_sim.trace import check_trace

GENERATORS = [name for name in SCHEDULES if name != "pipedream"]  # pipedream is 1f1b's alias
MS = 1e-3


def random_network(num_layers: int, seed: int = 0) -> Network:
    """Non-uniform costs and sizes, plus measured costs for the device class 'gpu-b'."""
    rng = np.random.default_rng(seed)
    layers = tuple(
        Layer(f"l{i}", fwd=rng.uniform(0.5, 2) * MS, bwd_input=rng.uniform(0.5, 2) * MS,
              bwd_weight=rng.uniform(0.5, 2) * MS, act_bytes=int(rng.integers(10**5, 10**6)),
              param_bytes=int(rng.integers(10**4, 10**5)), opt=rng.uniform(0, 0.1) * MS)
        for i in range(num_layers)
    )
    class_costs = {"gpu-b": tuple(tuple(rng.uniform(0.2, 1) * MS for _ in range(3)) for _ in range(num_layers))}
    return Network(f"random{num_layers}", layers, input_bytes=200_000, class_costs=class_costs)


def mixed_cluster(num_devices: int) -> Cluster:
    """Heterogeneous devices and non-ideal links (one per-pair override): nothing is uniform."""
    devices = tuple(Device(f"d{i}", kind="gpu-b" if i % 3 == 2 else "ref", speed=1.0 + 0.5 * (i % 2))
                    for i in range(num_devices))
    links = {(0, 1): Link(latency_s=5e-6, bandwidth_Bps=2e10)} if num_devices > 1 else {}
    return Cluster("mixed", devices, link=Link(latency_s=2e-5, bandwidth_Bps=5e9), links=links,
                   host_link=Link(latency_s=5e-6, bandwidth_Bps=1e10), barrier_s=3e-6,
                   barrier_close_s=4e-5, barrier_close_window_s=1e-4,  # some barriers close under jitter
                   idle_penalty=((2e-5, 3e-6), (3e-4, 2e-5)))  # tasks after a wait pay a little


NOISE = {
    "saturate": {},
    "fixed-rate+jitter": dict(arrival="fixed", rate_hz=800.0, jitter=0.3),
    "poisson+stragglers": dict(arrival="poisson", rate_hz=1500.0, jitter=0.1, straggler_prob=0.2,
                               straggler_factor=4.0, seed=5),
}


@pytest.mark.parametrize("noise", list(NOISE))
@pytest.mark.parametrize("stages, samples, microbatches", [(1, 4, None), (3, 9, 3), (5, 12, 4)])
@pytest.mark.parametrize("mode", ["train", "infer"])
@pytest.mark.parametrize("name", GENERATORS)
def test_fast_equals_des_on_every_generator(name, mode, stages, samples, microbatches, noise):
    sched = generate(name, stages, samples, mode, microbatches=microbatches)
    net = random_network(2 * stages + 1, seed=stages)
    cluster = mixed_cluster(stages)
    part = even_partition(net.num_layers, stages)
    fast = simulate(sched, net, cluster, part, engine="fast", **NOISE[noise])
    des = simulate(sched, net, cluster, part, engine="des", contention=False, **NOISE[noise])
    pd.testing.assert_frame_equal(fast.trace, des.trace, check_exact=False, rtol=0, atol=1e-9)
    assert fast.peak_memory == des.peak_memory
    assert fast.baseline_makespan == des.baseline_makespan


def _two_stage_net(fwd1_ms: float) -> Network:
    layers = tuple(Layer(name, fwd=fwd * MS, bwd_input=0.0, bwd_weight=0.0, act_bytes=1000)
                   for name, fwd in (("a", 0.3), ("b", fwd1_ms)))
    return Network("two", layers, input_bytes=1000)


def test_barrier_costs_its_close_cost_when_the_last_two_arrivals_are_close():
    cluster = Cluster("vm", (Device("a"), Device("b")), link=Link(latency_s=5e-5), barrier_s=1.5e-4,
                      barrier_close_s=1e-3, barrier_close_window_s=2e-5)
    sched, part = generate("partime", 2, 30, "infer"), even_partition(2, 2)

    def barriers(net: Network, **noise) -> tuple[np.ndarray, np.ndarray]:
        fast = simulate(sched, net, cluster, part, engine="fast", **noise).trace
        des = simulate(sched, net, cluster, part, engine="des", contention=False, **noise).trace
        pd.testing.assert_frame_equal(fast, des, check_exact=True)  # the same rule, the same floats
        both = fast[fast.kind == "F"].groupby("tick").size() == 2  # ticks where both stages computed
        bar = fast[fast.kind == "BARRIER"].set_index("tick")
        return (bar.end - bar.start).to_numpy(), both.reindex(bar.index, fill_value=False).to_numpy()

    # balanced stages, no jitter: both arrive at once in every full tick
    cost, full = barriers(_two_stage_net(0.3))
    assert full.sum() == 29 and np.allclose(cost[full], 1e-3, rtol=0, atol=1e-15)
    assert np.allclose(cost[~full], 1.5e-4, rtol=0, atol=1e-15)  # one arrival: nothing to be close
    # stage 1 0.05 ms slower: never within 0.02 ms
    cost, _ = barriers(_two_stage_net(0.35))
    assert np.allclose(cost, 1.5e-4, rtol=0, atol=1e-15)
    # jittered: some ticks close, some not; without the window no barrier pays the close cost
    cost, _ = barriers(_two_stage_net(0.3), jitter=0.05)
    assert 0 < np.sum(cost > 5e-4) < 25
    plain = simulate(sched, _two_stage_net(0.3), replace(cluster, barrier_close_window_s=0.0), part, jitter=0.05)
    assert (plain.trace[plain.trace.kind == "BARRIER"].eval("end - start") < 5e-4).all()


@pytest.mark.parametrize("arrival", ["fixed", "poisson"])
def test_a_compute_task_after_an_idle_device_pays_the_interpolated_penalty(arrival):
    # one 0.3 ms layer on one device, samples every 1 ms: each forward after the first waits 0.7 ms
    penalty = ((1e-4, 1e-5), (1e-3, 1e-4))
    cluster = Cluster("vm", (Device("a"), Device("b")), idle_penalty=penalty)
    net = Network("one", (Layer("a", fwd=0.3 * MS, bwd_input=0.0, bwd_weight=0.0, act_bytes=1000),), input_bytes=1000)
    sched, part = generate("sequential", 1, 20, "infer"), even_partition(1, 1)
    noise = dict(arrival=arrival, rate_hz=1000.0, seed=3)
    fast = simulate(sched, net, cluster, part, engine="fast", **noise).trace
    des = simulate(sched, net, cluster, part, engine="des", contention=False, **noise).trace
    pd.testing.assert_frame_equal(fast, des, check_exact=True)
    f = fast[fast.kind == "F"].sort_values("start")
    idle = np.r_[f.start.iloc[0], f.start.to_numpy()[1:] - f.end.to_numpy()[:-1]]
    want = 0.3 * MS + np.interp(idle, [0, 1e-4, 1e-3], [0, 1e-5, 1e-4])  # held beyond 1 ms
    np.testing.assert_allclose(f.eval("end - start"), want, rtol=0, atol=1e-15)
    if arrival == "fixed":  # the waits are known: 0.7 ms before the second forward: 1e-5 + 0.6 / 0.9 * 9e-5,
        took = f.eval("end - start").to_numpy()  # then 0.7 ms less the extra e, which settles at 7e-5 / 1.1
        assert took[0] == 0.3 * MS and abs(took[1] - (0.3 * MS + 7e-5)) < 1e-15
        assert np.allclose(took[8:], 0.3 * MS + 7e-5 / 1.1, rtol=0, atol=1e-12)
    # without the penalty every forward costs its compute alone
    plain = simulate(sched, net, replace(cluster, idle_penalty=()), part, **noise).trace
    assert np.allclose(plain[plain.kind == "F"].eval("end - start"), 0.3 * MS, rtol=0, atol=1e-15)
    assert fast.end.max() > plain.end.max()


@pytest.mark.parametrize("name", ["partime", "1f1b", "zb-h1"])
def test_contention_changes_nothing_when_transfers_never_overlap(name):
    # 1 us latency, infinite bandwidth, 1 ms compute: a link is always free when needed
    sched = generate(name, 4, 8, "train", microbatches=4)
    net = random_network(8)
    cluster = Cluster("fast-links", tuple(Device(f"d{i}") for i in range(4)), link=Link(latency_s=1e-6))
    part = even_partition(8, 4)
    fast = simulate(sched, net, cluster, part)
    des = simulate(sched, net, cluster, part, engine="des", contention=True)
    pd.testing.assert_frame_equal(fast.trace, des.trace, check_exact=False, rtol=0, atol=1e-9)


# ---- the fast engine against a plain longest-path oracle on random task graphs ------------

def oracle(sched: Schedule, costs) -> tuple[np.ndarray, np.ndarray]:
    """The timing rule written as a loop: table order is a topological order."""
    n = len(sched)
    start, end = np.zeros(n), np.zeros(n)
    prev = sched.lane_prev
    deps = [[] for _ in range(n)]
    for j, dst in enumerate(sched.dep_dst.tolist()):
        deps[dst].append(j)
    for i in range(n):
        t = costs.release[i]
        if prev[i] >= 0:
            t = max(t, end[prev[i]])
        ready = sorted(end[sched.dep_src[j]] + costs.edge_time[j] for j in deps[i])
        if ready:
            t = max(t, ready[-1])
        duration = costs.duration[i]
        if i in costs.close_tasks and len(ready) >= 2 and ready[-1] - ready[-2] <= costs.close_window:
            duration += costs.close_extra  # a barrier whose last two inputs came close together
        if costs.idle_tasks.size and costs.idle_tasks[i]:  # a compute task after its device sat idle
            duration += idle_extra(np.array([t - (end[prev[i]] if prev[i] >= 0 else 0.0)]), costs.idle_curve)[0]
        start[i], end[i] = t, t + duration
    return start, end


@st.composite
def random_graphs(draw):
    """Random DAGs with several devices and lanes, global tasks and tasks without inputs."""
    stages, samples, devices = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    n = draw(st.integers(1, 30))
    cols = {c: [] for c in ("stage", "kind", "sample", "tick", "device", "lane")}
    src, dst = [], []
    for i in range(n):
        glob = draw(st.integers(0, 9)) == 0
        row = ((-1, BARRIER, -1, i, -1, 0) if glob else
               (draw(st.integers(0, stages - 1)), draw(st.sampled_from([F, B, BI, BW, OPT])),
                draw(st.integers(0, samples - 1)), i, draw(st.integers(0, devices - 1)), draw(st.integers(0, 1))))
        for c, v in zip(cols, row):
            cols[c].append(v)
        for j in sorted(set(draw(st.lists(st.integers(0, i - 1), max_size=3)))) if i else []:
            src.append(j)
            dst.append(i)
    sched = Schedule.build("random", "train", stages, samples, devices, cols, src, dst)
    return sched, draw(st.integers(0, 10**6))


@settings(max_examples=80, deadline=None)
@given(random_graphs())
def test_fast_and_des_equal_the_oracle_on_random_graphs(case):
    sched, seed = case
    net = random_network(sched.num_stages, seed=seed % 7)
    cluster = mixed_cluster(sched.num_devices)
    part = even_partition(sched.num_stages, sched.num_stages)
    arrivals = arrival_times(sched.num_samples, "poisson", 3000.0, seed=seed)
    costs = task_costs(sched, net, cluster, part, arrivals=arrivals, jitter=0.5, seed=seed)
    want_start, want_end = oracle(sched, costs)
    start, end = run_fast(sched, costs)
    assert np.array_equal(start, want_start) and np.array_equal(end, want_end)
    start, end, _ = run_des(sched, costs, cluster, contention=False)
    np.testing.assert_allclose(start, want_start, rtol=0, atol=1e-9)
    np.testing.assert_allclose(end, want_end, rtol=0, atol=1e-9)


# ---- contention ----------------------------------------------------------------------------

def two_sends(medium_a: str | None, medium_b: str | None):
    """Stage 0 runs on devices 0 and 1 (samples 0, 1), stage 1 on devices 2 and 3; both
    activations (1 MB, 1 ms on a 1 GB/s link) leave at t = 1 ms."""
    net = Network("two", (Layer("a", MS, MS, MS, act_bytes=10**6), Layer("b", MS, MS, MS)))
    sched = Schedule.build("two-sends", "infer", 2, 2, 4,
                           dict(stage=[0, 0, 1, 1], kind=[F] * 4, sample=[0, 1, 0, 1], tick=[0, 0, 1, 1],
                                device=[0, 1, 2, 3]), [0, 1], [2, 3]).validate()
    links = {(0, 2): Link(bandwidth_Bps=1e9, medium=medium_a), (1, 3): Link(bandwidth_Bps=1e9, medium=medium_b)}
    cluster = Cluster("bus", tuple(Device(f"d{i}") for i in range(4)), links=links)
    return sched, net, cluster, Partition((0, 1, 2), (0, 2))


def test_transfers_sharing_a_medium_queue_in_des():
    sched, net, cluster, part = two_sends("bus", "bus")
    fast = simulate(sched, net, cluster, part)
    des = simulate(sched, net, cluster, part, engine="des")
    assert fast.makespan == pytest.approx(3 * MS)  # F, transfer, F
    assert des.makespan == pytest.approx(4 * MS)  # the second transfer waits for the bus
    sends = des.trace[des.trace["kind"] == "SEND"].sort_values("start")
    assert sends["start"].tolist() == pytest.approx([1 * MS, 2 * MS])
    assert sends["end"].tolist() == pytest.approx([2 * MS, 3 * MS])
    off = simulate(sched, net, cluster, part, engine="des", contention=False)
    pd.testing.assert_frame_equal(off.trace, fast.trace, check_exact=False, rtol=0, atol=1e-12)


def test_transfers_on_separate_links_do_not_queue():
    sched, net, cluster, part = two_sends(None, None)
    assert simulate(sched, net, cluster, part, engine="des").makespan == pytest.approx(3 * MS)


def test_shared_medium_slows_a_generated_pipeline():
    # partime inference: every tick stage 0 -> 1 and stage 1 -> 2 send at the same time
    net = Network("bus3", tuple(Layer(f"l{i}", MS, MS, MS, act_bytes=10**6) for i in range(3)))
    cluster = Cluster("bus", tuple(Device(f"d{i}") for i in range(3)),
                      link=Link(latency_s=1e-6, bandwidth_Bps=1e9, medium="pcie-switch"))
    sched = generate("partime", 3, 6, "infer")
    part = even_partition(3, 3)
    fast, des = simulate(sched, net, cluster, part), simulate(sched, net, cluster, part, engine="des")
    assert des.makespan > fast.makespan + 0.9 * MS  # at least one transfer (1 ms) waited
    sends = des.trace[des.trace["kind"] == "SEND"].sort_values("start")
    assert np.all(sends["start"].to_numpy()[1:] >= sends["end"].to_numpy()[:-1] - 1e-15)  # one at a time


# ---- costs -----------------------------------------------------------------------------------

def hand_pipeline(mb: int = 1) -> Schedule:
    """Two stages on devices 0, 1: F, F, B, B, OPT, OPT and a global barrier."""
    rows = [  # (stage, kind, device, sample)
            (0, F, 0, 0), (1, F, 1, 0), (1, B, 1, 0), (0, B, 0, 0), (1, OPT, 1, -1), (0, OPT, 0, -1),
            (-1, BARRIER, -1, -1)]
    stage, kind, device, sample = (list(c) for c in zip(*rows))
    return Schedule.build("hand", "train", 2, 1, 2, dict(stage=stage, kind=kind, sample=sample, tick=[0] * 7,
                                                         device=device),
                          [0, 1, 2, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6, 6], params={"microbatch_size": mb})


def test_task_costs_follow_layers_devices_and_links():
    net = random_network(5)
    cluster = Cluster("c", (Device("a", speed=2.0), Device("b", kind="gpu-b")), link=Link(1e-5, 1e9),
                      host_link=Link(2e-6, 4e9), barrier_s=7e-6)
    part = Partition((0, 2, 5), (0, 1))
    sched = hand_pipeline(mb=3)
    costs = task_costs(sched, net, cluster, part, arrivals=np.array([0.25]))
    L = net.layers
    by_label = {sched.task_label(i): i for i in range(len(sched))}
    dur = {k: costs.duration[i] for k, i in by_label.items()}
    cls = np.asarray(net.class_costs["gpu-b"])
    assert dur["0F0@0:d0"] == pytest.approx(3 * (L[0].fwd + L[1].fwd) / 2)
    assert dur["1F0@0:d1"] == pytest.approx(3 * cls[2:, 0].sum())  # measured class costs win
    assert dur["1B0@0:d1"] == pytest.approx(3 * cls[2:, 1:].sum())
    assert dur["0B0@0:d0"] == pytest.approx(3 * sum(x.bwd_input + x.bwd_weight for x in L[:2]) / 2)
    assert dur["0OPT@0:d0"] == pytest.approx((L[0].opt + L[1].opt) / 2)  # per update: no x3
    assert dur["BARRIER@0"] == 7e-6
    edges = {(sched.task_label(s), sched.task_label(d)): e for s, d, e in zip(sched.dep_src, sched.dep_dst,
                                                                              costs.edge_time)}
    assert edges[("0F0@0:d0", "1F0@0:d1")] == pytest.approx(1e-5 + 3 * L[1].act_bytes / 1e9)  # stage 0's output
    assert edges[("1B0@0:d1", "0B0@0:d0")] == pytest.approx(1e-5 + 3 * L[1].act_bytes / 1e9)  # stage 1's input grad
    assert edges[("1F0@0:d1", "1B0@0:d1")] == 0.0  # same device
    assert edges[("0OPT@0:d0", "BARRIER@0")] == 0.0  # global
    assert costs.transfer.sum() == 2
    h2d = 2e-6 + 3 * net.input_bytes / 4e9
    assert costs.h2d == pytest.approx(h2d)
    assert costs.d2h == pytest.approx(2e-6 + 3 * L[-1].act_bytes / 4e9)
    assert costs.release[by_label["0F0@0:d0"]] == pytest.approx(0.25 + h2d)
    assert np.count_nonzero(costs.release) == 1


def test_jitter_and_stragglers_are_seeded_and_have_the_asked_statistics():
    sched = generate("partime-async", 8, 2000, "infer")
    net, cluster, part = random_network(8), ideal_cluster(8), even_partition(8, 8)
    plain = task_costs(sched, net, cluster, part).duration
    noisy = task_costs(sched, net, cluster, part, jitter=0.25, seed=3).duration
    ratio = noisy / plain
    assert ratio.mean() == pytest.approx(1.0, abs=0.01)
    assert ratio.std() / ratio.mean() == pytest.approx(0.25, abs=0.01)
    assert np.array_equal(noisy, task_costs(sched, net, cluster, part, jitter=0.25, seed=3).duration)
    assert not np.array_equal(noisy, task_costs(sched, net, cluster, part, jitter=0.25, seed=4).duration)
    slow = task_costs(sched, net, cluster, part, straggler_prob=0.1, straggler_factor=5.0).duration / plain
    assert set(np.round(slow, 12)) == {1.0, 5.0}
    assert (slow == 5.0).mean() == pytest.approx(0.1, abs=0.01)


@pytest.mark.parametrize("kwargs, shown", [
    (dict(jitter=-0.1), "jitter=-0.1"),
    (dict(straggler_prob=1.5), "straggler_prob=1.5"),
    (dict(straggler_factor=0.0), "straggler_factor=0.0"),
    (dict(arrivals=np.zeros(3)), "one time per sample"),
])
def test_bad_cost_settings_name_the_value(kwargs, shown):
    sched = generate("partime", 2, 2, "infer")
    with pytest.raises(ConfigError, match=shown.replace("(", r"\(")):
        task_costs(sched, random_network(2), ideal_cluster(2), even_partition(2, 2), **kwargs)


def test_arrival_processes():
    assert np.array_equal(arrival_times(4), np.zeros(4))
    assert arrival_times(4, "fixed", 20.0) == pytest.approx([0, 0.05, 0.1, 0.15])
    poisson = arrival_times(20_000, "poisson", 50.0, seed=1)
    assert poisson[0] == 0 and np.all(np.diff(poisson) >= 0)
    assert np.diff(poisson).mean() == pytest.approx(1 / 50, rel=0.03)
    assert np.array_equal(poisson, arrival_times(20_000, "poisson", 50.0, seed=1))
    assert not np.array_equal(poisson, arrival_times(20_000, "poisson", 50.0, seed=2))


@pytest.mark.parametrize("process, rate, shown", [
    ("fixed", None, "needs rate_hz"), ("poisson", 0.0, "rate_hz=0.0"), ("fixed", -3.0, "rate_hz=-3.0"),
    ("uniform", 1.0, "arrival='uniform'"), ("saturate", 30.0, "rate_hz=30.0"),
])
def test_bad_arrivals_name_the_value(process, rate, shown):
    with pytest.raises(ConfigError, match=shown):
        arrival_times(5, process, rate)


def test_stream_slower_than_the_pipeline_sets_the_pace():
    # 30 fps into a 4-stage pipeline of 1 ms stages: each sample is done 4 ms after it arrives
    net = Network("u", tuple(Layer(f"l{i}", MS, MS, MS) for i in range(4)))
    sched = generate("partime-async", 4, 10, "infer")
    res = simulate(sched, net, ideal_cluster(4), even_partition(4, 4), arrival="fixed", rate_hz=30.0)
    d2h = res.trace[res.trace["kind"] == "D2H"].sort_values("sample")
    assert d2h["end"].to_numpy() == pytest.approx(np.arange(10) / 30.0 + 4 * MS)
    assert res.baseline_makespan == pytest.approx(9 / 30.0 + 4 * MS)


# ---- memory --------------------------------------------------------------------------------

def peak_oracle(sched: Schedule, start, end, sizes) -> dict[int, float]:
    """The memory rule written out with loops: bytes alive after every instant something starts."""
    f_of, freed = {}, {}
    for i in range(len(sched)):
        key = (sched.stage[i], sched.sample[i])
        if sched.kind[i] == F:
            f_of[key] = i
            freed.setdefault(key, end[i])
    for i in range(len(sched)):
        if sched.kind[i] in (B, BI, BW):
            key = (sched.stage[i], sched.sample[i])
            freed[key] = end[i] if sched.kind[i] != BW else max(freed[key], end[i])
    dev_of = {s: sched.device[i] for (s, _), i in f_of.items()}
    intervals = {d: [] for d in range(sched.num_devices)}
    for key, i in f_of.items():
        intervals[dev_of[key[0]]].append((start[i], freed[key], sizes.activation[key[0]]))
    for s, d in dev_of.items():
        o_end = sorted(end[i] for i in range(len(sched)) if sched.kind[i] == OPT and sched.stage[i] == s)
        last_use = [-math.inf] * (len(o_end) + 1)
        for (stage, _), i in f_of.items():
            if stage == s:
                v = sum(t <= start[i] for t in o_end)
                last_use[v] = max(last_use[v], freed[(stage, sched.sample[i])])
        for v in range(len(o_end) + 1):
            born = 0.0 if v == 0 else o_end[v - 1]
            gone = math.inf if v == len(o_end) else max(o_end[v], last_use[v])
            intervals[d].append((born, gone, sizes.weights[s]))
    return {d: max([sum(sz for b, f, sz in iv if b <= t < f) for t, _, _ in iv], default=0.0)
            for d, iv in intervals.items()}


@pytest.mark.parametrize("name", GENERATORS)
@pytest.mark.parametrize("mode", ["train", "infer"])
def test_peak_memory_matches_the_oracle(name, mode):
    sched = generate(name, 3, 7, mode, microbatches=4)
    net, cluster = random_network(6, seed=2), mixed_cluster(3)
    part = even_partition(6, 3)
    costs = task_costs(sched, net, cluster, part, jitter=0.4, seed=1)
    start, end = run_fast(sched, costs)
    sizes = memory_sizes(sched, net, part)
    assert peak_memory(sched, start, end, sizes) == pytest.approx(peak_oracle(sched, start, end, sizes), rel=1e-12)


def hand_net() -> Network:
    """4 layers, 100 B activations, 1000 B weights each: stage sizes are easy to count."""
    return Network("hand", tuple(Layer(f"l{i}", MS, MS, MS, act_bytes=100, param_bytes=1000) for i in range(4)),
                   input_bytes=50)


@pytest.mark.parametrize("name, want", [
    # gpipe holds every microbatch's activations until the flush, one weight version
    ("gpipe", {0: 4 * 250 + 2000, 1: 4 * 300 + 2000}),
    # 1f1b stage 0 holds 2 samples in flight and the version the older one must reuse
    ("1f1b", {0: 2 * 250 + 2 * 2000, 1: 300 + 2000}),
])
def test_peak_memory_by_hand(name, want):
    # stage 0: activations 100 + 100 + input 50 = 250 B; stage 1: 100 + 100 + input 100 = 300 B
    sched = generate(name, 2, 4, "train", microbatches=4)
    for engine in ("fast", "des"):
        res = simulate(sched, hand_net(), ideal_cluster(2), even_partition(4, 2), engine=engine)
        assert res.peak_memory == want


def test_inference_holds_one_activation_per_stage():
    res = simulate(generate("partime", 2, 5, "infer"), hand_net(), ideal_cluster(2), even_partition(4, 2))
    assert res.peak_memory == {0: 250 + 2000, 1: 300 + 2000}


def test_memory_overflow_is_reported_not_raised():
    devices = (Device("big"), Device("small", memory_bytes=2100))
    res = simulate(generate("gpipe", 2, 4, "train"), hand_net(), Cluster("c", devices), even_partition(4, 2),
                   engine="des")
    assert res.memory_exceeded == [1]
    assert res.peak_memory[1] > 2100


# ---- simulate: the front door --------------------------------------------------------------

def test_trace_has_every_task_send_and_copy():
    sched = generate("1f1b", 3, 5, "train")
    net, cluster, part = random_network(6), mixed_cluster(3), even_partition(6, 3)
    res = simulate(sched, net, cluster, part, arrival="fixed", rate_hz=2000.0)
    tr = res.trace
    check_trace(tr)
    assert set(tr["source"]) == {"predicted"}
    crossing = int(np.count_nonzero(sched.device[sched.dep_src] != sched.device[sched.dep_dst]))
    assert len(tr) == len(sched) + crossing + 2 * 5  # + one H2D and one D2H per sample
    task = tr.iloc[:len(sched)]
    assert np.array_equal(task["device"].to_numpy(), sched.device)
    sends = tr[tr["kind"] == "SEND"]
    assert set(sends["lane"]) == {"send"} and len(sends) == 2 * 5 * 2  # F and B across 2 boundaries
    assert np.all(sends["end"] > sends["start"])
    h2d = tr[tr["kind"] == "H2D"].sort_values("sample")
    assert h2d["start"].to_numpy() == pytest.approx(np.arange(5) / 2000.0)
    assert set(h2d["device"]) == {0} and set(h2d["lane"]) == {"copy"}
    d2h = tr[tr["kind"] == "D2H"].sort_values("sample")
    last_f = task[(task["kind"] == "F") & (task["stage"] == 2)].sort_values("sample")
    assert d2h["start"].to_numpy() == pytest.approx(last_f["end"].to_numpy())
    assert set(d2h["device"]) == {2}


def test_baseline_is_the_sequential_schedule():
    net, cluster = random_network(6), mixed_cluster(3)
    seq = simulate(generate("sequential", 3, 5, "train"), net, cluster, Partition((0, 2, 4, 6), (0, 0, 0)))
    assert seq.baseline_makespan == pytest.approx(seq.makespan, rel=1e-12)
    uni = Network("u", tuple(Layer(f"l{i}", MS, MS, MS) for i in range(8)))
    res = simulate(generate("partime", 4, 10, "infer"), uni, ideal_cluster(4), even_partition(8, 4))
    assert res.baseline_makespan == pytest.approx(10 * 8 * MS)
    assert res.makespan == pytest.approx((10 + 3) * 2 * MS)


def test_progress_bar_goes_to_stderr(capsys):
    sched = generate("1f1b", 2, 600, "train")
    simulate(sched, random_network(2), ideal_cluster(2), even_partition(2, 2), engine="des", progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "des engine" in err


@pytest.mark.parametrize("change, error, shown", [
    (dict(engine="warp"), ConfigError, "engine='warp'"),
    (dict(partition=even_partition(6, 2)), PartitionError, "2 stages"),
    (dict(partition=even_partition(7, 3)), PartitionError, "7 layers"),
    (dict(partition=Partition((0, 2, 4, 6), (0, 1, 5))), PartitionError, r"devices \[5\]"),
    (dict(cluster=ideal_cluster(2), partition=Partition((0, 2, 4, 6), (0, 0, 0))), ConfigError, "uses 3 devices"),
])
def test_bad_input_is_named(change, error, shown):
    args = dict(schedule=generate("gpipe", 3, 3, "train"), network=random_network(6), cluster=ideal_cluster(3),
                partition=even_partition(6, 3))
    change = dict(change)
    engine = change.pop("engine", "fast")
    args.update(change)
    with pytest.raises(error, match=shown):
        simulate(**args, engine=engine)


def test_validate_flag_checks_the_schedule():
    bad = Schedule.build("bad", "infer", 2, 1, 2, dict(stage=[0, 1], kind=[F, F], sample=[0, 0], tick=[0, 1],
                                                       device=[0, 1]), [], [])
    with pytest.raises(ScheduleError, match="does not depend on the forward"):
        simulate(bad, random_network(2), ideal_cluster(2), even_partition(2, 2), validate=True)


def test_des_reports_a_deadlock_instead_of_hanging():
    # waves given by hand that contradict the lane order: 0F0 waits for 0F1, issued after it
    sched = Schedule.build("stuck", "infer", 1, 2, 1, dict(stage=[0, 0], kind=[F, F], sample=[0, 1], tick=[0, 1],
                                                           device=[0, 0], wave=[0, 1]), [1], [0])
    costs = task_costs(sched, random_network(1), ideal_cluster(1), even_partition(1, 1))
    with pytest.raises(ScheduleError, match="deadlock"):
        run_des(sched, costs, ideal_cluster(1))
