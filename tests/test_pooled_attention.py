"""Decode attention over the pooled KV cache, checked in-process against
each sequence run on its own.

The pool hands out rows lowest first, so after sequences come and go the
rows of a step are out of order and some rows between them are free. Decode
attention then either reads the pool's rows in place (queries put in row
order, a dummy query for a free row) or, with many free rows, gathers the
rows in use. Both must give each sequence exactly what it gets alone.
"""

from __future__ import annotations

import asyncio

import mlx.core as mx
import numpy as np
import pytest
from tinymodel import build_tiny_model

from tpnet.model import llama
from tpnet.model.llama import Segment, ShardedModel
from tpnet.model.loader import load_model
from tpnet.model.shard import mlp_unit_for, plan_shard

# Batched and single-sequence matmuls may add in a different order.
ATOL = 1e-4
DECODE_STEPS = 3


async def _no_exchange(x: mx.array) -> mx.array:
    return x


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> ShardedModel:
    folder = build_tiny_model(tmp_path_factory.mktemp("pool"), num_hidden_layers=2)
    spec = load_model(folder, with_tokenizer=False)
    plan = plan_shard(spec.config, 0, 1, mlp_unit=mlp_unit_for(spec))
    return ShardedModel(spec, plan, _no_exchange)


def _run(model: ShardedModel, tokens: list[int], segments: list[Segment], cache):
    async def go() -> mx.array:
        hidden = await model.forward(mx.array(tokens, dtype=mx.int32), segments, cache)
        return model.logits(hidden)

    out = asyncio.run(go())
    mx.eval(out)
    return np.array(out)


def _prompts(count: int) -> list[list[int]]:
    rng = np.random.default_rng(7)
    return [
        [int(t) for t in rng.integers(10, 40000, size=int(rng.integers(3, 20)))]
        for _ in range(count)
    ]


def _alone(model: ShardedModel, prompt: list[int], feed: list[int]) -> list[np.ndarray]:
    """Logits of each fed token, the sequence alone in a fresh cache."""
    cache = model.new_cache()
    cache.open(0)
    cache.reserve(len(prompt) + len(feed))
    _run(model, prompt, [Segment(0, len(prompt), 0, 0)], cache)
    cache.length[0] = len(prompt)
    out = []
    for token in feed:
        offset = cache.length[0]
        out.append(_run(model, [token], [Segment(0, 1, 0, offset)], cache)[0])
        cache.length[0] = offset + 1
    return out


def _batched(
    model: ShardedModel,
    prompts: list[list[int]],
    live: list[int],
    feed: list[list[int]],
    newcomer: list[int],
) -> dict[int, list[np.ndarray]]:
    """Open a slot per prompt, prefill each alone, free every slot not in
    `live`, then decode the live ones together, listed in `live`'s order,
    each step with a chunk of the `newcomer` prompt (if any) of a new slot."""
    cache = model.new_cache()
    for slot, prompt in enumerate(prompts):
        cache.open(slot)
        cache.reserve(len(prompt) + DECODE_STEPS)
        row = cache.row_of[slot]
        _run(model, prompt, [Segment(0, len(prompt), row, 0)], cache)
        cache.length[slot] = len(prompt)
    for slot in range(len(prompts)):
        if slot not in live:
            cache.free(slot)
    new_slot = len(prompts)
    cache.open(new_slot)
    cache.reserve(max(map(len, prompts)) + DECODE_STEPS + len(newcomer))
    chunk = len(newcomer) // DECODE_STEPS
    out: dict[int, list[np.ndarray]] = {slot: [] for slot in live}
    for step in range(DECODE_STEPS):
        fed = newcomer[step * chunk : (step + 1) * chunk]
        # As the scheduler orders them: running sequences, then newcomers.
        segments = [
            Segment(j, 1, cache.row_of[slot], cache.length[slot])
            for j, slot in enumerate(live)
        ]
        if fed:
            segments.append(
                Segment(len(live), len(fed), cache.row_of[new_slot], step * chunk)
            )
        tokens = [feed[slot][step] for slot in live] + fed
        logits = _run(model, tokens, segments, cache)
        for j, slot in enumerate(live):
            out[slot].append(logits[j])
            cache.length[slot] += 1
    return out


@pytest.mark.parametrize(
    ("opened", "live"),
    [
        (5, [0, 1, 2, 3, 4]),  # rows in order, none free
        (5, [3, 0, 4, 1, 2]),  # rows out of order
        (6, [5, 2, 0, 3]),  # out of order, rows 1 and 4 free: read in place
        (10, [9, 0]),  # 8 free rows between: gathered
    ],
)
@pytest.mark.parametrize("with_prompt", [False, True], ids=["decode", "mixed"])
def test_decoding_in_the_pool_equals_decoding_alone(model, opened, live, with_prompt):
    prompts = _prompts(opened)
    rng = np.random.default_rng(opened)
    feed = [[int(t) for t in rng.integers(10, 40000, size=DECODE_STEPS)]] * opened
    pooled = max(live) + 1
    gathered = pooled > len(live) + max(llama.POOL_SLACK_ROWS, len(live))
    assert gathered == (opened == 10)  # the cases cover both paths

    # "mixed": every step also feeds a chunk of a new prompt, after the
    # decoding sequences in the batch.
    newcomer = list(range(500, 500 + 4 * DECODE_STEPS)) if with_prompt else []

    batched = _batched(model, prompts, live, feed, newcomer)

    for slot in live:
        alone = _alone(model, prompts[slot], feed[slot])
        for step in range(DECODE_STEPS):
            np.testing.assert_allclose(
                batched[slot][step], alone[step], atol=ATOL, err_msg=f"slot {slot}"
            )
