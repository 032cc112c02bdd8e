"""Torch reference emulator: transparency (pipelined == unpipelined where the rule says so),
hand-computed staleness, every generator, errors. float64 and exact equality where claimed."""

from __future__ import annotations

import copy
from fractions import Fraction

import numpy as np
from hand_partime import partime_two_linear_stages
import pytest
import torch
from torch import nn

from partime_sim.emulator_torch import emulate_torch
from partime_sim.errors import ConfigError, ScheduleError
from partime_sim.generators import SCHEDULES, generate
from partime_sim.optimizers import OptimizerSpec
from partime_sim.schedule import B, BI, BW, F, KINDS, OPT, Schedule
from partime_sim.torch_import import from_pipeline_order

F64 = torch.float64
OPTIMIZERS = [OptimizerSpec("sgd", lr=0.05), OptimizerSpec("momentum", lr=0.02, momentum=0.9),
              OptimizerSpec("adam", lr=0.003)]


def mlp(dims=(6, 12, 10, 8, 3), seed=0) -> nn.Sequential:
    """Linear+ReLU blocks (no ReLU after the last Linear), float64, seeded."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).to(F64)


def split(model: nn.Sequential, S: int) -> list[nn.Sequential]:
    """S contiguous stages, each starting at a Linear layer (blocks of Linear[+ReLU])."""
    starts = [i for i, m in enumerate(model) if isinstance(m, nn.Linear)]
    assert S <= len(starts)
    cuts = [starts[round(j * len(starts) / S)] for j in range(S)] + [len(model)]
    return [model[a:b] for a, b in zip(cuts, cuts[1:])]


def stream(n=40, d=6, classes=3, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)), rng.integers(0, classes, n)


def flat(state: list[dict]) -> list[torch.Tensor]:
    return [t for sd in state for t in sd.values()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b))


def run(name, S, model, x, y, opt, **kw):
    sched = generate(name, S, len(x), microbatches=kw.pop("microbatches", None))
    return emulate_torch(sched, split(model, S), x, y, optimizer=opt, dtype=F64, **kw)


# ---- transparency --------------------------------------------------------------------------
@pytest.mark.parametrize("opt", OPTIMIZERS, ids=lambda o: o.name)
def test_partime_with_one_stage_is_sequential_exactly(opt):
    x, y = stream()
    a = run("partime", 1, mlp(), x, y, opt)
    b = run("sequential", 1, mlp(), x, y, opt)
    assert np.array_equal(a.loss, b.loss) and np.array_equal(a.correct, b.correct)
    assert same(flat(a.final_state), flat(b.final_state))


def train_unsplit(model: nn.Sequential, x, y, opt: OptimizerSpec, minibatch: int):
    """Plain torch minibatch training of the whole model with ONE optimizer: per-sample losses
    backpropagated one by one (torch accumulates .grad in sample order), then .grad /= batch
    size (the mean loss), then step. Returns the per-sample losses and the final weights."""
    model = copy.deepcopy(model)
    params = list(model.parameters())
    if opt.name == "adam":
        o = torch.optim.Adam(params, lr=opt.lr, betas=opt.betas, eps=opt.eps)
    else:
        o = torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum if opt.name == "momentum" else 0.0)
    losses = []
    for lo in range(0, len(x), minibatch):
        idx = range(lo, min(lo + minibatch, len(x)))
        for m in idx:
            loss = nn.functional.cross_entropy(model(torch.as_tensor(x[m:m + 1])), torch.as_tensor(y[m:m + 1]))
            losses.append(loss.item())
            loss.backward()
        for p in params:
            p.grad /= len(idx)
        o.step()
        o.zero_grad()
    return np.array(losses), [p.detach() for p in params]


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=lambda o: o.name)
@pytest.mark.parametrize("S", [1, 3, 4])
def test_sequential_equals_unsplit_per_sample_training_exactly(opt, S):
    x, y = stream()
    res = run("sequential", S, mlp(), x, y, opt)
    losses, weights = train_unsplit(mlp(), x, y, opt, minibatch=1)
    assert np.array_equal(res.loss, losses)
    assert same(flat(res.final_state), weights)


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=lambda o: o.name)
@pytest.mark.parametrize("S,M", [(2, 4), (4, 5)])
def test_gpipe_and_zb_h1_equal_minibatch_training_exactly(opt, S, M):
    x, y = stream(n=23)  # the last minibatch is smaller: its mean is over its own size
    losses, weights = train_unsplit(mlp(), x, y, opt, minibatch=M)
    for name in ("gpipe", "zb-h1"):  # zb-h1's BI/BW split accumulates in the same microbatch order
        res = run(name, S, mlp(), x, y, opt, microbatches=M)
        assert np.array_equal(res.loss, losses), name
        assert same(flat(res.final_state), weights), name


def test_gpipe_matches_a_batched_forward_to_rounding():
    """The usual way to write minibatch SGD (one forward of the whole minibatch, mean loss) sums
    the per-sample gradients inside the matmuls instead of one after the other: equal to 1e-12."""
    x, y = stream(n=24)
    M, opt = 6, OptimizerSpec("sgd", lr=0.1)
    res = run("gpipe", 3, mlp(), x, y, opt, microbatches=M)
    model = mlp()
    o = torch.optim.SGD(model.parameters(), lr=opt.lr)
    for lo in range(0, len(x), M):
        loss = nn.functional.cross_entropy(model(torch.as_tensor(x[lo:lo + M])), torch.as_tensor(y[lo:lo + M]))
        o.zero_grad()
        loss.backward()
        o.step()
    for got, want in zip(flat(res.final_state), model.parameters()):
        torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)


def test_imported_torch_schedule_runs_like_the_generated_one():
    """The interpreter is generic: a torch.distributed.pipelining order (GPipe, one optimizer
    step at the end) gives what ``gpipe`` with one minibatch gives."""
    order = {0: ["0F0", "0F1", "0F2", None, None, None, "0B0", "0B1", "0B2"],
             1: [None, "1F0", "1F1", "1F2", "1B0", "1B1", "1B2"]}
    imported = from_pipeline_order(order, num_stages=2, num_microbatches=3)
    x, y = stream(n=3)
    opt = OptimizerSpec("adam", lr=0.01)
    a = emulate_torch(imported, split(mlp(), 2), x, y, optimizer=opt)
    b = run("gpipe", 2, mlp(), x, y, opt)
    assert np.array_equal(a.loss, b.loss) and same(flat(a.final_state), flat(b.final_state))


def split_backwards(s: Schedule) -> Schedule:
    """The same schedule with every fused B(k, m) replaced by BI(k, m) then BW(k, m) on its lane:
    edges into B go into BI, B's input gradient leaves from BI, the OPT reads the BW."""
    is_b = s.kind == B
    new = np.arange(len(s)) + np.cumsum(is_b) - is_b  # where each old task lands
    n = len(s) + int(is_b.sum())
    cols = {}
    for c in ("stage", "kind", "sample", "tick", "device", "lane"):
        col = np.empty(n, dtype=getattr(s, c).dtype)
        col[new] = getattr(s, c)
        col[new[is_b] + 1] = getattr(s, c)[is_b]
        cols[c] = col
    cols["kind"][new[is_b]] = BI
    cols["kind"][new[is_b] + 1] = BW
    src = new[s.dep_src] + (is_b[s.dep_src] & (s.kind[s.dep_dst] == OPT))
    src = np.r_[src, new[is_b]]
    dst = np.r_[new[s.dep_dst], new[is_b] + 1]
    return Schedule.build(s.name + "-split", s.mode, s.num_stages, s.num_samples, s.num_devices, cols, src, dst,
                          partial_backward=s.partial_backward).validate()


@pytest.mark.parametrize("stash", [True, False])
@pytest.mark.parametrize("name", ["1f1b", "partime"])
def test_split_backward_equals_fused_backward_exactly(name, stash):
    x, y = stream(n=20)
    fused = generate(name, 3, 20)
    split_sched = split_backwards(fused)
    assert (split_sched.kind == BW).sum() == (fused.kind == B).sum() > 0
    opt = OptimizerSpec("adam", lr=0.01)
    a = emulate_torch(fused, split(mlp(), 3), x, y, optimizer=opt, stash_weights=stash)
    b = emulate_torch(split_sched, split(mlp(), 3), x, y, optimizer=opt, stash_weights=stash)
    assert np.array_equal(a.loss, b.loss) and same(flat(a.final_state), flat(b.final_state))


# ---- hand-computed staleness ---------------------------------------------------------------
def scalar_linear(w: float) -> nn.Linear:
    lin = nn.Linear(1, 1, bias=False).to(F64)
    with torch.no_grad():
        lin.weight.fill_(w)
    return lin


# dyadic data and weights: every product below is exact in float64, so Fraction arithmetic is
# the float arithmetic and the comparisons can be exact whatever order torch multiplies in
XS = [Fraction(1), Fraction(1, 2), Fraction(-1), Fraction(3, 2)]
YS = [Fraction(1, 4), Fraction(1), Fraction(-1, 2), Fraction(0)]
LR = Fraction(1, 8)


def test_partime_two_stages_hand_computed_ticks():
    """PARTIME, S = 2 linear stages o = w1 * (w0 * x), MSE. Tick t: stage 0 runs F on x_t and,
    from tick 2, B on that same activation with the input gradient stage 1 made at tick t-1
    (sample t-2's); stage 1 runs F and B on sample t-1. Both update at the end of the tick."""
    losses, w0, w1 = partime_two_linear_stages(XS, YS, LR, Fraction(1, 2), Fraction(3, 4))
    N, S = len(XS), 2
    sched = generate("partime", S, N)
    res = emulate_torch(sched, [scalar_linear(0.5), scalar_linear(0.75)], np.array(XS, float)[:, None],
                        np.array(YS, float), loss="mse", optimizer=OptimizerSpec("sgd", lr=float(LR)))
    assert res.loss.tolist() == [float(v) for v in losses]
    assert res.final_state[0]["weight"].item() == float(w0)
    assert res.final_state[1]["weight"].item() == float(w1)
    assert res.updates.tolist() == [N - 2, N]  # stage 0 never sees a gradient for samples 0 and 1


@pytest.mark.parametrize("stash", [True, False])
def test_1f1b_two_stages_hand_computed_with_and_without_stashing(stash):
    """1F1B, S = 2: stage 0 = two scalar linear layers (a, b), stage 1 = one (c), MSE.
    Stage 0 runs F0 F1 B0 OPT F2 B1 OPT B2 OPT: B1 must use the weights F1 saw (version 0)
    though version 1 is current; without stashing it uses version 1."""
    sched = generate("1f1b", 2, 3)
    order = [f"{KINDS[sched.kind[i]]}{max(sched.sample[i], 0)}" for i in np.flatnonzero(sched.stage == 0)]
    assert order == ["F0", "F1", "B0", "OPT0", "F2", "B1", "OPT0", "B2", "OPT0"]
    x, y = XS[:3], YS[:3]
    a, b, c = [Fraction(1, 2)], [Fraction(-3, 4)], Fraction(1, 4)  # a[v], b[v]: stage 0 version v
    losses, g_z = [], []
    for m in range(3):  # stage 1 has no delay: F, B, OPT per sample with its current c
        fv = [0, 0, 1][m]  # the version stage 0's F(m) read: F0, F1 before any update, F2 after B0's
        z = b[fv] * (a[fv] * x[m])
        o = c * z
        losses.append((o - y[m]) ** 2)
        g = 2 * (o - y[m])
        g_z.append(g * c)
        c = c - LR * g * z
        bv = fv if stash else m  # B(m) runs at version m
        h = a[bv] * x[m]
        a.append(a[m] - LR * g_z[m] * b[bv] * x[m])
        b.append(b[m] - LR * g_z[m] * h)
    stage0 = nn.Sequential(scalar_linear(0.5), scalar_linear(-0.75))
    res = emulate_torch(sched, [stage0, scalar_linear(0.25)], np.array(x, float)[:, None], np.array(y, float),
                        loss="mse", optimizer=OptimizerSpec("sgd", lr=float(LR)), stash_weights=stash)
    assert res.loss.tolist() == [float(v) for v in losses]
    assert res.final_state[0]["0.weight"].item() == float(a[3])
    assert res.final_state[0]["1.weight"].item() == float(b[3])
    assert res.final_state[1]["weight"].item() == float(c)
    back = np.flatnonzero((sched.stage == 0) & (sched.kind == B))
    assert res.task_version[back].tolist() == ([0, 0, 1] if stash else [0, 1, 2])


@pytest.mark.parametrize("S", [2, 4])
def test_1f1b_backward_uses_the_forward_version_and_stashing_matters(S):
    x, y = stream(n=30)
    opt = OptimizerSpec("sgd", lr=0.1)
    sched = generate("1f1b", S, len(x))
    on = emulate_torch(sched, split(mlp(), S), x, y, optimizer=opt)
    off = emulate_torch(sched, split(mlp(), S), x, y, optimizer=opt, stash_weights=False)
    assert not np.array_equal(on.loss, off.loss)
    is_f, is_b = sched.kind == F, sched.kind == B
    fv = np.full((S, len(x)), -1)
    fv[sched.stage[is_f], sched.sample[is_f]] = on.task_version[is_f]
    bi = np.flatnonzero(is_b)
    assert np.array_equal(on.task_version[bi], fv[sched.stage[bi], sched.sample[bi]])
    # without stashing the backward reads the current version: S-1-k updates newer in steady state
    late = bi[sched.sample[bi] >= S]
    delay = off.task_version[late] - fv[sched.stage[late], sched.sample[late]]
    assert np.array_equal(delay, S - 1 - sched.stage[late])


# ---- every generator -----------------------------------------------------------------------
@pytest.mark.parametrize("S", [1, 2, 4])
def test_every_generator_runs_and_partime_async_equals_partime(S):
    x, y = stream(n=50)
    opt = OptimizerSpec("momentum", lr=0.02)
    results = {name: run(name, S, mlp(), x, y, opt, microbatches=5) for name in SCHEDULES}
    for name, res in results.items():
        assert np.isfinite(res.loss).all() and res.loss.shape == (50,), name
        assert 0.0 <= res.online_accuracy <= 1.0
    a, b = results["partime"], results["partime-async"]
    assert np.array_equal(a.loss, b.loss) and same(flat(a.final_state), flat(b.final_state))
    assert np.array_equal(results["pipedream"].loss, results["1f1b"].loss)
    # layerpipe's IR is 1F1B's order with each B split into BI, BW (same deps): same learning rule
    c, d = results["layerpipe"], results["1f1b"]
    assert np.array_equal(c.loss, d.loss) and same(flat(c.final_state), flat(d.final_state))
    if S == 1:  # one stage: no pipeline, no staleness
        for name in ("partime", "1f1b", "layerpipe"):
            assert np.array_equal(results[name].loss, results["sequential"].loss), name


def test_memory_stays_bounded_on_long_streams():
    peaks = []
    for n in (30, 120):
        x, y = stream(n=n)
        peaks.append(run("partime", 4, mlp(), x, y, OptimizerSpec()).peak_stored)
    assert peaks[0] == peaks[1] <= 2 * 4


def test_learning_happens_on_a_smooth_stream():
    """A camera-like stream: the class stays for 20 samples, each sample its class prototype
    plus noise. The last 20% is fitted far better than the first 20%, sequentially and through
    PARTIME's 4-stage pipeline (whose stale signal comes from a neighbouring, similar sample)."""
    rng = np.random.default_rng(3)
    n = 600
    labels = np.repeat(rng.integers(0, 3, n // 20), 20)
    x = rng.standard_normal((3, 6))[labels] + 0.5 * rng.standard_normal((n, 6))
    k = n // 5
    for name in ("sequential", "partime"):
        res = run(name, 4, mlp(), x, labels, OptimizerSpec("sgd", lr=0.05))
        assert res.loss[-k:].mean() < 0.2 * res.loss[:k].mean(), name
        assert res.correct[-k:].mean() > 0.9, name


def test_inference_schedule_records_losses_and_updates_nothing():
    x, y = stream(n=10)
    model = mlp()
    res = emulate_torch(generate("partime", 3, 10, mode="infer"), split(model, 3), x, y)
    assert same(flat(res.final_state), [p.detach() for p in model.parameters()])
    with torch.no_grad():
        want = [nn.functional.cross_entropy(model(torch.as_tensor(x[m:m + 1])), torch.as_tensor(y[m:m + 1])).item()
                for m in range(10)]
    assert res.loss.tolist() == want and res.updates.tolist() == [0, 0, 0]


def test_callers_modules_untouched_and_float32_runs():
    x, y = stream(n=12)
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    res = run("1f1b", 2, model, x, y, OptimizerSpec("adam", lr=0.01))
    assert same([p.detach() for p in model.parameters()], before)
    r32 = emulate_torch(generate("1f1b", 2, 12), split(model, 2), x.astype(np.float32), y, dtype="float32")
    assert r32.final_state[0]["0.weight"].dtype == torch.float32
    np.testing.assert_allclose(r32.loss[0], res.loss[0], rtol=1e-5)


def test_mse_regression_and_loss_curve():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 6))
    y = x[:, :3] * 0.5  # float targets: MSE, no accuracy
    res = run("partime", 2, mlp(), x, y, OptimizerSpec("sgd", lr=0.05))
    assert res.correct is None and res.online_accuracy is None
    centres, means = res.loss_curve(points=4)
    assert centres.tolist() == [4.5, 14.5, 24.5, 34.5]
    np.testing.assert_allclose(means, res.loss.reshape(4, 10).mean(axis=1), rtol=1e-15)
    assert res.loss_curve(points=1000)[1].size == 40


# ---- errors --------------------------------------------------------------------------------
def test_errors_name_the_value_and_the_fix():
    x, y = stream(n=8)
    sched = generate("partime", 2, 8)
    stages = split(mlp(), 2)
    with pytest.raises(ConfigError, match="3 stage modules.*2 stages"):
        emulate_torch(sched, split(mlp(), 3), x, y)
    with pytest.raises(ConfigError, match="x has 5 samples.*needs 8"):
        emulate_torch(sched, stages, x[:5], y)
    with pytest.raises(ConfigError, match="loss='hinge' is unknown"):
        emulate_torch(sched, stages, x, y, loss="hinge")
    with pytest.raises(ConfigError, match="integer class labels"):
        emulate_torch(sched, stages, x, y.astype(float), loss="cross_entropy")
    with pytest.raises(ConfigError, match="labels span 0..7.*3 outputs"):
        emulate_torch(sched, stages, x, np.arange(8))
    with pytest.raises(ConfigError, match="dtype=.*unsupported"):
        emulate_torch(sched, stages, x, y, dtype=torch.float16)
    with pytest.raises(ConfigError, match="optimizer 'rmsprop' is unknown"):
        OptimizerSpec("rmsprop")
    with pytest.raises(ConfigError, match="lr=-1"):
        OptimizerSpec("sgd", lr=-1)
    with pytest.raises(ConfigError, match="microbatch_size=4"):
        mb = Schedule.build(sched.name, sched.mode, 2, 8, 2, {c: getattr(sched, c) for c in
                            ("stage", "kind", "sample", "tick", "device", "lane", "wave")},
                            sched.dep_src, sched.dep_dst, partial_backward=True, params={"microbatch_size": 4})
        emulate_torch(mb, stages, x, y)


def test_shape_mismatch_between_stages_names_the_stage():
    x, y = stream(n=4)
    bad = [nn.Linear(6, 5), nn.Linear(7, 3)]
    with pytest.raises(ConfigError, match=r"stage 1 cannot take an input of shape \(1, 5\) \(stage 0's output"):
        emulate_torch(generate("sequential", 2, 4), bad, x, y)


def test_divergence_stops_with_the_sample_and_the_learning_rate():
    x, _ = stream(n=200)
    message = r"loss of sample \d+ is (nan|inf) at task 1F\d+.*lower the learning rate \(lr=10"
    with pytest.raises(ConfigError, match=message):
        run("sequential", 2, mlp(), x, x[:, :3], OptimizerSpec("sgd", lr=10.0))


def test_opt_without_a_gradient_is_a_schedule_error():
    text = ("schedule broken train stages=1 samples=1 devices=1\n"
            "tasks: 0F0@0:d0 0OPT@1:d0 0B0@2:d0 0OPT@3:d0\n"
            "0B0@2:d0 <- 0F0@0:d0\n0OPT@3:d0 <- 0B0@2:d0\n")
    x, y = stream(n=1)
    with pytest.raises(ScheduleError, match="0OPT@1.*no backward"):
        emulate_torch(Schedule.from_text(text), [mlp()], x, y)


# ---- the catalogue's trainable networks and built-in streams --------------------------------
def test_catalogue_mlp_on_the_shapes_stream_is_transparent_and_lenet_runs():
    from partime_sim.models import build_torch_model, split_stages
    from partime_sim.partition import Partition
    from partime_sim.streams import make_stream

    st = make_stream("shapes", 30, (32,), 10, seed=0).astype(np.float64)
    opt = OptimizerSpec("momentum", lr=0.01)
    model = build_torch_model("mlp", seed=0, dtype="float64")
    stages = split_stages(model, Partition.from_sizes([2, 3, 1, 2], 8))
    res = emulate_torch(generate("sequential", 4, 30), stages, st.x, st.y, optimizer=opt)
    losses, weights = train_unsplit(model, st.x, st.y, opt, minibatch=1)
    assert np.array_equal(res.loss, losses) and same(flat(res.final_state), weights)

    frames = make_stream("shapes", 6, (3, 32, 32), 10, seed=0).astype(np.float64)
    lenet = build_torch_model("lenet", seed=0, dtype="float64")
    for name in ("partime", "1f1b"):
        res = emulate_torch(generate(name, 3, 6), split_stages(lenet, Partition.from_sizes([2, 2, 3], 7)),
                            frames.x, frames.y, optimizer=opt)
        assert np.isfinite(res.loss).all() and res.updates.min() >= 1, name
