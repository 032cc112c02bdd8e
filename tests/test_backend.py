"""The torch backend (CPU): bit-exact with the reference emulator on both transports, every
sample once and in order, failures stop the run with the failing worker's error, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch import nn

from partime_sim.backends.affinity import worker_cores
from partime_sim.backends.faults import FailAt
from partime_sim.backends.launch import run_spawned
from partime_sim.backends.pipeline import WorkerError, assemble, make_job, run_pipeline
from partime_sim.cli import main
from partime_sim.emulator_torch import emulate_torch
from partime_sim.errors import ConfigError, PartimeError
from partime_sim.generators import generate
from partime_sim.metrics import summarize
from partime_sim.models import build_torch_model, split_stages
from partime_sim.optimizers import OptimizerSpec
from partime_sim.partition import even_partition
from partime_sim.streams import make_stream

SCHEDULES = ("sequential", "partime", "partime-async", "gpipe", "1f1b", "layerpipe", "zb-h1")
OPTIMIZERS = (OptimizerSpec("sgd", lr=0.05), OptimizerSpec("momentum", lr=0.02), OptimizerSpec("adam", lr=0.01))
N = 20
STREAM = make_stream("shapes", N, (32,), 10, 0)


def _case(name: str, S: int, mode: str = "train"):
    sched = generate(name, S, N, mode, microbatches=4 if name in ("gpipe", "zb-h1") else None)
    stages = split_stages(build_torch_model("mlp", 1), even_partition(8, S))
    devices = ["cpu"] * (1 if name == "sequential" else S)
    return sched, stages, devices


def _assert_same(ref, got) -> None:
    assert np.array_equal(ref.loss, got.loss)  # bit for bit
    assert np.array_equal(ref.correct, got.correct)
    assert np.array_equal(ref.task_version, got.task_version)
    assert np.array_equal(ref.updates, got.updates)
    for a, b in zip(ref.final_state, got.final_state, strict=True):
        assert a.keys() == b.keys()
        for n in a:
            assert torch.equal(a[n], b[n]), n


@pytest.mark.parametrize("S", [1, 2, 3, 4])
@pytest.mark.parametrize("name", SCHEDULES)
def test_local_equals_reference_bit_for_bit(name: str, S: int) -> None:
    sched, stages, devices = _case(name, S)
    spec = OPTIMIZERS[(S + SCHEDULES.index(name)) % 3]
    ref = emulate_torch(sched, stages, STREAM.x, STREAM.y, optimizer=spec, dtype="float64")
    got = run_pipeline(sched, stages, STREAM.x, STREAM.y, devices=devices, optimizer=spec, dtype="float64")
    _assert_same(ref, got)


@pytest.mark.parametrize("threads", [None, 3])
def test_local_workers_compute_with_the_callers_thread_count(threads: int | None, monkeypatch) -> None:
    """A new thread starts from the process's initial OpenMP team, not the caller's
    ``set_num_threads``: without re-setting it, a one-thread calibration ran conv30@16 2.3x slower."""
    import threading

    calls: list[tuple[str, int]] = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads",
                        lambda n: (calls.append((threading.current_thread().name, n)), real(n))[1])
    saved = torch.get_num_threads()
    real(1)
    try:
        sched, stages, devices = _case("partime", 2)
        run_pipeline(sched, stages, STREAM.x, STREAM.y, devices=devices, threads=threads)
    finally:
        real(saved)
    assert sorted(calls) == [("partime-worker-0", threads or 1), ("partime-worker-1", threads or 1)]


@pytest.mark.parametrize("S", [1, 2, 3, 4])
def test_distributed_equals_reference_bit_for_bit(S: int) -> None:
    """Every schedule at S stages in one spawned gloo process group (one start-up per S)."""
    names = [n for n in SCHEDULES if (n == "sequential") == (S == 1) or S == 1]
    jobs, refs = [], []
    for j, name in enumerate(names):
        sched, stages, _ = _case(name, S)
        spec = OPTIMIZERS[j % 3]
        refs.append(emulate_torch(sched, stages, STREAM.x, STREAM.y, optimizer=spec, dtype="float64"))
        jobs.append(make_job(sched, stages, STREAM.x, STREAM.y, devices=["cpu"] * S, optimizer=spec, dtype="float64"))
    for job, parts, ref in zip(jobs, run_spawned(jobs), refs, strict=True):
        _assert_same(ref, assemble(job, parts, 0.0, "distributed"))


@pytest.mark.parametrize("transport", ["local", "distributed"])
def test_inference_processes_every_sample_once_in_order(transport: str) -> None:
    sched, stages, devices = _case("partime", 3, "infer")
    got = run_pipeline(sched, stages, STREAM.x, STREAM.y, devices=devices, dtype="float64", transport=transport,
                       keep_outputs=True)
    fwd = got.trace[got.trace["kind"] == "F"]
    counts = fwd.groupby(["stage", "sample"], observed=True).size()
    assert len(counts) == 3 * N and (counts == 1).all()
    whole = build_torch_model("mlp", 1).to(torch.float64).eval()
    with torch.no_grad():
        expected = whole(torch.as_tensor(STREAM.x, dtype=torch.float64)[:, None].reshape(N, 1, -1)[:, 0])
    assert got.outputs.shape == (N, 10)
    np.testing.assert_allclose(got.outputs, expected.numpy(), rtol=1e-12)  # batch of N vs N batches of 1
    assert summarize(got.trace)["samples"] == N


@pytest.mark.parametrize("transport", ["local", "distributed"])
def test_measured_trace_has_every_task_with_ordered_times(transport: str) -> None:
    sched, stages, devices = _case("1f1b", 2)
    got = run_pipeline(sched, stages, STREAM.x, STREAM.y, devices=devices, transport=transport)
    tr = got.trace
    assert len(tr) == len(sched) and set(tr["source"]) == {"measured"}
    assert (tr["end"] >= tr["start"]).all() and tr["start"].min() >= 0
    for dev, rows in tr.groupby("device"):  # one worker runs its tasks one after another
        s, e = rows["start"].to_numpy(), rows["end"].to_numpy()
        assert np.all(s[1:] >= e[:-1] - 1e-9), dev


_SYNC_RANK = """
import sys, time, torch.distributed as dist
from partime_sim.backends.launch import common_origin_ns
rank, port = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
skew = 10**9 if rank else 0  # rank 1's clock reads one second ahead
group = dist.new_group(backend="gloo") if sys.argv[3] == "group" else None  # as NCCL workers sync clocks
print(common_origin_ns(rank, 2, clock=lambda: time.perf_counter_ns() + skew, group=group) - skew)
dist.destroy_process_group()
"""


@pytest.mark.parametrize("over", ["default", "group"])
def test_ranks_agree_on_one_origin_whatever_their_clocks_read(over: str) -> None:
    """Rank 1's clock is one second ahead: the origin it is given must be one second later in its
    own clock, i.e. the same instant (both processes share this host's monotonic clock); over the
    default group (CPU workers) or a gloo group of its own (GPU workers, whose default is NCCL)."""
    from partime_sim.backends.launch import free_port

    port = str(free_port())
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}
    procs = [subprocess.Popen([sys.executable, "-c", _SYNC_RANK, str(r), port, over], stdout=subprocess.PIPE,
                              text=True, env=env) for r in range(2)]
    origins = [int(p.communicate(timeout=60)[0].split()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    # the same instant to within half the best of 16 loopback round trips: tens of us when idle, up to
    # a millisecond or so while the rest of the suite loads both cores; the skew removed is 1 s
    assert abs(origins[1] - origins[0]) < 2_000_000, origins


def _failing_stages(how: str):
    stages = split_stages(build_torch_model("mlp", 0), even_partition(8, 2))
    stages[1] = nn.Sequential(*stages[1], FailAt(6, how))
    return stages


@pytest.mark.parametrize("transport,how", [("local", "raise"), ("distributed", "raise"), ("distributed", "kill")])
def test_a_failing_worker_stops_the_run_with_its_error(transport: str, how: str) -> None:
    sched = generate("partime", 2, 200, "train")
    stream = make_stream("shapes", 200, (32,), 10, 0)
    t0 = time.monotonic()
    with pytest.raises(WorkerError) as err:
        run_pipeline(sched, _failing_stages(how), stream.x, stream.y, devices="cpu,cpu", transport=transport)
    took = time.monotonic() - t0
    assert "worker 1 (cpu)" in str(err.value)
    assert ("planted failure at call 6" if how == "raise" else "killed by signal 9") in str(err.value)
    print(f"{transport}/{how}: stopped after {took:.2f} s")  # recorded, not asserted (shared machine)


def test_bad_devices_are_refused() -> None:
    sched, stages, _ = _case("partime", 2)
    with pytest.raises(ConfigError, match="tpu:0"):
        run_pipeline(sched, stages, STREAM.x, STREAM.y, devices="cpu,tpu:0")
    with pytest.raises(ConfigError, match="runs on 2 device"):
        run_pipeline(sched, stages, STREAM.x, STREAM.y, devices="cpu")
    with pytest.raises(ConfigError, match="transport"):
        run_pipeline(sched, stages, STREAM.x, STREAM.y, devices="cpu,cpu", transport="mpi")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            run_pipeline(sched, stages, STREAM.x, STREAM.y, devices="cuda:0,cuda:1")


def test_cuda_graphs_are_refused_for_training_and_on_cpus(capsys) -> None:
    sched, stages, _ = _case("partime", 2)
    with pytest.raises(ConfigError, match="inference forwards only.*'partime' trains"):
        make_job(sched, stages, STREAM.x, STREAM.y, devices="cpu,cpu", cuda_graphs=True)
    infer, stages, _ = _case("partime", 2, "infer")
    with pytest.raises(ConfigError, match="needs CUDA devices.*'cpu'"):
        make_job(infer, stages, STREAM.x, STREAM.y, devices="cpu,cpu", cuda_graphs=True)
    assert not make_job(infer, stages, STREAM.x, STREAM.y, devices="cpu,cpu").cuda_graphs
    assert main(["run", "--network", "mlp", "--schedule", "partime", "--devices", "cpu,cpu", "--mode", "infer",
                 "--samples", "8", "--cuda-graphs"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("partime-sim: error:") and "--cuda-graphs" in err and err.count("\n") == 1


def test_cuda_graph_wiring_captures_once_per_stage_and_replays_every_forward(monkeypatch) -> None:
    """The worker's side of --cuda-graphs, on CPU: a stand-in for the captured graph (which needs
    CUDA) records that each stage is captured once, on its first input, and serves every forward."""
    import dataclasses

    import partime_sim.backends.pipeline as pipeline

    made = []

    class Recorder:
        def __init__(self, module: nn.Module, example: torch.Tensor) -> None:
            self.module, self.shape, self.calls = module, tuple(example.shape), 0
            made.append(self)

        def __call__(self, inp: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return self.module(inp)

    monkeypatch.setattr(pipeline, "_GraphedForward", Recorder)
    sched, stages, devices = _case("partime", 2, "infer")
    job = make_job(sched, stages, STREAM.x, STREAM.y, devices=devices, keep_outputs=True)
    got = assemble(job, pipeline.run_local(dataclasses.replace(job, cuda_graphs=True)), 0.0, "local")
    eager = run_pipeline(sched, stages, STREAM.x, STREAM.y, devices=devices, keep_outputs=True)
    assert sorted((r.calls, r.shape) for r in made) == [(N, (1, 32)), (N, (1, 64))]
    assert np.array_equal(got.outputs, eager.outputs) and np.array_equal(got.loss, eager.loss)


FLAGS = ["--network", "mlp", "--schedule", "partime", "--samples", "120", "--dtype", "float64", "--optimizer", "adam"]


def _emulated_final_loss(capsys) -> float:
    assert main(["emulate", *FLAGS, "--devices", "2", "--impl", "torch", "--json"]) == 0
    return json.loads(capsys.readouterr().out)[0]["final_loss"]


def _bound_cores(workers: int) -> list[list[int] | None]:
    """The cores each distributed CPU worker of ``run`` (default threads) is bound to here."""
    if not hasattr(os, "sched_getaffinity"):
        return [None] * workers
    threads = max(1, (os.cpu_count() or 1) // workers)
    cores = [worker_cores(r, workers, threads, os.sched_getaffinity(0)) for r in range(workers)]
    return [None if c is None else list(c) for c in cores]


def test_cli_run_prints_simulate_and_emulate_keys_and_the_emulated_final_loss(capsys, tmp_path) -> None:
    expected = _emulated_final_loss(capsys)
    for transport, pin in (("local", []), ("distributed", []), ("distributed", ["--no-pin-cores"])):
        trace = tmp_path / f"{transport}{len(pin)}.csv"
        assert main(["run", *FLAGS, "--devices", "cpu,cpu", "--transport", transport, "--json",
                     "--trace", str(trace), *pin]) == 0
        row = json.loads(capsys.readouterr().out)
        assert row["final_loss"] == expected  # same float, bit for bit
        for key in ("throughput_sps", "makespan_s", "utilization", "bubble_fraction", "latency_p50_s",
                    "latency_p99_s", "mean_loss_last_10pct", "online_accuracy", "loss_curve"):
            assert key in row
        assert row["samples"] == 120 and trace.stat().st_size > 0
        # distributed CPU workers are bound to cores of their own unless told not to
        bound = transport == "distributed" and not pin
        assert row["cores"] == (_bound_cores(2) if bound else [None, None])
        if bound and hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) == os.cpu_count() >= 2:
            assert row["cores"][0] and set(row["cores"][0]).isdisjoint(row["cores"][1])


def test_cli_run_errors_are_one_line(capsys) -> None:
    assert main(["run", *FLAGS, "--devices", "cpu,gpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("partime-sim: error:") and "'gpu'" in err and err.count("\n") == 1


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
                    reason="torchrun not on PATH")
def test_torchrun_command_from_the_readme(capsys) -> None:
    expected = _emulated_final_loss(capsys)
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    out = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "partime_sim.backends.launch",
                          *FLAGS, "--devices", "cpu,cpu", "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 1 and rows[0]["final_loss"] == expected and rows[0]["transport"] == "distributed"
    assert rows[0]["cores"] == _bound_cores(2)  # bound by LOCAL_RANK, as the spawned workers are


@pytest.mark.parametrize("name,S,comp", [("partime", 3, "none"), ("1f1b", 3, "predict"), ("layerpipe", 2, "ema"),
                                         ("gpipe", 2, "none"), ("partime-async", 4, "stash")])
def test_checkpoint_and_resume_equal_an_uninterrupted_run(name: str, S: int, comp: str, tmp_path) -> None:
    sched, stages, devices = _case(name, S)
    kw = dict(devices=devices, optimizer=OptimizerSpec("adam", lr=0.01), dtype="float64", compensation=comp)
    full = run_pipeline(sched, stages, STREAM.x, STREAM.y, **kw)
    for cut in (3, int(sched.wave.max()) // 2, int(sched.wave.max()) - 1):
        path = str(tmp_path / f"cut{cut}.pt")
        assert run_pipeline(sched, stages, STREAM.x, STREAM.y, checkpoint_at=cut, checkpoint=path, **kw) is None
        resumed = run_pipeline(sched, stages, STREAM.x, STREAM.y, resume=path, **kw)
        _assert_same(full, resumed)
        assert resumed.trace["start"].size < len(sched)  # only the resumed part ran


def test_checkpoint_and_resume_on_the_distributed_transport(tmp_path) -> None:
    sched, stages, devices = _case("1f1b", 2)
    kw = dict(devices=devices, optimizer=OptimizerSpec("momentum", lr=0.02), dtype="float64", transport="distributed")
    full = run_pipeline(sched, stages, STREAM.x, STREAM.y, **{**kw, "transport": "local"})
    path = str(tmp_path / "ck.pt")
    run_pipeline(sched, stages, STREAM.x, STREAM.y, checkpoint_at=int(sched.wave.max()) // 2, checkpoint=path, **kw)
    _assert_same(full, run_pipeline(sched, stages, STREAM.x, STREAM.y, resume=path, **kw))


def test_bad_checkpoint_settings_are_refused(tmp_path) -> None:
    sched, stages, devices = _case("partime", 2)
    with pytest.raises(ConfigError, match="checkpoint_at=999999"):
        run_pipeline(sched, stages, STREAM.x, STREAM.y, devices=devices, checkpoint_at=999999,
                     checkpoint=str(tmp_path / "c.pt"))
    with pytest.raises(ConfigError, match="go together"):
        run_pipeline(sched, stages, STREAM.x, STREAM.y, devices=devices, checkpoint_at=3)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="junk.pt"):
        run_pipeline(sched, stages, STREAM.x, STREAM.y, devices=devices, resume=str(tmp_path / "junk.pt"))


@pytest.mark.parametrize("transport", ["local", "distributed"])
def test_ctrl_c_stops_every_process(transport: str) -> None:
    import signal

    cmd = [sys.executable, "-m", "partime_sim.cli", "run", "--network", "mlp", "--schedule", "partime",
           "--devices", "cpu,cpu", "--samples", "100000", "--transport", transport]
    # as from a terminal: SIGINT handled (a test run launched in the background inherits it ignored)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(8)  # past start-up: the workers are running
    assert proc.poll() is None
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err
    left = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert left == []  # no worker left behind


def test_cli_run_takes_a_factory_and_any_catalogue_network(capsys, tmp_path) -> None:
    factory = tmp_path / "my_model.py"
    factory.write_text("from torch import nn\n\ndef build():\n    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), "
                       "nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))\n")
    assert main(["run", "--network", f"{factory}:build", "--input-shape", "3x8x8", "--schedule", "1f1b",
                 "--devices", "cpu,cpu", "--samples", "16", "--stream", "shapes", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["partition"] == [2, 2] and row["samples"] == 16 and 0 <= row["online_accuracy"] <= 1
    assert main(["run", "--network", "partime-conv30@16", "--schedule", "partime", "--mode", "infer",
                 "--devices", "cpu,cpu", "--samples", "6", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["samples"] == 6 and "final_loss" not in row and sum(row["partition"]) == 30
    assert main(["run", "--network", f"{factory}:build", "--schedule", "1f1b", "--devices", "cpu,cpu"]) == 2
    assert "--input-shape" in capsys.readouterr().err


def test_workers_keep_freed_receive_buffers_on_glibc() -> None:
    import platform

    from partime_sim.backends.launch import keep_freed_memory

    # applied (mallopt accepted both settings) exactly where the C library is glibc
    assert keep_freed_memory() == (platform.libc_ver()[0] == "glibc")


def test_bare_cuda_gets_an_index(monkeypatch) -> None:
    from partime_sim.backends.pipeline import parse_devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert parse_devices("cuda,cuda:1") == ["cuda:0", "cuda:1"]  # torch.cuda.set_device needs the index
    assert parse_devices(["cpu", "cuda"]) == ["cpu", "cuda:0"]


def test_distributed_refuses_what_nccl_cannot_run() -> None:
    from dataclasses import replace

    from partime_sim.backends.launch import check_distributed

    sched, stages, devices = _case("partime", 2, "infer")
    job = make_job(sched, stages, STREAM.x, STREAM.y, devices=devices)
    check_distributed(job)  # CPU processes: fine
    check_distributed(replace(job, devices=["cuda:0", "cuda:1"]))
    with pytest.raises(ConfigError, match="two distributed workers on cuda:1.*--transport local"):
        check_distributed(replace(job, devices=["cuda:1", "cuda:1"]))
    with pytest.raises(ConfigError, match="cuda_graphs needs --transport local"):
        check_distributed(replace(job, devices=["cuda:0", "cuda:1"], cuda_graphs=True))
    with pytest.raises(ConfigError, match="cuda:0"):  # before any process starts
        run_spawned([replace(job, devices=["cuda:0", "cuda:0"])])


def test_gloo_receives_are_posted_far_ahead_within_a_byte_budget() -> None:
    """A busy gloo sender only sends at once while it holds receive notices: small messages get
    GLOO_LOOKAHEAD receives posted ahead, large ones as many as GLOO_LOOKAHEAD_BYTES hold (never
    fewer than LOOKAHEAD); NCCL keeps LOOKAHEAD."""
    from partime_sim.backends.transport import GLOO_LOOKAHEAD, GLOO_LOOKAHEAD_BYTES, LOOKAHEAD, lookahead

    cpu = torch.device("cpu")
    assert lookahead(cpu, 4096) == GLOO_LOOKAHEAD > LOOKAHEAD
    assert lookahead(cpu, 0) == GLOO_LOOKAHEAD
    assert lookahead(cpu, GLOO_LOOKAHEAD_BYTES // 10) == 10
    assert lookahead(cpu, GLOO_LOOKAHEAD_BYTES) == LOOKAHEAD  # 1 would fit; the floor holds
    assert lookahead(torch.device("cuda", 0), 4096) == LOOKAHEAD


@pytest.mark.parametrize("world", [2, 3, 4, 5, 8, 9])
def test_token_barrier_rounds_reach_every_rank_over_its_groups(monkeypatch, world: int) -> None:
    """Dissemination: after a TokenBarrier's rounds every rank has heard, through the chain of
    tokens, from every rank (so none leaves before all arrived), each token over a pair that
    ``barrier_pairs`` makes a group for."""
    from partime_sim.backends.transport import TokenBarrier, barrier_pairs

    monkeypatch.setattr(torch.distributed, "irecv", lambda *a, **k: None)
    pairs = set(barrier_pairs(world))
    groups = {pair: object() for pair in pairs}
    rounds = [TokenBarrier(r, world, groups, 0).rounds for r in range(world)]
    heard = [{r} for r in range(world)]
    for k in range(len(rounds[0])):
        for r in range(world):
            dst, src = rounds[r][k]
            assert (r, dst) in pairs and (src, r) in pairs and rounds[src][k][0] == r
        heard = [heard[r] | heard[rounds[r][k][1]] for r in range(world)]
    assert all(h == set(range(world)) for h in heard)
    assert len(rounds[0]) == (world - 1).bit_length()  # ceil(log2(world)) rounds


def test_token_barrier_posts_its_tokens_up_front_and_counts_its_barriers(monkeypatch) -> None:
    """Receives for ``count`` barriers' tokens, at most GLOO_LOOKAHEAD posted up front and one more
    per barrier until all are; tokens go out tagged TOKEN_TAG; a barrier past the count fails."""
    from partime_sim.backends import transport as tmod

    posts, sends = [], []

    class FakeWork:
        def wait(self) -> None:
            pass

        def is_completed(self) -> bool:
            return True

    def irecv(buf, src, group=None, tag=0):
        posts.append((src, tag))
        return FakeWork()

    def isend(buf, dst, group=None, tag=0):
        sends.append((dst, tag))
        return FakeWork()

    monkeypatch.setattr(torch.distributed, "irecv", irecv)
    monkeypatch.setattr(torch.distributed, "isend", isend)
    monkeypatch.setattr(tmod, "GLOO_LOOKAHEAD", 3)
    b = tmod.TokenBarrier(1, 2, {(0, 1): object(), (1, 0): object()}, 5)
    assert posts == [(0, tmod.TOKEN_TAG)] * 3
    for i in range(5):
        b.barrier()
        assert len(posts) == min(3 + i + 1, 5)
    assert sends == [(0, tmod.TOKEN_TAG)] * 5
    with pytest.raises(PartimeError, match="barrier 6 of 5"):
        b.barrier()


def test_distributed_lockstep_ticks_do_not_overlap_across_three_workers() -> None:
    """``partime`` on 3 processes (a two-round TokenBarrier): no worker starts a tick's tasks
    before every worker has ended the previous tick's (one clock: one machine)."""
    sched, stages, devices = _case("partime", 3)
    job = make_job(sched, stages, STREAM.x, STREAM.y, devices=devices)
    trace = assemble(job, run_spawned([job])[0], 0.0, "distributed").trace
    work = trace[trace["device"] >= 0]
    by_tick = work.groupby("tick").agg(first=("start", "min"), last=("end", "max"))
    assert len(by_tick) > 10 and work["device"].nunique() == 3
    assert (by_tick["first"].to_numpy()[1:] >= by_tick["last"].to_numpy()[:-1]).all()


def test_distributed_transport_posts_its_lookahead_of_receives(monkeypatch) -> None:
    """The transport posts ``lookahead`` receives per peer up front (fewer when fewer come), each
    sized for the largest message from that peer, and one more after each receive."""
    from partime_sim.backends import transport as tmod

    posts: list[tuple[int, tuple[int, ...]]] = []

    class FakeWork:
        def wait(self) -> None:
            pass

    def irecv(buf: torch.Tensor, src: int, group: object = None) -> FakeWork:
        posts.append((src, tuple(buf.shape)))
        return FakeWork()

    monkeypatch.setattr(torch.distributed, "irecv", irecv)
    monkeypatch.setattr(tmod, "GLOO_LOOKAHEAD_BYTES", 5 * 8 * 4)  # five of the 8-float messages
    incoming = {1: [(i, (8,)) for i in range(20)], 2: [(100 + i, (2,)) for i in range(3)]}
    tr = tmod.DistributedTransport(0, torch.device("cpu"), torch.float32, incoming)
    assert [p for p in posts if p[0] == 1] == [(1, (8,))] * 5
    assert [p for p in posts if p[0] == 2] == [(2, (2,))] * 3
    tr.recv(0, 1, (8,), torch.float32)
    assert len([p for p in posts if p[0] == 1]) == 6
