"""Checkpoint and resume of a real run at a wave of its schedule, bit-identical to a run that
never stopped.

At the cut every task of an earlier wave is done. A worker's checkpoint holds its stages'
state (live weights, optimizer state, gradient accumulator, weight version, compensation
state), every result it still holds for a later task (activations, input gradients, and the
messages other workers sent it before the cut), the losses so far and the stream position.
Autograd graphs cannot be saved: a held activation keeps its input and the weights of each
graph instead, and the graph is recomputed on resume (the same forward on the same numbers
gives the same graph, so the backward after the cut is unchanged).
"""

from __future__ import annotations

import copy
import pickle
from typing import Any

import numpy as np
import torch
from torch import nn

from partime_sim.emulator_torch import _Activation, _Graph, _InputGrad
from partime_sim.schedule import F

FORMAT = "partime-sim-checkpoint-1"


def capture(worker: Any, cut: int) -> dict[str, Any]:
    """Worker state at wave ``cut`` (CPU tensors, picklable)."""
    s = worker.s
    stages = {k: _stage_state(st) for k, st in enumerate(worker.stages) if st is not None}
    store = {i: _pack(v, i if s.kind[i] == F else worker.in_src[i]) for i, v in worker.store.items()}
    done_inputs = int(np.count_nonzero((s.kind == F) & (s.stage == 0) & (s.wave < cut)))
    return {"format": FORMAT, "rank": worker.rank, "cut": cut, "stages": stages, "store": store,
            "remaining": list(worker.remaining), "losses": worker.losses.copy(),
            "correct": None if worker.correct is None else worker.correct.copy(),
            "version": worker.version.copy(), "peak": worker.peak, "outputs": worker.outputs,
            "stream_position": done_inputs}


def restore(worker: Any, state: dict[str, Any]) -> None:
    """Put a captured state back into a fresh worker of the same job and rank."""
    for k, saved in state["stages"].items():
        st = worker.stages[k]
        st.module.load_state_dict(saved["module"])
        if st.opt is not None:
            st.opt.load_state_dict(saved["opt"])
        st.acc = None if saved["acc"] is None else [t.to(st.device) for t in saved["acc"]]
        st.count, st.version = saved["count"], saved["version"]
        st.prev = None if saved["prev"] is None else tuple(t.to(st.device) for t in saved["prev"])
        if saved["ema"] is not None:
            st.ema = tuple(t.to(st.device) for t in saved["ema"])
        st._snapshot, st._ema_leaves = None, None
    worker.remaining = list(state["remaining"])
    worker.losses, worker.version, worker.peak = state["losses"].copy(), state["version"].copy(), state["peak"]
    if state["correct"] is not None:
        worker.correct = state["correct"].copy()
    if worker.outputs is not None and state["outputs"]:
        worker.outputs.update(state["outputs"])
    with torch.enable_grad():
        worker.store = {i: _unpack(worker, v) for i, v in state["store"].items()}


def _stage_state(st: Any) -> dict[str, Any]:
    cpu = lambda ts: None if ts is None else [t.detach().cpu().clone() for t in ts]  # noqa: E731
    return {"module": {n: t.detach().cpu().clone() for n, t in st.module.state_dict().items()},
            "opt": _on_cpu(st.opt.state_dict()) if st.opt is not None else None,
            "acc": cpu(st.acc), "count": st.count, "version": st.version, "prev": cpu(st.prev),
            "ema": cpu(st.ema)}


def _on_cpu(obj: Any) -> Any:
    """A deep copy of an optimizer state dict with every tensor on the CPU (a checkpoint must
    load where that GPU is absent; ``load_state_dict`` moves the state to the weights' device)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_on_cpu(v) for v in obj)
    return copy.deepcopy(obj)


def _tensor(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().cpu().clone()


def _pack(value: Any, forward: int) -> dict[str, Any]:
    """A held result without its autograd graphs (their weights instead); ``forward`` is the
    task id of the forward an activation comes from."""
    if isinstance(value, _Activation):
        return {"type": "act", "forward": forward, "inp": _tensor(value.inp),
                "inp_grad": value.inp is not None and value.inp.requires_grad, "out": _tensor(value.out),
                "version": value.version,
                "graphs": {v: [_tensor(p) for p in g.params] for v, g in value.graphs.items()}}
    return {"type": "grad", "grad_in": _tensor(value.grad_in), "cotangent": _tensor(value.cotangent),
            "act": None if value.act is None else _pack(value.act, forward),
            "graph": None if value.graph is None else [_tensor(p) for p in value.graph.params]}


def _unpack(worker: Any, saved: dict[str, Any]) -> Any:
    dev = worker.device
    to = lambda t: None if t is None else t.to(dev)  # noqa: E731
    if saved["type"] == "grad":
        act = None if saved["act"] is None else _unpack(worker, saved["act"])
        graph = None
        if saved["graph"] is not None:
            graph = _regraph(worker, saved["act"]["forward"], act.inp, saved["graph"])
        return _InputGrad(to(saved["grad_in"]), act, to(saved["cotangent"]), graph)
    inp = to(saved["inp"])
    if inp is not None and saved["inp_grad"]:
        inp.requires_grad_(True)
    graphs = {v: _regraph(worker, saved["forward"], inp, params) for v, params in saved["graphs"].items()}
    return _Activation(inp, to(saved["out"]), saved["version"], graphs)


def _regraph(worker: Any, forward: int, inp: torch.Tensor, params: list[torch.Tensor]) -> _Graph:
    """The forward of task ``forward`` redone on ``inp`` at ``params`` (the last stage: to its loss)."""
    s = worker.s
    k, m = int(s.stage[forward]), int(s.sample[forward])
    st = worker.stages[k]
    leaves = tuple(nn.Parameter(p.to(st.device)) for p in params)
    out = st.forward(inp, True, leaves)
    root = worker._loss(out, m, forward, record=False) if k == worker.num_stages - 1 else out
    return _Graph(root, leaves)


def save(states: list[dict[str, Any]], path: str) -> None:
    torch.save(states, path)


def load(path: str) -> list[dict[str, Any]]:
    from partime_sim.errors import ConfigError

    try:
        states = torch.load(path, weights_only=False, map_location="cpu")
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise ConfigError(f"checkpoint {path!r} cannot be read ({exc}); give a file written by a run "
                          "with checkpoint_at=") from None
    if not isinstance(states, list) or not states or states[0].get("format") != FORMAT:
        raise ConfigError(f"{path!r} is not a partime-sim checkpoint; give a file written by a run with checkpoint_at=")
    return states
