"""Benchmark: the `fast` engine against the `des` engine on the same schedules (equal
results, speed ratio), and `fast` at scale (1024 stages x 10,000 samples of partime).

Run: python benchmarks/bench_engines.py [--quick]   (prints Markdown for BENCHMARKS.md)
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from datetime import date

import numpy as np

from partime_sim.catalogue import get_network
from partime_sim.cluster import cluster_preset
from partime_sim.generators import generate
from partime_sim.metrics import summarize
from partime_sim.partition import even_partition
from partime_sim.simulate import simulate


def best_of(repeats: int, fn):
    times, value = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t0)
    return min(times), value


def fast_vs_des(quick: bool) -> list[str]:
    stages, samples = (8, 64) if quick else (32, 300)
    net = get_network(f"uniform:{stages * 2}")
    cluster = cluster_preset("h100-pcie", stages)
    part = even_partition(net.num_layers, stages)
    lines = ["| schedule | mode | tasks | des s | fast s | des/fast | max abs diff (s) |", "|---|---|---|---|---|---|---|"]
    for name, mode in [("partime", "train"), ("partime-async", "train"), ("gpipe", "train"), ("1f1b", "train"),
                       ("zb-h1", "train"), ("layerpipe", "train"), ("partime", "infer")]:
        sched = generate(name, stages, samples, mode, microbatches=stages)
        t_des, des = best_of(1, lambda: simulate(sched, net, cluster, part, engine="des", contention=False))
        t_fast, fast = best_of(3, lambda: simulate(sched, net, cluster, part, engine="fast"))
        a, b = des.trace.sort_values(["device", "lane", "start"]), fast.trace.sort_values(["device", "lane", "start"])
        diff = max(np.abs(a["start"].to_numpy() - b["start"].to_numpy()).max(),
                   np.abs(a["end"].to_numpy() - b["end"].to_numpy()).max())
        lines.append(f"| {name} | {mode} | {len(sched):,} | {t_des:.3f} | {t_fast:.4f} | {t_des / t_fast:.0f}x | {diff:.1e} |")
    return lines


def at_scale(quick: bool) -> list[str]:
    stages, samples = (128, 1000) if quick else (1024, 10_000)
    net = get_network(f"uniform:{stages}")
    cluster = cluster_preset("ideal", stages)
    part = even_partition(stages, stages)
    lines = ["| schedule | mode | stages x samples | tasks | generate s | simulate s | generate+simulate s | metrics s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, mode in [("partime", "infer"), ("partime", "train"), ("partime-async", "infer")]:
        t_gen, sched = best_of(2, lambda: generate(name, stages, samples, mode))
        t_sim, res = best_of(2, lambda: simulate(sched, net, cluster, part, engine="fast"))
        t_met, _ = best_of(1, lambda: summarize(res.trace, baseline_makespan=res.baseline_makespan))
        lines.append(f"| {name} | {mode} | {stages} x {samples:,} | {len(sched):,} | {t_gen:.2f} | {t_sim:.2f} | "
                     f"{t_gen + t_sim:.2f} | {t_met:.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    args = parser.parse_args()
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}; date {date.today()}\n")
    print("### fast vs des (same schedule, uncontended links: results must be equal)\n")
    print("\n".join(fast_vs_des(args.quick)))
    print("\n### fast engine at scale (ideal links; simulate = engine + trace table)\n")
    print("\n".join(at_scale(args.quick)))


if __name__ == "__main__":
    main()
