"""The torch backend on CUDA (skipped without a GPU): runs on one GPU repeated and on two GPUs,
agree with the CPU reference to rounding (float64), CUDA-event traces are ordered, and CUDA-graph
inference gives the eager outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from partime_sim.backends.pipeline import run_pipeline
from partime_sim.backends.profiler import device_class
from partime_sim.emulator_torch import emulate_torch
from partime_sim.generators import generate
from partime_sim.models import build_torch_model, split_stages
from partime_sim.optimizers import OptimizerSpec
from partime_sim.partition import even_partition
from partime_sim.streams import make_stream

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
N = 40


def _check(name: str, devices: list[str], transport: str) -> None:
    S = len(devices)
    stream = make_stream("shapes", N, (3, 32, 32), 10, 0)
    sched = generate(name, S, N, "train", microbatches=4 if name == "gpipe" else None)
    stages = split_stages(build_torch_model("lenet", 0), even_partition(7, S))
    spec = OptimizerSpec("adam", lr=1e-3)
    ref = emulate_torch(sched, stages, stream.x, stream.y, optimizer=spec, dtype="float64")
    got = run_pipeline(sched, stages, stream.x, stream.y, devices=devices, transport=transport, optimizer=spec,
                       dtype="float64")
    # GPU kernels round differently from the CPU's: a loss near 0 (log of a softmax near 1) moves by an ulp of 1
    np.testing.assert_allclose(got.loss, ref.loss, rtol=1e-9, atol=1e-14)
    for a, b in zip(ref.final_state, got.final_state):  # 40 Adam steps of those roundings: ~1e-9 relative
        for n in a:
            np.testing.assert_allclose(b[n].cpu().numpy(), a[n].numpy(), rtol=1e-7, atol=1e-10)
    tr = got.trace
    assert (tr["end"] >= tr["start"]).all() and len(tr) == len(sched)


@pytest.mark.parametrize("name", ["partime", "1f1b", "gpipe"])
def test_local_on_one_gpu_repeated(name: str) -> None:
    _check(name, ["cuda:0", "cuda:0"], "local")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("transport", ["local", "distributed"])
def test_two_gpus(transport: str) -> None:
    _check("partime", ["cuda:0", "cuda:1"], transport)


def test_inference_outputs_on_gpu() -> None:
    stream = make_stream("shapes", N, (3, 32, 32), 10, 0)
    sched = generate("partime", 2, N, "infer")
    stages = split_stages(build_torch_model("lenet", 0), even_partition(7, 2))
    # cuDNN convolves float32 in TF32 by default (~1e-3 relative): compare full float32 with the CPU
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False, fp32_precision="ieee"):
        got = run_pipeline(sched, stages, stream.x, stream.y, devices="cuda:0,cuda:0", keep_outputs=True)
    whole = build_torch_model("lenet", 0).eval()
    with torch.no_grad():
        expected = whole(torch.as_tensor(stream.x[:N]))
    np.testing.assert_allclose(got.outputs, expected.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,devices", [("sequential", "cuda:0"), ("partime", "cuda:0,cuda:0,cuda:0")])
def test_cuda_graph_inference_gives_the_eager_outputs(name: str, devices: str) -> None:
    S = len(devices.split(","))
    stream = make_stream("shapes", N, (3, 32, 32), 10, 0)
    sched = generate(name, S, N, "infer")
    stages = split_stages(build_torch_model("lenet", 0), even_partition(7, S))
    runs = [run_pipeline(sched, stages, stream.x, stream.y, devices=devices, keep_outputs=True, cuda_graphs=graphs)
            for graphs in (False, True)]
    eager, graphed = (r.outputs for r in runs)
    assert graphed.shape == (N, 10)
    np.testing.assert_allclose(graphed, eager, rtol=1e-6, atol=1e-7)  # the same kernels, replayed
    np.testing.assert_allclose(runs[1].loss, runs[0].loss, rtol=1e-6)
    assert len(runs[1].trace) == len(sched)


def test_profile_of_one_gpu_repeated_measures_the_streams_slowing_each_other() -> None:
    from partime_sim.backends.profiler import profile

    prof = profile("lenet", "cuda:0,cuda:0", transport="local", warmup=1, repeats=3, calibration_s=0.2)
    assert [d.kind for d in prof.cluster.devices] == [device_class(torch.device("cuda:0"))] * 2
    # two threads launching on one GPU share the GIL and the multiprocessors: a batch-1 LeNet is
    # launch-bound, so two streams cannot both run at full speed
    assert prof.cluster.concurrency_slowdown == prof.meta["concurrency_slowdown"] > 1.0
