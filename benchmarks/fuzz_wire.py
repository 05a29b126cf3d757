"""Fuzz tpnet.wire for a fixed time: the frame decoder and the handshake.

    python benchmarks/fuzz_wire.py --seconds N [--seed S] [--out DIR]

Inputs are random bytes and mutations of valid frames and of recorded
handshake transcripts: bit flips, byte edits, truncations, splices, repeated
runs, length-field and header-field edits, duplicated, dropped and swapped
frames, and JSON metas rewritten with hostile values. Each input goes to:

- a FrameReader, unauthenticated and authenticated, through `feed` and
  through the zero-copy `get_buffer`/`buffer_filled` pair, cut into pieces;
- a responder Handshake fed the initiator's side of a transcript;
- an initiator Handshake fed the responder's side.

The contract under test (protocol_spec.md section 6): bad input raises
ProtocolError or HandshakeRefused, nothing else, and decoded tensors are
consistent and 64-byte aligned. Any other exception is a finding: its input
is written to DIR with a JSON file to replay it (`--replay FILE`). Peak RSS
growth is tracked to catch allocation that grows with the input instead of
being bounded by the limits.

Exit status: 0 clean, 1 findings, 2 RSS grew past --max-rss-growth-mib.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import struct
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from tpnet import wire
from tpnet.wire import (
    FrameReader,
    Handshake,
    HandshakeRefused,
    Kind,
    Message,
    PeerInfo,
    ProtocolError,
)

EXPECTED = (ProtocolError, HandshakeRefused)
SECRET = b"fuzzing secret, 32 bytes long!!!"
FINGERPRINT = "5e" * 32
# Fixed nonces make the recorded transcripts valid for fresh Handshakes, so
# mutations reach the later states instead of failing at the first proof.
NONCE_I = bytes(range(32))
NONCE_R = bytes(range(32, 64))
HEADER = struct.Struct("<4sBBHIIQQ")  # protocol_spec.md section 2.1
INTERESTING_LENGTHS = (
    0,
    1,
    2,
    31,
    32,
    63,
    64,
    4095,
    4096,
    4097,
    wire.STAGING_BYTES // 2,
    wire.STAGING_BYTES // 2 + 1,
    wire.MAX_META_BYTES,
    wire.MAX_META_BYTES + 1,
    wire.MAX_PAYLOAD_BYTES,
    wire.MAX_PAYLOAD_BYTES + 1,
    2**31,
    2**32 - 1,
    2**63,
    2**64 - 1,
)


# -- valid material ------------------------------------------------------------


def _frame(kind: int, body: Any = None, payload: Any = None, tag: int = 0) -> bytes:
    if body is None:
        return wire.join(wire.encode_frame(kind, b"", payload, tag))
    return wire.join(wire.encode_json(kind, body, tag, payload))


def _tensor(rng: random.Random, nbytes_hint: int) -> bytes:
    dtype = rng.choice(sorted(wire.DTYPE_CODES))
    count = max(1, nbytes_hint // wire.ITEMSIZE[dtype])
    shape = rng.choice([(count,), (1, count), (count, 1), ()])
    data = np.frombuffer(
        rng.randbytes(math.prod(shape) * wire.ITEMSIZE[dtype]), np.uint8
    )
    return wire.join(wire.encode_tensor(rng.getrandbits(64), dtype, shape, data))


def _app_frames(rng: random.Random) -> list[bytes]:
    """Post-handshake frames of every kind, sizes spread over both receive
    paths (a few just over the 128 KiB staging limit)."""
    frames = [
        _frame(Kind.PING, tag=rng.getrandbits(64)),
        _frame(Kind.PONG, tag=rng.getrandbits(64)),
        _frame(Kind.CONTROL, {"type": rng.choice(["stats", "shutdown"])}),
        _frame(Kind.STEP, {"op": "decode", "seqs": [[1, 2, 3]]}, rng.randbytes(40)),
        _frame(Kind.STEP, {"op": "prefill", "seqs": []}),
        _frame(Kind.ERROR, {"code": "bad_meta", "message": "x"}),
        _tensor(rng, rng.choice([4, 64, 1000, 5000])),
    ]
    if rng.random() < 0.05:
        frames.append(_tensor(rng, wire.STAGING_BYTES // 2 + 4096))
    rng.shuffle(frames)
    frames = frames[: rng.randint(1, len(frames))]
    if rng.random() < 0.03:
        # Over the 256 KiB staging buffer in total, with frames just under
        # the staged-payload limit: exercises the reader's compaction.
        frames += [_tensor(rng, rng.randint(90_000, 131_000)) for _ in range(3)]
        big_step = {"op": "prefill", "seqs": list(range(rng.randint(8000, 11_000)))}
        frames.insert(rng.randrange(len(frames)), _frame(Kind.STEP, big_step))
    return frames


def _handshakes() -> tuple[Handshake, Handshake]:
    ini = Handshake(SECRET, PeerInfo(1, 2, FINGERPRINT), True, expected_rank=0)
    resp = Handshake(SECRET, PeerInfo(0, 2, FINGERPRINT), False)
    ini._nonce, resp._nonce = NONCE_I, NONCE_R
    return ini, resp


def _record_transcript() -> tuple[list[bytes], list[bytes]]:
    """The frames each side sends in one successful handshake."""
    ini, resp = _handshakes()
    hello = ini.start()
    challenge = resp.receive(_decode_one(hello))
    proof = ini.receive(_decode_one(challenge))
    welcome = resp.receive(_decode_one(proof))
    ini.receive(_decode_one(welcome))
    assert ini.done and resp.done
    return [hello, proof], [challenge, welcome]


def _decode_one(data: bytes) -> Message:
    (msg,) = FrameReader().feed(data)
    return msg


# -- mutations -------------------------------------------------------------------


def _split(frame: bytes) -> tuple[tuple[Any, ...], bytes, bytes]:
    fields = HEADER.unpack_from(frame)
    meta_len = fields[4]
    meta = frame[32 : 32 + meta_len]
    payload = frame[-fields[6] :] if fields[6] else b""
    return fields, meta, payload


def _rebuild(fields: tuple[Any, ...], meta: bytes, payload: bytes) -> bytes:
    magic, version, kind, flags, _, reserved, _, tag = fields
    head = HEADER.pack(
        magic, version, kind, flags, len(meta), reserved, len(payload), tag
    )
    if not payload:
        return head + meta
    return head + meta + bytes(-(32 + len(meta)) % 64) + payload


def _plausible_json(rng: random.Random) -> str:
    """A value that passes type checks, to reach the handshake's later
    checks (rank, world size, fingerprint, version, proof)."""
    choice = rng.randrange(4)
    if choice == 0:
        return str(rng.randrange(-1, 5))
    if choice == 1:
        return json.dumps(rng.choice([[1], [2], [1, 2], [], [0]]))
    if choice == 2:
        swapped = list(FINGERPRINT)
        swapped[rng.randrange(len(swapped))] = rng.choice("0123456789abcdef")
        return json.dumps("".join(swapped))
    return json.dumps(rng.randbytes(32).hex())


def _hostile_json(rng: random.Random) -> str:
    if rng.random() < 0.4:
        return _plausible_json(rng)
    depth = rng.choice([2, 50, 999, 1001, 3000, 20_000])
    choice = rng.randrange(14)
    if choice == 0:
        return "[" * depth + "]" * depth
    if choice == 1:
        return '{"a":' * depth + "1" + "}" * depth
    if choice == 2:
        return str(rng.choice([-1, 0, 1, 2, 3, 255, 2**31, 2**64, -(2**63)]))
    if choice == 3:
        return "9" * rng.choice([20, 400, 4299, 4301])
    if choice == 4:
        text = "".join(chr(rng.randrange(0x80, 0x3000)) for _ in range(64))
        return json.dumps(text, ensure_ascii=rng.random() < 0.5)
    if choice == 5:
        return json.dumps(rng.randbytes(rng.choice([31, 32, 33])).hex())
    if choice == 6:
        return json.dumps(rng.randbytes(32).hex().upper())
    if choice == 7:
        return rng.choice(["true", "false", "null", "1.0", "1e400", "NaN", "-0"])
    if choice == 8:
        return json.dumps([rng.randrange(-2, 5) for _ in range(rng.randrange(4))])
    if choice == 9:
        return json.dumps("")
    if choice == 10:
        return json.dumps({"x": [1, {"y": None}]})
    if choice == 11:
        return json.dumps("\ud800\udfff\x00" * rng.randrange(1, 4))
    if choice == 12:
        return json.dumps(" " * 64 + "a" * rng.randrange(64))
    return json.dumps(rng.randbytes(8).hex())


def _edit_json(rng: random.Random, frame: bytes) -> bytes:
    fields, meta, payload = _split(frame)
    if fields[2] not in Kind.JSON_META:
        return frame
    try:
        body = json.loads(meta) if meta else {}
    except (ValueError, RecursionError):  # an earlier mutation broke it
        return frame
    if not isinstance(body, dict):
        return frame
    pairs = {json.dumps(k): json.dumps(v) for k, v in body.items()}
    for _ in range(rng.randint(1, 3)):
        keys = list(pairs) + ['"versions"', '"nonce"', '"proof"', '"rank"']
        key = rng.choice(keys)
        if rng.random() < 0.15:
            pairs.pop(key, None)
        else:
            pairs[key] = _hostile_json(rng)
    text = "{" + ",".join(f"{k}:{v}" for k, v in pairs.items()) + "}"
    if rng.random() < 0.1:
        text = rng.choice(["[]", "1", '"s"', "", "{", text + " x"])
    return _rebuild(fields, text.encode("utf-8", "surrogatepass"), payload)


def _edit_header(rng: random.Random, frame: bytes) -> bytes:
    out = bytearray(frame)
    if len(out) < 32:
        return frame
    which = rng.randrange(6)
    if which == 0:  # meta_len
        struct.pack_into("<I", out, 8, rng.choice(INTERESTING_LENGTHS) % 2**32)
    elif which == 1:  # payload_len
        struct.pack_into("<Q", out, 16, rng.choice(INTERESTING_LENGTHS))
    elif which == 2:  # kind
        out[5] = rng.choice([0, *sorted(Kind.ALL), 11, 255])
    elif which == 3:  # version
        out[4] = rng.choice([0, 1, 2, 255])
    elif which == 4:  # flags or reserved
        offset = rng.choice([6, 12])
        out[offset] = rng.randrange(1, 256)
    else:  # a nearby length, off by a little
        offset = rng.choice([8, 16])
        size = 4 if offset == 8 else 8
        value = int.from_bytes(out[offset : offset + size], "little")
        value = max(0, value + rng.randint(-70, 70)) % 2 ** (8 * size)
        out[offset : offset + size] = value.to_bytes(size, "little")
    return bytes(out)


def _mutate_frames(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    frames = list(frames)
    for _ in range(rng.randint(0, 2)):
        op = rng.randrange(6)
        i = rng.randrange(len(frames))
        if op == 0:
            frames.insert(rng.randrange(len(frames) + 1), frames[i])  # duplicate
        elif op == 1 and len(frames) > 1:
            del frames[i]
        elif op == 2:
            j = rng.randrange(len(frames))
            frames[i], frames[j] = frames[j], frames[i]
        elif op in (3, 4):
            frames[i] = _edit_json(rng, frames[i])
        else:
            frames[i] = _edit_header(rng, frames[i])
    return frames


def _mutate_bytes(rng: random.Random, data: bytes, other: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(0, 3)):
        if not out:
            out += rng.randbytes(rng.randint(1, 64))
            continue
        op = rng.randrange(7)
        pos = rng.randrange(len(out))
        if op == 0:
            out[pos] ^= 1 << rng.randrange(8)
        elif op == 1:
            out[pos] = rng.choice([0, 0x7F, 0x80, 0xFF, rng.randrange(256)])
        elif op == 2:
            del out[pos:]
        elif op == 3 and other:  # splice in a piece of another input
            start = rng.randrange(len(other))
            out[pos:pos] = other[start : start + rng.randint(1, 200)]
        elif op == 4:  # repeat a short run many times
            run = bytes(out[pos : pos + rng.randint(1, 4)])
            out[pos:pos] = run * rng.choice([2, 16, 1500, 5000])
        elif op == 5:
            out[pos:pos] = rng.randbytes(rng.randint(1, 32))
        else:
            del out[pos : pos + rng.randint(1, 64)]
    return bytes(out)


def _pieces(rng: random.Random, nbytes: int) -> list[int]:
    if rng.random() < 0.3:
        return [max(1, nbytes)]
    return [rng.choice([1, 3, 31, 32, 33, 64, 1000, 70_000]) for _ in range(8)]


# -- targets ---------------------------------------------------------------------


def _check(msg: Message) -> None:
    """What every decoded message must satisfy (spec sections 2.3, 3.8)."""
    assert msg.kind in Kind.ALL, f"decoded unknown kind {msg.kind}"
    if msg.kind != Kind.TENSOR:
        return
    expected = math.prod(msg.shape) * wire.ITEMSIZE[msg.dtype]
    if msg.payload is None:
        assert expected == 0, f"tensor {msg.shape} arrived without its payload"
        return
    assert msg.payload.nbytes == expected, "tensor payload length disagrees"
    address = np.frombuffer(msg.payload, np.uint8).ctypes.data
    assert expected == 0 or address % wire.PAYLOAD_ALIGN == 0, "unaligned payload"


def _deliver(
    frames: FrameReader,
    data: bytes,
    pieces: list[int],
    zero_copy: bool,
    on_message: Callable[[Message], None],
) -> None:
    pos = 0
    for i in range(len(data)):  # each round moves one byte at least
        if pos >= len(data):
            return
        size = min(pieces[i % len(pieces)], len(data) - pos)
        if zero_copy:
            lent = frames.get_buffer()
            if lent.nbytes == 0:
                raise AssertionError("get_buffer lent an empty buffer")
            size = min(size, lent.nbytes)
            lent[:size] = data[pos : pos + size]
            got = frames.buffer_filled(size)
        else:
            got = frames.feed(data[pos : pos + size])
        pos += size
        for msg in got:
            on_message(msg)


def _reader_target(authenticated: bool, zero_copy: bool) -> Callable[..., None]:
    def run(data: bytes, pieces: list[int]) -> None:
        frames = FrameReader()
        frames.authenticated = authenticated
        _deliver(frames, data, pieces, zero_copy, _check)

    return run


def _handshake_target(as_initiator: bool, zero_copy: bool) -> Callable[..., None]:
    def run(data: bytes, pieces: list[int]) -> None:
        ini, resp = _handshakes()
        hs = ini if as_initiator else resp
        if as_initiator:
            hs.start()
        frames = FrameReader()

        def on_message(msg: Message) -> None:
            _check(msg)
            if hs.done:
                return  # application frames after the handshake
            try:
                hs.receive(msg)
            except HandshakeRefused as exc:
                Handshake.refusal_frame(exc)
                raise
            frames.authenticated = hs.done

        _deliver(frames, data, pieces, zero_copy, on_message)

    return run


TARGETS: dict[str, tuple[Callable[..., None], str]] = {
    # name: (runner, which corpus feeds it)
    "reader/unauth/feed": (_reader_target(False, False), "any"),
    "reader/unauth/zero-copy": (_reader_target(False, True), "any"),
    "reader/auth/feed": (_reader_target(True, False), "app"),
    "reader/auth/zero-copy": (_reader_target(True, True), "app"),
    "handshake/responder": (_handshake_target(False, False), "to_responder"),
    "handshake/responder/zero-copy": (_handshake_target(False, True), "to_responder"),
    "handshake/initiator": (_handshake_target(True, False), "to_initiator"),
    "handshake/initiator/zero-copy": (_handshake_target(True, True), "to_initiator"),
}


def _make_input(
    rng: random.Random, corpus: str, transcript: dict[str, list[bytes]]
) -> bytes:
    roll = rng.random()
    if roll < 0.08:
        return rng.randbytes(rng.randint(0, 512))
    if roll < 0.14:  # a plausible header, then noise
        head = HEADER.pack(
            b"TPNT",
            1,
            rng.randint(1, 10),
            0,
            rng.randint(0, 5000),
            0,
            rng.choice([0, rng.randint(0, 300_000)]),
            0,
        )
        return head + rng.randbytes(rng.randint(0, 512))
    if corpus == "to_responder" or (corpus == "any" and rng.random() < 0.4):
        frames = transcript["to_responder"]
        if rng.random() < 0.3:
            frames = frames + _app_frames(rng)[:1]
    elif corpus == "to_initiator":
        frames = transcript["to_initiator"]
        if rng.random() < 0.3:
            frames = frames + _app_frames(rng)
    else:
        frames = _app_frames(rng)
    frames = _mutate_frames(rng, frames)
    if rng.random() < 0.5:  # frame-level edits only: the frames stay parseable
        return b"".join(frames)
    other = b"".join(_app_frames(rng)) if rng.random() < 0.3 else b""
    return _mutate_bytes(rng, b"".join(frames), other)


def _run_case(target: str, data: bytes, pieces: list[int]) -> BaseException | None:
    try:
        TARGETS[target][0](data, pieces)
    except EXPECTED:
        return None
    except Exception as exc:
        return exc
    return None


# -- driver ----------------------------------------------------------------------


def _peak_rss_bytes() -> int:
    """The process's peak resident set so far (ru_maxrss: KiB on Linux)."""
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _where(exc: BaseException) -> str:
    """The innermost line of tpnet code the exception passed through."""
    where = "?"
    for frame in traceback.extract_tb(exc.__traceback__):
        if "/tpnet/" in frame.filename.replace("\\", "/"):
            where = f"{Path(frame.filename).name}:{frame.lineno}"
    return where


def fuzz(args: argparse.Namespace) -> int:
    out_dir = Path(args.out)
    master = random.Random(args.seed)
    recorded = _record_transcript()
    transcript = {"to_responder": recorded[0], "to_initiator": recorded[1]}
    names = list(TARGETS)
    counts: Counter[str] = Counter()
    findings: dict[tuple[str, str], dict[str, Any]] = {}

    # Warm up so imports and first-time buffers are not counted as growth.
    for name in names:
        _run_case(name, b"".join(transcript["to_responder"]), [1000])
    baseline_rss = _peak_rss_bytes()

    started = time.monotonic()
    deadline = started + args.seconds
    cases = 0
    while time.monotonic() < deadline:
        case_seed = master.getrandbits(64)
        rng = random.Random(case_seed)
        target = names[cases % len(names)]
        data = _make_input(rng, TARGETS[target][1], transcript)
        pieces = _pieces(rng, len(data))
        exc = _run_case(target, data, pieces)
        cases += 1
        counts[target] += 1
        if exc is not None:
            # One finding per exception type and place in tpnet.
            key = (type(exc).__name__, _where(exc))
            if key not in findings:
                findings[key] = _save(out_dir, len(findings), target, data, pieces, exc)
                findings[key].update(case=cases, case_seed=case_seed)
            findings[key]["count"] += 1
            findings[key]["targets"][target] = (
                findings[key]["targets"].get(target, 0) + 1
            )
    elapsed = time.monotonic() - started
    peak_rss = _peak_rss_bytes()
    growth_mib = (peak_rss - baseline_rss) / 2**20

    print(
        f"fuzz_wire: seed {args.seed}, {elapsed:.1f} s, {cases} cases, "
        f"{cases / elapsed:.0f} cases/s"
    )
    for name in names:
        print(f"  {name:32s} {counts[name]:8d} cases")
    print(
        f"  peak RSS {peak_rss / 2**20:.1f} MiB, growth {growth_mib:.1f} MiB "
        f"over the warmed-up baseline (limit {args.max_rss_growth_mib} MiB)"
    )
    for finding in findings.values():
        print(
            f"FOUND x{finding['count']} at {finding['where']}: {finding['error']}\n"
            f"  in {', '.join(finding['targets'])}\n"
            f"  input {finding['input']}; replay with: python {sys.argv[0]} "
            f"--replay {finding['replay']} (seed {args.seed}, case {finding['case']})"
        )
    if args.report:
        Path(args.report).write_text(
            json.dumps(
                {
                    "seed": args.seed,
                    "seconds": elapsed,
                    "cases": cases,
                    "cases_per_second": cases / elapsed,
                    "peak_rss_growth_mib": growth_mib,
                    "findings": list(findings.values()),
                },
                indent=1,
            )
        )
    if findings:
        return 1
    if growth_mib > args.max_rss_growth_mib:
        print(f"RSS grew by {growth_mib:.1f} MiB: unbounded allocation?")
        return 2
    print("no findings")
    return 0


def _save(
    out_dir: Path,
    index: int,
    target: str,
    data: bytes,
    pieces: list[int],
    exc: BaseException,
) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"finding-{index:03d}"
    stem.with_suffix(".bin").write_bytes(data)
    case = {
        "target": target,
        "pieces": pieces,
        "input": str(stem.with_suffix(".bin")),
        "replay": str(stem.with_suffix(".json")),
        "error": _describe(exc),
        "where": _where(exc),
        "targets": {},
        "traceback": "".join(traceback.format_exception(exc)),
        "count": 0,
    }
    stem.with_suffix(".json").write_text(json.dumps(case, indent=1))
    return case


def replay(path: str) -> int:
    case = json.loads(Path(path).read_text())
    data = Path(case["input"]).read_bytes()
    exc = _run_case(case["target"], data, case["pieces"])
    if exc is None:
        print(f"{case['target']}: no finding (fixed?)")
        return 0
    traceback.print_exception(exc)
    return 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--out", default=".tpnet/fuzz", help="where findings go")
    parser.add_argument("--report", help="write a JSON summary here")
    parser.add_argument("--max-rss-growth-mib", type=float, default=128.0)
    parser.add_argument("--replay", help="rerun one saved finding (its .json)")
    args = parser.parse_args()
    if args.replay:
        return replay(args.replay)
    if args.seed is None:
        args.seed = random.SystemRandom().getrandbits(32)
    return fuzz(args)


if __name__ == "__main__":
    sys.exit(main())
