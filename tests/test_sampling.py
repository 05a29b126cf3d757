"""The sampler: greedy at temperature 0, seeded draws repeat, and extreme but
valid options give finite log-probabilities instead of NaN."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tpnet.engine.sampling import Sampler
from tpnet.engine.types import SamplingParams

LOGITS = np.array([2.0, 1.0, 0.5, -1.0, 3.0], dtype=np.float32)


def test_temperature_0_picks_the_largest_logit():
    token, logprobs = Sampler(SamplingParams(temperature=0, logprobs=True), []).choose(
        LOGITS
    )

    assert token == 4
    assert np.isclose(np.exp(logprobs).sum(), 1.0)


def test_the_same_seed_draws_the_same_tokens_and_negative_seeds_work():
    def draws(seed):
        sampler = Sampler(SamplingParams(temperature=1.0, seed=seed), [])
        return [sampler.choose(LOGITS)[0] for _ in range(20)]

    assert draws(-5) == draws(-5)
    assert draws(7) == draws(7)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1e-300),
        SamplingParams(temperature=5e-324),
        SamplingParams(top_p=1e-46),
        SamplingParams(repetition_penalty=1e-300),
        SamplingParams(repetition_penalty=1e300, frequency_penalty=2.0),
        SamplingParams(logit_bias={0: 100.0, 1: -100.0}, min_p=1.0),
    ],
)
def test_extreme_options_give_a_valid_token_and_finite_logprobs(params):
    sampler = Sampler(dataclasses.replace(params, logprobs=True), prompt_ids=[0, 1, 4])
    sampler.accept(4)

    token, logprobs = sampler.choose(LOGITS)

    assert 0 <= token < LOGITS.shape[0]
    assert np.all(np.isfinite(logprobs))


def test_top_k_and_top_p_restrict_the_draws():
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=2, seed=1), [])

    tokens = {sampler.choose(LOGITS)[0] for _ in range(200)}

    assert tokens <= {0, 4}


def test_logprobs_are_only_computed_when_asked_for():
    token, logprobs = Sampler(SamplingParams(temperature=0), []).choose(LOGITS)

    assert token == 4
    assert logprobs is None
