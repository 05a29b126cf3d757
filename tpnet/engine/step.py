"""One batched forward step, run identically on every rank.

Rank 0 describes the step (protocol_spec.md section 5): which sequence slots
take part, how many new tokens each feeds, how many of its last rows need
logits, which slots to free and which caches to roll back. Every rank runs
the forward pass on its shard over its own KV caches; the vocabulary slices
of the requested logits rows are gathered to rank 0.
"""

from __future__ import annotations

import logging
from typing import Any

import mlx.core as mx
import numpy as np

from tpnet.collective import Collective
from tpnet.model.llama import Segment, ShardedModel

logger = logging.getLogger("tpnet.engine")

# Sequence slots per rank; bounds the KV caches a (possibly faulty) rank 0
# can make a worker allocate.
MAX_SLOTS = 4096


class BadStep(ValueError):
    """A step description that breaks section 5 of the spec."""


def _int_list(value: Any, what: str, width: int) -> list[list[int]]:
    if not isinstance(value, list):
        raise BadStep(f"{what} must be a list, got {type(value).__name__}")
    out = []
    for item in value:
        if (
            not isinstance(item, list)
            or len(item) != width
            or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in item
            )
        ):
            raise BadStep(
                f"{what} entries must be {width} non-negative integers, got {item!r}"
            )
        out.append(item)
    return out


def validate_step(body: dict[str, Any], tokens: np.ndarray, vocab_size: int) -> None:
    seqs = _int_list(body.get("seqs"), "seqs", 3)
    _int_list([[s] for s in body.get("free", [])], "free", 1)
    _int_list(body.get("trim", []), "trim", 2)
    if not isinstance(body.get("epoch"), int):
        raise BadStep(f"epoch must be an integer, got {body.get('epoch')!r}")
    if sum(n for _, n, _ in seqs) != tokens.shape[0]:
        raise BadStep(
            f"seqs feed {sum(n for _, n, _ in seqs)} tokens, payload has {tokens.shape[0]}"
        )
    for slot, n, rows in seqs:
        if slot >= MAX_SLOTS or n == 0 or rows > n:
            raise BadStep(f"bad seq entry {[slot, n, rows]} (slots < {MAX_SLOTS})")
    if len({s for s, _, _ in seqs}) != len(seqs):
        raise BadStep("a slot appears twice in one step")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise BadStep(f"token ids must lie in [0, {vocab_size})")


class StepRunner:
    """KV caches of every live sequence slot, and the step that uses them."""

    def __init__(
        self,
        model: ShardedModel,
        collective: Collective,
        vocab_columns: list[int] | None = None,
    ) -> None:
        self.model = model
        self.collective = collective
        self.cache = model.new_cache()
        # Each rank's share of the vocabulary, to check the gathered logits.
        self.vocab_columns = vocab_columns
        self.epoch = 0

    def begin_epoch(self, epoch: int) -> None:
        """A new cluster epoch: caches of the old one are meaningless."""
        self.cache.clear()
        self.collective.reset(epoch)
        self.epoch = epoch

    async def run(self, body: dict[str, Any], tokens: np.ndarray) -> np.ndarray | None:
        """Run the step; rank 0 gets float32 logits [rows, vocab]."""
        if body["epoch"] != self.epoch:
            self.begin_epoch(body["epoch"])
        cache = self.cache
        for slot in body.get("free", []):
            cache.free(slot)
        for slot, count in body.get("trim", []):
            cache.trim(slot, count)
        segments = []
        rows: list[int] = []
        start = 0
        needed = 0
        for slot, n, sample_rows in body["seqs"]:
            if slot not in cache:
                cache.open(slot)
            offset = cache.length[slot]
            segments.append(Segment(start, n, cache.row_of[slot], offset))
            cache.length[slot] = offset + n
            needed = max(needed, offset + n)
            rows.extend(range(start + n - sample_rows, start + n))
            start += n
        if not segments:
            return None
        cache.reserve(needed)
        hidden = await self.model.forward(
            mx.array(tokens, dtype=mx.int32), segments, cache
        )
        if rows:
            local = self.model.logits(hidden[mx.array(rows)])
        else:
            local = mx.zeros((0, self.model.plan.vocab[1] - self.model.plan.vocab[0]))
        parts = await self.collective.gather(local, self.vocab_columns)
        if parts is None:
            return None
        full = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)
        mx.eval(full)
        return np.asarray(full)
