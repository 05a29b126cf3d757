"""Choosing the next token from a row of full-vocabulary logits (rank 0).

Order, as in common servers: logit_bias, repetition / presence / frequency
penalties, then log-probabilities for reporting, then temperature, top-k,
top-p and min-p filtering, then a draw from the request's own generator (so
the same seed gives the same output whatever else is batched with it).
Temperature 0 is greedy.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from tpnet.engine.types import SamplingParams

# Adjusted logits are clipped to this magnitude (float64 holds it easily).
LOGIT_LIMIT = 1e30


class Sampler:
    """Per-sequence sampling state: its random generator and token counts."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int]) -> None:
        self.params = params
        # The API takes signed 64-bit seeds; numpy wants them non-negative.
        seed = None if params.seed is None else params.seed % (1 << 64)
        self.rng = np.random.default_rng(seed)
        self.generated: Counter[int] = Counter()
        self.seen = set(prompt_ids)
        self._bias_ids = np.array(list(params.logit_bias), dtype=np.int64)
        self._bias_values = np.array(list(params.logit_bias.values()), dtype=np.float32)
        self._plain = not (
            params.logit_bias
            or params.repetition_penalty != 1.0
            or params.presence_penalty
            or params.frequency_penalty
        )

    def adjust(self, logits: np.ndarray) -> np.ndarray:
        """Logits after bias and penalties (a new array)."""
        p = self.params
        # float64 and a clip keep extreme penalties and biases finite.
        x = logits.astype(np.float64, copy=True)
        if self._bias_ids.size:
            valid = self._bias_ids < x.shape[0]
            x[self._bias_ids[valid]] += self._bias_values[valid]
        if p.repetition_penalty != 1.0 and self.seen:
            ids = np.fromiter(self.seen, dtype=np.int64)
            vals = x[ids]
            x[ids] = np.where(
                vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
            )
        if (p.presence_penalty or p.frequency_penalty) and self.generated:
            ids = np.fromiter(self.generated.keys(), dtype=np.int64)
            counts = np.fromiter(self.generated.values(), dtype=np.float32)
            x[ids] -= p.presence_penalty + p.frequency_penalty * counts
        return np.clip(x, -LOGIT_LIMIT, LOGIT_LIMIT)

    def choose(self, logits: np.ndarray) -> tuple[int, np.ndarray | None]:
        """The next token, and the log-probabilities it was reported against
        when the request asked for them (None otherwise)."""
        p = self.params
        if p.temperature == 0 and not p.logprobs and self._plain:
            # Greedy with nothing to adjust: the common case, kept cheap
            # because rank 0 does it for every sequence of every step.
            return int(np.argmax(logits)), None
        x = self.adjust(logits)
        token = int(np.argmax(x)) if p.temperature == 0 else self._draw(x)
        return token, self.log_softmax(x) if p.logprobs else None

    @staticmethod
    def log_softmax(x: np.ndarray) -> np.ndarray:
        return x - _logsumexp(x)

    def accept(self, token: int) -> None:
        self.generated[token] += 1
        self.seen.add(token)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """The distribution `choose` draws from (for speculative verification)."""
        p = self.params
        x = self.adjust(logits)
        if p.temperature == 0:
            out = np.zeros_like(x)
            out[int(np.argmax(x))] = 1.0
            return out
        return self._filtered_probs(x)

    def _filtered_probs(self, x: np.ndarray) -> np.ndarray:
        """The sampling distribution of adjusted logits x."""
        p = self.params
        # Shift before dividing: a tiny temperature then sends every logit
        # but the largest to -inf instead of overflowing to nan.
        with np.errstate(over="ignore"):  # -inf is the intended result
            x = (x - x.max()) / p.temperature
        if p.top_k and p.top_k < x.shape[0]:
            kth = np.partition(x, -p.top_k)[-p.top_k]
            x = np.where(x >= kth, x, -np.inf)
        probs = np.exp(x)
        probs /= probs.sum()
        if p.min_p > 0:
            probs = np.where(probs >= p.min_p * probs.max(), probs, 0.0)
        if p.top_p < 1.0:
            order = np.argsort(-probs)
            cumulative = np.cumsum(probs[order])
            keep = cumulative - probs[order] < p.top_p
            keep[0] = True  # the most likely token always stays
            mask = np.zeros_like(probs, dtype=bool)
            mask[order[keep]] = True
            probs = np.where(mask, probs, 0.0)
        return probs / probs.sum()

    def _draw(self, x: np.ndarray) -> int:
        probs = self._filtered_probs(x)
        return int(self.rng.choice(probs.shape[0], p=probs))

    def draw_from(self, probs: np.ndarray) -> int:
        return int(self.rng.choice(probs.shape[0], p=probs / probs.sum()))

    def uniform(self) -> float:
        return float(self.rng.random())


def _logsumexp(x: np.ndarray) -> float:
    m = float(x.max())
    return m + float(np.log(np.exp(x - m).sum()))


def top_alternatives(logprobs: np.ndarray, count: int) -> list[tuple[int, float]]:
    if count <= 0:
        return []
    ids = np.argpartition(-logprobs, count)[:count]
    ids = ids[np.argsort(-logprobs[ids])]
    return [(int(i), float(logprobs[i])) for i in ids]
