"""What every reproduced experiment hands back, and the sizes a run uses.

An experiment is a function ``Settings -> Experiment``: the paper's claim, how it was
reproduced, one table (a pandas DataFrame), its figures and a short text saying where and
why the numbers differ from the paper's. ``reproduce.run_paper`` writes them to RESULTS.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

# The paper's networks are simulated up to these device counts where they have enough layers.
DEVICES_FULL = (1, 2, 4, 8, 16, 32, 64, 1024)
DEVICES_QUICK = (1, 2, 4, 8)


@dataclass(frozen=True)
class Settings:
    """Sizes of one run: ``quick`` (< 1 minute, for tests) or full (< 10 minutes on 2 cores)."""

    quick: bool = False
    figures: Path = Path("figures")  # where experiments write their PNGs

    @property
    def samples(self) -> int:
        """Stream length of the timing simulations (PARTIME's scripts: ``stream_size = 1500``)."""
        return 128 if self.quick else 1500

    @property
    def wanted_devices(self) -> tuple[int, ...]:
        return DEVICES_QUICK if self.quick else DEVICES_FULL

    # the GPU preset closest to the paper's 8-GPU server (see scaling.py)
    cluster: str = "a100-nvlink"

    @property
    def learn_samples(self) -> int:
        return 300 if self.quick else 3000

    @property
    def learn_seeds(self) -> int:
        return 1 if self.quick else 3

    @property
    def measured_network(self) -> str:
        """The reduced-size V.A network the CPU run trains (frames of 16 or 32 pixels)."""
        return "partime-conv30@16" if self.quick else "partime-conv30@32"

    @property
    def measured_samples(self) -> int:
        return 16 if self.quick else 64

    @property
    def measured_repeats(self) -> int:
        return 1 if self.quick else 2

    @property
    def gpu_network(self) -> str:
        """V.A's network on the GPU (``measured_gpu``): PARTIME's 256x256 frames (64x64 in quick)."""
        return "partime-conv30@64" if self.quick else "partime-conv30@256"

    @property
    def gpu_samples(self) -> int:
        return 60 if self.quick else 300

    @property
    def gpu_stages(self) -> tuple[int, ...]:
        return (2,) if self.quick else (2, 4, 8)

    @property
    def transport(self) -> str:
        """Real runs: one process per stage (full), threads of this process (quick: no spawn)."""
        return "local" if self.quick else "distributed"


def device_counts(wanted: tuple[int, ...], num_layers: int) -> tuple[list[int], list[int]]:
    """(counts simulated, counts skipped): a pipeline has at most one stage per layer, so
    counts above ``num_layers`` are skipped and ``num_layers`` itself is added instead."""
    kept = [d for d in wanted if d <= num_layers]
    skipped = [d for d in wanted if d > num_layers]
    if skipped and num_layers not in kept:
        kept.append(num_layers)
    return kept, skipped


@dataclass
class Experiment:
    key: str  # short id, also the figure file prefix
    title: str
    claim: str  # what the paper says (Markdown)
    setup: str  # what was run here (Markdown)
    table: pd.DataFrame
    text: str  # what was reproduced, where and why it differs (Markdown)
    figures: list[Path] = field(default_factory=list)
    headline: str = ""  # one line for the summary table

    def markdown(self, root: Path) -> str:
        figs = "\n\n".join(f"![{self.title}]({p.relative_to(root).as_posix()})" for p in self.figures)
        table = self.table.to_markdown(index=False, floatfmt=".4g")
        return (f"## {self.title}\n\n**Paper.** {self.claim}\n\n**Here.** {self.setup}\n\n{table}\n\n"
                f"{figs}\n\n{self.text}\n")
