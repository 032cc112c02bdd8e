"""One emulated learning run (network x schedule x devices x stream x optimizer): the glue
the ``emulate`` command, the demo and notebooks share. The same seed gives the same stream
and the same initial weights in every command of the project."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from partime_sim.errors import ConfigError

IMPLS = ("jax", "torch")
CURVE_POINTS = 100


@dataclass(frozen=True)
class EmulateConfig:
    network: str
    schedule: str
    devices: int
    samples: int = 2000
    stream: str = "shapes"
    optimizer: str = "sgd"
    lr: float = 0.03
    seed: int = 0
    seeds: int = 1
    dtype: str = "float32"
    impl: str = "jax"
    partition: str = "minmax"
    microbatches: int | None = None
    compensation: str = "none"  # a staleness compensation method (partime_sim.compensation)
    workers: int | None = None  # JAX on a CPU: seeds run in at most this many calls side by side [one per core]


def _learning_summary(result: Any) -> dict[str, Any]:
    loss = np.asarray(result.loss, dtype=float)
    tail = loss[-max(1, loss.size // 10):]
    _, curve = result.loss_curve(CURVE_POINTS)
    return {
        "final_loss": float(loss[-1]),
        "mean_loss_last_10pct": float(tail.mean()),
        "online_accuracy": result.online_accuracy,
        "loss_curve": [float(v) for v in curve],  # mean loss of CURVE_POINTS equal bins of the stream
    }


def emulate(cfg: EmulateConfig) -> list[dict[str, Any]]:
    """Run ``cfg`` for seeds seed..seed+seeds-1; one result row per seed."""
    from partime_sim.catalogue import get_network
    from partime_sim.cluster import ideal_cluster
    from partime_sim.compensation import check_compensation, stage_delays
    from partime_sim.generators import generate
    from partime_sim.models import build_torch_model, input_shape, num_outputs, split_stages
    from partime_sim.optimizers import OptimizerSpec
    from partime_sim.streams import make_stream
    from partime_sim.study import resolve_partition

    if cfg.impl not in IMPLS:
        raise ConfigError(f"--impl {cfg.impl!r} is unknown; use one of {IMPLS}")
    if cfg.seeds < 1:
        raise ConfigError(f"--seeds {cfg.seeds} must be >= 1")
    check_compensation(cfg.compensation)
    spec = OptimizerSpec(cfg.optimizer, lr=cfg.lr)
    network = get_network(cfg.network)
    partition = resolve_partition(cfg.partition, network, ideal_cluster(cfg.devices), cfg.devices, "train")
    schedule = generate(cfg.schedule, cfg.devices, cfg.samples, "train", microbatches=cfg.microbatches)
    seeds = list(range(cfg.seed, cfg.seed + cfg.seeds))
    streams = [make_stream(cfg.stream, cfg.samples, input_shape(cfg.network), num_outputs(cfg.network), s)
               for s in seeds]
    stage_sets = [split_stages(build_torch_model(cfg.network, s, dtype=cfg.dtype), partition) for s in seeds]
    if cfg.impl == "torch":
        from partime_sim.emulator_torch import emulate_torch

        results = [emulate_torch(schedule, stages, st.x, st.y, optimizer=spec, dtype=cfg.dtype,
                                 compensation=cfg.compensation)
                   for stages, st in zip(stage_sets, streams)]
    else:
        import jax

        from partime_sim.emulator_jax import emulate_jax_sweep
        from partime_sim.models import stage_to_jax

        with jax.enable_x64(cfg.dtype == "float64"):  # float64 weights convert only in x64 mode
            results = emulate_jax_sweep(schedule, [stage_to_jax(s) for s in stage_sets], [st.x for st in streams],
                                        [st.y for st in streams], optimizer=spec, dtype=cfg.dtype,
                                        compensation=cfg.compensation, workers=cfg.workers)
    head = {"network": network.name, "schedule": cfg.schedule, "devices": cfg.devices, "samples": cfg.samples,
            "stream": cfg.stream, "optimizer": cfg.optimizer, "lr": cfg.lr, "impl": cfg.impl, "dtype": cfg.dtype,
            "compensation": cfg.compensation}
    if cfg.compensation != "none":  # the per-stage delay d_k the method derived from the schedule
        head["delays"] = stage_delays(schedule).tolist()
    return [{**head, "seed": s, **_learning_summary(r)} for s, r in zip(seeds, results)]


def emulate_vs_sequential(cfg: EmulateConfig) -> list[dict[str, Any]]:
    """The run and the same run trained sequentially, with the loss gap (pipelined - sequential)."""
    rows = emulate(cfg)
    base = emulate(replace(cfg, schedule="sequential", compensation="none"))
    for row, ref in zip(rows, base):
        row["sequential"] = {k: ref[k] for k in ("final_loss", "mean_loss_last_10pct", "online_accuracy")}
        row["loss_gap_last_10pct"] = row["mean_loss_last_10pct"] - ref["mean_loss_last_10pct"]
    return rows
