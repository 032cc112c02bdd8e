"""Torch reference emulator: the learning dynamics of any schedule, on one device, in plain loops.

This is the oracle the JAX emulator and the real torch backend are checked against, so it is
written for obviousness, not speed. It is ONE generic interpreter of the schedule IR: it walks
the task table in table order (a topological order that is also each lane's issue order) and
does what each task says; nothing depends on the schedule's name, so every schedule's
staleness comes out of its dependencies, exactly as the timing engines see them.

Per stage k it keeps the live parameters, a torch optimizer (``optimizers.make_torch_optimizer``:
torch's own arithmetic is the reference), a gradient accumulator and a weight *version* that
every OPT bumps. The tasks:

* ``F(k, m)``: input = sample m (stage 0, a batch of one) or the output of the ``F`` it depends
  on. The output is computed under the stage's current weights, taken as a snapshot (a clone,
  shared by every forward of the same version) so later in-place updates cannot touch it: the
  snapshot is the *stash* the backward of (k, m) uses. The last stage's ``F`` gives the online
  prediction and the per-sample loss (recorded at forward time: the online loss).
* ``B(k, m)`` / ``BI(k, m)`` + ``BW(k, m)``: the cotangent is d loss/d output on the last
  stage, else the input gradient of the stage-(k+1) backward this task *depends on in the IR*
  (for ``partime`` that belongs to another sample: PARTIME's staleness). The VJP is taken at
  (stashed weights, stashed input) of ``F(k, m)`` (weight stashing), or at the stage's current
  weights with ``stash_weights=False`` (PipeDream without stashing: the forward is recomputed).
  ``BI`` computes only the input gradient and keeps the graph and cotangent for its ``BW``,
  which computes only the weight gradient; the values equal a fused ``B``'s. Weight gradients
  are added to the accumulator.
* ``OPT(k)``: gradient = accumulator / (backwards accumulated since the previous OPT), so a
  flushed schedule with M microbatches is minibatch training on the mean loss; then
  ``optimizer.step()``, the accumulator is cleared and the version bumped.
* ``BARRIER``, ``SEND``, ``RECV``, ``H2D``, ``D2H`` move no numbers here: no-ops.

``stash_weights=True`` (the default) is every schedule's natural behaviour (DESIGN.md: PipeDream
1f1b/layerpipe stash by definition; in partime a stage's F and B share a tick and version, so
stashing changes nothing there); ``False`` is PipeDream without stashing, for comparison.
``compensation`` switches on one staleness compensation method (``none``, ``stash``,
``pipemare``, ``predict``, ``ema``); its exact rules, and the per-stage delay d_k they derive
from the schedule, are in ``partime_sim.compensation``. ``none`` runs exactly the code path above.

What a task produces is kept only until every task that depends on it has run (reference
counts from the dependency edges), so memory stays bounded on long streams; an input gradient
no task depends on (``partime``'s drain) is never computed.

Losses are per-sample means: cross-entropy of the (1, C) output against an integer label, or
the mean squared error over the output's elements against a float target of the same size.
Stages run in eval mode (Dropout off), as the JAX conversion does. torch is imported here
only; the rest of the core imports without it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as TF

from partime_sim.compensation import CompensationPlan, compensation_plan
from partime_sim.errors import ConfigError, ScheduleError
from partime_sim.optimizers import OptimizerSpec, make_torch_optimizer
from partime_sim.schedule import B, BI, BW, F, OPT, Schedule

LOSSES = ("cross_entropy", "mse")
_DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass
class EmulationResult:
    """What a run learned: online per-sample loss and accuracy, final weights, versions used.

    ``task_version[i]`` is the weight version (number of OPTs of the stage before) that task i
    computed with: for F the version it read, for a backward the version of its VJP's weights
    (the stashed one, or the current one without stashing); -1 for tasks that hold no weights.
    ``compensation`` is the method used and ``delays`` the per-stage delay d_k it derived from the
    schedule (``compensation.stage_delays``); None for ``none``, which derives nothing.
    """

    schedule: str
    loss: np.ndarray  # (N,) online loss of every sample, at its last-stage forward
    correct: np.ndarray | None  # (N,) bool, classification only
    final_state: list[dict[str, torch.Tensor]]
    task_version: np.ndarray
    updates: np.ndarray  # (S,) OPTs applied per stage
    peak_stored: int  # most task results held at once (bounded for long streams)
    compensation: str = "none"
    delays: np.ndarray | None = None  # (S,) d_k used by the compensation method

    @property
    def online_accuracy(self) -> float | None:
        """Fraction of samples predicted right before their own update (None for regression)."""
        return None if self.correct is None else float(self.correct.mean())

    def loss_curve(self, points: int = 100) -> tuple[np.ndarray, np.ndarray]:
        """(sample index at each bin's centre, mean loss of the bin): the curve, downsampled to
        at most ``points`` equal bins so plots and JSON stay small on long streams."""
        if points < 1:
            raise ConfigError(f"points={points!r} is invalid; give an integer >= 1")
        n = self.loss.size
        edges = np.linspace(0, n, min(points, n) + 1).round().astype(np.int64)
        means = np.add.reduceat(self.loss, edges[:-1]) / np.diff(edges)
        return (edges[:-1] + edges[1:] - 1) / 2.0, means


def emulate_torch(
    schedule: Schedule,
    stages: list[nn.Module],
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    *,
    loss: str | None = None,
    optimizer: OptimizerSpec | None = None,
    dtype: torch.dtype | str = torch.float64,
    stash_weights: bool = True,
    compensation: str = "none",
) -> EmulationResult:
    """Run ``schedule`` on ``stages`` over the stream ``(x, y)`` and return what it learned.

    ``stages`` are deep-copied and cast to ``dtype`` (the caller's modules are left alone).
    ``loss`` defaults to cross-entropy for integer ``y`` and MSE for float ``y``; ``optimizer``
    defaults to ``OptimizerSpec()`` (SGD). Inference schedules only run forwards.
    ``compensation`` names a staleness compensation method (``compensation.COMPENSATIONS``).
    """
    dtype = _dtype(dtype)
    spec = optimizer if optimizer is not None else OptimizerSpec()
    if not isinstance(spec, OptimizerSpec):
        raise ConfigError(f"optimizer={spec!r} must be an OptimizerSpec, e.g. OptimizerSpec('adam', lr=1e-3)")
    _check_schedule(schedule, stages)
    N = schedule.num_samples
    for what, arr in (("x", x), ("y", y)):
        if len(arr) < N:
            raise ConfigError(f"{what} has {len(arr)} samples but schedule {schedule.name!r} needs {N}; "
                              f"give a longer stream or generate the schedule for {len(arr)} samples")
    y_np = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    loss = _loss_name(loss, y_np)
    plan = compensation_plan(schedule, compensation)
    if plan.name == "stash" and not stash_weights:
        raise ConfigError("compensation='stash' differentiates each gradient signal's own forward at its stashed "
                          "weights, which contradicts stash_weights=False; drop one of the two")
    run = _Run(schedule, stages, x, y_np[:N], loss, spec, dtype, stash_weights, plan)
    with torch.inference_mode(False), torch.enable_grad():
        run.execute()
    return run.result()


# ---- validation ----------------------------------------------------------------------------
def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    if dtype in (torch.float64, torch.float32):
        return dtype
    raise ConfigError(f"dtype={dtype!r} is unsupported; use torch.float64 (exact checks) or torch.float32")


def _check_schedule(schedule: Schedule, stages: list[nn.Module]) -> None:
    if not isinstance(schedule, Schedule):
        raise ConfigError(f"schedule={schedule!r} is not a Schedule; build one with generators.generate(...)")
    schedule.validate()  # the walk relies on table order being topological (waves)
    mb = schedule.params.get("microbatch_size", 1)
    if mb != 1:
        raise ConfigError(f"schedule {schedule.name!r} has microbatch_size={mb}; the emulator supports "
                          "microbatches of one sample only: generate the schedule with microbatch_size 1")
    if len(stages) != schedule.num_stages:
        raise ConfigError(f"{len(stages)} stage modules given but schedule {schedule.name!r} has "
                          f"{schedule.num_stages} stages; split the model into {schedule.num_stages} stages")
    for k, st in enumerate(stages):
        if not isinstance(st, nn.Module):
            raise ConfigError(f"stage {k} is a {type(st).__name__}, not a torch nn.Module")


def _loss_name(loss: str | None, y: np.ndarray) -> str:
    if loss is None:
        return "cross_entropy" if np.issubdtype(y.dtype, np.integer) else "mse"
    if loss not in LOSSES:
        raise ConfigError(f"loss={loss!r} is unknown; use one of {LOSSES}")
    if loss == "cross_entropy" and not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(f"loss='cross_entropy' needs integer class labels, but y has dtype {y.dtype}; "
                          "cast the labels to int or use loss='mse'")
    return loss


# ---- the interpreter -----------------------------------------------------------------------
@dataclass
class _Graph:
    """One forward of a stage, recorded for autograd: the root to differentiate (the output, or
    the loss on the last stage) and the weight tensors it was computed with."""

    root: torch.Tensor
    params: tuple[torch.Tensor, ...]


@dataclass
class _Activation:
    """What ``F(k, m)`` leaves behind: its input and output, the version it read, and the
    autograd graph per weight version (the stashed one; a recomputed one without stashing)."""

    inp: torch.Tensor
    out: torch.Tensor
    version: int
    graphs: dict[int, _Graph]


@dataclass
class _InputGrad:
    """What ``B``/``BI(k, m)`` leaves behind: the input gradient for stage k-1 and, for ``BI``,
    the activation and cotangent its ``BW`` needs."""

    grad_in: torch.Tensor | None
    act: _Activation | None = None
    cotangent: torch.Tensor | None = None
    graph: _Graph | None = None  # the graph a BI took on reconstructed weights (ema), for its BW


class _Stage:
    """Stage k's live weights, optimizer, accumulator and version.

    Two copies of the module: ``module`` holds the live parameters the optimizer updates in
    place; ``shadow`` holds the current version's *snapshot* (fresh leaf Parameters, cloned once
    per version), and every forward runs on it. A graph built on a snapshot keeps those tensors
    alive after the next OPT replaces them in ``shadow``: that is the weight stash, for free.

    Compensation state (``partime_sim.compensation``): with ``predict`` > 0 the snapshot is the
    prediction ``w + d (w - prev)`` and ``prev`` the live weights before the latest OPT; with an
    ``ema_decay`` the stage keeps the moving average its backwards differentiate at.
    """

    def __init__(self, k: int, module: nn.Module, spec: OptimizerSpec, dtype: torch.dtype,
                 predict: int = 0, ema_decay: float | None = None, device: torch.device | None = None) -> None:
        self.k = k
        self.device = device or torch.device("cpu")
        self.module = copy.deepcopy(module).to(dtype=dtype, device=self.device).eval()
        self.shadow = copy.deepcopy(self.module)
        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        self.params = tuple(p for _, p in named)
        self.names = tuple(n for n, _ in named)
        self.slots = [_owner(self.shadow, n) for n, _ in named]
        self.opt = make_torch_optimizer(spec, self.params) if self.params else None
        self.acc: list[torch.Tensor] | None = None
        self.count = 0
        self.version = 0
        self._snapshot: tuple[torch.Tensor, ...] | None = None
        self.predict = predict
        self.prev: tuple[torch.Tensor, ...] | None = None
        self.ema_decay = ema_decay
        self.ema = tuple(p.detach().clone() for p in self.params) if ema_decay is not None else None
        self._ema_leaves: tuple[torch.Tensor, ...] | None = None

    def snapshot(self) -> tuple[torch.Tensor, ...]:
        """The current version's weights as leaf copies, installed in ``shadow`` (one per version);
        with ``predict`` the predicted weights instead (the forward's and so its backward's)."""
        if self._snapshot is None:
            if self.predict and self.prev is not None:
                d = self.predict
                snap = tuple(nn.Parameter(p.detach() + d * (p.detach() - q)) for p, q in zip(self.params, self.prev))
            else:
                snap = tuple(nn.Parameter(p.detach().clone()) for p in self.params)
            for (owner, name), t in zip(self.slots, snap):
                setattr(owner, name, t)
            self._snapshot = snap
        return self._snapshot

    def ema_leaves(self) -> tuple[torch.Tensor, ...]:
        """The moving average as leaf tensors to differentiate at (one set per version)."""
        if self._ema_leaves is None:
            self._ema_leaves = tuple(nn.Parameter(e.clone()) for e in self.ema)
        return self._ema_leaves

    def forward(self, inp: torch.Tensor, train: bool, weights: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """Training: the current snapshot (``shadow``); inference: the live weights, no copies;
        ``weights``: those instead (the module called functionally)."""
        if weights is not None:
            return torch.func.functional_call(self.module, dict(zip(self.names, weights)), (inp,))
        if train:
            self.snapshot()
            return self.shadow(inp)
        return self.module(inp)

    def accumulate(self, grads: tuple[torch.Tensor, ...]) -> None:
        # the first gradient is copied as is (as torch's own .grad accumulation takes it, so no
        # 0 + g rounding or sign-of-zero change), the rest added in place in arrival order
        if self.acc is None:
            self.acc = [g.clone() for g in grads]
        else:
            for a, g in zip(self.acc, grads):
                a.add_(g)
        self.count += 1

    def step(self, label: str) -> None:
        if self.count == 0:
            raise ScheduleError(f"task {label} updates stage {self.k} but no backward of that stage ran since "
                                "its previous OPT; an OPT must follow the backwards it applies")
        if self.opt is not None:
            for p, a in zip(self.params, self.acc):
                p.grad = a / self.count
            if self.predict:
                self.prev = tuple(p.detach().clone() for p in self.params)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            if self.ema is not None:
                b = self.ema_decay
                self.ema = tuple(b * e + (1.0 - b) * p.detach() for e, p in zip(self.ema, self.params))
        self.acc, self.count = None, 0
        self.version += 1
        self._snapshot = None
        self._ema_leaves = None


class _Run:
    """One walk of the task table; ``execute`` runs it, ``result`` packs what it learned.

    ``tasks`` (default: all) restricts the walk to one worker's tasks, in table order, and
    ``devices`` places each owned stage: that is how the torch backend runs a device's share of
    the schedule with this very code (so it equals the reference bit for bit). Results of tasks
    outside ``tasks`` are put into ``store`` by the caller (``_Activation``/``_InputGrad`` holding
    only the received tensor) before a task that reads them runs; ``_publish`` is called with
    every result some task depends on.
    """

    def __init__(self, schedule: Schedule, stages: list[nn.Module | None], x: Any, y: np.ndarray, loss: str,
                 spec: OptimizerSpec, dtype: torch.dtype, stash_weights: bool, plan: CompensationPlan,
                 tasks: np.ndarray | None = None, devices: list[torch.device] | None = None) -> None:
        self.s = schedule
        self.train = schedule.mode == "train"
        self.plan = plan
        self.num_stages = len(stages)
        dev = devices or [torch.device("cpu")] * len(stages)
        self.stages = [None if m is None else
                       _Stage(k, m, replace(spec, lr=plan.lr(k, spec.lr)), dtype, int(plan.predict_steps[k]),
                              plan.ema_decay[k], dev[k]) for k, m in enumerate(stages)]
        self.x, self.y, self.loss_name, self.spec, self.dtype = x, y, loss, spec, dtype
        self.stash = stash_weights
        N = schedule.num_samples
        self.losses = np.full(N, np.nan)
        self.correct = np.zeros(N, dtype=bool) if loss == "cross_entropy" else None
        self.version = np.full(len(schedule), -1, dtype=np.int64)
        self.store: dict[int, Any] = {}
        self.peak = 0
        self._labels_checked = False
        self.order = np.arange(len(schedule)) if tasks is None else np.asarray(tasks, dtype=np.int64)
        self.in_src, self.co_src, self.needed = _wiring(schedule, plan.forward_of)
        self.remaining = _local_readers(self.in_src, self.co_src, self.order, len(schedule))

    # -- main loop ---------------------------------------------------------------------------
    def execute(self) -> None:
        for i in self.order.tolist():
            self.run_task(i)

    def run_task(self, i: int) -> None:
        """Do task i (its inputs are in ``store``) and drop what no later task reads."""
        s = self.s
        kind, k, m = int(s.kind[i]), int(s.stage[i]), int(s.sample[i])
        if kind == F:
            self._forward(i, k, m)
        elif kind in (B, BI, BW):
            self._backward(i, kind, k, m)
        elif kind == OPT:
            self.stages[k].step(s.task_label(i))
        if kind in (F, B, BI, BW):
            self._release(self.in_src[i])
            self._release(self.co_src[i])

    def _keep(self, i: int, value: Any) -> None:
        """Store task i's result if some later task of this walk reads it; publish it if any does."""
        if self.remaining[i] > 0:
            self.store[i] = value
            self.peak = max(self.peak, len(self.store))
        if self.needed[i] > 0:
            self._publish(i, value)

    def _publish(self, i: int, value: Any) -> None:
        """Hook for the backend: task i's result, which some task reads (a no-op here)."""

    def _release(self, src: int) -> None:
        if src >= 0:
            self.remaining[src] -= 1
            if self.remaining[src] == 0:
                del self.store[src]

    # -- tasks -------------------------------------------------------------------------------
    def _forward(self, i: int, k: int, m: int) -> None:
        st = self.stages[k]
        last = k == self.num_stages - 1
        if k == 0:
            inp = self._sample_input(m)
        else:
            inp = self.store[self.in_src[i]].out.detach()
            if self.train:
                inp.requires_grad_(True)
        with torch.set_grad_enabled(self.train):
            out = self._call(st, inp, m)
            root = self._loss(out, m, i) if last else out
        self.version[i] = st.version
        graphs = {st.version: _Graph(root, st.snapshot())} if self.train else {}
        self._keep(i, _Activation(inp, out, st.version, graphs))

    def _backward(self, i: int, kind: int, k: int, m: int) -> None:
        st = self.stages[k]
        last = k == self.num_stages - 1
        held: _InputGrad | None = None
        if kind == BW:
            held = self.store[self.co_src[i]]
            act, cot = held.act, held.cotangent
        else:
            act = self.store[self.in_src[i]]
            cot = None if last else self.store[self.co_src[i]].grad_in
        if st.ema is not None:  # compensation "ema": the VJP at the moving average (BW: its BI's)
            version = st.version if held is None else self.version[self.co_src[i]]
            graph = held.graph if held is not None else self._recompute(st, act.inp, m, i, st.ema_leaves())
        else:
            version = act.version if self.stash else st.version
            graph = act.graphs.get(version)
            if graph is None:  # no stashing and the weights moved since the forward: recompute
                graph = self._recompute(st, act.inp, m, i, None)
                act.graphs[version] = graph
        self.version[i] = version
        want_in = kind != BW and k > 0 and self.needed[i] > (1 if kind == BI else 0)
        want_w = kind != BI
        targets = ([act.inp] if want_in else []) + (list(graph.params) if want_w else [])
        grads = torch.autograd.grad(graph.root, targets, grad_outputs=cot, retain_graph=kind == BI,
                                    allow_unused=True, materialize_grads=True) if targets else ()
        if want_w:
            st.accumulate(tuple(grads[int(want_in):]))
        if kind == BI:
            self._keep(i, _InputGrad(grads[0] if want_in else None, act, cot, graph if st.ema is not None else None))
        elif want_in:
            self._keep(i, _InputGrad(grads[0]))

    # -- helpers -----------------------------------------------------------------------------
    def _sample_input(self, m: int) -> torch.Tensor:
        xm = self.x[m:m + 1]
        t = xm if isinstance(xm, torch.Tensor) else torch.as_tensor(np.asarray(xm))
        return t.detach().to(self.dtype).to(self.stages[0].device)

    def _recompute(self, st: _Stage, inp: torch.Tensor, m: int, i: int,
                   weights: tuple[torch.Tensor, ...] | None) -> _Graph:
        """The stage's forward redone on ``inp`` for a backward: at ``weights`` (ema), else at the
        current snapshot (no stashing); the last stage's loss is recomputed, not recorded."""
        root = self._call(st, inp, m, weights)
        last = st.k == self.num_stages - 1
        return _Graph(self._loss(root, m, i, record=False) if last else root,
                      weights if weights is not None else st.snapshot())

    def _call(self, st: _Stage, inp: torch.Tensor, m: int,
              weights: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        try:
            return st.forward(inp, self.train, weights)
        except RuntimeError as err:
            src = "the stream" if st.k == 0 else f"stage {st.k - 1}'s output"
            raise ConfigError(f"stage {st.k} cannot take an input of shape {tuple(inp.shape)} ({src}, sample {m}): "
                              f"{str(err).splitlines()[0]}; check the split of the model into stages") from err

    def _loss(self, out: torch.Tensor, m: int, i: int, record: bool = True) -> torch.Tensor:
        """Per-sample loss of the last stage's output; records it (and the prediction) when asked."""
        if self.loss_name == "cross_entropy":
            if out.dim() != 2 or out.shape[0] != 1:
                raise ConfigError(f"cross-entropy needs a (1, classes) output from the last stage, got shape "
                                  f"{tuple(out.shape)}; end the model with a Linear layer (add Flatten before it)")
            self._check_labels(out.shape[1])
            value = TF.cross_entropy(out, torch.as_tensor(self.y[m:m + 1], dtype=torch.long, device=out.device))
        else:
            target = torch.as_tensor(np.asarray(self.y[m], dtype=np.float64)).to(self.dtype).to(out.device)
            if target.numel() != out.numel():
                raise ConfigError(f"mse target of sample {m} has {target.numel()} values but the last stage outputs "
                                  f"shape {tuple(out.shape)}; give one target value per output")
            value = TF.mse_loss(out, target.reshape(out.shape))
        if record:
            v = float(value.detach())
            if not math.isfinite(v):
                what = (f"after {[st.version for st in self.stages if st is not None]} updates per stage; the run diverged: lower "
                        f"the learning rate (lr={self.spec.lr})") if self.train else \
                       "the model or the input holds non-finite values"
                raise ConfigError(f"loss of sample {m} is {v} at task {self.s.task_label(i)} {what}")
            self.losses[m] = v
            if self.correct is not None:
                self.correct[m] = int(out.argmax(dim=1)) == int(self.y[m])
        return value

    def _check_labels(self, classes: int) -> None:
        if not self._labels_checked:
            lo, hi = int(self.y.min()), int(self.y.max())
            if lo < 0 or hi >= classes:
                raise ConfigError(f"class labels span {lo}..{hi} but the last stage has {classes} outputs; "
                                  f"labels must lie in 0..{classes - 1}")
            self._labels_checked = True

    def result(self) -> EmulationResult:
        missing = np.flatnonzero(np.isnan(self.losses))
        if missing.size:
            raise ScheduleError(f"{self.s.name}: sample {int(missing[0])} never reached the last stage; "
                                "every sample needs a forward on every stage")
        return EmulationResult(
            schedule=self.s.name, loss=self.losses, correct=self.correct,
            final_state=[{n: t.detach().clone() for n, t in st.module.state_dict().items()} for st in self.stages],
            task_version=self.version, updates=np.array([st.version for st in self.stages]),
            peak_stored=self.peak, compensation=self.plan.name, delays=self.plan.delays,
        )


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The submodule that owns parameter ``name`` ("0.weight" -> (module[0], "weight"))."""
    path, _, attr = name.rpartition(".")
    return (module.get_submodule(path) if path else module), attr


def _wiring(s: Schedule, forward_of: np.ndarray | None = None) -> tuple[list[int], list[int], list[int]]:
    """Per task, the task whose result it reads, from the dependency edges (-1 when none):

    * ``in_src``: for F(k) the F(k-1) it extends; for B/BI(k, m) the F(k, m) it differentiates;
    * ``co_src``: for B/BI(k) the stage-(k+1) backward whose input gradient is its cotangent;
      for BW(k, m) the BI(k, m) whose cotangent and graph it reuses;
    * ``remaining``: how many tasks read each task's result (it is dropped after the last one).

    ``forward_of`` (compensation ``stash``) overrides, where >= 0, the F a B/BI differentiates.
    """
    n = len(s)
    src, dst = s.dep_src.astype(np.int64), s.dep_dst.astype(np.int64)
    ks, kd = s.kind[src], s.kind[dst]
    ss, sd = s.stage[src], s.stage[dst]
    src_b = (ks == B) | (ks == BI)
    dst_b = (kd == B) | (kd == BI)
    feeds_in = (ks == F) & (((kd == F) & (ss == sd - 1)) | (dst_b & (ss == sd)))
    feeds_co = (src_b & dst_b & (ss == sd + 1)) | ((ks == BI) & (kd == BW) & (ss == sd))
    in_src = np.full(n, -1, dtype=np.int64)
    co_src = np.full(n, -1, dtype=np.int64)
    for arr, sel, what in ((in_src, feeds_in, "input"), (co_src, feeds_co, "gradient")):
        counts = np.bincount(dst[sel], minlength=n)
        if np.any(counts > 1):
            j = int(np.flatnonzero(counts > 1)[0])
            raise ScheduleError(f"{s.name}: task {s.task_label(j)} depends on {counts[j]} {what} sources; "
                                "a task reads one activation and one gradient")
        arr[dst[sel]] = src[sel]
    _check_wiring(s, in_src, co_src)
    if forward_of is not None:
        in_src = np.where(forward_of >= 0, forward_of, in_src)
    return in_src.tolist(), co_src.tolist(), _readers(in_src, co_src, n).tolist()


def _readers(in_src: np.ndarray, co_src: np.ndarray, n: int) -> np.ndarray:
    """How many tasks read each task's result."""
    return np.bincount(in_src[in_src >= 0], minlength=n) + np.bincount(co_src[co_src >= 0], minlength=n)


def _local_readers(in_src: list[int], co_src: list[int], order: np.ndarray, n: int) -> list[int]:
    """How many of the tasks in ``order`` read each task's result (what ``store`` must hold)."""
    return _readers(np.asarray(in_src, dtype=np.int64)[order], np.asarray(co_src, dtype=np.int64)[order], n).tolist()


def _check_wiring(s: Schedule, in_src: np.ndarray, co_src: np.ndarray) -> None:
    """Every task must find what it reads; a backward must belong to its forward's sample."""
    last = s.num_stages - 1
    is_b = (s.kind == B) | (s.kind == BI)
    need_in = ((s.kind == F) & (s.stage > 0)) | is_b
    need_co = (is_b & (s.stage < last)) | (s.kind == BW)
    for need, arr, what in ((need_in, in_src, "the forward it reads"), (need_co, co_src, "its incoming gradient")):
        bad = need & (arr < 0)
        if np.any(bad):
            i = int(np.flatnonzero(bad)[0])
            raise ScheduleError(f"{s.name}: task {s.task_label(i)} has no dependency on {what}; add that edge")
    has = need_in & is_b
    wrong = np.flatnonzero(has)[s.sample[in_src[has]] != s.sample[has]]
    if wrong.size:
        i = int(wrong[0])
        raise ScheduleError(f"{s.name}: backward {s.task_label(i)} depends on forward {s.task_label(in_src[i])} "
                            "of another sample; a backward differentiates its own sample's forward")
