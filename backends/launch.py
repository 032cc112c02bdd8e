"""The ``distributed`` transport's processes: spawned here (``partime-sim run --transport
distributed``) or started by ``torchrun`` (one process per device, on one node or several).

Spawned: the parent writes the job to a file, starts one process per worker (gloo on CPU,
NCCL on GPU, a free localhost port), and watches them. The first worker that fails writes its
error and exits; the parent then kills the rest at once and raises that error, so a failure
never hangs the run. Ctrl-C stops every process.

torchrun: every rank builds the same job from the same command line (same seed, same stream,
same weights), runs its worker and sends its part to rank 0, which prints the result:
``torchrun --standalone --nproc-per-node 2 -m partime_sim.backends.launch --network mlp --schedule partime
--devices cpu,cpu --samples 500``. Each process sets its own torch thread count (cores / local
processes) and, on CPU, binds itself to cores of its own (``affinity.py``; ``--no-pin-cores``
leaves that to the OS), so stages do not fight for cores.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from partime_sim.backends.affinity import bind_worker
from partime_sim.backends.pipeline import Job, run_worker, worker_error
from partime_sim.errors import ConfigError
from partime_sim.backends.transport import DistributedTransport, TokenBarrier, barrier_pairs, directed_groups

KILL_GRACE_S = 2.0  # after the first failure, how long the others get before SIGKILL
INIT_TIMEOUT_S = 60  # process group rendezvous and collectives
# NCCL's watchdog times every operation from its launch, and receives are posted ahead: give a GPU
# worker's first tasks (cuDNN autotuning, graph capture) room; a dead peer still ends the run at once
NCCL_TIMEOUT_S = 300
CLOCK_SYNC_ROUNDS = 16  # timestamp ping-pongs per rank; the shortest round trip is kept


def free_port() -> int:
    """A free TCP port on localhost for a process group's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _threads_per_process(local_world: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, local_world))


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
KEEP_FREED_BYTES = 32 << 20  # glibc's largest mmap threshold on 64-bit


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks up to 32 MiB in the heap instead of unmapping them.

    Every message a worker receives lands in a fresh tensor; glibc serves blocks above its
    mmap threshold with mmap and returns them with munmap, so each received activation
    page-faults its memory in again (1 MB: ~0.2 ms, the whole gap between this transport and a
    raw send/recv into a reused buffer). Kept in the heap, the next message reuses the pages.
    Returns whether it applied (False off glibc: nothing changes)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
    except OSError:
        return False
    if mallopt is None or not hasattr(libc, "gnu_get_libc_version"):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_FREED_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, 2 * KEEP_FREED_BYTES))


def check_distributed(job: Job) -> None:
    """What one process per device cannot run, refused before any process starts."""
    gpus = [d for d in job.devices if d.startswith("cuda")]
    twice = sorted({d for d in gpus if gpus.count(d) > 1})
    if twice:
        raise ConfigError(f"devices={job.devices} put two distributed workers on {twice[0]}, but NCCL cannot pair two "
                          "ranks on one GPU; use --transport local (a thread and a CUDA stream per worker) or "
                          "distinct GPUs")
    if job.cuda_graphs:
        raise ConfigError("cuda_graphs needs --transport local: capturing a graph synchronises the whole GPU, which "
                          "would wait forever on the receives a distributed worker posts ahead")


def worker_process(jobs: list[Job], rank: int, world: int, init_method: str | None,
                   local_world: int, local_rank: int | None = None) -> list[list[dict]] | None:
    """Run one rank of each job in turn, in one process group made here; rank 0 returns every
    job's parts (one per rank). Several jobs share one start-up (tests, sweeps). ``local_rank``
    (default ``rank``) picks this process's cores among the ``local_world`` on its host: a
    worker spawned here is its own; torchrun says it in ``LOCAL_RANK``."""
    import torch.distributed as dist

    for job in jobs:
        check_distributed(job)

    device = torch.device(jobs[0].devices[rank])
    threads = jobs[0].threads or _threads_per_process(local_world)
    cores = None  # before any thread starts (torch's, gloo's): they inherit the binding
    if device.type == "cpu" and jobs[0].pin_cores:
        cores = bind_worker(rank if local_rank is None else local_rank, local_world, threads)
    torch.set_num_threads(threads)
    if device.type == "cpu":
        keep_freed_memory()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # on a GPU, bind the group to the device: NCCL then builds communicators eagerly
    timeout = datetime.timedelta(seconds=NCCL_TIMEOUT_S if backend == "nccl" else INIT_TIMEOUT_S)
    dist.init_process_group(backend, init_method=init_method or "env://", rank=rank, world_size=world,
                            timeout=timeout, **({"device_id": device} if device.type == "cuda" else {}))
    importlib.import_module("torch._dynamo")  # torch.optim imports it on first use: pay that before the clock starts
    try:
        pairs = [(peer, r) for job in jobs for r in range(world) for peer in job.workers.incoming[r]]
        token_barriers = device.type == "cpu" and any(job.barriers() for job in jobs)
        groups = directed_groups(pairs + (barrier_pairs(world) if token_barriers else []), device)
        clock_group = dist.new_group(backend="gloo") if backend != "gloo" else None  # CPU timestamps
        gathered = []
        for job in jobs:
            # before the transport posts its receives, which would take the sync's messages
            origin = common_origin_ns(rank, world, group=clock_group)
            barrier = TokenBarrier(rank, world, groups, job.barriers()) if token_barriers else None
            transport = DistributedTransport(rank, device, job.dtype, job.incoming(rank), groups, barrier)
            dist.barrier()
            part = {**run_worker(job, rank, transport, origin), "cores": cores}
            parts = [None] * world if rank == 0 else None
            dist.gather_object(part, parts, dst=0)
            gathered.append(parts)
        return gathered if rank == 0 else None
    finally:
        dist.destroy_process_group()


def common_origin_ns(rank: int, world: int, rounds: int = CLOCK_SYNC_ROUNDS,
                     clock: Callable[[], int] = time.perf_counter_ns, group: Any = None) -> int:
    """One instant, as each rank's own ``perf_counter_ns`` reads it, so that every worker's
    task times share one axis (a cross-worker dependency then never looks like it ran backwards).

    Taking ``perf_counter_ns()`` after a barrier is not enough: ranks leave a barrier up to
    milliseconds apart on a loaded machine, and clocks of different nodes have different zeros.
    Rank 0 ping-pongs timestamps with each rank; the round with the shortest round trip gives
    that rank's clock offset to within half of it (a few tens of microseconds over loopback).
    The timestamps are CPU tensors, so ``group`` must be a gloo group (NCCL workers pass one made
    for this; the GPU clock then anchors its CUDA events to the instant). ``clock`` is this
    rank's clock (a test shifts one rank's to check the offset)."""
    import torch.distributed as dist

    buf = torch.zeros(1, dtype=torch.int64)
    if rank == 0:
        origin = clock()
        for peer in range(1, world):
            best_rtt, offset = None, 0
            for _ in range(rounds):
                t0 = clock()
                dist.send(buf, peer, group=group)
                dist.recv(buf, peer, group=group)
                t1 = clock()
                if best_rtt is None or t1 - t0 < best_rtt:
                    best_rtt, offset = t1 - t0, int(buf.item()) - (t0 + t1) // 2
            buf.fill_(origin + offset)
            dist.send(buf, peer, group=group)
        return origin
    for _ in range(rounds):
        dist.recv(buf, 0, group=group)
        buf.fill_(clock())
        dist.send(buf, 0, group=group)
    dist.recv(buf, 0, group=group)
    return int(buf.item())


def _spawned_main(rank: int, world: int, port: int, job_path: str, out_dir: str) -> None:
    """Entry of a spawned worker process: its error, if any, goes to a file for the parent."""
    try:
        jobs = torch.load(job_path, weights_only=False)
        parts = worker_process(jobs, rank, world, f"tcp://127.0.0.1:{port}", world)
        if rank == 0:
            torch.save(parts, Path(out_dir) / "parts.pt")
    except BaseException as exc:  # noqa: BLE001 - report any failure to the parent, then exit non-zero
        err = {"time": time.time(), "rank": rank, "type": type(exc).__name__, "message": str(exc),
               "traceback": traceback.format_exc()}
        (Path(out_dir) / f"error{rank}.json").write_text(json.dumps(err))
        sys.stderr.flush()
        os._exit(1)  # no waiting on peers that may be gone


def run_spawned(jobs: list[Job]) -> list[list[dict[str, Any]]]:
    """Run ``jobs`` (same worker count and devices) in turn with one local process per worker;
    each job's parts; the first failure is raised, naming its worker.

    Workers are fresh interpreters (``python -m partime_sim.backends.launch --spawned ...``), not
    ``multiprocessing`` children, so the caller's script needs no ``if __name__ == "__main__"`` guard."""
    import subprocess

    job = jobs[0]
    world = job.workers.num_workers
    if any((j.devices, j.pin_cores) != (job.devices, job.pin_cores) for j in jobs):
        raise ConfigError("jobs run together must share their devices and pin_cores; got "
                          f"{sorted({(str(j.devices), j.pin_cores) for j in jobs})}")
    for j in jobs:
        check_distributed(j)
    with tempfile.TemporaryDirectory(prefix="partime-run-") as tmp:
        job_path = str(Path(tmp) / "job.pt")
        torch.save(jobs, job_path)
        port = free_port()
        procs = [subprocess.Popen([sys.executable, "-m", "partime_sim.backends.launch", "--spawned", str(r),
                                   str(world), str(port), job_path, tmp]) for r in range(world)]
        try:
            failed = _watch(procs)
        except KeyboardInterrupt:
            _kill(procs)
            raise
        if failed is not None:
            codes = [p.poll() for p in procs]  # before we stop the others
            _kill(procs)
            raise _first_error(Path(tmp), codes, job)
        return torch.load(Path(tmp) / "parts.pt", weights_only=False)


def _watch(procs: list) -> int | None:
    """Wait until all exit 0 (None) or one fails (its rank)."""
    while True:
        codes = [p.poll() for p in procs]
        for r, code in enumerate(codes):
            if code not in (None, 0):
                return r
        if all(code == 0 for code in codes):
            return None
        time.sleep(0.02)


def _kill(procs: list) -> None:
    import subprocess

    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + KILL_GRACE_S
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _first_error(tmp: Path, codes: list[int | None], job: Job) -> Exception:
    """The cause: a worker that died without reporting (killed), else the earliest error a
    worker reported (later ones are its peers losing their connection to it)."""
    errors = [json.loads(f.read_text()) for f in tmp.glob("error*.json")]
    reported = {e["rank"] for e in errors}
    for rank, code in enumerate(codes):
        if code not in (None, 0) and rank not in reported:
            how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
            return worker_error(rank, job.devices[rank], "WorkerDied",
                                f"its process {how} without reporting an error (killed, or out of memory?)")
    first = min(errors, key=lambda e: e["time"])
    return worker_error(first["rank"], job.devices[first["rank"]], first["type"], first["message"])


def main(argv: list[str] | None = None) -> int:
    """``torchrun ... -m partime_sim.backends.launch [run flags]``: this rank's share of ``run``
    (``--spawned RANK WORLD PORT JOB OUT``: a worker started by ``run_spawned``)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--spawned"]:
        rank, world, port, job_path, out_dir = argv[1:6]
        _spawned_main(int(rank), int(world), int(port), job_path, out_dir)
        return 0
    from partime_sim.cli import main as cli_main

    return cli_main(["run", "--transport", "distributed", *argv])


if __name__ == "__main__":
    sys.exit(main())
