"""Tests for tpnet.monitor: frames rendered from the text tpnet's own metrics
exporter writes, percentile estimates from histogram buckets, and `tpnet
monitor --once` against a real single-rank node and against nothing."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import time
import urllib.request
from types import SimpleNamespace

import pytest
from clusterutil import free_ports
from tinymodel import build_tiny_model

from tpnet.metrics import Metrics
from tpnet.monitor import Snapshot, buckets, parse_metrics, quantile, render, window

HEALTHY_WITHIN_SECONDS = 60
SECRET = "monitor-test-secret-0123456789abcdef"
HEALTH_OK = {
    "status": "ok",
    "ok": True,
    "world_size": 2,
    "missing_ranks": [],
    "running": 1,
    "queued": 0,
}


def exporter(completion_tokens: int, requests: int = 3) -> Metrics:
    """rank 0's exporter for a 2-rank cluster, fed like the api layer feeds it."""
    link = SimpleNamespace(bytes_sent=2_500_000)
    mesh = SimpleNamespace(links={1: link})
    collective = SimpleNamespace(
        world_size=2, latencies=collections.deque([40e-6, 45e-6, 60e-6, 150e-6])
    )
    metrics = Metrics(mesh, collective)
    metrics.engine = SimpleNamespace(
        waiting=[object()] * 2, running=[object()], steps=17
    )
    metrics.worker_stats[1] = {"cpu_percent": 55.0, "rss_bytes": 120_000_000}
    for _ in range(requests):
        metrics.request_finished(
            "/v1/chat/completions", 200, 10, completion_tokens // requests
        )
    metrics.request_finished("/v1/chat/completions", 429, 0, 0)
    for seconds in (0.02, 0.03, 0.04):
        metrics.first_token(seconds)
    for seconds in (0.008, 0.009, 0.012, 0.02):
        metrics.inter_token(seconds)
    metrics.spec_drafted.inc(40)
    metrics.spec_accepted.inc(30)
    metrics.prefix_tokens.inc(12)
    return metrics


def snapshot(metrics: Metrics, taken_at: float, health: dict | None = None) -> Snapshot:
    return Snapshot(
        url="http://127.0.0.1:8100",
        taken_at=taken_at,
        health=health or HEALTH_OK,
        healthy=(health or HEALTH_OK)["ok"],
        metrics=parse_metrics(metrics.render().decode()),
    )


def test_a_frame_shows_every_figure_of_the_exporter():
    previous = snapshot(exporter(completion_tokens=30), taken_at=100.0)
    current = snapshot(exporter(completion_tokens=90), taken_at=102.0)

    frame = render(current, previous)

    assert "health       ok" in frame
    assert "2 of 2 connected; missing none" in frame
    rank1 = next(line for line in frame.splitlines() if line.startswith("rank 1"))
    assert rank1.split() == [
        "rank",
        "1",
        "connected",
        "55.0",
        "120.0",
        "MB",
        "2.5",
        "MB",
    ]
    assert any(line.startswith("rank 0   connected") for line in frame.splitlines())
    assert "generated 30.0" in frame  # (90 - 30) tokens in 2 s
    assert "200: 3   429: 1" in frame
    assert "queue depth 2   running sequences 1   steps 17" in frame
    # 1 of 3 first tokens at or under 25 ms, 3 under 50: the median is a
    # quarter of the way into that bucket.
    assert "first token  p50   31.2 ms" in frame
    assert "all-reduce   p50" in frame
    assert "75.0% accepted (30 of 40 drafted)" in frame
    # 3 requests of 10 prompt tokens and a refused one of 0
    assert "40.0% of prompt tokens taken from kept caches (12 of 30)" in frame
    assert "\x1b" not in frame


def test_a_missing_rank_and_an_unhealthy_cluster_are_shown():
    health = {
        "status": "unavailable", "ok": False, "world_size": 2, "missing_ranks": [1],
        "error": {"message": "cluster unavailable: missing ranks [1] of world size 2"},
    }  # fmt: skip

    frame = render(snapshot(exporter(10), 1.0, health), None)

    assert "unhealthy: cluster unavailable: missing ranks [1]" in frame
    assert "1 of 2 connected; missing 1" in frame
    assert any(
        line.split()[:3] == ["rank", "1", "missing"] for line in frame.splitlines()
    )
    assert "generated -" in frame


def test_an_unreachable_cluster_renders_the_reason():
    frame = render(
        Snapshot(url="http://127.0.0.1:1", error="[Errno 111] Connection refused")
    )

    assert "unreachable: [Errno 111] Connection refused" in frame


def test_quantiles_interpolate_inside_the_bucket():
    cumulative = [(0.1, 50.0), (0.2, 100.0), (float("inf"), 100.0)]

    assert quantile(cumulative, 0.5) == pytest.approx(0.1)
    assert quantile(cumulative, 0.75) == pytest.approx(0.15)
    assert quantile([(0.1, 0.0), (float("inf"), 4.0)], 0.5) == float("inf")
    assert quantile([(0.1, 0.0), (float("inf"), 0.0)], 0.5) is None


def test_recent_percentiles_use_only_the_observations_between_refreshes():
    before = exporter(10)
    after = exporter(10)
    for _ in range(10):
        after.first_token(4.0)
    old, new = snapshot(before, 1.0), snapshot(after, 2.0)

    recent = window(
        buckets(new, "tpnet_time_to_first_token_seconds"),
        buckets(old, "tpnet_time_to_first_token_seconds"),
    )

    assert recent[-1][1] == 10
    assert quantile(recent, 0.5) == pytest.approx(2.5 + (5 - 2.5) * 0.5)
    assert "(10 in the last 1.0 s)" in render(new, old)
    assert window(recent, [(1.0, 0.0)]) == []


# -- against real processes ------------------------------------------------------------


def monitor(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tpnet", "monitor", "--once", *argv],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.fixture(scope="module")
def single_node(tmp_path_factory):
    folder = tmp_path_factory.mktemp("monitor")
    model = build_tiny_model(folder / "tiny")
    peer_port, http_port = free_ports(2)
    url = f"http://127.0.0.1:{http_port}"
    command = [
        sys.executable, "-m", "tpnet", "node", "--rank", "0",
        "--peers", f"127.0.0.1:{peer_port}", "--port", str(http_port),
        "--model", model,
    ]  # fmt: skip
    with open(folder / "rank0.log", "wb") as log:
        node = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, TPNET_SECRET=SECRET),
        )
    try:
        deadline = time.monotonic() + HEALTHY_WITHIN_SECONDS
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                if node.poll() is not None or time.monotonic() > deadline:
                    pytest.fail((folder / "rank0.log").read_text())
                time.sleep(0.3)
        yield url
    finally:
        node.terminate()
        try:
            node.wait(15)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait()


def test_monitor_once_shows_a_real_node_healthy(single_node):
    result = monitor("--url", single_node)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "health       ok  (world size 1" in result.stdout
    assert "rank 0   connected" in result.stdout


def test_monitor_once_reports_a_port_nothing_listens_on_as_unreachable():
    (port,) = free_ports(1)

    result = monitor("--url", f"http://127.0.0.1:{port}")

    assert result.returncode == 1
    assert "unreachable:" in result.stdout


def test_the_live_view_redraws_and_keeps_retrying_an_unreachable_cluster():
    (port,) = free_ports(1)
    argv = [
        sys.executable,
        "-m",
        "tpnet",
        "monitor",
        "--url",
        f"http://127.0.0.1:{port}",
    ]

    result = subprocess.run(
        argv + ["--interval", "0.2", "--duration", "1"],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode == 0
    assert result.stdout.count("\x1b[H\x1b[2J") >= 3
    assert "retrying every 0.2 s" in result.stdout
