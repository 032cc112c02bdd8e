"""JAX numerical emulator: the learning dynamics of any schedule, exactly, on one device.

One generic interpreter of the IR, nothing per schedule name (DESIGN.md, "Exact learning
semantics"; the torch reference ``emulator_torch`` is the oracle it must equal to rounding):

* ``F(k, m)`` runs stage k on ``x[m]`` (stage 0, batch dim 1) or on F(k-1, m)'s output, with
  the stage's *current* weights, and stashes (input, weights) for the backward of (k, m); the last
  stage's F records the online loss and whether sample m was classified right.
* ``B(k, m)`` (or ``BI`` then ``BW``) takes as cotangent the loss gradient of F(S-1, m) (last stage)
  or the input gradient of the stage-(k+1) backward it *depends on in the IR* (PARTIME's tick t
  uses stage k+1's gradient of tick t-1, another sample), and takes the VJP at the stashed
  (weights, input) of F(k, m). The weight gradient is added to the stage's accumulator (the first
  one since the last OPT replaces it, as torch's ``.grad`` does); a BI only sends the input gradient
  and keeps its cotangent, and its BW redoes the VJP with it to add the weight gradient.
  ``stash_weights=False`` takes each VJP at the weights current when the task runs (the last
  stage's loss recomputed on them), as the torch reference does.
* ``OPT(k)`` steps the optimizer (optax, with torch's arithmetic) on accumulator / number of
  gradients since the last OPT.

Why a compiled program: the schedule is turned once into numpy arrays of shape (waves, stages):
an op code and ring-buffer slots per stage per wave. A wave holds at most one task per stage, and
every value a task reads was written in an earlier wave, so ``lax.scan`` over waves with a Python
loop over stages replays the schedule exactly, under one ``jit``. Ring sizes come from the IR (the
most writes to a ring while one of its values is still to be read), so memory stays bounded however
long the stream. ``emulate_jax_sweep`` runs C configurations (seeds, streams, learning rates and
other hyper-parameters) that share the schedule and the shapes in the same scan, with a leading
configuration axis: the op codes are shared, so every branch stays a real branch. On the CPU
backend the configurations are split into one chunk per core, run side by side.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from partime_sim.compensation import CompensationPlan, compensation_plan
from partime_sim.errors import ConfigError, ScheduleError
from partime_sim.optimizers import OptimizerSpec
from partime_sim.schedule import BI, BW, OPT, B, F, Schedule

NOOP, OP_F, OP_B, OP_BI, OP_BW, OP_OPT = range(6)
_OP_OF_KIND = {F: OP_F, B: OP_B, BI: OP_BI, BW: OP_BW, OPT: OP_OPT}
LOSSES = ("cross_entropy", "mse")
DTYPES = ("float32", "float64")
Stage = tuple[Any, Callable[[Any, Any], Any]]  # (params pytree, apply_fn(params, x) -> y)


# ---- the program: a schedule compiled to (waves, stages) arrays ------------------------------
_TABLES = ("op", "sample", "read_act", "write_act", "write_stash", "read_stash", "read_cot", "write_grad",
           "write_wpend", "read_wpend", "version", "new_version")
_RINGS = ("act", "stash", "grad", "wpend", "weights")
_WRITES = {"write_act": "act", "write_stash": "stash", "write_grad": "grad", "write_wpend": "wpend"}


@dataclass(frozen=True, eq=False)
class Program:
    """What every stage does at every wave, and where it reads and writes its values.

    Every table has shape (waves, stages). Rings per stage k: ``act`` (F(k, m)'s output; for the
    last stage the loss gradient), ``stash`` (F's input, for the backward), ``grad`` (a backward's
    input gradient, for stage k-1), ``wpend`` (the cotangent a BI used, for its BW) and ``weights``
    (the weight versions still in use: OPT writes a new one, F reads the current one, a backward
    the one its F used, so weight stashing copies no weights). Every ring but ``weights`` has a
    *sink* slot after its live ones: a wave that writes nothing to a ring writes to its sink, so
    the interpreter writes every ring every wave without a branch.
    """

    name: str
    num_stages: int
    num_samples: int
    op: np.ndarray
    sample: np.ndarray
    read_act: np.ndarray  # F, k >= 1: slot of F(k-1, m)'s output in stage k-1's act ring
    write_act: np.ndarray  # F: slot of this F's output (last stage: its loss gradient)
    write_stash: np.ndarray  # F: slot to stash its input (and weights) in
    read_stash: np.ndarray  # B/BI/BW(k, m): slot of F(k, m)'s stash
    read_cot: np.ndarray  # B/BI: slot of the cotangent (stage k+1's grad ring; last stage: own act ring)
    write_grad: np.ndarray  # B/BI, k >= 1: slot of this backward's input gradient
    write_wpend: np.ndarray  # BI: slot to keep its cotangent in
    read_wpend: np.ndarray  # BW: slot of its BI's cotangent
    version: np.ndarray  # F, OPT: slot of the current weights; B/BI/BW: of the weights the VJP uses
    new_version: np.ndarray  # OPT: slot of the weights it makes
    ring_sizes: tuple[tuple[int, int, int, int, int], ...]  # per stage, live slots of _RINGS
    final_version: np.ndarray  # (stages,): slot of the final weights
    loss_wave: np.ndarray  # (samples,): the wave of F(S-1, m), whose loss is sample m's
    loss_task: np.ndarray  # (samples,): F(S-1, m)'s index in the schedule's task table

    @property
    def num_waves(self) -> int:
        return int(self.op.shape[0])

    def tables(self) -> dict[str, np.ndarray]:
        """The per-wave tables, the ``xs`` of the scan."""
        return {n: getattr(self, n) for n in _TABLES}


def compile_schedule(schedule: Schedule, stash_weights: bool = True, plan: CompensationPlan | None = None) -> Program:
    """Compile a schedule into a Program (pure numpy, independent of the model): validate it, keep
    the F/B/BI/BW/OPT tasks (BARRIER and transfers move no numbers), renumber their waves densely,
    wire every read to the write it depends on, and size the rings.

    ``plan`` (``compensation.compensation_plan``) rewires, for ``stash``, the forward each B/BI
    (and so its BW) differentiates; for ``ema``, a stage's backwards read the weight version
    current when they run (B/BI) or when their BI ran (BW), whose moving average they use."""
    if not isinstance(schedule, Schedule):
        raise ConfigError(f"schedule={schedule!r} is not a Schedule; build one with generators.generate(...)")
    s = schedule.validate()
    mb = s.params.get("microbatch_size", 1)
    if mb != 1:
        raise ConfigError(f"schedule {s.name!r} has microbatch_size={mb}; the emulator supports microbatches of "
                          "one sample only: generate the schedule with microbatch_size 1")
    S, N = s.num_stages, s.num_samples
    keep = np.flatnonzero(np.isin(s.kind, tuple(_OP_OF_KIND)))
    stage, kind, sample = s.stage[keep].astype(np.int64), s.kind[keep], s.sample[keep].astype(np.int64)
    raw = s.wave[keep]  # non-decreasing (the IR's rule): dense ranks drop the waves with no such task
    wave = np.cumsum(np.r_[False, raw[1:] != raw[:-1]]).astype(np.int64)
    W = int(wave[-1]) + 1 if keep.size else 0
    cell = wave * S + stage
    twice = np.bincount(cell, minlength=W * S)[cell] > 1
    if twice.any():
        i = keep[np.flatnonzero(twice)[0]]
        raise ScheduleError(f"{s.name}: wave {s.wave[i]} holds two tasks of stage {s.stage[i]} "
                            f"(one is {s.task_label(i)}); a stage runs one task at a time, fix the waves")
    is_f, is_bi, is_bw = kind == F, kind == BI, kind == BW
    is_b = (kind == B) | is_bi  # the backwards that take a cotangent and make an input gradient
    m = np.maximum(sample, 0)
    f_of = np.full((S, N), -1, dtype=np.int64)
    f_of[stage[is_f], sample[is_f]] = np.flatnonzero(is_f)
    bi_of = np.full((S, N), -1, dtype=np.int64)
    bi_of[stage[is_bi], sample[is_bi]] = np.flatnonzero(is_bi)
    fwd, bi = f_of[stage, m], bi_of[stage, m]
    if np.any((is_b | is_bw) & (fwd < 0)):
        raise ScheduleError(f"{s.name}: a backward has no forward of its (stage, sample)")
    if np.any(is_bw & (bi < 0)):
        raise ScheduleError(f"{s.name}: a BW has no BI of its (stage, sample); split backwards come in pairs")
    if plan is not None and plan.forward_of is not None:  # stash: the forward of the gradient signal's sample
        pos = np.full(len(s), -1, dtype=np.int64)
        pos[keep] = np.arange(keep.size)
        fo = np.asarray(plan.forward_of)[keep]
        sel = fo >= 0
        fwd = fwd.copy()
        fwd[sel] = pos[fo[sel]]
        fwd[is_bw] = fwd[bi[is_bw]]  # a BW follows its BI
    ema = [plan is not None and plan.ema_decay[k] is not None for k in range(S)]
    cot_src = _cotangent_sources(s, keep, stage, is_b)

    t = {n: np.full((W, S), -1, dtype=np.int32) for n in _TABLES}
    t["op"][:] = NOOP
    op_of_kind = np.zeros(max(_OP_OF_KIND) + 1, dtype=np.int32)
    op_of_kind[list(_OP_OF_KIND)] = list(_OP_OF_KIND.values())
    t["op"][wave, stage] = op_of_kind[kind]
    t["sample"][wave, stage] = m
    none = np.zeros(0, dtype=np.int64)
    sizes, final = [], np.zeros(S, dtype=np.int64)
    for k in range(S):
        mine = stage == k
        fk, bk = np.flatnonzero(is_f & mine), np.flatnonzero(is_b & mine)  # in wave order
        # act: read by F(k+1, m) as its input, or on the last stage by B/BI(S-1, m) as its loss gradient
        rd = np.flatnonzero(is_f & (stage == k + 1)) if k < S - 1 else bk
        act = _wire(t, k, wave, fk, rd, f_of[k, m[rd]], "write_act", "read_act" if k < S - 1 else "read_cot",
                    k + 1 if k < S - 1 else k)
        rd = np.flatnonzero((is_b | is_bw) & mine)  # stash: read by B/BI/BW(k, m)
        stash = _wire(t, k, wave, fk, rd, fwd[rd], "write_stash", "read_stash", k)
        rd = np.flatnonzero(is_b & (stage == k - 1))  # grad: read by the stage-(k-1) backwards fed from here
        grad = _wire(t, k, wave, bk if k >= 1 else none, rd, cot_src[rd], "write_grad", "read_cot", k - 1)
        ik, wk = np.flatnonzero(is_bi & mine), np.flatnonzero(is_bw & mine)  # wpend: BI(k, m) -> BW(k, m)
        wpend = _wire(t, k, wave, ik, wk, bi[wk], "write_wpend", "read_wpend", k)
        weights, final[k] = _wire_versions(t, k, wave, kind, np.flatnonzero(mine), fwd, stash_weights, W,
                                           bi if ema[k] else None)
        sizes.append((act, stash, grad, wpend, weights))
        _check_updates(s, keep, kind, np.flatnonzero(mine), k)
    for col, ring in _WRITES.items():  # no write at this wave: the ring's sink slot
        sink = np.array([sz[_RINGS.index(ring)] for sz in sizes], dtype=np.int32)
        t[col] = np.where(t[col] < 0, sink[None, :], t[col])
    for col in _TABLES:
        t[col] = np.maximum(t[col], 0)
    loss_wave, loss_task = np.full(N, -1, dtype=np.int64), np.full(N, -1, dtype=np.int64)
    last = np.flatnonzero(is_f & (stage == S - 1))
    loss_wave[sample[last]], loss_task[sample[last]] = wave[last], keep[last]
    return Program(s.name, S, N, **t, ring_sizes=tuple(sizes), final_version=final, loss_wave=loss_wave,
                   loss_task=loss_task)


def _cotangent_sources(s: Schedule, keep: np.ndarray, stage: np.ndarray, is_b: np.ndarray) -> np.ndarray:
    """For each kept B/BI of stage k < S-1, the stage-(k+1) B/BI it depends on (the IR's edge,
    not the sample index: PARTIME's tick t takes stage k+1's gradient of tick t-1)."""
    pos = np.full(len(s), -1, dtype=np.int64)
    pos[keep] = np.arange(keep.size)
    src, dst = pos[s.dep_src], pos[s.dep_dst]
    ok = (src >= 0) & (dst >= 0)
    src, dst = src[ok], dst[ok]
    edge = is_b[dst] & is_b[src] & (stage[src] == stage[dst] + 1)
    if np.bincount(dst[edge], minlength=keep.size).max(initial=0) > 1:
        i = keep[np.flatnonzero(np.bincount(dst[edge], minlength=keep.size) > 1)[0]]
        raise ScheduleError(f"{s.name}: {s.task_label(i)} depends on two backwards of the next stage; "
                            "give each B/BI one cotangent source")
    cot_src = np.full(keep.size, -1, dtype=np.int64)
    cot_src[dst[edge]] = src[edge]
    lacking = np.flatnonzero(is_b & (stage < s.num_stages - 1) & (cot_src < 0))
    if lacking.size:
        i = keep[lacking[0]]
        raise ScheduleError(f"{s.name}: {s.task_label(i)} has no dependency on a backward of stage "
                            f"{s.stage[i] + 1} to take its cotangent from; add that edge")
    return cot_src


def _check_updates(s: Schedule, keep: np.ndarray, kind: np.ndarray, mine: np.ndarray, k: int) -> None:
    """Every OPT applies at least one gradient (the torch reference refuses a mean over none)."""
    grads = np.cumsum(np.isin(kind[mine], (B, BW)))
    opts = np.flatnonzero(kind[mine] == OPT)
    empty = np.flatnonzero(np.diff(np.r_[0, grads[opts]]) == 0)
    if empty.size:
        i = keep[mine[opts[empty[0]]]]
        raise ScheduleError(f"{s.name}: task {s.task_label(i)} updates stage {k} but no backward of that stage "
                            "ran since its previous OPT; an OPT must follow the backwards it applies")


def _wire(t: dict[str, np.ndarray], k: int, wave: np.ndarray, writers: np.ndarray, readers: np.ndarray,
          read_item: np.ndarray, write_col: str, read_col: str, read_stage: int) -> int:
    """Give stage k's ``writers`` ring slots and point every reader (on ``read_stage``) at the slot
    of the writer it reads (``read_item``: task indices among ``writers``). Returns the ring size."""
    if writers.size == 0:
        return 0
    item = np.searchsorted(writers, read_item)
    slot, size = _ring(wave[writers], item, wave[readers])
    t[write_col][wave[writers], k] = slot
    t[read_col][wave[readers], read_stage] = slot[item]
    return size


def _wire_versions(t: dict[str, np.ndarray], k: int, wave: np.ndarray, kind: np.ndarray, mine: np.ndarray,
                   fwd: np.ndarray, stash_weights: bool, W: int, ema_bi: np.ndarray | None = None) -> tuple[int, int]:
    """Slots of stage k's weight versions: version 0 exists before wave 0, version v >= 1 is made by
    the stage's v-th OPT. F and OPT read the current version; a backward reads its F's version
    (weight stashing) or the current one. Returns the ring size and the final version's slot.
    An OPT never writes over the version it reads (that would make XLA copy the ring every wave)."""
    is_opt = kind[mine] == OPT
    ver = np.cumsum(is_opt) - is_opt  # OPTs of the stage before each task
    version_of = np.zeros(kind.size, dtype=np.int64)
    version_of[mine] = ver
    back = np.isin(kind[mine], (B, BI, BW))
    if ema_bi is not None:  # ema: B/BI at the current version's average, BW at its BI's
        reads = np.where(kind[mine] == BW, version_of[np.maximum(ema_bi[mine], 0)], ver)
    else:
        reads = np.where(back & stash_weights, version_of[fwd[mine]], ver)
    opts = mine[is_opt]
    made = np.r_[-1, wave[opts]]  # the wave each version is written at
    item = np.r_[reads, opts.size]  # the final version stays readable to the end
    slot, size = _ring(made, item, np.r_[wave[mine], W])
    t["version"][wave[mine], k] = slot[reads]
    t["new_version"][wave[opts], k] = slot[ver[is_opt] + 1]
    return size, int(slot[-1])


def _ring(write_wave: np.ndarray, read_item: np.ndarray, read_wave: np.ndarray) -> tuple[np.ndarray, int]:
    """Slots for values written at ``write_wave`` (ascending) and read by ``read_item`` at ``read_wave``.

    Value i goes to slot i mod R; the next value in that slot, i + R, is written after value i's
    last read when R counts every write from i up to that read. Strictly after, so a read and a
    write in one wave never meet, whatever order the stages run in."""
    n = write_wave.size
    last = write_wave.copy()
    np.maximum.at(last, read_item, read_wave)
    size = int((np.searchsorted(write_wave, last, side="right") - np.arange(n)).max())
    return np.arange(n) % size, size


# ---- results ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class EmulationResult:
    """What a run learned, with the torch reference's field names (``emulator_torch``):
    the online loss of every sample (at its last-stage forward), whether it was classified
    right (classification only), each stage's final weights (numpy pytrees, the structure of
    the stage's params) and the number of OPTs each stage applied."""

    schedule: str
    loss: np.ndarray  # (N,)
    correct: np.ndarray | None  # (N,) bool, classification only
    final_params: list[Any]
    updates: np.ndarray  # (S,)

    @property
    def online_accuracy(self) -> float | None:
        """Fraction of samples predicted right before their own update (None for regression)."""
        return None if self.correct is None else float(self.correct.mean())

    def loss_curve(self, points: int = 100) -> tuple[np.ndarray, np.ndarray]:
        """(sample index at each bin's centre, mean loss of the bin), at most ``points`` equal bins."""
        if isinstance(points, bool) or not isinstance(points, (int, np.integer)) or points < 1:
            raise ConfigError(f"points={points!r} is invalid; give an integer >= 1")
        n = self.loss.size
        edges = np.linspace(0, n, min(points, n) + 1).round().astype(np.int64)
        means = np.add.reduceat(self.loss, edges[:-1]) / np.diff(edges)
        return (edges[:-1] + edges[1:] - 1) / 2.0, means


# ---- the interpreter ---------------------------------------------------------------------------
def emulate_jax(
    schedule: Schedule,
    stages_jax: Sequence[Stage],
    x: Any,
    y: Any,
    *,
    loss: str | None = None,
    optimizer: OptimizerSpec | None = None,
    dtype: str = "float32",
    stash_weights: bool = True,
    compensation: str = "none",
) -> EmulationResult:
    """Run ``schedule``'s learning dynamics on the stream ``(x[m], y[m])``, m < num_samples.

    ``stages_jax`` holds one ``(params, apply_fn)`` per stage (``models.stage_to_jax``;
    ``apply_fn(params, x)`` maps a batch of one to the next stage's input). ``loss`` defaults to
    cross-entropy for integer ``y`` and MSE for float ``y``; ``optimizer`` to ``OptimizerSpec()``
    (SGD). ``dtype="float64"`` runs in JAX's x64 mode, switched on for this call only.
    ``compensation`` names a staleness compensation method (``compensation.COMPENSATIONS``), applied
    by the rules of ``partime_sim.compensation`` exactly as the torch reference applies them.
    """
    return _emulate(schedule, [stages_jax], [x], [y], [_spec(optimizer)], loss, dtype, stash_weights, 1,
                    compensation)[0]


def emulate_jax_sweep(
    schedule: Schedule,
    stages_jax: Sequence[Stage] | Sequence[Sequence[Stage]],
    x: Any,
    y: Any,
    *,
    loss: str | None = None,
    optimizer: OptimizerSpec | None | Sequence[OptimizerSpec] = None,
    dtype: str = "float32",
    stash_weights: bool = True,
    compensation: str = "none",
    workers: int | None = None,
) -> list[EmulationResult]:
    """Run C configurations of one schedule in one compiled program, one EmulationResult each
    (on a CPU, one call per core side by side, each over its share of the configurations; at
    most ``workers`` calls, e.g. 1 when several sweeps run in parallel processes).

    Each of ``stages_jax`` (a list of per-configuration stage lists: other seeds' weights),
    ``x`` and ``y`` (lists of per-configuration streams) and ``optimizer`` (a list of specs:
    other learning rates, momenta, betas, weight decays) is given either once, shared by every
    configuration, or as a list with one entry per configuration. The configurations share the
    schedule, the shapes (the first configuration's apply functions run them all) and the
    optimizer kind. Results equal separate ``emulate_jax`` runs to rounding.
    """
    per_config = {"stages_jax": bool(stages_jax) and not _is_stage_list(stages_jax),
                  "x": isinstance(x, (list, tuple)), "y": isinstance(y, (list, tuple)),
                  "optimizer": isinstance(optimizer, (list, tuple))}
    given = {"stages_jax": stages_jax, "x": x, "y": y, "optimizer": optimizer}
    counts = {n: len(given[n]) for n, listed in per_config.items() if listed}
    if len(set(counts.values())) > 1:
        raise ConfigError(f"per-configuration lists have different lengths {counts}; give each the same length")
    C = next(iter(counts.values()), 1)
    if C < 1:
        raise ConfigError("a sweep needs at least one configuration; the per-configuration lists are empty")
    items = {n: list(v) if per_config[n] else [v] for n, v in given.items()}
    specs = [_spec(o) for o in items["optimizer"]]
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ConfigError(f"workers={workers!r} is invalid; give an integer >= 1, or None for one per core")
    return _emulate(schedule, items["stages_jax"], items["x"], items["y"], specs, loss, dtype, stash_weights, C,
                    compensation, workers)


def _emulate(schedule: Schedule, stage_sets: list, xs: list, ys: list, specs: list[OptimizerSpec],
             loss: str | None, dtype: str, stash_weights: bool, C: int,
             compensation: str = "none", workers: int | None = None) -> list[EmulationResult]:
    import jax

    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is unknown; use one of {DTYPES}")
    if len({o.name for o in specs}) > 1:
        raise ConfigError(f"a sweep mixes optimizers {sorted({o.name for o in specs})}; sweep one kind at a time")
    if not isinstance(schedule, Schedule):
        raise ConfigError(f"schedule={schedule!r} is not a Schedule; build one with generators.generate(...)")
    plan = compensation_plan(schedule, compensation)
    if plan.name == "stash" and not stash_weights:
        raise ConfigError("compensation='stash' differentiates each gradient signal's own forward at its stashed "
                          "weights, which contradicts stash_weights=False; drop one of the two")
    program = compile_schedule(schedule, stash_weights, plan)
    S = program.num_stages
    for stages in stage_sets:
        if len(stages) != S:
            raise ConfigError(f"{len(stages)} stages given but schedule {schedule.name!r} has {S}; "
                              f"split the model into {S} stages")
    with jax.enable_x64(dtype == "float64"):
        results = _sweep(program, stage_sets, xs, ys, specs, loss, dtype, stash_weights, C, plan, workers)
    for c, r in enumerate(results):
        bad = np.flatnonzero(~np.isfinite(r.loss))
        if bad.size:  # the torch reference stops at the same sample, with the same message
            m = int(bad[0])
            done = (program.op[:program.loss_wave[m]] == OP_OPT).sum(axis=0).tolist()
            where = f"configuration {c}: " if C > 1 else ""
            raise ConfigError(f"{where}loss of sample {m} is {r.loss[m]} at task "
                              f"{schedule.task_label(int(program.loss_task[m]))} after {done} updates per stage; "
                              f"the run diverged: lower the learning rate (lr={specs[c % len(specs)].lr})")
    return results


def _spec(spec: OptimizerSpec | None) -> OptimizerSpec:
    if spec is None:
        return OptimizerSpec()
    if not isinstance(spec, OptimizerSpec):
        raise ConfigError(f"optimizer={spec!r} must be an OptimizerSpec, e.g. OptimizerSpec('adam', lr=1e-3)")
    return spec


def _is_stage_list(obj: Sequence[Any]) -> bool:
    """Whether ``obj`` is one stage list ``[(params, apply_fn), ...]`` rather than one per configuration."""
    first = obj[0]
    return isinstance(first, (tuple, list)) and len(first) == 2 and callable(first[1])


def _sweep(program: Program, stage_sets: list, xs: list, ys: list, specs: list[OptimizerSpec],
           loss: str | None, dtype: str, stash_weights: bool, C: int,
           plan: CompensationPlan | None = None, workers: int | None = None) -> list[EmulationResult]:
    import jax
    import jax.numpy as jnp

    N = program.num_samples
    xs = [_float(np.asarray(a), dtype) for a in xs]
    ys = [np.asarray(a) for a in ys]
    for a in xs + ys:
        if a.ndim == 0 or a.shape[0] < N:
            raise ConfigError(f"the stream has {a.shape[0] if a.ndim else 0} samples but the schedule needs {N}; "
                              "generate a longer stream or a schedule with fewer samples")
    for what, arrays in (("x", xs), ("y", ys)):
        if len({a[:N].shape for a in arrays}) > 1 or len({a.dtype for a in arrays}) > 1:
            raise ConfigError(f"the configurations' {what} differ in shape or dtype "
                              f"({sorted({(a[:N].shape, str(a.dtype)) for a in arrays})}); a sweep needs one shape")
    classify = np.issubdtype(ys[0].dtype, np.integer)
    loss = loss or ("cross_entropy" if classify else "mse")
    if loss not in LOSSES:
        raise ConfigError(f"loss={loss!r} is unknown; use one of {LOSSES}")
    if loss == "cross_entropy" and not classify:
        raise ConfigError(f"loss='cross_entropy' needs integer class labels, got y of dtype {ys[0].dtype}; "
                          "pass loss='mse' for float targets")
    ys = [a[:N].astype(np.int32) if classify else _float(a[:N], dtype) for a in ys]
    xs = [a[:N] for a in xs]
    applies = tuple(fn for _, fn in stage_sets[0])
    params = [[jax.tree.map(lambda p: _float(np.asarray(p), dtype), p) for p, _ in st] for st in stage_sets]
    _check_same_structure(params)
    out = _check_shapes(applies, params[0], xs[0])
    _check_targets(loss, out, ys)
    S = program.num_stages
    decay = any(o.weight_decay > 0 for o in specs)
    # per stage (pipemare: stage k's lr is lr / (1 + d_k), the Python float division torch's reference makes)
    hyper = [[_hyper(replace(o, lr=plan.lr(k, o.lr)) if plan is not None else o, dtype, decay) for o in specs]
             for k in range(S)]
    comp = tuple(("predict", int(plan.predict_steps[k])) if plan is not None and plan.predict_steps[k] > 0
                 else ("ema", float(plan.ema_decay[k])) if plan is not None and plan.ema_decay[k] is not None
                 else ("", 0) for k in range(S))
    run = _compiled(applies, program.ring_sizes, program.num_stages, specs[0].name, loss, stash_weights,
                    len(xs) > 1, len(ys) > 1, comp)
    stack = lambda items: jax.tree.map(lambda *a: np.stack(a), *items)
    tables = {k: jnp.asarray(v) for k, v in program.tables().items()}
    final_version, x64 = jnp.asarray(program.final_version), dtype == "float64"

    def run_chunk(configs: list[int]) -> tuple:
        pick = lambda items: items[0] if len(items) == 1 else stack([items[c % len(items)] for c in configs])
        with jax.enable_x64(x64):  # a config context is per thread
            return jax.block_until_ready(run(tables, final_version, stack([params[c % len(params)] for c in configs]),
                                             [stack([h[c % len(h)] for c in configs]) for h in hyper],
                                             pick(xs), pick(ys)))

    chunks = _config_chunks(C, workers)
    if len(chunks) == 1:
        parts = [run_chunk(chunks[0])]
    else:
        with ThreadPoolExecutor(len(chunks)) as pool:
            parts = list(pool.map(run_chunk, chunks))
    out_params = jax.tree.map(lambda *a: np.concatenate(a)[:C], *[p[0] for p in parts])
    loss_w, correct_w = (np.concatenate([np.asarray(p[i]).T for p in parts])[:C] for i in (1, 2))  # (C, waves)
    results = []
    for c in range(C):
        per_sample = loss_w[c, program.loss_wave]
        correct = correct_w[c, program.loss_wave] > 0.5 if loss == "cross_entropy" else None
        results.append(EmulationResult(
            schedule=program.name, loss=per_sample, correct=correct,
            final_params=[jax.tree.map(lambda a, c=c: a[c], p) for p in out_params],
            updates=(program.op == OP_OPT).sum(axis=0)))
    return results


def _config_chunks(C: int, workers: int | None = None) -> list[list[int]]:
    """The configurations split into equal chunks, one per CPU core, to run side by side.

    Why: a run's scan is serial, so on the CPU backend one compiled call keeps one core busy; C
    configurations ``vmap``-ed in one call cost about C times the arithmetic of one on that core.
    Chunks run in threads (a compiled call releases the GIL), the last one padded with copies of
    configuration C-1 so all share one compiled shape. On an accelerator the ``vmap`` is the
    parallelism: one chunk. ``workers`` caps the chunks.
    """
    import jax

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    chunks = min(C, cores, workers or cores) if jax.default_backend() == "cpu" else 1
    size = -(-C // chunks)
    return [[min(c, C - 1) for c in range(start, start + size)] for start in range(0, C, size)]


def _float(a: np.ndarray, dtype: str) -> np.ndarray:
    return a.astype(dtype) if np.issubdtype(a.dtype, np.number) or a.dtype == bool else a


def _hyper(spec: OptimizerSpec, dtype: str, decay: bool) -> dict[str, np.ndarray]:
    """The optimizer's numbers as arrays, so a sweep can batch them (weight decay only when some
    configuration has it: without it the update skips that step)."""
    hyper = {"lr": np.asarray(spec.lr, dtype), "momentum": np.asarray(spec.momentum, dtype),
             "b1": np.asarray(spec.betas[0], dtype), "b2": np.asarray(spec.betas[1], dtype),
             "eps": np.asarray(spec.eps, dtype)}
    return {**hyper, "weight_decay": np.asarray(spec.weight_decay, dtype)} if decay else hyper


def _check_same_structure(params: list[list[Any]]) -> None:
    import jax

    ref = [jax.tree.map(np.shape, p) for p in params[0]]
    for c, ps in enumerate(params[1:], 1):
        got = [jax.tree.map(np.shape, p) for p in ps]
        if got != ref:
            raise ConfigError(f"configuration {c}'s weights have shapes {got}, configuration 0's {ref}; "
                              "a sweep needs one architecture")


def _check_shapes(applies: tuple, params: list[Any], x: np.ndarray) -> tuple[int, ...]:
    """Trace the stages on a batch of one so a shape mismatch names the stage (not an XLA error)."""
    import jax

    spec = jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype)
    for k, (fn, p) in enumerate(zip(applies, params)):
        try:
            spec = jax.eval_shape(fn, p, spec)
        except Exception as exc:  # noqa: BLE001 - any tracing failure is a shape/model error here
            what = "the stream's samples" if k == 0 else f"stage {k - 1}'s output"
            raise ConfigError(f"stage {k} cannot take {what} of shape {spec.shape}: {exc}; "
                              "check the split of the model into stages and the input shape") from None
    return tuple(spec.shape)


def _check_targets(loss: str, out: tuple[int, ...], ys: list[np.ndarray]) -> None:
    """The checks the torch reference makes on the last stage's output and the targets."""
    if loss == "cross_entropy":
        if len(out) != 2 or out[0] != 1:
            raise ConfigError(f"cross-entropy needs a (1, classes) output from the last stage, got shape {out}; "
                              "end the model with a Linear layer (add Flatten before it)")
        lo, hi = min(int(a.min()) for a in ys), max(int(a.max()) for a in ys)
        if lo < 0 or hi >= out[1]:
            raise ConfigError(f"class labels span {lo}..{hi} but the last stage has {out[1]} outputs; "
                              f"labels must lie in 0..{out[1] - 1}")
    elif int(np.prod(ys[0].shape[1:], dtype=np.int64)) != int(np.prod(out, dtype=np.int64)):
        raise ConfigError(f"mse targets have {int(np.prod(ys[0].shape[1:]))} values per sample but the last stage "
                          f"outputs shape {out}; give one target value per output")


def make_optax(name: str, hyper: dict[str, Any]) -> Any:
    """The optax transformation with torch's arithmetic for ``name`` (see ``optimizers``)."""
    import optax

    if name == "sgd":
        tx = optax.sgd(hyper["lr"])
    elif name == "momentum":  # trace: buf = g + mu * buf (zeros first, so buf = g), then -lr * buf
        tx = optax.sgd(hyper["lr"], momentum=hyper["momentum"])
    elif name == "adam":  # torch Adam up to rounding: eps is added to sqrt(v_hat)
        tx = optax.adam(hyper["lr"], b1=hyper["b1"], b2=hyper["b2"], eps=hyper["eps"])
    else:
        raise ConfigError(f"optimizer {name!r} is unknown")
    if "weight_decay" in hyper:  # torch's L2 decay, added to the gradient first: g + wd * p
        tx = optax.chain(optax.add_decayed_weights(hyper["weight_decay"]), tx)
    return tx


def _loss_fn(loss: str) -> Callable[[Any, Any], Any]:
    import jax
    import jax.numpy as jnp

    if loss == "cross_entropy":
        return lambda out, y: -jax.nn.log_softmax(out.reshape(1, -1), axis=-1)[0, y]
    return lambda out, y: jnp.mean((out - y.reshape(out.shape)) ** 2)


@functools.lru_cache(maxsize=64)
def _compiled(applies: tuple, ring_sizes: tuple, S: int, opt_name: str, loss: str, stash_weights: bool,
              x_batched: bool, y_batched: bool, comp: tuple = ()) -> Callable:
    """The jitted run for one model, ring layout and optimizer kind. The program tables are
    arguments, not constants: schedules with the same ring sizes and wave count share it."""
    import jax

    return jax.jit(functools.partial(_run, applies, ring_sizes, S, opt_name, loss, stash_weights,
                                     x_batched, y_batched, comp or (("", 0),) * S))


def _run(applies: tuple, ring_sizes: tuple, S: int, opt_name: str, loss: str, stash_weights: bool,
         x_batched: bool, y_batched: bool, comp: tuple, tables: dict, final_version: Any, params: list,
         hyper: list, x: Any, y: Any) -> tuple:
    """Scan the program's waves for C configurations at once; returns the final params and the last
    stage's (loss, correct) per wave, each with the configuration axis C. ``hyper`` holds one
    dict per stage (pipemare scales a stage's lr); ``comp[k]`` is stage k's compensation state:
    ``("predict", d)`` or ``("ema", beta)`` keep, per weight version, the live weights ``w`` and
    the weights ``aux`` the stage's forwards and backwards (predict) or backwards (ema) use.

    Layout, chosen so XLA copies no weights per wave (what makes a sweep cheap):

    * the configuration axis is explicit (params, optimizer state and hyper-parameters lead with C;
      x and y too when given per configuration) and the per-configuration maths is ``vmap``-ed
      inside; rings are (slots, C, ...), so writing a slot is an in-place dynamic update (a
      ``vmap`` of the whole run turns those into scatters and copies the rings around branches);
    * per stage and wave, three ``cond``s (forward, backward, optimizer step) compute only what
      the op needs (the op codes are shared by every configuration, so they stay real branches);
    * the weights an op uses are sliced out of the weight ring once, outside the ``cond``s: only
      the optimizer step touches the ring (it writes the new version in place); small results are
      written to their ring slots outside the ``cond``s, to the sink when the op writes nothing.
    """
    import jax
    import jax.numpy as jnp
    import optax
    from jax import lax

    loss_fn = _loss_fn(loss)
    dt = x.dtype
    tree, vmap = jax.tree.map, jax.vmap
    C = jax.tree.leaves(hyper[0])[0].shape[0]
    zeros = lambda spec: jnp.zeros((C, *spec.shape), spec.dtype)
    in_specs, spec = [], jax.ShapeDtypeStruct((1, *x.shape[1 + x_batched:]), dt)
    for fn, p in zip(applies, params):
        in_specs.append(spec)
        spec = jax.eval_shape(fn, tree(lambda a: a[0], p), spec)
    out_specs = in_specs[1:] + [spec]

    def ring(n: int, spec: Any) -> Any:  # n live slots and the sink, of C values each
        return None if n == 0 else jnp.zeros((n + 1, C, *spec.shape), dt)

    def put(buf: Any, slot: Any, value: Any) -> Any:
        if buf is None:
            return None
        return tree(lambda b, v: lax.dynamic_update_index_in_dim(b, v.astype(b.dtype), slot, 0), buf, value)

    def get(buf: Any, slot: Any) -> Any:
        return tree(lambda b: lax.dynamic_index_in_dim(b, slot, 0, keepdims=False), buf)

    def pick(buf: Any, slot: Any) -> Any:
        """``get`` for small rings as an elementwise select (XLA's CPU dynamic slice is slower)."""
        return tree(lambda b: lax.select_n(slot, *(b[i] for i in range(b.shape[0])))
                    if b.shape[0] <= 4 else lax.dynamic_index_in_dim(b, slot, 0, keepdims=False), buf)

    def opt_init(p: Any, h: dict) -> Any:
        return make_optax(opt_name, h).init(p)

    def opt_step(p: Any, opt_state: Any, grads: Any, h: dict) -> tuple:
        updates, opt_state = make_optax(opt_name, h).update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state

    state = []
    for k, p in enumerate(params):
        n_act, n_stash, n_grad, n_wpend, n_weights = ring_sizes[k]
        weights = tree(lambda a, n=n_weights: jnp.zeros((n, *a.shape), a.dtype).at[0].set(a), p)
        if comp[k][0]:  # version 0: no OPT yet, so the prediction and the average are the weights
            weights = {"w": weights, "aux": weights}
        state.append({"weights": weights, "opt": vmap(opt_init)(p, hyper[k]), "acc": tree(jnp.zeros_like, p),
                      "count": jnp.zeros((), dt), "act": ring(n_act, out_specs[k]),
                      "stash": ring(n_stash, in_specs[k]),
                      "grad": ring(n_grad, in_specs[k]) if k >= 1 else None, "wpend": ring(n_wpend, out_specs[k])})
    no_rec = (jnp.zeros(C, dt), jnp.zeros(C, dt))

    def stage_wave(k: int, st: dict, row: dict, inp: Any, cot: Any, target: Any) -> tuple[dict, tuple]:
        fn, last, op = applies[k], k == S - 1, row["op"]
        mode, cval = comp[k]
        hyp = hyper[k]

        def forward1(p, inp, target):
            out = fn(p, inp)
            if not last:
                return out, (jnp.zeros((), dt), jnp.zeros((), dt))
            value, signal = jax.value_and_grad(loss_fn)(out, target)
            right = (jnp.argmax(out.reshape(-1)) == target).astype(dt) if loss == "cross_entropy" else 0 * value
            return signal, (value, right)

        # the weights this op uses, sliced out of the ring here: a ring passed to several conds, one of
        # which updates it in place, would be copied whole every wave
        entry = pick(st["weights"], row["version"])
        live = entry["w"] if mode else entry
        params = entry["aux"] if mode == "predict" else live  # the forward's weights
        back_params = entry["aux"] if mode else live  # the backward's (ema: the moving average)
        out, rec = lax.cond(op == OP_F, vmap(forward1), lambda *_: (zeros(out_specs[k]), no_rec),
                            params, inp, target)
        st = {**st, "act": put(st["act"], row["write_act"], out), "stash": put(st["stash"], row["write_stash"], inp)}

        # B, BI and BW share one branch (one VJP to compile per stage): BI adds no weight gradient and
        # keeps its cotangent; BW redoes the VJP with it and sends no input gradient (to the sink)
        if st["wpend"] is not None:
            cot = jnp.where(op == OP_BW, get(st["wpend"], row["read_wpend"]), cot)
            st["wpend"] = put(st["wpend"], row["write_wpend"], cot)

        def vjp1(p, inp, cot, target):
            out, pull = jax.vjp(fn, p, inp)
            return pull(jax.grad(loss_fn)(out, target) if last and (not stash_weights or mode == "ema") else cot)

        adds = (op == OP_B) | (op == OP_BW)
        first = st["count"] == 0  # the first gradient since the last OPT replaces the accumulator

        def backward(acc, params, stash):
            g_p, g_x = vmap(vjp1)(params, get(stash, row["read_stash"]), cot, target)
            return tree(lambda a, g: jnp.where(adds, jnp.where(first, g, a + g), a), acc, g_p), g_x

        is_back = adds | (op == OP_BI)
        acc, g_x = lax.cond(is_back, backward, lambda acc, *_: (acc, zeros(in_specs[k])),
                            st["acc"], back_params, st["stash"])
        count = st["count"] + adds.astype(dt)
        st = {**st, "acc": acc, "grad": put(st["grad"], row["write_grad"], g_x)}

        def step(weights, opt_state, acc, entry):  # the mean of the gradients since the last OPT
            live = entry["w"] if mode else entry
            new, opt_state = vmap(opt_step)(live, opt_state, tree(lambda a: a / count, acc), hyp)
            if mode == "predict":  # w + d (w - prev), prev = the live weights before this OPT
                new = {"w": new, "aux": tree(lambda w, q: w + cval * (w - q), new, live)}
            elif mode == "ema":  # ema = beta ema + (1 - beta) w, after the step
                new = {"w": new, "aux": tree(lambda e, w: cval * e + (1.0 - cval) * w, entry["aux"], new)}
            return put(weights, row["new_version"], new), opt_state

        weights, opt_state = lax.cond(op == OP_OPT, step, lambda w, o, *_: (w, o),
                                      st["weights"], st["opt"], acc, entry)
        return {**st, "weights": weights, "opt": opt_state, "count": jnp.where(op == OP_OPT, 0, count)}, rec

    def wave(state: list, row_all: dict) -> tuple:
        state, rec = list(state), no_rec
        for k in range(S):
            row = {n: v[k] for n, v in row_all.items()}
            m = row["sample"]
            target = y[:, m] if y_batched else jnp.broadcast_to(y[m], (C, *y.shape[1:]))
            if k == 0:
                inp = (x[:, m] if x_batched else jnp.broadcast_to(x[m], (C, *x.shape[1:])))[:, None]
            else:
                inp = get(state[k - 1]["act"], row["read_act"])
            cot_ring = state[k]["act"] if k == S - 1 else state[k + 1]["grad"]
            cot = get(cot_ring, row["read_cot"]) if cot_ring is not None else zeros(out_specs[k])
            state[k], rec = stage_wave(k, state[k], row, inp, cot, target)
        return state, rec

    state, (loss_w, correct_w) = lax.scan(wave, state, tables)
    finals = [get(st["weights"], final_version[k]) for k, st in enumerate(state)]
    return [f["w"] if comp[k][0] else f for k, f in enumerate(finals)], loss_w, correct_w


__all__ = ["EmulationResult", "Program", "compile_schedule", "emulate_jax", "emulate_jax_sweep", "make_optax"]
