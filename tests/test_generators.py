"""Schedule generators: validity for every size (hypothesis), exact orders on small pinned
cases, and the closed-form timings, checked with a tiny longest-path oracle written here (it
does not use the package's engines)."""

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import partime_sim.schedule as schedule_module
from partime_sim.errors import ConfigError
from partime_sim.generators import SCHEDULES, _partime, generate
from partime_sim.schedule import B, BARRIER, BI, BW, F, KINDS, OPT, Schedule

NAMES = list(SCHEDULES)


def oracle(s: Schedule, cost: dict[str, int]):
    """Start/end of every task: each lane runs its tasks in table order; a task starts when its
    lane predecessor and all its dependencies have ended. Returns (end, busy per device)."""
    deps: dict[int, list[int]] = {}
    for a, b in zip(s.dep_src.tolist(), s.dep_dst.tolist()):
        deps.setdefault(b, []).append(a)
    end: list[Fraction | None] = [None] * len(s)
    lane_free: dict[tuple[int, int], Fraction] = {}
    busy: dict[int, Fraction] = {}
    for i in range(len(s)):
        dev, lane, dur = int(s.device[i]), int(s.lane[i]), Fraction(cost[KINDS[s.kind[i]]])
        start = lane_free.get((dev, lane), Fraction(0)) if dev >= 0 else Fraction(0)
        for j in deps.get(i, []):
            assert end[j] is not None, "a dependency comes later in the table"
            start = max(start, end[j])
        end[i] = start + dur
        if dev >= 0:
            lane_free[(dev, lane)] = end[i]
            busy[dev] = busy.get(dev, Fraction(0)) + dur
    return end, busy


UNIFORM = {"F": 1, "B": 2, "BI": 1, "BW": 1, "OPT": 0, "BARRIER": 0}


def makespan_and_busy(s: Schedule, cost=UNIFORM):
    end, busy = oracle(s, cost)
    return max(end), busy


def idle_per_device(s: Schedule, cost=UNIFORM) -> list[Fraction]:
    makespan, busy = makespan_and_busy(s, cost)
    return [makespan - busy.get(d, 0) for d in range(s.num_devices)]


def tasks(s: Schedule, stage: int | None = None, device: int | None = None) -> list[str]:
    sel = np.ones(len(s), dtype=bool)
    if stage is not None:
        sel &= s.stage == stage
    if device is not None:
        sel &= s.device == device
    return [f"{KINDS[s.kind[i]]}{'' if s.sample[i] < 0 else s.sample[i]}" for i in np.flatnonzero(sel)]


def deps_of(s: Schedule, i: int) -> list[int]:
    return s.dep_src[s.dep_dst == i].tolist()


def find(s: Schedule, stage: int, kind: int, sample: int = -1, tick: int | None = None) -> int:
    sel = (s.stage == stage) & (s.kind == kind) & (s.sample == sample)
    if tick is not None:
        sel &= s.tick == tick
    (idx,) = np.flatnonzero(sel)
    return int(idx)


# ---- every generator, every size -----------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=30, deadline=None)
@given(stages=st.integers(1, 64), samples=st.integers(1, 64), mb=st.none() | st.integers(1, 64),
       mode=st.sampled_from(["train", "infer"]))
def test_every_generator_validates(name, stages, samples, mb, mode):
    s = generate(name, stages, samples, mode, microbatches=mb)
    s.validate()
    assert (s.num_stages, s.num_samples, s.mode) == (stages, samples, mode)
    assert np.count_nonzero(s.kind == F) == stages * samples
    if mode == "infer":
        assert set(s.kind.tolist()) <= {F, BARRIER}
    elif name not in ("partime", "partime-async"):
        assert np.count_nonzero(np.isin(s.kind, (B, BI))) == stages * samples


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mode", ["train", "infer"])
@pytest.mark.parametrize("stages, samples, mb", [(1, 1, None), (3, 5, 2), (4, 4, None), (2, 7, 3)])
def test_text_form_round_trips(name, mode, stages, samples, mb):
    s = generate(name, stages, samples, mode, microbatches=mb)
    assert Schedule.from_text(s.to_text()).same_as(s)


@pytest.mark.parametrize("name", NAMES)
def test_generators_give_waves_themselves(name, monkeypatch):
    def refuse(*_):
        raise AssertionError("Schedule.build computed the waves")

    monkeypatch.setattr(schedule_module, "_compute_waves", refuse)
    generate(name, 5, 9, "train", microbatches=4).validate()
    generate(name, 5, 9, "infer").validate()


@pytest.mark.parametrize("name", NAMES)
def test_generators_are_pure(name):
    assert generate(name, 4, 6, microbatches=2).same_as(generate(name, 4, 6, microbatches=2))


@pytest.mark.parametrize("name", [n for n in NAMES if n != "sequential"])
def test_stage_k_runs_on_devices_k(name):
    s = generate(name, 3, 4, devices=[2, 0, 5])
    assert s.num_devices == 6
    on = s.stage >= 0
    assert np.array_equal(s.device[on], np.array([2, 0, 5])[s.stage[on]])


def test_sequential_runs_everything_on_device_zero_in_order():
    s = generate("sequential", 3, 2)
    assert s.num_devices == 1 and np.all(s.device == 0)
    assert tasks(s) == ["F0", "F0", "F0", "B0", "OPT", "B0", "OPT", "B0", "OPT"] * 1 + [
        "F1", "F1", "F1", "B1", "OPT", "B1", "OPT", "B1", "OPT"]
    assert s.stage[:9].tolist() == [0, 1, 2, 2, 2, 1, 1, 0, 0]


def test_alias_pipedream_is_1f1b():
    assert generate("pipedream", 4, 6).same_as(generate("1f1b", 4, 6))


# ---- pinned orders ---------------------------------------------------------------------------
def test_1f1b_warm_up_then_one_backward_one_forward():
    s = generate("1f1b", 4, 6)
    assert tasks(s, stage=0) == ["F0", "F1", "F2", "F3", "B0", "OPT", "F4", "B1", "OPT", "F5",
                                 "B2", "OPT", "B3", "OPT", "B4", "OPT", "B5", "OPT"]
    assert tasks(s, stage=3) == ["F0", "B0", "OPT", "F1", "B1", "OPT", "F2", "B2", "OPT", "F3",
                                 "B3", "OPT", "F4", "B4", "OPT", "F5", "B5", "OPT"]
    # fewer samples than stages: min(S-k, N) warm-up forwards
    assert tasks(generate("1f1b", 4, 2), stage=0) == ["F0", "F1", "B0", "OPT", "B1", "OPT"]


def test_gpipe_fills_drains_and_flushes_per_minibatch():
    s = generate("gpipe", 2, 5, microbatches=2)
    assert tasks(s, stage=0) == ["F0", "F1", "B0", "B1", "OPT", "F2", "F3", "B2", "B3", "OPT", "F4", "B4", "OPT"]
    assert s.params["microbatches"] == 2
    opts = np.flatnonzero((s.kind == OPT) & (s.stage == 1))
    assert [sorted(s.sample[deps_of(s, i)].tolist()) for i in opts] == [[0, 1], [2, 3], [4]]


def test_zb_h1_order():
    # ZB-H1 (Qi et al. 2024, Fig. 3), 4 stages, 8 microbatches, 0-based (their B = BI, W = BW):
    # 1F1B's warm-up, then stage k lags its W passes k steps and ends with k+1 of them
    s = generate("zb-h1", 4, 8)
    first = tasks(s, stage=0)
    last = tasks(s, stage=3)
    assert first == ["F0", "F1", "F2", "F3", "BI0", "BW0", "F4", "BI1", "BW1", "F5", "BI2", "BW2", "F6",
                     "BI3", "BW3", "F7", "BI4", "BW4", "BI5", "BW5", "BI6", "BW6", "BI7", "BW7", "OPT"]
    assert last == ["F0", "BI0", "F1", "BI1", "F2", "BI2", "F3", "BI3", "BW0", "F4", "BI4", "BW1", "F5",
                    "BI5", "BW2", "F6", "BI6", "BW3", "F7", "BI7", "BW4", "BW5", "BW6", "BW7", "OPT"]


def test_split_backward_dependencies():
    s = generate("zb-h1", 3, 4)
    bi = find(s, 1, BI, 2)
    assert sorted(deps_of(s, bi)) == sorted([find(s, 1, F, 2), find(s, 2, BI, 2)])
    assert deps_of(s, find(s, 1, BW, 2)) == [bi]


def test_layerpipe_is_1f1b_with_the_backward_split_bi_first():
    s = generate("layerpipe", 4, 6)
    # min(S-k, N) warm-up forwards, then BI, BW (same microbatch, before the next F), OPT
    assert tasks(s, stage=0) == ["F0", "F1", "F2", "F3", "BI0", "BW0", "OPT", "F4", "BI1", "BW1", "OPT", "F5",
                                 "BI2", "BW2", "OPT", "BI3", "BW3", "OPT", "BI4", "BW4", "OPT", "BI5", "BW5", "OPT"]
    assert tasks(s, stage=3) == ["F0", "BI0", "BW0", "OPT", "F1", "BI1", "BW1", "OPT", "F2", "BI2", "BW2", "OPT",
                                 "F3", "BI3", "BW3", "OPT", "F4", "BI4", "BW4", "OPT", "F5", "BI5", "BW5", "OPT"]
    assert tasks(generate("layerpipe", 4, 2), stage=0) == ["F0", "F1", "BI0", "BW0", "OPT", "BI1", "BW1", "OPT"]
    # 1F1B's order exactly, with every B split into BI, BW
    for k in range(4):
        split = [t.replace("B", "BI", 1) + " " + t.replace("B", "BW", 1) if t.startswith("B") else t
                 for t in tasks(generate("1f1b", 4, 6), stage=k)]
        assert " ".join(split).split() == tasks(s, stage=k)


def test_layerpipe_sends_the_input_gradient_upstream_after_bi():
    s = generate("layerpipe", 3, 5)
    bi = find(s, 1, BI, 2)
    # the upstream stage waits for BI only, never for a BW; each BW is applied by its own OPT
    assert sorted(deps_of(s, bi)) == sorted([find(s, 1, F, 2), find(s, 2, BI, 2)])
    bw = find(s, 1, BW, 2)
    assert deps_of(s, bw) == [bi]
    for k in range(3):
        opts = np.flatnonzero((s.kind == OPT) & (s.stage == k))
        assert [s.sample[deps_of(s, i)].tolist() for i in opts] == [[m] for m in range(5)]


def test_layerpipe_with_one_stage_is_sequential_with_the_backward_split():
    lp = generate("layerpipe", 1, 4)
    seq = [t for x in tasks(generate("sequential", 1, 4)) for t in ((x.replace("B", "BI"), x.replace("B", "BW"))
                                                                      if x.startswith("B") else (x,))]
    assert tasks(lp) == seq == ["F0", "BI0", "BW0", "OPT", "F1", "BI1", "BW1", "OPT", "F2", "BI2", "BW2", "OPT",
                                "F3", "BI3", "BW3", "OPT"]


# ---- partime ---------------------------------------------------------------------------------
@pytest.mark.parametrize("S, N", [(1, 5), (2, 3), (3, 8), (4, 4), (5, 20), (6, 3)])
def test_partime_backward_uses_the_cotangent_of_the_previous_tick(S, N):
    s = generate("partime", S, N)
    for k in range(S):
        back = np.flatnonzero((s.kind == B) & (s.stage == k))
        # stage k differentiates exactly the samples 2(S-1-k)..N-1, on the activation of that tick
        assert s.sample[back].tolist() == list(range(2 * (S - 1 - k), N))
        assert np.array_equal(s.tick[back], s.sample[back] + k)
        for i in back:
            t = int(s.tick[i])
            expected = {find(s, k, F, t - k, tick=t)}
            if k < S - 1:
                expected.add(find(s, k + 1, B, t - k - 2, tick=t - 1))  # B(k+1) at tick t-1
            assert set(deps_of(s, i)) == expected
            assert deps_of(s, find(s, k, OPT, tick=t)) == [i]  # the update applies this backward
    assert s.partial_backward


@pytest.mark.parametrize("name", ["partime", "partime-async"])
@pytest.mark.parametrize("mode", ["train", "infer"])
@pytest.mark.parametrize("S, N", [(1, 9), (2, 9), (3, 12), (4, 30), (5, 9), (7, 7)])
def test_partime_steady_ticks_written_by_shifting_equal_tick_by_tick(name, mode, S, N):
    dev = np.arange(S, dtype=np.int32)
    fast = _partime(name, S, N, mode, dev, barrier=name == "partime", partial=True)
    slow = _partime(name, S, N, mode, dev, barrier=name == "partime", partial=True, fast=False)
    assert fast.same_as(slow)


def test_partime_lockstep_barriers():
    S, N = 3, 5
    s = generate("partime", S, N)
    bars = np.flatnonzero(s.kind == BARRIER)
    assert s.tick[bars].tolist() == list(range(N + S - 1)) and np.all(s.device[bars] == -1)
    assert np.all(s.stage[bars] == -1) and np.all(s.sample[bars] == -1)
    f = np.flatnonzero(s.kind == F)
    assert np.array_equal(s.tick[f], s.stage[f] + s.sample[f])
    for i in f:  # every forward after tick 0 waits for the previous tick's barrier
        t = int(s.tick[i])
        if t:
            assert find(s, -1, BARRIER, tick=t - 1) in deps_of(s, i)
    async_ = generate("partime-async", S, N)
    assert not np.any(async_.kind == BARRIER)
    keep = s.kind != BARRIER
    for c in ("stage", "kind", "sample", "tick", "device"):
        assert np.array_equal(getattr(s, c)[keep], getattr(async_, c))


def test_partime_drops_warm_up_backwards_and_stops_at_the_last_loss():
    s = generate("partime", 4, 3)
    assert s.tick.max() == 3 + 4 - 2
    # N=3 < 2(S-1): only the last two stages ever get a gradient
    assert sorted(set(s.stage[s.kind == B].tolist())) == [2, 3]


# ---- closed-form timings (oracle) --------------------------------------------------------------
@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("S, M", [(1, 4), (2, 1), (4, 8), (8, 8), (5, 13), (6, 3)])
def test_bubble_fraction_of_gpipe_and_1f1b(name, S, M):
    s = generate(name, S, M, microbatches=M)
    makespan, busy = makespan_and_busy(s)
    bubble = 1 - sum(busy.values()) / (S * makespan)
    assert bubble == Fraction(S - 1, M + S - 1)


@pytest.mark.parametrize("S, M", [(1, 3), (2, 4), (4, 8), (8, 16), (6, 6), (5, 11)])
def test_zero_bubble_h1_idles_a_third_of_1f1b(S, M):
    zb = idle_per_device(generate("zb-h1", S, M, microbatches=M))
    f1b1 = idle_per_device(generate("1f1b", S, M))
    assert zb == [S - 1] * S  # (S-1)(T_F + T_BI - T_W)
    assert f1b1 == [3 * (S - 1)] * S  # (S-1)(T_F + T_BI + T_W)


@pytest.mark.parametrize("cost", [dict(F=2, BI=2, BW=1), dict(F=3, BI=2, BW=1), dict(F=1, BI=2, BW=1)])
def test_zero_bubble_h1_idle_for_unequal_costs(cost):
    S, M = 4, 9
    idle = idle_per_device(generate("zb-h1", S, M), {**UNIFORM, **cost})
    assert idle == [(S - 1) * (cost["F"] + cost["BI"] - cost["BW"])] * S


def test_zero_bubble_h1_flushes_between_minibatches():
    S, M = 4, 8
    one = makespan_and_busy(generate("zb-h1", S, M))[0]
    assert makespan_and_busy(generate("zb-h1", S, 3 * M, microbatches=M))[0] == 3 * one


@pytest.mark.parametrize("S, N", [(1, 5), (2, 8), (4, 8), (4, 32), (8, 64), (5, 3)])
def test_layerpipe_idles_less_than_1f1b(S, N):
    # 1F1B idles (S-1)(T_F + T_BI + T_BW) per device; LayerPipe sends the gradient upstream
    # after BI, so its fill/drain critical path loses the BWs: (S-1)(T_F + T_BI)
    lp, f1b1 = generate("layerpipe", S, N), generate("1f1b", S, N)
    assert idle_per_device(lp) == [2 * (S - 1)] * S
    assert idle_per_device(f1b1) == [3 * (S - 1)] * S
    assert makespan_and_busy(lp)[0] == 3 * N + 2 * (S - 1) <= makespan_and_busy(f1b1)[0]


@pytest.mark.parametrize("cost", [dict(F=2, BI=2, BW=1), dict(F=3, BI=2, BW=1), dict(F=1, BI=2, BW=1),
                                  dict(F=1, BI=1, BW=3)])
def test_layerpipe_idle_for_unequal_costs(cost):
    S, N = 4, 9
    cost = {**UNIFORM, **cost, "B": cost["BI"] + cost["BW"]}
    assert idle_per_device(generate("layerpipe", S, N), cost) == [(S - 1) * (cost["F"] + cost["BI"])] * S
    assert idle_per_device(generate("1f1b", S, N), cost) == [(S - 1) * (cost["F"] + cost["B"])] * S


@pytest.mark.parametrize("name", ["partime", "partime-async"])
@pytest.mark.parametrize("S, N", [(1, 10), (2, 7), (4, 100), (16, 50), (64, 64)])
def test_partime_inference_speedup(name, S, N):
    par = makespan_and_busy(generate(name, S, N, "infer"))[0]
    seq = makespan_and_busy(generate("sequential", S, N, "infer"))[0]
    assert par == N + S - 1
    assert seq / par == Fraction(S * N, N + S - 1)


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_sequential_speedup_is_one(mode):
    s = generate("sequential", 4, 20, mode)
    makespan, busy = makespan_and_busy(s)
    assert makespan == sum(busy.values()) == 20 * 4 * (1 if mode == "infer" else 3)


@pytest.mark.parametrize("name", ["partime", "partime-async"])
@pytest.mark.parametrize("S, N", [(1, 5), (4, 100), (5, 7)])
def test_partime_training_makespan(name, S, N):
    # ticks 0..S-2 only forward; then every tick until the drain ends has some stage doing F+B
    assert makespan_and_busy(generate(name, S, N))[0] == (S - 1) * 1 + N * 3


# ---- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        (("nope", 2, 2), {}, "schedule 'nope' is unknown; use one of sequential, partime"),
        (("gpipe", 0, 2), {}, "num_stages=0"),
        (("gpipe", 2, 0), {}, "num_samples=0"),
        (("gpipe", 2.5, 2), {}, "num_stages=2.5"),
        (("gpipe", 2, 2, "fly"), {}, "mode='fly'"),
        (("gpipe", 2, 2), {"microbatches": 0}, "microbatches=0"),
        (("1f1b", 2, 2), {"devices": [0]}, "one integer device per stage"),
        (("1f1b", 2, 2), {"devices": [1, 1]}, "distinct"),
        (("sequential", 2, 2), {"devices": [0, 1]}, "drop devices="),
    ],
)
def test_bad_input_gives_a_clear_config_error(args, kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        generate(*args, **kwargs)
