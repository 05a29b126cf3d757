"""tpnet's frame protocol, sans-IO: bytes in, typed messages out.

Nothing here touches a socket, an event loop or MLX. `FrameReader` is fed
bytes (or lends its own buffer to be filled, for zero-copy receives) and hands
back typed messages; the `encode_*` functions turn messages into a list of
buffers to be written together. `Handshake` runs the mutual challenge-response
of protocol_spec.md section 4 as a small state machine.

Every length read off the wire is checked against a limit before anything is
allocated for it; any violation raises `ProtocolError`, the only exception the
decoder raises for bad input.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import math
import os
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MAGIC = b"TPNT"
PROTOCOL_VERSION = 1
# Versions this build can speak; the handshake picks the highest common one.
SUPPORTED_VERSIONS = (1,)

HEADER = struct.Struct("<4sBBHIIQQ")  # protocol_spec.md section 2
HEADER_SIZE = HEADER.size  # 32
# Payloads start on a 64-byte boundary from the frame start, so a receiver
# that places frames on aligned addresses can view any dtype over them.
PAYLOAD_ALIGN = 64

# Control messages are small JSON objects; a step description for the largest
# batch (a few hundred sequences) stays well under this.
MAX_META_BYTES = 64 * 1024
# The largest tensor sent: an all-reduce of a prefill chunk (tokens x hidden x
# 4 bytes) or a gathered logits block; 256 MiB bounds memory per connection.
MAX_PAYLOAD_BYTES = 256 * 1024 * 1024
# Before authentication a peer may only send handshake messages, which are
# tiny: this bounds what an unauthenticated connection can make us allocate.
HANDSHAKE_MAX_META_BYTES = 4096
MAX_TENSOR_NDIM = 8
NONCE_BYTES = 32
# A fault notice is one log line, not a document.
MAX_FAULT_CHARS = 500
# Payloads up to this size are received through the reader's staging buffer
# and copied out (cheap); larger ones are received straight into their own
# aligned buffer, with no copy.
STAGING_BYTES = 256 * 1024


class Kind:
    """Message types (protocol_spec.md section 3)."""

    HELLO = 1
    CHALLENGE = 2
    PROOF = 3
    WELCOME = 4
    ERROR = 5
    PING = 6
    PONG = 7
    TENSOR = 8
    STEP = 9
    CONTROL = 10

    HANDSHAKE = frozenset({HELLO, CHALLENGE, PROOF, WELCOME, ERROR})
    JSON_META = frozenset({HELLO, CHALLENGE, PROOF, WELCOME, ERROR, STEP, CONTROL})
    ALL = frozenset(range(1, 11))


class ProtocolError(Exception):
    """The bytes from the peer break protocol_spec.md. `code` names the rule
    (one of spec section 6); the message says what was expected and what
    arrived. The connection that produced it must be closed."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# dtype codes (spec section 3.8); bfloat16 travels as raw 16-bit words.
DTYPE_CODES: dict[str, int] = {
    "float32": 1,
    "float16": 2,
    "bfloat16": 3,
    "int32": 4,
    "int64": 5,
    "uint8": 6,
    "uint32": 7,
}
DTYPE_NAMES = {code: name for name, code in DTYPE_CODES.items()}
ITEMSIZE = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int32": 4,
    "int64": 8,
    "uint8": 1,
    "uint32": 4,
}
_NUMPY_DTYPE = {
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": np.uint16,
    "int32": np.int32,
    "int64": np.int64,
    "uint8": np.uint8,
    "uint32": np.uint32,
}


@dataclass
class Message:
    """A decoded frame. `meta` is the parsed JSON object for control kinds;
    TENSOR frames carry `dtype`, `shape` and `payload` instead."""

    kind: int
    tag: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    payload: memoryview | None = None
    dtype: str = ""
    shape: tuple[int, ...] = ()

    def array(self) -> np.ndarray:
        """View a TENSOR payload as a numpy array without copying (bfloat16
        arrives as uint16 words)."""
        if self.payload is None:
            return np.empty(self.shape, dtype=_NUMPY_DTYPE[self.dtype])
        flat = np.frombuffer(self.payload, dtype=_NUMPY_DTYPE[self.dtype])
        return flat.reshape(self.shape)


# Small payloads are carved from shared arenas of this size with a bump
# pointer (about 0.2 us instead of 1.5 us for an allocation of their own); an
# arena is freed when the last array viewing it goes away.
ARENA_BYTES = 1 << 20


class _Arena:
    def __init__(self) -> None:
        self.buffer = aligned_buffer(ARENA_BYTES)
        self.used = 0

    def take(self, nbytes: int) -> memoryview:
        start = self.used
        self.used = -(-(start + nbytes) // PAYLOAD_ALIGN) * PAYLOAD_ALIGN
        return self.buffer[start : start + nbytes]


def aligned_buffer(nbytes: int) -> memoryview:
    """A writable buffer of nbytes whose start is PAYLOAD_ALIGN-aligned."""
    raw = np.empty(nbytes + PAYLOAD_ALIGN, dtype=np.uint8)
    start = (-raw.ctypes.data) % PAYLOAD_ALIGN
    return memoryview(raw[start : start + nbytes]).cast("B")


def _payload_offset(meta_len: int) -> int:
    return -(-(HEADER_SIZE + meta_len) // PAYLOAD_ALIGN) * PAYLOAD_ALIGN


# -- encoding ---------------------------------------------------------------


def encode_frame(
    kind: int, meta: bytes = b"", payload: Any = None, tag: int = 0
) -> list[Any]:
    """Buffers for one frame, to be written together (writelines). The
    payload, any object exposing the buffer protocol, is not copied."""
    if len(meta) > MAX_META_BYTES:
        raise ValueError(f"meta is {len(meta)} bytes, limit {MAX_META_BYTES}")
    view = None if payload is None else memoryview(payload)
    if view is None or view.nbytes == 0:
        # No payload, no padding: the frame ends after its meta (spec 2).
        return [
            HEADER.pack(MAGIC, PROTOCOL_VERSION, kind, 0, len(meta), 0, 0, tag) + meta
        ]
    view = view.cast("B")
    if view.nbytes > MAX_PAYLOAD_BYTES:
        raise ValueError(f"payload is {view.nbytes} bytes, limit {MAX_PAYLOAD_BYTES}")
    pad = _payload_offset(len(meta)) - HEADER_SIZE - len(meta)
    head = HEADER.pack(MAGIC, PROTOCOL_VERSION, kind, 0, len(meta), 0, view.nbytes, tag)
    return [head + meta + bytes(pad), view]


def encode_json(
    kind: int, body: dict[str, Any], tag: int = 0, payload: Any = None
) -> list[Any]:
    meta = json.dumps(body, separators=(",", ":")).encode()
    return encode_frame(kind, meta, payload, tag)


_TENSOR_META = struct.Struct("<BB")


@functools.lru_cache(maxsize=1024)
def _tensor_head(dtype: str, shape: tuple[int, ...]) -> bytes:
    # Header, meta and padding of a TENSOR frame with tag 0; a step sends the
    # same few shapes thousands of times.
    if dtype not in DTYPE_CODES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPE_CODES)}")
    meta = _TENSOR_META.pack(DTYPE_CODES[dtype], len(shape)) + struct.pack(
        f"<{len(shape)}I", *shape
    )
    nbytes = math.prod(shape) * ITEMSIZE[dtype]
    return bytes(encode_frame(Kind.TENSOR, meta, bytes(nbytes) if nbytes else None)[0])


_TAG_OFFSET = 24  # the tag is the header's last field (spec 2.1)


def encode_tensor(tag: int, dtype: str, shape: tuple[int, ...], data: Any) -> list[Any]:
    """A TENSOR frame over `data` (a contiguous buffer of the given dtype)."""
    head = bytearray(_tensor_head(dtype, tuple(shape)))
    struct.pack_into("<Q", head, _TAG_OFFSET, tag)
    view = memoryview(data)
    if view.nbytes == 0:
        return [head]
    if view.nbytes != math.prod(shape) * ITEMSIZE[dtype]:
        raise ValueError(
            f"{dtype} tensor of shape {shape} needs {math.prod(shape) * ITEMSIZE[dtype]} "
            f"bytes, data has {view.nbytes}"
        )
    return [head, view.cast("B")]


def encode_error(code: str, message: str) -> list[Any]:
    return encode_json(Kind.ERROR, {"code": code, "message": message})


def join(buffers: list[Any]) -> bytes:
    """One bytes object from encode_* output (tests and the handshake)."""
    return b"".join(bytes(b) for b in buffers)


# -- decoding ---------------------------------------------------------------


def _parse_tensor_meta(meta: bytes, payload_len: int) -> tuple[str, tuple[int, ...]]:
    if len(meta) < 2:
        raise ProtocolError("bad_tensor", f"tensor meta is {len(meta)} bytes, need 2+")
    code, ndim = _TENSOR_META.unpack_from(meta)
    if code not in DTYPE_NAMES:
        raise ProtocolError("bad_tensor", f"unknown dtype code {code}")
    if ndim > MAX_TENSOR_NDIM or len(meta) != 2 + 4 * ndim:
        raise ProtocolError(
            "bad_tensor",
            f"tensor meta of {len(meta)} bytes does not hold {ndim} dimensions",
        )
    shape = struct.unpack_from(f"<{ndim}I", meta, 2)
    dtype = DTYPE_NAMES[code]
    expected = math.prod(shape) * ITEMSIZE[dtype]
    if expected != payload_len:
        raise ProtocolError(
            "bad_tensor",
            f"{dtype} tensor of shape {shape} needs {expected} bytes, "
            f"frame carries {payload_len}",
        )
    return dtype, shape


def _parse_json_meta(kind: int, meta: bytes) -> dict[str, Any]:
    try:
        body = json.loads(meta.decode("utf-8")) if meta else {}
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(
            "bad_meta", f"kind {kind} meta is not JSON: {type(exc).__name__}"
        ) from None
    if not isinstance(body, dict):
        raise ProtocolError(
            "bad_meta",
            f"kind {kind} meta must be a JSON object, got {type(body).__name__}",
        )
    return body


class FrameReader:
    """Incremental frame decoder.

    Two ways to give it bytes: `feed(data)` (copies), or the zero-copy pair
    `get_buffer()` / `buffer_filled(n)` used by asyncio.BufferedProtocol:
    the transport receives straight into the memory the reader lends.

    `authenticated` starts False: until the owner sets it, only handshake
    kinds are accepted and limits are the handshake's.
    """

    def __init__(self) -> None:
        self.authenticated = False
        self._staging = aligned_buffer(STAGING_BYTES)
        self._start = 0  # first unconsumed byte in staging
        self._end = 0  # one past the last received byte in staging
        # A large payload being received directly into its own buffer.
        self._direct: memoryview | None = None
        self._direct_filled = 0
        self._pending: Message | None = None
        self._arena = _Arena()

    # zero-copy interface ---------------------------------------------------

    def get_buffer(self) -> memoryview:
        """Writable memory for the next received bytes (never empty)."""
        if self._direct is not None:
            return self._direct[self._direct_filled :]
        if self._end == STAGING_BYTES:
            self._compact()
        return self._staging[self._end :]

    def buffer_filled(self, nbytes: int) -> list[Message]:
        """Report that nbytes were written into the last get_buffer()."""
        out: list[Message] = []
        if self._direct is not None:
            self._direct_filled += nbytes
            if self._direct_filled < self._direct.nbytes:
                return out
            msg = self._pending
            assert msg is not None
            msg.payload = self._direct
            self._direct = None
            self._pending = None
            out.append(msg)
            return out
        self._end += nbytes
        self._parse_staging(out)
        return out

    def feed(self, data: bytes | memoryview) -> list[Message]:
        """Decode from bytes the caller owns (copied into the reader)."""
        out: list[Message] = []
        view = memoryview(data).cast("B")
        while view.nbytes:
            buf = self.get_buffer()
            n = min(buf.nbytes, view.nbytes)
            buf[:n] = view[:n]
            view = view[n:]
            out.extend(self.buffer_filled(n))
        return out

    @property
    def mid_frame(self) -> bool:
        """True when part of a frame has arrived and the rest has not."""
        return self._direct is not None or self._end > self._start

    # parsing ---------------------------------------------------------------

    def _compact(self) -> None:
        remaining = self._end - self._start
        self._staging[:remaining] = self._staging[self._start : self._end]
        self._start, self._end = 0, remaining

    def resume(self) -> list[Message]:
        """Decode frames already received but held back: before
        authentication the reader stops after each message, so that the owner
        can mark the connection authenticated before the frames that follow
        WELCOME in the same read are checked (spec 4.5)."""
        out: list[Message] = []
        if self._direct is None:
            self._parse_staging(out)
        return out

    def _parse_staging(self, out: list[Message]) -> None:
        while self._end - self._start >= HEADER_SIZE:
            if out and not self.authenticated:
                return
            magic, version, kind, flags, meta_len, reserved, payload_len, tag = (
                HEADER.unpack_from(self._staging, self._start)
            )
            self._check_header(
                magic, version, kind, flags, meta_len, reserved, payload_len
            )
            body_len = (
                meta_len
                if payload_len == 0
                else _payload_offset(meta_len) - HEADER_SIZE
            )
            available = self._end - self._start - HEADER_SIZE
            if available < body_len:
                if HEADER_SIZE + body_len > STAGING_BYTES - self._start:
                    self._compact()
                return
            meta_start = self._start + HEADER_SIZE
            meta = bytes(self._staging[meta_start : meta_start + meta_len])
            msg = self._message(kind, tag, meta, payload_len)
            payload_start = meta_start + body_len
            if payload_len == 0:
                self._start = payload_start
                out.append(msg)
                continue
            if payload_len <= STAGING_BYTES // 2:
                if self._end - payload_start < payload_len:
                    if payload_start + payload_len > STAGING_BYTES:
                        self._compact()
                    return
                if self._arena.used + payload_len > ARENA_BYTES:
                    self._arena = _Arena()
                payload = self._arena.take(payload_len)
                payload[:] = self._staging[payload_start : payload_start + payload_len]
                msg.payload = payload
                self._start = payload_start + payload_len
                out.append(msg)
                continue
            # Large payload: move what already arrived, then receive the rest
            # directly into the payload's own buffer.
            payload = aligned_buffer(payload_len)
            have = min(self._end - payload_start, payload_len)
            payload[:have] = self._staging[payload_start : payload_start + have]
            self._start = payload_start + have
            if self._start == self._end:
                self._start = self._end = 0
            if have == payload_len:
                msg.payload = payload
                out.append(msg)
                continue
            self._direct, self._direct_filled, self._pending = payload, have, msg
            return
        if self._start == self._end:
            self._start = self._end = 0

    def _check_header(
        self,
        magic: bytes,
        version: int,
        kind: int,
        flags: int,
        meta_len: int,
        reserved: int,
        payload_len: int,
    ) -> None:
        if magic != MAGIC:
            raise ProtocolError("bad_magic", f"expected magic {MAGIC!r}, got {magic!r}")
        if version not in SUPPORTED_VERSIONS:
            raise ProtocolError(
                "unsupported_version",
                f"frame version {version}; this side speaks {list(SUPPORTED_VERSIONS)}",
            )
        if kind not in Kind.ALL:
            raise ProtocolError("unknown_kind", f"unknown message kind {kind}")
        if flags or reserved:
            raise ProtocolError(
                "bad_header",
                f"reserved header fields must be 0, got {flags}, {reserved}",
            )
        if not self.authenticated:
            if kind not in Kind.HANDSHAKE:
                raise ProtocolError(
                    "not_authenticated",
                    f"message kind {kind} before the handshake completed",
                )
            if meta_len > HANDSHAKE_MAX_META_BYTES or payload_len:
                raise ProtocolError(
                    "too_large",
                    f"handshake frame of {meta_len}+{payload_len} bytes exceeds "
                    f"{HANDSHAKE_MAX_META_BYTES}+0",
                )
        if meta_len > MAX_META_BYTES:
            raise ProtocolError(
                "too_large", f"meta of {meta_len} bytes exceeds {MAX_META_BYTES}"
            )
        if payload_len > MAX_PAYLOAD_BYTES:
            raise ProtocolError(
                "too_large",
                f"payload of {payload_len} bytes exceeds {MAX_PAYLOAD_BYTES}",
            )

    def _message(self, kind: int, tag: int, meta: bytes, payload_len: int) -> Message:
        if kind == Kind.TENSOR:
            dtype, shape = _parse_tensor_meta(meta, payload_len)
            return Message(kind, tag, dtype=dtype, shape=shape)
        if kind in (Kind.PING, Kind.PONG):
            if meta or payload_len:
                raise ProtocolError(
                    "bad_meta", f"kind {kind} carries no meta or payload"
                )
            return Message(kind, tag)
        body = _parse_json_meta(kind, meta)
        if payload_len and kind != Kind.STEP:
            raise ProtocolError("bad_meta", f"kind {kind} carries no payload")
        return Message(kind, tag, body)


# -- handshake ----------------------------------------------------------------


@dataclass(frozen=True)
class PeerInfo:
    """What a rank states about itself in the handshake."""

    rank: int
    world_size: int
    model_fingerprint: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "model_fingerprint": self.model_fingerprint,
        }


class HandshakeRefused(Exception):
    """The handshake failed; `code` names why, `message` is for a log line.
    `remote` says whether the peer reported it (True) or this side found it."""

    def __init__(self, code: str, message: str, remote: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.remote = remote


def _transcript(
    version: int, nonce_i: bytes, nonce_r: bytes, init: PeerInfo, resp: PeerInfo
) -> bytes:
    body = json.dumps(
        [version, nonce_i.hex(), nonce_r.hex(), init.as_dict(), resp.as_dict()],
        sort_keys=True,
        separators=(",", ":"),
    )
    return body.encode()


def _proof(secret: bytes, role: bytes, transcript: bytes) -> str:
    return hmac.new(
        secret, b"tpnet proof " + role + b"\n" + transcript, hashlib.sha256
    ).hexdigest()


def _same_proof(received: str, expected: str) -> bool:
    # Compared as bytes: compare_digest refuses non-ASCII str.
    return hmac.compare_digest(received.encode("utf-8", "replace"), expected.encode())


def _field(body: dict[str, Any], name: str, kind: type, who: str) -> Any:
    value = body.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise HandshakeRefused(
            "bad_handshake", f"{who} sent {name}={value!r}, expected {kind.__name__}"
        )
    return value


def _nonce(body: dict[str, Any], who: str) -> bytes:
    text = _field(body, "nonce", str, who)
    try:
        nonce = bytes.fromhex(text)
    except ValueError:
        nonce = b""
    if len(nonce) != NONCE_BYTES:
        raise HandshakeRefused("bad_handshake", f"{who} sent a malformed nonce")
    return nonce


def _peer_info(body: dict[str, Any], who: str) -> PeerInfo:
    return PeerInfo(
        _field(body, "rank", int, who),
        _field(body, "world_size", int, who),
        _field(body, "model_fingerprint", str, who),
    )


def _check_compatible(local: PeerInfo, remote: PeerInfo, who: str) -> None:
    if remote.world_size != local.world_size:
        raise HandshakeRefused(
            "world_size_mismatch",
            f"{who} runs world size {remote.world_size}, this rank {local.world_size}",
        )
    if not 0 <= remote.rank < local.world_size or remote.rank == local.rank:
        raise HandshakeRefused(
            "bad_rank",
            f"{who} claims rank {remote.rank}; this rank is {local.rank} "
            f"of {local.world_size}",
        )
    if remote.model_fingerprint != local.model_fingerprint:
        raise HandshakeRefused(
            "model_mismatch",
            f"{who} serves model {remote.model_fingerprint[:16]}, "
            f"this rank {local.model_fingerprint[:16]}",
        )


class Handshake:
    """Mutual HMAC challenge-response (protocol_spec.md section 4).

    The initiator (the dialling side) calls `start()` and sends its bytes;
    both sides pass each received handshake Message to `receive()`, send
    whatever bytes it returns, and are done when `done` is True. A refusal
    raises HandshakeRefused; `refusal_frame(exc)` is the ERROR to send back
    before closing (None when the peer itself refused).
    """

    def __init__(
        self,
        secret: bytes,
        local: PeerInfo,
        initiator: bool,
        expected_rank: int | None = None,
    ) -> None:
        self.secret = secret
        self.local = local
        self.initiator = initiator
        self.expected_rank = expected_rank
        self.remote: PeerInfo | None = None
        self.done = False
        self._nonce = os.urandom(NONCE_BYTES)
        self._state = "start" if initiator else "await_hello"
        self._transcript = b""

    def start(self, fault: str | None = None) -> bytes:
        """HELLO. With `fault`, the HELLO is only a notice that this rank
        cannot start (spec 4.6); the responder answers with ERROR."""
        assert self._state == "start"
        self._state = "await_challenge"
        body: dict[str, Any] = {
            "versions": list(SUPPORTED_VERSIONS),
            "nonce": self._nonce.hex(),
        }
        body.update(self.local.as_dict())
        if fault is not None:
            body["fault"] = fault[:MAX_FAULT_CHARS]
        return join(encode_json(Kind.HELLO, body))

    def receive(self, msg: Message) -> bytes:
        if msg.kind == Kind.ERROR:
            raise HandshakeRefused(
                str(msg.meta.get("code", "refused")),
                str(msg.meta.get("message", "peer refused the handshake")),
                remote=True,
            )
        expected = {
            "await_hello": Kind.HELLO,
            "await_challenge": Kind.CHALLENGE,
            "await_proof": Kind.PROOF,
            "await_welcome": Kind.WELCOME,
        }.get(self._state)
        if msg.kind != expected:
            raise HandshakeRefused(
                "bad_handshake",
                f"expected message kind {expected} in state {self._state}, got {msg.kind}",
            )
        return getattr(self, "_on_" + self._state[6:])(msg.meta)

    def _on_hello(self, body: dict[str, Any]) -> bytes:
        versions = body.get("versions")
        common = [
            v
            for v in (versions if isinstance(versions, list) else [])
            if type(v) is int and v in SUPPORTED_VERSIONS
        ]
        if not common:
            raise HandshakeRefused(
                "unsupported_version",
                f"peer speaks protocol versions {versions!r}, "
                f"this rank {list(SUPPORTED_VERSIONS)}",
            )
        version = max(common)
        nonce_i = _nonce(body, "peer")
        remote = _peer_info(body, "peer")
        fault = body.get("fault")
        if fault is not None:
            raise HandshakeRefused(
                "peer_fault",
                f"rank {remote.rank} reports it cannot start: {str(fault)[:MAX_FAULT_CHARS]!r}",
            )
        _check_compatible(self.local, remote, f"rank {remote.rank}")
        if remote.rank < self.local.rank:
            raise HandshakeRefused(
                "bad_rank",
                f"rank {remote.rank} dialled rank {self.local.rank}; "
                "only higher ranks dial lower ones",
            )
        self.remote = remote
        self._transcript = _transcript(
            version, nonce_i, self._nonce, remote, self.local
        )
        self._state = "await_proof"
        reply = {
            "version": version,
            "nonce": self._nonce.hex(),
            "proof": _proof(self.secret, b"responder", self._transcript),
        }
        reply.update(self.local.as_dict())
        return join(encode_json(Kind.CHALLENGE, reply))

    def _on_challenge(self, body: dict[str, Any]) -> bytes:
        version = body.get("version")
        if type(version) is not int or version not in SUPPORTED_VERSIONS:
            raise HandshakeRefused(
                "unsupported_version",
                f"peer chose protocol version {version!r}; "
                f"this rank speaks {list(SUPPORTED_VERSIONS)}",
            )
        nonce_r = _nonce(body, "peer")
        remote = _peer_info(body, "peer")
        if self.expected_rank is not None and remote.rank != self.expected_rank:
            raise HandshakeRefused(
                "bad_rank",
                f"dialled rank {self.expected_rank}, peer is rank {remote.rank}",
            )
        _check_compatible(self.local, remote, f"rank {remote.rank}")
        self._transcript = _transcript(
            version, self._nonce, nonce_r, self.local, remote
        )
        proof = _field(body, "proof", str, "peer")
        if not _same_proof(proof, _proof(self.secret, b"responder", self._transcript)):
            raise HandshakeRefused(
                "auth_failed",
                f"rank {remote.rank} does not prove this rank's secret: the two "
                "ranks have different cluster secrets",
            )
        self.remote = remote
        self._state = "await_welcome"
        mine = _proof(self.secret, b"initiator", self._transcript)
        return join(encode_json(Kind.PROOF, {"proof": mine}))

    def _on_proof(self, body: dict[str, Any]) -> bytes:
        proof = _field(body, "proof", str, "peer")
        if not _same_proof(proof, _proof(self.secret, b"initiator", self._transcript)):
            raise HandshakeRefused(
                "auth_failed",
                "the peer does not prove this rank's secret: the two ranks have "
                "different cluster secrets",
            )
        self._state = "done"
        self.done = True
        return join(encode_json(Kind.WELCOME, {}))

    def _on_welcome(self, body: dict[str, Any]) -> bytes:
        self._state = "done"
        self.done = True
        return b""

    @staticmethod
    def refusal_frame(exc: HandshakeRefused) -> bytes | None:
        if exc.remote:
            return None
        return join(encode_error(exc.code, str(exc)))
