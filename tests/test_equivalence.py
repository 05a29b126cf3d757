"""Tensor parallelism changes nothing: greedy generation on 2 and 3 ranks
(real processes over loopback) gives the same tokens as the unsharded model
run by mlx-lm itself, and the same log-probabilities within a tolerance."""

from __future__ import annotations

import numpy as np
import pytest
from clusterutil import Cluster
from reference import greedy, mlx_lm_model

# Sharded sums add partial products in another order than one matmul does;
# in float32 that moves log-probabilities by about 1e-5. 2e-3 leaves room
# without hiding a wrong shard (which moves them by whole units).
LOGPROB_TOLERANCE = 2e-3
GENERATED = 32
MESSAGES = [
    {
        "role": "user",
        "content": "Write a long story about a dragon who learns to paint.",
    }
]


@pytest.fixture(scope="module")
def reference(default_spec):
    prompt = default_spec.tokenizer.apply_chat_template(MESSAGES)
    tokens, logprobs = greedy(mlx_lm_model(default_spec), prompt, GENERATED)
    assert not set(tokens) & default_spec.tokenizer.eos_token_ids, (
        "pick a longer prompt"
    )
    return tokens, logprobs


def generate_over_http(cluster: Cluster) -> list[dict]:
    status, body = cluster.post(
        "/v1/chat/completions",
        {
            "messages": MESSAGES,
            "max_tokens": GENERATED,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 3,
        },
    )
    assert status == 200, body
    assert body["choices"][0]["finish_reason"] == "length"
    return body["choices"][0]["logprobs"]["content"]


def assert_equivalent(entries: list[dict], reference, tokenizer) -> None:
    tokens, logprobs = reference
    expected = [tokenizer.decode([t]) for t in tokens]
    assert [e["token"] for e in entries] == expected
    got = np.array([e["logprob"] for e in entries])
    want = np.array([lp[t] for lp, t in zip(logprobs, tokens)])
    np.testing.assert_allclose(got, want, atol=LOGPROB_TOLERANCE)
    for entry, lp in zip(entries, logprobs):
        for alt in entry["top_logprobs"]:
            ids = tokenizer.encode(alt["token"])
            if len(ids) == 1:
                assert abs(alt["logprob"] - lp[ids[0]]) < LOGPROB_TOLERANCE


def test_two_ranks_generate_the_same_tokens_as_unsharded_mlx_lm(
    smollm_cluster, reference, default_spec
):
    entries = generate_over_http(smollm_cluster)

    assert_equivalent(entries, reference, default_spec.tokenizer)


def test_three_ranks_generate_the_same_tokens_as_unsharded_mlx_lm(
    tmp_path, reference, default_spec
):
    # Weights kept as stored: quantized matmuls over sliced packed words (the
    # two-rank test above runs the default, dequantized where OpenBLAS is).
    cluster = Cluster(3, tmp_path, extra=["--no-dequantize"]).start()
    try:
        cluster.wait_healthy()

        entries = generate_over_http(cluster)
    finally:
        cluster.stop()

    assert_equivalent(entries, reference, default_spec.tokenizer)
    assert "query heads (3, 6), KV heads (1, 2)" in cluster.log(1)
    assert "weights as stored" in cluster.log(1)


# A prompt whose cache is partly taken over from an earlier request (same
# system prompt and first words, another ending) and then wholly (the same
# prompt again) must still generate what the unsharded model generates.
REUSED = [
    {"role": "user", "content": "Write a long story about a knight who learns to cook."}
]
PRIMER = [
    {"role": "user", "content": "Write a long story about a knight who learns to swim."}
]
REUSED_GENERATED = 16


def test_a_reused_prefix_generates_the_same_tokens_as_unsharded_mlx_lm(
    smollm_cluster, default_spec
):
    tokenizer = default_spec.tokenizer
    prompt = tokenizer.apply_chat_template(REUSED)
    primer = tokenizer.apply_chat_template(PRIMER)
    shared = next(i for i, (a, b) in enumerate(zip(prompt, primer)) if a != b)
    reference = greedy(mlx_lm_model(default_spec), prompt, REUSED_GENERATED)

    status, _ = smollm_cluster.post(
        "/v1/chat/completions",
        {"messages": PRIMER, "max_tokens": 2, "temperature": 0},
    )
    assert status == 200
    cached = []
    for _ in range(2):
        status, body = smollm_cluster.post(
            "/v1/chat/completions",
            {
                "messages": REUSED,
                "max_tokens": REUSED_GENERATED,
                "temperature": 0,
                "logprobs": True,
                "top_logprobs": 3,
            },
        )
        assert status == 200, body
        cached.append(body["usage"]["prompt_tokens_details"]["cached_tokens"])
        assert_equivalent(
            body["choices"][0]["logprobs"]["content"], reference, tokenizer
        )

    # First the primer's cache, cut where the prompts part; then the whole
    # prompt but its last token (whose logits start the answer).
    assert shared <= cached[0] < len(prompt) - 1
    assert cached[1] == len(prompt) - 1
