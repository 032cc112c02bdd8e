"""The analysis notebooks run top to bottom (quick sizes, ``PARTIME_NB_QUICK=1``) in a fresh
``python3`` kernel, show their figures inline, and end with the key numbers they checked.

Each notebook's last cell asserts what it found (known staleness values, speed-up sanity, the
emulator matching the real run, ...) and prints one ``NOTEBOOK_RESULT {json}`` line; the tests
read that line back from the executed notebook and check it, the inline figures and the figure
files. The kernel runs in a temporary directory and writes its figures under another, so
nothing lands in the repository.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "analysis" / "notebooks"
MARKER = "NOTEBOOK_RESULT "
CELL_TIMEOUT_S = 300

SCHEDULES = {"partime", "partime-async", "gpipe", "1f1b", "zb-h1", "layerpipe"}
# notebook -> (inline PNG figures at least, figure files written to PARTIME_NB_OUT)
FIGURES = {
    "whatif_scaling": (6, {"speedup.png", "bubbles.png", "utilization.png", "speedup-partitioners.png",
                           "speedup-uniform.png", "gantt.png"}),
    "predicted_vs_measured": (5, {"gantt-lenet-train.png", "gantt-conv30-32-infer.png", "util-lenet-train.png",
                                  "util-conv30-32-infer.png", "learning-lenet-train.png"}),
    "staleness_effects": (7, {"heatmap-partime-signal_mismatch.png", "heatmap-1f1b-weight_delay.png",
                              "learning-adam-shapes.png", "learning-adam-shuffled-shapes.png", "gap-vs-stages.png",
                              "compensation-shapes.png", "compensation-shuffled-shapes.png"}),
}


def _execute(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Path]:
    monkeypatch.setenv("PARTIME_NB_QUICK", "1")
    out = tmp_path / "figures"
    monkeypatch.setenv("PARTIME_NB_OUT", str(out))
    work = tmp_path / "cwd"
    work.mkdir()
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, startup_timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(work)}})
    client.execute()  # raises CellExecutionError (with the traceback) if any cell fails
    return nb, out


def _outputs(nb: Any) -> list[dict]:
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]


def _result(nb: Any) -> dict[str, Any]:
    lines = [line for o in _outputs(nb) if o.get("output_type") == "stream" and o.get("name") == "stdout"
             for line in o["text"].splitlines() if line.startswith(MARKER)]
    assert len(lines) == 1, f"expected one {MARKER!r} line, got {len(lines)}"
    return json.loads(lines[0][len(MARKER):])


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_notebook_runs_and_reports(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = {p.name for p in NOTEBOOKS.iterdir()}
    nb, out = _execute(name, tmp_path, monkeypatch)

    outputs = _outputs(nb)
    assert not [o for o in outputs if o.get("output_type") == "error"]
    result = _result(nb)
    assert result["notebook"] == name and result["quick"] is True  # the kernel saw PARTIME_NB_QUICK
    assert result["checks"] and all(v is True for v in result["checks"].values()), result["checks"]

    min_inline, files = FIGURES[name]
    inline = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(inline) >= min_inline, f"{len(inline)} inline figures"
    assert {p.name for p in out.glob("*.png")} >= files
    assert all((out / f).stat().st_size > 10_000 for f in files)  # something is drawn
    assert {p.name for p in NOTEBOOKS.iterdir()} == before  # nothing written next to the notebooks

    if name == "whatif_scaling":
        assert set(result["speedup_at_max_devices"]) == SCHEDULES
        assert result["best_schedule_at_max_devices"] in SCHEDULES
        top = max(result["devices"])
        assert all(1.0 < s <= top for s in result["speedup_at_max_devices"].values())
        assert result["uniform_speedup_at_max"]["partime / ideal"] > 0.85 * result["big"]
    elif name == "predicted_vs_measured":
        from partime_sim.analysis.compare import COMPARED

        assert result["columns"] == ["predicted", "measured", "rel_error"]
        assert set(result["rel_error"]) == {"lenet train", "conv30@32 infer"}
        for errors in result["rel_error"].values():
            assert set(errors) == set(COMPARED)
            assert errors["throughput_sps"] is not None and errors["throughput_sps"] > -1.0
        assert result["max_abs_loss_diff"]["lenet train"] < 1e-3
    else:
        from partime_sim.staleness import SUMMARY_KEYS

        assert set(result["summary_columns"]) >= {"schedule", "d_k", *SUMMARY_KEYS}
        gaps = result["gap_vs_sequential"]
        assert gaps and all(v == 0.0 for k, v in gaps.items() if k.endswith("S=1"))  # S=1 is sequential
