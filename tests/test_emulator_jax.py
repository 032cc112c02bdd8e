"""JAX emulator: equals the torch reference (float64, 1e-9 relative) on every generator, every
optimizer and S in {1, 2, 4, 8}; partime with one stage is sequential exactly; a vmap sweep equals
separate runs; optax matches torch.optim; errors name the value and the fix."""

from __future__ import annotations

import copy
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

from partime_sim import emulator_jax
from partime_sim.emulator_jax import compile_schedule, emulate_jax, emulate_jax_sweep, make_optax
from partime_sim.emulator_torch import emulate_torch
from partime_sim.errors import ConfigError, ScheduleError
from partime_sim.generators import generate
from partime_sim.models import params_to_torch, stage_to_jax
from partime_sim.optimizers import OptimizerSpec
from partime_sim.schedule import B, Schedule
from partime_sim.streams import make_stream
from partime_sim.torch_import import from_pipeline_order

SGD = OptimizerSpec("sgd", lr=0.05)
MOMENTUM = OptimizerSpec("momentum", lr=0.02, momentum=0.9, weight_decay=1e-3)
ADAM = OptimizerSpec("adam", lr=0.003, weight_decay=1e-3)
OPTIMIZERS = {"sgd": SGD, "momentum": MOMENTUM, "adam": ADAM}
SCHEDULES = ("sequential", "partime", "partime-async", "gpipe", "1f1b", "zb-h1", "layerpipe")


def mlp_stages(S: int, width: int = 8, d_in: int = 6, classes: int = 3, seed: int = 0) -> list[nn.Sequential]:
    """S float64 stages of one Linear each (Tanh after all but the last), seeded."""
    torch.manual_seed(seed)
    dims = [d_in] + [width] * (S - 1) + [classes]
    return [nn.Sequential(nn.Linear(a, b), *([nn.Tanh()] if k < S - 1 else [])).double()
            for k, (a, b) in enumerate(itertools.pairwise(dims))]


def stream(n: int, d_in: int = 6, classes: int = 3, seed: int = 0):
    s = make_stream("shapes", n, (d_in,), classes, seed=seed).astype(np.float64)
    return s.x, s.y


def to_jax(stages: list[nn.Module]) -> list:
    with jax.enable_x64(True):  # float64 modules convert only in x64 mode
        return stage_to_jax(stages)


def as_torch(result, stages: list[nn.Module]) -> list[torch.Tensor]:
    """The JAX run's final weights, written into copies of the stages, as one flat list."""
    out = []
    for params, stage in zip(result.final_params, stages):
        st = copy.deepcopy(stage)
        params_to_torch(params, st)
        out.extend(st.state_dict().values())
    return out


def assert_same_run(jr, tr, stages, rtol=1e-9):
    # atol: a loss below 1e-12 is at float64's rounding floor of log-softmax (relative error ~1)
    np.testing.assert_allclose(jr.loss, tr.loss, rtol=rtol, atol=1e-12)
    if tr.correct is None:
        assert jr.correct is None
    else:
        assert np.array_equal(jr.correct, tr.correct)
    assert np.array_equal(jr.updates, tr.updates)
    torch_weights = [t for sd in tr.final_state for t in sd.values()]
    for got, want in zip(as_torch(jr, stages), torch_weights, strict=True):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=rtol, atol=1e-12)


def both(name: str, S: int, N: int, opt: OptimizerSpec, *, stash: bool = True, microbatches: int | None = 4,
         seed: int = 0):
    sched = generate(name, S, N, microbatches=microbatches)
    stages = mlp_stages(S, seed=seed)
    x, y = stream(N, seed=seed)
    tr = emulate_torch(sched, stages, x, y, optimizer=opt, dtype="float64", stash_weights=stash)
    jr = emulate_jax(sched, to_jax(stages), x, y, optimizer=opt, dtype="float64", stash_weights=stash)
    return jr, tr, stages


# every generator at S = 2, 4, 8 with the three optimizers in turn (each generator sees all three),
# one 300-sample run per generator; S = 1 below and in the transparency test
CASES = [(name, S, list(OPTIMIZERS)[(i + j) % 3], 300 if S == 4 else 40)
         for i, name in enumerate(SCHEDULES) for j, S in enumerate((2, 4, 8))]


@pytest.mark.parametrize("name,S,opt,N", CASES, ids=[f"{n}-S{S}-{o}-N{N}" for n, S, o, N in CASES])
def test_equals_torch_reference(name, S, opt, N):
    jr, tr, stages = both(name, S, N, OPTIMIZERS[opt])
    assert_same_run(jr, tr, stages)


@pytest.mark.parametrize("name,opt", [("gpipe", "adam"), ("layerpipe", "momentum")])
def test_one_stage_equals_torch_reference(name, opt):
    assert_same_run(*both(name, 1, 40, OPTIMIZERS[opt]))


@pytest.mark.parametrize("name", ["1f1b", "layerpipe"])
def test_without_weight_stashing_equals_torch_reference(name):
    """1f1b's backwards then use newer weights than their forwards; layerpipe's BW even newer
    weights than its BI (the VJP is redone at the weights current at BW time)."""
    jr, tr, stages = both(name, 4, 60, MOMENTUM, stash=False)
    assert_same_run(jr, tr, stages)
    assert not np.array_equal(tr.task_version, _versions_with_stashing(name, 4, 60))  # it matters here


def _versions_with_stashing(name: str, S: int, N: int) -> np.ndarray:
    stages = mlp_stages(S)
    x, y = stream(N)
    return emulate_torch(generate(name, S, N), stages, x, y, optimizer=MOMENTUM, dtype="float64").task_version


def test_partime_one_stage_is_sequential_exactly():
    x, y = stream(50)
    stages = to_jax(mlp_stages(1))
    for opt in OPTIMIZERS.values():
        a = emulate_jax(generate("partime", 1, 50), stages, x, y, optimizer=opt, dtype="float64")
        b = emulate_jax(generate("sequential", 1, 50), stages, x, y, optimizer=opt, dtype="float64")
        assert np.array_equal(a.loss, b.loss) and np.array_equal(a.correct, b.correct)
        assert all(np.array_equal(u, v) for u, v in zip(jax.tree.leaves(a.final_params),
                                                        jax.tree.leaves(b.final_params), strict=True))


def test_regression_with_mse_equals_torch_reference():
    s = make_stream("drift", 80, (6,), 2, seed=3).astype(np.float64)
    stages = mlp_stages(3, classes=2)
    sched = generate("partime", 3, 80)
    tr = emulate_torch(sched, stages, s.x, s.y, optimizer=SGD, dtype="float64")
    jr = emulate_jax(sched, to_jax(stages), s.x, s.y, optimizer=SGD, dtype="float64")
    assert jr.online_accuracy is None
    assert_same_run(jr, tr, stages)


def test_inference_imported_and_parameterless_stages_equal_torch_reference():
    """Forward-only schedules update nothing; a torch.distributed.pipelining order runs like any
    other schedule; a stage without weights (here a lone Tanh) just passes gradients through."""
    x, y = stream(30)
    stages = mlp_stages(3)
    sched = generate("partime", 3, 30, mode="infer")
    jr = emulate_jax(sched, to_jax(stages), x, y, dtype="float64")
    assert_same_run(jr, emulate_torch(sched, stages, x, y, dtype="float64"), stages)
    assert not jr.updates.any()
    order = {0: ["0F0", "0F1", "0F2", None, None, None, "0B0", "0B1", "0B2"],
             1: [None, "1F0", "1F1", "1F2", "1B0", "1B1", "1B2"]}
    sched = from_pipeline_order(order, num_stages=2, num_microbatches=3)
    stages = mlp_stages(2)
    jr = emulate_jax(sched, to_jax(stages), x, y, optimizer=ADAM, dtype="float64")
    assert_same_run(jr, emulate_torch(sched, stages, x, y, optimizer=ADAM, dtype="float64"), stages)
    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Linear(6, 8)).double(), nn.Sequential(nn.Tanh()), nn.Sequential(nn.Linear(8, 3)).double()]
    sched = generate("1f1b", 3, 30)
    jr = emulate_jax(sched, to_jax(stages), x, y, optimizer=MOMENTUM, dtype="float64")
    assert_same_run(jr, emulate_torch(sched, stages, x, y, optimizer=MOMENTUM, dtype="float64"), stages)


# ---- sweeps --------------------------------------------------------------------------------------
def test_sweep_over_learning_rates_equals_separate_runs():
    x, y = stream(120)
    sched = generate("partime", 3, 120)
    stages = to_jax(mlp_stages(3))
    specs = [OptimizerSpec("momentum", lr=0.002 * (i + 1)) for i in range(8)]
    swept = emulate_jax_sweep(sched, stages, x, y, optimizer=specs, dtype="float64")
    assert len(swept) == 8
    for spec, got in zip(specs, swept):
        want = emulate_jax(sched, stages, x, y, optimizer=spec, dtype="float64")
        np.testing.assert_allclose(got.loss, want.loss, rtol=1e-12, atol=0)
        for u, v in zip(jax.tree.leaves(got.final_params), jax.tree.leaves(want.final_params), strict=True):
            np.testing.assert_allclose(u, v, rtol=1e-12, atol=1e-15)
    assert len({float(r.loss[-20:].mean()) for r in swept}) == 8  # the configurations really differ


def test_sweep_over_seeds_and_streams_equals_separate_runs():
    sched = generate("1f1b", 2, 60)
    seeds = [0, 1, 2]
    stage_sets = [to_jax(mlp_stages(2, seed=s)) for s in seeds]
    streams = [stream(60, seed=s) for s in seeds]
    swept = emulate_jax_sweep(sched, stage_sets, [s[0] for s in streams], [s[1] for s in streams],
                              optimizer=ADAM, dtype="float64")
    for stages, (x, y), got in zip(stage_sets, streams, swept):
        want = emulate_jax(sched, stages, x, y, optimizer=ADAM, dtype="float64")
        np.testing.assert_allclose(got.loss, want.loss, rtol=1e-12, atol=0)
        assert np.array_equal(got.correct, want.correct)


@pytest.mark.parametrize("cores, C, want", [(1, 5, [[0, 1, 2, 3, 4]]), (2, 8, [[0, 1, 2, 3], [4, 5, 6, 7]]),
                                             (3, 5, [[0, 1], [2, 3], [4, 4]]), (16, 3, [[0], [1], [2]])])
def test_sweep_chunks_one_per_core_padded_to_one_shape(monkeypatch, cores, C, want):
    monkeypatch.setattr(emulator_jax.os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")  # where JAX has a GPU, too
    assert emulator_jax._config_chunks(C) == want


@pytest.mark.parametrize("workers, want", [(1, [list(range(8))]), (3, [[0, 1, 2], [3, 4, 5], [6, 7, 7]])])
def test_sweep_chunks_capped_by_workers(monkeypatch, workers, want):
    monkeypatch.setattr(emulator_jax.os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert emulator_jax._config_chunks(8, workers) == want


def test_sweep_passes_workers_on_and_refuses_bad_ones(monkeypatch):
    sched = generate("1f1b", 2, 20)
    stage_sets = [to_jax(mlp_stages(2, seed=s)) for s in range(2)]
    x, y = stream(20)
    asked = []
    real = emulator_jax._config_chunks
    monkeypatch.setattr(emulator_jax, "_config_chunks", lambda C, workers=None: asked.append(workers) or real(C, workers))
    assert len(emulate_jax_sweep(sched, stage_sets, x, y, workers=1)) == 2
    assert asked == [1]
    with pytest.raises(ConfigError, match="workers=0 is invalid"):
        emulate_jax_sweep(sched, stage_sets, x, y, workers=0)


def test_sweep_chunks_on_an_accelerator_stay_one_call(monkeypatch):
    monkeypatch.setattr(emulator_jax.os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert emulator_jax._config_chunks(5) == [[0, 1, 2, 3, 4]]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_sweep_split_over_cores_equals_one_call(monkeypatch, dtype):
    """Chunks run in threads (x64 switched on in each) and the padding is dropped: 5 configurations
    over 3 'cores' give what one call over all 5 gives, bit for bit."""
    sched = generate("1f1b", 2, 40)
    seeds = range(5)
    stage_sets = [to_jax(mlp_stages(2, seed=s)) for s in seeds]
    xs, ys = zip(*(stream(40, seed=s) for s in seeds))
    specs = [OptimizerSpec("adam", lr=0.01 * (s + 1)) for s in seeds]
    run = lambda: emulate_jax_sweep(sched, stage_sets, list(xs), list(ys), optimizer=specs, dtype=dtype)
    monkeypatch.setattr(emulator_jax.os, "sched_getaffinity", lambda pid: {0})
    whole = run()
    monkeypatch.setattr(emulator_jax.os, "sched_getaffinity", lambda pid: {0, 1, 2})
    split = run()
    assert len(split) == 5
    for a, b in zip(whole, split, strict=True):
        assert a.loss.dtype == np.dtype(dtype)
        assert np.array_equal(a.loss, b.loss) and np.array_equal(a.correct, b.correct)
        for u, v in zip(jax.tree.leaves(a.final_params), jax.tree.leaves(b.final_params), strict=True):
            assert np.array_equal(u, v)
    assert len({float(r.loss[-10:].mean()) for r in split}) == 5


# ---- optimizers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [SGD, OptimizerSpec("momentum", lr=0.1, momentum=0.8), MOMENTUM,
                                  OptimizerSpec("adam", lr=0.01, betas=(0.8, 0.99), eps=1e-6), ADAM],
                         ids=["sgd", "momentum", "momentum-wd", "adam", "adam-wd"])
def test_optax_step_matches_torch_optim(spec):
    """Five steps on random weights and gradients, float64: optax's arithmetic is torch's."""
    from partime_sim.optimizers import make_torch_optimizer

    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((4, 3))
    grads = [rng.standard_normal((4, 3)) for _ in range(5)]
    p = torch.nn.Parameter(torch.tensor(w0))
    opt = make_torch_optimizer(spec, [p])
    with jax.enable_x64(True):
        hyper = {"lr": spec.lr, "momentum": spec.momentum, "b1": spec.betas[0], "b2": spec.betas[1],
                 "eps": spec.eps, **({"weight_decay": spec.weight_decay} if spec.weight_decay else {})}
        tx = make_optax(spec.name, {k: jnp.float64(v) for k, v in hyper.items()})
        w = jnp.asarray(w0)
        state = tx.init(w)
        for g in grads:
            p.grad = torch.tensor(g)
            opt.step()
            updates, state = tx.update(jnp.asarray(g), state, w)
            w = w + updates
            np.testing.assert_allclose(np.asarray(w), p.detach().numpy(), rtol=1e-12, atol=1e-15)


# ---- dtypes, memory, program ---------------------------------------------------------------------
def test_float32_runs_after_float64_and_leaves_x64_off():
    x, y = stream(40)
    sched = generate("partime", 2, 40)
    stages = mlp_stages(2)
    r64 = emulate_jax(sched, to_jax(stages), x, y, optimizer=SGD, dtype="float64")
    stages32 = stage_to_jax([copy.deepcopy(s).float() for s in stages])
    r32 = emulate_jax(sched, stages32, x.astype(np.float32), y, optimizer=SGD, dtype="float32")
    assert r32.loss.dtype == np.float32 and r64.loss.dtype == np.float64
    assert jax.tree.leaves(r32.final_params)[0].dtype == np.float32
    np.testing.assert_allclose(r32.loss, r64.loss, rtol=1e-4)
    assert jnp.zeros(1).dtype == (jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)


def test_rings_stay_bounded_on_long_streams():
    """Ring sizes depend on the schedule's shape, not on the stream's length."""
    for name in ("partime", "1f1b", "layerpipe"):
        short, long = compile_schedule(generate(name, 4, 50)), compile_schedule(generate(name, 4, 2000))
        assert short.ring_sizes == long.ring_sizes, name
        assert max(max(r) for r in long.ring_sizes) <= 2 * 4 + 1, name
    p = compile_schedule(generate("partime", 3, 10))
    # ticks 0 and 1 only run forwards (warm-up), ticks 2..11 an F, a B and an OPT wave each;
    # barriers move no numbers and get no wave; sample m's loss is at tick m + S - 1
    assert p.num_waves == 2 + 3 * 10
    assert np.array_equal(p.loss_wave, 2 + 3 * np.arange(10))


# ---- errors --------------------------------------------------------------------------------------
def test_errors_name_the_value_and_the_fix():
    x, y = stream(20)
    sched = generate("partime", 2, 20)
    stages = to_jax(mlp_stages(2))
    with pytest.raises(ConfigError, match="dtype='float16'"):
        emulate_jax(sched, stages, x, y, dtype="float16")
    with pytest.raises(ConfigError, match="must be an OptimizerSpec"):
        emulate_jax(sched, stages, x, y, optimizer="adam")
    with pytest.raises(ConfigError, match="unknown"):
        OptimizerSpec("rmsprop")
    with pytest.raises(ConfigError, match="3 stages given but schedule 'partime' has 2"):
        emulate_jax(sched, to_jax(mlp_stages(3)), x, y)
    with pytest.raises(ConfigError, match="needs 20"):
        emulate_jax(sched, stages, x[:10], y[:10])
    with pytest.raises(ConfigError, match=r"labels span \d\.\.7 but the last stage has 3 outputs; labels must lie in"):
        emulate_jax(sched, stages, x, np.r_[y[:-1], 7])
    with pytest.raises(ConfigError, match="cross_entropy' needs integer class labels"):
        emulate_jax(sched, stages, x, y.astype(float), loss="cross_entropy")
    with pytest.raises(ConfigError, match="loss='hinge' is unknown"):
        emulate_jax(sched, stages, x, y, loss="hinge")
    with pytest.raises(ConfigError, match="mixes optimizers"):
        emulate_jax_sweep(sched, stages, x, y, optimizer=[SGD, ADAM])
    with pytest.raises(ConfigError, match="different lengths"):
        emulate_jax_sweep(sched, [stages, stages], x, y, optimizer=[SGD, SGD, SGD])
    with pytest.raises(ConfigError, match="a sweep needs one shape"):
        emulate_jax_sweep(sched, stages, [x, x[:, :4]], y)
    with pytest.raises(ConfigError, match="not a Schedule"):
        emulate_jax("partime", stages, x, y)


def test_shape_mismatch_between_stages_names_the_stage():
    x, y = stream(10)
    stages = to_jax([nn.Sequential(nn.Linear(6, 5)).double(), nn.Sequential(nn.Linear(4, 3)).double()])
    with pytest.raises(ConfigError, match=r"stage 1 cannot take stage 0's output of shape \(1, 5\)"):
        emulate_jax(generate("partime", 2, 10), stages, x, y, dtype="float64")


def test_divergence_stops_with_the_sample_and_the_learning_rate():
    x, _ = stream(200)
    with pytest.raises(ConfigError, match=r"loss of sample \d+ is (nan|inf) at task 1F\d+@.*lower the learning rate \(lr=10"):
        emulate_jax(generate("1f1b", 2, 200), to_jax(mlp_stages(2)), x, x[:, :3],
                    optimizer=OptimizerSpec("sgd", lr=10.0), dtype="float64")


def test_opt_without_a_gradient_is_a_schedule_error():
    base = generate("sequential", 1, 2)  # F0 B0 OPT F1 B1 OPT: drop B1, so the second OPT has nothing
    cols = {c: getattr(base, c).copy() for c in ("stage", "kind", "sample", "tick", "device", "lane", "wave")}
    keep = np.flatnonzero(~((base.kind == B) & (base.sample == 1)))
    cols = {c: a[keep] for c, a in cols.items()}
    bad = Schedule.build("broken", "train", 1, 2, 1, cols, [], [], partial_backward=True)
    with pytest.raises(ScheduleError, match=re.escape("no backward of that stage ran since its previous OPT")):
        compile_schedule(bad)
