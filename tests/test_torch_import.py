"""Import of torch.distributed.pipelining schedules (torch is installed: nothing is skipped)."""

import subprocess
import sys

import numpy as np
import pytest

from partime_sim.errors import ConfigError, ScheduleError
from partime_sim.generators import generate
from partime_sim.schedule import B, BI, BW, F, KINDS, OPT, Schedule
from partime_sim.torch_import import from_pipeline_order, import_torch_schedule, torch_schedule_names


def per_stage(s: Schedule, stage: int) -> list[str]:
    return [f"{KINDS[s.kind[i]]}{'' if s.sample[i] < 0 else s.sample[i]}" for i in np.flatnonzero(s.stage == stage)]


def test_text_actions_become_tasks_ticks_and_data_flow():
    order = {0: ["0F0", "0F1", None, "0SEND_F1", "0B0", "0B1", "0REDUCE_GRAD"],
             1: [None, "1F0", "1F1", "1B0", "1B1"]}
    s = from_pipeline_order(order, num_stages=2, num_microbatches=2)
    assert s.mode == "train" and s.num_devices == 2
    assert per_stage(s, 0) == ["F0", "F1", "B0", "B1", "OPT"]
    assert per_stage(s, 1) == ["F0", "F1", "B0", "B1", "OPT"]
    lab = {s.task_label(i): i for i in range(len(s))}
    assert lab["1F1@2:d1"] in range(len(s))  # tick = the time step of the action
    deps = {s.task_label(d): {s.task_label(x) for x in s.dep_src[s.dep_dst == d]} for d in set(s.dep_dst.tolist())}
    assert deps["1F0@1:d1"] == {"0F0@0:d0"}
    assert deps["0B1@5:d0"] == {"0F1@1:d0", "1B1@4:d1"}
    assert deps["0OPT@5:d0"] == {"0B0@4:d0", "0B1@5:d0"}
    assert Schedule.from_text(s.to_text()).same_as(s)


def test_overlapped_actions_run_one_after_the_other():
    # two stages on one rank (V shape), torch's text form of OVERLAP_F_B
    order = {0: ["0F0", "1F0", "(0F1;1B0)OVERLAP_F_B", "0B0", "1F1", "1B1", "0B1"]}
    s = from_pipeline_order(order, 2, 2)
    assert s.num_devices == 1
    assert [s.task_label(i) for i in range(len(s)) if s.tick[i] == 2] == ["0F1@2:d0", "1B0@2:d0"]
    assert per_stage(s, 1) == ["F0", "B0", "F1", "B1", "OPT"]


def test_forward_only_order_is_inference():
    s = from_pipeline_order({0: ["0F0", "0F1"], 1: [None, "1F0", "1F1"]}, 2, 2)
    assert s.mode == "infer" and not np.any(s.kind == OPT)


@pytest.mark.parametrize(
    "order, stage_to_rank, message",
    [
        ({0: ["0F0", "0X0"]}, None, "cannot read torch action '0X0'"),
        ({0: ["0F0", "0F5"]}, None, "microbatch 5"),
        ({0: ["0F0", "0F1"], 1: ["0F2"]}, None, "stage 0 runs on rank 0 but belongs to rank 1"),
        ({0: ["0F0", "0F1", "0F2"]}, {0: 1}, "belongs to rank 1"),
        ({0: [None, None]}, None, "no compute action"),
    ],
)
def test_bad_orders_are_rejected(order, stage_to_rank, message):
    with pytest.raises(ScheduleError, match=message):
        from_pipeline_order(order, 1, 3, stage_to_rank)


def test_deadlocking_order_is_rejected():
    # rank 1 starts with microbatch 1, which rank 0 only sends after 0B0, which needs 1B0: a cycle
    order = {0: ["0F0", "0B0", "0F1", "0B1"], 1: ["1F1", "1F0", "1B0", "1B1"]}
    with pytest.raises(ScheduleError, match="cycle or a deadlocking"):
        from_pipeline_order(order, 2, 2)


def test_gpipe_import_equals_the_gpipe_generator():
    s = import_torch_schedule("GPipe", 4, 8)
    ours = generate("gpipe", 4, 8)
    assert s.name == "torch-GPipe" and s.num_devices == 4
    for k in range(4):
        assert per_stage(s, k) == per_stage(ours, k)


MULTI = ["Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV"]


@pytest.mark.parametrize("name", MULTI)
@pytest.mark.parametrize("stages, microbatches", [(4, 4), (8, 8), (8, 16)])
def test_multi_stage_schedules_import_and_validate(name, stages, microbatches):
    s = import_torch_schedule(name, stages, microbatches)
    s.validate()
    assert s.num_devices == stages // 2 and s.mode == "train"
    assert np.count_nonzero(s.kind == F) == stages * microbatches
    fused, split_i, split_w = (np.count_nonzero(s.kind == k) for k in (B, BI, BW))
    assert fused + split_i == stages * microbatches and split_i == split_w
    if "ZeroBubble" in name:
        assert fused == 0 and split_i == stages * microbatches
    assert np.count_nonzero(s.kind == OPT) == stages  # one synchronous update per stage
    ranks = s.params["stage_to_rank"]
    if name in ("ZBVZeroBubble", "DualPipeV"):  # V placement: stage s and S-1-s share a rank
        assert all(ranks[k] == ranks[stages - 1 - k] for k in range(stages))
    else:
        assert ranks == [k % (stages // 2) for k in range(stages)]


def test_1f1b_import_or_the_known_torch_defect():
    try:
        s = import_torch_schedule("1F1B", 4, 8)
    except ConfigError as exc:  # torch 2.13: the last rank's published order runs F1..F8
        assert "inconsistent pipeline_order" in str(exc) and "3F8" in str(exc)
    else:
        for k in range(4):
            assert [t for t in per_stage(s, k) if t != "OPT"] == [t for t in per_stage(generate("1f1b", 4, 8), k)
                                                                 if t != "OPT"]


def test_unknown_or_refused_torch_schedules_give_config_errors():
    assert {"GPipe", "Interleaved1F1B", "ZBVZeroBubble"} <= set(torch_schedule_names())
    with pytest.raises(ConfigError, match="torch schedule 'Nope' is unknown; use one of .*Interleaved1F1B"):
        import_torch_schedule("Nope", 4, 4)
    with pytest.raises(ConfigError, match="DualPipeV refuses 8 stages x 2 microbatches"):
        import_torch_schedule("DualPipeV", 8, 2)
    with pytest.raises(ConfigError, match="stages_per_rank"):
        import_torch_schedule("LoopedBFS", 5, 4)
    assert import_torch_schedule("ScheduleLoopedBFS", 6, 3, stages_per_rank=3).num_devices == 2


def test_core_modules_do_not_import_torch():
    code = "import sys, partime_sim.generators, partime_sim.torch_import; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
