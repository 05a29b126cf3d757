"""Prefix reuse: a finished sequence's cache is kept, and a new prompt that
starts with the same tokens (the next turn of a conversation, a shared system
prompt) takes it over instead of computing those tokens again. The usage
reports them as `prompt_tokens_details.cached_tokens`. That reused caches
give the unsharded model's tokens is checked in test_equivalence.py."""

from __future__ import annotations

import time
import urllib.request

import openai
import pytest
from clusterutil import Cluster
from tinymodel import build_tiny_model

FIRST_TURN = [{"role": "user", "content": "Name one planet of the solar system."}]
WAIT_SECONDS = 30.0
IDLE_SECONDS = 1.0


def _openai(cluster: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", timeout=120)


def test_the_next_turn_of_a_conversation_reuses_the_cache_of_the_last(
    smollm_cluster,
):
    client = _openai(smollm_cluster)
    first = client.chat.completions.create(
        model="any", messages=FIRST_TURN, max_tokens=6, temperature=0
    )
    history = FIRST_TURN + [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And another one?"},
    ]

    chunks = list(
        client.chat.completions.create(
            model="any",
            messages=history,
            max_tokens=4,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )

    usage = chunks[-1].usage
    assert usage is not None
    # At least the whole first prompt came from the first turn's cache.
    assert usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    assert usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens


def _tiny_cluster(tmp_path, extra: list[str]) -> Cluster:
    folder = build_tiny_model(tmp_path / "model")
    cluster = Cluster(2, tmp_path / "logs", model=folder, extra=extra).start()
    cluster.wait_healthy()
    return cluster


def _complete(cluster: Cluster) -> dict:
    status, body = cluster.post(
        "/v1/completions",
        {
            "prompt": "The same prompt, long enough to be worth keeping: one two three",
            "max_tokens": 6,
            "temperature": 0,
        },
    )
    assert status == 200, body
    return body


def _kept(cluster: Cluster) -> int:
    return cluster.health()[1]["kept_prefixes"]


def _metric(cluster: Cluster, name: str) -> float:
    with urllib.request.urlopen(cluster.url + "/metrics", timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.fixture
def idle_cluster(tmp_path):
    cluster = _tiny_cluster(tmp_path, ["--prefix-cache-idle", str(IDLE_SECONDS)])
    try:
        yield cluster
    finally:
        cluster.stop()


def test_kept_caches_are_freed_on_every_rank_once_the_server_is_idle(idle_cluster):
    first = _complete(idle_cluster)
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert _kept(idle_cluster) == 1
    again = _complete(idle_cluster)
    reused = again["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert reused == again["usage"]["prompt_tokens"] - 1
    assert _metric(idle_cluster, "tpnet_prefix_reused_tokens_total") == reused

    deadline = time.monotonic() + WAIT_SECONDS
    while _kept(idle_cluster) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _kept(idle_cluster) == 0

    # Nothing is reused, and the worker computes the prompt from position 0
    # again: had it kept the freed slot's cache, the new sequence in that slot
    # would continue it and the text would change.
    fresh = _complete(idle_cluster)
    assert fresh["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert fresh["choices"][0]["text"] == first["choices"][0]["text"]


def test_prefix_reuse_can_be_turned_off(tmp_path):
    cluster = _tiny_cluster(tmp_path, ["--prefix-cache-rows", "0"])
    try:
        _complete(cluster)
        again = _complete(cluster)
        health = cluster.health()[1]
    finally:
        cluster.stop()

    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert health["kept_prefixes"] == 0


def test_a_cache_is_reused_only_for_at_least_8_shared_tokens(tmp_path):
    cluster = _tiny_cluster(tmp_path, [])
    first = list(range(1000, 1020))

    def cached(prompt: list[int]) -> int:
        status, body = cluster.post(
            "/v1/completions",
            {"prompt": prompt, "max_tokens": 2, "temperature": 0},
        )
        assert status == 200, body
        return body["usage"]["prompt_tokens_details"]["cached_tokens"]

    try:
        assert cached(first) == 0
        assert cached(first[:7] + list(range(2000, 2013))) == 0
        assert cached(first[:8] + list(range(3000, 3012))) == 8
        # Cut to 8 tokens and taken over, the first prompt's cache is gone;
        # the third prompt's is kept now and shares 8 tokens with the first.
        assert cached(first) == 8
    finally:
        cluster.stop()


def test_cached_tokens_count_each_prompt_once_whatever_n(tmp_path):
    cluster = _tiny_cluster(tmp_path, [])
    prompt = list(range(1000, 1040))
    body = {"prompt": prompt, "max_tokens": 3, "temperature": 0, "n": 3}
    try:
        cluster.post("/v1/completions", body)
        status, again = cluster.post("/v1/completions", body)
    finally:
        cluster.stop()

    assert status == 200, again
    usage = again["usage"]
    assert usage["prompt_tokens"] == len(prompt)
    # Some sample took over a kept cache of the whole prompt but its last
    # token; the usage counts that prompt's cached tokens once.
    assert usage["prompt_tokens_details"]["cached_tokens"] == len(prompt) - 1
