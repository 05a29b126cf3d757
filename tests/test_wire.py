"""Tests for tpnet.wire: frame layout, the decoder's limits and the handshake,
checked against protocol_spec.md. Everything runs in memory; bytes go in,
messages come out.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tpnet import wire
from tpnet.wire import (
    DTYPE_CODES,
    ITEMSIZE,
    MAX_META_BYTES,
    MAX_PAYLOAD_BYTES,
    FrameReader,
    Handshake,
    HandshakeRefused,
    Kind,
    Message,
    PeerInfo,
    ProtocolError,
)

REPO = Path(__file__).resolve().parent.parent
SECRET = b"cluster secret for tests, 32+ b."
FINGERPRINT = "a1" * 32
# The header of protocol_spec.md section 2.1, written out independently.
SPEC_HEADER = struct.Struct("<4sBBHIIQQ")
STAGED_PAYLOAD_LIMIT = 128 * 1024  # larger payloads take the direct path

FAST = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

JSON_KINDS = sorted(Kind.JSON_META - {Kind.STEP})


# -- helpers -------------------------------------------------------------------


def header(
    kind: int,
    meta_len: int = 0,
    payload_len: int = 0,
    tag: int = 0,
    *,
    magic: bytes = b"TPNT",
    version: int = 1,
    flags: int = 0,
    reserved: int = 0,
) -> bytes:
    return SPEC_HEADER.pack(
        magic, version, kind, flags, meta_len, reserved, payload_len, tag
    )


def raw_frame(
    kind: int, meta: bytes = b"", payload: bytes = b"", tag: int = 0
) -> bytes:
    """A frame built from the spec's layout rules, not from the encoder."""
    if not payload:
        return header(kind, len(meta), 0, tag) + meta
    pad = -(32 + len(meta)) % 64
    return header(kind, len(meta), len(payload), tag) + meta + bytes(pad) + payload


def reader(authenticated: bool = True) -> FrameReader:
    frames = FrameReader()
    frames.authenticated = authenticated
    return frames


def feed_in_pieces(frames: FrameReader, data: bytes, sizes: list[int]) -> list[Message]:
    out: list[Message] = []
    pos = 0
    for i in range(len(data)):  # at least one byte per piece: bounded
        if pos >= len(data):
            break
        size = sizes[i % len(sizes)]
        out.extend(frames.feed(data[pos : pos + size]))
        pos += size
    return out


def fill_in_pieces(frames: FrameReader, data: bytes, sizes: list[int]) -> list[Message]:
    """The zero-copy path: write at most sizes[i] bytes into each lent buffer."""
    out: list[Message] = []
    pos = 0
    for i in range(len(data)):
        if pos >= len(data):
            break
        lent = frames.get_buffer()
        assert lent.nbytes > 0, "get_buffer lent an empty buffer"
        n = min(lent.nbytes, sizes[i % len(sizes)], len(data) - pos)
        lent[:n] = data[pos : pos + n]
        out.extend(frames.buffer_filled(n))
        pos += n
    return out


def payload_bytes(msg: Message) -> bytes:
    return b"" if msg.payload is None else bytes(msg.payload)


def address(msg: Message) -> int:
    """Where the decoded payload's memory starts."""
    assert msg.payload is not None
    return int(np.frombuffer(msg.payload, np.uint8).ctypes.data)


def summary(msg: Message) -> tuple[Any, ...]:
    return (msg.kind, msg.tag, msg.meta, msg.dtype, msg.shape, payload_bytes(msg))


def decode_one(data: bytes, authenticated: bool = False) -> Message:
    (msg,) = reader(authenticated).feed(data)
    return msg


def refusal(frames: FrameReader, data: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        frames.feed(data)
    return caught.value


def peer(rank: int, world_size: int = 2, fingerprint: str = FINGERPRINT) -> PeerInfo:
    return PeerInfo(rank, world_size, fingerprint)


def initiator(rank: int = 1, secret: bytes = SECRET, **kw: Any) -> Handshake:
    expected = kw.pop("expected_rank", None)
    return Handshake(secret, peer(rank, **kw), True, expected)


def responder(rank: int = 0, secret: bytes = SECRET, **kw: Any) -> Handshake:
    return Handshake(secret, peer(rank, **kw), False)


def spec_transcript(
    version: int, nonce_i: str, nonce_r: str, init: PeerInfo, resp: PeerInfo
) -> bytes:
    """protocol_spec.md section 4.3, written out independently of wire.py."""

    def info(p: PeerInfo) -> str:
        fp = json.dumps(p.model_fingerprint)
        return (
            f'{{"model_fingerprint":{fp},"rank":{p.rank},"world_size":{p.world_size}}}'
        )

    text = f'[{version},"{nonce_i}","{nonce_r}",{info(init)},{info(resp)}]'
    return text.encode("ascii")


def spec_proof(secret: bytes, role: str, transcript: bytes) -> str:
    label = b"tpnet proof " + role.encode() + b"\n"
    return hmac.new(secret, label + transcript, hashlib.sha256).hexdigest()


def hello_frame(**overrides: Any) -> bytes:
    body: dict[str, Any] = {
        "versions": [1],
        "nonce": "11" * 32,
        "rank": 1,
        "world_size": 2,
        "model_fingerprint": FINGERPRINT,
    }
    body.update(overrides)
    return wire.join(wire.encode_json(Kind.HELLO, body))


def challenge_to(hs: Handshake, **overrides: Any) -> bytes:
    """A CHALLENGE a responder (rank 0) holding SECRET would send to hs."""
    hello = decode_one(hs.start()).meta
    body: dict[str, Any] = {
        "version": 1,
        "nonce": "22" * 32,
        "rank": 0,
        "world_size": 2,
        "model_fingerprint": FINGERPRINT,
    }
    body.update(overrides)
    transcript = spec_transcript(
        1,
        hello["nonce"],
        "22" * 32,
        peer(hello["rank"], hello["world_size"], hello["model_fingerprint"]),
        peer(0),
    )
    body.setdefault("proof", spec_proof(SECRET, "responder", transcript))
    return wire.join(wire.encode_json(Kind.CHALLENGE, body))


# -- strategies ------------------------------------------------------------------

json_leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_leaves,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=5)
tags = st.integers(0, 2**64 - 1)
dtypes = st.sampled_from(sorted(DTYPE_CODES))
small_shapes = st.lists(st.integers(1, 6), max_size=wire.MAX_TENSOR_NDIM).map(tuple)
# Over 128 KiB for every dtype of 2+ bytes, and for uint8 in the last one.
large_shapes = st.sampled_from([(40_000,), (3, 17_000), (2, 3, 140, 160)])


def tensor_bytes(dtype: str, shape: tuple[int, ...], seed: int) -> bytes:
    nbytes = math.prod(shape) * ITEMSIZE[dtype]
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=nbytes, dtype=np.uint8).tobytes()


@st.composite
def tensor_frames(draw: Any) -> tuple[bytes, tuple[Any, ...]]:
    """Tensors of one element or more: zero-size ones break the stream
    today (see the bug tests) and are tested there and with spec-built frames."""
    dtype = draw(dtypes)
    shape = draw(small_shapes | large_shapes)
    tag = draw(tags)
    data = tensor_bytes(dtype, shape, draw(st.integers(0, 2**32)))
    frame = wire.join(wire.encode_tensor(tag, dtype, shape, data))
    return frame, (Kind.TENSOR, tag, {}, dtype, shape, data)


@st.composite
def json_frames(
    draw: Any, kinds: list[int] = JSON_KINDS
) -> tuple[bytes, tuple[Any, ...]]:
    kind = draw(st.sampled_from(kinds))
    body, tag = draw(json_objects), draw(tags)
    frame = wire.join(wire.encode_json(kind, body, tag))
    return frame, (kind, tag, body, "", (), b"")


@st.composite
def step_frames(draw: Any) -> tuple[bytes, tuple[Any, ...]]:
    body, tag = draw(json_objects), draw(tags)
    # A zero-length payload is left out: see the zero-size tensor bug tests.
    payload = draw(st.none() | st.binary(min_size=1, max_size=300))
    frame = wire.join(wire.encode_json(Kind.STEP, body, tag, payload))
    return frame, (Kind.STEP, tag, body, "", (), payload or b"")


@st.composite
def ping_frames(
    draw: Any, kinds: tuple[int, ...] = (Kind.PING, Kind.PONG)
) -> tuple[bytes, tuple[Any, ...]]:
    kind, tag = draw(st.sampled_from(kinds)), draw(tags)
    return wire.join(wire.encode_frame(kind, tag=tag)), (kind, tag, {}, "", (), b"")


def frames_of(kind: int) -> st.SearchStrategy[tuple[bytes, tuple[Any, ...]]]:
    if kind == Kind.TENSOR:
        return tensor_frames()
    if kind == Kind.STEP:
        return step_frames()
    if kind in (Kind.PING, Kind.PONG):
        return ping_frames((kind,))
    return json_frames([kind])


any_frame = json_frames() | step_frames() | ping_frames() | tensor_frames()
piece_sizes = st.lists(st.integers(1, 70_000), min_size=1, max_size=12)


# -- the spec's examples -----------------------------------------------------------


def test_the_encoder_writes_the_example_frames_of_spec_section_2_4() -> None:
    values = np.array([1.0, -2.0], dtype=np.float32)
    tensor_meta, tensor_data = bytes.fromhex("010102000000"), values.tobytes()
    spec_tensor = header(8, 6, 8, 3) + tensor_meta + bytes(26) + tensor_data

    ping = wire.join(wire.encode_frame(Kind.PING, tag=7))
    tensor = wire.join(wire.encode_tensor(3, "float32", (2,), values))
    control = wire.join(wire.encode_json(Kind.CONTROL, {"type": "stats"}))

    assert ping == header(6, tag=7)
    assert tensor == spec_tensor
    assert tensor_data == bytes.fromhex("0000803f000000c0")
    assert control == header(10, 16) + b'{"type":"stats"}'


def test_frames_built_from_the_spec_alone_decode() -> None:
    data = (
        raw_frame(Kind.PING, tag=5)
        + raw_frame(
            Kind.TENSOR, b"\x04\x01\x02\x00\x00\x00", b"\x01\0\0\0\x02\0\0\0", 9
        )
        + raw_frame(Kind.STEP, b'{"op":"decode"}', b"xyz", 2)
    )

    ping, tensor, step = reader().feed(data)

    assert (ping.kind, ping.tag) == (Kind.PING, 5)
    assert tensor.array().tolist() == [1, 2] and tensor.tag == 9
    assert step.meta == {"op": "decode"} and payload_bytes(step) == b"xyz"


# -- round trips -------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(Kind.ALL))
@settings(FAST, max_examples=12)
@given(data=st.data())
def test_every_message_kind_survives_a_round_trip(
    kind: int, data: st.DataObject
) -> None:
    frame, expected = data.draw(frames_of(kind))
    frames = reader()

    (msg,) = frames.feed(frame)

    assert summary(msg) == expected


@FAST
@given(tensor_frames())
def test_a_decoded_tensor_views_as_an_array_of_its_dtype_and_shape(
    sent: tuple[bytes, tuple[Any, ...]],
) -> None:
    data, (_, _, _, dtype, shape, raw) = sent

    array = decode_one(data, authenticated=True).array()

    assert array.shape == shape
    assert array.dtype.itemsize == ITEMSIZE[dtype]
    assert array.tobytes() == raw


@FAST
@given(st.sampled_from(sorted(Kind.HANDSHAKE)), json_objects)
def test_handshake_kinds_decode_before_authentication(
    kind: int, body: dict[str, Any]
) -> None:
    data = wire.join(wire.encode_json(kind, body))

    msg = decode_one(data, authenticated=False)

    assert (msg.kind, msg.meta) == (kind, body)


@FAST
@given(st.lists(any_frame, min_size=1, max_size=6), piece_sizes)
def test_a_stream_cut_anywhere_decodes_the_same_through_feed(
    sent: list[tuple[bytes, tuple[Any, ...]]], sizes: list[int]
) -> None:
    data = b"".join(frame for frame, _ in sent)
    frames = reader()

    got = feed_in_pieces(frames, data, sizes)

    assert [summary(m) for m in got] == [expected for _, expected in sent]
    assert not frames.mid_frame


@FAST
@given(st.lists(any_frame, min_size=1, max_size=6), piece_sizes)
def test_a_stream_cut_anywhere_decodes_the_same_through_lent_buffers(
    sent: list[tuple[bytes, tuple[Any, ...]]], sizes: list[int]
) -> None:
    data = b"".join(frame for frame, _ in sent)
    frames = reader()

    got = fill_in_pieces(frames, data, sizes)

    assert [summary(m) for m in got] == [expected for _, expected in sent]
    assert not frames.mid_frame


def test_a_large_payload_arriving_in_pieces_is_received_in_place() -> None:
    data = tensor_bytes("float32", (50_000,), seed=3)
    frame = wire.join(wire.encode_tensor(1, "float32", (50_000,), data))
    frames = reader()
    fill_in_pieces(frames, frame[:4096], [4096])

    lent = frames.get_buffer()
    lent_address = np.frombuffer(lent, np.uint8).ctypes.data
    (msg,) = fill_in_pieces(frames, frame[4096:], [len(frame)])

    payload_end = address(msg) + len(data)
    assert lent.nbytes == len(frame) - 4096
    assert lent_address + lent.nbytes == payload_end
    assert payload_bytes(msg) == data


@pytest.mark.parametrize("nbytes", [1, 100, STAGED_PAYLOAD_LIMIT, 300_000])
@pytest.mark.parametrize("offset", [0, 1, 37])
def test_decoded_payloads_start_on_a_64_byte_boundary(nbytes: int, offset: int) -> None:
    # A JSON frame of `offset`-dependent length first puts the tensor at an
    # odd position in the stream.
    lead = wire.join(wire.encode_json(Kind.CONTROL, {"pad": "x" * offset}))
    data = tensor_bytes("uint8", (nbytes,), seed=nbytes)
    step = wire.join(wire.encode_json(Kind.STEP, {}, 0, data))
    tensor = wire.join(wire.encode_tensor(0, "uint8", (nbytes,), data))

    _, step_msg, tensor_msg = reader().feed(lead + step + tensor)

    for msg in (step_msg, tensor_msg):
        assert address(msg) % 64 == 0
        assert payload_bytes(msg) == data


# -- arbitrary and hostile input ------------------------------------------------


def decode_anything(data: bytes, authenticated: bool, sizes: list[int]) -> None:
    for feeding in (feed_in_pieces, fill_in_pieces):
        try:
            feeding(reader(authenticated), data, sizes)
        except ProtocolError:
            pass


@FAST
@given(st.binary(max_size=3000), st.booleans(), piece_sizes)
def test_arbitrary_bytes_raise_nothing_but_protocol_error(
    data: bytes, authenticated: bool, sizes: list[int]
) -> None:
    decode_anything(data, authenticated, sizes)


@FAST
@given(
    st.lists(any_frame, min_size=1, max_size=3),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
    st.integers(0, 10**6),
    st.booleans(),
    piece_sizes,
)
def test_valid_frames_with_edited_bytes_raise_nothing_but_protocol_error(
    sent: list[tuple[bytes, tuple[Any, ...]]],
    edits: list[tuple[int, int]],
    cut: int,
    authenticated: bool,
    sizes: list[int],
) -> None:
    data = bytearray(b"".join(frame for frame, _ in sent))
    for position, value in edits:
        data[position % len(data)] = value
    del data[len(data) - cut % (len(data) + 1) :]

    decode_anything(bytes(data), authenticated, sizes)


@pytest.mark.parametrize(
    ("head", "code"),
    [
        (header(Kind.PING, magic=b"TPNX"), "bad_magic"),
        (header(Kind.PING, magic=b"\0\0\0\0"), "bad_magic"),
        (header(Kind.PING, version=0), "unsupported_version"),
        (header(Kind.PING, version=2), "unsupported_version"),
        (header(0), "unknown_kind"),
        (header(11), "unknown_kind"),
        (header(255), "unknown_kind"),
        (header(Kind.PING, flags=1), "bad_header"),
        (header(Kind.PING, reserved=1 << 31), "bad_header"),
    ],
)
@pytest.mark.parametrize("authenticated", [False, True])
def test_a_malformed_header_is_refused_on_its_32_bytes(
    head: bytes, code: str, authenticated: bool
) -> None:
    frames = reader(authenticated)

    error = refusal(frames, head)

    assert error.code == code


@pytest.mark.parametrize(
    "kind", [Kind.PING, Kind.PONG, Kind.TENSOR, Kind.STEP, Kind.CONTROL]
)
def test_a_non_handshake_kind_before_authentication_is_refused(kind: int) -> None:
    frames = reader(authenticated=False)

    error = refusal(frames, header(kind, 2))

    assert error.code == "not_authenticated"
    assert str(kind) in str(error)


@pytest.fixture
def allocations(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes passed to wire.aligned_buffer while the test runs; a test clears
    it after making its reader, whose staging buffer is recorded too."""
    sizes: list[int] = []
    real = wire.aligned_buffer

    def spy(nbytes: int) -> memoryview:
        sizes.append(nbytes)
        return real(nbytes)

    monkeypatch.setattr(wire, "aligned_buffer", spy)
    return sizes


@pytest.mark.parametrize(
    ("authenticated", "meta_len", "payload_len"),
    [
        (False, 0, 200 * 1024 * 1024),  # any payload before the handshake
        (False, 0, 1),
        (False, wire.HANDSHAKE_MAX_META_BYTES + 1, 0),
        (True, MAX_META_BYTES + 1, 0),
        (True, 0, MAX_PAYLOAD_BYTES + 1),
        (True, 2**32 - 1, 2**64 - 1),
    ],
)
def test_an_oversized_frame_is_refused_on_its_header_before_any_allocation(
    authenticated: bool, meta_len: int, payload_len: int, allocations: list[int]
) -> None:
    frames = reader(authenticated)
    kind = Kind.STEP if authenticated else Kind.HELLO
    allocations.clear()

    error = refusal(frames, header(kind, meta_len, payload_len))

    assert error.code == "too_large"
    assert allocations == []


def test_frames_at_the_limits_are_accepted() -> None:
    step = raw_frame(Kind.STEP, b"{}" + b" " * (MAX_META_BYTES - 2), b"p")
    hello = raw_frame(Kind.HELLO, b"{}" + b" " * (wire.HANDSHAKE_MAX_META_BYTES - 2))

    (step_msg,) = reader(authenticated=True).feed(step)
    (hello_msg,) = reader(authenticated=False).feed(hello)

    assert step_msg.meta == {} and payload_bytes(step_msg) == b"p"
    assert hello_msg.meta == {}


def test_a_tensor_whose_shape_disagrees_with_its_length_is_refused_before_allocation(
    allocations: list[int],
) -> None:
    frames = reader()
    allocations.clear()
    meta = struct.pack("<BBI", DTYPE_CODES["float32"], 1, 10)
    head = header(Kind.TENSOR, len(meta), 200 * 1024 * 1024)

    error = refusal(frames, head + meta + bytes(64 - 32 - len(meta)))

    assert error.code == "bad_tensor"
    assert "40" in str(error) and str(200 * 1024 * 1024) in str(error)
    assert allocations == []


@pytest.mark.parametrize(
    ("meta", "payload_len"),
    [
        (b"", 0),  # shorter than dtype + ndim
        (b"\x01", 0),
        (b"\x00\x00", 4),  # dtype code 0 is unassigned
        (b"\x08\x00", 4),  # so is 8
        (b"\x01\x09" + b"\x01\0\0\0" * 9, 4),  # more than MAX_TENSOR_NDIM
        (b"\x01\x02\x01\0\0\0", 4),  # ndim 2, one dimension given
        (b"\x01\x01\x01\0\0\0\0", 4),  # a trailing byte
        (b"\x01\x01\x02\0\0\0", 4),  # float32 (2,) needs 8 bytes
        (b"\x05\x00", 4),  # an int64 scalar needs 8 bytes
    ],
)
def test_a_tensor_whose_dtype_shape_and_length_disagree_is_refused(
    meta: bytes, payload_len: int
) -> None:
    frames = reader()

    error = refusal(frames, raw_frame(Kind.TENSOR, meta, b"\0" * payload_len))

    assert error.code == "bad_tensor"


@pytest.mark.parametrize(
    "meta",
    [b"{", b"not json", b"\xff\xfe{}", b'{"a":1} x', b"\xef\xbb\xbf{}"],
)
@pytest.mark.parametrize("kind", [Kind.HELLO, Kind.ERROR, Kind.STEP, Kind.CONTROL])
def test_meta_that_is_not_json_is_refused(meta: bytes, kind: int) -> None:
    frames = reader(authenticated=kind not in Kind.HANDSHAKE)

    error = refusal(frames, raw_frame(kind, meta))

    assert error.code == "bad_meta"


@pytest.mark.parametrize("meta", [b"[]", b"1", b'"text"', b"null", b"true"])
def test_json_meta_that_is_not_an_object_is_refused(meta: bytes) -> None:
    frames = reader()

    error = refusal(frames, raw_frame(Kind.CONTROL, meta))

    assert error.code == "bad_meta"
    assert "object" in str(error)


@pytest.mark.parametrize(
    ("kind", "meta", "payload"),
    [
        (Kind.PING, b"{}", b""),
        (Kind.PONG, b"", b"x"),
        (Kind.CONTROL, b"{}", b"x"),
        (Kind.ERROR, b"{}", b"x"),
    ],
)
def test_meta_or_payload_on_a_kind_that_carries_none_is_refused(
    kind: int, meta: bytes, payload: bytes
) -> None:
    frames = reader()

    error = refusal(frames, raw_frame(kind, meta, payload))

    assert error.code == "bad_meta"


def test_an_empty_json_meta_reads_as_an_empty_object() -> None:
    frames = reader()

    (msg,) = frames.feed(raw_frame(Kind.CONTROL))

    assert msg.meta == {}


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0,) * wire.MAX_TENSOR_NDIM])
def test_a_zero_size_tensor_built_to_the_spec_decodes_to_its_dtype_and_shape(
    shape: tuple[int, ...],
) -> None:
    meta = struct.pack(f"<BB{len(shape)}I", DTYPE_CODES["int64"], len(shape), *shape)
    ping = raw_frame(Kind.PING, tag=4)

    tensor, after = reader().feed(raw_frame(Kind.TENSOR, meta) + ping)

    assert (tensor.dtype, tensor.shape, payload_bytes(tensor)) == ("int64", shape, b"")
    assert (after.kind, after.tag) == (Kind.PING, 4)


# -- bugs found in wire.py --------------------------------------------------------


def test_a_zero_size_tensor_is_sent_without_padding() -> None:
    data = wire.join(wire.encode_tensor(1, "float32", (0,), b""))

    assert data == header(Kind.TENSOR, 6, 0, 1) + b"\x01\x01\0\0\0\0"


def test_a_zero_size_tensor_followed_by_another_frame_decodes_both() -> None:
    empty = wire.join(wire.encode_tensor(1, "float32", (0, 4), b""))
    ping = wire.join(wire.encode_frame(Kind.PING, tag=2))

    got = reader().feed(empty + ping)

    assert [(m.kind, m.tag) for m in got] == [(Kind.TENSOR, 1), (Kind.PING, 2)]


def test_a_step_with_an_empty_payload_followed_by_another_frame_decodes_both() -> None:
    step = wire.join(wire.encode_json(Kind.STEP, {"op": "x"}, 0, b""))
    ping = wire.join(wire.encode_frame(Kind.PING, tag=2))

    got = reader().feed(step + ping)

    assert [m.kind for m in got] == [Kind.STEP, Kind.PING]


def test_a_decoded_zero_size_tensor_views_as_an_empty_array() -> None:
    msg = decode_one(raw_frame(Kind.TENSOR, b"\x01\x02\0\0\0\0\x03\0\0\0"), True)

    array = msg.array()

    assert array.shape == (0, 3) and array.dtype == np.float32


def test_a_zero_size_array_with_several_dimensions_can_be_encoded() -> None:
    empty = np.zeros((0, 3), dtype=np.float32)

    data = wire.join(wire.encode_tensor(1, "float32", (0, 3), empty))

    assert decode_one(data, True).shape == (0, 3)


@pytest.mark.parametrize(
    ("authenticated", "kind", "depth"),
    [(False, Kind.HELLO, 2000), (True, Kind.CONTROL, 30_000)],
)
def test_deeply_nested_json_meta_is_refused_as_bad_meta(
    authenticated: bool, kind: int, depth: int
) -> None:
    frames = reader(authenticated)
    meta = b"[" * depth + b"]" * depth

    error = refusal(frames, raw_frame(kind, meta))

    assert error.code == "bad_meta"


def test_frames_right_after_welcome_in_the_same_read_decode_once_authenticated() -> (
    None
):
    frames = reader(authenticated=False)
    welcome = wire.join(wire.encode_json(Kind.WELCOME, {}))
    step = wire.join(wire.encode_json(Kind.STEP, {"op": "decode"}))

    first = frames.feed(welcome + step)
    frames.authenticated = True
    later = frames.buffer_filled(0)

    assert [m.kind for m in first] == [Kind.WELCOME]
    assert [m.kind for m in later] == [Kind.STEP]


def test_a_non_ascii_proof_is_refused_as_auth_failed_by_the_responder() -> None:
    hs = responder()
    hs.receive(decode_one(hello_frame()))
    forged = wire.join(wire.encode_json(Kind.PROOF, {"proof": "é" * 64}))

    with pytest.raises(HandshakeRefused) as refused:
        hs.receive(decode_one(forged))

    assert refused.value.code == "auth_failed"


def test_a_non_ascii_proof_is_refused_as_auth_failed_by_the_initiator() -> None:
    hs = initiator()
    challenge = challenge_to(hs, proof="ü")

    with pytest.raises(HandshakeRefused) as refused:
        hs.receive(decode_one(challenge))

    assert refused.value.code == "auth_failed"


def test_the_responder_picks_the_highest_version_both_sides_speak(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(wire, "SUPPORTED_VERSIONS", (1, 2))
    monkeypatch.setattr(wire, "PROTOCOL_VERSION", 2)
    hs = responder()

    reply = hs.receive(decode_one(hello_frame(versions=[1])))

    assert decode_one(reply).meta["version"] == 1


def test_the_initiator_names_both_sides_versions_when_refusing_one() -> None:
    hs = initiator()
    challenge = challenge_to(hs, version=7)

    with pytest.raises(HandshakeRefused) as refused:
        hs.receive(decode_one(challenge))

    assert refused.value.code == "unsupported_version"
    assert "7" in str(refused.value) and "[1]" in str(refused.value)


# -- handshake ----------------------------------------------------------------------


def run_handshake(ini: Handshake, resp: Handshake) -> tuple[bytes, bytes]:
    """Run both sides to completion through FrameReaders; return what the
    initiator and the responder sent."""
    to_resp, to_ini = ini.start(), b""
    ini_reader, resp_reader = reader(False), reader(False)
    sent_by_ini, sent_by_resp = to_resp, b""
    for _ in range(4):  # HELLO, CHALLENGE, PROOF, WELCOME
        for msg in resp_reader.feed(to_resp):
            to_ini = resp.receive(msg)
            sent_by_resp += to_ini
        to_resp = b""
        for msg in ini_reader.feed(to_ini):
            to_resp = ini.receive(msg)
            sent_by_ini += to_resp
        to_ini = b""
        if ini.done and resp.done:
            break
    return sent_by_ini, sent_by_resp


@pytest.mark.parametrize(("dialler", "listener"), [(1, 0), (2, 0), (2, 1)])
def test_a_handshake_authenticates_each_side_to_the_other(
    dialler: int, listener: int
) -> None:
    ini = initiator(dialler, world_size=3, expected_rank=listener)
    resp = responder(listener, world_size=3)

    run_handshake(ini, resp)

    assert ini.done and resp.done
    assert ini.remote == peer(listener, 3)
    assert resp.remote == peer(dialler, 3)


def test_the_handshake_follows_the_transcript_and_proofs_of_spec_section_4_3() -> None:
    resp = responder()
    nonce_i = "ab" * 32

    challenge = decode_one(resp.receive(decode_one(hello_frame(nonce=nonce_i)))).meta
    transcript = spec_transcript(1, nonce_i, challenge["nonce"], peer(1), peer(0))
    proof = wire.join(
        wire.encode_json(
            Kind.PROOF, {"proof": spec_proof(SECRET, "initiator", transcript)}
        )
    )
    welcome = decode_one(resp.receive(decode_one(proof)))

    assert challenge["proof"] == spec_proof(SECRET, "responder", transcript)
    assert welcome.kind == Kind.WELCOME and resp.done


def test_the_initiator_refuses_a_responder_with_another_secret() -> None:
    ini = initiator(secret=SECRET)
    resp = responder(secret=b"another secret")

    with pytest.raises(HandshakeRefused) as refused:
        run_handshake(ini, resp)

    assert refused.value.code == "auth_failed"
    assert not refused.value.remote
    assert not resp.done and not ini.done


def test_the_responder_refuses_a_proof_made_with_another_secret() -> None:
    resp = responder()
    nonce_i = "cd" * 32
    challenge = decode_one(resp.receive(decode_one(hello_frame(nonce=nonce_i)))).meta
    transcript = spec_transcript(1, nonce_i, challenge["nonce"], peer(1), peer(0))
    wrong = spec_proof(b"guessed secret", "initiator", transcript)

    with pytest.raises(HandshakeRefused) as refused:
        resp.receive(
            decode_one(wire.join(wire.encode_json(Kind.PROOF, {"proof": wrong})))
        )

    assert refused.value.code == "auth_failed"
    assert not resp.done


def test_a_recorded_proof_replayed_into_a_fresh_responder_is_refused() -> None:
    sent_by_ini, _ = run_handshake(initiator(), responder())
    r = reader(False)
    hello, proof = r.feed(sent_by_ini) + r.resume()
    fresh = responder()
    fresh.receive(hello)

    with pytest.raises(HandshakeRefused) as refused:
        fresh.receive(proof)

    assert refused.value.code == "auth_failed"


def test_a_recorded_challenge_replayed_to_a_fresh_initiator_is_refused() -> None:
    _, sent_by_resp = run_handshake(initiator(), responder())
    r = reader(False)
    challenge, _ = r.feed(sent_by_resp) + r.resume()
    fresh = initiator()
    fresh.start()

    with pytest.raises(HandshakeRefused) as refused:
        fresh.receive(challenge)

    assert refused.value.code == "auth_failed"


def test_a_responder_proof_reflected_back_as_a_proof_is_refused() -> None:
    resp = responder()
    challenge = decode_one(resp.receive(decode_one(hello_frame()))).meta
    reflected = wire.encode_json(Kind.PROOF, {"proof": challenge["proof"]})

    with pytest.raises(HandshakeRefused) as refused:
        resp.receive(decode_one(wire.join(reflected)))

    assert refused.value.code == "auth_failed"


@pytest.mark.parametrize(
    ("hello", "code", "named"),
    [
        ({"world_size": 3}, "world_size_mismatch", ["3", "2"]),
        ({"rank": 0}, "bad_rank", ["rank 0", "this rank is 0"]),
        ({"rank": 2}, "bad_rank", ["rank 2", "of 2"]),
        ({"rank": -1}, "bad_rank", ["rank -1", "of 2"]),
        ({"model_fingerprint": "ff" * 32}, "model_mismatch", ["ffff", "a1a1"]),
        ({"versions": [2, 3]}, "unsupported_version", ["[2, 3]", "[1]"]),
        ({"versions": "1"}, "unsupported_version", ["'1'", "[1]"]),
    ],
)
def test_the_responder_refuses_an_incompatible_initiator_naming_both_values(
    hello: dict[str, Any], code: str, named: list[str]
) -> None:
    resp = responder()

    with pytest.raises(HandshakeRefused) as refused:
        resp.receive(decode_one(hello_frame(**hello)))

    assert refused.value.code == code
    for value in named:
        assert value in str(refused.value)


@pytest.mark.parametrize(
    ("challenge", "code", "named"),
    [
        ({"world_size": 3}, "world_size_mismatch", ["3", "2"]),
        ({"rank": 1}, "bad_rank", ["rank 1", "this rank is 1"]),
        ({"model_fingerprint": "ee" * 32}, "model_mismatch", ["eeee", "a1a1"]),
        ({"version": 2}, "unsupported_version", ["2"]),
    ],
)
def test_the_initiator_refuses_an_incompatible_responder_naming_both_values(
    challenge: dict[str, Any], code: str, named: list[str]
) -> None:
    ini = initiator()
    data = challenge_to(ini, **challenge)

    with pytest.raises(HandshakeRefused) as refused:
        ini.receive(decode_one(data))

    assert refused.value.code == code
    for value in named:
        assert value in str(refused.value)


def test_the_initiator_refuses_a_responder_that_is_not_the_rank_it_dialled() -> None:
    ini = initiator(rank=2, world_size=3, expected_rank=1)
    resp = responder(rank=0, world_size=3)

    with pytest.raises(HandshakeRefused) as refused:
        run_handshake(ini, resp)

    assert refused.value.code == "bad_rank"
    assert "dialled rank 1" in str(refused.value) and "rank 0" in str(refused.value)


@pytest.mark.parametrize(
    "hello",
    [
        {"nonce": "zz" * 32},
        {"nonce": "11" * 31},
        {"nonce": 5},
        {"rank": True},
        {"rank": "1"},
        {"world_size": 2.0},
        {"model_fingerprint": None},
    ],
)
def test_the_responder_refuses_malformed_hello_fields(hello: dict[str, Any]) -> None:
    resp = responder()

    with pytest.raises(HandshakeRefused) as refused:
        resp.receive(decode_one(hello_frame(**hello)))

    assert refused.value.code == "bad_handshake"


def test_the_responder_refuses_a_proof_before_a_hello() -> None:
    resp = responder()
    proof = wire.join(wire.encode_json(Kind.PROOF, {"proof": "00" * 32}))

    with pytest.raises(HandshakeRefused) as refused:
        resp.receive(decode_one(proof))

    assert refused.value.code == "bad_handshake"
    assert "await_hello" in str(refused.value)


def test_the_initiator_refuses_a_welcome_before_a_challenge() -> None:
    ini = initiator()
    ini.start()
    welcome = wire.join(wire.encode_json(Kind.WELCOME, {}))

    with pytest.raises(HandshakeRefused) as refused:
        ini.receive(decode_one(welcome))

    assert refused.value.code == "bad_handshake"
    assert not ini.done


def test_a_second_hello_is_refused() -> None:
    resp = responder()
    resp.receive(decode_one(hello_frame()))

    with pytest.raises(HandshakeRefused) as refused:
        resp.receive(decode_one(hello_frame()))

    assert refused.value.code == "bad_handshake"


def test_a_handshake_message_after_completion_is_refused() -> None:
    ini, resp = initiator(), responder()
    run_handshake(ini, resp)

    with pytest.raises(HandshakeRefused) as refused:
        resp.receive(decode_one(hello_frame()))

    assert refused.value.code == "bad_handshake"


def test_an_error_from_the_peer_surfaces_as_a_remote_refusal() -> None:
    ini = initiator()
    ini.start()
    error = wire.join(
        wire.encode_error("model_mismatch", "rank 0 serves another model")
    )

    with pytest.raises(HandshakeRefused) as refused:
        ini.receive(decode_one(error))

    assert refused.value.remote
    assert refused.value.code == "model_mismatch"
    assert str(refused.value) == "rank 0 serves another model"
    assert Handshake.refusal_frame(refused.value) is None


def test_a_local_refusal_reaches_the_peer_as_the_same_code() -> None:
    resp = responder()
    with pytest.raises(HandshakeRefused) as local:
        resp.receive(decode_one(hello_frame(world_size=5)))
    ini = initiator()
    ini.start()

    frame = Handshake.refusal_frame(local.value)
    assert frame is not None
    with pytest.raises(HandshakeRefused) as remote:
        ini.receive(decode_one(frame))

    assert (remote.value.code, remote.value.remote) == ("world_size_mismatch", True)
    assert str(remote.value) == str(local.value)


# -- the fuzzer ------------------------------------------------------------------------


def test_the_fuzzer_runs_for_two_seconds_and_finds_nothing(tmp_path: Path) -> None:
    script = REPO / "benchmarks" / "fuzz_wire.py"
    report = tmp_path / "report.json"
    command = [sys.executable, str(script), "--seconds", "2", "--seed", "1"]
    command += ["--out", str(tmp_path), "--report", str(report)]

    result = subprocess.run(
        command, capture_output=True, text=True, timeout=120, check=False
    )

    findings = json.loads(report.read_text())["findings"] if report.exists() else []
    assert not findings, result.stdout + result.stderr
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_responder_refuses_a_lower_rank_that_dials_it() -> None:
    resp = wire.Handshake(b"s" * 32, wire.PeerInfo(1, 3, "fp"), initiator=False)
    ini = wire.Handshake(b"s" * 32, wire.PeerInfo(0, 3, "fp"), initiator=True)

    with pytest.raises(HandshakeRefused) as refused:
        resp.receive(wire.FrameReader().feed(ini.start())[0])

    assert refused.value.code == "bad_rank"
    assert "only higher ranks dial lower ones" in str(refused.value)
