"""``partime-sim demo --quick``: the main job end to end (what-if sweep, real 2-stage CPU run,
staleness study), run once through the CLI; the tests read what it printed and wrote."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest

from partime_sim.catalogue import get_network
from partime_sim.cli import main
from partime_sim.demo import QUICK

PNG = b"\x89PNG\r\n\x1a\n"
SECTIONS = ("## 1. What-if", "## 2. Real run", "## 3. Staleness")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp("demo") / "report"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["demo", "--quick", "--out", str(out)]) == 0
    return stdout.getvalue(), out


def _summary(out: Path) -> dict:
    return json.loads((out / "demo.json").read_text())


def test_report_has_the_three_parts_and_every_figure_it_links(demo) -> None:
    _, out = demo
    report = (out / "report.md").read_text()
    positions = [report.find(s) for s in SECTIONS]
    assert -1 not in positions and positions == sorted(positions), positions
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", report)
    assert set(linked) >= {"whatif-speedup.png", "whatif-speedup-1024.png", "real/timeline.png",
                           "real/learning.png", "staleness-signal-mismatch.png", "learning-shapes.png",
                           "learning-shuffled-shapes.png"}
    for name in linked:  # every figure of every part is there, a real PNG, not empty
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, name
    # each figure is linked from its own part
    sections = [report[a:b] for a, b in zip(positions, positions[1:] + [len(report)])]
    assert "whatif-speedup-1024.png" in sections[0] and "real/timeline.png" in sections[1]
    assert "learning-shuffled-shapes.png" in sections[2]


def test_printed_table_has_predicted_and_measured_throughput_and_the_path(demo) -> None:
    printed, out = demo
    real = _summary(out)["real"]
    p, m = real["predicted"]["throughput_sps"], real["measured"]["throughput_sps"]
    assert p > 0 and m > 0
    row = next(line for line in printed.splitlines() if line.split()[:1] == ["throughput_sps"])
    assert row.split()[1:3] == [f"{p:.4g}", f"{m:.4g}"]
    assert row.split()[3] == f"{100 * (p - m) / m:+.1f}%"  # the relative error, signed
    assert printed.rstrip().splitlines()[-1].startswith(f"report: {(out / 'report.md').resolve()}")
    for header in ("1. What-if", "2. Real run", "3. Staleness"):
        assert header in printed
    assert printed.count("\n") < 40  # compact: a few lines per part


def test_what_if_spans_one_to_1024_devices(demo) -> None:
    printed, out = demo
    whatif = _summary(out)["whatif"]
    rows, wide = whatif["rows"], whatif["wide"]
    assert {r["schedule"] for r in rows} >= {"partime", "gpipe", "1f1b", "zb-h1", "layerpipe"}
    assert min(r["devices"] for r in rows) == 1 and [r["devices"] for r in wide] == [1, 1024]
    assert all(r["network"] == "uniform:1024" and r["schedule"] == "partime" for r in wide)
    one = [r for r in rows if r["devices"] == 1 and r["schedule"] == "partime"]
    assert one and one[0]["speedup"] == pytest.approx(1.0)
    assert 1 < wide[-1]["speedup"] <= 1024  # pipelining pays, never beyond linear
    assert f"speed-up {wide[-1]['speedup']:.4g} on 1024 devices" in printed


def test_real_run_compares_the_same_job_both_ways(demo) -> None:
    _, out = demo
    real = _summary(out)["real"]
    p, m, err = real["predicted"], real["measured"], real["error"]
    assert p["samples"] == m["samples"] == QUICK.real_samples and m["devices"] == 2
    layers = get_network(QUICK.real_network).num_layers
    assert p["partition"] == m["partition"] and len(p["partition"]) == 2 and sum(p["partition"]) == layers
    for k in ("throughput_sps", "makespan_s"):
        assert err[k] == pytest.approx((p[k] - m[k]) / m[k])
    learning = real["learning"]  # the emulated learning curve is the run's, to rounding
    assert learning["final_loss"]["emulated"] == pytest.approx(learning["final_loss"]["measured"], abs=1e-4)
    assert p["message_costs"] == "backend" and 0 < p["message_cost_s"][0] == p["message_cost_s"][1]  # the default
    comparison = json.loads((out / "real" / "comparison.json").read_text())
    assert comparison["measured"]["throughput_sps"] == m["throughput_sps"]


def test_staleness_table_shows_partimes_known_delays(demo) -> None:
    printed, out = demo
    S = QUICK.staleness_stages
    lines = printed.splitlines()
    start = next(i for i, line in enumerate(lines) if "derived staleness of partime" in line)
    assert f"S={S}" in lines[start]
    table = {(words := line.split())[0]: [int(v) for v in words[1:]] for line in lines[start + 1:start + 4]}
    assert table == {"weight_delay": [0] * S,  # stage k of S
                     "gradient_age": [S - 1 - k for k in range(S)],
                     "signal_mismatch": [2 * (S - 1 - k) for k in range(S)]}
    derived = _summary(out)["staleness"]["derived"]
    assert [(r["weight_delay"], r["gradient_age"], r["signal_mismatch"]) for r in derived] == \
        [(0, S - 1 - k, 2 * (S - 1 - k)) for k in range(S)]
    report = (out / "report.md").read_text().replace(" ", "")  # stage 0: delay 0, age S-1, mismatch 2(S-1)
    assert f"|0|0|{S - 1}|{2 * (S - 1)}|" in report


def test_staleness_study_runs_every_stage_count_on_both_streams(demo) -> None:
    printed, out = demo
    runs = _summary(out)["staleness"]["runs"]
    got = {(r["stream"], r["schedule"], r["devices"]) for r in runs}
    want = {(st, "sequential", 1) for st in ("shapes", "shuffled:shapes")}
    want |= {(st, "partime", d) for st in ("shapes", "shuffled:shapes") for d in QUICK.emu_stages}
    assert got == want
    for r in runs:
        assert r["samples"] == QUICK.emu_samples and r["impl"] == "jax"
        assert 0 <= r["online_accuracy"] <= 1 and r["mean_loss_last_10pct"] > 0
        if r["schedule"] == "sequential":
            assert r["loss_gap_last_10pct"] == 0
    seq = next(r for r in runs if r["stream"] == "shuffled:shapes" and r["schedule"] == "sequential")
    row = next(line for line in printed.splitlines() if line.split()[:1] == ["shuffled:shapes"])
    assert row.split()[1:4] == [f"{seq['mean_loss_last_10pct']:.3g}", "/", f"{seq['online_accuracy']:.2f}"]


def test_real_run_shows_the_median_of_its_repeated_runs(demo) -> None:
    printed, out = demo
    m = _summary(out)["real"]["measured"]
    runs = m["throughput_runs_sps"]
    assert len(runs) == QUICK.real_repeats == 2
    assert m["throughput_sps"] == sorted(runs)[0]  # of two, the lower median stands for both
    line = next(line.strip() for line in printed.splitlines() if line.strip().startswith("runs: "))
    assert line.startswith(f"runs: {runs[0]:.1f}, {runs[1]:.1f} samples/s")
    assert f"Measured {runs[0]:.1f}, {runs[1]:.1f} samples/s" in (out / "report.md").read_text()
