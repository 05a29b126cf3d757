"""Speculative decoding: cheap drafts, verified by the tensor-parallel model.

A drafter proposes the next few tokens of a sequence; rank 0 sends them with
the sequence's last token in one step, so the whole cluster verifies them at
the price of one pass (two exchanges per layer) instead of one pass per
token. `verify` keeps the longest prefix the target model agrees with:
greedily that is exactly the tokens plain decoding would produce; when
sampling, rejection sampling keeps the output distributed as the target's.

Drafters:
- `PromptLookup`: the continuation of the most recent earlier occurrence of
  the last n tokens (n from 3 down to 2) in the prompt and output so far. It
  needs no model and pays off when the output repeats its input (editing,
  summarising with quotes, code).
- `DraftModel`: a small model of the same tokenizer, run unsharded on rank 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

# Longest and shortest n-gram the prompt lookup matches; a single token
# matches too often by chance to be worth a verification.
LOOKUP_MAX_NGRAM = 3
LOOKUP_MIN_NGRAM = 2
# Draft length bounds for the adaptive rule in `DraftLength`.
MAX_DRAFT = 8


class PromptLookup:
    def propose(self, tokens: list[int], count: int) -> list[int]:
        if count <= 0 or len(tokens) < LOOKUP_MIN_NGRAM + 1:
            return []
        arr = np.asarray(tokens, dtype=np.int64)
        for n in range(min(LOOKUP_MAX_NGRAM, len(arr) - 1), LOOKUP_MIN_NGRAM - 1, -1):
            pattern = arr[-n:]
            # Windows that start early enough to have a continuation.
            windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)
            hits = np.nonzero((windows == pattern).all(axis=1))[0]
            if hits.size:
                start = int(hits[-1]) + n
                return arr[start : start + count].tolist()
        return []


def accept_or_replace(
    probs: np.ndarray, draft: int, uniform: float, draw: Callable[[np.ndarray], int]
) -> int:
    """One step of rejection sampling for a deterministic drafter (whose
    proposal distribution puts all mass on `draft`): keep the draft with
    probability p(draft), else draw from p with the draft removed. The token
    returned is distributed exactly as p."""
    if uniform < probs[draft]:
        return draft
    rest = probs.copy()
    rest[draft] = 0.0
    return draw(rest)


@dataclass
class DraftLength:
    """Adaptive draft length: grows while drafts are accepted whole, falls
    back to what was accepted plus one when they are not."""

    current: int
    maximum: int = MAX_DRAFT

    def update(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return
        if accepted == drafted:
            self.current = min(self.current + 1, self.maximum)
        else:
            self.current = max(1, accepted + 1)


class DraftModel:
    """A small unsharded model on rank 0 that drafts greedily. Each sequence
    has its own cache, rebuilt from its tokens when it falls out of step."""

    def __init__(self, path: str) -> None:
        from tpnet.model.loader import load_model
        from tpnet.model.mlxlm import mlx_lm_model

        spec = load_model(path)
        self.vocab_size = spec.config.vocab_size
        self.model = mlx_lm_model(spec)
        self._caches: dict[int, tuple[list, list[int]]] = {}

    def forget(self, key: int) -> None:
        self._caches.pop(key, None)

    def propose(self, key: int, tokens: list[int], count: int) -> list[int]:
        from mlx_lm.models.cache import make_prompt_cache

        if count <= 0:
            return []
        cache, seen = self._caches.get(key, (None, []))
        # Reuse the cache while it holds a prefix of tokens; else start over.
        common = 0
        for a, b in zip(seen, tokens):
            if a != b:
                break
            common += 1
        if cache is None or common < len(seen):
            cache, seen, common = make_prompt_cache(self.model), [], 0
        feed = tokens[common:]
        out: list[int] = []
        for _ in range(count):
            logits = self.model(mx.array([feed]), cache=cache)[0, -1]
            nxt = int(mx.argmax(logits).item())
            seen = seen + feed
            out.append(nxt)
            feed = [nxt]
        # The last drafted token was not fed: the cache holds `seen`.
        self._caches[key] = (cache, seen)
        return out
