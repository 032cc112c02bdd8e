"""Figures that put prediction and measurement side by side (seaborn, PNG, Agg backend):
timelines, speed-up vs devices, utilisation, learning curves, staleness and compensation.

Every function takes plain tables (traces in the schema of ``trace.make_trace``, summary rows
of ``metrics.summarize``, loss arrays) and a path, writes one PNG and returns the path, so
notebooks, ``compare`` and the paper reproductions draw the same figures the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

KIND_ORDER = ("F", "B", "BI", "BW", "OPT", "BARRIER")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return Path(path)


def plot_gantt(traces: Mapping[str, pd.DataFrame], path: str | Path, *, max_seconds: float | None = None,
               title: str = "") -> Path:
    """One timeline per trace (e.g. predicted over measured), stacked on a shared time axis:
    a row per device, a bar per task coloured by kind. ``max_seconds`` shows the first part only."""
    import seaborn as sns

    plt = _pyplot()
    colors = dict(zip(KIND_ORDER, sns.color_palette("tab10", len(KIND_ORDER))))
    rows = sum(max(1, int(t["device"].max()) + 1) for t in traces.values())
    fig, axes = plt.subplots(len(traces), 1, figsize=(10, 1.0 + 0.6 * rows + 0.5 * len(traces)), sharex=True,
                             squeeze=False)
    for ax, (label, trace) in zip(axes[:, 0], traces.items()):
        t = trace[trace["lane"] == "compute"] if "lane" in trace else trace
        t = t[t["device"] >= 0]
        if max_seconds is not None:
            t = t[t["start"] < max_seconds]
        for kind, rows in t.groupby("kind", observed=True):
            spans = list(zip(rows["start"], rows["end"] - rows["start"]))
            for dev in sorted(rows["device"].unique()):
                sel = [s for s, d in zip(spans, rows["device"]) if d == dev]
                ax.broken_barh(sel, (dev - 0.4, 0.8), color=colors.get(str(kind), "grey"), label=str(kind))
        ax.set_yticks(sorted(t["device"].unique()))
        ax.set_ylabel(f"{label}\ndevice")
        ax.invert_yaxis()
        handles, names = ax.get_legend_handles_labels()
        seen = dict(zip(names, handles))
        ax.legend([seen[k] for k in KIND_ORDER if k in seen], [k for k in KIND_ORDER if k in seen],
                  loc="upper right", ncol=6, fontsize="small")
    axes[-1, 0].set_xlabel("seconds from the run's start")
    if title:
        axes[0, 0].set_title(title)
    return _save(fig, path)


def plot_speedup(predicted: Sequence[Mapping[str, Any]], path: str | Path,
                 measured: Sequence[Mapping[str, Any]] = (), title: str = "") -> Path:
    """Predicted speed-up vs devices (a line per schedule), measured points where runs exist,
    and the ideal (linear) line; log-log."""
    import seaborn as sns

    plt = _pyplot()
    pred = pd.DataFrame(list(predicted))
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    top = int(pred["devices"].max())
    ax.plot([1, top], [1, top], ls="--", color="grey", label="ideal")
    sns.lineplot(data=pred, x="devices", y="speedup", hue="schedule", marker="o", ax=ax)
    if len(measured):
        meas = pd.DataFrame(list(measured))
        sns.scatterplot(data=meas, x="devices", y="speedup", hue="schedule", marker="X", s=120, ax=ax,
                        legend=False, edgecolor="black")
        ax.scatter([], [], marker="X", color="black", label="measured")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("devices (pipeline stages)")
    ax.set_ylabel("speed-up vs sequential")
    ax.set_title(title or "speed-up: predicted (lines) and measured (crosses)")
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_utilization(summaries: Mapping[str, Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """Per-device utilisation of each summary (e.g. predicted and measured), side by side."""
    import seaborn as sns

    plt = _pyplot()
    rows = [{"device": d, "utilization": u, "source": label}
            for label, summary in summaries.items() for d, u in enumerate(summary["utilization"])]
    fig, ax = plt.subplots(figsize=(7.2, 4))
    sns.barplot(data=pd.DataFrame(rows), x="device", y="utilization", hue="source", ax=ax)
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")  # never over the bars
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("busy fraction of the makespan")
    ax.set_title(title or "per-device utilisation")
    return _save(fig, path)


def plot_learning(curves: Mapping[str, np.ndarray], path: str | Path, *, points: int = 100, title: str = "",
                  log: bool = True) -> Path:
    """Online loss along the stream (means of ``points`` equal bins), one line per labelled
    per-sample loss array (e.g. emulated and measured, or one per schedule)."""
    import seaborn as sns

    plt = _pyplot()
    frames = []
    for label, loss in curves.items():
        loss = np.asarray(loss, dtype=float)
        edges = np.linspace(0, loss.size, min(points, loss.size) + 1).round().astype(int)
        means = np.add.reduceat(loss, edges[:-1]) / np.diff(edges)
        frames.append(pd.DataFrame({"sample": (edges[:-1] + edges[1:]) / 2, "loss": means, "run": label}))
    fig, ax = plt.subplots(figsize=(6.5, 4))
    sns.lineplot(data=pd.concat(frames), x="sample", y="loss", hue="run", style="run", ax=ax)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("sample of the stream")
    ax.set_ylabel("online loss (bin mean)")
    ax.set_title(title or "learning curves")
    return _save(fig, path)


def plot_staleness_heatmap(table: pd.DataFrame, path: str | Path, *, column: str = "weight_delay",
                           title: str = "") -> Path:
    """Stage x delay: the fraction of a stage's gradients with each delay (``column`` of
    ``staleness.staleness_table``: weight_delay, gradient_age or signal_mismatch)."""
    import seaborn as sns

    plt = _pyplot()
    t = table.dropna(subset=[column])
    counts = pd.crosstab(t["stage"], t[column].astype(int), normalize="index")
    fig, ax = plt.subplots(figsize=(1.5 + 0.45 * counts.shape[1], 1.2 + 0.4 * counts.shape[0]))
    sns.heatmap(counts, annot=counts.shape[1] <= 12, fmt=".2f", cmap="viridis", vmin=0, vmax=1, ax=ax,
                cbar_kws={"label": "fraction of the stage's gradients"})
    ax.set_xlabel(column.replace("_", " "))
    ax.set_ylabel("stage")
    ax.set_title(title or f"staleness: {column.replace('_', ' ')} per stage")
    return _save(fig, path)


def plot_compensation(rows: Sequence[Mapping[str, Any]], path: str | Path, *, metric: str = "mean_loss_last_10pct",
                      title: str = "") -> Path:
    """Loss vs device count, one line per compensation method (rows of ``learning.emulate``,
    with a ``sequential`` reference line when rows of schedule 'sequential' are given)."""
    import seaborn as sns

    plt = _pyplot()
    df = pd.DataFrame(list(rows))
    seq = df[df["schedule"] == "sequential"]
    df = df[df["schedule"] != "sequential"]
    fig, ax = plt.subplots(figsize=(7.8, 4))
    sns.lineplot(data=df, x="devices", y=metric, hue="compensation", style="schedule", marker="o", ax=ax)
    if len(seq):
        ax.axhline(float(seq[metric].mean()), ls="--", color="grey", label="sequential")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("devices (pipeline stages)")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title(title or "loss vs devices per compensation method")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))  # never over the lines
    return _save(fig, path)


__all__ = ["plot_compensation", "plot_gantt", "plot_learning", "plot_speedup", "plot_staleness_heatmap",
           "plot_utilization"]
