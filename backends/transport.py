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
GLOO_LOOKAHEAD = 8192  # ...on gloo (CPU) up to this many, in practice a whole run's (see ``lookahead``)...
GLOO_LOOKAHEAD_BYTES = 64 * 2**20  # ...but at most this many bytes of posted buffers per peer (at least LOOKAHEAD)
TOKEN_TAG = 1  # the tag of a gloo barrier's tokens (``TokenBarrier``); messages go with tag 0


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
    group per direction keeps each stream one-way. On gloo it keeps each connection one-way
    during a run (data one way; the receive notices, all sent before the run, the other), so no
    thread takes a pair's lock while a message arrives on it (``lookahead``): messages both
    ways on gloo's barrier connection stalled 12-17% of the ticks for ~4 ms (BENCHMARKS.md,
    backend part e). A ``TokenBarrier``'s tokens ride these groups too (their own tag). On a
    GPU the pair communicators are built here, eagerly, by a tiny all-reduce per group in one
    global order (deadlock-free), rather than by the first receive, which would block until the
    peer's first send."""
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

    Why all of a run's on gloo (up to ``GLOO_LOOKAHEAD`` and ``GLOO_LOOKAHEAD_BYTES``), posted
    before it starts: posting a receive, like sending, holds the gloo pair's lock while it writes
    to the socket. gloo's communication thread, woken by a message or notice arriving on that
    pair at that moment, finds the lock taken, skips the pair and polls again at once (a
    level-triggered epoll): a spin that, sharing the worker's core, keeps the lock holder off it
    until the next scheduler tick (~4 ms). A receive posted as the previous one is taken lands
    in exactly that window in a burst of messages: lenet ``gpipe`` training ran 20% slower than
    ``1f1b`` that way, with 15 messages per 300-sample run a tick late (BENCHMARKS.md). Posted
    before the run, the main thread never takes a pair's lock while a message can arrive on it
    (a sender's pair gets no notices during the run either), and a sender never waits for one.
    NCCL keeps ``LOOKAHEAD`` (each posted receive is a kernel queued on the pair's stream)."""
    if device.type != "cpu":
        return LOOKAHEAD
    return max(LOOKAHEAD, min(GLOO_LOOKAHEAD, GLOO_LOOKAHEAD_BYTES // max(nbytes, 1)))


def barrier_pairs(world: int) -> list[tuple[int, int]]:
    """The (src, dst) pairs a ``TokenBarrier`` of ``world`` ranks sends tokens over."""
    return sorted({(r, (r + 2**k) % world) for r in range(world) for k in range(math.ceil(math.log2(world)))}) \
        if world > 1 else []


class TokenBarrier:
    """A barrier of all ranks on gloo made of point-to-point tokens (a dissemination barrier:
    in round k each rank sends a token to rank + 2^k and waits for rank - 2^k's) over the
    directed groups (``directed_groups`` with ``barrier_pairs``), with the tokens of ``count``
    barriers received into receives posted up front (tag ``TOKEN_TAG``).

    Why not ``dist.barrier()``: gloo's barrier sends and receives on one connection at once, the
    case where its communication thread spins behind the pair's lock (``lookahead``): two ranks
    that reached it within ~0.05 ms of each other stalled now and then for a scheduler tick. With
    this barrier lenet's lockstep ``partime`` ran 13% (training) and 22% (inference) faster than
    with gloo's (BENCHMARKS.md)."""

    def __init__(self, rank: int, world: int, groups: dict[tuple[int, int], Any], count: int) -> None:
        import torch.distributed as dist

        self.dist, self.count, self.done = dist, count, 0
        steps = range(math.ceil(math.log2(world))) if world > 1 else range(0)
        self.rounds = [((rank + 2**k) % world, (rank - 2**k) % world) for k in steps]
        self.groups, self.rank = groups, rank
        self.token = torch.zeros(1)
        self.sends: collections.deque = collections.deque()
        self.posted: list[collections.deque] = [collections.deque() for _ in self.rounds]
        self.next_post = [0] * len(self.rounds)
        for k in range(len(self.rounds)):
            for _ in range(min(count, GLOO_LOOKAHEAD)):
                self._post(k)

    def _post(self, k: int) -> None:
        if self.next_post[k] < self.count:
            src = self.rounds[k][1]
            self.posted[k].append(self.dist.irecv(torch.empty(1), src, group=self.groups[(src, self.rank)],
                                                  tag=TOKEN_TAG))
            self.next_post[k] += 1

    def barrier(self) -> None:
        if self.done >= self.count:
            raise PartimeError(f"rank {self.rank}: barrier {self.done + 1} of {self.count} planned; "
                               "count every barrier of the run when making the TokenBarrier")
        for k, (dst, _) in enumerate(self.rounds):
            self.sends.append(self.dist.isend(self.token, dst, group=self.groups[(self.rank, dst)], tag=TOKEN_TAG))
            self.posted[k].popleft().wait()
            self._post(k)
        self.done += 1
        while self.sends and self.sends[0].is_completed():
            self.sends.popleft()

    def finish(self) -> None:
        """Wait for every token sent (the peers take them in their last barriers)."""
        while self.sends:
            self.sends.popleft().wait()


class DistributedTransport:
    """Point-to-point ``isend``/``irecv`` over an initialised default process group.

    ``incoming[src]`` lists, in the order ``src`` sends them, the (task, shape) of every
    message this rank receives from ``src``; receives are posted ``lookahead`` ahead. gloo and
    NCCL match messages per pair in posting order, so no tags are needed. ``groups`` maps
    (src, dst) to that direction's group (``directed_groups``); without it every message goes
    over the default group. ``barrier`` (gloo) replaces ``dist.barrier()`` for the run's barriers.
    """

    def __init__(self, rank: int, device: torch.device, dtype: torch.dtype,
                 incoming: dict[int, list[tuple[int, tuple[int, ...]]]],
                 groups: dict[tuple[int, int], Any] | None = None, barrier: TokenBarrier | None = None) -> None:
        self.rank, self.device, self.dtype = rank, device, dtype
        self.groups = groups or {}
        self.token_barrier = barrier
        self.pending_sends: collections.deque = collections.deque()
        self.incoming = incoming
        self.next_post = {src: 0 for src in incoming}
        self.posted: dict[int, tuple[Any, torch.Tensor]] = {}
        for src, messages in incoming.items():
            largest = max((math.prod(shape) for _, shape in messages), default=0) * dtype.itemsize
            for _ in range(min(lookahead(device, largest), len(messages))):
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

        if self.token_barrier is not None:
            self.token_barrier.barrier()
        else:
            dist.barrier()

    def finish(self) -> None:
        """Wait for every send to be delivered (buffers must live until then)."""
        while self.pending_sends:
            work, _ = self.pending_sends.popleft()
            work.wait()
        if self.token_barrier is not None:
            self.token_barrier.finish()
