"""One real run from command-line settings (``partime-sim run`` and its torchrun entry): the
network, partition, schedule, stream and weights are built exactly as ``emulate`` builds them
(same seed -> same stream and initial weights), so ``run`` and ``emulate --impl torch --dtype
float64`` with the same flags print the same ``final_loss``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from partime_sim.errors import ConfigError


@dataclass(frozen=True)
class RunConfig:
    network: str
    schedule: str
    devices: str  # "cpu,cpu", "cuda:0,cuda:1", ...
    transport: str = "local"
    samples: int = 256
    mode: str = "train"
    stream: str | None = None  # default: "shapes" for classifiers, "drift" (regression) otherwise
    optimizer: str = "sgd"
    lr: float = 0.03
    seed: int = 0
    dtype: str = "float32"
    partition: str = "minmax"
    microbatches: int | None = None
    compensation: str = "none"
    input_shape: tuple[int, ...] | None = None
    threads: int | None = None
    cuda_graphs: bool = False  # inference on GPUs: each stage's forward replayed from a CUDA graph
    pin_cores: bool = True  # distributed CPU workers: each bound to cores of its own


def prepare(cfg: RunConfig) -> tuple[Any, dict[str, Any]]:
    """The backend Job for ``cfg`` and the fields that describe it in the output."""
    from partime_sim.backends.pipeline import make_job, parse_devices
    from partime_sim.cluster import ideal_cluster
    from partime_sim.models import check_stage_shapes, split_stages
    from partime_sim.optimizers import OptimizerSpec
    from partime_sim.partition import Partition
    from partime_sim.streams import make_stream
    from partime_sim.study import resolve_partition, resolve_schedule
    from partime_sim.torch_networks import resolve_model

    devices = parse_devices(cfg.devices)
    resolved = resolve_model(cfg.network, seed=cfg.seed, dtype=cfg.dtype, input_shape=cfg.input_shape)
    network = resolved.network
    costed = any(layer.fwd > 0 for layer in network.layers)
    num_stages = len(devices) if cfg.schedule != "sequential" else 1
    schedule = resolve_schedule(cfg.schedule, num_stages, cfg.samples, cfg.mode, cfg.microbatches)
    part_spec = cfg.partition if costed or cfg.partition not in ("minmax", "block") else "even"
    partition = resolve_partition(part_spec, network, ideal_cluster(schedule.num_stages), schedule.num_stages,
                                  cfg.mode)
    stages = split_stages(resolved.model, Partition(partition.bounds, tuple(range(partition.num_stages))))
    out_shape = check_stage_shapes(stages, resolved.input_shape)[-1]
    classes = _num_classes(cfg.network)
    stream_name = cfg.stream or ("shapes" if classes else "drift")
    outputs = classes or int(np.prod(out_shape))
    stream = make_stream(stream_name, cfg.samples, resolved.input_shape, outputs, cfg.seed)
    spec = OptimizerSpec(cfg.optimizer, lr=cfg.lr)
    job = make_job(schedule, stages, stream.x, stream.y, devices=devices, optimizer=spec, dtype=cfg.dtype,
                   compensation=cfg.compensation, keep_outputs=cfg.mode == "infer", threads=cfg.threads,
                   cuda_graphs=cfg.cuda_graphs, pin_cores=cfg.pin_cores)
    head = {"network": network.name, "schedule": cfg.schedule, "mode": cfg.mode, "devices": len(devices),
            "stages": schedule.num_stages, "partition": list(partition.sizes), "transport": cfg.transport,
            "device_list": devices, "stream": stream_name, "dtype": cfg.dtype, "cuda_graphs": cfg.cuda_graphs}
    return job, head


def _num_classes(network: str) -> int | None:
    from partime_sim.models import num_classes

    try:
        return num_classes(network)
    except ConfigError:  # not a trainable catalogue network: no class labels
        return None


def summary(head: dict[str, Any], result: Any, mode: str) -> dict[str, Any]:
    """simulate's keys (metrics of the measured trace) plus, when training, emulate's learning keys."""
    from partime_sim.learning import _learning_summary
    from partime_sim.metrics import summarize

    metrics = summarize(result.trace, num_devices=head["devices"])
    row = {**head, **{k: v for k, v in metrics.items() if k != "devices"}, "wall_s": result.wall_s,
           "cores": [None if c is None else list(c) for c in result.cores]}
    if mode == "train":
        row.update(_learning_summary(result))
    return row


def run_config(cfg: RunConfig) -> tuple[dict[str, Any] | None, Any]:
    """Run ``cfg``: (summary, RunResult). Under torchrun (RANK in the environment) this process
    is one rank; only rank 0 gets the result, the others get (None, None)."""
    import time

    from partime_sim.backends.pipeline import TRANSPORTS, assemble, run_local

    if cfg.transport not in TRANSPORTS:
        raise ConfigError(f"--transport {cfg.transport!r} is unknown; use one of {TRANSPORTS}")
    job, head = prepare(cfg)
    t0 = time.perf_counter()
    if cfg.transport == "local":
        parts = run_local(job)
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun
        from partime_sim.backends.launch import worker_process

        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if world != job.workers.num_workers:
            raise ConfigError(f"torchrun started {world} processes but the schedule runs on "
                              f"{job.workers.num_workers} devices; use --nproc-per-node {job.workers.num_workers}")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        gathered = worker_process([job], rank, world, None, local_world, int(os.environ.get("LOCAL_RANK", rank)))
        if rank != 0:
            return None, None
        parts = gathered[0]
    else:
        from partime_sim.backends.launch import run_spawned

        parts = run_spawned([job])[0]
    result = assemble(job, parts, time.perf_counter() - t0, cfg.transport)
    return summary(head, result, cfg.mode), result
