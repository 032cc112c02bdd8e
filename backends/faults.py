"""Planted failures for testing a real run's failure handling: a layer that passes its input
through until its n-th call, then raises or kills its own process (as a crash or the OOM
killer would). Lives in the package so spawned worker processes can unpickle it."""

from __future__ import annotations

import os
import signal

from torch import nn


class FailAt(nn.Module):
    """Identity for ``calls - 1`` calls, then ``how``: "raise" (RuntimeError) or "kill" (SIGKILL)."""

    def __init__(self, calls: int, how: str = "raise") -> None:
        super().__init__()
        if how not in ("raise", "kill"):
            raise ValueError(f"how={how!r}; use 'raise' or 'kill'")
        self.calls, self.how, self.seen = calls, how, 0

    def forward(self, x):  # noqa: ANN001, ANN201 - a torch layer
        self.seen += 1
        if self.seen >= self.calls:
            if self.how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"planted failure at call {self.seen}")
        return x
