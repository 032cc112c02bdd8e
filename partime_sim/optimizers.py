"""Optimizer settings shared by every learning interpreter (torch reference, JAX emulator, backend).

One frozen ``OptimizerSpec`` names the update rule and its hyper-parameters; each interpreter
turns it into its own optimizer. The torch reference is the arithmetic everybody else must
match, so ``make_torch_optimizer`` pins the implementation choices torch would otherwise make
per device: the single-tensor (``foreach=False``) path, no fused kernel, no Nesterov, no
dampening, L2-style ``weight_decay`` added to the gradient (torch's ``SGD``/``Adam``, not
``AdamW``). torch itself is imported only inside ``make_torch_optimizer`` (the core imports
without torch).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from partime_sim.errors import ConfigError

if TYPE_CHECKING:
    import torch

OPTIMIZERS: dict[str, str] = {
    "sgd": "plain SGD: p -= lr * g",
    "momentum": "SGD with heavy-ball momentum (torch.optim.SGD, dampening 0, no Nesterov)",
    "adam": "Adam (torch.optim.Adam, bias-corrected, L2 weight decay)",
}


@dataclass(frozen=True)
class OptimizerSpec:
    """An update rule and its hyper-parameters; ``momentum`` is used by "momentum" only,
    ``betas``/``eps`` by "adam" only, ``weight_decay`` by all three."""

    name: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ConfigError(f"optimizer {self.name!r} is unknown; use one of {', '.join(OPTIMIZERS)}")
        _check("lr", self.lr, lo=0.0, open_lo=True)
        _check("momentum", self.momentum, lo=0.0, hi=1.0)
        _check("eps", self.eps, lo=0.0, open_lo=True)
        _check("weight_decay", self.weight_decay, lo=0.0)
        betas = tuple(self.betas)
        if len(betas) != 2:
            raise ConfigError(f"betas={self.betas!r} must be two numbers (beta1, beta2), e.g. (0.9, 0.999)")
        for i, b in enumerate(betas):
            _check(f"betas[{i}]", b, lo=0.0, hi=1.0, open_hi=True)
        object.__setattr__(self, "betas", (float(betas[0]), float(betas[1])))


def _check(what: str, value: Any, *, lo: float | None = None, hi: float | None = None,
           open_lo: bool = False, open_hi: bool = False) -> None:
    """Reject a non-finite or out-of-range hyper-parameter, showing the allowed range."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if open_lo else value >= lo
    if ok and hi is not None:
        ok = value < hi if open_hi else value <= hi
    if not ok:
        left = "(" if open_lo else "["
        right = ")" if open_hi else "]"
        bounds = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
        raise ConfigError(f"optimizer setting {what}={value!r} is invalid; give a finite number in {bounds}")


def make_torch_optimizer(spec: OptimizerSpec, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The torch optimizer of ``spec`` over ``params`` (the reference arithmetic: single-tensor path)."""
    import torch

    params = list(params)
    if spec.name == "adam":
        return torch.optim.Adam(params, lr=spec.lr, betas=spec.betas, eps=spec.eps,
                                weight_decay=spec.weight_decay, foreach=False)
    momentum = spec.momentum if spec.name == "momentum" else 0.0
    return torch.optim.SGD(params, lr=spec.lr, momentum=momentum, weight_decay=spec.weight_decay, foreach=False)
