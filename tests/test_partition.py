"""Partitioners: exact min-max against brute force, PARTIME's block heuristic against a
plain re-implementation of its algorithm, the cost model against its definition, errors."""

import itertools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from partime_sim import partition as part_mod
from partime_sim.catalogue import get_network
from partime_sim.cluster import Cluster, Device, Link, cluster_preset, ideal_cluster
from partime_sim.errors import ConfigError, PartitionError
from partime_sim.network import Layer, Network
from partime_sim.partition import (
    Partition, bottleneck, compare_partitioners, even_partition, partition_block, partition_minmax, stage_times,
)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_net(fwd, act_bytes=None, bwd=None, class_costs=None, name="hand"):
    act_bytes = act_bytes or [0] * len(fwd)
    bwd = bwd or [(f, f) for f in fwd]
    rows = enumerate(zip(fwd, bwd, act_bytes))
    layers = tuple(Layer(f"l{i}", f, bi, bw, act_bytes=a) for i, (f, (bi, bw), a) in rows)
    return Network(name, layers, class_costs=class_costs or {})


def reference_stage_times(net, cluster, p, mode):
    """The cost model written out from its definition, with the cluster's own transfer_time."""
    b, d, out = p.bounds, p.devices, []
    for k in range(p.num_stages):
        dev = cluster.devices[d[k]]
        c = net.costs(dev.kind, dev.speed)
        opt = net.opt_costs(dev.speed)
        t = sum(c[i, 0] + (c[i, 1] + c[i, 2] + opt[i] if mode == "train" else 0.0) for i in p.layers(k))
        if k < p.num_stages - 1:
            t += cluster.transfer_time(d[k], d[k + 1], net.layers[b[k + 1] - 1].act_bytes)
        if mode == "train" and k > 0:
            t += cluster.transfer_time(d[k], d[k - 1], net.layers[b[k] - 1].act_bytes)
        out.append(t)
    return np.array(out)


def all_partitions(num_layers, num_stages, devices):
    for cuts in itertools.combinations(range(1, num_layers), num_stages - 1):
        yield Partition((0, *cuts, num_layers), devices)


# ---- random small cases ---------------------------------------------------------------

costs = st.floats(0.0, 1e-2, allow_nan=False) | st.sampled_from([0.0, 1e-3])
links = st.builds(
    Link,
    latency_s=st.floats(0.0, 1e-3) | st.just(0.0),
    bandwidth_Bps=st.floats(1e6, 1e10) | st.just(math.inf),
)


@st.composite
def cases(draw, max_layers=9):
    """A random network, a heterogeneous cluster, a stage count, a device map and a mode."""
    num_layers = draw(st.integers(1, max_layers))
    fwd = draw(st.lists(costs, min_size=num_layers, max_size=num_layers))
    bwd = draw(st.lists(st.tuples(costs, costs), min_size=num_layers, max_size=num_layers))
    act = draw(st.lists(st.integers(0, 10**7), min_size=num_layers, max_size=num_layers))
    class_costs = {}
    if draw(st.booleans()):  # a device class with its own measured costs
        class_costs["meas"] = tuple(draw(st.tuples(costs, costs, costs)) for _ in range(num_layers))
    net = make_net(fwd, act, bwd, class_costs)
    num_stages = draw(st.integers(1, num_layers))
    num_devices = draw(st.integers(num_stages, num_stages + 2))
    devs = tuple(Device(f"d{i}", draw(st.sampled_from(["ref", "meas"])), draw(st.floats(0.25, 4.0)))
                 for i in range(num_devices))
    pairs = [(s, t) for s in range(num_devices) for t in range(num_devices) if s != t]
    overrides = draw(st.dictionaries(st.sampled_from(pairs), links, max_size=3)) if pairs else {}
    cluster = Cluster("rand", devs, link=draw(links), links=overrides)
    devices = draw(st.none() | st.lists(st.integers(0, num_devices - 1), min_size=num_stages, max_size=num_stages))
    mode = draw(st.sampled_from(["train", "infer"]))
    return net, cluster, num_stages, devices, mode


@FAST
@given(cases())
def test_minmax_equals_brute_force_and_is_the_most_balanced_optimum(case):
    net, cluster, num_stages, devices, mode = case
    p = partition_minmax(net, cluster, num_stages, mode=mode, devices=devices)
    expected_devices = tuple(devices) if devices is not None else tuple(range(num_stages))
    assert p.num_stages == num_stages and p.num_layers == net.num_layers and p.devices == expected_devices
    got = bottleneck(net, cluster, p, mode)
    candidates = all_partitions(net.num_layers, num_stages, expected_devices)
    every = [(bottleneck(net, cluster, q, mode), q) for q in candidates]
    best = min(b for b, _ in every)
    assert got == best  # same cost function on both sides: exact
    # the reported stage costs are the cost model's definition (to the rounding of prefix sums)
    total = max(net.costs(d.kind, d.speed).sum() for d in cluster.devices)
    np.testing.assert_allclose(stage_times(net, cluster, p, mode), reference_stage_times(net, cluster, p, mode),
                               rtol=1e-12, atol=1e-12 * total)
    # among the optimal partitions it is the most balanced one (smallest sum of squares)
    squares = lambda q: float(np.sum(stage_times(net, cluster, q, mode) ** 2))
    assert squares(p) <= min(squares(q) for b, q in every if b == best) * (1 + 1e-9)


@FAST
@given(cases(max_layers=40))
def test_minmax_is_never_worse_than_the_heuristics(case):
    net, cluster, num_stages, _, mode = case
    mm = bottleneck(net, cluster, partition_minmax(net, cluster, num_stages, mode), mode)
    assert mm <= bottleneck(net, cluster, partition_block(net, num_stages, mode), mode)
    assert mm <= bottleneck(net, cluster, even_partition(net.num_layers, num_stages), mode)


def test_the_dp_gives_the_same_answer_in_small_memory_chunks(monkeypatch):
    rng = np.random.default_rng(1)
    zero_compute = make_net([0.0] * 40, [int(x) for x in rng.integers(0, 10**6, 40)])  # band = whole width
    varied = make_net(list(rng.random(60) * 1e-3), [int(x) for x in rng.integers(0, 10**8, 60)])
    cluster = cluster_preset("h100-pcie", 9)
    for net in (zero_compute, varied):
        for mode in ("train", "infer"):
            big = partition_minmax(net, cluster, 9, mode)
            monkeypatch.setattr(part_mod, "_CHUNK_ELEMS", 7)
            small = partition_minmax(net, cluster, 9, mode)
            monkeypatch.undo()
            assert small == big


# ---- known answers --------------------------------------------------------------------

@pytest.mark.parametrize("num_layers, num_stages", [(12, 1), (12, 2), (12, 3), (12, 4), (12, 6), (12, 12), (8, 4)])
@pytest.mark.parametrize("cluster_name", ["ideal", "h100-nvlink"])
def test_uniform_network_divisible_gives_equal_sizes(num_layers, num_stages, cluster_name):
    net = make_net([1e-3] * num_layers, [4096] * num_layers)
    cluster = cluster_preset(cluster_name, num_stages)
    for mode in ("train", "infer"):
        assert partition_minmax(net, cluster, num_stages, mode).sizes == (num_layers // num_stages,) * num_stages
        assert partition_block(net, num_stages, mode).sizes == (num_layers // num_stages,) * num_stages


def test_catalogue_uniform_and_the_big_cases():
    assert partition_minmax(get_network("uniform:8"), ideal_cluster(4), 4).sizes == (2, 2, 2, 2)
    for num_layers in (300, 1024):
        net = get_network(f"uniform:{num_layers}")
        p = partition_minmax(net, cluster_preset("h100-nvlink", num_layers), num_layers)
        assert p.sizes == (1,) * num_layers
    # 1024 layers on 341 stages: some stage must own 4 layers, and only one does
    p = partition_minmax(get_network("uniform:1024"), ideal_cluster(341), 341)
    assert max(p.sizes) == 4 and sorted(p.sizes).count(4) == 1
    assert bottleneck(get_network("uniform:1024"), ideal_cluster(341), p) == pytest.approx(12e-3)


def test_minmax_moves_a_boundary_off_a_big_activation():
    # equal compute (exact binary fractions, so ties are real ties); layer 1 emits 1 GB over
    # a 1 GB/s link, so no stage may end there
    net = make_net([0.5] * 4, [0, 10**9, 0, 0])
    cluster = Cluster("slow", (Device("a"), Device("b")), link=Link(0.0, 1e9))
    assert bottleneck(net, cluster, even_partition(4, 2), "infer") == 2.0
    p = partition_minmax(net, cluster, 2, "infer")
    assert p.sizes == (1, 3)  # (1, 3) and (3, 1) tie, also in balance; ties go to the earliest boundary
    assert bottleneck(net, cluster, p, "infer") == 1.5


def test_heterogeneous_devices_get_work_in_proportion_to_speed():
    net = make_net([1e-3] * 8)
    cluster = Cluster("mixed", (Device("slow", speed=1.0), Device("fast", speed=3.0)))
    assert partition_minmax(net, cluster, 2, "infer").sizes == (2, 6)
    assert partition_minmax(net, cluster, 2, "infer", devices=[1, 0]).sizes == (6, 2)
    # measured per-class costs override the speed factor
    measured = make_net([1e-3] * 8, class_costs={"meas": tuple((0.125 * (i + 1), 0.0, 0.0) for i in range(8))})
    by_class = Cluster("c", (Device("x", kind="meas"), Device("y", kind="meas", speed=2.0)))
    p = partition_minmax(measured, by_class, 2, "infer")
    # 1+2+3+4+5 = 15 vs 6+7+8 = 21 eighths, or 21 vs 15: a tie, broken towards the earliest boundary
    assert p.sizes == (5, 3)
    assert bottleneck(measured, by_class, p, "infer") == 21 * 0.125


def test_stage_times_follow_the_cost_model_on_a_preset():
    net = get_network("partime-conv30")
    cluster = cluster_preset("h100-pcie", 4)
    for mode in ("train", "infer"):
        p = partition_minmax(net, cluster, 4, mode)
        np.testing.assert_allclose(stage_times(net, cluster, p, mode), reference_stage_times(net, cluster, p, mode),
                                   rtol=1e-12)
    p = Partition.from_sizes([10, 20], 30)
    train, infer = stage_times(net, cluster, p, "train"), stage_times(net, cluster, p, "infer")
    act = net.layers[9].act_bytes
    # stage 0 sends its output forward; in training stage 1 also computes BI/BW, updates, and sends the gradient back
    assert infer[0] == pytest.approx(sum(lay.fwd for lay in net.layers[:10]) / cluster.devices[0].speed
                                     + cluster.transfer_time(0, 1, act))
    assert train[1] - infer[1] == pytest.approx(sum(lay.bwd_input + lay.bwd_weight + lay.opt
                                                    for lay in net.layers[10:])
                                                / cluster.devices[1].speed + cluster.transfer_time(1, 0, act))


# ---- PARTIME's block heuristic --------------------------------------------------------

def partime_block_reference(times, num_stages, max_moves=10_000):
    """The search of PARTIME's balancing.py (Barany-Grinberg), restated in plain Python for
    inputs on which no block goes empty (returns block sizes, or None if one would). Block
    sums are exactly rounded (math.fsum) like the implementation's, so float ties agree."""
    lo, hi = min(times), max(times)
    w = [(t - lo) / (hi - lo) for t in times]
    n = len(times)
    cut = [n // num_stages * (x + 1) for x in range(num_stages - 1)] + [n]

    def sums():
        edges = [0] + cut
        return [math.fsum(w[edges[i]:edges[i + 1]]) for i in range(num_stages)]

    s = sums()
    p = s.index(max(s))
    for _ in range(max_moves):
        s = sums()
        q = s.index(min(s))
        if s[p] <= s[q] + 1:
            break
        if p < q:  # the smallest block takes the last layer of block h on its left
            h = q - 1
            cut[h] -= 1
        else:  # ... or the first layer of block h on its right
            h = q + 1
            cut[q] += 1
        edges = [0] + cut
        if any(edges[i + 1] - edges[i] < 1 for i in range(num_stages)):
            return None
        if h == p:
            s = sums()
            p = s.index(max(s))
    else:
        raise AssertionError(f"PARTIME's search did not stop on {times} with {num_stages} blocks")
    edges = [0] + cut
    return tuple(edges[i + 1] - edges[i] for i in range(num_stages))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_block_heuristic_is_partimes_algorithm(data):
    num_layers = data.draw(st.integers(2, 30))
    num_stages = data.draw(st.integers(1, num_layers - 1))
    times = data.draw(st.lists(st.floats(1e-5, 1e-2), min_size=num_layers, max_size=num_layers))
    if max(times) == min(times):
        times[0] *= 2
    expected = partime_block_reference(times, num_stages)
    if expected is not None:
        assert partition_block(make_net(times), num_stages, mode="infer").sizes == expected


def test_block_heuristic_stops_where_rounded_sums_would_cycle():
    # with prefix-sum block sums, 0 + 1 here comes out just over 1 and the search passes
    # the weight-1 layer between blocks 3 and 4 forever; exactly rounded sums stop at once
    times = [0.0048792731716805525, 1e-3, 1e-3, 0.004780171049907499, 0.009154370161689716, 1e-3, 1e-3,
             0.009386150236035848, 1e-3, 0.007367981879861612, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 0.008324853889236141]
    p = partition_block(make_net(times), 7, mode="infer")
    assert p.sizes == (2, 2, 2, 2, 2, 2, 4) == partime_block_reference(times, 7)


def test_block_heuristic_balances_normalised_times_not_times():
    # normalised: [1, 1, 1, 1, 0, 0, 0, 0] -> it stops at sums (2, 2) = sizes (2, 6), 4 ms vs 8 ms
    net = make_net([2e-3] * 4 + [1e-3] * 4)
    assert partition_block(net, 2, "infer").sizes == (2, 6)
    assert partition_minmax(net, ideal_cluster(2), 2, "infer").sizes == (3, 5)
    report = compare_partitioners(net, ideal_cluster(2), 2, mode="infer")
    assert report["block_bottleneck_s"] == pytest.approx(8e-3) and report["minmax_bottleneck_s"] == pytest.approx(6e-3)
    assert report["improvement_pct"] == pytest.approx(25.0)
    assert report["minmax_sizes"] == [3, 5] and report["block_sizes"] == [2, 6]


def test_block_heuristic_never_leaves_a_stage_empty():
    # conv30-like: two cheap end layers normalise to 0; from L // S = 1 layer per block the
    # search empties blocks on the way (PARTIME's indices would cross); the result must not
    net = make_net([1e-4] + [1e-3] * 28 + [1e-4])
    for num_stages in range(1, 31):
        p = partition_block(net, num_stages)
        assert min(p.sizes) >= 1 and p.num_layers == 30
        # and it still balances: no block over one layer above the even share of the 28
        assert max(p.sizes) <= -(-28 // num_stages) + 2
    # constant times (PARTIME divides by zero) count 1 each: blocks balance by layer count
    assert partition_block(make_net([1e-3] * 10), 4).sizes == (3, 2, 2, 3)


# ---- the PARTIME networks -------------------------------------------------------------

@pytest.mark.parametrize("name", ["partime-conv30", "partime-conv300"])
@pytest.mark.parametrize("preset", ["h100-nvlink", "h100-pcie", "cpu-gloo"])
def test_minmax_never_worse_than_block_on_partime_networks(name, preset):
    net = get_network(name)
    for num_stages in (2, 4, 8):
        cluster = cluster_preset(preset, num_stages)
        for mode in ("train", "infer"):
            r = compare_partitioners(net, cluster, num_stages, mode)
            assert r["minmax_bottleneck_s"] <= r["block_bottleneck_s"]
            assert r["minmax_bottleneck_s"] <= r["even_bottleneck_s"]
            gain = 100 * (r["block_bottleneck_s"] - r["minmax_bottleneck_s"]) / r["block_bottleneck_s"]
            assert r["improvement_pct"] == pytest.approx(gain) and r["improvement_pct"] >= 0
            assert sum(r["minmax_sizes"]) == sum(r["block_sizes"]) == net.num_layers
            assert len(r["minmax_sizes"]) == len(r["block_sizes"]) == num_stages


# ---- errors ---------------------------------------------------------------------------

def test_more_stages_than_layers_is_refused_with_the_fix():
    net = get_network("uniform:4")
    for call in (lambda: partition_minmax(net, ideal_cluster(8), 5), lambda: partition_block(net, 5),
                 lambda: even_partition(4, 5)):
        with pytest.raises(PartitionError, match=r"5 stages for a 4-layer network.*between 1 and 4"):
            call()
    with pytest.raises(PartitionError, match="0 stages"):
        partition_minmax(net, ideal_cluster(2), 0)


def test_sizes_must_sum_to_the_layers():
    with pytest.raises(PartitionError, match=r"sum to 5, but the network has 4 layers"):
        Partition.from_sizes([2, 3], 4)
    with pytest.raises(PartitionError, match="< 1 layer"):
        Partition.from_sizes([4, 0], 4)
    with pytest.raises(PartitionError, match="covers 5 layers but the network has 4"):
        stage_times(get_network("uniform:4"), ideal_cluster(2), Partition.from_sizes([2, 3], 5))


def test_bad_device_maps_are_refused():
    net, cluster = get_network("uniform:6"), ideal_cluster(3)
    with pytest.raises(PartitionError, match=r"devices=\[0, 1\] has 2 entries for 3 stages"):
        partition_minmax(net, cluster, 3, devices=[0, 1])
    with pytest.raises(PartitionError, match=r"names \[7\].*devices 0\.\.2"):
        partition_minmax(net, cluster, 3, devices=[0, 1, 7])
    with pytest.raises(PartitionError, match=r"4 stages need 4 devices but cluster 'ideal' has 3"):
        partition_minmax(net, cluster, 4)
    with pytest.raises(PartitionError, match=r"devices \[5\]"):
        bottleneck(net, cluster, Partition((0, 3, 6), (0, 5)))


def test_unknown_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="'backward'"):
        partition_minmax(get_network("uniform:4"), ideal_cluster(2), 2, mode="backward")
    with pytest.raises(ConfigError, match="'backward'"):
        stage_times(get_network("uniform:4"), ideal_cluster(2), even_partition(4, 2), mode="backward")


def test_minmax_counts_the_optimizer_step_in_training():
    """A parameter-heavy layer whose update costs more than its compute moves the boundary."""
    from dataclasses import replace

    net = make_net([1e-3] * 4)
    heavy = replace(net, layers=(*net.layers[:3], replace(net.layers[3], opt=5e-3)))
    cluster = Cluster("two", (Device("a"), Device("b")))
    assert partition_minmax(net, cluster, 2, "train").sizes == (2, 2)
    assert partition_minmax(heavy, cluster, 2, "train").sizes == (3, 1)  # the update alone fills a stage
    assert partition_minmax(heavy, cluster, 2, "infer").sizes == (2, 2)  # no update in inference
