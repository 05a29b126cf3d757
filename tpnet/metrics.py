"""Prometheus metrics of rank 0, served at GET /metrics.

Request counters and latency histograms are fed by the api layer as events
happen; cluster figures (queue depth, running sequences, all-reduce latency,
bytes sent per peer, per-rank CPU and memory) are read when scraped. Workers
send their own CPU and memory figures to rank 0 in CONTROL "stats" messages
(protocol_spec.md section 3.10), so one scrape of rank 0 covers every rank.
"""

from __future__ import annotations

import os
import time
from typing import Any

import psutil
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
ALLREDUCE_BUCKETS = (
    0.00001,
    0.00002,
    0.00005,
    0.0001,
    0.0002,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.05,
)


_this_process: psutil.Process | None = None


def _process() -> psutil.Process:
    """One psutil handle for this process: cpu_percent measures the CPU time
    since the same handle's previous call, so a new handle always says 0."""
    global _this_process
    if _this_process is None or _this_process.pid != os.getpid():
        _this_process = psutil.Process(os.getpid())
        _this_process.cpu_percent(None)  # the first call only starts the clock
    return _this_process


def rank_stats(rank: int) -> dict[str, Any]:
    """This process's CPU and memory use since the previous call, as a
    CONTROL stats body."""
    proc = _process()
    with proc.oneshot():
        stats: dict[str, Any] = {
            "type": "stats",
            "rank": rank,
            "cpu_percent": proc.cpu_percent(None),
            "rss_bytes": proc.memory_info().rss,
            "time": time.time(),
        }
    gpu = gpu_memory_bytes()
    if gpu is not None:
        stats["gpu_memory_bytes"] = gpu
    return stats


def gpu_memory_bytes() -> int | None:
    """Memory MLX holds on the GPU (Apple silicon); None without a GPU."""
    import mlx.core as mx

    try:
        if not mx.metal.is_available():
            return None
        return int(mx.get_active_memory())
    except (AttributeError, RuntimeError):
        return None


class Metrics:
    def __init__(self, mesh: Any, collective: Any) -> None:
        self.mesh = mesh
        self.collective = collective
        self.engine: Any = None
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "tpnet_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "tpnet_prompt_tokens", "Prompt tokens processed", registry=r
        )
        self.completion_tokens = Counter(
            "tpnet_completion_tokens", "Tokens generated", registry=r
        )
        self.ttft = Histogram(
            "tpnet_time_to_first_token_seconds",
            "Time to first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "tpnet_inter_token_latency_seconds",
            "Time between tokens of a stream",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.allreduce = Histogram(
            "tpnet_allreduce_latency_seconds",
            "All-reduce latency (rank 0)",
            buckets=ALLREDUCE_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("tpnet_queue_depth", "Requests waiting", registry=r)
        self.running = Gauge(
            "tpnet_running_sequences", "Sequences in the batch", registry=r
        )
        self.steps = Gauge("tpnet_steps", "Forward steps run since start", registry=r)
        self.ranks_connected = Gauge(
            "tpnet_ranks_connected", "Ranks connected, rank 0 included", registry=r
        )
        self.bytes_sent = Gauge(
            "tpnet_peer_bytes_sent",
            "Bytes rank 0 sent to each peer over its current link",
            ["peer"],
            registry=r,
        )
        self.cpu = Gauge(
            "tpnet_rank_cpu_percent", "CPU use per rank", ["rank"], registry=r
        )
        self.rss = Gauge(
            "tpnet_rank_memory_bytes", "Resident memory per rank", ["rank"], registry=r
        )
        self.gpu = Gauge(
            "tpnet_rank_gpu_memory_bytes",
            "GPU memory MLX holds per rank (Apple silicon only)",
            ["rank"],
            registry=r,
        )
        self.prefix_tokens = Counter(
            "tpnet_prefix_reused_tokens",
            "Prompt tokens whose KV cache was taken over from an earlier sequence",
            registry=r,
        )
        self.spec_accepted = Counter(
            "tpnet_speculative_accepted_tokens", "Drafted tokens accepted", registry=r
        )
        self.spec_drafted = Counter(
            "tpnet_speculative_drafted_tokens",
            "Tokens drafted for verification",
            registry=r,
        )
        self.worker_stats: dict[int, dict[str, Any]] = {}
        collective.on_latency = self.allreduce.observe
        _process()  # start the CPU clock

    # events from the api layer ------------------------------------------------

    def request_finished(
        self, endpoint: str, status: int, prompt_tokens: int, completion_tokens: int
    ) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.completion_tokens.inc(completion_tokens)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    # scrape -------------------------------------------------------------------

    def render(self) -> bytes:
        if self.engine is not None:
            self.queue_depth.set(len(self.engine.waiting))
            self.running.set(len(self.engine.running))
            self.steps.set(self.engine.steps)
        world = self.collective.world_size
        if self.mesh is not None:
            self.ranks_connected.set(1 + len(self.mesh.links))
            for rank, link in self.mesh.links.items():
                self.bytes_sent.labels(str(rank)).set(link.bytes_sent)
        else:
            self.ranks_connected.set(world)
        own = rank_stats(0)
        for rank, stats in [(0, own), *self.worker_stats.items()]:
            self.cpu.labels(str(rank)).set(stats.get("cpu_percent", 0))
            self.rss.labels(str(rank)).set(stats.get("rss_bytes", 0))
            if stats.get("gpu_memory_bytes") is not None:
                self.gpu.labels(str(rank)).set(stats["gpu_memory_bytes"])
        return generate_latest(self.registry)
