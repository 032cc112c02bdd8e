"""Staleness derived by walking the IR: the known values of DESIGN.md, hand-built graphs whose
answer is worked out by hand, the derived values of zb-h1 and layerpipe, errors and the CLI."""

import json

import numpy as np
import pytest

from partime_sim.cli import main
from partime_sim.errors import ConfigError, ScheduleError
from partime_sim.generators import generate
from partime_sim.schedule import F, OPT, Schedule
from partime_sim.staleness import (SUMMARY_KEYS, TABLE_COLUMNS, staleness_summary, staleness_table,
                                   weight_versions)
from partime_sim.torch_import import from_pipeline_order

STAGES = (1, 2, 3, 4, 8)


def samples_for(S: int) -> int:
    return 8 * S + 16  # the CLI's default: a steady state dominates every stage


def column(summary: list[dict], key: str) -> list:
    return [row[key] for row in summary]


def descending(S: int, factor: int = 1) -> list[int]:
    return [factor * (S - 1 - k) for k in range(S)]


def grads(table):
    """The rows whose weight gradient an OPT applies (B, or BW of a split backward)."""
    return table[table["kind"].isin(["B", "BW"])]


# ---- known values (DESIGN.md "Staleness") -----------------------------------------------------


@pytest.mark.parametrize("name", ["partime", "partime-async"])
@pytest.mark.parametrize("S", STAGES)
def test_partime_gradient_is_s_minus_1_minus_k_ticks_old_and_2_s_minus_1_minus_k_samples_newer(name, S):
    sched = generate(name, S, samples_for(S))
    table = staleness_table(sched)
    k = table["stage"].to_numpy()
    # every backward task, warm-up and drain included, not just the summary
    assert (table["kind"] == "B").all()
    assert (table["weight_delay"] == 0).all()
    np.testing.assert_array_equal(table["gradient_age_ticks"], S - 1 - k)
    # in updates: one per tick, except that stage k makes none before its first backward, so its
    # j-th backward (sample 2(S-1-k)+j) has seen only min(j, S-1-k) of them since its loss
    j = table["sample"].to_numpy() - 2 * (S - 1 - k)
    np.testing.assert_array_equal(table["gradient_age"], np.minimum(j, S - 1 - k))
    np.testing.assert_array_equal(table["signal_mismatch"], 2 * (S - 1 - k))
    np.testing.assert_array_equal(table["signal_sample"], table["sample"] - 2 * (S - 1 - k))
    summary = staleness_summary(sched)
    assert column(summary, "weight_delay") == [0] * S
    assert column(summary, "gradient_age") == column(summary, "gradient_age_ticks") == descending(S)
    assert column(summary, "signal_mismatch") == descending(S, 2)
    assert column(summary, "first_backward_tick") == [2 * S - 2 - k for k in range(S)]  # the warm-up


@pytest.mark.parametrize("S", STAGES)
def test_1f1b_stage_k_has_weight_delay_s_minus_1_minus_k(S):
    sched = generate("1f1b", S, samples_for(S))
    table = staleness_table(sched)
    k, m = table["stage"].to_numpy(), table["sample"].to_numpy()
    # the first S-1-k microbatches of stage k are forwarded before any update: delay m (warm-up)
    np.testing.assert_array_equal(table["weight_delay"], np.minimum(m, S - 1 - k))
    assert (table["signal_mismatch"] == 0).all()
    # weight stashing matters exactly here: the backward runs on newer weights than its forward used
    np.testing.assert_array_equal(table["current_version"] - table["weight_version"], table["weight_delay"])
    summary = staleness_summary(sched)
    assert column(summary, "weight_delay") == descending(S)
    assert column(summary, "max_weight_delay") == descending(S)
    assert column(summary, "signal_mismatch") == [0] * S
    # on the unit-cost timeline the cotangent comes down one slot per stage while stage k updates
    # every other slot (F, B): floor((S-1-k)/2) of its updates fall between the loss and its B
    assert column(summary, "gradient_age_ticks") == descending(S)
    assert column(summary, "gradient_age") == [(S - 1 - k) // 2 for k in range(S)]


@pytest.mark.parametrize("microbatches", [None, 4])
@pytest.mark.parametrize("S", STAGES)
def test_gpipe_has_no_weight_delay_and_no_mismatch(S, microbatches):
    sched = generate("gpipe", S, samples_for(S), microbatches=microbatches)
    table = staleness_table(sched)
    assert (table["weight_delay"] == 0).all() and (table["signal_mismatch"] == 0).all()
    assert (table["gradient_age"] == 0).all()  # no update between a loss and its backprop
    # in ticks, the backward pass takes one unit slot per stage to come down
    np.testing.assert_array_equal(table["gradient_age_ticks"], S - 1 - table["stage"])
    # one OPT per minibatch, applied to the version every forward of the minibatch used
    minibatch = table["sample"] // (microbatches or samples_for(S))
    np.testing.assert_array_equal(table["weight_version"], minibatch)
    summary = staleness_summary(sched)
    assert column(summary, "weight_delay") == column(summary, "signal_mismatch") == [0] * S
    assert column(summary, "gradient_age") == [0] * S
    assert column(summary, "gradient_age_ticks") == descending(S)


@pytest.mark.parametrize("S", STAGES)
def test_sequential_is_plain_sgd(S):
    sched = generate("sequential", S, 12)
    table = staleness_table(sched)
    assert (table["weight_delay"] == 0).all() and (table["signal_mismatch"] == 0).all()
    assert (table["gradient_age"] == 0).all()
    np.testing.assert_array_equal(table["weight_version"], table["sample"])  # one update per sample
    summary = staleness_summary(sched)
    assert column(summary, "gradient_age") == [0] * S
    assert column(summary, "gradient_age_ticks") == descending(S)  # backprop latency, in slots


def test_weight_versions_count_the_stage_s_own_updates_in_lane_order():
    sched = generate("sequential", 3, 5)
    version = weight_versions(sched)
    fwd = sched.kind == F
    np.testing.assert_array_equal(version[fwd], sched.sample[fwd])  # F of sample m after m updates
    opt = sched.kind == OPT
    assert sorted(version[opt & (sched.stage == 1)]) == [0, 1, 2, 3, 4]  # each OPT updates from its version


# ---- derived values (DESIGN.md: "whatever the schedule implies") ------------------------------


@pytest.mark.parametrize("S", STAGES)
def test_zb_h1_is_synchronous_and_its_w_passes_lag(S):
    sched = generate("zb-h1", S, samples_for(S))
    table = staleness_table(sched)
    assert (grads(table)["weight_delay"] == 0).all()  # flushed: one update per minibatch
    assert table.loc[table["kind"] == "BI", "weight_delay"].isna().all()  # an input gradient is not applied
    assert (table["signal_mismatch"] == 0).all()
    assert (table["gradient_age"] == 0).all()  # flushed: no update between a loss and its backprop
    summary = staleness_summary(sched)
    assert column(summary, "weight_delay") == column(summary, "gradient_age") == [0] * S
    assert column(summary, "first_backward_tick") == [2 * S - 1 - k for k in range(S)]
    # the BW of stage k runs k steps after its BI (ZB-H1's deferred W), so its signal is older
    # than the plain backprop latency S-1-k: 2S-1 + k slots in the steady state
    assert column(summary, "gradient_age_ticks") == ([1] if S == 1 else [2 * S - 1 + k for k in range(S)])


def test_zb_h1_and_layerpipe_values_for_4_stages():
    """Pins the values the walker derives at S=4, 48 samples (reported in the issue)."""
    zb = staleness_summary(generate("zb-h1", 4, 48))
    assert [(r["weight_delay"], r["gradient_age"], r["gradient_age_ticks"], r["signal_mismatch"]) for r in zb] == \
        [(0, 0, 7, 0), (0, 0, 8, 0), (0, 0, 9, 0), (0, 0, 10, 0)]
    lp = staleness_summary(generate("layerpipe", 4, 48))
    assert [(r["weight_delay"], r["max_weight_delay"], r["gradient_age"], r["gradient_age_ticks"],
             r["signal_mismatch"]) for r in lp] == [(3, 3, 1, 4, 0), (2, 2, 1, 3, 0), (1, 1, 0, 2, 0), (0, 0, 0, 1, 0)]


@pytest.mark.parametrize("S", STAGES)
def test_layerpipe_has_1f1b_weight_delay_that_does_not_grow_with_the_stream(S):
    sched = generate("layerpipe", S, samples_for(S))
    table = staleness_table(sched)
    bw = grads(table)
    assert (bw["kind"] == "BW").all()
    k, m = bw["stage"].to_numpy(), bw["sample"].to_numpy()
    # stage k forwards sample m after m-(S-1-k) updates (its warm-up of S-k forwards, then one
    # update per BW before the next F) and applies its gradient after m: delay S-1-k, like 1F1B
    np.testing.assert_array_equal(bw["weight_delay"], np.minimum(m, S - 1 - k))
    assert (table["signal_mismatch"] == 0).all()
    # the BW runs right after its BI: one slot older signal; stage k updates every third slot
    # (F, BI, BW), so floor((S-k)/3) of its updates fall between the loss and the BW
    np.testing.assert_array_equal(table.loc[table["kind"] == "BI", "gradient_age_ticks"],
                                  S - 1 - table.loc[table["kind"] == "BI", "stage"])
    summary = staleness_summary(sched)
    assert column(summary, "weight_delay") == column(summary, "max_weight_delay") == descending(S)
    assert column(summary, "gradient_age_ticks") == [S - k for k in range(S)]
    assert column(summary, "gradient_age") == [(S - k) // 3 for k in range(S)]
    longer = staleness_summary(generate("layerpipe", S, 10 * samples_for(S)))
    assert longer == summary  # a steady state: the same values (maxima included) on a 10x longer stream


def test_layerpipe_with_one_stage_is_plain_sgd():
    table = staleness_table(generate("layerpipe", 1, 10))
    assert (table["weight_delay"].dropna() == 0).all() and (table["gradient_age"] == 0).all()
    np.testing.assert_array_equal(table["weight_version"], table["sample"])  # one update per sample


def test_an_imported_torch_order_gets_its_staleness_from_the_same_walk():
    order = {0: ["0F0", "0F1", None, "0B0", None, "0B1"], 1: [None, "1F0", "1B0", "1F1", "1B1", None]}
    sched = from_pipeline_order(order, num_stages=2, num_microbatches=2)
    table = staleness_table(sched)
    assert table[["stage", "sample", "tick"]].values.tolist() == [[1, 0, 2], [0, 0, 3], [1, 1, 4], [0, 1, 5]]
    assert table["gradient_age_ticks"].tolist() == [0, 1, 0, 1]
    assert (table["gradient_age"] == 0).all()  # no update before the end
    assert (table["weight_delay"] == 0).all()  # torch steps once, after the whole schedule


# ---- hand-built graphs: the dependency edge, not the sample index, carries the signal ----------

HAND = """
schedule hand train stages=2 samples=2 devices=2 partial_backward=1
tasks: 0F0@0:d0 0F1@1:d0 1F0@1:d1 1F1@2:d1 1B0@3:d1 1OPT@4:d1 0B1@4:d0 0OPT@5:d0 1B1@5:d1 1OPT@6:d1
1F0@1:d1 <- 0F0@0:d0
1F1@2:d1 <- 0F1@1:d0
1B0@3:d1 <- 1F0@1:d1
1OPT@4:d1 <- 1B0@3:d1
1B1@5:d1 <- 1F1@2:d1
1OPT@6:d1 <- 1B1@5:d1
0B1@4:d0 <- 0F1@1:d0 1B0@3:d1
0OPT@5:d0 <- 0B1@4:d0
"""


def test_hand_built_schedule_matches_the_values_worked_out_by_hand():
    # stage 1 forwards both samples before its first update (1F1 is stale by one update when
    # 1B1 is applied); stage 0 backprops sample 1 with the cotangent of sample 0
    table = staleness_table(Schedule.from_text(HAND).validate()).set_index(["stage", "sample"])
    # (stage 0 makes no update before 0B1, so its signal is one tick but no update old)
    expect = {  # weight_version, current_version, applied_version, weight_delay, signal_sample,
        #         age in updates, age in ticks, mismatch
        (1, 0): (0, 0, 0, 0, 0, 0, 0, 0),
        (1, 1): (0, 1, 1, 1, 1, 0, 0, 0),
        (0, 1): (0, 0, 0, 0, 0, 0, 1, 1),
    }
    cols = ["weight_version", "current_version", "applied_version", "weight_delay", "signal_sample",
            "gradient_age", "gradient_age_ticks", "signal_mismatch"]
    assert {key: tuple(int(v) for v in table.loc[key, cols]) for key in expect} == expect


def test_table_has_one_row_per_backward_task_and_the_documented_columns():
    sched = generate("zb-h1", 3, 6, microbatches=3)
    table = staleness_table(sched)
    assert tuple(table.columns) == TABLE_COLUMNS
    assert len(table) == 2 * 3 * 6  # a BI and a BW per (stage, sample)
    bw = table[table["kind"] == "BW"].set_index(["stage", "sample"])
    bi = table[table["kind"] == "BI"].set_index(["stage", "sample"])
    # a BW reuses the cotangent its BI consumed: same signal, later tick
    assert (bw["signal_sample"] == bi.loc[bw.index, "signal_sample"]).all()
    for age in ("gradient_age", "gradient_age_ticks"):
        assert (bw[age] >= bi.loc[bw.index, age]).all()
    assert all(tuple(r) == SUMMARY_KEYS for r in staleness_summary(sched))


def test_stages_that_never_get_a_gradient_report_none():
    summary = staleness_summary(generate("partime", 4, 1))  # one sample: only the last stage learns
    assert [r["weight_delay"] for r in summary] == [None, None, None, 0]
    assert [r["first_backward_tick"] for r in summary] == [None, None, None, 3]


# ---- errors -----------------------------------------------------------------------------------


def test_inference_schedule_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="staleness needs a training schedule; use --mode train"):
        staleness_table(generate("partime", 2, 4, mode="infer"))


def test_a_backward_without_its_cotangent_names_the_task():
    text = HAND.replace("0B1@4:d0 <- 0F1@1:d0 1B0@3:d1", "0B1@4:d0 <- 0F1@1:d0")
    with pytest.raises(ScheduleError, match=r"0B1@4:d0 has no cotangent.*B/BI of stage 1"):
        staleness_summary(Schedule.from_text(text))


def test_two_cotangents_are_refused():
    text = HAND.replace("0B1@4:d0 <- 0F1@1:d0 1B0@3:d1", "0B1@4:d0 <- 0F1@1:d0 1B0@3:d1 1B1@5:d1")
    text = text.replace("0B1@4:d0 0OPT@5:d0 1B1@5:d1 1OPT@6:d1", "1B1@5:d1 1OPT@6:d1 0B1@4:d0 0OPT@5:d0")
    with pytest.raises(ScheduleError, match="0B1@4:d0 has several cotangents"):
        staleness_table(Schedule.from_text(text))


# ---- CLI --------------------------------------------------------------------------------------


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json_gives_the_steady_state_per_stage(capsys):
    code, out, err = run_cli(capsys, "staleness", "--schedule", "partime", "--devices", "4", "--json")
    assert code == 0 and err == ""
    report = json.loads(out)
    assert set(report) == {"schedule", "devices", "stages"}
    assert report["schedule"] == "partime" and report["devices"] == 4
    assert [(s["stage"], s["weight_delay"], s["gradient_age"], s["signal_mismatch"]) for s in report["stages"]] == \
        [(0, 0, 3, 6), (1, 0, 2, 4), (2, 0, 1, 2), (3, 0, 0, 0)]
    code, out, _ = run_cli(capsys, "staleness", "--schedule", "pipedream", "--devices", "3", "--json")
    assert [(s["weight_delay"], s["gradient_age"], s["signal_mismatch"]) for s in json.loads(out)["stages"]] == \
        [(2, 1, 0), (1, 0, 0), (0, 0, 0)]
    for name in ("gpipe", "sequential", "zb-h1"):  # synchronous: every key zero, ages in ticks aside
        code, out, _ = run_cli(capsys, "staleness", "--schedule", name, "--devices", "4", "--json")
        stages = json.loads(out)["stages"]
        assert [(s["weight_delay"], s["gradient_age"], s["signal_mismatch"]) for s in stages] == [(0, 0, 0)] * 4
    code, out, _ = run_cli(capsys, "staleness", "--schedule", "partime-async", "--devices", "4", "--json")
    assert [s["gradient_age"] for s in json.loads(out)["stages"]] == [3, 2, 1, 0]


def test_cli_table_and_options(capsys):
    code, out, _ = run_cli(capsys, "staleness", "--schedule", "gpipe", "--devices", "2", "--microbatches", "4")
    assert code == 0
    lines = out.splitlines()
    assert "32 samples" in lines[0]  # default 8*2+16
    assert lines[1].split()[:4] == ["stage", "weight_delay", "gradient_age", "signal_mismatch"]
    assert lines[1].split()[4] == "gradient_age_ticks"
    assert [line.split()[:5] for line in lines[2:]] == [["0", "0", "0", "0", "1"], ["1", "0", "0", "0", "0"]]


def test_cli_errors_are_one_line_with_exit_2(capsys, tmp_path):
    code, out, err = run_cli(capsys, "staleness", "--schedule", "nope", "--devices", "2")
    assert code == 2 and out == "" and err.count("\n") == 1 and "'nope' is unknown" in err
    code, text, _ = run_cli(capsys, "schedule", "--schedule", "partime", "--devices", "2", "--mode", "infer")
    path = tmp_path / "infer.txt"
    path.write_text(text)
    code, out, err = run_cli(capsys, "staleness", "--schedule", str(path), "--devices", "2")
    assert code == 2 and "use --mode train" in err and err.count("\n") == 1
