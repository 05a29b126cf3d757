"""Unsharded reference generation with mlx-lm's own Llama model, for the
tensor-parallel equivalence tests."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from tpnet.model.mlxlm import mlx_lm_model

__all__ = ["greedy", "mlx_lm_model"]


def greedy(
    model: nn.Module, prompt: list[int], count: int, banned: list[int] | None = None
) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens and the log-probabilities of every step; `banned` ids
    get a bias of -100 (as logit_bias does in the API), so random-weight
    models never stop early."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    tokens: list[int] = []
    logprobs: list[np.ndarray] = []
    x = mx.array([prompt])
    for _ in range(count):
        logits = np.array(model(x, cache=cache)[0, -1].astype(mx.float32))
        if banned:
            logits[banned] -= 100.0
        lp = logits - np.logaddexp.reduce(logits)
        nxt = int(np.argmax(lp))
        tokens.append(nxt)
        logprobs.append(lp)
        x = mx.array([[nxt]])
    return tokens, logprobs
