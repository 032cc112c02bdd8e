"""Staleness compensation: what each method changes, derived from the schedule, for every emulator.

A pipelined stage learns from stale information; a compensation method changes *which weights*
a forward or backward uses, *which activation* a backward differentiates, or *how big* a step is.
Everything here is numpy only (no torch, no JAX): ``compensation_plan`` turns (schedule, method)
into plain arrays, and each emulator applies the same plan by the rules below. The torch
reference (``emulator_torch``) is the oracle; the JAX emulator must mirror these rules exactly.

**The per-stage delay** ``d_k`` (an int >= 0, from ``staleness.staleness_summary``, never per
schedule name) is ``max(weight_delay, gradient_age)`` of stage k in steady state: how many of the
stage's own updates separate the information a gradient is built from and the weights it is
applied to, whichever of the two kinds of staleness the schedule has. ``1f1b``/``layerpipe``:
S-1-k (weight delay); ``partime``/``partime-async``: S-1-k (gradient age); ``sequential``,
``gpipe``, ``zb-h1`` and any S=1 schedule: 0. A stage with no weight-gradient task (too short a
stream) gets 0. Inference schedules: all 0 (no updates, nothing is stale). **Every method leaves
a stage with d_k = 0 exactly as it is** (same arithmetic, bit for bit), so S=1 and the flushed
schedules are untouched by all of them.

The methods (``COMPENSATIONS``), with the emulator default ``stash_weights=True``:

* ``none``: the schedule's natural behaviour (DESIGN.md "Exact learning semantics"): every
  backward differentiates its own sample's forward at the weights that forward used (PipeDream's
  weight stashing, which 1f1b/layerpipe have by definition; in partime F and B of a stage share a
  tick, so the stashed weights *are* the current ones and stashing changes nothing there).
* ``stash``: since every schedule already stashes weights (above), "stashing where the schedule
  has none" would be a no-op everywhere; what partime lacks is *signal-consistent* stashing.
  Rule: a backward B/BI of stage k whose cotangent carries the loss of sample ``sigma`` (the
  ``signal_sample`` of the staleness table; for partime ``sigma = m - 2(S-1-k)``) differentiates
  the forward F(k, sigma), at the stashed input and weights of F(k, sigma), instead of F(k, m).
  The chain of backwards then computes the exact gradient of sample sigma's loss at the weights
  its forward used (PipeDream-style delayed but consistent gradients: weight delay 2(S-1-k) for
  partime, signal mismatch 0), at the cost of keeping 2(S-1-k)+1 activations and weight versions
  per stage. A BW follows its BI. Wherever sigma == m (every schedule but partime/partime-async,
  and stage S-1 always) it is a no-op. Needs ``stash_weights=True``.
* ``pipemare``: learning-rate rescaling by delay, after PipeMare's learning-rate rescheduling
  (Yang et al., "PipeMare: Asynchronous Pipeline Parallel DNN Training", MLSys 2021), which
  scales each stage's step size down with its delay (annealed over a warm-up there). Rule here
  (fixed, not annealed): stage k's optimizer is built with ``lr_k = lr / (1 + d_k)`` (Python
  float division); every other hyper-parameter unchanged. For Adam this scales the step; for
  SGD/momentum the step and so the velocity's contribution.
* ``predict``: linear weight prediction (Kosson et al., "Pipelined Backpropagation at Scale:
  Training Large Models without Batches", MLSys 2021). Per stage keep ``prev`` = the live weights
  just before the stage's most recent OPT (= the live weights while no OPT has run). Every
  forward of stage k at weight version v runs on ``w_hat = w + d_k * (w - prev)`` (elementwise,
  in that order: difference, times the int d_k, plus w; computed once per version), i.e. the last
  *applied* update extrapolated d_k steps ahead (for SGD with momentum that is Kosson's
  ``w - lr * d * v``; for Adam the last Adam step). The backward of that forward uses the same
  predicted weights (they are its stash; with ``stash_weights=False`` a backward, as always, uses
  the current version's, here its prediction); OPT updates the real live weights ``w``.
* ``ema``: moving-average reconstruction of past weights (LayerPipe2, Unnikrishnan & Parhi,
  arXiv 2512.08160: a "pipeline-aware" moving average reconstructs the historical weights a
  delayed backward needs instead of storing them). Only the paper's abstract and summaries were
  available here, so the approximation chosen is: per stage keep ``ema``, initialised to the
  initial weights and after each OPT of the stage updated as ``ema = beta_k * ema + (1 - beta_k) * w``
  (w = the new live weights) with ``beta_k = d_k / (1 + d_k)``: on a steadily moving trajectory
  an EMA with that decay lags exactly d_k updates behind, so it reconstructs the weights d_k
  updates ago from one extra copy (not d_k stored versions). Every backward B/BI/BW of stage k
  takes its VJP at ``ema`` (its value when the backward runs) and the stashed *input* of its
  forward, recomputing the stage's forward on ``ema`` (as ``stash_weights=False`` recomputes it
  on the current weights); the forward and the OPT use the live weights. A BW uses the ``ema`` of
  the version its BI used. On 1f1b it stands in for the exact stash (one copy instead of d_k+1
  versions; an approximation, measured sometimes better, sometimes worse); on partime it makes the
  backward see weights about as old as the gradient signal.

Methods are one at a time; none of them changes the schedule, its tasks or its order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from partime_sim.errors import ConfigError
from partime_sim.schedule import B, BI, BW, F, Schedule

COMPENSATIONS: dict[str, str] = {
    "none": "the schedule's natural behaviour (backward at its own forward's stashed weights)",
    "stash": "signal-consistent stashing: a backward differentiates the forward of the sample its gradient signal "
             "comes from (changes partime; a no-op where signal and activation already match)",
    "pipemare": "PipeMare learning-rate rescaling: stage k steps with lr / (1 + d_k)",
    "predict": "linear weight prediction (Kosson et al.): forward and backward at w + d_k (w - w_prev)",
    "ema": "LayerPipe2-style reconstruction: backward at an EMA of the weights lagging d_k updates",
}


@dataclass(frozen=True, eq=False)
class CompensationPlan:
    """What a method changes, per stage and per task, as plain arrays an emulator applies.

    ``delays[k]`` is d_k (None for ``none``, which derives nothing). Stage k's learning rate is
    ``lr / lr_divisor[k]`` (1.0 leaves it alone). ``predict_steps[k]`` is the d of the forward's
    prediction (0: none). ``ema_decay[k]`` is beta_k, or None where the stage keeps no EMA.
    ``forward_of`` is, for ``stash``, per task of the table the F task each B/BI differentiates
    (-1 elsewhere), else None.
    """

    name: str
    delays: np.ndarray | None  # (S,) int64
    lr_divisor: np.ndarray  # (S,) float64: 1 + d_k for pipemare, else 1
    predict_steps: np.ndarray  # (S,) int64
    ema_decay: tuple[float | None, ...]  # (S,)
    forward_of: np.ndarray | None

    def lr(self, k: int, lr: float) -> float:
        """Stage k's learning rate (exactly ``lr`` where the plan leaves it alone)."""
        div = float(self.lr_divisor[k])
        return lr if div == 1.0 else lr / div


def check_compensation(name: str) -> str:
    """``name`` if it is a known method, else a ConfigError listing them."""
    if name not in COMPENSATIONS:
        raise ConfigError(f"compensation {name!r} is unknown; use one of {', '.join(COMPENSATIONS)}")
    return name


def stage_delays(schedule: Schedule) -> np.ndarray:
    """d_k = max(weight_delay, gradient_age) per stage, from the derived staleness summary (0 for
    a stage with no gradient task, and for inference schedules)."""
    from partime_sim.staleness import staleness_summary

    if schedule.mode != "train":
        return np.zeros(schedule.num_stages, dtype=np.int64)
    rows = staleness_summary(schedule)
    return np.array([max(r["weight_delay"] or 0, r["gradient_age"] or 0) for r in rows], dtype=np.int64)


def signal_forwards(schedule: Schedule) -> np.ndarray:
    """Per task, for each B/BI: the index of F(stage, signal_sample), the forward whose loss its
    cotangent carries (-1 for other tasks). Each F is differentiated at most once, so a forward's
    autograd graph (and stash) is needed by exactly one backward."""
    from partime_sim.staleness import staleness_table

    s = schedule
    n = len(s)
    out = np.full(n, -1, dtype=np.int64)
    if s.mode != "train":
        return out
    table = staleness_table(s)
    back = np.flatnonzero(np.isin(s.kind, (B, BI, BW)))  # the table's rows, in table order
    fwd = np.flatnonzero(s.kind == F)
    fidx = np.full((s.num_stages, s.num_samples), -1, dtype=np.int64)
    fidx[s.stage[fwd], s.sample[fwd]] = fwd
    src = fidx[table["stage"].to_numpy(), table["signal_sample"].to_numpy()]
    is_bbi = np.isin(s.kind[back], (B, BI))
    out[back[is_bbi]] = src[is_bbi]
    used = out[out >= 0]
    if np.unique(used).size != used.size:  # pragma: no cover - no generator does this
        raise ConfigError(f"compensation 'stash' needs each forward differentiated once, but schedule {s.name!r} "
                          "pairs one forward with several gradient signals; use another compensation")
    return out


def compensation_plan(schedule: Schedule, name: str = "none") -> CompensationPlan:
    """The plan of method ``name`` on ``schedule`` (see the module docstring for the rules)."""
    check_compensation(name)
    derived = stage_delays(schedule) if name != "none" else None
    delays = derived if derived is not None else np.zeros(schedule.num_stages, dtype=np.int64)
    active = delays > 0
    return CompensationPlan(
        name=name,
        delays=derived,
        lr_divisor=np.where(active & (name == "pipemare"), 1.0 + delays, 1.0),
        predict_steps=np.where(active & (name == "predict"), delays, 0).astype(np.int64),
        ema_decay=tuple(float(d) / (1.0 + float(d)) if (a and name == "ema") else None
                        for d, a in zip(delays.tolist(), active.tolist())),
        forward_of=signal_forwards(schedule) if name == "stash" else None,
    )
