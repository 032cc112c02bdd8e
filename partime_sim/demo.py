"""``partime-sim demo``: the project's main job in one command, in about two minutes on a
2-core CPU machine.

It answers the project's question three ways and writes one report directory:

1. **What-if** (timing simulator, no hardware): PARTIME's 300-layer conv net on H100s, six
   schedules, 1 to 256 devices; then 1 to 1024 devices on ``uniform:1024`` (a 300-layer
   network stops at 300 stages: 1024 identical 1-ms layers, ideal links, inference).
2. **Real run** (torch backend): a small conv net on two CPU processes (``cpu,cpu``,
   torch.distributed/gloo, one thread each): profile this machine, predict, run, and put
   predicted and measured side by side with their relative errors, timelines and the
   emulated vs measured learning curves (``analysis.compare``). The error is reported as it is.
3. **Staleness** (JAX emulator): what PARTIME's stale gradients do to learning, S = 2, 4, 8
   stages vs sequential training, on the smooth ``shapes`` stream and on the same samples
   shuffled; plus the staleness table derived from the S = 8 schedule.

``run_demo`` prints a compact table (a few lines per part) and the report's path;
the directory holds ``report.md``, the PNG figures, ``demo.json`` (the numbers) and
``real/`` (the comparison's own files).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

SCHEDULES = ("partime", "partime-async", "gpipe", "1f1b", "zb-h1", "layerpipe")
SHOWN = ["schedule", "devices", "makespan_s", "throughput_sps", "speedup", "efficiency", "bubble_fraction",
         "latency_p50_s"]
STREAMS = ("shapes", "shuffled:shapes")
STALENESS_COLUMNS = ("weight_delay", "gradient_age", "signal_mismatch")
REAL_METRICS = ("throughput_sps", "speedup", "makespan_s", "bubble_fraction", "latency_p50_s")


@dataclass(frozen=True)
class DemoSizes:
    # 1. what-if
    network: str = "partime-conv300"
    cluster: str = "h100-nvlink"
    samples: int = 1000
    devices: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    wide_network: str = "uniform:1024"
    wide_devices: tuple[int, ...] = (1, 4, 16, 64, 256, 1024)
    wide_samples: int = 10240
    # 2. real run
    real_network: str = "partime-conv30@16"
    real_samples: int = 100
    real_baseline: bool = True  # also run the sequential baseline (measured speed-up)
    real_repeats: int = 3  # real runs, each beside its baseline; the run of median throughput is shown
    # 3. staleness
    emu_network: str = "mlp"
    emu_samples: int = 3000
    emu_stages: tuple[int, ...] = (2, 4, 8)
    emu_optimizer: str = "adam"
    emu_lr: float = 1e-3
    staleness_stages: int = 8


FULL = DemoSizes()
QUICK = DemoSizes(samples=64, devices=(1, 2, 4, 8), wide_devices=(1, 1024), wide_samples=2048,
                  real_network="mlp", real_samples=64, real_baseline=False, real_repeats=2,
                  emu_samples=600, emu_stages=(2,))


def run_demo(out: Path, quick: bool = False) -> int:
    """Run the three parts into ``out``, print the compact table and the report's path."""
    sizes = QUICK if quick else FULL
    t0 = time.perf_counter()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    parts, seconds = [], {}
    for name, fn in (("what-if", _whatif), ("real", _real), ("staleness", _staleness)):
        t = time.perf_counter()
        parts.append(fn(out, sizes))
        seconds[name] = round(time.perf_counter() - t, 1)
    total = time.perf_counter() - t0

    report = out / "report.md"
    head = (f"# partime-sim demo\n\n*If I pipeline this network's layers over D devices, how fast will it run, "
            f"and what will the stale gradients do to learning?* Three answers: a what-if timing study "
            f"(simulator, 1 to 1024 devices), a real 2-stage CPU run checked against its prediction, and an "
            f"emulated staleness study.\n\n"
            f"{'Quick' if quick else 'Default'} sizes; {total:.0f} s on {platform.machine()} with "
            f"{os.cpu_count()} cores (what-if {seconds['what-if']} s, real run {seconds['real']} s, "
            f"staleness {seconds['staleness']} s)"
            + (f"; 1-minute load average {load:.1f} at the start (other processes share the CPU and "
               f"affect the measured run)" if load is not None else "") + ".\n")
    report.write_text(head + "".join(f"\n{p['markdown']}" for p in parts))
    summary = {"quick": quick, "sizes": asdict(sizes), "seconds": {**seconds, "total": round(total, 1)},
               **{k: v for p in parts for k, v in p["json"].items()}}
    (out / "demo.json").write_text(json.dumps(summary, indent=1, default=_jsonable))

    for p in parts:
        print("\n".join(p["lines"]) + "\n")
    print(f"report: {report}  ({total:.0f} s)")
    return 0


# ---- 1. what-if ---------------------------------------------------------------------------------


def _whatif(out: Path, sz: DemoSizes) -> dict[str, Any]:
    from partime_sim.catalogue import get_network
    from partime_sim.cluster import load_cluster
    from partime_sim.partition import compare_partitioners
    from partime_sim.plots import plot_speedup
    from partime_sim.study import StudyConfig, run_study

    net = get_network(sz.network)
    devices = [d for d in sz.devices if d <= net.num_layers]
    configs = [StudyConfig(sz.network, s, d, samples=sz.samples, cluster=sz.cluster,
                           microbatches=min(sz.samples, 4 * d)) for s in SCHEDULES for d in devices]
    configs += [StudyConfig(sz.wide_network, "partime", d, samples=sz.wide_samples, mode="infer")
                for d in sz.wide_devices]
    summaries = [run_study(cfg).summary for cfg in _progress(configs, "what-if sweep", "config")]
    rows, wide = summaries[:-len(sz.wide_devices)], summaries[-len(sz.wide_devices):]
    plot_speedup(rows, out / "whatif-speedup.png")
    plot_speedup(wide, out / "whatif-speedup-1024.png")
    parts = [{"devices": d, **{k: v for k, v in compare_partitioners(net, load_cluster(sz.cluster, d), d,
                                                                     mode="train").items()
                               if not k.endswith("_sizes")}}
             for d in devices if d > 1]

    table = pd.DataFrame(rows)[SHOWN]
    speedup = table.pivot(index="schedule", columns="devices", values="speedup").loc[list(SCHEDULES)]
    shown = [d for d in devices if d in (1, 4, 16, 64, 256) or d == devices[-1]]
    top = wide[-1]
    result = f"speed-up {top['speedup']:.4g} on {top['devices']} devices (efficiency {top['efficiency']:.3g})"
    wide_line = (f"{sz.wide_network} (1024 identical 1-ms layers, ideal links), partime inference, "
                 f"{sz.wide_samples} samples: {result}")
    lines = [f"1. What-if: {sz.network} ({net.num_layers} layers) on {sz.cluster}, train, {sz.samples} samples "
             f"(fast engine): predicted speed-up vs sequential",
             _indent(speedup[shown].rename(columns=lambda d: f"D={d}").rename_axis(index=None, columns=None)
                     .to_string(float_format=lambda v: f"{v:.3g}")),
             f"   beyond {net.num_layers} stages: {wide_line}"]
    md = (f"## 1. What-if: pipelining over 1 to {top['devices']} devices (simulated)\n\n"
          f"Network `{sz.network}` ({net.num_layers} layers, PARTIME's 300-layer conv net on 256x256 frames), "
          f"cluster `{sz.cluster}`, {sz.samples} streamed samples, training, exact min-max partition, predicted "
          f"by the `fast` engine for {len(SCHEDULES)} schedules on {devices[0]} to {devices[-1]} devices"
          + (f" ({devices[-1]} = one layer per device)" if devices[-1] == net.num_layers else "")
          + ". No hardware is needed.\n\n"
          f"![speed-up of each schedule](whatif-speedup.png)\n\n"
          f"Speed-up vs sequential:\n\n{speedup.to_markdown(floatfmt='.3g')}\n\n"
          f"### To 1024 devices: `{sz.wide_network}`\n\n"
          f"A {net.num_layers}-layer network cannot be split over more than {net.num_layers} devices, so the "
          f"scaling to 1024 devices uses `{sz.wide_network}`: 1024 identical layers of 1 ms forward (and "
          f"1 ms BI, 1 ms BW), no activation bytes, ideal links, PARTIME's schedule in inference, "
          f"{sz.wide_samples} samples. It isolates the schedule's own fill/drain cost: {result}.\n\n"
          f"![speed-up to 1024 devices](whatif-speedup-1024.png)\n\n"
          f"{pd.DataFrame(wide)[SHOWN].to_markdown(index=False, floatfmt='.4g')}\n\n"
          f"### Exact min-max partition vs PARTIME's block heuristic (`{sz.network}`, bottleneck stage)\n\n"
          f"{pd.DataFrame(parts).to_markdown(index=False, floatfmt='.4g')}\n\n"
          f"### All configurations\n\n{table.to_markdown(index=False, floatfmt='.4g')}\n")
    return {"markdown": md, "lines": lines, "json": {"whatif": {"rows": rows, "wide": wide, "partition": parts}}}


# ---- 2. real run --------------------------------------------------------------------------------


def _real(out: Path, sz: DemoSizes) -> dict[str, Any]:
    from partime_sim.analysis.compare import COMPARED, CompareConfig, compare, write_report

    cfg = CompareConfig(sz.real_network, "partime", "cpu,cpu", samples=sz.real_samples, mode="train",
                        transport="distributed", threads=1, baseline=sz.real_baseline, repeats=sz.real_repeats)
    for _ in _progress([cfg], "real 2-stage run (profile, predict, run)", "run"):
        cmp = compare(cfg)
    folder = write_report(cmp, out / "real")
    p, m, e = cmp.predicted, cmp.measured, cmp.error
    rows = [{"metric": k, "predicted": p.get(k), "measured": m.get(k), "error": e.get(k)} for k in COMPARED]
    shown = pd.DataFrame([r for r in rows if r["metric"] in REAL_METRICS])
    shown["error"] = [_pct(v) for v in shown["error"]]
    what = (f"{sz.real_network}, partime, cpu,cpu (torch.distributed/gloo, 1 thread per process), "
            f"{sz.real_samples} samples, train, partition {p['partition']}"
            + (f", median of {sz.real_repeats} runs" if sz.real_repeats > 1 else ""))
    learn = cmp.learning
    learn_line = ("" if learn is None else
                  f"learning: final loss emulated {learn['final_loss']['emulated']:.4g}, measured "
                  f"{learn['final_loss']['measured']:.4g} (max per-sample |diff| {learn['max_abs_loss_diff']:.2g})")
    lines = [f"2. Real run: {what}: predicted vs measured",
             _indent(shown.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.4g}"))]
    runs = m.get("throughput_runs_sps")
    runs_line = "" if not runs else (f"runs: {', '.join(f'{v:.1f}' for v in runs)} samples/s (the median one is "
                                     "shown; a shared machine moves a run 20-30%)")
    for extra in (runs_line, learn_line):
        if extra:
            lines.append(f"   {extra}")
    figures = sorted(f.name for f in folder.glob("*.png"))
    table = pd.DataFrame(rows)
    table["error"] = [_pct(v) for v in table["error"]]
    util = pd.DataFrame({"device": range(len(p["utilization"])), "predicted": p["utilization"],
                         "measured": m["utilization"], "error": [_pct(v) for v in e["utilization"]]})
    md = (f"## 2. Real run: predicted vs measured on this machine\n\n"
          f"{what}. `analysis.compare` profiled this machine (per-layer costs, links; profile "
          f"`{p.get('profile')}`), predicted the run with the `fast` engine on that profile alone, then ran it "
          f"for real with the same schedule and stage boundaries"
          + (" (and the sequential baseline on one process, for the measured speed-up)" if sz.real_baseline else "")
          + ". Both traces go through the same `metrics.summarize`; error = (predicted - measured) / measured, "
          f"reported as it is (the prediction model is still being improved). Files: `real/`.\n\n"
          + (f"Measured {runs_line.removeprefix('runs: ')}.\n\n" if runs_line else "")
          + f"{table.to_markdown(index=False, floatfmt='.4g', missingval='-')}\n\n"
          f"Per-device utilisation:\n\n{util.to_markdown(index=False, floatfmt='.3g')}\n\n"
          + (f"Learning: {learn_line.removeprefix('learning: ')}. The emulated curve is the torch reference "
             f"emulator on the same job (same weights, stream, schedule, partition).\n\n" if learn_line else "")
          + "".join(f"![{f}](real/{f})\n\n" for f in figures))
    return {"markdown": md, "lines": lines, "json": {"real": cmp.to_json()}}


# ---- 3. staleness -------------------------------------------------------------------------------


def _staleness(out: Path, sz: DemoSizes) -> dict[str, Any]:
    from partime_sim.analysis.plots import plot_learning, plot_staleness_heatmap
    from partime_sim.generators import generate
    from partime_sim.learning import EmulateConfig, emulate
    from partime_sim.staleness import staleness_summary, staleness_table

    S = sz.staleness_stages
    label = {d: "sequential" if d == 1 else f"S={d}" for d in (1, *sz.emu_stages)}
    schedule = generate("partime", S, 8 * S + 16, "train")
    derived = pd.DataFrame(staleness_summary(schedule))
    plot_staleness_heatmap(staleness_table(schedule), out / "staleness-signal-mismatch.png",
                           column="signal_mismatch",
                           title=f"partime S={S}: signal mismatch")

    # one compile per stage count, reused by both streams
    configs = [EmulateConfig(sz.emu_network, "sequential" if d == 1 else "partime", d, samples=sz.emu_samples,
                             stream=stream, optimizer=sz.emu_optimizer, lr=sz.emu_lr)
               for d in (1, *sz.emu_stages) for stream in STREAMS]
    runs = [emulate(cfg)[0] for cfg in _progress(configs, "staleness study (JAX emulator)", "run")]
    seq = {r["stream"]: r for r in runs if r["schedule"] == "sequential"}
    for r in runs:
        r["loss_gap_last_10pct"] = r["mean_loss_last_10pct"] - seq[r["stream"]]["mean_loss_last_10pct"]
    figures = []
    for stream in STREAMS:  # the bin means, back on the stream's sample axis, in 30 coarser bins
        name = f"learning-{stream.replace(':', '-')}.png"
        curves = {label[r["devices"]]: np.repeat(r["loss_curve"], -(-r["samples"] // len(r["loss_curve"])))
                  for r in runs if r["stream"] == stream}
        plot_learning(curves, out / name, points=30, log=False,
                      title=f"{sz.emu_network} on '{stream}': online loss, partime vs sequential")
        figures.append((stream, name))

    def cell(r: dict[str, Any]) -> str:
        return f"{r['mean_loss_last_10pct']:.3g} / {r['online_accuracy']:.2f}"

    grid = pd.DataFrame({label[d]: {r["stream"]: cell(r) for r in runs if r["devices"] == d}
                         for d in (1, *sz.emu_stages)}).loc[list(STREAMS)]
    grid.index.name = "stream"
    results = pd.DataFrame([{k: r[k] for k in ("stream", "schedule", "devices", "final_loss", "mean_loss_last_10pct",
                                               "loss_gap_last_10pct", "online_accuracy")} for r in runs])
    acc = {(r["stream"], r["devices"]): r["online_accuracy"] for r in runs}
    top = max(sz.emu_stages)
    per_stage = derived.set_index("stage")[list(STALENESS_COLUMNS)].T
    per_stage.columns = [f"k={k}" for k in per_stage.columns]
    what = (f"{sz.emu_network}, partime vs sequential, JAX emulator, {sz.emu_optimizer} lr {sz.emu_lr:g}, "
            f"{sz.emu_samples} samples")
    lines = [f"3. Staleness: {what}: mean loss of the last 10% / online accuracy",
             _indent(grid.reset_index().to_string(index=False)),
             f"   derived staleness of partime, S={S} (stage k = 0..{S - 1}):",
             _indent(per_stage.to_string(header=False), 5)]
    md = (f"## 3. Staleness: what stale gradients do to learning (emulated)\n\n"
          f"PARTIME updates every stage every tick with a gradient that is a few ticks old. The staleness is "
          f"derived from the schedule itself (`staleness.staleness_summary`; steady state per stage k of S): "
          f"weight delay 0 (each backward uses the weights its forward used), gradient age S-1-k of the "
          f"stage's own updates, and a loss gradient applied to an activation 2(S-1-k) samples newer "
          f"(signal mismatch). For S = {S}:\n\n"
          f"{derived.to_markdown(index=False)}\n\n"
          f"![signal mismatch per stage](staleness-signal-mismatch.png)\n\n"
          f"What it does to learning: the JAX emulator replays each schedule's exact staleness (`{sz.emu_network}`, "
          f"{sz.emu_optimizer} lr {sz.emu_lr:g}, {sz.emu_samples} samples, seed 0, online: one update per sample) "
          f"on the smooth stream `shapes` (the object, hence the class, changes every 50-200 frames) and on the "
          f"same samples shuffled (`shuffled:shapes`, i.i.d.). Cells: mean loss of the last 10% of the stream / "
          f"online accuracy (prediction before the update, whole stream).\n\n"
          f"{grid.to_markdown()}\n\n"
          f"{results.to_markdown(index=False, floatfmt='.4g')}\n\n"
          f"loss_gap_last_10pct = pipelined - sequential (mean loss of the last 10%). At S={top}, online accuracy "
          + "; ".join(f"`{st}` {acc[st, top]:.2f} vs {acc[st, 1]:.2f} sequential" for st in STREAMS)
          + ". On a smooth stream a gradient a few samples old still belongs to (nearly) the same input, which is "
          "PARTIME's argument; on the shuffled stream it belongs to an unrelated sample. (Curves that coincide "
          "are drawn on top of each other.)\n\n"
          + "".join(f"![learning curves, {stream}]({name})\n\n" for stream, name in figures))
    return {"markdown": md, "lines": lines,
            "json": {"staleness": {"derived": derived.to_dict(orient="records"),
                                   "runs": runs}}}


# ---- helpers ------------------------------------------------------------------------------------


def _progress(items: Sequence[Any], desc: str, unit: str) -> Any:
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit=unit, file=sys.stderr, disable=None)


def _indent(text: str, n: int = 3) -> str:
    return "\n".join(" " * n + line for line in text.splitlines())


def _pct(v: Any) -> str:
    return "-" if v is None or v != v else f"{100 * v:+.1f}%"


def _jsonable(v: Any) -> Any:
    """numpy scalars and arrays as plain numbers and lists; anything else as its text."""
    return v.tolist() if hasattr(v, "tolist") else str(v)


__all__ = ["FULL", "QUICK", "DemoSizes", "run_demo"]
