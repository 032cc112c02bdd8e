"""predicted vs measured on this machine: the compare loop and its report."""

from __future__ import annotations

import json

import pytest

from partime_sim.analysis.compare import COMPARED, CompareConfig, compare, relative_errors, write_report
from partime_sim.backends.profiler import profile
from partime_sim.cli import main
from partime_sim.errors import ConfigError


def test_relative_errors_are_signed_and_skip_missing() -> None:
    p = {"throughput_sps": 110.0, "speedup": None, "utilization": [0.5, 0.9]}
    m = {"throughput_sps": 100.0, "speedup": 1.5, "utilization": [0.4, 0.0]}
    err = relative_errors(p, m)
    assert err["throughput_sps"] == pytest.approx(0.1) and err["speedup"] is None
    assert err["utilization"] == [pytest.approx(0.25), None]


def test_compare_profiles_simulates_runs_and_reports(tmp_path) -> None:
    cmp = compare(CompareConfig("mlp", "1f1b", "cpu,cpu", samples=60, transport="local"))
    for k in COMPARED:
        if cmp.predicted[k] is not None and cmp.measured[k]:
            assert cmp.error[k] == pytest.approx((cmp.predicted[k] - cmp.measured[k]) / cmp.measured[k])
    assert cmp.predicted["partition"] == cmp.measured["partition"] and sum(cmp.measured["partition"]) == 8
    assert cmp.measured["samples"] == cmp.predicted["samples"] == 60
    assert cmp.measured["speedup"] is not None  # a measured sequential baseline ran too
    assert cmp.learning["max_abs_loss_diff"] < 1e-4  # the emulator predicts the run's learning
    assert cmp.predicted["message_costs"] == "measured"  # auto: no backend fit for in-process (local) stages
    out = write_report(cmp, tmp_path / "report")
    assert {p.name for p in out.iterdir()} >= {"comparison.json", "comparison.md", "timeline.png",
                                               "utilization.png", "learning.png"}
    data = json.loads((out / "comparison.json").read_text())
    assert set(data) >= {"predicted", "measured", "error", "learning"}


def test_compare_cli_json(capsys, tmp_path) -> None:
    assert main(["profile", "--network", "mlp", "--device", "cpu", "--transport", "local", "--repeats", "3",
                 "--out", str(tmp_path / "p.json")]) == 0
    capsys.readouterr()
    assert main(["compare", "--network", "mlp", "--schedule", "partime", "--mode", "infer", "--samples", "40",
                 "--transport", "local", "--profile", str(tmp_path / "p.json"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["learning"] is None and data["measured"]["samples"] == 40
    assert set(data["error"]) >= set(COMPARED) | {"utilization"}


def test_compare_cli_no_learning_is_timing_only(capsys, tmp_path) -> None:
    assert main(["profile", "--network", "mlp", "--device", "cpu", "--transport", "local", "--repeats", "3",
                 "--out", str(tmp_path / "p.json")]) == 0
    capsys.readouterr()
    argv = ["compare", "--network", "mlp", "--schedule", "1f1b", "--samples", "40", "--transport", "local",
            "--profile", str(tmp_path / "p.json"), "--json", "--out", str(tmp_path / "r")]
    assert main(argv + ["--no-learning"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["learning"] is None and data["config"]["learning"] is False and data["measured"]["samples"] == 40
    assert not (tmp_path / "r" / "learning.png").exists()
    assert main(argv) == 0  # training compares the loss curves unless told not to
    assert json.loads(capsys.readouterr().out)["learning"]["max_abs_loss_diff"] < 1e-4
    assert (tmp_path / "r" / "learning.png").exists()


@pytest.fixture(scope="module")
def mlp_infer_profile(tmp_path_factory) -> str:
    """One quick local-transport inference profile of mlp, shared by the tests that only need one."""
    path = tmp_path_factory.mktemp("profile") / "mlp-infer.json"
    profile("mlp", ["cpu"], "local", repeats=3, mode="infer").save(path)
    return str(path)


def test_compare_repeats_reports_the_median_run_and_every_run(tmp_path, mlp_infer_profile) -> None:
    cmp = compare(CompareConfig("mlp", "partime", "cpu,cpu", samples=40, mode="infer", transport="local",
                                profile=mlp_infer_profile, repeats=3))
    runs = cmp.measured["throughput_runs_sps"]
    assert len(runs) == 3 and all(r > 0 for r in runs)
    assert cmp.measured["throughput_sps"] == sorted(runs)[1]  # the median run is the one reported
    assert cmp.error["throughput_sps"] == pytest.approx((cmp.predicted["throughput_sps"] - sorted(runs)[1])
                                                        / sorted(runs)[1])
    assert cmp.measured["speedup"] is not None  # against the median of the baseline runs
    out = write_report(cmp, tmp_path / "report")
    assert "each of the 3 runs" in (out / "comparison.md").read_text()
    assert json.loads((out / "comparison.json").read_text())["config"]["repeats"] == 3


@pytest.mark.parametrize("repeats", [0, -1, 1.5, True])
def test_compare_rejects_bad_repeats(repeats) -> None:
    with pytest.raises(ConfigError, match="repeats"):
        compare(CompareConfig("mlp", "partime", "cpu,cpu", samples=40, transport="local", repeats=repeats))


def test_compare_rejects_an_unknown_message_cost_source() -> None:
    with pytest.raises(ConfigError, match="message_costs='fitted' is unknown; use one of auto, measured, backend"):
        compare(CompareConfig("mlp", "partime", "cpu,cpu", samples=40, transport="local", message_costs="fitted"))


def test_compare_cli_repeats_lists_the_runs(capsys, mlp_infer_profile) -> None:
    argv = ["compare", "--network", "mlp", "--schedule", "partime", "--mode", "infer", "--samples", "40",
            "--transport", "local", "--profile", mlp_infer_profile, "--repeats", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "measured throughput of the 2 runs" in out
    with pytest.raises(SystemExit):
        main(argv[:-1] + ["0"])
    assert "--repeats" in capsys.readouterr().err
