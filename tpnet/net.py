"""Connections between ranks: asyncio (uvloop) transport for the wire layer.

The mesh keeps one authenticated TCP connection to every other rank: each rank
listens on its own address, and a rank dials every lower rank, retrying for as
long as it runs, so ranks may start in any order and a restarted rank rejoins
by itself. Every link sends PING when idle and is declared lost when nothing
has arrived for `peer_timeout` seconds, also in the middle of a frame.

This module moves bytes only: decoding and the handshake are in tpnet.wire.
Received TENSOR frames go to a per-peer queue read by tpnet.collective; STEP
and CONTROL frames go to `Mesh.inbox` for the runtime.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tpnet import wire

logger = logging.getLogger("tpnet.net")

# A connection that has not authenticated within this time is closed: it
# bounds what a silent or slow client can hold.
HANDSHAKE_TIMEOUT_S = 5.0
# Unauthenticated connections held at once; more are closed on arrival, so a
# flood of connections costs a bounded amount of memory.
MAX_PENDING_HANDSHAKES = 16
# Dial retry back-off, from first to largest delay.
DIAL_RETRY_MIN_S = 0.05
DIAL_RETRY_MAX_S = 1.0
# Frames for the runtime waiting to be read; rank 0 sends one step at a time,
# so a full inbox means a peer is misbehaving.
MAX_INBOX = 1024
# Tensors a peer may send before this rank consumes them: a step has at most
# a couple of collectives in flight per peer, so 64 means misbehaviour.
MAX_QUEUED_TENSORS = 64


class PeerLost(Exception):
    """A rank this one needs is gone (closed, timed out or refused)."""

    def __init__(self, rank: int, reason: str) -> None:
        super().__init__(f"rank {rank} lost: {reason}")
        self.rank = rank
        self.reason = reason


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Address:
        host, sep, port = text.strip().rpartition(":")
        if not sep or not port.isdigit() or not host:
            raise ValueError(f"peer address must be HOST:PORT, got {text!r}")
        return cls(host.strip("[]"), int(port))

    def __str__(self) -> str:
        return (
            f"[{self.host}]:{self.port}"
            if ":" in self.host
            else f"{self.host}:{self.port}"
        )


class Link(asyncio.BufferedProtocol):
    """One TCP connection to one peer rank; receives into the wire reader's
    buffers (no copy for large payloads)."""

    def __init__(self, mesh: Mesh, initiator: bool, expected_rank: int | None) -> None:
        self.mesh = mesh
        self.reader = wire.FrameReader()
        self.handshake = wire.Handshake(
            mesh.secret, mesh.local_info, initiator, expected_rank
        )
        self.transport: asyncio.Transport | None = None
        self.peer_addr = "?"
        self.rank: int | None = None
        self.last_rx = time.monotonic()
        self.closed = False
        self.reported = False  # a log line already says why this link ended
        self.refused = False  # over the limit of pending handshakes
        self.frame_started: float | None = None  # when a partial frame began
        self.authenticated = asyncio.get_running_loop().create_future()
        self.bytes_sent = 0
        self._poll_sock: socket.socket | None = None

    # asyncio protocol callbacks -------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer_addr = f"{peer[0]}:{peer[1]}" if peer else "?"
        if self.refused:
            logger.warning(
                "refusing connection from %s: %d handshakes already pending",
                self.peer_addr,
                MAX_PENDING_HANDSHAKES,
            )
            transport.abort()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # A second handle on the same socket, for poll(): reading it
            # while the loop is not running cannot race the transport's reads.
            try:
                self._poll_sock = socket.socket(fileno=os.dup(sock.fileno()))
            except OSError:
                self._poll_sock = None
        if self.handshake.initiator:
            transport.write(self.handshake.start())

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.reader.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        if self.refused:
            return
        self.last_rx = time.monotonic()
        try:
            messages = self.reader.buffer_filled(nbytes)
            while messages:
                for msg in messages:
                    self._dispatch(msg)
                messages = self.reader.resume() if self.reader.mid_frame else []
            if not self.reader.mid_frame:
                self.frame_started = None
            elif self.frame_started is None:
                self.frame_started = self.last_rx
        except wire.ProtocolError as exc:
            logger.warning(
                "closing connection from %s (rank %s): %s [%s]",
                self.peer_addr,
                self.rank,
                exc,
                exc.code,
            )
            self._send_raw(wire.join(wire.encode_error(exc.code, str(exc))))
            self.reported = True
            self.close(f"protocol error: {exc}")
        except wire.HandshakeRefused as exc:
            self._refused(exc)

    def poll(self) -> bool:
        """Take whatever bytes have arrived, without blocking or yielding to
        the loop (for collectives that spin briefly before sleeping).
        Returns whether any arrived."""
        sock = self._poll_sock
        if sock is None or self.closed:
            return False
        try:
            n = sock.recv_into(self.reader.get_buffer(), 0, socket.MSG_DONTWAIT)
        except OSError:  # nothing there yet (EAGAIN), or the link broke
            return False
        if n == 0:
            return False  # end of stream: the transport reports it
        self.buffer_updated(n)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.close("connection closed" if exc is None else f"connection error: {exc}")

    # messages ---------------------------------------------------------------

    def _dispatch(self, msg: wire.Message) -> None:
        if not self.handshake.done:
            reply = self.handshake.receive(msg)
            if reply:
                self._send_raw(reply)
            if self.handshake.done:
                self.reader.authenticated = True
                assert self.handshake.remote is not None
                self.rank = self.handshake.remote.rank
                if not self.authenticated.done():
                    self.authenticated.set_result(self.rank)
            return
        kind = msg.kind
        if kind == wire.Kind.TENSOR:
            self.mesh.on_tensor(self, msg)
        elif kind == wire.Kind.PING:
            if not self.closed:
                self.send(wire.encode_frame(wire.Kind.PONG, tag=msg.tag))
        elif kind == wire.Kind.PONG:
            pass
        elif kind == wire.Kind.ERROR:
            # %r: the text comes from the peer and must not forge log lines.
            text = str(msg.meta.get("message"))[:200]
            logger.warning("rank %s reported an error: %r", self.rank, text)
            self.reported = True
            self.close(f"peer error: {text!r}")
        else:
            self.mesh.on_message(self, msg)

    def _refused(self, exc: wire.HandshakeRefused) -> None:
        frame = wire.Handshake.refusal_frame(exc)
        if frame:
            self._send_raw(frame)
        if exc.remote:
            logger.warning(
                "handshake with %s: the peer refused it: %r [%r]",
                self.peer_addr,
                str(exc)[:200],
                exc.code[:40],
            )
        else:
            logger.warning(
                "handshake with %s refused: %s [%s]", self.peer_addr, exc, exc.code
            )
        self.mesh.note_refusal(self.peer_addr, exc)
        self.reported = True
        if not self.authenticated.done():
            self.authenticated.set_exception(exc)
            self.authenticated.exception()  # nobody may be waiting: mark seen
        self.close(f"handshake refused: {exc}")

    def _send_raw(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def send(self, buffers: list[Any]) -> None:
        """Queue one encoded frame; raises PeerLost if the link is down."""
        if self.closed or self.transport is None or self.transport.is_closing():
            raise PeerLost(self.rank if self.rank is not None else -1, "link closed")
        self.transport.writelines(buffers)
        self.bytes_sent += sum(memoryview(b).nbytes for b in buffers)

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        if self._poll_sock is not None:
            self._poll_sock.close()
            self._poll_sock = None
        if self.transport is not None:
            self.transport.abort() if "protocol" in reason else self.transport.close()
        if (
            not self.handshake.done
            and not self.reported
            and not self.handshake.initiator
        ):
            logger.warning(
                "connection from %s ended before authenticating: %s",
                self.peer_addr,
                reason,
            )
        if not self.authenticated.done():
            self.authenticated.set_exception(ConnectionError(reason))
            self.authenticated.exception()  # nobody may be waiting: mark seen
        self.mesh.on_link_closed(self, reason)


class Mesh:
    """This rank's links to all other ranks."""

    def __init__(
        self,
        rank: int,
        addresses: list[Address],
        secret: bytes,
        model_fingerprint: str,
        listen_host: str | None = None,
        heartbeat_s: float = 0.5,
        peer_timeout_s: float = 3.0,
    ) -> None:
        self.rank = rank
        self.world_size = len(addresses)
        self.addresses = addresses
        self.secret = secret
        self.listen_host = listen_host or addresses[rank].host
        self.local_info = wire.PeerInfo(rank, self.world_size, model_fingerprint)
        self.heartbeat_s = heartbeat_s
        self.peer_timeout_s = peer_timeout_s
        # The largest frame (256 MiB) crosses a slow link in a few seconds.
        self.frame_deadline_s = max(10.0, 3 * peer_timeout_s)
        self.links: dict[int, Link] = {}
        self.inbox: asyncio.Queue[tuple[int, wire.Message]] = asyncio.Queue(MAX_INBOX)
        self.tensors: dict[int, collections.deque[wire.Message]] = {
            r: collections.deque() for r in range(self.world_size) if r != rank
        }
        # Listeners called with (rank, reason) / (rank,) on link changes.
        self.lost_listeners: list[Callable[[int, str], None]] = []
        self.joined_listeners: list[Callable[[int], None]] = []
        self.tensor_listeners: list[Callable[[int], None]] = []
        # Notices from ranks that could not start (spec 4.6), for /health.
        self.fault_notices: collections.deque[tuple[float, str]] = collections.deque(
            maxlen=8
        )
        self._pending = 0
        self._server: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._changed = asyncio.Event()

    # lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        port = self.addresses[self.rank].port
        self._server = await loop.create_server(
            self._accept, self.listen_host, port, reuse_address=True
        )
        logger.info(
            "rank %d of %d listening on %s:%d",
            self.rank,
            self.world_size,
            self.listen_host,
            port,
        )
        for peer in range(self.rank):
            self._tasks.append(asyncio.create_task(self._dial_forever(peer)))
        self._tasks.append(asyncio.create_task(self._watch_liveness()))

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        if self._server is not None:
            self._server.close()
        for link in list(self.links.values()):
            link.close("shutting down")
        if self._server is not None:
            await self._server.wait_closed()

    @property
    def missing(self) -> list[int]:
        return [
            r for r in range(self.world_size) if r != self.rank and r not in self.links
        ]

    async def wait_complete(self, timeout_s: float | None = None) -> None:
        """Wait until a link to every other rank is up; logs who it waits for."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        last_log = 0.0
        while self.missing:
            now = time.monotonic()
            if now - last_log > 5.0:
                logger.info(
                    "rank %d waiting for ranks %s (%s)",
                    self.rank,
                    self.missing,
                    ", ".join(str(self.addresses[r]) for r in self.missing),
                )
                last_log = now
            if deadline is not None and now >= deadline:
                raise TimeoutError(
                    f"ranks {self.missing} did not connect within {timeout_s:.0f} s"
                )
            self._changed.clear()
            wait = 1.0 if deadline is None else max(0.01, min(1.0, deadline - now))
            try:
                await asyncio.wait_for(self._changed.wait(), wait)
            except TimeoutError:
                pass

    # connections ------------------------------------------------------------

    def _accept(self) -> asyncio.BufferedProtocol:
        link = Link(self, initiator=False, expected_rank=None)
        if self._pending >= MAX_PENDING_HANDSHAKES:
            # Aborted as soon as its transport exists (connection_made).
            link.refused = link.closed = link.reported = True
            return link
        self._pending += 1
        asyncio.get_running_loop().create_task(self._authenticate(link))
        return link

    async def _authenticate(self, link: Link) -> None:
        try:
            rank = await asyncio.wait_for(
                asyncio.shield(link.authenticated), HANDSHAKE_TIMEOUT_S
            )
        except TimeoutError:
            link.close(f"no handshake within {HANDSHAKE_TIMEOUT_S:.0f} s")
            return
        except (wire.HandshakeRefused, ConnectionError):
            return
        finally:
            self._pending -= 1
        self._register(link, rank)

    async def _dial_forever(self, peer: int) -> None:
        """Keep a link to a lower rank up for as long as this rank runs."""
        loop = asyncio.get_running_loop()
        delay = DIAL_RETRY_MIN_S
        addr = self.addresses[peer]
        while not self._closing:
            link = self.links.get(peer)
            if link is not None and not link.closed:
                self._changed.clear()
                await self._changed.wait()
                continue
            try:
                _, proto = await loop.create_connection(
                    lambda: Link(self, initiator=True, expected_rank=peer),
                    addr.host,
                    addr.port,
                )
                assert isinstance(proto, Link)
                await asyncio.wait_for(
                    asyncio.shield(proto.authenticated), HANDSHAKE_TIMEOUT_S
                )
                self._register(proto, peer)
                delay = DIAL_RETRY_MIN_S
            except wire.HandshakeRefused as exc:
                # The refusal was logged by the link; retry slowly, the peer
                # may be restarted with the right model or secret.
                delay = DIAL_RETRY_MAX_S * 2
                if exc.code in ("auth_failed", "model_mismatch", "world_size_mismatch"):
                    delay = 5.0
            except (OSError, TimeoutError, ConnectionError):
                delay = min(delay * 2, DIAL_RETRY_MAX_S)
            await asyncio.sleep(delay)

    def _register(self, link: Link, rank: int) -> None:
        old = self.links.get(rank)
        if old is not None and old is not link:
            old.close("replaced by a new connection from the same rank")
        self.links[rank] = link
        self.tensors[rank].clear()
        logger.info("rank %d joined from %s", rank, link.peer_addr)
        for listener in list(self.joined_listeners):
            listener(rank)
        self._changed.set()

    def on_link_closed(self, link: Link, reason: str) -> None:
        rank = link.rank
        if rank is None or self.links.get(rank) is not link:
            return
        del self.links[rank]
        if not self._closing:
            logger.warning("rank %d lost: %s", rank, reason)
        for listener in list(self.lost_listeners):
            listener(rank, reason)
        self._changed.set()

    def note_refusal(self, addr: str, exc: wire.HandshakeRefused) -> None:
        if exc.code == "peer_fault" and not exc.remote:
            self.fault_notices.append((time.time(), f"{addr}: {exc}"))

    async def _watch_liveness(self) -> None:
        """Ping idle links; declare a link lost when it has been silent for
        peer_timeout (this covers a peer stalled in the middle of a frame)."""
        seq = 0
        while True:
            await asyncio.sleep(self.heartbeat_s)
            now = time.monotonic()
            seq += 1
            for link in list(self.links.values()):
                silent = now - link.last_rx
                if silent > self.peer_timeout_s:
                    link.close(
                        f"no data for {silent:.1f} s (timeout {self.peer_timeout_s} s)"
                    )
                    continue
                started = link.frame_started
                if started is not None and now - started > self.frame_deadline_s:
                    # Bytes trickling in keep a link "alive" but never finish
                    # a frame: a peer that does that is as good as lost.
                    link.close(
                        f"a frame took over {self.frame_deadline_s:.0f} s to arrive"
                    )
                    continue
                try:
                    link.send(wire.encode_frame(wire.Kind.PING, tag=seq))
                except PeerLost:
                    pass

    @staticmethod
    async def send_fault_notice(
        addresses: list[Address],
        rank: int,
        secret: bytes,
        reason: str,
        timeout_s: float = 5.0,
    ) -> None:
        """Tell the ranks this one dials that it cannot start, so they say so
        instead of waiting for it in silence. Best effort, bounded in time."""

        async def notify(peer: int) -> None:
            addr = addresses[peer]
            hs = wire.Handshake(secret, wire.PeerInfo(rank, len(addresses), ""), True)
            try:
                reader, writer = await asyncio.open_connection(addr.host, addr.port)
            except OSError:
                return
            try:
                writer.write(hs.start(fault=reason))
                await writer.drain()
                await reader.read(wire.HANDSHAKE_MAX_META_BYTES)
            finally:
                writer.close()

        tasks = [asyncio.ensure_future(notify(p)) for p in range(rank)]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)
            for task in tasks:
                task.cancel()

    # traffic ------------------------------------------------------------------

    def on_tensor(self, link: Link, msg: wire.Message) -> None:
        assert link.rank is not None
        if self.links.get(link.rank) is not link:
            return
        queue = self.tensors[link.rank]
        if len(queue) >= MAX_QUEUED_TENSORS:
            link.close(f"sent {MAX_QUEUED_TENSORS} tensors ahead of the collectives")
            return
        queue.append(msg)
        for listener in self.tensor_listeners:
            listener(link.rank)

    def on_message(self, link: Link, msg: wire.Message) -> None:
        assert link.rank is not None
        try:
            self.inbox.put_nowait((link.rank, msg))
        except asyncio.QueueFull:
            link.close(f"inbox full ({MAX_INBOX} messages unread)")

    def send(self, rank: int, buffers: list[Any]) -> None:
        link = self.links.get(rank)
        if link is None:
            raise PeerLost(rank, "not connected")
        link.send(buffers)

    def send_json(
        self, rank: int, kind: int, body: dict[str, Any], payload: Any = None
    ) -> None:
        self.send(rank, wire.encode_json(kind, body, payload=payload))
