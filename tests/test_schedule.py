"""The IR itself: building, validation errors, lane order, text form (hand-made schedules)."""

import numpy as np
import pytest

from partime_sim.errors import ScheduleError
from partime_sim.schedule import B, BARRIER, F, OPT, Schedule


def _pipeline(rows, deps, mode="infer", stages=2, samples=2, **kw):
    """rows: (stage, kind, sample, tick, device) in table order; deps: (src_row, dst_row)."""
    st, kd, sm, tk, dv = (list(c) for c in zip(*rows))
    src = [d[0] for d in deps]
    dst = [d[1] for d in deps]
    return Schedule.build("hand", mode, stages, samples, 2, dict(stage=st, kind=kd, sample=sm, tick=tk, device=dv),
                          src, dst, **kw)


def _two_stage_infer():
    rows = [(0, F, 0, 0, 0), (0, F, 1, 1, 0), (1, F, 0, 1, 1), (1, F, 1, 2, 1)]
    return _pipeline(rows, [(0, 2), (1, 3)])


def test_build_computes_waves_and_keeps_lane_order():
    s = _two_stage_infer().validate()
    assert s.wave.tolist() == [0, 1, 1, 2]
    # table reordered by wave; each device's tasks keep their order
    assert [s.task_label(i) for i in range(len(s))] == ["0F0@0:d0", "0F1@1:d0", "1F0@1:d1", "1F1@2:d1"]
    assert s.lane_prev.tolist() == [-1, 0, -1, 2]


def test_text_form_round_trips_exactly():
    s = _two_stage_infer()
    text = s.to_text()
    assert "1F0@1:d1 <- 0F0@0:d0" in text
    assert Schedule.from_text(text).same_as(s)


def test_text_form_with_global_barrier_and_opt():
    rows = [(0, F, 0, 0, 0), (-1, BARRIER, -1, 0, -1), (1, F, 0, 1, 1), (1, B, 0, 1, 1), (1, OPT, -1, 1, 1),
            (0, B, 0, 2, 0), (0, OPT, -1, 2, 0)]
    s = _pipeline(rows, [(0, 1), (1, 2), (0, 2), (2, 3), (3, 4), (3, 5), (0, 5), (5, 6)], mode="train", samples=1)
    s.validate()
    back = Schedule.from_text(s.to_text())
    assert back.same_as(s)
    assert "BARRIER@0" in s.to_text() and "1OPT@1:d1" in s.to_text()


def test_cycle_is_rejected():
    rows = [(0, F, 0, 0, 0), (1, F, 0, 1, 1)]
    with pytest.raises(ScheduleError, match="cycle"):
        _pipeline(rows, [(0, 1), (1, 0)], samples=1)


def test_lane_order_against_dependencies_is_a_deadlock():
    # device 1 issues sample 1 before sample 0, but stage 0 sends sample 0 first and then
    # waits... here stage 0 sample 1 depends on stage 1 sample 0, closing the loop.
    rows = [(0, F, 0, 0, 0), (1, F, 1, 1, 1), (1, F, 0, 2, 1), (0, F, 1, 3, 0)]
    with pytest.raises(ScheduleError, match="deadlock"):
        _pipeline(rows, [(0, 2), (3, 1), (2, 3)])


def test_missing_forward_is_rejected():
    rows = [(0, F, 0, 0, 0), (1, F, 0, 1, 1), (0, F, 1, 1, 0)]
    s = _pipeline(rows, [(0, 1)])
    with pytest.raises(ScheduleError, match="stage 1 sample 1 has 0 F"):
        s.validate()


def test_forward_without_data_dependency_is_rejected():
    rows = [(0, F, 0, 0, 0), (1, F, 0, 1, 1), (0, F, 1, 1, 0), (1, F, 1, 2, 1)]
    s = _pipeline(rows, [(0, 1)])
    with pytest.raises(ScheduleError, match="does not depend on the forward of stage 0"):
        s.validate()


def test_missing_backward_in_training_is_rejected_unless_partial():
    rows = [(0, F, 0, 0, 0), (1, F, 0, 1, 1), (1, B, 0, 2, 1)]
    deps = [(0, 1), (1, 2)]
    with pytest.raises(ScheduleError, match="backward"):
        _pipeline(rows, deps, mode="train", samples=1).validate()
    _pipeline(rows, deps, mode="train", samples=1, partial_backward=True).validate()


def test_backward_in_inference_is_rejected():
    rows = [(0, F, 0, 0, 0), (0, B, 0, 1, 0)]
    with pytest.raises(ScheduleError, match="mode='train'"):
        _pipeline(rows, [(0, 1)], stages=1, samples=1).validate()


def test_wave_that_does_not_respect_a_dependency_is_rejected():
    s = _two_stage_infer()
    bad = Schedule.build("hand", "infer", 2, 2, 2, dict(stage=s.stage, kind=s.kind, sample=s.sample, tick=s.tick,
                         device=s.device, wave=np.zeros(len(s))), s.dep_src, s.dep_dst)
    with pytest.raises(ScheduleError, match="does not go forward"):
        bad.validate()


@pytest.mark.parametrize(
    "text, message",
    [
        ("nonsense", "must start with"),
        ("schedule x infer stages=1 samples=1 devices=1\ntasks: 0Q0@0:d0\n", "cannot parse task '0Q0@0:d0'"),
        ("schedule x infer stages=1 samples=1 devices=1\ntasks: 0F0@0:d0\n0F0@0:d0 <- 9F9@9\n", "not in the 'tasks:'"),
        ("schedule x infer stages=1 samples=1\ntasks: 0F0@0:d0\n", "devices="),
        ("schedule x fly stages=1 samples=1 devices=1\ntasks: 0F0@0:d0\n", "mode='fly'"),
    ],
)
def test_bad_text_gives_a_clear_error(text, message):
    with pytest.raises(ScheduleError, match=message):
        Schedule.from_text(text)
