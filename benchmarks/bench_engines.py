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


SMALL = [("partime", "train"), ("partime-async", "train"), ("gpipe", "train"), ("1f1b", "train"),
         ("zb-h1", "train"), ("layerpipe", "train"), ("partime", "infer")]
LARGE = [("partime", "train"), ("1f1b", "train"), ("gpipe", "train"), ("partime", "infer")]


def fast_vs_des(quick: bool) -> list[str]:
    """The ratio grows with the pipeline's width: des pays per task, fast per wave."""
    sizes = [(8, 64, SMALL)] if quick else [(32, 300, SMALL), (256, 1000, LARGE), (1024, 1000, LARGE[:2])]
    lines = ["| schedule | mode | stages x samples | tasks | des s | fast s | des/fast | max abs diff (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for stages, samples, configs in sizes:
        net = get_network(f"uniform:{stages * 2}")
        cluster = cluster_preset("h100-pcie", stages)
        part = even_partition(net.num_layers, stages)
        for name, mode in configs:
            sched = generate(name, stages, samples, mode, microbatches=stages)
            t_des, des = best_of(1, lambda: simulate(sched, net, cluster, part, engine="des", contention=False))
            t_fast, fast = best_of(3, lambda: simulate(sched, net, cluster, part, engine="fast"))
            diff = max(np.abs(des.trace["start"].to_numpy() - fast.trace["start"].to_numpy()).max(),
                       np.abs(des.trace["end"].to_numpy() - fast.trace["end"].to_numpy()).max())
            lines.append(f"| {name} | {mode} | {stages} x {samples} | {len(sched):,} | {t_des:.2f} | {t_fast:.4f} | "
                         f"{t_des / t_fast:.0f}x | {diff:.1e} |")
    return lines


def at_scale(quick: bool) -> list[str]:
    """The first call of a fresh process pays this VM's first touch of ~1 GB of new memory
    (page faults); later calls reuse it, as in a sweep or a notebook. Both are reported."""
    stages, samples = (128, 1000) if quick else (1024, 10_000)
    net = get_network(f"uniform:{stages}")
    cluster = cluster_preset("ideal", stages)
    part = even_partition(stages, stages)
    lines = ["| schedule | mode | stages x samples | tasks | call | generate s | simulate s | generate+simulate s "
             "| metrics s |", "|---|---|---|---|---|---|---|---|---|"]
    for name, mode in [("partime", "infer"), ("partime", "train"), ("partime-async", "infer")]:
        for call in ("first", "warm"):
            t_gen, sched = best_of(1, lambda: generate(name, stages, samples, mode))
            t_sim, res = best_of(1, lambda: simulate(sched, net, cluster, part, engine="fast"))
            t_met, _ = best_of(1, lambda: summarize(res.trace, baseline_makespan=res.baseline_makespan))
            lines.append(f"| {name} | {mode} | {stages} x {samples:,} | {len(sched):,} | {call} | {t_gen:.2f} | "
                         f"{t_sim:.2f} | {t_gen + t_sim:.2f} | {t_met:.2f} |")
            del sched, res
    return lines


def first_touch_cost() -> str:
    """Seconds to fill 800 MB of fresh memory, then the same again (reused): the VM's page-fault cost."""
    cold, _ = best_of(1, lambda: np.ones(100_000_000).sum())
    warm, _ = best_of(1, lambda: np.ones(100_000_000).sum())
    return f"First touch of 800 MB: {cold:.2f} s cold, {warm:.2f} s warm."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    args = parser.parse_args()
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}; date {date.today()}\n")
    print("### fast vs des (same schedule, uncontended links: results must be equal)\n")
    print("\n".join(fast_vs_des(args.quick)))
    print("\n### fast engine at scale (ideal links; simulate = engine + trace table)\n")
    print(first_touch_cost() + "\n")
    print("\n".join(at_scale(args.quick)))


if __name__ == "__main__":
    main()
