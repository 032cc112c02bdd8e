"""Figures of the timing studies (seaborn on a non-interactive backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pandas as pd


def plot_speedup(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Speed-up vs device count, one line per schedule, with the ideal (linear) line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    df = pd.DataFrame(rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    top = int(df["devices"].max())
    ax.plot([1, top], [1, top], ls="--", color="grey", label="ideal")
    sns.lineplot(data=df, x="devices", y="speedup", hue="schedule", marker="o", ax=ax)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("devices (pipeline stages)")
    ax.set_ylabel("speed-up vs sequential")
    network = ", ".join(sorted(set(df["network"])))
    ax.set_title(f"{network}: predicted speed-up ({df['mode'].iloc[0]}, {int(df['samples'].iloc[0])} samples)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_learning(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Online loss along the stream (bin means of ``loss_curve``), one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    frames = []
    for row in rows:
        curve = row["loss_curve"]
        step = row["samples"] / len(curve)
        label = f"{row['schedule']} S={row['devices']} seed {row['seed']}"
        frames.append(pd.DataFrame({"sample": (pd.RangeIndex(len(curve)) + 0.5) * step, "loss": curve, "run": label}))
    df = pd.concat(frames)
    fig, ax = plt.subplots(figsize=(6, 4))
    sns.lineplot(data=df, x="sample", y="loss", hue="run", ax=ax)
    ax.set_yscale("log")
    ax.set_xlabel("sample of the stream")
    ax.set_ylabel("online loss (bin mean)")
    ax.set_title(f"{rows[0]['network']} on stream '{rows[0]['stream']}' ({rows[0]['optimizer']}, lr {rows[0]['lr']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
