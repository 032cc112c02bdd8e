"""Import a ``torch.distributed.pipelining`` schedule into the IR, so its timing and staleness
come out of the same engines as the built-in generators.

torch describes a schedule as ``pipeline_order``: rank -> list (one entry per time step) of
``_Action(stage_index, computation_type, microbatch_index)`` or None (idle). Here a rank is a
device, the time step is the tick, FULL_BACKWARD/BACKWARD_INPUT/BACKWARD_WEIGHT become B/BI/BW,
OVERLAP_F_B runs its sub-actions one after the other, and communication/FSDP actions are
dropped (the cost model adds transfers from the dependencies). torch steps the optimizer once
after the whole schedule, so training gets one OPT per stage right after its last backward.
torch itself is imported only by ``import_torch_schedule``.
"""

from __future__ import annotations

import re
import types
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from partime_sim.errors import ConfigError, ScheduleError
from partime_sim.generators import _data_deps
from partime_sim.schedule import B, BI, BW, F, OPT, Schedule

_COMPUTE = {"F": F, "B": B, "I": BI, "W": BW}
# torch's text form: 2F0, 1W3, 0SEND_F1, 0REDUCE_GRAD, and (0F7;7B3)OVERLAP_F_B
_ACTION = re.compile(r"^(\d+)(F|I|B|W|UNSHARD|RESHARD|REDUCE_GRAD|SEND_F|RECV_F|SEND_B|RECV_B)(\d*)$")


def from_pipeline_order(
    pipeline_order: Mapping[int, Sequence[Any]],
    num_stages: int,
    num_microbatches: int,
    stage_to_rank: Mapping[int, int] | Sequence[int] | None = None,
    name: str = "torch",
) -> Schedule:
    """Convert torch's ``pipeline_order`` (actions, or their text form such as ``'2F0'``) to a
    validated Schedule; ``stage_to_rank`` defaults to where each stage's actions are."""
    rows = []  # (stage, kind, microbatch, tick, rank) in each rank's order
    for r in sorted(pipeline_order):
        for step, action in enumerate(pipeline_order[r]):
            for s, k, m in _compute_actions(action):
                if not 0 <= s < num_stages:
                    raise ScheduleError(f"rank {r} step {step}: action {action} names stage {s}; "
                                        f"num_stages is {num_stages}")
                if m is None or not 0 <= m < num_microbatches:
                    raise ScheduleError(f"rank {r} step {step}: action {action} uses microbatch {m}; "
                                        f"pass num_microbatches > {m} or fix the order")
                rows.append((s, k, m, step, int(r)))
    if not rows:
        raise ScheduleError("pipeline_order has no compute action (F, B, I, W); nothing to import")
    stage_a, kind_a, sample_a, tick_a, rank_a = np.array(rows, dtype=np.int64).T
    placement = _placement(stage_a, rank_a, num_stages, stage_to_rank)
    train = bool(np.isin(kind_a, (B, BI, BW)).any())
    if train:
        stage_a, kind_a, sample_a, tick_a, rank_a = _add_updates(stage_a, kind_a, sample_a, tick_a, rank_a)
    src, dst = _data_deps(num_stages, num_microbatches, stage_a, kind_a, sample_a)
    sched = Schedule.build(
        name, "train" if train else "infer", num_stages, num_microbatches, int(placement.max()) + 1,
        dict(stage=stage_a, kind=kind_a, sample=np.where(kind_a == OPT, -1, sample_a), tick=tick_a, device=rank_a),
        src, dst, params={"stage_to_rank": placement.tolist()},
    )
    return sched.validate()


def _compute_actions(action: Any) -> list[tuple[int, int, int | None]]:
    """(stage, kind, microbatch) of the compute work in one entry; [] for idle or communication."""
    if action is None or action == "":
        return []
    if isinstance(action, str):
        if action.startswith("(") and action.endswith(")OVERLAP_F_B"):
            return [part for sub in action[1:-12].split(";") for part in _compute_actions(sub)]
        m = _ACTION.match(action.strip())
        if not m:
            raise ScheduleError(f"cannot read torch action {action!r}; write e.g. '2F0' (stage, type, microbatch)")
        s, ctype, mb = m.groups()
        return [(int(s), _COMPUTE[ctype], int(mb) if mb else None)] if ctype in _COMPUTE else []
    ctype = getattr(action.computation_type, "value", action.computation_type)
    if getattr(action, "sub_actions", None):  # OVERLAP_F_B: its parts, in order
        return [part for sub in action.sub_actions for part in _compute_actions(sub)]
    if ctype not in _COMPUTE:
        return []
    return [(int(action.stage_index), _COMPUTE[ctype], action.microbatch_index)]


def _placement(stage: np.ndarray, rank: np.ndarray, S: int, stage_to_rank: Any) -> np.ndarray:
    """Stage -> rank; every action of a stage must run on that rank."""
    seen = np.full(S, -1, dtype=np.int64)
    seen[stage] = rank
    if stage_to_rank is None:
        placement = seen
    else:
        try:
            placement = np.array([stage_to_rank[s] for s in range(S)], dtype=np.int64)
        except (KeyError, IndexError):
            raise ScheduleError(f"stage_to_rank must give a rank for each of the {S} stages") from None
    wrong = placement[stage] != rank
    if np.any(wrong):
        i = int(np.flatnonzero(wrong)[0])
        raise ScheduleError(f"stage {stage[i]} runs on rank {rank[i]} but belongs to rank {placement[stage[i]]}; "
                            "give the schedule's stage_to_rank")
    if np.any(placement < 0):
        raise ScheduleError(f"stage {int(np.flatnonzero(placement < 0)[0])} has no action; "
                            f"num_stages={S} does not match the pipeline_order")
    return placement


def _add_updates(stage, kind, sample, tick, rank) -> tuple[np.ndarray, ...]:
    """One OPT per stage right after its last B/BW on its rank (torch: one optimizer step per batch)."""
    grads = np.flatnonzero(np.isin(kind, (B, BW)))
    last = {int(stage[i]): int(i) for i in grads}  # later entries win: the last one of each stage
    after = np.array(sorted(last.values()), dtype=np.int64)
    values = (stage[after], OPT, -1, tick[after], rank[after])
    return tuple(np.insert(col, after + 1, v) for col, v in zip((stage, kind, sample, tick, rank), values))


def torch_schedule_names() -> list[str]:
    """The torch schedule classes this torch provides (names without the ``Schedule`` prefix)."""
    from torch.distributed.pipelining import schedules as tps

    base = (tps.PipelineScheduleSingle, tps.PipelineScheduleMulti)
    return sorted(n.removeprefix("Schedule") for n, c in vars(tps).items()
                  if n.startswith("Schedule") and isinstance(c, type) and issubclass(c, base))


def import_torch_schedule(
    class_name: str, num_stages: int, num_microbatches: int, *, stages_per_rank: int | None = None
) -> Schedule:
    """Build torch schedule ``class_name`` (e.g. 'GPipe', '1F1B', 'Interleaved1F1B', 'LoopedBFS',
    'InterleavedZeroBubble', 'ZBVZeroBubble', 'DualPipeV') for ``num_stages`` stages and import it.

    No process group is needed: the class computes the order of every rank from the stage
    count, the rank count and the microbatch count, so it is given stand-in stage objects.
    Multi-stage classes get ``stages_per_rank`` stages per rank (default 2), single-stage ones 1.
    """
    from torch.distributed.pipelining import schedules as tps
    from torch.distributed.pipelining._utils import generate_rank_to_stage_mapping

    names = torch_schedule_names()
    match = {n.lower(): n for n in names}.get(class_name.removeprefix("Schedule").lower())
    if match is None:
        raise ConfigError(f"torch schedule {class_name!r} is unknown; use one of {', '.join(names)}")
    cls = getattr(tps, "Schedule" + match)
    single = issubclass(cls, tps.PipelineScheduleSingle)
    per_rank = stages_per_rank if stages_per_rank is not None else (1 if single else 2)
    if per_rank < 1 or (single and per_rank != 1) or num_stages % per_rank or num_stages < 1 or num_microbatches < 1:
        raise ConfigError(
            f"torch {match} cannot run {num_stages} stages, {num_microbatches} microbatches, {per_rank} stages "
            f"per rank; use stages >= 1 divisible by stages_per_rank ({'1' if single else 'default 2'})"
        )
    ranks = num_stages // per_rank
    style = "v" if match in ("ZBVZeroBubble", "DualPipeV") else "loop"
    mine = generate_rank_to_stage_mapping(ranks, num_stages, style=style)[0]
    stages = [types.SimpleNamespace(num_stages=num_stages, group_size=ranks, group_rank=0, stage_index=s, submod=None,
                                    is_first=s == 0, is_last=s == num_stages - 1) for s in mine]
    try:
        sched = cls(stages[0], num_microbatches) if single else cls(stages, num_microbatches)
    except (ValueError, RuntimeError, AssertionError) as exc:
        raise ConfigError(f"torch {match} refuses {num_stages} stages x {num_microbatches} microbatches "
                          f"({exc}); change the counts") from None
    order = getattr(sched, "pipeline_order", None)
    if not order:
        raise ConfigError(f"torch {match} publishes no pipeline_order; pick a schedule that does")
    stage_to_rank = getattr(sched, "stage_index_to_group_rank", None) or {s: s for s in range(num_stages)}
    try:
        return from_pipeline_order(order, num_stages, num_microbatches, stage_to_rank, name=f"torch-{match}")
    except ScheduleError as exc:  # e.g. torch 2.13's Schedule1F1B starts its last rank at F1 and ends at F{M}
        raise ConfigError(f"torch {match} publishes an inconsistent pipeline_order ({exc}); "
                          "it cannot be imported, pick another schedule") from None
