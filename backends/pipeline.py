"""Run a schedule for real: each worker (one per device of the schedule) executes its share of
the task table with the torch reference emulator's own code, and hands results to the others
through a transport (``local`` threads or ``distributed`` processes).

Why this shape: exactness. A worker *is* the reference interpreter (``emulator_torch._Run``)
restricted to its tasks, so every stage does the same arithmetic in the same order as in the
oracle; only where a result comes from differs (a message instead of a dict entry). On CPU in
float64 the backend's losses and weights therefore equal ``emulate_torch`` bit for bit.

A worker walks its tasks in table order (each device's issue order), receives the results of
other workers' tasks just before the task that reads them, times every task with a monotonic
ns clock (CUDA events on GPU), and sends every result another worker reads as soon as it
exists. ``BARRIER`` tasks (the lockstep tick of ``partime``) are a real barrier of all workers.
The measured trace uses the schema of the simulator's (``trace.make_trace``, source
``measured``), so ``metrics.summarize`` applies unchanged.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from partime_sim.compensation import CompensationPlan, compensation_plan
from partime_sim.emulator_torch import (EmulationResult, _Activation, _check_schedule, _dtype, _InputGrad,
                                        _loss_name, _Run, _wiring)
from partime_sim.errors import ConfigError, PartimeError, ScheduleError
from partime_sim.optimizers import OptimizerSpec
from partime_sim.schedule import B, BARRIER, BI, BW, COMPUTE, F, OPT, Schedule
from partime_sim.trace import make_trace

TRANSPORTS = ("local", "distributed")
_WORK_KINDS = (F, B, BI, BW, OPT)
_DEVICE_RE = re.compile(r"cpu|cuda(:\d+)?")


class WorkerError(PartimeError):
    """A worker of a real run failed; the message names the worker and its error."""


def parse_devices(devices: str | Sequence[str]) -> list[str]:
    """``"cpu,cpu"`` or ``["cuda:0", "cuda:1"]`` -> a checked list of torch device strings."""
    items = [d.strip() for d in (devices.split(",") if isinstance(devices, str) else devices)]
    if not items or any(not d for d in items):
        raise ConfigError(f"devices={devices!r} is empty or has an empty entry; give e.g. 'cpu,cpu' or 'cuda:0,cuda:1'")
    for d in items:
        if not _DEVICE_RE.fullmatch(d):
            raise ConfigError(f"device {d!r} is unknown; use 'cpu', 'cuda' or 'cuda:N'")
        if d.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ConfigError(f"device {d!r} needs CUDA, which this torch build/machine does not have; use 'cpu'")
            index = int(d.split(":")[1]) if ":" in d else 0
            if index >= torch.cuda.device_count():
                raise ConfigError(f"device {d!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    return [d if d != "cuda" else "cuda:0" for d in items]  # an index: torch.cuda.set_device needs one


# ---- who runs what, and which messages cross workers -------------------------------------------
@dataclass(frozen=True)
class WorkerPlan:
    """The schedule's tasks split over workers (one per device the schedule uses).

    ``tasks[w]``: worker w's tasks in table order (its compute tasks and every BARRIER);
    ``sends[w]``: task -> the workers that read its result; ``incoming[w]``: for each peer, the
    (task, tensor shape) of every message w receives from it, in the order the peer sends."""

    num_workers: int
    worker_of_stage: tuple[int, ...]
    worker_of_task: np.ndarray
    tasks: tuple[np.ndarray, ...]
    sends: tuple[dict[int, list[int]], ...]
    incoming: tuple[dict[int, list[tuple[int, tuple[int, ...]]]], ...]


def plan_workers(schedule: Schedule, in_src: Sequence[int], co_src: Sequence[int],
                 in_shapes: Sequence[tuple[int, ...]], out_shapes: Sequence[tuple[int, ...]]) -> WorkerPlan:
    """Split ``schedule`` over the devices it uses (IR devices, renumbered densely) and list the
    messages: task i's result goes to every other worker with a task that reads it."""
    s = schedule
    work = np.isin(s.kind, _WORK_KINDS)
    used = np.unique(s.device[work & (s.device >= 0)])
    rank_of = {int(d): r for r, d in enumerate(used.tolist())}
    worker_of_task = np.full(len(s), -1, dtype=np.int64)
    worker_of_task[work] = [rank_of[int(d)] for d in s.device[work]]
    worker_of_stage = []
    for k in range(s.num_stages):
        owners = np.unique(worker_of_task[work & (s.stage == k)])
        if owners.size != 1:
            raise ScheduleError(f"{s.name}: stage {k} has tasks on {owners.size} devices; the backend keeps a "
                                "stage's weights on one device, so put all of a stage's tasks on one device")
        worker_of_stage.append(int(owners[0]))
    W = len(used)
    barrier = s.kind == BARRIER
    tasks = tuple(np.flatnonzero((worker_of_task == w) | barrier) for w in range(W))
    sends: list[dict[int, list[int]]] = [{} for _ in range(W)]
    incoming: list[dict[int, list[tuple[int, tuple[int, ...]]]]] = [{} for _ in range(W)]
    pairs = set()
    for j in np.flatnonzero(work).tolist():
        for src in (in_src[j], co_src[j]):
            if src >= 0 and worker_of_task[src] != worker_of_task[j]:
                pairs.add((src, int(worker_of_task[j])))
    for src, dst in sorted(pairs):  # table order = the order the sender publishes
        k = int(s.stage[src])
        shape = (1, *(out_shapes[k] if s.kind[src] == F else in_shapes[k]))
        sender = int(worker_of_task[src])
        sends[sender].setdefault(src, []).append(dst)
        incoming[dst].setdefault(sender, []).append((src, shape))
    return WorkerPlan(W, tuple(worker_of_stage), worker_of_task, tasks, tuple(sends), tuple(incoming))


# ---- one worker ----------------------------------------------------------------------------------
@dataclass
class Job:
    """Everything a worker needs (picklable: spawned processes load it from a file)."""

    schedule: Schedule
    stages: list[nn.Module]
    x: Any
    y: np.ndarray
    loss: str
    spec: OptimizerSpec
    dtype: torch.dtype
    stash_weights: bool
    plan: CompensationPlan
    devices: list[str]
    workers: WorkerPlan
    keep_outputs: bool = False
    threads: int | None = None  # torch threads per worker (distributed: cores / workers; local: the caller's)
    waves: tuple[int, int] = (0, 2**62)  # run the tasks of these waves [lo, hi): a checkpoint cuts at hi
    resume: list[dict[str, Any]] | None = None  # per-rank states captured at wave lo
    cuda_graphs: bool = False  # inference forwards replayed from one CUDA graph per stage
    pin_cores: bool = True  # distributed CPU workers: each bound to cores of its own (backends/affinity.py)

    def barriers(self) -> int:
        """How many barriers every worker meets in this job's waves (``partime``'s ticks)."""
        lo, hi = self.waves
        s = self.schedule
        return int(np.count_nonzero((s.kind == BARRIER) & (s.wave >= lo) & (s.wave < hi)))

    def incoming(self, rank: int) -> dict[int, list[tuple[int, tuple[int, ...]]]]:
        """The messages rank receives in this job's waves (sent by tasks of those waves)."""
        lo, hi = self.waves
        wave = self.schedule.wave
        got = {peer: [(t, sh) for t, sh in msgs if lo <= wave[t] < hi]
               for peer, msgs in self.workers.incoming[rank].items()}
        return {peer: msgs for peer, msgs in got.items() if msgs}


class _Clock:
    """Task start/end stamps: ``perf_counter_ns`` on CPU, CUDA events on a GPU (resolved at
    the end, so timing never synchronises the stream). Times count from ``origin_ns`` (a
    ``perf_counter_ns`` instant all workers share), on a GPU via the host time of an origin event."""

    def __init__(self, device: torch.device, origin_ns: int | None = None) -> None:
        self.cuda = device.type == "cuda"
        self.stamps: list[Any] = []
        self.shift_s = 0.0  # GPU: seconds from origin_ns to the origin event, so all workers share one axis
        if not self.cuda:
            self.origin = origin_ns if origin_ns is not None else self._stamp()
            return
        # wait for this stream's event only: a device-wide sync would also wait for the receives a
        # distributed worker has posted, whose sends come later
        self.origin = self._stamp()
        self.origin.synchronize()
        if origin_ns is not None:
            self.shift_s = (time.perf_counter_ns() - origin_ns) / 1e9

    def _stamp(self) -> Any:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter_ns()

    def stamp(self) -> None:
        self.stamps.append(self._stamp())

    def seconds(self) -> np.ndarray:
        if self.cuda:
            if self.stamps:  # every stamp is on this worker's stream: the last one done, all are
                self.stamps[-1].synchronize()
            return self.shift_s + np.array([self.origin.elapsed_time(e) / 1e3 for e in self.stamps])
        return (np.array(self.stamps, dtype=np.int64) - self.origin) / 1e9


class _Worker(_Run):
    """The reference interpreter on one worker's tasks, with messages to and from the others."""

    def __init__(self, job: Job, rank: int, transport: Any) -> None:
        wp = job.workers
        device = torch.device(job.devices[rank])
        owned = [m if wp.worker_of_stage[k] == rank else None for k, m in enumerate(job.stages)]
        super().__init__(job.schedule, owned, job.x, job.y, job.loss, job.spec, job.dtype, job.stash_weights,
                         job.plan, tasks=wp.tasks[rank], devices=[device] * len(owned))
        self.rank, self.device, self.transport, self.wp = rank, device, transport, wp
        self.shapes = {task: shape for msgs in wp.incoming[rank].values() for task, shape in msgs}
        self.outputs: dict[int, torch.Tensor] | None = {} if job.keep_outputs else None
        self.clock: _Clock | None = None
        lo, hi = job.waves
        wave = job.schedule.wave[self.order]
        self.order = self.order[(wave >= lo) & (wave < hi)]  # readers outside still count in ``remaining``
        self.cut = hi if hi < 2**62 else None
        self.incoming = job.incoming(rank)
        self.received: set[int] = set()
        self.checkpoint: dict[str, Any] | None = None
        self.pinned: torch.Tensor | None = None
        self.graphs: dict[int, _GraphedForward] | None = {} if job.cuda_graphs else None
        if device.type == "cuda" and wp.worker_of_stage[0] == rank:  # inputs copied from pinned memory
            self.pinned = torch.as_tensor(np.asarray(job.x), dtype=job.dtype).pin_memory()
        if job.resume is not None:
            from partime_sim.backends.checkpoint import restore

            restore(self, job.resume[rank])

    def execute(self, origin_ns: int | None = None) -> None:
        """Run the tasks; times count from ``origin_ns`` (``perf_counter_ns``; default: now)."""
        s, store, clock = self.s, self.store, _Clock(self.device, origin_ns)
        self.clock = clock
        kinds = s.kind.tolist()
        for i in self.order.tolist():
            if kinds[i] == BARRIER:
                clock.stamp()
                self.transport.barrier()
                clock.stamp()
                continue
            for src in (self.in_src[i], self.co_src[i]):
                if src >= 0 and src not in store and self.wp.worker_of_task[src] != self.rank:
                    self._receive(src)
            clock.stamp()
            self.run_task(i)
            clock.stamp()
        self.transport.finish()
        if self.cut is not None:  # what was sent to us before the cut is part of our state
            for peer, msgs in self.incoming.items():
                for task, _ in msgs:
                    if task not in self.received:
                        self._receive(task)
            from partime_sim.backends.checkpoint import capture

            self.checkpoint = capture(self, self.cut)

    def _call(self, st: Any, inp: torch.Tensor, m: int, weights: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        if self.graphs is None:
            return super()._call(st, inp, m, weights)
        if st.k not in self.graphs:  # captured at the stage's first forward, on its first input
            super()._call(st, inp, m, weights)  # shape errors surface here, eagerly, as without graphs
            self.graphs[st.k] = _GraphedForward(st.module, inp)
        return self.graphs[st.k](inp)

    def _sample_input(self, m: int) -> torch.Tensor:
        if self.pinned is None:
            return super()._sample_input(m)
        return self.pinned[m:m + 1].to(self.device, non_blocking=True)

    def _receive(self, src: int) -> None:
        tensor = self.transport.recv(src, int(self.wp.worker_of_task[src]), self.shapes[src], self.dtype)
        self.store[src] = _Activation(None, tensor, -1, {}) if self.s.kind[src] == F else _InputGrad(tensor)
        self.received.add(src)

    def _keep(self, i: int, value: Any) -> None:
        super()._keep(i, value)
        if self.outputs is not None and self.s.kind[i] == F and self.s.stage[i] == self.num_stages - 1:
            self.outputs[int(self.s.sample[i])] = value.out.detach().cpu()

    def _publish(self, i: int, value: Any) -> None:
        dsts = self.wp.sends[self.rank].get(i)
        if dsts:
            tensor = value.out.detach() if self.s.kind[i] == F else value.grad_in
            for dst in dsts:
                self.transport.send(i, dst, tensor)

    def part(self) -> dict[str, Any]:
        """What this worker measured and learned, for rank 0 to merge (CPU tensors, numpy)."""
        times = self.clock.seconds().reshape(-1, 2)
        mine = ~np.isnan(self.losses)
        return {
            "rank": self.rank, "tasks": self.order, "start": times[:, 0], "end": times[:, 1],
            "samples": np.flatnonzero(mine), "loss": self.losses[mine],
            "correct": None if self.correct is None else self.correct[mine],
            "all_tasks": self.wp.tasks[self.rank], "version": self.version[self.wp.tasks[self.rank]],
            "state": {k: {n: t.detach().cpu().clone() for n, t in st.module.state_dict().items()}
                      for k, st in enumerate(self.stages) if st is not None},
            "updates": {k: st.version for k, st in enumerate(self.stages) if st is not None},
            "peak": self.peak, "outputs": self.outputs, "checkpoint": self.checkpoint,
        }


class _GraphedForward:
    """A stage's inference forward captured once as a CUDA graph and replayed for every sample,
    as PARTIME runs its per-tick step: one graph launch instead of a kernel launch per layer,
    which is what bounds a batch-1 stream on a GPU. The input is copied into the graph's static
    buffer and the output copied out (the next replay overwrites it). Captured in thread-local
    mode, so the other stages' threads on the same GPU keep running during the capture."""

    def __init__(self, module: nn.Module, example: torch.Tensor, warmup: int = 3) -> None:
        self.static_in = example.detach().clone()
        here = torch.cuda.current_stream(example.device)
        side = torch.cuda.Stream(example.device)
        side.wait_stream(here)
        with torch.no_grad():
            with torch.cuda.stream(side):  # libraries pick and allocate their kernels outside the capture
                for _ in range(warmup):
                    module(self.static_in)
            here.wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            # on this worker's own stream: the default capture stream is one per process, on one device
            with torch.cuda.graph(self.graph, stream=side, capture_error_mode="thread_local"):
                self.static_out = module(self.static_in)

    def __call__(self, inp: torch.Tensor) -> torch.Tensor:
        self.static_in.copy_(inp)
        self.graph.replay()
        return self.static_out.clone()


def run_worker(job: Job, rank: int, transport: Any, origin_ns: int | None = None) -> dict[str, Any]:
    """Run worker ``rank`` of ``job`` to the end; its ``part`` of the result."""
    def work() -> dict[str, Any]:
        worker = _Worker(job, rank, transport)
        worker.execute(origin_ns)
        return worker.part()

    device = torch.device(job.devices[rank])
    with torch.inference_mode(False), torch.enable_grad():
        if device.type != "cuda":
            return work()
        # built, run and read back on one stream of its own: the weight copies the worker makes
        # first and the results it reads back last are then ordered with its tasks
        with torch.cuda.device(device), torch.cuda.stream(torch.cuda.Stream(device)):
            return work()


# ---- the run ---------------------------------------------------------------------------------------
@dataclass
class RunResult(EmulationResult):
    """A real run: what the reference emulator returns, plus the measured trace (the schema of
    ``trace.make_trace``, source "measured"), the last stage's outputs (when asked), the wall
    time and where it ran."""

    trace: pd.DataFrame = field(default_factory=pd.DataFrame)
    outputs: np.ndarray | None = None
    wall_s: float = 0.0
    transport: str = "local"
    devices: list[str] = field(default_factory=list)
    cores: list[tuple[int, ...] | None] = field(default_factory=list)  # per worker: the cores it was bound to


def make_job(schedule: Schedule, stages: Sequence[nn.Module], x: Any, y: Any, *, devices: str | Sequence[str],
             loss: str | None = None, optimizer: OptimizerSpec | None = None, dtype: Any = "float32",
             stash_weights: bool = True, compensation: str = "none", keep_outputs: bool = False,
             threads: int | None = None, cuda_graphs: bool = False, pin_cores: bool = True) -> Job:
    """Check the inputs (with the reference emulator's checks and messages) and plan the workers."""
    from partime_sim.models import check_stage_shapes

    dtype = _dtype(dtype)
    spec = optimizer if optimizer is not None else OptimizerSpec()
    if not isinstance(spec, OptimizerSpec):
        raise ConfigError(f"optimizer={spec!r} must be an OptimizerSpec, e.g. OptimizerSpec('adam', lr=1e-3)")
    stages = list(stages)
    _check_schedule(schedule, stages)
    devs = parse_devices(devices)
    N = schedule.num_samples
    for what, arr in (("x", x), ("y", y)):
        if len(arr) < N:
            raise ConfigError(f"{what} has {len(arr)} samples but schedule {schedule.name!r} needs {N}; "
                              f"give a longer stream or generate the schedule for {len(arr)} samples")
    y_np = (y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y))[:N]
    loss = _loss_name(loss, y_np)
    plan = compensation_plan(schedule, compensation)
    if plan.name == "stash" and not stash_weights:
        raise ConfigError("compensation='stash' contradicts stash_weights=False; drop one of the two")
    in_src, co_src, _ = _wiring(schedule, plan.forward_of)
    cast = [_cast(m, dtype) for m in stages]
    in_shape = tuple(np.asarray(x[:1]).shape[1:]) if not isinstance(x, torch.Tensor) else tuple(x.shape[1:])
    out_shapes = check_stage_shapes(cast, in_shape)
    in_shapes = [in_shape, *out_shapes[:-1]]
    wp = plan_workers(schedule, in_src, co_src, in_shapes, out_shapes)
    if len(devs) != wp.num_workers:
        raise ConfigError(f"schedule {schedule.name!r} runs on {wp.num_workers} device(s) but devices={devs} "
                          f"lists {len(devs)}; give one device per pipeline device (repeat 'cpu' or a GPU as needed)")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads={threads!r} is invalid; give an integer >= 1 (torch threads per worker process)")
    if cuda_graphs:
        _check_cuda_graphs(schedule, devs)
    return Job(schedule, cast, x[:N], y_np, loss, spec, dtype, stash_weights, plan, devs, wp, keep_outputs, threads,
               cuda_graphs=bool(cuda_graphs), pin_cores=bool(pin_cores))


def _check_cuda_graphs(schedule: Schedule, devices: Sequence[str]) -> None:
    if schedule.mode != "infer":
        raise ConfigError(f"cuda_graphs captures inference forwards only, but schedule {schedule.name!r} trains: "
                          "use --mode infer, or drop --cuda-graphs (a training forward builds its autograd graph "
                          "on a new weight version after every update, which a captured graph cannot replay)")
    cpus = [d for d in devices if not d.startswith("cuda")]
    if cpus:
        raise ConfigError(f"cuda_graphs needs CUDA devices, but devices={list(devices)} lists {cpus[0]!r}; "
                          "run on cuda:N devices or drop --cuda-graphs")


def _cast(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    import copy

    return copy.deepcopy(module).to(dtype).eval()


def run_pipeline(schedule: Schedule, stages: Sequence[nn.Module], x: Any, y: Any, *,
                 devices: str | Sequence[str], transport: str = "local", loss: str | None = None,
                 optimizer: OptimizerSpec | None = None, dtype: Any = "float32", stash_weights: bool = True,
                 compensation: str = "none", keep_outputs: bool = False, threads: int | None = None,
                 checkpoint_at: int | None = None, checkpoint: str | None = None,
                 resume: str | None = None, cuda_graphs: bool = False) -> RunResult | None:
    """Execute ``schedule`` on ``stages`` over the stream ``(x, y)`` on real devices.

    ``devices`` gives one torch device per device the schedule uses (``"cpu,cpu"``,
    ``["cuda:0", "cuda:1"]``; with the local transport a GPU may repeat: each worker gets its own
    CUDA stream).
    ``transport`` is ``local`` (threads of this process) or ``distributed`` (one spawned
    process per device, gloo on CPU, NCCL on GPU). The arguments mean what they mean for
    ``emulate_torch``; with ``keep_outputs`` the last stage's outputs come back in sample order;
    ``threads`` sets each worker's torch threads (default: distributed, cores / workers; local,
    the caller's count);
    ``cuda_graphs`` (inference on GPUs) replays each stage's forward from a captured CUDA graph.

    Checkpointing: with ``checkpoint_at=W`` and ``checkpoint=PATH`` the run stops once every
    task of a wave < W (``schedule.wave``) is done, writes every worker's state to PATH and
    returns None; ``resume=PATH`` (same schedule, stages, stream and settings) goes on from
    there to the result an uninterrupted run gives, bit for bit (its trace covers the resumed
    part only).
    """
    from dataclasses import replace as replaced

    from partime_sim.backends import checkpoint as ckpt

    if transport not in TRANSPORTS:
        raise ConfigError(f"transport={transport!r} is unknown; use one of {TRANSPORTS}")
    if (checkpoint_at is None) != (checkpoint is None):
        raise ConfigError("checkpoint_at= and checkpoint= go together: the wave to stop at and the file to write")
    job = make_job(schedule, stages, x, y, devices=devices, loss=loss, optimizer=optimizer, dtype=dtype,
                   stash_weights=stash_weights, compensation=compensation, keep_outputs=keep_outputs,
                   threads=threads, cuda_graphs=cuda_graphs)
    if checkpoint_at is not None:
        last = int(schedule.wave.max())
        if isinstance(checkpoint_at, bool) or not isinstance(checkpoint_at, int) or not 0 < checkpoint_at <= last:
            raise ConfigError(f"checkpoint_at={checkpoint_at!r} is not a wave inside the run; use 1..{last}")
        job = replaced(job, waves=(0, checkpoint_at))
    if resume is not None:
        states = ckpt.load(resume)
        if len(states) != job.workers.num_workers:
            raise ConfigError(f"checkpoint {resume!r} has {len(states)} workers but this run has "
                              f"{job.workers.num_workers}; resume with the settings that wrote it")
        job = replaced(job, waves=(states[0]["cut"], 2**62), resume=states)
    t0 = time.perf_counter()
    if transport == "local":
        parts = run_local(job)
    else:
        from partime_sim.backends.launch import run_spawned

        parts = run_spawned([job])[0]
    if checkpoint is not None:
        ckpt.save([p["checkpoint"] for p in sorted(parts, key=lambda p: p["rank"])], checkpoint)
        return None
    return assemble(job, parts, time.perf_counter() - t0, transport)


def run_local(job: Job) -> list[dict[str, Any]]:
    """One thread per worker, each computing with ``job.threads`` torch threads (default: the
    caller's count); the first failure aborts the others and is raised, naming its worker."""
    import threading

    from partime_sim.backends.transport import Aborted, LocalHub, LocalTransport

    W = job.workers.num_workers
    hub = LocalHub(W)
    origin = time.perf_counter_ns()  # one clock for all threads
    parts: list[Any] = [None] * W
    errors: list[tuple[float, int, BaseException]] = []

    threads_each = job.threads or torch.get_num_threads()  # the caller's setting, read in its thread

    def target(w: int) -> None:
        try:
            # a new thread computes with the process's initial OpenMP team, not the caller's
            # set_num_threads: once a 2-thread op had run, a 1-thread calibration on 2 cores ran
            # conv30@16 2.3x slower (two OpenMP threads per worker); set it in every worker
            torch.set_num_threads(threads_each)
            parts[w] = run_worker(job, w, LocalTransport(hub, w, torch.device(job.devices[w])), origin)
        except Aborted:
            pass
        except BaseException as exc:  # noqa: BLE001 - any failure stops the run and is reported
            errors.append((time.monotonic(), w, exc))
            hub.abort()

    threads = [threading.Thread(target=target, args=(w,), name=f"partime-worker-{w}", daemon=True)
               for w in range(W)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.1)
    except KeyboardInterrupt:
        hub.abort()
        for t in threads:
            t.join(5)
        raise
    if errors:
        _, w, exc = min(errors, key=lambda e: e[0])
        raise worker_error(w, job.devices[w], type(exc).__name__, str(exc)) from exc
    return parts


def worker_error(rank: int, device: str, kind: str, message: str) -> WorkerError:
    return WorkerError(f"worker {rank} ({device}) failed: {kind}: {message}")


def assemble(job: Job, parts: Sequence[dict[str, Any]], wall_s: float, transport: str) -> RunResult:
    """Merge the workers' parts into one result and the measured trace."""
    s = job.schedule
    N = s.num_samples
    losses = np.full(N, np.nan)
    correct = np.zeros(N, dtype=bool) if job.loss == "cross_entropy" else None
    version = np.full(len(s), -1, dtype=np.int64)
    state: dict[int, dict[str, torch.Tensor]] = {}
    updates: dict[int, int] = {}
    outputs: dict[int, torch.Tensor] = {}
    rows = []
    for p in parts:
        losses[p["samples"]] = p["loss"]
        if correct is not None:
            correct[p["samples"]] = p["correct"]
        version[p["all_tasks"]] = p["version"]
        state.update(p["state"])
        updates.update(p["updates"])
        outputs.update(p["outputs"] or {})
        keep = s.kind[p["tasks"]] != BARRIER if p["rank"] else np.ones(len(p["tasks"]), dtype=bool)
        rows.append((p["rank"], p["tasks"][keep], p["start"][keep], p["end"][keep]))
    missing = np.flatnonzero(np.isnan(losses))
    if missing.size:
        raise ScheduleError(f"{s.name}: sample {int(missing[0])} never reached the last stage")
    rank = np.concatenate([np.full(len(t), r) for r, t, _, _ in rows])
    tasks = np.concatenate([t for _, t, _, _ in rows])
    start = np.concatenate([a for _, _, a, _ in rows])
    end = np.concatenate([b for _, _, _, b in rows])
    order = np.lexsort((tasks, start))
    rank, tasks, start, end = rank[order], tasks[order], start[order], end[order]
    barrier = s.kind[tasks] == BARRIER
    t0 = start.min() if start.size else 0.0
    trace = make_trace(device=np.where(barrier, -1, rank), lane=np.full(len(tasks), COMPUTE),
                       stage=s.stage[tasks], kind=s.kind[tasks], sample=s.sample[tasks], tick=s.tick[tasks],
                       start=start - t0, end=end - t0, source="measured")
    out = None
    if job.keep_outputs:
        if sorted(outputs) != list(range(N)):
            raise ScheduleError(f"{s.name}: outputs came back for {len(outputs)} of {N} samples")
        out = torch.cat([outputs[m] for m in range(N)]).numpy()
    return RunResult(
        schedule=s.name, loss=losses, correct=correct, final_state=[state[k] for k in range(s.num_stages)],
        task_version=version, updates=np.array([updates[k] for k in range(s.num_stages)]),
        peak_stored=max(p["peak"] for p in parts), compensation=job.plan.name, delays=job.plan.delays,
        trace=trace, outputs=out, wall_s=wall_s, transport=transport, devices=list(job.devices),
        cores=[p.get("cores") for p in sorted(parts, key=lambda p: p["rank"])])


__all__ = ["Job", "RunResult", "TRANSPORTS", "WorkerError", "WorkerPlan", "make_job", "parse_devices",
           "plan_workers", "run_local", "run_pipeline", "run_worker"]
