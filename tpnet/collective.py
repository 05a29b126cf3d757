"""Collectives over the mesh: all-reduce (sum) and gather to rank 0.

Every rank calls the same collectives in the same order; each call takes the
next operation number, sent as the TENSOR frame's tag (protocol_spec.md 3.8)
together with the cluster epoch, so a stale frame from before a re-formation
is recognised and dropped. Sums add the ranks' parts in rank order on every
rank, so all ranks hold bit-identical results.

For the small payloads of decoding, one direct exchange (every rank sends its
part to every other) costs one network latency, the minimum; with at most a
handful of ranks its bandwidth overhead over a ring is small.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import numpy as np

from tpnet import wire
from tpnet.net import Mesh, PeerLost

_MX_DTYPE_NAME = {
    mx.float32: "float32",
    mx.float16: "float16",
    mx.bfloat16: "bfloat16",
    mx.int32: "int32",
    mx.int64: "int64",
    mx.uint8: "uint8",
    mx.uint32: "uint32",
}

EPOCH_SHIFT = 40  # tag = epoch << 40 | operation number


class StepAborted(Exception):
    """The cluster moved to a new epoch while this rank was mid-step."""


def to_buffer(x: mx.array) -> tuple[str, tuple[int, ...], Any]:
    """Evaluate x and return (dtype name, shape, a buffer over its memory)."""
    mx.eval(x)
    name = _MX_DTYPE_NAME[x.dtype]
    if x.dtype == mx.bfloat16:
        x = x.view(mx.uint16)
    return name, tuple(x.shape), np.asarray(x)


def from_message(msg: wire.Message) -> mx.array:
    arr = mx.array(msg.array())
    if msg.dtype == "bfloat16":
        arr = arr.view(mx.bfloat16)
    return arr


class Collective:
    """Collectives for one rank. A lost peer fails the pending operation with
    PeerLost; `reset(epoch)` starts a fresh operation sequence after the
    cluster re-forms."""

    def __init__(self, mesh: Mesh, spin_s: float = 0.0) -> None:
        self.mesh = mesh
        # How long to poll the links before sleeping in a collective. A rank
        # that sleeps is woken by the kernel when its peer's part arrives,
        # which on a virtual machine can take a few hundred microseconds per
        # exchange; polling for a short while avoids that, at the price of a
        # busy core, so it is only worth it when each rank has a core.
        self.spin_s = spin_s
        self.rank = mesh.rank
        self.world_size = mesh.world_size
        self.epoch = 0
        self._op = 0
        self._waiter: asyncio.Future[None] | None = None
        self._waiting_for: list[int] = []
        self._retired: collections.deque[int] = collections.deque(maxlen=64)
        self._aborted: str | None = None
        # Called with the seconds of every all-reduce (rank 0's metrics).
        self.on_latency: Callable[[float], None] | None = None
        mesh.tensor_listeners.append(self._on_tensor)
        mesh.lost_listeners.append(self._on_lost)

    def reset(self, epoch: int) -> None:
        """Start the operation sequence of a new cluster epoch. Frames of the
        new epoch may already have arrived (a faster rank started the step
        first) and are kept; frames of retired epochs are dropped."""
        if epoch == self.epoch:
            return
        self._retired.append(self.epoch)
        self.epoch = epoch
        self._op = 0
        self._aborted = None
        for rank in self.mesh.tensors:
            self._drop_retired(rank)

    def _next_tag(self) -> int:
        self._op += 1
        return (self.epoch << EPOCH_SHIFT) | self._op

    # waiting for parts --------------------------------------------------------

    def _misbehaved(self, rank: int, what: str) -> None:
        """A peer broke the collective protocol: drop its link (the cluster
        re-forms without it until it reconnects) and fail the step."""
        link = self.mesh.links.get(rank)
        if link is not None:
            link.close(f"rank {rank} {what}")
        raise PeerLost(rank, what)

    def _check_part(
        self, rank: int, msg: wire.Message, dtype: str, shape: tuple[int, ...]
    ) -> None:
        if msg.dtype != dtype or msg.shape != shape:
            self._misbehaved(
                rank,
                f"sent a {msg.dtype} tensor of shape {msg.shape}, "
                f"expected {dtype} of shape {shape}",
            )

    def _drop_retired(self, rank: int) -> None:
        queue = self.mesh.tensors[rank]
        while queue and queue[0].tag >> EPOCH_SHIFT in self._retired:
            queue.popleft()

    def abort(self, reason: str) -> None:
        """Void the current step: fail the collective this rank waits in, or,
        if it is not waiting yet, the next one it waits in this epoch."""
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(StepAborted(reason))
        else:
            self._aborted = reason

    def _on_tensor(self, rank: int) -> None:
        self._drop_retired(rank)
        queue = self.mesh.tensors[rank]
        if queue and queue[0].tag >> EPOCH_SHIFT != self.epoch:
            # A peer has started a newer epoch: whatever this rank waits for
            # in the current one will never come.
            self.abort(f"rank {rank} is in epoch {queue[0].tag >> EPOCH_SHIFT}")
            return
        if self._waiter is not None and not self._waiter.done() and self._ready():
            self._waiter.set_result(None)

    def _on_lost(self, rank: int, reason: str) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done() and rank in self._waiting_for:
            waiter.set_exception(PeerLost(rank, reason))

    def _spin(self, ranks: list[int]) -> None:
        deadline = time.perf_counter() + self.spin_s
        while time.perf_counter() < deadline:
            for r in ranks:
                link = self.mesh.links.get(r)
                if not self.mesh.tensors[r] and link is not None:
                    link.poll()
            if self._ready() or self._aborted is not None:
                return

    def _raise_if_aborted(self) -> None:
        if self._aborted is not None:
            reason, self._aborted = self._aborted, None
            raise StepAborted(reason)

    def _ready(self) -> bool:
        return all(self.mesh.tensors[r] for r in self._waiting_for)

    async def _receive(self, ranks: list[int], tag: int) -> dict[int, wire.Message]:
        self._waiting_for = ranks
        self._raise_if_aborted()
        for r in ranks:
            if r not in self.mesh.links:
                raise PeerLost(r, "not connected")
            self._on_tensor(r)
        if self.spin_s and not self._ready():
            self._spin(ranks)
            self._raise_if_aborted()
            for r in ranks:
                if r not in self.mesh.links:
                    raise PeerLost(r, "lost while polling")
        if not self._ready():
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        for r in ranks:
            head = self.mesh.tensors[r][0].tag
            if head >> EPOCH_SHIFT != self.epoch:
                if self.rank == 0:
                    # Rank 0 starts every epoch: no peer can be ahead of it.
                    self._misbehaved(
                        r, f"sent a tensor of unknown epoch {head >> EPOCH_SHIFT}"
                    )
                # The peer has moved on to a new epoch: this step is void.
                raise StepAborted(f"rank {r} is in epoch {head >> EPOCH_SHIFT}")
            if head != tag:
                raise PeerLost(
                    r, f"collective out of step: expected tag {tag:#x}, got {head:#x}"
                )
        return {r: self.mesh.tensors[r].popleft() for r in ranks}

    # collectives ----------------------------------------------------------------

    async def all_sum(self, x: mx.array) -> mx.array:
        """Sum x over all ranks; every rank gets the same result."""
        if self.world_size == 1:
            return x
        started = time.perf_counter()
        tag = self._next_tag()
        dtype, shape, buf = to_buffer(x)
        frame = wire.encode_tensor(tag, dtype, shape, buf)
        others = [r for r in range(self.world_size) if r != self.rank]
        for r in others:
            self.mesh.send(r, frame)
        parts = await self._receive(others, tag)
        for r, msg in parts.items():
            self._check_part(r, msg, dtype, shape)
        if dtype == "bfloat16":  # numpy has no bfloat16: add in MLX
            mx_parts = [
                x if r == self.rank else from_message(parts[r])
                for r in range(self.world_size)
            ]
            total = mx_parts[0]
            for part in mx_parts[1:]:
                total = total + part
        else:
            # Added in numpy, in rank order, so every rank gets bit-identical
            # sums; an MLX add would cost an eval round trip to MLX's stream
            # thread (10-50 us) on this hot path.
            arrays = [
                buf if r == self.rank else parts[r].array()
                for r in range(self.world_size)
            ]
            acc = np.add(arrays[0], arrays[1])
            for a in arrays[2:]:
                np.add(acc, a, out=acc)
            total = mx.array(acc)
        if self.on_latency is not None:
            self.on_latency(time.perf_counter() - started)
        return total

    async def gather(
        self, x: mx.array, expected_columns: list[int] | None = None
    ) -> list[mx.array] | None:
        """Rank 0 gets every rank's x [rows, columns] in rank order; other
        ranks get None. `expected_columns[r]` is rank r's column count."""
        if self.world_size == 1:
            return [x]
        tag = self._next_tag()
        if self.rank != 0:
            dtype, shape, buf = to_buffer(x)
            self.mesh.send(0, wire.encode_tensor(tag, dtype, shape, buf))
            return None
        # Compute this rank's part before waiting, so that it overlaps with
        # the others' instead of following them.
        mx.eval(x)
        others = list(range(1, self.world_size))
        parts = await self._receive(others, tag)
        if expected_columns is not None:
            for r, msg in parts.items():
                self._check_part(
                    r, msg, _MX_DTYPE_NAME[x.dtype], (x.shape[0], expected_columns[r])
                )
        return [x] + [from_message(parts[r]) for r in others]
