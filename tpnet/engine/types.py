"""Typed requests and results that cross the boundary between the HTTP layer
and the engine. The engine knows token ids only; text lives in the api layer."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling options; defaults follow the OpenAI API."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: bool = False
    top_logprobs: int = 0  # alternatives reported per token when logprobs is on


@dataclass(frozen=True)
class GenerationRequest:
    """One sequence to generate. `n` > 1 in the API becomes n requests."""

    request_id: str
    prompt_ids: list[int]
    max_tokens: int | None  # None: until end of turn or the context is full
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: frozenset[int] = frozenset()
    speculative: bool = True  # a request may turn speculative decoding off


@dataclass(frozen=True)
class TokenOutput:
    """One generated token. `finish_reason` is set on the last one only:
    "stop" when an end-of-turn token was produced (that token is not part of
    the text), "length" when max_tokens or the context ran out."""

    token_id: int
    # Prompt tokens of this sequence whose cache was reused, not computed.
    cached_prompt_tokens: int = 0
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None


class EngineError(Exception):
    """Base of errors the engine reports to the api layer; `status` is the
    HTTP status the api layer should answer with."""

    status = 500
    code = "internal_error"


class ClusterUnavailable(EngineError):
    """A rank is missing: the request cannot run until the cluster re-forms."""

    status = 503
    code = "cluster_unavailable"


class QueueFull(EngineError):
    """Too many queued requests; the client should retry after a while."""

    status = 429
    code = "queue_full"


class ContextTooLong(EngineError):
    """The prompt does not fit the model's context."""

    status = 400
    code = "context_length_exceeded"
