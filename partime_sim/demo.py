"""``partime-sim demo``: the main job, as a what-if timing study with a report directory.

It answers the project's question for PARTIME's 300-layer conv net on H100s: how fast does
each schedule run as devices grow, and how far is PARTIME's block partition from optimal.
(Later parts add the real 2-stage run and the staleness study.)
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from partime_sim.study import StudyConfig, run_study

SCHEDULES = ("partime", "partime-async", "gpipe", "1f1b", "zb-h1", "layerpipe")
SHOWN = ["schedule", "devices", "makespan_s", "throughput_sps", "speedup", "efficiency", "bubble_fraction",
         "latency_p50_s"]


def run_demo(out: Path, quick: bool = False) -> int:
    from tqdm import tqdm

    from partime_sim.catalogue import get_network
    from partime_sim.cluster import load_cluster
    from partime_sim.partition import compare_partitioners
    from partime_sim.plots import plot_speedup

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    network, cluster, samples = "partime-conv300", "h100-nvlink", (64 if quick else 1000)
    devices = [1, 2, 4, 8] if quick else [1, 2, 4, 8, 16, 32, 64, 128, 256]
    configs = [StudyConfig(network, s, d, samples=samples, cluster=cluster, microbatches=min(samples, 4 * d))
               for s in SCHEDULES for d in devices]
    rows = [run_study(cfg).summary for cfg in tqdm(configs, desc="what-if sweep", unit="config", disable=None)]
    plot_speedup(rows, out / "speedup.png")

    big = 64 if quick else 1024
    wide = [run_study(StudyConfig(f"uniform:{big}", "partime", d, samples=10 * big, mode="infer")).summary
            for d in (1, 4, 16, 64, 256, 1024) if d <= big]
    plot_speedup(wide, out / "speedup-uniform.png")

    net = get_network(network)
    parts = [{"devices": d, **compare_partitioners(net, load_cluster(cluster, d), d, mode="train")}
             for d in devices if d > 1]

    table = pd.DataFrame(rows)[SHOWN]
    best = table[table.devices == max(devices)].sort_values("throughput_sps", ascending=False)
    report = out / "report.md"
    report.write_text(
        f"# partime-sim demo: what-if timing study\n\n"
        f"Network `{network}` ({net.num_layers} layers), cluster `{cluster}`, {samples} streamed samples, "
        f"training, min-max partition. Predicted by the `fast` engine.\n\n"
        f"![speed-up](speedup.png)\n\n## All configurations\n\n{table.to_markdown(index=False, floatfmt='.4g')}\n\n"
        f"## Inference scaling to {big} devices (`uniform:{big}`, partime, ideal links)\n\n"
        f"![speed-up](speedup-uniform.png)\n\n{pd.DataFrame(wide)[SHOWN].to_markdown(index=False, floatfmt='.4g')}\n\n"
        f"## Exact min-max partition vs PARTIME's block heuristic\n\n"
        f"{pd.DataFrame(parts).to_markdown(index=False, floatfmt='.4g')}\n"
    )
    print(f"At {max(devices)} devices ({network}, {cluster}, train):")
    print(best.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"\nreport: {report}  ({time.perf_counter() - t0:.1f} s)")
    return 0
