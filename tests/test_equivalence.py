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
