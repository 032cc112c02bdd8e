"""Predicted vs measured, side by side: profile this machine (or load a profile), simulate the
configuration on it, run it for real with the same partition, and report both with their
relative errors; for training, the emulated and measured learning curves too.

The prediction only sees the profile (measured layer costs, links, barrier, per-task
overheads); nothing is tuned to the run it is compared with. The real run and the prediction
use the same schedule and the same stage boundaries, and both traces go through the same
``metrics.summarize``, so an error is the model's, not the bookkeeping's.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import numpy as np

from partime_sim.errors import ConfigError

MESSAGE_COSTS = ("auto", "measured", "backend")
COMPARED = ("throughput_sps", "speedup", "makespan_s", "bubble_fraction", "latency_p50_s", "latency_p99_s")


@dataclass(frozen=True)
class CompareConfig:
    network: str
    schedule: str
    devices: str = "cpu,cpu"
    samples: int = 256
    mode: str = "train"
    transport: str = "distributed"
    profile: str | None = None  # a saved profile (partime-sim profile --out); default: profile now
    optimizer: str = "sgd"
    lr: float = 0.03
    seed: int = 0
    dtype: str = "float32"
    microbatches: int | None = None
    partition: str = "minmax"
    stream: str | None = None
    threads: int | None = 1
    baseline: bool = True  # also run (and predict) the sequential baseline, for speed-up
    learning: bool = True  # training: also emulate the run and compare the loss curves (off: timing only)
    pin_cores: bool = True  # distributed CPU workers (and the profiler's processes) on cores of their own
    repeats: int = 1  # real runs (each with its baseline run); the run of median throughput is reported
    # "backend": per-message cost fitted to pipedream runs (calibrate_message_costs); "measured": the
    # profile's own figure; "auto": backend where it applies (CPU processes, distributed transport)
    # and the profile is not fitted yet, measured elsewhere
    message_costs: str = "auto"


@dataclass
class Comparison:
    config: CompareConfig
    predicted: dict[str, Any]
    measured: dict[str, Any]
    error: dict[str, Any]
    predicted_trace: Any
    measured_trace: Any
    learning: dict[str, Any] | None
    emulated_loss: np.ndarray | None
    measured_loss: np.ndarray | None

    def to_json(self) -> dict[str, Any]:
        return {"config": asdict(self.config), "predicted": self.predicted, "measured": self.measured,
                "error": self.error, "learning": self.learning}


def relative_errors(predicted: dict[str, Any], measured: dict[str, Any]) -> dict[str, Any]:
    """(predicted - measured) / measured per metric (per device for utilisation); None where
    either side is missing or the measurement is 0."""
    def rel(p: Any, m: Any) -> float | None:
        return None if p is None or m is None or m == 0 else (float(p) - float(m)) / abs(float(m))

    err = {k: rel(predicted.get(k), measured.get(k)) for k in COMPARED}
    err["utilization"] = [rel(p, m) for p, m in zip(predicted["utilization"], measured["utilization"])]
    return err


def predict(prof: Any, schedule_name: str, stages: int, samples: int, mode: str = "train",
            microbatches: int | None = None, partition: str = "minmax", seed: int = 0) -> tuple[Any, ...]:
    """The simulator's prediction of a run on a profiled machine: (summary, trace, Partition,
    Schedule). Only the profile is used: measured costs, links, barrier, overheads, concurrency
    slowdown, and the measured spread of task times (a lockstep tick waits for its slowest stage,
    so the durations are drawn with the same coefficient of variation)."""
    from partime_sim.cluster import resize_profiled
    from partime_sim.metrics import summarize
    from partime_sim.partition import Partition
    from partime_sim.simulate import simulate
    from partime_sim.study import resolve_partition, resolve_schedule

    schedule = resolve_schedule(schedule_name, stages, samples, mode, microbatches)
    cluster = resize_profiled(prof.cluster, max(schedule.num_devices, 2))
    parts = resolve_partition(partition, prof.network, cluster, schedule.num_stages, mode)
    if schedule.num_devices == 1:
        parts = Partition(parts.bounds, (0,) * parts.num_stages)
    jitter = float(np.mean(list(prof.meta.get("jitter", {}).values()) or [0.0]))
    sim = simulate(schedule, prof.network, cluster, parts, engine="fast", jitter=jitter, seed=seed)
    # the backend reads a sample when stage 0 is free (no arrival queue, no copies on CPU): latency
    # is first forward start -> last forward end on both sides
    trace = sim.trace[~sim.trace["kind"].isin(["H2D", "D2H"])]
    summary = summarize(trace, baseline_makespan=sim.baseline_makespan, num_devices=schedule.num_devices)
    return summary, trace, parts, schedule


def real_run_config(cfg: CompareConfig, sizes: Sequence[int]) -> Any:
    """The backend ``RunConfig`` of ``cfg``'s real run, at the predicted split ``sizes``
    (layers per stage): what ``compare`` runs, for callers that run it again."""
    from partime_sim.backends.run import RunConfig

    return RunConfig(cfg.network, cfg.schedule, cfg.devices, transport=cfg.transport, samples=cfg.samples,
                     mode=cfg.mode, stream=cfg.stream, optimizer=cfg.optimizer, lr=cfg.lr, seed=cfg.seed,
                     dtype=cfg.dtype, partition=",".join(map(str, sizes)), microbatches=cfg.microbatches,
                     threads=cfg.threads, pin_cores=cfg.pin_cores)


def compare(cfg: CompareConfig, progress: bool = False) -> Comparison:
    """Profile (or load), simulate, run, and put the two side by side."""
    from dataclasses import replace

    from partime_sim.backends.pipeline import parse_devices
    from partime_sim.backends.profiler import (backend_message_costs_apply, calibrate_message_costs,
                                               load_profile, profile)
    from partime_sim.backends.run import run_config
    from partime_sim.metrics import summarize

    if isinstance(cfg.repeats, bool) or not isinstance(cfg.repeats, int) or cfg.repeats < 1:
        raise ConfigError(f"repeats={cfg.repeats!r} is invalid; give an integer >= 1 (real runs to take the median of)")
    if cfg.message_costs not in MESSAGE_COSTS:
        raise ConfigError(f"message_costs={cfg.message_costs!r} is unknown; use one of {', '.join(MESSAGE_COSTS)}")
    devices = parse_devices(cfg.devices)
    prof = load_profile(cfg.profile) if cfg.profile else profile(
        cfg.network, devices, cfg.transport, cfg.dtype, seed=cfg.seed, threads=cfg.threads, mode=cfg.mode,
        pin_cores=cfg.pin_cores)
    if cfg.message_costs == "backend" or (cfg.message_costs == "auto" and backend_message_costs_apply(prof.meta)
                                          and "message_cost_calibration" not in prof.meta):
        prof = calibrate_message_costs(prof)
    S = len(devices) if cfg.schedule != "sequential" else 1
    predicted, pred_trace, partition, schedule = predict(prof, cfg.schedule, S, cfg.samples, cfg.mode,
                                                         cfg.microbatches, cfg.partition, cfg.seed)

    run_cfg = real_run_config(cfg, partition.sizes)
    base_cfg = replace(run_cfg, schedule="sequential", devices=str(devices[0]), partition="minmax", microbatches=None)
    with_baseline = cfg.baseline and schedule.num_devices > 1  # the measured sequential baseline, one device
    runs, base_makespans = [], []
    for _ in range(cfg.repeats):  # each run next to its baseline run: a slow minute hits both
        row, result = run_config(run_cfg)
        runs.append((summarize(result.trace, num_devices=schedule.num_devices)["throughput_sps"], row, result))
        if with_baseline:
            base_makespans.append(run_config(base_cfg)[0]["makespan_s"])
    # the run of median throughput stands for all (its trace is plotted, its metrics agree with
    # each other); the spread of the runs is reported beside it
    throughputs = [r[0] for r in runs]
    _, row, result = sorted(runs, key=lambda r: r[0])[(len(runs) - 1) // 2]
    measured = summarize(result.trace, num_devices=schedule.num_devices,
                         baseline_makespan=float(np.median(base_makespans)) if with_baseline else None)
    if cfg.repeats > 1:
        measured["throughput_runs_sps"] = throughputs
    learning, emulated = None, None
    if cfg.mode == "train" and cfg.learning:
        emulated = _emulated_loss(cfg, run_cfg)
        learning = {"max_abs_loss_diff": float(np.max(np.abs(emulated - result.loss))),
                    "final_loss": {"emulated": float(emulated[-1]), "measured": float(result.loss[-1])},
                    "mean_loss_last_10pct": {"emulated": float(_tail(emulated)), "measured": float(_tail(result.loss))}}
    head = {"network": row["network"], "schedule": cfg.schedule, "mode": cfg.mode, "devices": schedule.num_devices,
            "partition": list(partition.sizes), "profile": prof.meta.get("spec", cfg.network)}
    costs = {"message_costs": "backend" if "message_cost_calibration" in prof.meta else "measured",
             "message_cost_s": [prof.cluster.link.send_cost_s, prof.cluster.link.recv_cost_s]}
    return Comparison(cfg, {**head, **costs, **predicted}, {**head, **measured}, relative_errors(predicted, measured),
                      pred_trace, result.trace, learning, emulated, result.loss if cfg.mode == "train" else None)


def _tail(loss: np.ndarray) -> float:
    return float(np.mean(loss[-max(1, loss.size // 10):]))


def _emulated_loss(cfg: CompareConfig, run_cfg: Any) -> np.ndarray:
    """The torch reference emulator on the very job the run executed (same weights, stream,
    schedule and partition): the predicted learning curve."""
    from partime_sim.backends.run import prepare
    from partime_sim.emulator_torch import emulate_torch

    job, _ = prepare(run_cfg)
    return emulate_torch(job.schedule, job.stages, job.x, job.y, loss=job.loss, optimizer=job.spec,
                         dtype=job.dtype, compensation=job.plan.name).loss


def write_report(cmp: Comparison, out: str | Path) -> Path:
    """comparison.json, a Markdown table and the figures (timelines, utilisation, learning)."""
    from partime_sim.analysis.plots import plot_gantt, plot_learning, plot_utilization

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps(cmp.to_json(), indent=1))
    horizon = float(min(cmp.predicted_trace["end"].max(), cmp.measured_trace["end"].max())) / 4
    plot_gantt({"predicted": cmp.predicted_trace, "measured": cmp.measured_trace}, out / "timeline.png",
               max_seconds=horizon, title=f"{cmp.predicted['network']} {cmp.config.schedule}: first quarter")
    plot_utilization({"predicted": cmp.predicted, "measured": cmp.measured}, out / "utilization.png")
    lines = ["| metric | predicted | measured | error |", "|---|---|---|---|"]
    for k in COMPARED:
        lines.append(f"| {k} | {_fmt(cmp.predicted.get(k))} | {_fmt(cmp.measured.get(k))} | {_pct(cmp.error.get(k))} |")
    if cmp.learning is not None:
        plot_learning({"emulated": cmp.emulated_loss, "measured": cmp.measured_loss}, out / "learning.png")
        lines.append(f"\nLearning: max |emulated - measured| per-sample loss = {cmp.learning['max_abs_loss_diff']:.3g}")
    send, recv = cmp.predicted["message_cost_s"]
    lines.append(f"\nMessage cost per end ({cmp.predicted['message_costs']}): {1e3 * send:.3f} ms sent, "
                 f"{1e3 * recv:.3f} ms received.")
    runs = cmp.measured.get("throughput_runs_sps")
    if runs:
        lines.append(f"\nMeasured throughput of each of the {len(runs)} runs (samples/s): "
                     f"{', '.join(f'{r:.4g}' for r in runs)}; the run of median throughput is reported above.")
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    return out


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:+.1f}%"

