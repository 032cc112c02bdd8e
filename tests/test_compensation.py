"""Staleness compensation in the torch reference emulator: each method's rule checked by hand in
exact (dyadic) arithmetic, no-ops where nothing is stale, the derived delays, the CLI, and the
claim: on a smooth stream with S = 8 a method measurably closes the loss gap to sequential."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
from hand_partime import partime_two_linear_stages
import pytest
import torch
from torch import nn

from partime_sim.compensation import COMPENSATIONS, compensation_plan, stage_delays
from partime_sim.emulator_torch import emulate_torch
from partime_sim.errors import ConfigError
from partime_sim.generators import generate
from partime_sim.optimizers import OptimizerSpec
from partime_sim.schedule import B, F
from partime_sim.staleness import staleness_summary

F64 = torch.float64
METHODS = [m for m in COMPENSATIONS if m != "none"]
XS = [Fraction(1), Fraction(1, 2), Fraction(-1), Fraction(3, 2), Fraction(1, 2)]
YS = [Fraction(1, 4), Fraction(1), Fraction(-1, 2), Fraction(0), Fraction(1, 2)]
LR = Fraction(1, 8)


def mlp(seed: int = 0, dims=(6, 12, 10, 8, 3)) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(dims) - 2 else [])
    return nn.Sequential(*layers).to(F64)


def split(model: nn.Sequential, S: int) -> list[nn.Sequential]:
    starts = [i for i, m in enumerate(model) if isinstance(m, nn.Linear)]
    cuts = [starts[round(j * len(starts) / S)] for j in range(S)] + [len(model)]
    return [model[a:b] for a, b in zip(cuts, cuts[1:])]


def stream(n: int = 40, seed: int = 1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 6)), rng.integers(0, 3, n)


def run(name: str, S: int, method: str, opt: OptimizerSpec, n: int = 40, **kw):
    x, y = stream(n)
    sched = generate(name, S, n, microbatches=kw.pop("microbatches", None))
    return emulate_torch(sched, split(mlp(), S), x, y, optimizer=opt, dtype=F64, compensation=method, **kw)


def identical(a, b) -> bool:
    wa = [t for sd in a.final_state for t in sd.values()]
    wb = [t for sd in b.final_state for t in sd.values()]
    return np.array_equal(a.loss, b.loss) and all(torch.equal(u, v) for u, v in zip(wa, wb))


def scalar_linear(w: Fraction) -> nn.Linear:
    lin = nn.Linear(1, 1, bias=False).to(F64)
    with torch.no_grad():
        lin.weight.fill_(float(w))
    return lin


OPTS = [OptimizerSpec("sgd", lr=0.05), OptimizerSpec("momentum", lr=0.02), OptimizerSpec("adam", lr=0.003)]


# ---- the rules, by hand ----------------------------------------------------------------------
@pytest.mark.parametrize("method", ["none", "stash", "pipemare", "predict", "ema"])
def test_1f1b_two_stages_hand_computed_per_method(method):
    """1F1B, S = 2, stage 0 = scalar layers (a, b), stage 1 = c, MSE, SGD; d = (1, 0).
    Stage 0's F(m) reads version max(0, m-1); its B(m) runs at version m. Exact rational
    arithmetic below; after a few steps the products need more than float64's 53 bits, hence the
    1e-12 tolerance (any other rule is off by far more)."""
    N = 5
    a, b, c = [Fraction(1, 2)], [Fraction(-3, 4)], Fraction(1, 4)  # a[v], b[v]: live version v
    ema = [(a[0], b[0])]  # the moving average after v updates (beta = d/(1+d) = 1/2)
    lr0 = LR / 2 if method == "pipemare" else LR  # lr / (1 + d_0)
    losses = []
    for m in range(N):
        v = max(0, m - 1)
        if method == "predict" and v >= 1:  # w + d (w - w_prev), d = 1
            fa, fb = a[v] + (a[v] - a[v - 1]), b[v] + (b[v] - b[v - 1])
        else:
            fa, fb = a[v], b[v]
        z = fb * (fa * XS[m])
        o = c * z
        losses.append((o - YS[m]) ** 2)
        g = 2 * (o - YS[m])
        g_z = g * c
        c = c - LR * g * z  # stage 1: d = 0, untouched by every method
        ba, bb = ema[m] if method == "ema" else (fa, fb)  # the weights B(m) differentiates at
        a.append(a[m] - lr0 * g_z * bb * XS[m])
        b.append(b[m] - lr0 * g_z * (ba * XS[m]))
        ema.append((ema[m][0] / 2 + a[m + 1] / 2, ema[m][1] / 2 + b[m + 1] / 2))
    sched = generate("1f1b", 2, N)
    res = emulate_torch(sched, [nn.Sequential(scalar_linear(a[0]), scalar_linear(b[0])), scalar_linear(Fraction(1, 4))],
                        np.array(XS, float)[:, None], np.array(YS, float), loss="mse",
                        optimizer=OptimizerSpec("sgd", lr=float(LR)), compensation=method)
    exact = pytest.approx([float(v) for v in losses + [a[N], b[N], c]], rel=1e-12, abs=0)
    got = res.loss.tolist() + [res.final_state[0]["0.weight"].item(), res.final_state[0]["1.weight"].item(),
                               res.final_state[1]["weight"].item()]
    assert got == exact
    assert res.compensation == method
    assert (res.delays is None) if method == "none" else res.delays.tolist() == [1, 0]


def test_partime_stash_pairs_the_signal_with_its_own_forward_by_hand():
    """PARTIME, S = 2 linear stages, MSE. Without compensation stage 0's B at tick t takes sample
    t's input with sample (t-2)'s signal; with 'stash' it differentiates F(0, t-2): input
    x[t-2] at the weights that forward read (version t-2 - 0, i.e. two updates old)."""
    losses, w0, w1 = partime_two_linear_stages(XS, YS, LR, Fraction(1, 2), Fraction(3, 4), stash_input=True)
    N, S = len(XS), 2
    sched = generate("partime", S, N)
    res = emulate_torch(sched, [scalar_linear(Fraction(1, 2)), scalar_linear(Fraction(3, 4))],
                        np.array(XS, float)[:, None], np.array(YS, float), loss="mse",
                        optimizer=OptimizerSpec("sgd", lr=float(LR)), compensation="stash")
    assert res.loss.tolist() == [float(v) for v in losses]
    assert res.final_state[0]["weight"].item() == float(w0)
    assert res.final_state[1]["weight"].item() == float(w1)
    assert res.delays.tolist() == [1, 0]


def test_partime_stash_uses_the_signal_samples_forward_version():
    S, n = 4, 40
    sched = generate("partime", S, n)
    none = run("partime", S, "none", OPTS[0], n)
    res = run("partime", S, "stash", OPTS[0], n)
    is_f, back = sched.kind == F, np.flatnonzero(sched.kind == B)
    fv = np.full((S, n), -1)
    fv[sched.stage[is_f], sched.sample[is_f]] = res.task_version[is_f]
    k, m = sched.stage[back], sched.sample[back]
    sigma = m - 2 * (S - 1 - k)  # PARTIME's signal sample
    assert np.array_equal(res.task_version[back], fv[k, sigma])
    assert np.array_equal(none.task_version[back], fv[k, m])  # natural: its own forward's
    late = (m >= 4 * S)  # steady state: the signal's forward is 2(S-1-k) updates older
    assert np.array_equal(fv[k, m][late] - res.task_version[back][late], 2 * (S - 1 - k[late]))


# ---- where nothing is stale, nothing changes; where something is, every method acts ------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("opt", OPTS, ids=lambda o: o.name)
def test_every_method_is_exactly_a_noop_without_delay(method, opt):
    for name, S, kw in (("partime", 1, {}), ("sequential", 3, {}), ("gpipe", 3, {"microbatches": 5}),
                        ("1f1b", 1, {})):
        res = run(name, S, method, opt, **dict(kw))
        assert identical(res, run(name, S, "none", opt, **dict(kw))), (name, S)
        assert res.delays.tolist() == [0] * S


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["partime", "1f1b", "layerpipe"])
def test_every_method_changes_a_delayed_run(method, name):
    opt = OPTS[1]
    res, base = run(name, 3, method, opt), run(name, 3, "none", opt)
    if method == "stash" and name != "partime":  # activation and signal already match: no-op
        assert identical(res, base)
    else:
        assert not np.array_equal(res.loss, base.loss)
        assert np.isfinite(res.loss).all()


@pytest.mark.parametrize("method", METHODS)
def test_split_backward_gives_the_fused_result_under_every_method(method):
    """layerpipe is 1f1b's order with each B split into BI then BW, and the same delays: every
    method must treat the split pair as the fused backward (a BW reuses its BI's weights)."""
    a, b = run("layerpipe", 4, method, OPTS[2]), run("1f1b", 4, method, OPTS[2])
    assert identical(a, b) and a.delays.tolist() == b.delays.tolist() == [3, 2, 1, 0]


def test_none_is_the_default_bit_for_bit():
    x, y = stream()
    for name in ("partime", "1f1b"):
        sched = generate(name, 3, len(x))
        a = emulate_torch(sched, split(mlp(), 3), x, y, optimizer=OPTS[2])
        b = emulate_torch(sched, split(mlp(), 3), x, y, optimizer=OPTS[2], compensation="none")
        assert identical(a, b) and a.delays is None and a.compensation == "none"


@pytest.mark.parametrize("name", ["partime", "partime-async", "1f1b", "layerpipe", "gpipe", "zb-h1"])
def test_delays_are_the_derived_staleness(name):
    S = 4
    sched = generate(name, S, 48, microbatches=8)
    want = [max(r["weight_delay"], r["gradient_age"]) for r in staleness_summary(sched)]
    assert stage_delays(sched).tolist() == want
    flushed = name in ("gpipe", "zb-h1")
    assert want == ([0] * S if flushed else [S - 1 - k for k in range(S)])
    assert compensation_plan(sched, "pipemare").lr_divisor.tolist() == [1.0 + d for d in want]
    x, y = stream(48)
    res = emulate_torch(sched, split(mlp(), S), x, y, optimizer=OPTS[0], compensation="predict")
    assert res.delays.tolist() == want


def test_errors_name_the_value_and_the_fix():
    with pytest.raises(ConfigError, match="compensation 'pipemaer' is unknown; use one of none, stash"):
        run("partime", 2, "pipemaer", OPTS[0])
    with pytest.raises(ConfigError, match="contradicts stash_weights=False"):
        run("partime", 2, "stash", OPTS[0], stash_weights=False)


def test_cli_flag_runs_the_torch_emulator_and_reports_the_delays(capsys):
    import json

    from partime_sim.cli import main

    base = ["emulate", "--network", "mlp", "--schedule", "1f1b", "--devices", "4", "--samples", "60",
            "--impl", "torch", "--json"]
    assert main(base) == 0
    plain = json.loads(capsys.readouterr().out)[0]
    assert main(base + ["--compensation", "pipemare"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert row["compensation"] == "pipemare" and row["delays"] == [3, 2, 1, 0]
    assert row["loss_curve"] != plain["loss_curve"] and plain["compensation"] == "none"
    assert main(base + ["--compensation", "nope"]) == 2
    assert "compensation 'nope' is unknown" in capsys.readouterr().err


# ---- the claim: a method closes the gap to sequential on a smooth stream, S = 8 ----------------
@pytest.fixture
def one_thread():
    """Many tiny ops: one intra-op thread is as fast and does not thrash on a busy CI machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_a_method_closes_most_of_the_gap_to_sequential_on_the_shapes_stream_with_8_stages(one_thread):
    """Catalogue mlp (8 layers, even partition, 8 stages), the smooth ``shapes`` stream, Adam
    lr 1e-3, float32, 3 seeds, mean loss over the last half of the stream. Staleness costs a lot
    here (SGD and momentum barely suffer on this stream; see the report), and one method per
    schedule recovers most of it: PipeMare's lr / (1 + d_k) for partime (whose delay is a stale
    gradient signal) and weight prediction for 1f1b (whose delay is stale weights)."""
    from partime_sim.models import build_torch_model, split_stages
    from partime_sim.partition import Partition
    from partime_sim.streams import make_stream

    N, S = 640, 8
    opt = OptimizerSpec("adam", lr=1e-3)
    runs = {"sequential": ("sequential", "none"), "partime": ("partime", "none"),
            "partime+pipemare": ("partime", "pipemare"), "1f1b": ("1f1b", "none"), "1f1b+predict": ("1f1b", "predict")}
    tail: dict[str, list[float]] = {key: [] for key in runs}
    for seed in range(3):
        st = make_stream("shapes", N, (32,), 10, seed)
        for key, (name, method) in runs.items():
            stages = split_stages(build_torch_model("mlp", seed), Partition.from_sizes([1] * S, S))
            res = emulate_torch(generate(name, S, N), stages, st.x, st.y, optimizer=opt, dtype="float32",
                                compensation=method)
            tail[key].append(float(res.loss[N // 2:].mean()))
    gap = {key: float(np.mean(v)) - float(np.mean(tail["sequential"])) for key, v in tail.items()}
    for plain, fixed in (("partime", "partime+pipemare"), ("1f1b", "1f1b+predict")):
        assert gap[plain] > 0.5, gap  # staleness hurts here
        assert gap[fixed] < 0.5 * gap[plain], gap  # the method closes more than half of the gap
        assert all(f < p for f, p in zip(tail[fixed], tail[plain])), tail  # on every seed
