"""The side-by-side figures: each writes a PNG of the expected size from real tables."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.image import imread

from partime_sim.analysis.plots import (plot_compensation, plot_gantt, plot_learning, plot_speedup,
                                        plot_staleness_heatmap, plot_utilization)
from partime_sim.generators import generate
from partime_sim.staleness import staleness_table
from partime_sim.study import StudyConfig, run_study


@pytest.fixture(scope="module")
def studies():
    return [run_study(StudyConfig("uniform:8", "1f1b", d, samples=32)) for d in (1, 2, 4, 8)]


def _image(path) -> np.ndarray:
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
    assert img[..., :3].std() > 0.01  # something is drawn
    return img


def test_gantt_stacks_one_panel_per_trace(studies, tmp_path) -> None:
    a, b = studies[1].trace, studies[2].trace
    tall = _image(plot_gantt({"predicted": a, "measured": b}, tmp_path / "g.png"))
    short = _image(plot_gantt({"predicted": a}, tmp_path / "g1.png"))
    assert tall.shape[0] > short.shape[0]


def test_speedup_utilization_learning_staleness_compensation(studies, tmp_path) -> None:
    rows = [s.summary for s in studies]
    _image(plot_speedup(rows, tmp_path / "s.png", measured=[{**rows[1], "speedup": 1.7}]))
    _image(plot_utilization({"predicted": rows[2], "measured": rows[2]}, tmp_path / "u.png"))
    _image(plot_learning({"a": np.linspace(2, 0.1, 500), "b": np.linspace(2, 0.2, 500)}, tmp_path / "l.png"))
    _image(plot_staleness_heatmap(staleness_table(generate("partime", 4, 32, "train")), tmp_path / "h.png",
                                  column="gradient_age"))
    comp = [{"schedule": "partime", "devices": d, "compensation": c, "mean_loss_last_10pct": 1.0 / d + i}
            for d in (2, 4, 8) for i, c in enumerate(("none", "pipemare"))]
    comp.append({"schedule": "sequential", "devices": 1, "compensation": "none", "mean_loss_last_10pct": 0.5})
    _image(plot_compensation(comp, tmp_path / "c.png"))
