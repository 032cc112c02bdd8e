"""The command line as a user meets it: JSON keys, progress bars off stdout, one-line errors."""

import json
import subprocess
import sys

import pytest

from partime_sim.cli import main

SIM_KEYS = {"schedule", "devices", "samples", "makespan_s", "throughput_sps", "speedup", "efficiency",
            "bubble_fraction", "utilization", "latency_p50_s", "latency_p99_s", "peak_memory_bytes"}


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_simulate_json_has_the_documented_keys(capsys):
    code, out, err = run_cli(capsys, "simulate", "--network", "uniform:8", "--schedule", "partime", "--devices", "4",
                             "--samples", "20", "--mode", "infer", "--json")
    assert code == 0
    row = json.loads(out)
    assert SIM_KEYS <= row.keys()
    assert row["devices"] == 4 and row["samples"] == 20
    assert row["speedup"] == pytest.approx(4 * 20 / (20 + 4 - 1), rel=1e-12)
    assert len(row["utilization"]) == 4


def test_sweep_json_is_a_list_and_writes_a_plot(capsys, tmp_path):
    png = tmp_path / "s.png"
    code, out, err = run_cli(capsys, "sweep", "--network", "uniform:16", "--schedule", "1f1b", "--devices", "1,2,4",
                             "--samples", "8", "--json", "--plot", str(png))
    assert code == 0
    rows = json.loads(out)
    assert [r["devices"] for r in rows] == [1, 2, 4]
    assert all(SIM_KEYS <= r.keys() for r in rows)
    assert png.stat().st_size > 1000


def test_des_engine_and_trace_export(capsys, tmp_path):
    trace = tmp_path / "t.json"
    code, out, _ = run_cli(capsys, "simulate", "--network", "partime-conv30", "--schedule", "gpipe", "--devices", "3",
                           "--samples", "6", "--engine", "des", "--cluster", "h100-pcie", "--jitter", "0.1",
                           "--json", "--trace", str(trace))
    assert code == 0
    events = json.loads(trace.read_text())["traceEvents"]
    assert sum(e["ph"] == "X" for e in events) > 6 * 3 * 2
    assert json.loads(out)["makespan_s"] > 0


def test_schedule_text_round_trips_through_the_cli(capsys, tmp_path):
    code, text, _ = run_cli(capsys, "schedule", "--schedule", "zb-h1", "--devices", "3", "--samples", "4")
    assert code == 0 and text.startswith("schedule zb-h1 train")
    path = tmp_path / "zb.txt"
    path.write_text(text)
    code, out_file, _ = run_cli(capsys, "simulate", "--network", "uniform:6", "--schedule", str(path), "--devices", "3",
                                "--samples", "4", "--json")
    code2, out_name, _ = run_cli(capsys, "simulate", "--network", "uniform:6", "--schedule", "zb-h1", "--devices", "3",
                                 "--samples", "4", "--json")
    assert code == code2 == 0
    assert json.loads(out_file)["makespan_s"] == json.loads(out_name)["makespan_s"]


def test_listings(capsys):
    for command in ("networks", "schedules", "clusters"):
        code, out, _ = run_cli(capsys, command, "--json")
        assert code == 0 and len(json.loads(out)) >= 3
    code, out, _ = run_cli(capsys, "networks")
    assert "resnet152" in out and "partime-conv300" in out


def test_partition_report_says_how_much_better(capsys):
    code, out, _ = run_cli(capsys, "partition", "--network", "partime-conv30", "--devices", "4,8",
                           "--cluster", "h100-nvlink", "--json")
    assert code == 0
    rows = json.loads(out)
    assert len(rows) == 2


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["simulate", "--network", "uniform:4", "--schedule", "partime", "--devices", "8"], "8 stages"),
        (["simulate", "--network", "uniform:4", "--schedule", "partime", "--devices", "2", "--partition", "1,2"],
         "[1, 2]"),
        (["simulate", "--network", "nosuchnet", "--schedule", "partime", "--devices", "2"], "nosuchnet"),
        (["simulate", "--network", "uniform:4", "--schedule", "nosuchsched", "--devices", "2"], "nosuchsched"),
        (["simulate", "--network", "uniform:4", "--schedule", "gpipe", "--devices", "2", "--cluster", "nosuchpreset"],
         "nosuchpreset"),
        (["simulate", "--network", "uniform:4", "--schedule", "gpipe", "--devices", "0"], "0 must be >= 1"),
        (["sweep", "--network", "uniform:4", "--schedule", "gpipe", "--devices", "1,x"], "1,x"),
        (["simulate", "--network", "uniform:4", "--schedule", "gpipe", "--devices", "2", "--poisson"], "--arrival-rate"),
        (["simulate", "--network", "uniform:4", "--schedule", "gpipe", "--devices", "2", "--trace", "t.txt"], "t.txt"),
        (["simulate", "--network", "uniform:4", "--schedule", "gpipe", "--devices", "2", "--arrival-rate", "0"],
         "--arrival-rate"),
    ],
)
def test_bad_input_is_one_line_exit_2(capsys, argv, needle):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    out, err = capsys.readouterr()
    assert code == 2
    assert needle in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_bad_files_are_one_line_errors(tmp_path):
    bad_json = tmp_path / "net.json"
    bad_json.write_text("{not json")
    negative = tmp_path / "neg.json"
    negative.write_text(json.dumps({"name": "neg", "layers": [{"name": "l0", "fwd": -1, "bwd_input": 0,
                                                               "bwd_weight": 0}]}))
    cycle = tmp_path / "cycle.txt"
    cycle.write_text("schedule x infer stages=2 samples=1 devices=2\ntasks: 0F0@0:d0 1F0@1:d1\n"
                     "1F0@1:d1 <- 0F0@0:d0\n0F0@0:d0 <- 1F0@1:d1\n")
    cases = [
        (["--network", str(bad_json), "--schedule", "gpipe", "--devices", "1"], "not valid JSON"),
        (["--network", str(negative), "--schedule", "gpipe", "--devices", "1"], "fwd=-1"),
        (["--network", "uniform:2", "--schedule", str(cycle), "--devices", "2", "--samples", "1"], "cycle"),
    ]
    for argv, needle in cases:
        proc = subprocess.run([sys.executable, "-m", "partime_sim.cli", "simulate", *argv],
                              capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert needle in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


LEARN_KEYS = {"final_loss", "mean_loss_last_10pct", "online_accuracy", "loss_curve"}


def test_emulate_json_same_numbers_from_both_implementations(capsys):
    base = ["emulate", "--network", "mlp", "--schedule", "partime", "--devices", "4", "--samples", "120",
            "--dtype", "float64", "--json"]
    code, out_torch, _ = run_cli(capsys, *base, "--impl", "torch")
    code2, out_jax, _ = run_cli(capsys, *base, "--impl", "jax")
    assert code == code2 == 0
    (row_t,), (row_j,) = json.loads(out_torch), json.loads(out_jax)
    assert LEARN_KEYS <= row_t.keys() and len(row_t["loss_curve"]) == 100
    assert row_j["final_loss"] == pytest.approx(row_t["final_loss"], rel=1e-9)
    assert row_j["online_accuracy"] == row_t["online_accuracy"]


def test_emulate_seeds_and_gap_to_sequential(capsys, tmp_path, monkeypatch):
    from partime_sim import emulator_jax

    asked = []  # --workers reaches the sweep (the run and its sequential baseline)
    real = emulator_jax._config_chunks
    monkeypatch.setattr(emulator_jax, "_config_chunks", lambda C, workers=None: asked.append(workers) or real(C, workers))
    png = tmp_path / "learn.png"
    code, out, _ = run_cli(capsys, "emulate", "--network", "mlp", "--schedule", "1f1b", "--devices", "2",
                           "--samples", "80", "--seeds", "2", "--workers", "1", "--vs-sequential", "--json",
                           "--plot", str(png))
    assert code == 0 and asked == [1, 1]
    rows = json.loads(out)
    assert [r["seed"] for r in rows] == [0, 1]
    assert rows[0]["final_loss"] != rows[1]["final_loss"]  # other seed: other stream and weights
    assert rows[0]["loss_gap_last_10pct"] == pytest.approx(
        rows[0]["mean_loss_last_10pct"] - rows[0]["sequential"]["mean_loss_last_10pct"])
    assert png.stat().st_size > 1000


@pytest.mark.parametrize("flag, value, needle", [("--optimizer", "rmsprop", "rmsprop"),
                                                 ("--stream", "nosuchstream", "nosuchstream"),
                                                 ("--network", "resnet152", "resnet152")])
def test_emulate_bad_names_are_one_line_errors(capsys, flag, value, needle):
    argv = {"--network": "mlp", "--schedule": "partime", "--devices": "2", "--samples": "10"}
    argv[flag] = value
    code, _, err = run_cli(capsys, "emulate", *[a for kv in argv.items() for a in kv])
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1


def test_emulate_compensation_same_on_both_implementations(capsys):
    base = ["emulate", "--network", "mlp", "--schedule", "1f1b", "--devices", "4", "--samples", "100",
            "--optimizer", "adam", "--lr", "1e-3", "--compensation", "predict", "--dtype", "float64", "--json"]
    (row_j,) = json.loads(run_cli(capsys, *base)[1])
    (row_t,) = json.loads(run_cli(capsys, *base, "--impl", "torch")[1])
    assert row_j["delays"] == row_t["delays"] == [3, 2, 1, 0]
    assert row_j["final_loss"] == pytest.approx(row_t["final_loss"], rel=1e-9)
