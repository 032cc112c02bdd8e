"""How the workers of a real run hand tensors to each other: ``local`` (threads of one process)
and ``distributed`` (one process per worker, ``torch.distributed`` point-to-point).

Both carry the same messages: task i's result (an activation or an input gradient) to every
other worker that has a task reading it, keyed by i. A worker never blocks on a send (local:
a mailbox; distributed: ``isend``), and receives are posted ahead in the order the sender
sends (its table order), so no pair of workers can wait on each other. Every blocking wait
polls an abort flag (local) or fails with the peer's connection (distributed), so one failing
worker stops the run instead of hanging it.
"""

from __future__ import annotations

import collections
import math
import threading
from typing import Any

import torch

from partime_sim.errors import PartimeError

POLL_S = 0.05  # how often a blocked local worker looks at the abort flag
LOOKAHEAD = 4  # receives posted ahead per peer (distributed, NCCL), so transfers overlap compute
GLOO_LOOKAHEAD = 64  # ...on gloo (CPU) this many, the sender's credit (see ``lookahead``)...
GLOO_LOOKAHEAD_BYTES = 64 * 2**20  # ...but at most this many bytes of posted buffers per peer (at least LOOKAHEAD)


class Aborted(PartimeError):
    """Raised in a worker whose run was stopped because another worker failed."""


class LocalHub:
    """Mailboxes and a barrier shared by the worker threads of one process."""

    def __init__(self, num_workers: int) -> None:
        self.boxes: list[dict[int, Any]] = [{} for _ in range(num_workers)]
        self.cond = threading.Condition()
        self.abort_flag = threading.Event()
        self.barrier_ = threading.Barrier(num_workers)

    def abort(self) -> None:
        self.abort_flag.set()
        self.barrier_.abort()
        with self.cond:
            self.cond.notify_all()


class LocalTransport:
    """One worker's end of a ``LocalHub``. On CUDA a tensor is handed over with an event
    recorded on the sender's stream; the receiver's stream waits for it, then copies
    (``non_blocking``) to its own device when the devices differ."""

    def __init__(self, hub: LocalHub, rank: int, device: torch.device) -> None:
        self.hub, self.rank, self.device = hub, rank, device

    def send(self, task: int, dst: int, tensor: torch.Tensor) -> None:
        event = None
        if tensor.is_cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(tensor.device))
        with self.hub.cond:
            self.hub.boxes[dst][task] = (tensor, event)
            self.hub.cond.notify_all()

    def recv(self, task: int, src: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        box = self.hub.boxes[self.rank]
        with self.hub.cond:
            while task not in box:
                if self.hub.abort_flag.is_set():
                    raise Aborted("stopped: another worker failed")
                self.hub.cond.wait(POLL_S)
            tensor, event = box.pop(task)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
            # the memory belongs to the sender's stream: its caching allocator must not hand it out again
            # before the stream that reads it here (the copy's, on the tensor's device) is done with it
            tensor.record_stream(torch.cuda.current_stream(tensor.device))
        if tensor.device != self.device:
            tensor = tensor.to(self.device, non_blocking=True)
        return tensor

    def barrier(self) -> None:
        try:
            self.hub.barrier_.wait()
        except threading.BrokenBarrierError:
            raise Aborted("stopped: another worker failed") from None

    def finish(self) -> None:
        """Nothing in flight: a local send is complete when it returns."""


def directed_groups(pairs: list[tuple[int, int]], device: torch.device) -> dict[tuple[int, int], Any]:
    """One process group per (src, dst) pair that carries messages, made by every rank in the
    same order (``dist.new_group`` is collective), so each direction has its own channel.

    Why: NCCL runs all point-to-point work between two ranks on one stream in posting order,
    and a receive kernel waits for its send; with receives posted ahead in both directions, two
    ranks would each wait behind a receive for a send queued behind the other's receive. A
    group per direction keeps each stream one-way. On gloo it keeps the messages off the
    connection the lockstep barrier uses: sharing it, messages both ways stalled 12-17% of the
    ticks for ~4 ms (BENCHMARKS.md, backend part e). On a GPU the pair communicators are built
    here, eagerly, by a tiny all-reduce per group in one global order (deadlock-free), rather
    than by the first receive, which would block until the peer's first send."""
    import torch.distributed as dist

    groups = {pair: dist.new_group(list(pair)) for pair in sorted(set(pairs))}
    if device.type == "cuda":
        rank = dist.get_rank()
        for pair, group in groups.items():
            if rank in pair:
                dist.all_reduce(torch.zeros(1, device=device), group=group)
    return groups


def lookahead(device: torch.device, nbytes: int) -> int:
    """Receives to post ahead per peer for messages of at most ``nbytes`` on ``device``.

    Why more than a few on gloo: a gloo send goes out at once, from the caller, only if the
    sender's communication thread has already read the receiver's "receive posted" notice;
    otherwise the data waits until that thread runs, and while the sender's main thread
    computes it can wait for the core up to a scheduler tick (~4 ms). On raw isend/irecv with 4
    receives posted, 1-2% of a busy sender's messages came 2-5 ms late, with 32 none did; through
    this transport, in a noisier hour, 3.3% -> 2.2% (BENCHMARKS.md, backend part g). NCCL keeps
    ``LOOKAHEAD`` (each posted receive is a kernel queued on the pair's stream)."""
    if device.type != "cpu":
        return LOOKAHEAD
    return max(LOOKAHEAD, min(GLOO_LOOKAHEAD, GLOO_LOOKAHEAD_BYTES // max(nbytes, 1)))


class DistributedTransport:
    """Point-to-point ``isend``/``irecv`` over an initialised default process group.

    ``incoming[src]`` lists, in the order ``src`` sends them, the (task, shape) of every
    message this rank receives from ``src``; receives are posted ``lookahead`` ahead. gloo and
    NCCL match messages per pair in posting order, so no tags are needed. ``groups`` maps
    (src, dst) to that direction's group (``directed_groups``); without it every message goes
    over the default group.
    """

    def __init__(self, rank: int, device: torch.device, dtype: torch.dtype,
                 incoming: dict[int, list[tuple[int, tuple[int, ...]]]],
                 groups: dict[tuple[int, int], Any] | None = None) -> None:
        self.rank, self.device, self.dtype = rank, device, dtype
        self.groups = groups or {}
        self.pending_sends: collections.deque = collections.deque()
        self.incoming = incoming
        self.next_post = {src: 0 for src in incoming}
        self.posted: dict[int, tuple[Any, torch.Tensor]] = {}
        for src, messages in incoming.items():
            largest = max((math.prod(shape) for _, shape in messages), default=0) * dtype.itemsize
            for _ in range(lookahead(device, largest)):
                self._post(src)

    def _post(self, src: int) -> None:
        import torch.distributed as dist

        j = self.next_post[src]
        if j < len(self.incoming[src]):
            task, shape = self.incoming[src][j]
            buf = torch.empty(shape, dtype=self.dtype, device=self.device)
            self.posted[task] = (dist.irecv(buf, src, group=self.groups.get((src, self.rank))), buf)
            self.next_post[src] = j + 1

    def send(self, task: int, dst: int, tensor: torch.Tensor) -> None:
        import torch.distributed as dist

        tensor = tensor.detach().contiguous()
        self.pending_sends.append((dist.isend(tensor, dst, group=self.groups.get((self.rank, dst))), tensor))
        while self.pending_sends and self.pending_sends[0][0].is_completed():
            self.pending_sends.popleft()

    def recv(self, task: int, src: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if task not in self.posted:
            raise PartimeError(f"rank {self.rank} waits for task {task} from rank {src}, which was not planned")
        work, buf = self.posted.pop(task)
        work.wait()
        self._post(src)
        return buf

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def finish(self) -> None:
        """Wait for every send to be delivered (buffers must live until then)."""
        while self.pending_sends:
            work, _ = self.pending_sends.popleft()
            work.wait()
