"""A cluster that never needs a reboot: dead, hung and restarted ranks, and
peers that must be refused. Every rank is a real process on loopback; every
wait is bounded."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
import urllib.request

import pytest
from clusterutil import SECRET, Cluster
from tinymodel import build_tiny_model

from tpnet import wire
from tpnet.model.loader import load_model

# Generous: a 2-core machine running the whole suite is slow to schedule.
PEER_TIMEOUT = 2.0
LOST_WITHIN = 15.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    return build_tiny_model(
        path, "llama", None, seed=3, hidden_size=128, num_attention_heads=4
    )


@pytest.fixture
def cluster(tmp_path, tiny):
    c = Cluster(2, tmp_path, model=tiny, peer_timeout=PEER_TIMEOUT).start()
    try:
        c.wait_healthy()
        yield c
    finally:
        c.stop()


class Stream:
    """A streamed chat completion read in a background thread."""

    def __init__(self, cluster: Cluster, max_tokens: int = 100000) -> None:
        body = {
            "messages": [{"role": "user", "content": "Tell me everything."}],
            "max_tokens": max_tokens,
            "stream": True,
            "logit_bias": {"0": -100, "2": -100},
        }
        self.request = urllib.request.Request(
            cluster.url + "/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        self.events: list[dict | str] = []
        self.started = threading.Event()
        self.ended = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            with urllib.request.urlopen(self.request, timeout=60) as response:
                for raw in response:
                    line = raw.decode().strip()
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    self.events.append(data if data == "[DONE]" else json.loads(data))
                    if len(self.events) >= 3:
                        self.started.set()
        except Exception as exc:  # the test inspects what arrived
            self.events.append(f"exception: {exc}")
        finally:
            self.started.set()
            self.ended.set()

    @property
    def error(self) -> dict | None:
        for event in self.events:
            if isinstance(event, dict) and "error" in event:
                return event["error"]
        return None


def chat(cluster: Cluster, max_tokens: int = 4) -> tuple[int, dict]:
    return cluster.post(
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens},
        timeout=30,
    )


def test_killing_a_worker_mid_stream_ends_the_stream_with_an_error_and_a_restart_heals(
    cluster,
):
    stream = Stream(cluster)
    assert stream.started.wait(30), stream.events

    cluster.signal(1, signal.SIGKILL)
    ended = stream.ended.wait(LOST_WITHIN)
    health = cluster.wait_status(503, LOST_WITHIN)
    refused_status, refused = chat(cluster)

    assert ended, "the stream did not end after its worker died"
    assert stream.error is not None and "rank 1" in stream.error["message"]
    assert "[DONE]" not in stream.events
    assert health["missing_ranks"] == [1]
    assert refused_status == 503 and refused["error"]["code"] == "cluster_unavailable"

    cluster.start_rank(1)
    cluster.wait_healthy(60)
    status, body = chat(cluster)
    assert status == 200, body


def test_a_hung_worker_is_declared_lost_and_rejoins_when_it_resumes(cluster):
    stream = Stream(cluster)
    assert stream.started.wait(30), stream.events

    cluster.signal(1, signal.SIGSTOP)
    started = time.monotonic()
    ended = stream.ended.wait(LOST_WITHIN)
    lost_after = time.monotonic() - started
    health = cluster.wait_status(503, LOST_WITHIN)

    assert ended, f"the stream did not end within {LOST_WITHIN} s of the worker hanging"
    assert stream.error is not None
    assert health["missing_ranks"] == [1]
    assert lost_after < LOST_WITHIN

    cluster.signal(1, signal.SIGCONT)
    cluster.wait_healthy(60)
    status, body = chat(cluster)
    assert status == 200, body


def test_a_restarted_rank_0_is_rejoined_by_its_workers(cluster):
    cluster.signal(0, signal.SIGKILL)
    cluster.procs[0].wait(10)

    cluster.start_rank(0)
    cluster.wait_healthy(60)
    status, body = chat(cluster)

    assert status == 200, body
    assert cluster.procs[1].poll() is None, "the worker must not have restarted"
    assert "rank 0 joined" in cluster.log(1).split("rank 0 lost")[-1]


def test_sigterm_on_rank_0_fails_the_stream_clearly_and_exits_0(cluster):
    stream = Stream(cluster)
    assert stream.started.wait(30), stream.events

    code = cluster.stop_rank(0)
    stream.ended.wait(10)

    assert code == 0
    assert stream.ended.is_set()
    assert stream.error is not None and "shutting down" in stream.error["message"]


def _handshake_as(
    cluster: Cluster,
    secret: bytes,
    versions: list[int] | None = None,
    fingerprint: str | None = None,
) -> dict:
    """Dial rank 0 as a would-be rank 1 and return the ERROR it answers."""
    spec = load_model(cluster.model)
    local = wire.PeerInfo(1, 2, fingerprint or spec.fingerprint)
    hs = wire.Handshake(secret, local, initiator=True, expected_rank=0)
    hello = hs.start()
    if versions is not None:
        body = dict(wire.FrameReader().feed(hello)[0].meta, versions=versions)
        hello = wire.join(wire.encode_json(wire.Kind.HELLO, body))
    reader = wire.FrameReader()
    with socket.create_connection(
        ("127.0.0.1", cluster.peer_ports[0]), timeout=10
    ) as s:
        s.sendall(hello)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            data = s.recv(65536)
            if not data:
                break
            for msg in reader.feed(data) + reader.resume():
                if msg.kind == wire.Kind.ERROR:
                    return msg.meta
                try:
                    reply = hs.receive(msg)
                except wire.HandshakeRefused as exc:
                    s.sendall(wire.Handshake.refusal_frame(exc) or b"")
                    return {"code": exc.code, "message": str(exc), "local": True}
                if reply:
                    s.sendall(reply)
    return {}


def test_a_peer_with_the_wrong_secret_is_refused_and_the_cluster_keeps_serving(cluster):
    answer = _handshake_as(cluster, b"not-the-cluster-secret-at-all!!")

    assert answer["code"] == "auth_failed"
    time.sleep(0.5)
    refusal = [line for line in cluster.log(0).splitlines() if "auth_failed" in line]
    assert len(refusal) == 1 and "127.0.0.1:" in refusal[0], cluster.log(0)
    status, body = chat(cluster)
    assert status == 200, body
    assert cluster.health()[0] == 200


def test_a_peer_speaking_another_protocol_version_is_refused_clearly(cluster):
    answer = _handshake_as(cluster, SECRET.encode(), versions=[99])

    assert answer["code"] == "unsupported_version"
    assert "[99]" in answer["message"] and "[1]" in answer["message"]
    assert cluster.health()[0] == 200


def test_a_rank_with_another_model_is_refused_on_both_sides(tmp_path, tiny):
    other = build_tiny_model(
        tmp_path / "other",
        "llama",
        None,
        seed=4,
        hidden_size=128,
        num_attention_heads=4,
    )
    c = Cluster(2, tmp_path / "logs", model=tiny)
    c.start_rank(0)
    c.start_rank(1, extra=["--model", other])
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (
            "model_mismatch" in c.log(0) and "model_mismatch" in c.log(1)
        ):
            time.sleep(0.2)
        status, health = c.health()
    finally:
        c.stop()

    assert "model_mismatch" in c.log(0), c.log(0)
    assert "model_mismatch" in c.log(1), c.log(1)
    assert status == 503 and health["missing_ranks"] == [1]


def _closed_by_server(s: socket.socket) -> bool:
    s.settimeout(0.05)
    try:
        return s.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def test_a_flood_of_silent_connections_is_refused_and_the_cluster_keeps_serving(
    cluster,
):
    sockets = []
    try:
        for _ in range(40):
            sockets.append(
                socket.create_connection(
                    ("127.0.0.1", cluster.peer_ports[0]), timeout=5
                )
            )
        time.sleep(1.0)
        closed_at_once = sum(_closed_by_server(s) for s in sockets)
        status, body = chat(cluster)
        time.sleep(6.0)  # past the handshake timeout
        closed_later = sum(_closed_by_server(s) for s in sockets)
    finally:
        for s in sockets:
            s.close()

    assert closed_at_once >= 40 - 16, "connections over the pending limit stay open"
    assert closed_later == 40, "silent connections outlive the handshake timeout"
    assert status == 200, body
    assert cluster.health()[0] == 200
    assert "handshakes already pending" in cluster.log(0)


def test_one_request_with_extreme_sampling_options_disturbs_no_other(cluster):
    stream = Stream(cluster, max_tokens=200)
    assert stream.started.wait(30), stream.events

    answers = [
        cluster.post(
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "x"}],
                "max_tokens": 3,
                **options,
            },
            timeout=60,
        )
        for options in (
            {"temperature": 1e-300},
            {"top_p": 1e-46},
            {"repetition_penalty": 1e-300, "logprobs": True, "top_logprobs": 2},
            {"seed": -1},
        )
    ]
    stream.ended.wait(60)

    assert [status for status, _ in answers] == [200, 200, 200, 200], answers
    assert stream.error is None, stream.error
    assert "[DONE]" in stream.events


def test_a_rank_that_cannot_load_its_model_exits_2_and_rank_0_says_so(tmp_path, tiny):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    c = Cluster(2, tmp_path / "logs", model=tiny)
    c.start_rank(0)
    try:
        c.wait_status(503, 60)
        worker = c.start_rank(1, extra=["--model", str(broken)])
        code = worker.wait(60)
        health = c.wait_status(503, 10)
    finally:
        c.stop()

    assert code == 2
    assert "cannot load the model" in c.log(1)
    assert "rank 1 reports it cannot start" in c.log(0)
    assert any("cannot load the model" in n for n in health["fault_notices"]), health
