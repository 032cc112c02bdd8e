"""Benchmark: the torch backend on CPU against the sequential baseline and torch.distributed.

Distributed transport, gloo, one process and one core per stage.
(a) 2 pipeline stages vs the sequential baseline on a balanced conv net (goal >= 1.8x);
(b) one hop of the backend's ``DistributedTransport`` vs a raw ``torch.distributed`` send/recv
of the same tensor (goal <= 1.5x); (c) this backend vs ``torch.distributed.pipelining`` on the
same stages (gpipe and 1f1b with microbatches; a stream of single samples); (d) worker processes
bound to a core each (the default) vs left to the OS (``--no-pin-cores``), on the accuracy set's
small networks; (e) a lockstep tick with messages in flight: one connection shared by the
messages and the barrier vs a group per direction (the transport's ``directed_groups``); (f) what
the tick's barrier and messages cost a stage's real torch compute vs a busy loop of the same
length (the kind of compute the profiler's barrier and message measurements use); (g) how late a
busy sender's messages arrive with 4 receives posted ahead vs the transport's ``lookahead``.

Run: python benchmarks/bench_backend.py [--quick]   (prints Markdown for BENCHMARKS.md)
     [--parts abcdefg] (a subset of the seven parts) [--malloc-diagnostic] (every worker process runs
     with glibc told to keep freed memory instead of returning it to the OS: shows what the fresh
     page faults of newly allocated receive buffers cost; not how the backend runs by default)

Throughputs of this backend come from the measured trace (``metrics.summarize``: samples /
makespan, process start-up excluded). Timings are noisy on a shared 2-core VM, so every
configuration is repeated and the tables give medians; ratios are formed within a repeat
(runs next to each other in time) and their median is reported.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from partime_sim.backends.launch import free_port

CHANNELS = 32
CLASSES = 10
LR, MOMENTUM = 0.01, 0.9  # OptimizerSpec() defaults: plain SGD with momentum, the same on both sides
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 28), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


# ---- the network and the stream ------------------------------------------------------------------
def conv_stages(blocks_per_stage: int = 4, seed: int = 0) -> list[nn.Module]:
    """2 stages of ``blocks_per_stage`` identical Conv2d(32, 32, 3, padding=1) + ReLU blocks; the
    last stage ends with a tiny classifier head (global average pool + Linear(32, 10))."""
    torch.manual_seed(seed)

    def blocks() -> list[nn.Module]:
        return [layer for _ in range(blocks_per_stage)
                for layer in (nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1), nn.ReLU())]

    return [nn.Sequential(*blocks()),
            nn.Sequential(*blocks(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(CHANNELS, CLASSES))]


def stream(num_samples: int, size: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Random frames (N, 32, size, size) float32 and integer labels. A tensor (not numpy), so the
    jobs that share one start-up share its storage in the job file."""
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal((num_samples, CHANNELS, size, size)).astype(np.float32))
    return x, rng.integers(0, CLASSES, num_samples)


def _pair_result(worker, *args) -> object:
    """Run ``worker(rank, port, *args, out)`` in two spawned gloo processes; rank 0's JSON in ``out``."""
    with tempfile.TemporaryDirectory(prefix="bench-pair-") as tmp:
        out = str(Path(tmp) / "result.json")
        mp.spawn(worker, args=(free_port(), *args, out), nprocs=2)
        return json.loads(Path(out).read_text())


def _median(values) -> float:
    return float(statistics.median(values))


# ---- running schedules through the backend --------------------------------------------------------
def backend_runs(configs: list[tuple[str, str, int, int | None]], stages: list[nn.Module], x, y) -> list[dict]:
    """Run ``(schedule, mode, stages, microbatches)`` configurations through the distributed
    backend (threads=1 per process), all in one process start-up; each one's ``summarize`` plus
    ``barrier_ms``, the median duration of the run's global barriers (partime's ticks)."""
    from partime_sim.backends.launch import run_spawned
    from partime_sim.backends.pipeline import assemble, make_job
    from partime_sim.generators import generate
    from partime_sim.metrics import summarize
    from partime_sim.optimizers import OptimizerSpec

    N = len(y)
    jobs = []
    for name, mode, S, M in configs:
        sched = generate(name, S, N, mode, microbatches=M)
        mods = [nn.Sequential(*stages)] if S == 1 else stages
        jobs.append(make_job(sched, mods, x, y, devices=["cpu"] * S, optimizer=OptimizerSpec("sgd", lr=LR,
                             momentum=MOMENTUM), dtype="float32", threads=1))
    out = []
    for job, p in zip(jobs, run_spawned(jobs)):
        trace = assemble(job, p, 0.0, "distributed").trace
        m = summarize(trace)
        barrier = trace[trace["kind"].astype(str) == "BARRIER"]
        m["barrier_ms"] = float(((barrier["end"] - barrier["start"]) * 1e3).median()) if len(barrier) else None
        out.append(m)
    return out


# ---- (a) pipeline speed-up ---------------------------------------------------------------------------
PIPELINES = [("partime", "infer"), ("partime-async", "infer"), ("partime", "train"), ("partime-async", "train")]


def speedup(quick: bool) -> list[str]:
    """Per repeat: one start-up runs the sequential baseline (1 process), one runs the 2-stage
    pipelines (2 processes); ratio = pipeline samples/s / sequential samples/s of that repeat.
    32x32 frames is the main case (a stage's forward ~1.1 ms, forward+backward ~3.5 ms); 64x64
    (4x the compute per task) shows how the ratio depends on the size of a task."""
    sizes = [(32, 120, 1)] if quick else [(32, 400, 3), (64, 160, 3)]
    lines = ["| frames | schedule | mode | samples | sequential samples/s | pipeline samples/s | "
             "**pipeline / sequential** (min-max) | sequential ms/sample | stage busy ms/sample (0, 1) | "
             "bound from busy time | barrier ms/tick |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for size, N, repeats in sizes:
        stages = conv_stages()
        x, y = stream(N, size)
        seq: dict[str, list[dict]] = {"infer": [], "train": []}
        pipe: dict[tuple[str, str], list[dict]] = {c: [] for c in PIPELINES}
        for _ in range(repeats):
            for mode, m in zip(("infer", "train"), backend_runs([("sequential", "infer", 1, None),
                                                                  ("sequential", "train", 1, None)], stages, x, y)):
                seq[mode].append(m)
            for c, m in zip(PIPELINES, backend_runs([(n, md, 2, None) for n, md in PIPELINES], stages, x, y)):
                pipe[c].append(m)
        for (name, mode), runs in pipe.items():
            base = seq[mode]
            ratios = [p["throughput_sps"] / b["throughput_sps"] for p, b in zip(runs, base)]
            busy = [_median(p["utilization"][d] * p["makespan_s"] / p["samples"] * 1e3 for p in runs) for d in (0, 1)]
            seq_ms = _median(b["makespan_s"] / b["samples"] * 1e3 for b in base)
            barrier = "-" if runs[0]["barrier_ms"] is None else f"{_median(p['barrier_ms'] for p in runs):.2f}"
            seq_sps, pipe_sps = _median(b["throughput_sps"] for b in base), _median(p["throughput_sps"] for p in runs)
            lines.append(f"| {size}x{size} | {name} | {mode} | {N} | {seq_sps:.0f} | {pipe_sps:.0f} | "
                         f"**{_median(ratios):.2f}x** ({min(ratios):.2f}-{max(ratios):.2f}) | {seq_ms:.2f} | "
                         f"{busy[0]:.2f}, {busy[1]:.2f} | {seq_ms / max(busy):.2f}x | {barrier} |")
    lines.append("\n(bound from busy time = sequential ms/sample / the busier stage's busy ms/sample: the ratio "
                 "the pipeline would reach if no stage ever waited; busy = time inside its F/B/OPT tasks, "
                 "which includes sending. barrier = median of partime's per-tick global barrier)")
    return lines


# ---- (b) one hop: DistributedTransport vs raw send/recv -----------------------------------------------
HOP_SIZES = [4096, 131072, 1 << 20]


def _hop_worker(rank: int, port: int, reps: int, blocks: int, out: str) -> None:
    """Ping-pong between ranks 0 and 1; rank 0 times every round trip (one hop = half of it).
    Blocks of the three variants alternate, so slow phases of the shared VM hit all alike:
    raw = blocking ``dist.send``/``dist.recv`` into a reused buffer; pre-posted = ``irecv`` posted
    before the peer sends + ``isend`` (raw torch.distributed, the pattern the transport uses), into
    two alternating buffers (reused) or a fresh ``torch.empty`` per message (as the transport);
    transport = ``DistributedTransport.send``/``recv``. A one-way stream (rank 0 sends ``reps``
    tensors back to back; time per tensor) is timed per block for raw and transport."""
    from partime_sim.backends.launch import keep_freed_memory
    from partime_sim.backends.transport import DistributedTransport, directed_groups

    torch.set_num_threads(1)
    keep_freed_memory()  # as every backend worker process does
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    groups = directed_groups([(0, 1), (1, 0)], torch.device("cpu"))  # as the backend's workers
    peer, clock = 1 - rank, time.perf_counter_ns
    res = {}
    for nbytes in HOP_SIZES:
        shape = (1, nbytes // 4)
        t, buf = torch.randn(shape), torch.empty(shape)
        got: dict[str, list[float]] = {k: [] for k in ("raw", "pre_reused", "pre", "transport", "raw_stream",
                                                        "transport_stream")}
        for _ in range(blocks):
            dist.barrier()
            for _ in range(reps):
                t0 = clock()
                if rank == 0:
                    dist.send(t, 1)
                    dist.recv(buf, 1)
                else:
                    dist.recv(buf, 0)
                    dist.send(buf, 0)
                got["raw"].append((clock() - t0) / 2)
            for key in ("pre_reused", "pre"):
                bufs = [torch.empty(shape), torch.empty(shape)]
                work = dist.irecv(bufs[0], peer)
                dist.barrier()
                for i in range(reps):
                    t0 = clock()
                    nxt = bufs[(i + 1) % 2] if key == "pre_reused" else torch.empty(shape)
                    if rank == 0:
                        sent = dist.isend(t, 1)
                        work.wait()
                        work = dist.irecv(nxt, 1)
                    else:
                        work.wait()
                        work = dist.irecv(nxt, 0)
                        sent = dist.isend(t, 0)
                    got[key].append((clock() - t0) / 2)
                    sent.wait()
                dist.send(t, peer)  # matches the last irecv posted by the peer
                work.wait()
            incoming = {peer: [(2 * i + (1 if rank == 0 else 0), shape) for i in range(reps)]}
            tr = DistributedTransport(rank, torch.device("cpu"), torch.float32, incoming, groups)
            dist.barrier()
            for i in range(reps):
                t0 = clock()
                if rank == 0:
                    tr.send(2 * i, 1, t)
                    tr.recv(2 * i + 1, 1, shape, torch.float32)
                else:
                    back = tr.recv(2 * i, 0, shape, torch.float32)
                    tr.send(2 * i + 1, 0, back)
                got["transport"].append((clock() - t0) / 2)
            tr.finish()
            # one-way streams: throughput of a hop when the sender never waits for the receiver
            dist.barrier()
            t0 = clock()
            for _ in range(reps):
                dist.send(t, 1) if rank == 0 else dist.recv(buf, 0)
            dist.barrier()
            got["raw_stream"].append((clock() - t0) / reps)
            tr = DistributedTransport(rank, torch.device("cpu"), torch.float32,
                                      {0: [(i, shape) for i in range(reps)]} if rank == 1 else {}, groups)
            dist.barrier()
            t0 = clock()
            for i in range(reps):
                tr.send(i, 1, t) if rank == 0 else tr.recv(i, 0, shape, torch.float32)
            tr.finish()
            dist.barrier()
            got["transport_stream"].append((clock() - t0) / reps)
        res[nbytes] = got
    if rank == 0:
        Path(out).write_text(json.dumps(res))
    dist.destroy_process_group()


def transport_hop(quick: bool) -> list[str]:
    reps, blocks = (20, 5) if quick else (20, 40)
    res = _pair_result(_hop_worker, reps, blocks)
    lines = ["| tensor | raw send/recv µs | pre-posted isend/irecv µs: reused buffer, fresh buffer | transport µs | "
             "**transport / raw** | transport / pre-posted fresh | p10: raw, transport µs | "
             "one-way stream µs/tensor: raw, transport |", "|---|---|---|---|---|---|---|---|"]
    for nbytes in HOP_SIZES:
        g = {k: np.asarray(v) / 1e3 for k, v in res[str(nbytes)].items()}
        raw, reused, pre, tr = (float(np.median(g[k])) for k in ("raw", "pre_reused", "pre", "transport"))
        label = f"{nbytes // 1024} KB" if nbytes < 1 << 20 else f"{nbytes >> 20} MB"
        lines.append(f"| {label} | {raw:.0f} | {reused:.0f}, {pre:.0f} | {tr:.0f} | **{tr / raw:.2f}x** | "
                     f"{tr / pre:.2f}x | {np.percentile(g['raw'], 10):.0f}, {np.percentile(g['transport'], 10):.0f} | "
                     f"{np.median(g['raw_stream']):.0f}, {np.median(g['transport_stream']):.0f} |")
    lines.append(f"\n(ping-pong, one hop = half a round trip; medians of {reps * blocks} round trips per cell, "
                 f"in {blocks} alternating blocks; streams: median of {blocks} blocks of {reps} tensors)")
    return lines


# ---- (c) torch.distributed.pipelining on the same stages ------------------------------------------------
def _torch_pp_worker(rank: int, port: int, size: int, runs: list[tuple[str, int, int, int]], out: str) -> None:
    """One rank of torch.distributed.pipelining: for each (schedule, microbatches M, warm-up steps,
    timed steps) a fresh PipelineStage + schedule over the same 2 stages; every ``step()`` takes a
    minibatch of M single-sample microbatches and is followed by an SGD step. Samples/s over the
    timed steps (between two barriers)."""
    import torch.nn.functional as TF
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    module = conv_stages()[rank]
    result = []
    for name, M, warm, steps in runs:
        x, y = stream((warm + steps) * M, size)
        y = torch.as_tensor(y)
        m = copy.deepcopy(module)
        stage = PipelineStage(m, rank, 2, torch.device("cpu"))
        cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[name]
        sched = cls(stage, n_microbatches=M, loss_fn=TF.cross_entropy)
        opt = torch.optim.SGD(m.parameters(), lr=LR, momentum=MOMENTUM)
        t0 = 0.0
        for step in range(warm + steps):
            if step == warm:
                dist.barrier()
                t0 = time.perf_counter()
            lo, hi = step * M, (step + 1) * M
            if rank == 0:
                sched.step(x[lo:hi], return_outputs=False)
            else:
                sched.step(target=y[lo:hi], losses=[], return_outputs=False)
            opt.step()
            opt.zero_grad(set_to_none=True)
        dist.barrier()
        result.append(steps * M / (time.perf_counter() - t0))
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def torch_pipelining(runs: list[tuple[str, int, int, int]], size: int) -> list[float]:
    return _pair_result(_torch_pp_worker, size, runs)


def vs_torch(quick: bool) -> list[str]:
    """Per repeat: torch.distributed.pipelining (one start-up, all its runs) next to this backend
    (one start-up, all its runs); ratio = backend samples/s / torch samples/s of that repeat."""
    size, M, warm = 32, 8, 2
    steps, stream_steps, repeats = (8, 40, 1) if quick else (40, 240, 3)
    N = steps * M  # backend: whole run (warm-up included) over the same number of samples
    torch_runs = [("gpipe", M, warm, steps), ("1f1b", M, warm, steps), ("gpipe", 1, 2 * warm, stream_steps)]
    ours = [("gpipe", "train", 2, M), ("1f1b", "train", 2, M)]
    stream_ours = [("partime", "train", 2, None), ("partime-async", "train", 2, None)]
    stages = conv_stages()
    x, y = stream(N, size)
    xs, ys = stream(stream_steps, size)
    t_sps: list[list[float]] = []
    b_sps: list[list[float]] = []
    for _ in range(repeats):
        t_sps.append(torch_pipelining(torch_runs, size))
        b_sps.append([m["throughput_sps"] for m in backend_runs(ours, stages, x, y)]
                     + [m["throughput_sps"] for m in backend_runs(stream_ours, stages, xs, ys)])
    rows = [("gpipe, M=8 microbatches per minibatch", 0, 0, f"{N}"),
            ("1f1b, M=8 (torch: Schedule1F1B, flushed; backend: 1f1b = PipeDream, no flush)", 1, 1, f"{N}"),
            ("stream, microbatch = 1 sample, update per sample: torch GPipe(n_microbatches=1) vs backend partime",
             2, 2, f"{stream_steps}"),
            ("stream (as above) vs backend partime-async", 2, 3, f"{stream_steps}")]
    lines = ["| case | samples (timed) | torch.distributed.pipelining samples/s | this backend samples/s | "
             "**backend / torch** |", "|---|---|---|---|---|"]
    for label, ti, bi, n in rows:
        ratios = [b[bi] / t[ti] for t, b in zip(t_sps, b_sps)]
        lines.append(f"| {label} | {n} | {_median(t[ti] for t in t_sps):.0f} | {_median(b[bi] for b in b_sps):.0f} | "
                     f"**{_median(ratios):.2f}x** ({min(ratios):.2f}-{max(ratios):.2f}) |")
    lines.append(f"\n({size}x{size} frames, the stages of (a); torch: {warm} warm-up steps excluded "
                 f"({2 * warm} for the stream), {repeats} repeat(s), medians)")
    return lines


# ---- (d) workers bound to cores vs left to the OS ----------------------------------------------------
BINDING_RUNS = [("lenet", "partime", "train", None), ("lenet", "partime-async", "train", None),
                ("lenet", "1f1b", "train", None), ("lenet", "gpipe", "train", 8), ("lenet", "partime", "infer", None),
                ("mlp", "1f1b", "train", None)]


def binding(quick: bool) -> list[str]:
    """Per repeat, each setting (bound, unbound) runs every configuration in one start-up;
    ratio = bound samples/s / unbound samples/s within the repeat. The accuracy set's sizes."""
    from partime_sim.backends.launch import run_spawned
    from partime_sim.backends.pipeline import assemble
    from partime_sim.backends.run import RunConfig, prepare
    from partime_sim.metrics import summarize

    repeats, div = (1, 4) if quick else (5, 1)
    sps: dict[bool, list[list[float]]] = {True: [], False: []}
    for _ in range(repeats):
        for pin in (True, False):
            jobs = [prepare(RunConfig(net, sched, "cpu,cpu", transport="distributed", mode=mode, threads=1,
                                      samples=(300 if mode == "train" else 400) // div, microbatches=mb,
                                      pin_cores=pin))[0] for net, sched, mode, mb in BINDING_RUNS]
            sps[pin].append([summarize(assemble(j, p, 0.0, "distributed").trace)["throughput_sps"]
                             for j, p in zip(jobs, run_spawned(jobs))])
    lines = ["| network | schedule | mode | bound samples/s (median) | unbound samples/s (median) | "
             "**bound / unbound** (median, min-max) |", "|---|---|---|---|---|---|"]
    for i, (net, sched, mode, mb) in enumerate(BINDING_RUNS):
        bound, free = [r[i] for r in sps[True]], [r[i] for r in sps[False]]
        ratios = [b / f for b, f in zip(bound, free)]
        lines.append(f"| {net} | {sched}{f' (M={mb})' if mb else ''} | {mode} | {_median(bound):,.0f} | "
                     f"{_median(free):,.0f} | **{_median(ratios):.2f}x** ({min(ratios):.2f}-{max(ratios):.2f}) |")
    return lines


# ---- (e) a lockstep tick with messages in flight ---------------------------------------------------------
TICK_COMPUTE_S, TICK_SKEW_S, TICK_FLOATS = 9e-4, 3e-4, 400  # ~ a lenet training tick and its message
TICK_VARIANTS = (("none", False, False), ("one-way", True, False), ("two-way", True, True))


def _tick_worker(rank: int, port: int, ticks: int, blocks: int, out: str) -> None:
    """Lockstep ticks as the ``partime`` schedule runs them: wait for the message the peer sent
    last tick, compute (rank 0 ``TICK_SKEW_S`` longer), ``isend`` this tick's message, barrier.
    Messages go 0 -> 1 (one-way) or both ways, over the default group the barrier uses (shared)
    or a group per direction (``directed_groups``, as the backend's workers); blocks of every
    (variant, groups) alternate. Rank 0 writes per block the mean tick and barrier >2 ms count."""
    from partime_sim.backends.affinity import bind_worker
    from partime_sim.backends.profiler import _busy
    from partime_sim.backends.transport import directed_groups

    bind_worker(rank, 2, 1)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    groups = directed_groups([(0, 1), (1, 0)], torch.device("cpu"))
    peer, msg = 1 - rank, torch.zeros(TICK_FLOATS)
    res: dict[str, list[list[float]]] = {}
    for _ in range(blocks):
        for name, forward, backward in TICK_VARIANTS:
            for directed in ((False, True) if forward else (False,)):
                out_group = groups[(rank, peer)] if directed else None  # None: the default group
                in_group = groups[(peer, rank)] if directed else None
                sends = forward and rank == 0 or backward and rank == 1
                recvs = forward and rank == 1 or backward and rank == 0
                posted = [dist.irecv(torch.empty(TICK_FLOATS), peer, group=in_group) for _ in range(2)] if recvs else []
                dist.barrier()
                times, stalls = [], 0
                for i in range(ticks):
                    t0 = time.perf_counter_ns()
                    if recvs and i > 0:
                        posted.pop(0).wait()
                        posted.append(dist.irecv(torch.empty(TICK_FLOATS), peer, group=in_group))
                    _busy(TICK_COMPUTE_S + (TICK_SKEW_S if rank == 0 else 0.0))
                    if sends:
                        dist.isend(msg, peer, group=out_group)
                    tb = time.perf_counter_ns()
                    dist.barrier()
                    t1 = time.perf_counter_ns()
                    times.append((t1 - t0) * 1e-9)
                    stalls += (t1 - tb) > 2_000_000
                if sends:  # the peer posted one receive past the last tick
                    dist.isend(msg, peer, group=out_group)
                for work in posted:
                    work.wait()
                dist.barrier()
                res.setdefault(f"{name}|{'directed' if directed else 'shared'}", []).append(
                    [float(np.mean(times[ticks // 10:])), stalls / ticks])
    if rank == 0:
        Path(out).write_text(json.dumps(res))
    dist.destroy_process_group()


def tick_traffic(quick: bool) -> list[str]:
    ticks, blocks = (200, 2) if quick else (400, 6)
    res = {k: np.asarray(v) for k, v in _pair_result(_tick_worker, ticks, blocks).items()}
    base = float(np.median(res["none|shared"][:, 0]))
    lines = ["| messages | connection | tick ms (median of block means) | extra over no messages, ms | "
             "barriers over 2 ms, % of ticks |", "|---|---|---|---|---|"]
    for key, v in res.items():
        name, conn = key.split("|")
        tick = float(np.median(v[:, 0]))
        lines.append(f"| {name} | {conn if name != 'none' else '-'} | {tick * 1e3:.3f} | "
                     f"{(tick - base) * 1e3:+.3f} | {100 * float(np.mean(v[:, 1])):.1f} |")
    lines.append(f"\n(rank 0 computes {TICK_COMPUTE_S * 1e3:.1f} + {TICK_SKEW_S * 1e3:.1f} ms, rank 1 "
                 f"{TICK_COMPUTE_S * 1e3:.1f} ms per tick; {TICK_FLOATS * 4} B messages; {blocks} alternating "
                 f"blocks of {ticks} ticks per row; processes bound to a core each)")
    return lines


# ---- (f) what a lockstep tick costs real torch compute vs a busy loop of the same length -----------------
COMPUTE_VARIANTS = (("free", False, False), ("barrier", True, False), ("messages", False, True), ("both", True, True))


def _compute_kind_worker(rank: int, port: int, ticks: int, blocks: int, out: str) -> None:
    """Partime-like ticks of lenet training split in two stages (layers 0-2 on rank 0, 3-6 on rank
    1): forward, backward, optimizer step, with or without the tick's barrier and its messages
    (rank 0 sends the activation after its forward, rank 1 the gradient after its backward, each
    taken a tick later; a group per direction, as the backend). The same ticks run with the
    stage's real layers and with ``_busy`` loops of the real tasks' median durations (what the
    profiler's barrier and message measurements compute); blocks of every (compute, variant)
    alternate. Rank 0 writes per block its mean task time per tick (forward + backward + step,
    the barrier and message waits left out) and its mean tick."""
    from partime_sim.backends.affinity import bind_worker
    from partime_sim.backends.profiler import _busy
    from partime_sim.backends.transport import directed_groups
    from partime_sim.models import build_torch_model

    bind_worker(rank, 2, 1)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    groups = directed_groups([(0, 1), (1, 0)], torch.device("cpu"))
    layers = list(build_torch_model("lenet").children())
    stage = nn.Sequential(*(layers[:3] if rank == 0 else layers[3:]))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        act = nn.Sequential(*layers[:3])(x)
    inp = x if rank == 0 else act.clone()
    cotangent = torch.randn_like(stage(inp))
    opt = torch.optim.SGD(stage.parameters(), lr=1e-5)
    peer = 1 - rank

    def real_tasks() -> list[int]:
        stamps = [time.perf_counter_ns()]
        out_ = stage(inp)
        stamps.append(time.perf_counter_ns())
        torch.autograd.backward(out_, cotangent)
        stamps.append(time.perf_counter_ns())
        opt.step()
        opt.zero_grad()
        stamps.append(time.perf_counter_ns())
        return stamps

    durations = np.median([np.diff(real_tasks()) for _ in range(200)], axis=0) * 1e-9  # warm-up too

    def tick(real: bool, messages: bool, sent: list) -> float:
        """One tick's compute, sending as the stage does; returns its task seconds (sends included)."""
        total = 0.0
        for k, seconds in enumerate(durations):
            t0 = time.perf_counter_ns()
            if real:
                if k == 0:
                    out_ = stage(inp)
                elif k == 1:
                    torch.autograd.backward(out_, cotangent)
                else:
                    opt.step()
                    opt.zero_grad()
            else:
                _busy(float(seconds))
            if messages and (rank, k) in ((0, 0), (1, 1)):  # activation after F, gradient after B
                sent.append(dist.isend(act, peer, group=groups[(rank, peer)]))
            total += (time.perf_counter_ns() - t0) * 1e-9
        return total

    res: dict[str, list[list[float]]] = {}
    for _ in range(blocks):
        for real in (True, False):
            for name, barrier, messages in COMPUTE_VARIANTS:
                posted = [dist.irecv(torch.empty_like(act), peer, group=groups[(peer, rank)])
                          for _ in range(2)] if messages else []
                sent: list = []
                dist.barrier()
                tasks, ticks_s = [], []
                for i in range(ticks):
                    t0 = time.perf_counter_ns()
                    if messages and i > 0:  # last tick's message from the peer
                        posted.pop(0).wait()
                        posted.append(dist.irecv(torch.empty_like(act), peer, group=groups[(peer, rank)]))
                    tasks.append(tick(real, messages, sent))
                    if barrier:
                        dist.barrier()
                    ticks_s.append((time.perf_counter_ns() - t0) * 1e-9)
                if messages:  # the peer posted one receive past the last tick
                    sent.append(dist.isend(act, peer, group=groups[(rank, peer)]))
                for work in posted + sent:
                    work.wait()
                dist.barrier()
                res.setdefault(f"{'real' if real else 'busy'}|{name}", []).append(
                    [float(np.mean(tasks[ticks // 10:])), float(np.mean(ticks_s[ticks // 10:]))])
    if rank == 0:
        Path(out).write_text(json.dumps(res))
    dist.destroy_process_group()


def compute_kind(quick: bool) -> list[str]:
    ticks, blocks = (150, 2) if quick else (300, 6)
    res = {k: np.asarray(v) for k, v in _pair_result(_compute_kind_worker, ticks, blocks).items()}
    lines = ["| compute | tick has | rank 0 task ms per tick | extra over free | rank 0 tick ms |",
             "|---|---|---|---|---|"]
    for kind in ("real", "busy"):
        free = float(np.median(res[f"{kind}|free"][:, 0]))
        for name, _, _ in COMPUTE_VARIANTS:
            v = res[f"{kind}|{name}"]
            task, tick_s = float(np.median(v[:, 0])), float(np.median(v[:, 1]))
            lines.append(f"| {kind} | {name} | {task * 1e3:.3f} | {(task - free) * 1e3:+.3f} | {tick_s * 1e3:.3f} |")
    lines.append(f"\n(lenet training split 3+4 layers, rank 0 the heavier stage; medians of {blocks} alternating "
                 f"blocks of {ticks} ticks; 'busy' = the profiler's ``_busy`` loop for each task's median real "
                 "duration; processes bound to a core each)")
    return lines


# ---- (g) a busy sender's messages: 4 receives posted ahead vs the transport's lookahead ---------------
CREDIT_VARIANTS = ("4 ahead", "lookahead")
CREDIT_FLOATS = 1024


def _credit_worker(rank: int, port: int, messages: int, blocks: int, out: str) -> None:
    """Rank 0 computes 0.2-1.0 ms (``_busy``, seeded) and sends; rank 1 computes 1.5x as long and
    receives, so every message was sent before its receive is called. Both through the backend's
    ``DistributedTransport`` (a group per direction), with its receives posted 4 ahead or
    ``lookahead`` ahead, blocks alternating. Rank 0 writes per block each message's delay: the
    receive's return minus the later of the send and the receive call (one clock: one machine)."""
    from partime_sim.backends import transport as tmod
    from partime_sim.backends.affinity import bind_worker
    from partime_sim.backends.profiler import _busy

    bind_worker(rank, 2, 1)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    groups = tmod.directed_groups([(0, 1)], torch.device("cpu"))
    work = np.random.default_rng(0).uniform(2e-4, 1e-3, messages)
    shape, msg = (CREDIT_FLOATS,), torch.zeros(CREDIT_FLOATS)
    res: dict[str, list[list[float]]] = {}
    default = tmod.lookahead
    for _ in range(blocks):
        for variant in CREDIT_VARIANTS:
            tmod.lookahead = default if variant == "lookahead" else (lambda device, nbytes: 4)
            incoming = {0: [(i, shape) for i in range(messages)]} if rank == 1 else {}
            tr = tmod.DistributedTransport(rank, torch.device("cpu"), torch.float32, incoming, groups)
            dist.barrier()
            stamps = torch.zeros((messages, 2), dtype=torch.int64)
            for i in range(messages):
                if rank == 0:
                    _busy(work[i])
                    stamps[i, 0] = time.perf_counter_ns()
                    tr.send(i, 1, msg)
                else:
                    _busy(1.5 * work[i])
                    stamps[i, 0] = time.perf_counter_ns()
                    tr.recv(i, 0, shape, torch.float32)
                    stamps[i, 1] = time.perf_counter_ns()
            tr.finish()
            if rank == 1:
                dist.send(stamps, 0)
            else:
                theirs = torch.empty_like(stamps)
                dist.recv(theirs, 1)
                delay = (theirs[:, 1] - torch.maximum(stamps[:, 0], theirs[:, 0])).double().numpy() * 1e-9
                res.setdefault(variant, []).append(delay[messages // 10:].tolist())
    tmod.lookahead = default
    if rank == 0:
        Path(out).write_text(json.dumps(res))
    dist.destroy_process_group()


def sender_credit(quick: bool) -> list[str]:
    from partime_sim.backends.transport import lookahead

    messages, blocks = (600, 2) if quick else (1500, 4)
    res = _pair_result(_credit_worker, messages, blocks)
    lines = ["| receives posted ahead | delay median ms | mean ms | p99 ms | over 1 ms, % |", "|---|---|---|---|---|"]
    for variant in CREDIT_VARIANTS:
        d = np.concatenate([np.asarray(b) for b in res[variant]])
        ahead = 4 if variant == "4 ahead" else lookahead(torch.device("cpu"), CREDIT_FLOATS * 4)
        lines.append(f"| {ahead} ({variant}) | {np.median(d) * 1e3:.3f} | {d.mean() * 1e3:.3f} | "
                     f"{np.quantile(d, 0.99) * 1e3:.3f} | {100 * float(np.mean(d > 1e-3)):.2f} |")
    lines.append(f"\n(sender computes 0.2-1.0 ms per message, receiver 1.5x as long; {CREDIT_FLOATS * 4} B messages "
                 f"through DistributedTransport; {blocks} alternating blocks of {messages} messages per row, the "
                 "first tenth of each left out; processes bound to a core each)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat (a smoke run)")
    parser.add_argument("--parts", default="abcdefg", help="which parts to run, e.g. 'ab' (default: abcdefg)")
    parser.add_argument("--malloc-diagnostic", action="store_true",
                        help=f"run every worker process with {MALLOC_ENV} (a diagnostic, not the default)")
    args = parser.parse_args()
    if args.malloc_diagnostic:
        os.environ.update(MALLOC_ENV)  # read by glibc when each worker process starts
    t0 = time.perf_counter()
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, torch {torch.__version__}; date {date.today()}"
          + (f"; workers run with {MALLOC_ENV}" if args.malloc_diagnostic else "") + "\n")
    if "a" in args.parts:
        print("### (a) 2 CPU stages (one process, one core each) vs the sequential baseline\n")
        print("\n".join(speedup(args.quick)))
    if "b" in args.parts:
        print("\n### (b) one hop: DistributedTransport vs raw torch.distributed (gloo, 2 processes)\n")
        print("\n".join(transport_hop(args.quick)))
    if "c" in args.parts:
        print("\n### (c) this backend vs torch.distributed.pipelining (gloo, 2 processes, 1 thread each)\n")
        print("\n".join(vs_torch(args.quick)))
    if "d" in args.parts:
        print("\n### (d) workers bound to a core each (default) vs left to the OS (2 processes, 1 thread each)\n")
        print("\n".join(binding(args.quick)))
    if "e" in args.parts:
        print("\n### (e) a lockstep tick with messages in flight: one connection vs a group per direction\n")
        print("\n".join(tick_traffic(args.quick)))
    if "f" in args.parts:
        print("\n### (f) what a lockstep tick costs real torch compute vs a busy loop of the same length\n")
        print("\n".join(compute_kind(args.quick)))
    if "g" in args.parts:
        print("\n### (g) a busy sender's messages: 4 receives posted ahead vs the transport's lookahead\n")
        print("\n".join(sender_credit(args.quick)))
    print(f"\n(benchmark wall time {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
