"""JAX emulator with staleness compensation: equals the torch reference (float64, 1e-9 relative,
losses and final weights) for every method on partime and 1f1b, S in {2, 4}, SGD and Adam."""

from __future__ import annotations

import numpy as np
import pytest

from partime_sim.emulator_jax import emulate_jax, emulate_jax_sweep
from partime_sim.emulator_torch import emulate_torch
from partime_sim.errors import ConfigError
from partime_sim.generators import generate
from partime_sim.optimizers import OptimizerSpec
from test_emulator_jax import assert_same_run, mlp_stages, stream, to_jax

SGD = OptimizerSpec("sgd", lr=0.05)
ADAM = OptimizerSpec("adam", lr=0.003, weight_decay=1e-3)
METHODS = ("stash", "pipemare", "predict", "ema")
N = 64


def _pair(method: str, name: str, S: int, opt: OptimizerSpec, *, stash: bool = True, microbatches: int | None = 4):
    sched = generate(name, S, N, microbatches=microbatches)
    stages = mlp_stages(S)
    x, y = stream(N)
    jr = emulate_jax(sched, to_jax(stages), x, y, optimizer=opt, dtype="float64", stash_weights=stash,
                     compensation=method)
    tr = emulate_torch(sched, stages, x, y, optimizer=opt, stash_weights=stash, compensation=method)
    return jr, tr, stages


# every method on partime and 1f1b at S = 2 and 4; each (method, schedule) sees SGD and Adam once
CASES = [(m, n, S, ("sgd", "adam")[(i + j) % 2]) for m in METHODS for i, n in enumerate(("partime", "1f1b"))
         for j, S in enumerate((2, 4))]


@pytest.mark.parametrize("method,name,S,opt", CASES, ids=[f"{m}-{n}-S{S}-{o}" for m, n, S, o in CASES])
def test_compensation_equals_torch(method, name, S, opt):
    jr, tr, stages = _pair(method, name, S, SGD if opt == "sgd" else ADAM)
    assert_same_run(jr, tr, stages)


@pytest.mark.parametrize("method", ("predict", "ema"))
def test_compensation_without_stashing_equals_torch(method):
    jr, tr, stages = _pair(method, "1f1b", 4, SGD, stash=False)
    assert_same_run(jr, tr, stages)


@pytest.mark.parametrize("method", ("stash", "ema"))
def test_compensation_split_backward_equals_torch(method):
    jr, tr, stages = _pair(method, "layerpipe", 4, ADAM)  # BI/BW with delays 3, 2, 1, 0
    assert_same_run(jr, tr, stages)


def test_compensation_changes_partime():
    sched = generate("partime", 4, N)
    stages = to_jax(mlp_stages(4))
    x, y = stream(N)
    base = emulate_jax(sched, stages, x, y, optimizer=SGD, dtype="float64")
    for method in ("stash", "ema"):  # pipemare and predict are compared to torch above
        r = emulate_jax(sched, stages, x, y, optimizer=SGD, dtype="float64", compensation=method)
        assert not np.allclose(r.loss, base.loss), method


def test_compensation_sweep_equals_single_runs():
    sched = generate("partime", 4, N)
    stages = [to_jax(mlp_stages(4, seed=s)) for s in (0, 1)]
    x, y = stream(N)
    opts = [SGD, OptimizerSpec("sgd", lr=0.02)]
    swept = emulate_jax_sweep(sched, stages, x, y, optimizer=opts, dtype="float64", compensation="predict")
    for st, o, r in zip(stages, opts, swept):
        one = emulate_jax(sched, st, x, y, optimizer=o, dtype="float64", compensation="predict")
        np.testing.assert_allclose(r.loss, one.loss, rtol=1e-12, atol=1e-14)


def test_compensation_errors():
    sched = generate("partime", 2, N)
    x, y = stream(N)
    with pytest.raises(ConfigError, match="unknown"):
        emulate_jax(sched, to_jax(mlp_stages(2)), x, y, compensation="nope")
    with pytest.raises(ConfigError, match="stash_weights=False"):
        emulate_jax(sched, to_jax(mlp_stages(2)), x, y, compensation="stash", stash_weights=False)
