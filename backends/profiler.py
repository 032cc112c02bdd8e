"""Profiler: measure a model's per-layer costs and the links between devices, and write them as
the Network + Cluster the simulator loads.

Why: the catalogue's analytic costs are a roofline on a reference GPU; a prediction for *this*
machine has to come from numbers measured on it. ``profile`` measures, per top-level child of
an ``nn.Sequential`` (the pipeline layers), the forward time, the input-gradient (BI) and
weight-gradient (BW) times, one optimizer step, and the activation size, on a batch of one
sample (costs are per sample); and the one-way time of a tensor between two pipeline processes
(or threads) over a range of sizes, fitted as ``latency + bytes / bandwidth``. The result is
one JSON file (``Profile.save``) that ``--network`` and ``--cluster`` both accept.

Timing: warm-up runs, then the median of ``repeats`` runs (robust to the odd descheduled run);
``time.perf_counter_ns`` on CPU, CUDA events on a GPU. On CPU the layers are timed with one
torch thread by default, because the backend runs each stage as one single-threaded process.
Calibration then replaces these with what real backend runs spend (``calibrate``): means, not
medians, because a throughput pays every slow task. On CPU the profile also measures what a
pipeline adds to isolated timings: the slowdown of workers computing at once
(``concurrency_slowdown``), the spread of task times (``meta["jitter"]``), the cost of a
lockstep tick's barrier with the tick's messages, the cost of a message to its sender and its
receiver while both compute (``Link.send_cost_s``, ``Link.recv_cost_s``; the traffic of the
profile's mode), and how much slower the network's compute runs after its core sat idle
(``Cluster.idle_penalty``).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import datetime
import json
import math
import multiprocessing as mp
import os
import platform
import queue
import re
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from partime_sim.backends.affinity import bind_worker
from partime_sim.backends.transport import TokenBarrier, lookahead
from partime_sim.catalogue import PROFILE_KIND, is_profile, profile_part
from partime_sim.cluster import Cluster, Device, Link, barrier_rounds
from partime_sim.errors import ConfigError, PartimeError
from partime_sim.network import Layer, Network, load_json
from partime_sim.optimizers import OptimizerSpec, make_torch_optimizer

TRANSPORTS = ("distributed", "local")
# one-way message sizes for the link fit: 4 B .. 16 MiB in powers of 4 (latency- to bandwidth-bound)
LINK_SIZES = tuple(4 * 4**k for k in range(12))
LINK_TIMEOUT_S = 120.0  # a link measurement that takes longer is stuck: its processes are killed
MESSAGE_STEPS = 600  # compute steps of ~0.2 ms each for the cost of a message at each end under load
MESSAGE_COST_PAIRS = 9  # (with, without messages) timings of it; the median difference counts
BARRIER_ROUNDS = 200  # barriers are cheap: time many, their mean is what a lockstep run pays
BARRIER_BLOCKS = 5  # ...in blocks: the median block mean (a lockstep run pays the tail, but not a stall of the VM)
BARRIER_COMPUTE_S = 3e-4  # each barrier round: both processes compute this long first...
BARRIER_SKEWS_S = (0.0, 1e-4, 3e-4, 1e-3, 3e-3)  # ...and the last arrival this much longer, cycling (default)
BARRIER_SKEW_POINTS = 10  # a network's tick: that many quantiles of its stages' arrival skew (tick_skews)
BARRIER_MIN_SKEW_S = 1e-4  # ...each at least this long (see tick_skews)
BARRIER_MAX_SKEW_S = 5e-3  # ...and at most this long (a skew beyond costs what this one does)
# a tick whose last two arrivals are this close pays the barrier timed with both arriving at once
# (``Cluster.barrier_close_s``): in lenet lockstep runs the barrier cost 0.6-2 ms on average
# after arrivals within ~0.02 ms of each other (rare 1.5-5 ms stalls), 0.15-0.2 ms otherwise
BARRIER_CLOSE_WINDOW_S = 2e-5
CONCURRENCY_ROUNDS = 3  # alternating (alone, together) rounds of the concurrency slowdown; the median counts
CALIBRATION_SAMPLES = 120  # fewest samples per calibration run (the first quarter is warm-up); 40 left the costs noisy
CALIBRATION_SECONDS = 1.0  # ...and at least this long measured: 0.1 s lenet runs moved 25% from one to the next
CALIBRATION_MAX_SAMPLES = 4000  # most samples per calibration run...
CALIBRATION_MAX_BYTES = 256 * 2**20  # ...and most bytes of their inputs (beyond the fewest samples)
IDLE_POINTS_S = (5e-5, 1e-4, 3e-4, 1e-3, 3e-3)  # idle times the idle penalty is measured at: a barrier's wait .. a flush
IDLE_SECONDS = 4.0  # the idle-penalty measurement lasts about this long...
IDLE_MIN_TASKS = 60  # ...with at least this many tasks after each idle time
DIST_TIMEOUT_S = 30.0  # torch.distributed rendezvous/op timeout inside the link workers


# ---- devices ---------------------------------------------------------------------------------

def parse_devices(devices: str | Sequence[str]) -> list[torch.device]:
    """``"cpu,cpu"`` or ``["cuda:0", "cuda:1"]``, checked as the backend checks its ``--devices``."""
    from partime_sim.backends.pipeline import parse_devices as checked

    return [torch.device(d) for d in checked(devices)]


def device_class(device: torch.device) -> str:
    """The device class the measured costs are filed under (``Network.class_costs``, ``Device.kind``):
    ``cpu``, or ``cuda:`` + the GPU's name as a slug (``cuda:nvidia-h100-80gb-hbm3``)."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    return "cuda:" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of ``fn()`` after ``warmup`` untimed calls (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        _sync(device)
        with torch.cuda.device(device):
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) * 1e-3)  # ms -> s
    else:
        for _ in range(repeats):
            t0 = time.perf_counter_ns()
            fn()
            times.append((time.perf_counter_ns() - t0) * 1e-9)
    return float(np.median(times))


def _check_counts(warmup: int, repeats: int) -> None:
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"repeats={repeats!r} is invalid; give an integer >= 1 (timed runs per measurement)")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"warmup={warmup!r} is invalid; give an integer >= 0 (untimed runs first)")


class _Threads:
    """``torch.set_num_threads(n)`` for the duration of a ``with`` block (None: leave as is)."""

    def __init__(self, n: int | None) -> None:
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ConfigError(f"threads={n!r} is invalid; give an integer >= 1 or None")
        self.n, self.saved = n, torch.get_num_threads()

    def __enter__(self) -> None:
        if self.n is not None:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc: Any) -> None:
        torch.set_num_threads(self.saved)


# ---- layers ----------------------------------------------------------------------------------

def _kind(module: nn.Module) -> str:
    """Class name; a Sequential shows its children's (``Linear+ReLU``)."""
    if isinstance(module, nn.Sequential) and len(module):
        return "+".join(type(m).__name__ for m in module)
    return type(module).__name__


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def profile_layers(
    model: nn.Sequential,
    input_shape: Sequence[int],
    device: str = "cpu",
    dtype: Any = "float32",
    *,
    warmup: int = 3,
    repeats: int = 10,
    threads: int | None = None,
    optimizer: OptimizerSpec | None = None,
    seed: int = 0,
    name: str = "profiled",
) -> Network:
    """Measure each top-level child of ``model`` on one sample and return the Network.

    Child k gets the real input it gets in the chain (the previous child's output on a seeded
    random sample), as a fresh leaf that requires grad, so BI (``autograd.grad`` w.r.t. that input
    only) is measured for every child, the first included, although a pipeline never needs the
    first stage's input-gradient: the simulator can then place any child first. BW is the
    gradient w.r.t. the child's weights only (0 without weights); both reuse one forward graph
    and a random cotangent. ``opt`` is one step of ``optimizer`` (the backend's plain SGD by
    default, torch's single-tensor path) on the child's weights. Per-sample sizes: ``act_bytes``
    is the child's output, ``param_bytes`` its weights, ``input_bytes`` the sample.

    ``model`` is copied (the measured SGD steps do not touch it). ``threads``: torch CPU threads
    while timing, restored after; default 1 on CPU (the backend's one thread per stage process).
    The Network's layer costs are this device's seconds, and ``class_costs`` files the same rows
    under ``device_class(device)`` so a cluster of that class picks them.
    """
    from partime_sim.models import _torch_dtype

    if not isinstance(model, nn.Sequential) or not len(model):
        raise ConfigError(f"model is a {type(model).__name__}; profile an nn.Sequential whose children are "
                          "the pipeline layers")
    _check_counts(warmup, repeats)
    dev = parse_devices([device])[0]
    tdtype = _torch_dtype(dtype)
    model = copy.deepcopy(model).to(dev, tdtype)
    opt_spec = optimizer or OptimizerSpec("sgd")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((1, *(int(s) for s in input_shape)), generator=gen, dtype=tdtype).to(dev)
    input_bytes = _nbytes(x)
    layers, rows = [], []
    with _Threads(threads if threads is not None else (1 if dev.type == "cpu" else None)):
        for child_name, child in model.named_children():
            inp = x.detach().requires_grad_(True)
            try:
                out = child(inp)
            except (RuntimeError, ValueError, IndexError) as exc:
                raise ConfigError(f"layer {child_name!r} ({_kind(child)}) cannot take an input of shape "
                                  f"{tuple(inp.shape[1:])}: {str(exc).strip().splitlines()[0]}; check "
                                  "--input-shape and the layer sizes") from None
            if not isinstance(out, torch.Tensor) or not out.requires_grad:
                raise ConfigError(f"layer {child_name!r} ({_kind(child)}) does not return a differentiable "
                                  "tensor; every pipeline layer must map a tensor to a tensor")
            params = [p for p in child.parameters() if p.requires_grad]
            cot = torch.randn(out.shape, generator=gen, dtype=tdtype).to(dev)
            fwd = median_time(lambda: child(inp), dev, warmup, repeats)
            bi = median_time(lambda: torch.autograd.grad(out, [inp], cot, retain_graph=True), dev, warmup, repeats)
            bw = opt = 0.0
            if params:
                def weight_grads() -> tuple[torch.Tensor | None, ...]:
                    return torch.autograd.grad(out, params, cot, retain_graph=True, allow_unused=True)

                bw = median_time(weight_grads, dev, warmup, repeats)
                for p, g in zip(params, weight_grads()):
                    p.grad = g
                step = make_torch_optimizer(opt_spec, params).step  # last: it changes weights the graph saved
                opt = median_time(step, dev, warmup, repeats)
            layers.append(Layer(child_name, fwd, bi, bw, act_bytes=_nbytes(out) // out.shape[0],
                                param_bytes=sum(_nbytes(p) for p in child.parameters()), opt=opt,
                                kind=_kind(child)))
            rows.append((fwd, bi, bw))
            x = out.detach()
    return Network(name, tuple(layers), input_bytes=input_bytes,
                   class_costs={device_class(dev): tuple(rows)})


def _backend_task_stats(stages: list[nn.Module], x: np.ndarray, y: np.ndarray, device: str, dtype: Any,
                        mode: str, threads: int | None) -> tuple[np.ndarray, float]:
    """One real ``sequential`` run of ``stages`` on ``device``: the (stages, 3) mean seconds of
    its F, B and OPT tasks, and the coefficient of variation of the task times (duration-weighted
    over stages and kinds). The first quarter of the run is warm-up and skipped. Means, not
    medians: a throughput is total time over samples, so the rare slow task counts."""
    from partime_sim.backends.pipeline import run_pipeline
    from partime_sim.generators import generate
    from partime_sim.schedule import B, F, OPT

    kinds = (F,) if mode == "infer" else (F, B, OPT)
    with _Threads(threads if threads is not None else 1):
        result = run_pipeline(generate("sequential", len(stages), len(x), mode), stages, x, y,
                              devices=[device], dtype=dtype)
    tr = result.trace
    tr = tr[tr["start"] >= tr["end"].max() / 4]
    mean = np.zeros((len(stages), 3))
    weight, spread = 0.0, 0.0
    for col, kind in enumerate((F, B, OPT)):
        if kind in kinds:
            rows = tr[tr["kind"].cat.codes == kind]
            dur = (rows["end"] - rows["start"]).groupby(rows["stage"])
            mean[:, col] = dur.mean().reindex(range(len(stages))).fillna(0.0).to_numpy()
            total = dur.sum()
            weight += float(total.sum())
            spread += float((dur.std().fillna(0.0) / dur.mean() * total).sum())
    return mean, (spread / weight if weight > 0 else 0.0)


def _calibration_stream(model: nn.Sequential, input_shape: Sequence[int], samples: int) -> tuple[np.ndarray, ...]:
    """Random inputs and zero targets of the model's output shape (mse to zero: any output works)."""
    from partime_sim.models import check_stage_shapes

    out_shape = check_stage_shapes([copy.deepcopy(model).float()], input_shape)[-1]
    gen = np.random.default_rng(0)
    x = gen.standard_normal((samples, *input_shape)).astype(np.float32)
    return x, np.zeros((samples, int(np.prod(out_shape))), dtype=np.float32)


def calibration_samples(network: Network, mode: str = "train", seconds: float = CALIBRATION_SECONDS) -> int:
    """Samples per calibration run so that its measured part (all but the first quarter) lasts
    about ``seconds`` by the direct per-layer timings of ``network`` (which leave out the
    backend's per-task overheads, so the run lasts longer), at least ``CALIBRATION_SAMPLES``, at
    most ``CALIBRATION_MAX_SAMPLES`` or ``CALIBRATION_MAX_BYTES`` of inputs.
    Why: a fixed count made a small network's calibration a 0.1 s run, and on a shared machine
    the speed of 0.1 s runs moves by a quarter from one to the next."""
    if not (seconds >= 0 and math.isfinite(seconds)):
        raise ConfigError(f"calibration seconds={seconds!r} is invalid; give a finite number >= 0")
    per_sample = sum(lay.fwd + (lay.bwd_input + lay.bwd_weight + lay.opt if mode == "train" else 0.0)
                     for lay in network.layers)
    wanted = math.ceil(seconds * 4 / 3 / per_sample) if per_sample > 0 else CALIBRATION_MAX_SAMPLES
    most = min(CALIBRATION_MAX_SAMPLES, CALIBRATION_MAX_BYTES // max(network.input_bytes, 1))
    return int(max(min(wanted, most), CALIBRATION_SAMPLES))


def calibrate(network: Network, model: nn.Sequential, input_shape: Sequence[int], device: str = "cpu",
              dtype: Any = "float32", mode: str = "train", *, samples: int = CALIBRATION_SAMPLES,
              threads: int | None = None) -> tuple[Network, tuple[float, float, float], float]:
    """Layer costs and per-task overheads as the backend itself spends them.

    A layer timed alone (``profile_layers``) misses what the backend adds per task: Python,
    autograd bookkeeping, the weight snapshot a forward takes, the gradient accumulator, the
    loss. Two real runs of the ``sequential`` schedule on ``device`` measure it: one with every
    layer its own stage (L tasks of each kind per sample), one with the whole model as one stage
    (1 task). Per kind (forward, backward, optimizer step) the per-task overhead is the excess of
    the first over the second, divided by L - 1 (optimizer steps: over the W layers with weights,
    divided by W - 1; a layer without weights steps nothing), at most the cheapest such task. A
    layer's cost is its own mean task time less that overhead, scaled so that the layers' costs
    plus one overhead are the whole model's measured task time (the two runs are not measured at
    the same moment). BI and BW keep the ratio the direct timing gave them. Returns the network
    with these costs (``class_costs`` too), the (forward, backward, step) overhead for
    ``Device.task_overhead_s``, and the whole-model run's coefficient of variation of task times
    (the jitter a prediction should draw with)."""
    L = network.num_layers
    x, y = _calibration_stream(model, input_shape, samples)
    children = list(model.children())

    def task_means(num_stages: int) -> tuple[np.ndarray, float]:
        bounds = np.linspace(0, L, num_stages + 1).round().astype(int)
        stages = [nn.Sequential(*children[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        return _backend_task_stats(stages, x, y, device, dtype, mode, threads)

    per_layer, _ = task_means(L)
    whole, jitter = task_means(1)
    whole = whole[0]
    overhead, cost = np.zeros(3), np.zeros((L, 3))
    # every layer-stage runs a forward and a backward, but an optimizer step only where there are
    # weights (a stage without weights has no optimizer)
    every = np.ones(L, dtype=bool)
    for col, tasks in enumerate((every, every, network.layer_param_bytes() > 0)):
        times = per_layer[tasks, col]
        if times.size > 1:  # no task costs less than its overhead
            overhead[col] = min(max((times.sum() - whole[col]) / (times.size - 1), 0.0), times.min())
        mine = times - overhead[col]
        if mine.sum() > 0:  # the whole model as one stage costs what its run measured
            mine *= max(whole[col] - overhead[col], 0.0) / mine.sum()
        cost[tasks, col] = mine
    layers, rows = [], []
    for k, layer in enumerate(network.layers):
        split = layer.bwd_input / (layer.bwd_input + layer.bwd_weight) if layer.bwd_input + layer.bwd_weight else 1.0
        bi, bw = cost[k, 1] * split, cost[k, 1] * (1 - split)
        fwd = cost[k, 0]
        layers.append(dataclasses.replace(layer, fwd=fwd, bwd_input=bi, bwd_weight=bw,
                                          opt=cost[k, 2] if mode == "train" else layer.opt))
        rows.append((fwd, bi, bw))
    cls = next(iter(network.class_costs), "cpu")
    calibrated = Network(network.name, tuple(layers), network.input_bytes, {cls: tuple(rows)})
    return calibrated, (float(overhead[0]), float(overhead[1]), float(overhead[2])), jitter


def _sample_seconds(network: Network, cls: str, overhead: tuple[float, float, float], mode: str) -> float:
    """One sample's compute through the whole calibrated network as one stage, in ``mode``: the
    partitioner's stage cost on one device of class ``cls``, plus its tasks' overheads."""
    from partime_sim.partition import Partition, stage_times

    whole = Partition((0, network.num_layers), (0,))
    compute = float(stage_times(network, Cluster(cls, (Device(cls, cls),)), whole, mode)[0])
    return compute + (overhead[0] if mode == "infer" else sum(overhead))


def _whole_model_seconds(model: nn.Sequential, x: np.ndarray, y: np.ndarray, dtype: str, mode: str,
                         threads: int | None, device: str = "cpu") -> float:
    """Per-sample task time of one ``sequential`` backend run of the whole model (one stage)."""
    return float(_backend_task_stats([model], x, y, device, dtype, mode, threads)[0].sum())


def _concurrent_worker(spec: str, seed: int, dtype: str, input_shape: tuple[int, ...], mode: str, samples: int,
                       threads: int | None, rounds: int, pin_cores: bool, rank: int, count: int, gate: Any,
                       out: Any) -> None:
    """One of ``count`` processes running the whole model at the same time, ``rounds`` times;
    before each time rank 0 runs it alone while the others wait. Reports (rank, times alone,
    times together): per-sample task-time sums. Bound to cores as a backend worker would be."""
    from partime_sim.torch_networks import resolve_model

    try:
        if pin_cores:
            bind_worker(rank, count, threads or 1)
        model = resolve_model(spec, seed=seed, dtype=dtype, input_shape=input_shape).model
        x, y = _calibration_stream(model, input_shape, samples)
        alone, together = [], []
        for _ in range(rounds):
            gate.wait(timeout=LINK_TIMEOUT_S)
            if rank == 0:
                alone.append(_whole_model_seconds(model, x, y, dtype, mode, threads))
            gate.wait(timeout=LINK_TIMEOUT_S)
            together.append(_whole_model_seconds(model, x, y, dtype, mode, threads))
        out.put(("ok", (rank, alone, together)))  # one report per process
    except BaseException as exc:
        out.put(("error", f"{type(exc).__name__}: {exc}"))


def idle_penalty_points(task: Callable[[], Any], seconds: float = IDLE_SECONDS,
                        idles: Sequence[float] = IDLE_POINTS_S, seed: int = 0) -> tuple[tuple[float, float], ...]:
    """``Cluster.idle_penalty``: how much longer ``task`` takes after its core sat idle.

    Why: compute right after an idle core is slower, by more the longer the core slept (a lenet
    sample of ~1 ms, bound to a core: +0.03-0.05 ms after 0.1 ms idle, +0.06-0.09 after 0.3 ms,
    +0.11-0.2 after 1 ms, +0.35-0.7 after 3 ms); a lockstep stage idles at every barrier, a
    gpipe stage for the other stages' phase. Real compute shows it, a busy loop of small matrix
    products does not (BENCHMARKS.md, backend part f), so the task is the network's own.
    ``task`` runs after an idle time drawn at random from 0 and ``idles`` (a sleep: the thread
    blocks and the core idles, as a worker waiting for a message or a barrier), interleaved so
    that a slow phase of the machine hits every point alike, for about ``seconds`` and at least
    ``IDLE_MIN_TASKS`` times per point. A point's extra is its mean time less the mean back to
    back, kept only where it exceeds twice its standard error (else 0: noise is not charged),
    and no point costs less than a shorter idle (the curve never falls)."""
    points = (0.0, *idles)
    for _ in range(3):  # warm-up
        task()
    t0 = time.perf_counter()
    for _ in range(3):
        task()
    per_task = (time.perf_counter() - t0) / 3
    count = max(int(seconds / (per_task + float(np.mean(points)))), IDLE_MIN_TASKS * len(points))
    times: list[list[float]] = [[] for _ in points]
    for k in np.random.default_rng(seed).integers(len(points), size=count).tolist():
        if points[k] > 0:
            time.sleep(points[k])
        t0 = time.perf_counter()
        task()
        times[k].append(time.perf_counter() - t0)
    base = np.asarray(times[0])
    curve, floor = [], 0.0
    for idle, t in zip(idles, times[1:]):
        t = np.asarray(t)
        if t.size < 2 or base.size < 2:
            continue
        extra = float(t.mean() - base.mean())
        error = math.sqrt(t.var(ddof=1) / t.size + base.var(ddof=1) / base.size)
        floor = max(floor, extra if extra > 2 * error else 0.0)
        curve.append((float(idle), floor))
    return tuple(curve)


def _idle_worker(spec: str, seed: int, dtype: str, input_shape: tuple[int, ...], mode: str, threads: int | None,
                 pin_cores: bool, seconds: float, out: Any) -> None:
    """One process bound as a backend worker: the idle penalty of one sample through the whole
    model in ``mode`` (forward; training: backward and an SGD step too)."""
    from partime_sim.models import _torch_dtype
    from partime_sim.torch_networks import resolve_model

    try:
        if pin_cores:
            bind_worker(0, 2, threads or 1)
        torch.set_num_threads(threads or 1)
        model = resolve_model(spec, seed=seed, dtype=dtype, input_shape=input_shape).model.to(_torch_dtype(dtype))
        x, _ = _calibration_stream(model, input_shape, 1)
        inp = torch.as_tensor(x, dtype=_torch_dtype(dtype))
        step = make_torch_optimizer(OptimizerSpec("sgd"), list(model.parameters())).step

        def task() -> None:
            if mode == "infer":
                with torch.no_grad():
                    model(inp)
                return
            model(inp).square().mean().backward()
            step()
            model.zero_grad()

        out.put(("ok", idle_penalty_points(task, seconds)))
    except BaseException as exc:
        out.put(("error", f"{type(exc).__name__}: {exc}"))


def measure_idle_penalty(spec: str, seed: int = 0, dtype: str = "float32", input_shape: tuple[int, ...] | None = None,
                         mode: str = "train", *, threads: int | None = None, pin_cores: bool = True,
                         seconds: float = IDLE_SECONDS) -> tuple[tuple[float, float], ...]:
    """``idle_penalty_points`` of the model ``spec`` in a spawned process bound to a core as a
    backend worker is (this process's own cores and threads are left alone)."""
    from partime_sim.torch_networks import resolve_model

    shape = input_shape  # profile() knows it; only a bare call builds the model here to learn it
    if shape is None:
        shape = tuple(resolve_model(spec, seed=seed, dtype=dtype).input_shape)
    args = [(spec, seed, dtype, tuple(shape), mode, threads, pin_cores, seconds)]
    (points,) = _spawned_reports(_idle_worker, args, 1, "the idle-penalty measurement", "run again")
    return tuple((float(a), float(b)) for a, b in points)


def _spawned_reports(target: Callable[..., None], args: Sequence[tuple], reports: int, what: str, hint: str,
                     timeout_s: float = LINK_TIMEOUT_S) -> list[Any]:
    """Start one spawned process per ``args`` entry (``target(*entry, out)``) and collect
    ``reports`` ``("ok", value)`` messages from their queue. A process that reports
    ``("error", text)``, dies without reporting, or is still busy at ``timeout_s`` stops the
    measurement at once with a ``PartimeError`` naming ``what`` and ending with ``hint``; every
    process is reaped (killed if need be) either way."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*entry, out), daemon=True) for entry in args]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    values: list[Any] = []
    try:
        while len(values) < reports:
            try:
                status, value = out.get(timeout=0.2)
            except queue.Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead:
                    raise PartimeError(f"{what} process {dead[0][0]} exited with code {dead[0][1]} before "
                                       f"reporting; {hint}") from None
                if time.monotonic() > deadline:
                    raise PartimeError(f"{what} did not finish in {timeout_s:g} s; {hint}") from None
                continue
            if status == "error":
                raise PartimeError(f"{what} failed ({value}); {hint}")
            values.append(value)
        return values
    finally:
        for p in procs:
            p.join(timeout=5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        out.close()


def concurrency_slowdown(spec: str, count: int, transport: str, seed: int = 0, dtype: str = "float32",
                         input_shape: tuple[int, ...] | None = None, mode: str = "train", *,
                         samples: int = CALIBRATION_SAMPLES, threads: int | None = None,
                         rounds: int = CONCURRENCY_ROUNDS, device: str = "cpu", pin_cores: bool = True) -> float:
    """How much longer a task takes when ``count`` pipeline workers compute at once on ``device``.

    The whole model runs alone, then ``count`` copies run at the same moment as the pipeline's
    workers would: processes for the ``distributed`` transport (sharing cores, caches, memory
    bandwidth), threads of one process for ``local`` (sharing the GIL too; on one GPU repeated,
    each thread with its own CUDA stream, sharing the GPU's multiprocessors). Per round the ratio is
    the mean per-sample task time under load over the time alone; ``rounds`` alternating rounds,
    and the median ratio counts (>= 1): one round moved between 1.00 and 1.24 across profiles of
    one network on a shared VM."""
    from partime_sim.torch_networks import resolve_model

    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"rounds={rounds!r} is invalid; give an integer >= 1")
    if device != "cpu" and transport != "local":
        raise ConfigError(f"device={device!r} with transport {transport!r}: distributed workers each own a device; "
                          "measure a shared GPU with transport='local'")
    resolved = resolve_model(spec, seed=seed, dtype=dtype, input_shape=input_shape)
    x, y = _calibration_stream(resolved.model, resolved.input_shape, samples)
    if transport == "local":
        models = [copy.deepcopy(resolved.model) for _ in range(count)]
        alone, together = [], []
        for _ in range(rounds):
            alone.append(_whole_model_seconds(resolved.model, x, y, dtype, mode, threads, device))
            sums: list[float] = [0.0] * count
            gate = threading.Barrier(count)

            def work(i: int) -> None:
                gate.wait()
                sums[i] = _whole_model_seconds(models[i], x, y, dtype, mode, threads, device)

            workers = [threading.Thread(target=work, args=(i,)) for i in range(count)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            together.append(sums)
    else:
        gate = mp.get_context("spawn").Barrier(count)
        args = [(spec, seed, dtype, tuple(resolved.input_shape), mode, samples, threads, rounds, pin_cores, rank,
                 count, gate) for rank in range(count)]
        reports = _spawned_reports(_concurrent_worker, args, count, "the concurrency measurement", "run again")
        alone = next(a for rank, a, _ in reports if rank == 0)
        together = [list(per_round) for per_round in zip(*(t for _, _, t in reports))]
    ratios = [float(np.mean(t)) / a for a, t in zip(alone, together) if a > 0]
    return max(1.0, float(np.median(ratios))) if ratios else 1.0


# ---- links -----------------------------------------------------------------------------------

def fit_link(nbytes: Sequence[float], seconds: Sequence[float]) -> Link:
    """Non-negative least-squares fit of ``seconds = latency + nbytes / bandwidth``.

    Residuals are relative (each point weighted by 1 / its time), so the small messages set the
    latency and the large ones the bandwidth, instead of the largest message deciding both. With
    two unknowns the constrained optimum is the best feasible one of: the unconstrained fit, the
    fit through the origin (latency 0) and the constant fit (bandwidth inf).
    """
    x, t = np.asarray(nbytes, dtype=float), np.asarray(seconds, dtype=float)
    if x.shape != t.shape or x.ndim != 1 or x.size < 2:
        raise ConfigError(f"link fit needs two equal-length lists of >= 2 points, got {x.shape} sizes and "
                          f"{t.shape} times")
    if not (np.all(np.isfinite(t)) and np.all(t > 0) and np.all(x >= 0)):
        raise ConfigError("link fit needs times > 0 and sizes >= 0; measure again")
    scale = max(float(x.max()), 1.0)  # conditioning: sizes span 4 B .. 16 MiB
    a = np.column_stack([np.ones_like(x), x / scale]) / t[:, None]
    y = np.ones_like(t)  # t / t

    def solve(cols: list[int]) -> np.ndarray:
        coef = np.zeros(2)
        coef[cols] = np.linalg.lstsq(a[:, cols], y, rcond=None)[0]
        return coef

    candidates = [c for c in (solve([0, 1]), solve([1]), solve([0])) if np.all(c >= 0)]
    best = min(candidates, key=lambda c: float(np.sum((a @ c - y) ** 2)), default=np.zeros(2))
    latency, per_byte = float(best[0]), float(best[1]) / scale
    return Link(latency_s=latency, bandwidth_Bps=1.0 / per_byte if per_byte > 0 else math.inf)


@dataclass(frozen=True)
class LinkProfile:
    """Measured links: the default device<->device link, per-pair links where they differ, the
    host<->device link, one barrier of two participants (one dissemination round), the same
    barrier when both arrive at once (0: not measured), and the raw (bytes, one-way seconds)
    points of each fit."""

    link: Link
    host_link: Link
    barrier_s: float = 0.0
    barrier_close_s: float = 0.0
    pairs: dict[tuple[int, int], Link] = field(default_factory=dict)
    points: dict[str, list[list[float]]] = field(default_factory=dict)


def _link_worker(rank: int, port: int, sizes: Sequence[int], warmup: int, repeats: int, pin_cores: bool,
                 skews: Sequence[float], mode: str, out: Any) -> None:
    """One of two gloo processes: rank 0 ping-pongs float32 tensors with rank 1 (one-way time =
    round trip / 2), times lockstep ticks with the messages of ``mode`` (at ``skews``, and with
    both arriving at once) and a message's cost at each end under load; rank 0 reports
    ``("ok", (points, (barrier_s, barrier_close_s), (send_cost_s, recv_cost_s)))``."""
    import torch.distributed as dist

    from partime_sim.backends.transport import directed_groups

    try:
        if pin_cores:  # as a backend stage process runs: bound first, then one thread
            bind_worker(rank, 2, 1)
        torch.set_num_threads(1)
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo0" if sys.platform == "darwin" else "lo")
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                timeout=datetime.timedelta(seconds=DIST_TIMEOUT_S))
        points = []
        for nbytes in sizes:
            buf = torch.zeros(max(nbytes // 4, 1), dtype=torch.float32)
            times = []
            for i in range(warmup + repeats):
                t0 = time.perf_counter_ns()
                if rank == 0:
                    dist.send(buf, 1)
                    dist.recv(buf, 1)
                else:
                    dist.recv(buf, 0)
                    dist.send(buf, 0)
                if i >= warmup:
                    times.append((time.perf_counter_ns() - t0) * 1e-9 / 2)
            points.append([float(_nbytes(buf)), float(np.median(times))])
        rounds = warmup + max(repeats, BARRIER_ROUNDS)
        groups = directed_groups([(0, 1), (1, 0)], torch.device("cpu"))
        barriers = []
        for at in (skews, (0.0,)):
            ticks = TokenBarrier(rank, 2, groups, rounds)  # the barrier the backend's lockstep runs use
            mine = torch.from_numpy(_tick_stamps(rank, ticks, rounds, at, _TickMessages(rank, dist, groups, mode, rounds)))
            ticks.finish()
            if rank == 1:
                dist.send(mine, 0)
            else:
                theirs = torch.empty_like(mine)
                dist.recv(theirs, 1)
                barriers.append(_tick_cost([mine.numpy(), theirs.numpy()], warmup))
        costs = _message_costs(rank, dist, mode)
        dist.destroy_process_group()
        if rank == 0:
            out.put(("ok", (points, tuple(barriers), costs)))
    except BaseException as exc:  # report, so the parent stops at once instead of waiting for a timeout
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        out.put(("error", f"rank {rank}: {type(exc).__name__}: {first}"))


def tick_skews(stage_s: float, cv: float, points: int = BARRIER_SKEW_POINTS) -> tuple[float, ...]:
    """How much later the last of two stages reaches a lockstep tick's barrier: ``points``
    quantiles of |X - Y|, X and Y a stage's compute time ``stage_s`` drawn with coefficient of
    variation ``cv`` (lognormal with mean ``stage_s``, as the simulator draws them), each at
    least ``BARRIER_MIN_SKEW_S`` and at most ``BARRIER_MAX_SKEW_S``. Seeded: the same inputs
    give the same skews.

    Why the floor: a barrier whose arrivals are close costs much more, now and then a stall of
    1.5-5 ms (between the profiler's two processes 1-2 ms on average at skew 0; in lenet
    ``partime`` runs 0.6-2 ms on average where the last two arrivals came within ~0.02 ms,
    0.15-0.2 ms otherwise). The simulator charges that case separately
    (``Cluster.barrier_close_s``, timed with both arriving at once, within
    ``BARRIER_CLOSE_WINDOW_S``); ``barrier_s`` is the cost of the other ticks."""
    if not (stage_s > 0 and cv > 0):
        return (BARRIER_MIN_SKEW_S,)
    sigma = math.sqrt(math.log1p(cv * cv))
    x = stage_s * np.random.default_rng(0).lognormal(-0.5 * sigma * sigma, sigma, (2, 4096))
    skews = np.quantile(np.abs(x[0] - x[1]), (np.arange(points) + 0.5) / points)
    return tuple(float(s) for s in np.clip(skews, BARRIER_MIN_SKEW_S, BARRIER_MAX_SKEW_S))


def _tick_stamps(rank: int, dist: Any, rounds: int, skews: Sequence[float] = BARRIER_SKEWS_S,
                 messages: _TickMessages | None = None) -> np.ndarray:
    """``(rounds, 2)`` ``perf_counter_ns`` stamps of lockstep ticks on this rank: when it reached
    the barrier, and when it could go on (after the barrier and, with ``messages``, after the
    peer's message of the tick). ``dist`` is ``torch.distributed`` or a worker's
    ``LocalTransport``: anything with ``barrier()``.

    Back-to-back barriers (nothing between them) under-state a tick two- to threefold on a VM: in
    a tick both processes compute first, and the one that arrives early blocks, its core goes
    idle and has to be woken when the last one arrives; and two that arrive within ~0.05 ms of
    each other stall now and then for a scheduler slice (3-4 ms; a 0.2 ms barrier then averages
    ~1 ms, against 0.15-0.25 ms at skews of 0.1 ms and more, measured with bound processes). So
    each round both compute ``BARRIER_COMPUTE_S``, rank 0 ``skews[i]`` longer (cycling: a
    network's ``tick_skews``; by default from balanced stages to one idle for milliseconds),
    send the tick's message if any, then meet at the barrier."""
    stamps = np.zeros((rounds, 2), dtype=np.int64)
    for i in range(rounds):
        _busy(BARRIER_COMPUTE_S + (skews[i % len(skews)] if rank == 0 else 0.0))
        if messages is not None:
            messages.send()
        stamps[i, 0] = time.perf_counter_ns()
        dist.barrier()
        if messages is not None:
            messages.receive()
        stamps[i, 1] = time.perf_counter_ns()
    if messages is not None:
        messages.close()
    return stamps


def _tick_cost(stamps: Sequence[np.ndarray], warmup: int) -> float:
    """Seconds a lockstep tick costs after its last arrival (what the simulator charges a
    BARRIER): per round, the last rank to go on minus the last to arrive, from every rank's
    ``_tick_stamps`` (one clock: the ranks run on one machine, where ``perf_counter_ns`` is
    system-wide). Median of ``BARRIER_BLOCKS`` block means after ``warmup`` rounds: a lockstep
    run pays the tail, not a stall of the VM."""
    arrive = np.max([s[warmup:, 0] for s in stamps], axis=0)
    go_on = np.max([s[warmup:, 1] for s in stamps], axis=0)
    cost = (go_on - arrive) * 1e-9
    return float(np.median([b.mean() for b in np.array_split(cost, BARRIER_BLOCKS)]))


class _TickMessages:
    """The messages of a lockstep tick in ``mode``, as the backend's workers send them: each
    stage's output goes out before the barrier (training both ways, an activation and a
    gradient; inference 0 -> 1) over a group per direction (``directed_groups``), and the
    receiver takes it after the barrier, its receives posted up front as the transport posts them.

    Why: the barrier timed alone missed what the tick's messages add to it; with them it cost
    lenet-sized ticks 0.04-0.15 ms more in training (the receive waits after the barrier, the
    barrier's own messages behind the data), 0-0.07 ms in inference."""

    def __init__(self, rank: int, dist: Any, groups: dict[tuple[int, int], Any], mode: str, ticks: int,
                 floats: int = 256) -> None:
        self.dist, self.peer, self.ticks = dist, 1 - rank, ticks
        self.out_group, self.in_group = groups[(rank, self.peer)], groups[(self.peer, rank)]
        self.sends, self.recvs = mode == "train" or rank == 0, mode == "train" or rank == 1
        self.msg, self.sent = torch.zeros(floats), []
        self.next_post = 0
        self.posted: collections.deque = collections.deque()
        for _ in range(min(lookahead(self.msg.device, _nbytes(self.msg)), ticks) if self.recvs else 0):
            self._post()

    def _post(self) -> None:
        if self.next_post < self.ticks:
            self.posted.append(self.dist.irecv(torch.empty_like(self.msg), self.peer, group=self.in_group))
            self.next_post += 1

    def send(self) -> None:
        if self.sends:
            self.sent.append(self.dist.isend(self.msg, self.peer, group=self.out_group))

    def receive(self) -> None:
        if self.recvs:
            self.posted.popleft().wait()
            self._post()

    def close(self) -> None:
        """Wait for every message sent and received (one per tick each way)."""
        for work in [*self.sent, *self.posted]:
            work.wait()


def _busy(seconds: float) -> None:
    """Keep the core busy for ``seconds`` with small matrix products, as a stage's compute does (a
    sleep would idle it; torch releases the GIL, so a worker thread beside this one runs too)."""
    a = torch.ones(32, 32)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        torch.mm(a, a)


def _message_costs(rank: int, dist: Any, mode: str = "train", steps: int = MESSAGE_STEPS) -> tuple[float, float]:
    """Seconds a message costs its sender and its receiver while both processes compute, as in a
    pipeline of ``mode``: ``(send_cost_s, recv_cost_s)`` (on rank 0; zeros on rank 1).

    A ping-pong between idle processes misses it: in a pipeline every core is busy, the
    receiver's communication thread has to be scheduled in, and a receiver that blocked (its
    core idle) has to be woken, which on some VMs takes milliseconds. The two ranks run a
    2-stage pipeline in miniature: every step the sender computes ~0.2 ms and sends an
    "activation", the receiver takes it and computes; the same steps are timed without
    messages, in ``MESSAGE_COST_PAIRS`` alternating pairs, and the median extra time per step of
    the rank that computes longer (the one that never waits) counts (>= 0).

    Training sends a "gradient" back every step, which rank 0 (computing twice as long) takes
    two steps later (two samples in flight, as in 1F1B); rank 0 sends one message and receives
    one per step, and its extra time is the cost of a message at both ends, half at each (what
    one end spends on a message, its communication thread run on its core and its wait woken,
    the other end spends too; a CPU timing of each end alone, 0.07-0.10 ms, misses the wake-ups,
    and with it lenet's streaming pipelines came out 30-40% faster than they ran).
    Inference sends one way: the sender's cost is rank 0's extra with rank 0 computing longer,
    the receiver's is rank 1's with rank 1 computing longer. Why: charged the two-way figure,
    a lenet inference pipeline's stages paid 0.3 ms per message where one-way traffic costs the
    sender ~0.1 ms and the receiver ~0.07 ms.

    Both directions share the default group here, one connection, where the backend gives each
    its own (``directed_groups``): an empirical proxy, kept on purpose. Over the backend's own
    groups, or through ``DistributedTransport`` itself, this pipeline read 0.05-0.06 ms per end,
    and predicted lenet's and mlp's training pipelines 15-49% too fast (MAPE 32% against 10%
    with this figure, paired on the same runs; BENCHMARKS.md, session 23): the real stages pay
    more per message than a busy loop between messages shows."""
    a = torch.randn(96, 96)
    msg = torch.zeros(256)
    peer = 1 - rank
    two_way = mode == "train"
    ahead = min(lookahead(msg.device, _nbytes(msg)), steps)  # receives posted as DistributedTransport posts them

    def compute(heavy: int) -> None:  # the lighter rank computes half as long: it waits for
        for _ in range(8 if rank == heavy else 4):  # messages, as stages off the bottleneck do
            torch.mm(a, a)

    def timed(send: bool, heavy: int) -> float:
        dist.barrier()
        receives = send and (two_way or rank == 1)
        # rank 0 takes gradients two steps late and leaves the last two behind
        expected = steps - 2 if rank == 0 else steps
        posted = [dist.irecv(torch.empty_like(msg), peer) for _ in range(ahead)] if receives else []
        times, pending, received = [], [], 0
        for i in range(steps):
            t0 = time.perf_counter_ns()
            if receives and received < expected and (rank == 1 or i >= 2):
                posted.pop(0).wait()
                received += 1
                if received + len(posted) < steps:
                    posted.append(dist.irecv(torch.empty_like(msg), peer))
            compute(heavy)
            if send and (two_way or rank == 0):
                pending.append(dist.isend(msg, peer))
            times.append(time.perf_counter_ns() - t0)
        for work in posted + pending:  # the gradients rank 0 did not wait for in the loop, and the sends
            work.wait()
        return float(np.mean(times[steps // 4:])) * 1e-9

    def extra(heavy: int) -> float:
        """The median extra seconds per step of rank ``heavy`` (0.0 on the other rank)."""
        for _ in range(2):  # warm-up
            timed(False, heavy)
        # one pair is at the mercy of a slow phase of the machine (it moved this cost 0.09..0.41 ms
        # between profiles): alternate the two, several pairs, and keep the median difference
        diffs = [timed(True, heavy) - timed(False, heavy) for _ in range(MESSAGE_COST_PAIRS)]
        return max(float(np.median(diffs)), 0.0) if rank == heavy else 0.0

    if two_way:
        half = extra(0) / 2
        return half, half
    send = extra(0)
    recv = torch.tensor([extra(1)], dtype=torch.float64)  # measured on rank 1, reported by rank 0
    if rank == 1:
        dist.send(recv, 0)
        return 0.0, 0.0
    dist.recv(recv, 1)
    return send, float(recv[0])


def _measure_gloo(sizes: Sequence[int], warmup: int, repeats: int, timeout_s: float = LINK_TIMEOUT_S,
                  pin_cores: bool = True, skews: Sequence[float] = BARRIER_SKEWS_S, mode: str = "train"
                  ) -> tuple[list[list[float]], tuple[float, float], tuple[float, float]]:
    """Spawn two local gloo processes; their (bytes, one-way s) points, lockstep tick seconds
    with ``mode``'s messages (at ``skews``, and with both arriving at once) and a message's cost
    to its sender and its receiver under load in ``mode`` (``_message_costs``).
    A worker that fails or dies stops the measurement at once; a stuck one is killed at timeout."""
    from partime_sim.backends.launch import free_port

    hint = "check that loopback TCP works (GLOO_SOCKET_IFNAME), or use --transport local"
    port = free_port()
    args = [(r, port, list(sizes), warmup, repeats, pin_cores, tuple(skews), mode) for r in range(2)]
    (report,) = _spawned_reports(_link_worker, args, 1, "the gloo link measurement", hint, timeout_s)
    return report


def _measure_handoff(device: torch.device, warmup: int, repeats: int,
                     skews: Sequence[float] = BARRIER_SKEWS_S) -> tuple[float, float]:
    """Local transport: one-way seconds of handing a tensor to another worker thread through the
    backend's own ``LocalTransport`` (round trip / 2; no copy on one device), and seconds of its
    two-worker barrier. A failing echo thread aborts the hub, so nothing waits forever."""
    from partime_sim.backends.transport import LocalHub, LocalTransport

    hub = LocalHub(2)
    main, peer = LocalTransport(hub, 0, device), LocalTransport(hub, 1, device)
    item = torch.zeros(1, device=device)
    rounds, barriers = warmup + repeats, warmup + max(repeats, BARRIER_ROUNDS)
    stamps: list[np.ndarray] = []

    def echo() -> None:
        try:
            for i in range(rounds):
                peer.send(2 * i + 1, 0, peer.recv(2 * i, 0, tuple(item.shape), item.dtype))
            stamps.append(_tick_stamps(1, peer, barriers, skews))
        except BaseException:
            hub.abort()
            raise

    worker = threading.Thread(target=echo, daemon=True)
    worker.start()
    hand = []
    for i in range(rounds):
        t0 = time.perf_counter_ns()
        main.send(2 * i, 1, item)
        main.recv(2 * i + 1, 1, tuple(item.shape), item.dtype)
        hand.append((time.perf_counter_ns() - t0) * 1e-9 / 2)
    mine = _tick_stamps(0, main, barriers, skews)
    worker.join()
    return float(np.median(hand[warmup:])), _tick_cost([mine, *stamps], warmup)


def _copy_points(src: torch.device, dst: torch.device, sizes: Sequence[int], warmup: int,
                 repeats: int) -> list[list[float]]:
    """(bytes, seconds) of ``.to(dst, non_blocking=True)`` copies from ``src`` (pinned when on the
    host), each until both GPUs are synchronised: host-clock timing, because a peer copy may run
    on either device's stream, which CUDA events on one stream would not bracket."""
    gpus = {d for d in (src, dst) if d.type == "cuda"}

    def copy_and_wait(buf: torch.Tensor) -> None:
        buf.to(dst, non_blocking=True)
        for gpu in gpus:
            _sync(gpu)

    points = []
    for nbytes in sizes:
        buf = torch.zeros(max(nbytes // 4, 1), dtype=torch.float32, device=src)
        if src.type == "cpu":
            buf = buf.pin_memory()
        points.append([float(_nbytes(buf)), median_time(lambda: copy_and_wait(buf), torch.device("cpu"),
                                                          warmup, repeats)])
    return points


def profile_links(
    devices: Sequence[str],
    transport: str = "distributed",
    sizes: Sequence[int] = LINK_SIZES,
    *,
    warmup: int = 3,
    repeats: int = 10,
    pin_cores: bool = True,
    barrier_skews: Sequence[float] = BARRIER_SKEWS_S,
    mode: str = "train",
) -> LinkProfile:
    """Measure the links a pipeline over ``devices`` uses.

    ``devices``: a list or a comma-separated string (``"cpu,cpu"``), checked as the backend does.
    CPU, ``distributed``: two spawned gloo processes on 127.0.0.1 ping-pong float32 tensors of
    each size in ``sizes`` (medians of ``repeats``), fitted by ``fit_link``; every CPU pair is
    such a pair, so one measurement serves them all. CPU, ``local``: stages are threads of one
    process handing tensors over the backend's ``LocalTransport``: the handoff latency, bandwidth
    inf (no copy). The host link of a CPU is ideal (the inputs are already in host memory).
    CUDA (untested without a GPU): the host link is fitted from pinned host -> device copies and
    each pair of distinct GPUs from device -> device copies; a pipeline of several processes or
    threads on one GPU costs the handoff only (distributed NCCL cannot pair two ranks on one GPU).
    The barrier is timed as a lockstep tick's, with its last arrival late by ``barrier_skews`` in
    turn (a network's ``tick_skews``; by default from 0 to 3 ms) and, between gloo processes,
    with the tick's messages in ``mode`` (``_TickMessages``) and with both arriving at once too
    (``barrier_close_s``); the message costs follow ``mode``'s traffic (``_message_costs``);
    ``pin_cores`` binds the two processes as the backend binds its workers.
    """
    if transport not in TRANSPORTS:
        raise ConfigError(f"transport {transport!r} is unknown; use one of {', '.join(TRANSPORTS)}")
    _check_counts(warmup, repeats)
    devs = parse_devices(devices)
    sizes = [int(s) for s in sizes]
    if len(sizes) < 2 or min(sizes) < 1:
        raise ConfigError(f"sizes={sizes!r}: give at least two message sizes >= 1 byte")
    if all(d.type == "cpu" for d in devs):
        if transport == "local":
            handoff, barrier = _measure_handoff(devs[0], warmup, repeats, barrier_skews)
            return LinkProfile(Link(latency_s=handoff), Link(), barrier)
        points, (barrier, close), (send_cost, recv_cost) = _measure_gloo(
            sizes, warmup, repeats, pin_cores=pin_cores, skews=barrier_skews, mode=mode)
        # gloo copies through sockets with CPU time (the sender's thread, the receiver's gloo
        # thread) taken from the same cores the stages compute on
        link = dataclasses.replace(fit_link(*zip(*points)), sender_busy=True, send_cost_s=send_cost,
                                   recv_cost_s=recv_cost)
        # a close arrival costs at least a barrier (a quieter phase of the machine can time it lower)
        return LinkProfile(link, Link(), barrier, max(close, barrier), points={"cpu->cpu": points})
    if any(d.type == "cpu" for d in devs):
        raise ConfigError(f"devices {list(devices)} mix cpu and cuda; profile one kind at a time")
    host_pts = _copy_points(torch.device("cpu"), devs[0], sizes, warmup, repeats)
    handoff, barrier = _measure_handoff(devs[0], warmup, repeats, barrier_skews)
    pairs, points = {}, {"host->" + str(devs[0]): host_pts}
    for i, src in enumerate(devs):
        for j, dst in enumerate(devs):
            if i != j and src != dst:
                pts = _copy_points(src, dst, sizes, warmup, repeats)
                pairs[(i, j)] = fit_link(*zip(*pts))
                points[f"{src}->{dst}"] = pts
    default = next(iter(pairs.values()), Link(latency_s=handoff))
    return LinkProfile(default, fit_link(*zip(*host_pts)), barrier,
                       pairs={k: v for k, v in pairs.items() if v != default}, points=points)


# ---- the profile file ------------------------------------------------------------------------

@dataclass(frozen=True)
class Profile:
    """A measured Network and Cluster, and how they were measured (``meta``)."""

    network: Network
    cluster: Cluster
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": PROFILE_KIND, "network": self.network.to_dict(), "cluster": self.cluster.to_dict(),
                "meta": self.meta}

    def save(self, path: str | Path) -> None:
        """One JSON file that ``--network`` and ``--cluster`` both accept."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))


MESSAGE_CALIBRATION_SCHEDULE = "pipedream"  # = 1f1b: one activation and one gradient per sample, no lockstep
MESSAGE_CALIBRATION_RUNS = 3  # backend runs of it; their median throughput counts
MESSAGE_CALIBRATION_SAMPLES = 300
MESSAGE_COST_MAX_S = 1e-3  # the bisection's upper end: a message end costing more is not a CPU pipeline's


def with_message_costs(prof: Profile, cost_s: float, tokens: bool = True) -> Profile:
    """``prof`` with every link charging ``cost_s`` at each end of a message and, with ``tokens``,
    every barrier round ``cost_s`` more than the profile measured (its token is a message).

    Why the tokens: on CPU processes a lockstep barrier is a ``TokenBarrier``, one message per
    round to each rank, and a rank pays for taking one what it pays for any message (its core's
    communication thread scheduled in, its wait woken), which the profile's tick calibration,
    timed around a busy loop, does not see. Without them lenet's lockstep ``partime`` was
    predicted 20% (inference) and 13% (training) faster than it ran (BENCHMARKS.md, session 28)."""
    def charged(link: Link) -> Link:
        return dataclasses.replace(link, send_cost_s=cost_s, recv_cost_s=cost_s)

    c, meta = prof.cluster, prof.meta
    rounds = barrier_rounds(c.num_devices)
    token = cost_s if tokens else 0.0
    per_round = meta.get("barrier_per_round_s", c.barrier_s / max(rounds, 1))
    close_per_round = meta.get("barrier_close_per_round_s", c.barrier_close_s / max(rounds, 1))
    barrier = {"barrier_s": rounds * (per_round + token)}
    if c.barrier_close_window_s > 0:
        barrier["barrier_close_s"] = rounds * (close_per_round + token)
    cluster = dataclasses.replace(c, link=charged(c.link), links={k: charged(v) for k, v in c.links.items()},
                                  **barrier)
    return dataclasses.replace(prof, cluster=cluster, meta={**meta, "message_cost_s": cost_s,
                                                            "barrier_token_s": token})


def cost_for_throughput(predict_sps: Callable[[float], float], target_sps: float, high_s: float = MESSAGE_COST_MAX_S,
                        steps: int = 14) -> float:
    """The per-end message cost at which ``predict_sps`` (throughput for a cost, falling as the
    cost rises) meets ``target_sps``, by bisection on [0, ``high_s``]; clamped to the ends."""
    lo, hi = 0.0, high_s
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if predict_sps(mid) > target_sps else (lo, mid)
    return (lo + hi) / 2


def backend_message_costs_apply(meta: dict[str, Any]) -> bool:
    """Whether ``calibrate_message_costs`` can fit a profile with this meta: CPU processes on the
    distributed transport (the backend runs it needs), training or inference."""
    return meta.get("mode") in ("train", "infer") and meta.get("transport") == "distributed" and \
        all(str(d).startswith("cpu") for d in meta.get("devices", ()))


def calibrate_message_costs(prof: Profile, runs: int = MESSAGE_CALIBRATION_RUNS,
                            samples: int = MESSAGE_CALIBRATION_SAMPLES,
                            schedule: str = MESSAGE_CALIBRATION_SCHEDULE) -> Profile:
    """The per-end message cost taken from the backend itself: ``runs`` real 2-process
    ``schedule`` runs (``pipedream`` by default; in the profile's mode) of the profiled network at
    the profile's own 2-stage split, and the cost at which the profile predicts their median
    throughput (``cost_for_throughput``).

    Why: no isolated measurement reproduces what a real stage pays per message (the busy-loop
    mini-pipeline over the backend's own channels reads 0.05-0.06 ms per end, the profile's
    shared-connection figure 0.13-0.45, real lenet stages ~0.12-0.19). Paired on the same runs,
    this cost predicted lenet's and mlp's training pipelines with MAPE 6.7% and 3.5% where the
    default figure scored 19.2% and 9.0% (BENCHMARKS.md, session 23). ``pipedream`` is the generators'
    alias of ``1f1b``, which two training configurations of the accuracy set use (lenet, mlp):
    they are fitted on separate, earlier runs of their own schedule; in inference it streams
    forwards one way with no lockstep, outside the set. Profiles of CPU processes on the
    distributed transport, either mode; ``compare``'s default there (paired over the whole accuracy set,
    8 rounds: MAPE 6.6% against 9.0%, better in every round; BENCHMARKS.md, session 24; after the
    thread fix of session 25, 7.8% against 9.7%, and 9.1% fitted to ``layerpipe`` runs instead; session 26,
    three runs per configuration, 5.7% against 7.4%). A barrier round costs one fitted message end
    more (its token; ``with_message_costs``)."""
    from partime_sim.analysis.compare import predict
    from partime_sim.backends.run import RunConfig, run_config
    from partime_sim.metrics import summarize

    meta = prof.meta
    mode = meta.get("mode")
    if not backend_message_costs_apply(meta):
        raise ConfigError(f"message costs are calibrated on the backend for profiles of CPU processes on the "
                          f"distributed transport; this profile is mode={mode!r}, transport="
                          f"{meta.get('transport')!r}, devices={meta.get('devices')}: use --message-costs measured")
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise ConfigError(f"runs={runs!r} is invalid; give an integer >= 1 (backend runs to take the median of)")
    sizes = predict(prof, schedule, 2, samples, mode, seed=meta.get("seed", 0))[2].sizes
    cfg = RunConfig(meta["spec"], schedule, "cpu,cpu", transport="distributed", samples=samples,
                    mode=mode, seed=meta.get("seed", 0), dtype=meta.get("dtype", "float32"),
                    partition=",".join(map(str, sizes)), threads=meta.get("threads", 1),
                    pin_cores=meta.get("pin_cores", True))
    measured = [summarize(run_config(cfg)[1].trace, num_devices=2)["throughput_sps"] for _ in range(runs)]
    target = float(np.median(measured))

    def predicted(cost_s: float) -> float:
        return predict(with_message_costs(prof, cost_s), schedule, 2, samples, mode,
                       seed=meta.get("seed", 0))[0]["throughput_sps"]

    cost = float(cost_for_throughput(predicted, target))
    if cost >= MESSAGE_COST_MAX_S * (1 - 2.0**-13):
        warnings.warn(f"the {schedule} runs ({target:.0f} samples/s) were slower than the profile "
                      f"predicts even at {MESSAGE_COST_MAX_S * 1e3:g} ms per message end, so the fitted cost is "
                      "clamped there: the machine was probably busy; calibrate again on a quiet machine or use "
                      "--message-costs measured", RuntimeWarning, stacklevel=2)
    calibrated = with_message_costs(prof, cost)
    calibrated.meta["message_cost_calibration"] = {
        "schedule": schedule, "partition": [int(n) for n in sizes], "samples": samples,
        "throughput_sps": measured, "measured_cost_s": [prof.cluster.link.send_cost_s, prof.cluster.link.recv_cost_s]}
    return calibrated


def load_profile(path: str | Path) -> Profile:
    data = load_json(path)
    if not is_profile(data):
        raise ConfigError(f"file {str(path)!r} is not a partime-sim profile (no \"kind\": {PROFILE_KIND!r}); "
                          "make one with 'partime-sim profile ... --out FILE.json'")
    return Profile(Network.from_dict(profile_part(data, "network", path)),
                   Cluster.from_dict(profile_part(data, "cluster", path)), dict(data.get("meta", {})))


def _machine() -> str:
    """CPU model (Linux /proc/cpuinfo) or the platform's processor string, and the core count."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()}: {cpu or platform.machine()}, {os.cpu_count()} cores, {platform.platform()}"


def profile(
    spec: str,
    devices: Sequence[str] = ("cpu",),
    transport: str = "distributed",
    dtype: str = "float32",
    input_shape: Sequence[int] | None = None,
    seed: int = 0,
    *,
    warmup: int = 3,
    repeats: int = 10,
    threads: int | None = None,
    link_sizes: Sequence[int] = LINK_SIZES,
    mode: str = "train",
    calibrated: bool = True,
    calibration_s: float = CALIBRATION_SECONDS,
    pin_cores: bool = True,
    idle_penalty: bool = False,
) -> Profile:
    """Profile the model ``spec`` (a catalogue name or ``path/to/module.py:factory``) on ``devices``.

    Layers are measured once per distinct device class (the first device of the class); links as
    ``profile_links`` says. With ``calibrated`` (default) the layer costs and the per-task
    overheads are then taken from real backend runs in ``mode`` (``calibrate``); the direct
    timings stay in ``meta["direct"]``; each calibration run (and each run of the concurrency
    slowdown) lasts about ``calibration_s`` (``calibration_samples``). The cluster has one device
    per given device, and at least two (a pipeline needs two processes or threads, so ``cpu``
    alone measures two CPU processes), each of its class with speed 1.0, so the simulator takes
    the measured costs. With ``idle_penalty`` (CPU, calibrated) the cluster also charges how much
    slower the network computes after its core sat idle (``measure_idle_penalty``); off by
    default: in the session-21 accuracy runs it moved predictions further from the runs (MAPE
    10.1% with it, 8.9% without, same profiles and runs; BENCHMARKS.md), so the profile's other
    costs seem to hold part of it already.
    """
    from partime_sim.torch_networks import resolve_model

    if transport not in TRANSPORTS:
        raise ConfigError(f"transport {transport!r} is unknown; use one of {', '.join(TRANSPORTS)}")
    _check_counts(warmup, repeats)
    devs = parse_devices(devices)
    resolved = resolve_model(spec, seed=seed, dtype=dtype, input_shape=None if input_shape is None
                             else tuple(input_shape))
    if mode not in ("train", "infer"):
        raise ConfigError(f"mode={mode!r} is unknown; use 'train' or 'infer'")
    per_class: dict[str, Network] = {}
    overheads: dict[str, tuple[float, float, float]] = {}
    direct: dict[str, Any] = {}
    jitter: dict[str, float] = {}
    samples: dict[str, int] = {}
    for dev in devs:
        cls = device_class(dev)
        if cls not in per_class:
            per_class[cls] = profile_layers(resolved.model, resolved.input_shape, str(dev), dtype, warmup=warmup,
                                            repeats=repeats, threads=threads, seed=seed)
            overheads[cls] = (0.0, 0.0, 0.0)
            if calibrated:
                direct[cls] = [list(r) for r in per_class[cls].class_costs[cls]]
                samples[cls] = calibration_samples(per_class[cls], mode, calibration_s)
                per_class[cls], overheads[cls], jitter[cls] = calibrate(
                    per_class[cls], resolved.model, resolved.input_shape, str(dev), dtype, mode,
                    samples=samples[cls], threads=threads)
    first = next(iter(per_class.values()))
    analytic = resolved.network if resolved.network.num_layers == first.num_layers else None
    layers = tuple(lay if analytic is None else dataclasses.replace(lay, flops=analytic.layers[i].flops)
                   for i, lay in enumerate(first.layers))
    network = Network(f"{resolved.name}[{'+'.join(per_class)}]", layers, first.input_bytes,
                      {cls: net.class_costs[cls] for cls, net in per_class.items()})
    count = max(len(devs), 2)
    skews = BARRIER_SKEWS_S
    if calibrated:  # a lockstep tick of this network: its stages' compute, drawn with the measured spread
        cls = device_class(devs[0])
        skews = tick_skews(_sample_seconds(per_class[cls], cls, overheads[cls], mode) / count, jitter[cls])
    links = profile_links([str(d) for d in devs], transport, link_sizes, pin_cores=pin_cores, barrier_skews=skews,
                          mode=mode)
    # workers share CPU cores, or one GPU repeated (threads and streams); distinct GPUs are taken
    # not to slow each other
    shared_gpu = transport == "local" and len(devs) > 1 and len(set(map(str, devs))) == 1 and devs[0].type == "cuda"
    slowdown = 1.0
    if calibrated and (all(d.type == "cpu" for d in devs) or shared_gpu):
        slowdown = concurrency_slowdown(spec, count, transport, seed, dtype, tuple(resolved.input_shape), mode,
                                        samples=samples[device_class(devs[0])], threads=threads,
                                        device=str(devs[0]), pin_cores=pin_cores)
    # compute after an idle core is slower (a property of the CPU's cores; GPUs not measured)
    measure_idle = idle_penalty and calibrated and all(d.type == "cpu" for d in devs)
    idle = measure_idle_penalty(spec, seed, dtype, tuple(resolved.input_shape), mode, threads=threads,
                                pin_cores=pin_cores) if measure_idle else ()
    classes = [device_class(devs[min(i, len(devs) - 1)]) for i in range(count)]
    memory = [torch.cuda.get_device_properties(d).total_memory if d.type == "cuda" else math.inf
              for d in (devs[min(i, len(devs) - 1)] for i in range(count))]
    cluster = Cluster(
        f"profiled:{'+'.join(per_class)}:{transport}",
        tuple(Device(f"{cls}:{i}", cls, 1.0, mem, task_overhead_s=overheads[cls])
              for i, (cls, mem) in enumerate(zip(classes, memory))),
        link=links.link, links={k: v for k, v in links.pairs.items() if max(k) < count},
        host_link=links.host_link, barrier_s=links.barrier_s * barrier_rounds(count),
        barrier_close_s=links.barrier_close_s * barrier_rounds(count),
        barrier_close_window_s=BARRIER_CLOSE_WINDOW_S if links.barrier_close_s > 0 else 0.0,
        concurrency_slowdown=slowdown, idle_penalty=idle,
    )
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(), "torch": torch.__version__, "python": platform.python_version(),
        "spec": spec, "devices": [str(d) for d in devs], "transport": transport, "dtype": dtype,
        "input_shape": list(resolved.input_shape), "seed": seed, "warmup": warmup, "repeats": repeats,
        "threads": threads if threads is not None else (1 if devs[0].type == "cpu" else torch.get_num_threads()),
        "link_points": links.points,
        "barrier_per_round_s": links.barrier_s, "barrier_close_per_round_s": links.barrier_close_s,
        "mode": mode, "calibrated": calibrated, "task_overhead_s": overheads, "direct": direct,
        "jitter": jitter, "concurrency_slowdown": slowdown, "calibration_samples": samples,
        "pin_cores": pin_cores, "barrier_skews_s": list(skews), "idle_penalty": [list(p) for p in idle],
    }
    return Profile(network, cluster, meta)
