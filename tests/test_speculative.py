"""Speculative decoding: drafts verified in one tensor-parallel step give the
same text as plain decoding at temperature 0, and sampled tokens follow the
model's distribution."""

from __future__ import annotations

import urllib.request

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tpnet.engine.speculative import DraftLength, PromptLookup, accept_or_replace


def test_prompt_lookup_proposes_what_followed_the_last_trigram_before():
    tokens = [5, 6, 7, 8, 9, 10, 1, 2, 5, 6, 7]

    drafts = PromptLookup().propose(tokens, 3)

    assert drafts == [8, 9, 10]


def test_prompt_lookup_prefers_the_most_recent_match_and_needs_two_tokens():
    tokens = [1, 2, 3, 9, 1, 2, 4, 7, 1, 2]

    assert PromptLookup().propose(tokens, 2) == [4, 7]
    assert PromptLookup().propose([4, 5, 6, 5], 2) == []


def test_draft_length_grows_on_full_acceptance_and_falls_back_otherwise():
    length = DraftLength(4, maximum=6)

    length.update(4, 4)
    grown = length.current
    length.update(5, 1)

    assert grown == 5
    assert length.current == 2


@settings(max_examples=20, deadline=None)
@given(st.lists(st.floats(0.01, 1.0), min_size=2, max_size=6), st.data())
def test_rejection_sampling_keeps_the_target_distribution(weights, data):
    probs = np.array(weights) / sum(weights)
    draft = data.draw(st.integers(0, len(weights) - 1))
    rng = np.random.default_rng(0)
    draws = 20000

    counts = np.zeros(len(probs))
    for _ in range(draws):
        token = accept_or_replace(
            probs, draft, rng.random(), lambda p: int(rng.choice(len(p), p=p / p.sum()))
        )
        counts[token] += 1

    # Five standard deviations of a binomial count: fails only if biased.
    tolerance = 5 * np.sqrt(probs * (1 - probs) / draws) + 1e-3
    assert np.all(np.abs(counts / draws - probs) <= tolerance)


REPEAT_TASK = (
    "Repeat the following text exactly:\n\nThe committee met on Tuesday to review "
    "the budget. The committee agreed to fund the new library and the new park."
)


def _spec_counters(cluster) -> tuple[float, float]:
    with urllib.request.urlopen(cluster.url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("tpnet_speculative_") and "_total " in line:
            name, value = line.split(" ")
            values[name] = float(value)
    return (
        values.get("tpnet_speculative_drafted_tokens_total", 0.0),
        values.get("tpnet_speculative_accepted_tokens_total", 0.0),
    )


def test_speculative_output_equals_plain_decoding_at_temperature_0(smollm_cluster):
    body = {
        "messages": [{"role": "user", "content": REPEAT_TASK}],
        "max_tokens": 40,
        "temperature": 0,
    }
    drafted_before, accepted_before = _spec_counters(smollm_cluster)

    status_plain, plain = smollm_cluster.post(
        "/v1/chat/completions", {**body, "speculative": False}
    )
    status_spec, spec = smollm_cluster.post(
        "/v1/chat/completions", {**body, "speculative": True}
    )
    drafted, accepted = _spec_counters(smollm_cluster)

    assert status_plain == status_spec == 200
    assert spec["choices"][0]["message"] == plain["choices"][0]["message"]
    # The second request may take the first one's cache over (prefix reuse);
    # the token counts are the same.
    for usage in (spec["usage"], plain["usage"]):
        usage.pop("prompt_tokens_details")
    assert spec["usage"] == plain["usage"]
    assert drafted > drafted_before
    assert accepted > accepted_before


def test_a_draft_model_drafts_and_the_output_stays_that_of_plain_decoding(tmp_path):
    from clusterutil import Cluster
    from tinymodel import build_tiny_model

    shape = {"hidden_size": 128, "num_attention_heads": 4}
    target = build_tiny_model(tmp_path / "target", seed=11, **shape)
    # A draft that agrees with the target often: the same weights, 4-bit.
    draft = build_tiny_model(tmp_path / "draft", quantize_bits=4, seed=11, **shape)
    cluster = Cluster(
        2, tmp_path / "logs", model=target, extra=["--draft-model", draft]
    )
    body = {
        "prompt": "one two three four",
        "max_tokens": 24,
        "temperature": 0,
        "logit_bias": {"0": -100, "2": -100},
    }
    cluster.start()
    try:
        cluster.wait_healthy()
        plain = cluster.post("/v1/completions", {**body, "speculative": False})
        drafted = cluster.post("/v1/completions", {**body, "speculative": True})
        counters = _spec_counters(cluster)
    finally:
        cluster.stop()

    assert plain[0] == drafted[0] == 200
    assert drafted[1]["choices"][0]["text"] == plain[1]["choices"][0]["text"]
    assert counters[0] > 0 and counters[1] > 0
