"""GET /metrics on rank 0 reports the whole cluster in the Prometheus text
format: requests, tokens, latencies, the all-reduce, and every rank's CPU and
memory (workers report theirs over the wire)."""

from __future__ import annotations

import time
import urllib.request

from clusterutil import Cluster
from prometheus_client.parser import text_string_to_metric_families
from tinymodel import build_tiny_model


def scrape(cluster: Cluster) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(cluster.url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_cover_requests_latencies_and_every_rank(tmp_path):
    model = build_tiny_model(tmp_path / "model", hidden_size=128, num_attention_heads=4)
    cluster = Cluster(2, tmp_path / "logs", model=model).start()
    try:
        cluster.wait_healthy()
        status, body = cluster.post(
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 5,
                "logit_bias": {"0": -100, "2": -100},
            },
        )
        assert status == 200, body
        deadline = time.monotonic() + 15
        samples = scrape(cluster)
        while time.monotonic() < deadline and not value(
            samples, "tpnet_rank_memory_bytes", rank="1"
        ):
            time.sleep(0.5)
            samples = scrape(cluster)
    finally:
        cluster.stop()

    assert (
        value(
            samples,
            "tpnet_requests_total",
            endpoint="/v1/chat/completions",
            status="200",
        )
        == 1
    )
    assert value(samples, "tpnet_completion_tokens_total") == 5
    assert value(samples, "tpnet_time_to_first_token_seconds_count") == 1
    assert value(samples, "tpnet_inter_token_latency_seconds_count") == 4
    assert value(samples, "tpnet_allreduce_latency_seconds_count") > 0
    assert value(samples, "tpnet_peer_bytes_sent", peer="1") > 0
    assert value(samples, "tpnet_ranks_connected") == 2
    assert value(samples, "tpnet_rank_memory_bytes", rank="0") > 0
    assert value(samples, "tpnet_rank_memory_bytes", rank="1") > 0


def test_a_ranks_cpu_share_covers_the_time_since_the_last_report():
    from tpnet.metrics import rank_stats

    rank_stats(0)
    busy_until = time.process_time() + 0.2
    while time.process_time() < busy_until:
        pass
    stats = rank_stats(0)

    # 0.2 s of this process's CPU time went by: a fresh psutil handle per
    # call (the old bug) reports 0.0 every time.
    assert stats["cpu_percent"] > 0
    assert stats["rss_bytes"] > 0
