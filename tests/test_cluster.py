"""Clusters: presets, transfer times, JSON round-trip, heterogeneous devices, errors."""

import json
import math

import numpy as np
import pytest

from partime_sim.catalogue import get_network
from partime_sim.cluster import (
    PRESETS, Cluster, Device, Link, cluster_preset, ideal_cluster, load_cluster,
)
from partime_sim.errors import ConfigError


def test_required_presets_exist_and_build_any_size():
    assert {"ideal", "h100-nvlink", "h100-pcie", "a100-nvlink", "cpu-gloo"} <= set(PRESETS)
    for name in PRESETS:
        for n in (1, 3, 1024):
            c = cluster_preset(name, n)
            assert c.num_devices == n and len({d.name for d in c.devices}) == n
            assert all(d.speed > 0 and d.memory_bytes > 0 for d in c.devices)


def test_preset_speeds_are_ordered_like_the_datasheets():
    speed = {n: cluster_preset(n, 1).devices[0].speed for n in PRESETS}
    assert speed["ideal"] == speed["h100-nvlink"] == 1.0  # H100 SXM5 is the reference device
    assert speed["cpu-gloo"] < speed["a100-nvlink"] < speed["h100-pcie"] < speed["h100-nvlink"]
    assert speed["h100-pcie"] == pytest.approx(51 / 67)


def test_transfer_time_is_latency_plus_bytes_over_bandwidth():
    c = cluster_preset("h100-nvlink", 2)
    nbytes = 32 * 256 * 256 * 4
    assert c.transfer_time(0, 1, nbytes) == pytest.approx(3e-6 + nbytes / 450e9)
    assert c.transfer_time(1, 1, nbytes) == 0.0
    assert cluster_preset("h100-pcie", 2).transfer_time(0, 1, nbytes) > c.transfer_time(0, 1, nbytes)
    ideal = cluster_preset("ideal", 4)
    assert ideal == ideal_cluster(4) and ideal.transfer_time(0, 3, 1e12) == 0.0 and ideal.barrier_s == 0.0


def test_barrier_grows_with_log2_devices():
    lat = cluster_preset("cpu-gloo", 2).link.latency_s
    assert cluster_preset("cpu-gloo", 1).barrier_s == 0.0
    assert cluster_preset("cpu-gloo", 2).barrier_s == pytest.approx(lat)
    assert cluster_preset("cpu-gloo", 5).barrier_s == pytest.approx(3 * lat)


@pytest.mark.parametrize("n", [0, -1, 2.5, True])
def test_bad_device_count(n):
    with pytest.raises(ConfigError, match=f"num_devices={n!r}"):
        cluster_preset("h100-nvlink", n)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError) as err:
        load_cluster("tpu-v5", 2)
    assert "'tpu-v5'" in str(err.value) and all(n in str(err.value) for n in PRESETS)


def _hetero() -> Cluster:
    devices = (Device("gpu0", "h100-sxm", 1.0, 80 * 2**30, 2), Device("gpu1", "h100-sxm", 2.0),
               Device("cpu", "cpu-core", 0.01))
    links = {(0, 1): Link(1e-6, 900e9, medium="nvswitch"), (1, 2): Link(5e-5, 4e9)}
    return Cluster("hetero", devices, Link(1e-5, 64e9), links, host_link=Link(5e-6, 32e9), barrier_s=1e-5,
                   barrier_close_s=4e-5, barrier_close_window_s=2e-6, idle_penalty=((1e-4, 2e-5), (3e-3, 4e-4)))


def test_cluster_json_round_trip(tmp_path):
    for cluster in (_hetero(), cluster_preset("cpu-gloo", 3), cluster_preset("ideal", 2)):
        path = tmp_path / f"{cluster.name}.json"
        cluster.save(path)
        assert Cluster.load(path) == cluster
        assert load_cluster(str(path), cluster.num_devices) == cluster
    assert _hetero().link_resource(0, 1) == ("medium", "nvswitch")
    assert _hetero().transfer_time(1, 2, 4e9) == pytest.approx(5e-5 + 1.0)
    assert _hetero().transfer_time(2, 0, 64e9) == pytest.approx(1e-5 + 1.0)  # default link


def test_load_cluster_file_errors(tmp_path):
    path = tmp_path / "two.json"
    cluster_preset("h100-pcie", 2).save(path)
    with pytest.raises(ConfigError, match="has 2 devices but 4 are needed"):
        load_cluster(str(path), 4)
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_cluster(str(bad), 1)
    with pytest.raises(ConfigError, match="does not exist"):
        load_cluster(str(tmp_path / "nope.json"), 1)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"name": "x", "devices": [{"nmae": "typo"}]}))
    with pytest.raises(ConfigError, match="missing or has a bad field"):
        load_cluster(str(wrong), 1)


@pytest.mark.parametrize("make, shown", [
    (lambda: Link(latency_s=-1e-6), "latency_s=-1e-06"),
    (lambda: Link(bandwidth_Bps=0), "bandwidth_Bps=0"),
    (lambda: Device("d", speed=-2.0), "speed=-2.0"),
    (lambda: Cluster("c", (Device("d"),), links={(0, 5): Link()}), r"link \(0, 5\)"),
    (lambda: Cluster("c", (Device("d"),), barrier_close_window_s=-1e-5), "barrier_close_window_s=-1e-05"),
    (lambda: Cluster("c", (Device("d"),), barrier_close_s=math.inf), "barrier_close_s=inf"),
    (lambda: Cluster("c", (Device("d"),), barrier_s=2e-4, barrier_close_s=1e-4, barrier_close_window_s=1e-5),
     "barrier_close_s=0.0001 is below barrier_s=0.0002"),
    (lambda: Cluster("c", (Device("d"),), idle_penalty=((1e-3, 1e-4), (1e-4, 2e-4))), "idle_penalty=.*increasing"),
    (lambda: Cluster("c", (Device("d"),), idle_penalty=((1e-3, -1e-4),)), r"idle_penalty=.*extra_s >= 0"),
    (lambda: Cluster("c", (Device("d"),), idle_penalty=(1e-3, 1e-4)), r"idle_penalty=\(0.001, 0.0001\) must be a list"),
])
def test_bad_figures_name_the_value(make, shown):
    with pytest.raises(ConfigError, match=shown):
        make()


def test_heterogeneous_devices_scale_or_override_network_costs():
    net = get_network("partime-conv30")
    cluster = _hetero()
    fast = cluster.devices[1]
    ref = net.costs(cluster.devices[0].kind, cluster.devices[0].speed)
    assert np.allclose(net.costs(fast.kind, fast.speed), ref / 2)  # speed 2 halves every cost
    measured = tuple((1e-3, 2e-3, 3e-3) for _ in net.layers)
    profiled = type(net)(net.name, net.layers, net.input_bytes, {"cpu-core": measured})
    cpu = cluster.devices[2]
    assert np.array_equal(profiled.costs(cpu.kind, cpu.speed), np.array(measured))
    assert math.isinf(cluster.devices[2].memory_bytes)


def test_optimizer_overhead_only_on_stages_with_weights() -> None:
    from dataclasses import replace

    from partime_sim.generators import generate
    from partime_sim.network import Layer, Network
    from partime_sim.partition import Partition
    from partime_sim.simulate import simulate

    # stage 0 has weights, stage 1 (a ReLU, say) none: it has no optimizer to pay for
    net = Network("w+relu", (Layer("fc", 1e-3, 1e-3, 1e-3, param_bytes=64, opt=1e-4), Layer("relu", 1e-3, 1e-3, 0.0)),
                  input_bytes=4)
    sched = generate("sequential", 2, 10, "train")
    base = ideal_cluster(1)
    slow = replace(base, devices=(replace(base.devices[0], task_overhead_s=(0.0, 0.0, 4e-3)),))
    part = Partition((0, 1, 2), (0, 0))
    t0 = simulate(sched, net, base, part).makespan
    assert simulate(sched, net, slow, part).makespan - t0 == pytest.approx(10 * 4e-3, rel=1e-12)


def test_task_overhead_adds_to_every_compute_task_exactly() -> None:
    from dataclasses import replace

    from partime_sim.catalogue import get_network
    from partime_sim.generators import generate
    from partime_sim.partition import Partition, even_partition
    from partime_sim.simulate import simulate

    net, S, N = get_network("uniform:4"), 4, 10
    sched = generate("sequential", S, N, "train")
    base = ideal_cluster(1)
    slow = replace(base, devices=(replace(base.devices[0], task_overhead_s=(1e-3, 2e-3, 4e-3)),))
    part = Partition(even_partition(4, S).bounds, (0,) * S)  # every stage on the one device
    t0 = simulate(sched, net, base, part).makespan
    t1 = simulate(sched, net, slow, part).makespan
    assert t1 - t0 == pytest.approx(N * S * (1e-3 + 2e-3 + 4e-3), rel=1e-12)
    assert Cluster.from_dict(slow.to_dict()) == slow  # survives JSON
    with pytest.raises(ConfigError, match="task_overhead_s"):
        Device("d", task_overhead_s=(1.0, -1.0, 0.0))


def test_concurrency_slowdown_scales_compute_only_when_several_devices_work() -> None:
    from dataclasses import replace

    from partime_sim.catalogue import get_network
    from partime_sim.cluster import resize_profiled
    from partime_sim.generators import generate
    from partime_sim.partition import Partition, even_partition
    from partime_sim.simulate import simulate

    net, N = get_network("uniform:4"), 20
    base = ideal_cluster(2)
    shared = replace(base, concurrency_slowdown=1.25)
    one = generate("sequential", 4, N, "train")
    part1 = Partition(even_partition(4, 4).bounds, (0,) * 4)
    assert simulate(one, net, shared, part1).makespan == simulate(one, net, base, part1).makespan  # alone: no slowdown
    two = generate("partime-async", 2, N, "train")
    part2 = even_partition(4, 2)
    assert simulate(two, net, shared, part2).makespan == pytest.approx(
        1.25 * simulate(two, net, base, part2).makespan, rel=1e-12)  # ideal links: every task 1.25x
    assert Cluster.from_dict(shared.to_dict()) == shared  # survives JSON
    assert resize_profiled(shared, 8).concurrency_slowdown == 1.25
    assert resize_profiled(_hetero(), 8).idle_penalty == _hetero().idle_penalty  # a property of one core
    with pytest.raises(ConfigError, match="concurrency_slowdown=0.5"):
        replace(base, concurrency_slowdown=0.5)


def test_sender_busy_link_moves_the_copy_onto_the_sender_and_message_costs_onto_both_ends() -> None:
    from dataclasses import replace

    from partime_sim.costs import task_costs
    from partime_sim.generators import generate
    from partime_sim.partition import even_partition
    from partime_sim.schedule import F

    net, N = get_network("mlp"), 6  # activations of some KB
    sched = generate("partime-async", 2, N, "train")
    part = even_partition(net.num_layers, 2)
    wire = replace(ideal_cluster(2), link=Link(latency_s=1e-4, bandwidth_Bps=1e8))
    busy = replace(wire, link=replace(wire.link, sender_busy=True))
    a, b = task_costs(sched, net, wire, part), task_costs(sched, net, busy, part)
    copy = np.zeros(len(sched))
    np.add.at(copy, sched.dep_src[a.transfer], a.edge_time[a.transfer] - 1e-4)  # bytes / bandwidth per send
    assert np.all(copy[(sched.kind == F) & (sched.stage == 0)] > 0)  # stage 0 sends every activation
    assert np.allclose(b.duration, a.duration + copy, rtol=0, atol=1e-15)
    assert np.allclose(b.edge_time[b.transfer], 1e-4, rtol=0, atol=1e-15)  # only the latency is in flight
    assert np.array_equal(b.edge_time[~b.transfer], a.edge_time[~a.transfer])
    assert Cluster.from_dict(busy.to_dict()) == busy
    # a per-message send cost (measured under load) lands on the sender too, not in flight
    costly = replace(busy, link=replace(busy.link, send_cost_s=2e-5))
    c = task_costs(sched, net, costly, part)
    sends = np.zeros(len(sched))
    np.add.at(sends, sched.dep_src[c.transfer], 1)
    assert np.allclose(c.duration, b.duration + 2e-5 * sends, rtol=0, atol=1e-15)
    assert np.allclose(c.edge_time[c.transfer], 1e-4, rtol=0, atol=1e-15)
    # a receive cost lands on the task that consumes the message (once per message)
    both = replace(costly, link=replace(costly.link, recv_cost_s=3e-5))
    d = task_costs(sched, net, both, part)
    receives = np.zeros(len(sched))
    np.add.at(receives, sched.dep_dst[d.transfer], 1)
    assert np.all(receives[(sched.kind == F) & (sched.stage == 1)] == 1)  # stage 1 gets every activation
    assert np.allclose(d.duration, c.duration + 3e-5 * receives, rtol=0, atol=1e-15)
    assert np.array_equal(d.edge_time, c.edge_time)
    assert Cluster.from_dict(both.to_dict()) == both
    assert not Link(recv_cost_s=1e-6).is_ideal
    with pytest.raises(ConfigError, match="send_cost_s=-1"):
        Link(send_cost_s=-1)
    with pytest.raises(ConfigError, match="recv_cost_s=nan"):
        Link(recv_cost_s=math.nan)
