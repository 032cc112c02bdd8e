"""Closed-form results the simulator must reproduce (uniform network, ideal links), through
the public path: generator -> partitioner -> engine -> one metrics function."""

import pytest

from partime_sim.study import StudyConfig, run_study

REL = 1e-12  # float sums of 1 ms costs; the closed forms are exact in rationals


def study(schedule, stages, samples, mode="train", microbatches=None, engine="fast", layers=None):
    cfg = StudyConfig(f"uniform:{layers or 2 * stages}", schedule, stages, samples=samples, mode=mode,
                      microbatches=microbatches, engine=engine)
    return run_study(cfg).summary


@pytest.mark.parametrize("engine", ["fast", "des"])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("stages, microbatches", [(2, 1), (4, 8), (8, 8), (5, 13)])
def test_bubble_fraction_of_gpipe_and_1f1b(schedule, stages, microbatches, engine):
    row = study(schedule, stages, microbatches, microbatches=microbatches, engine=engine)
    expected = (stages - 1) / (microbatches + stages - 1)
    assert row["bubble_fraction"] == pytest.approx(expected, rel=REL, abs=1e-15)


@pytest.mark.parametrize("stages, microbatches", [(2, 4), (4, 8), (8, 16), (6, 6)])
def test_zero_bubble_h1_has_one_third_of_1f1b_bubble_time(stages, microbatches):
    def bubble_time(schedule):
        row = study(schedule, stages, microbatches, microbatches=microbatches)
        return row["bubble_fraction"] * row["makespan_s"] * row["devices"]

    assert bubble_time("zb-h1") == pytest.approx(bubble_time("1f1b") / 3, rel=1e-9)


@pytest.mark.parametrize("engine", ["fast", "des"])
@pytest.mark.parametrize("stages, samples", [(1, 10), (2, 7), (4, 100), (16, 50), (64, 64)])
def test_partime_inference_speedup(stages, samples, engine):
    row = study("partime", stages, samples, mode="infer", engine=engine, layers=stages * 2)
    assert row["speedup"] == pytest.approx(stages * samples / (samples + stages - 1), rel=REL)
    assert row["efficiency"] == pytest.approx(row["speedup"] / stages, rel=REL)


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_sequential_speedup_is_one(mode):
    row = study("sequential", 4, 20, mode=mode)
    assert row["speedup"] == pytest.approx(1.0, rel=REL)
    assert row["devices"] == 1


def test_partime_training_makespan_follows_the_warm_up_rule():
    # 3 layers per stage: F = 3 ms, F+BI+BW = 9 ms. Ticks 0..S-2 only forward (no gradient has
    # reached any stage yet); from tick S-1 the last stage does F+B, and every tick until the
    # drain ends has some stage doing F+B: makespan = 3(S-1) + 9N ms.
    stages, samples = 4, 100
    row = study("partime", stages, samples, layers=stages * 3)
    assert row["makespan_s"] == pytest.approx(((stages - 1) * 3 + samples * 9) * 1e-3, rel=REL)
