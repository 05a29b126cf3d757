"""The Llama family (llama, mistral, qwen2, qwen3) over a ragged batch.

A step's tokens from every sequence are stacked into one [T, hidden] matrix,
so each projection is one matmul for the whole batch and each layer costs one
all-reduce after attention and one after the MLP, whatever the batch. Only
attention is per sequence, over that sequence's KV cache.

The model reads as if on one machine: layers hold whatever slice the shard
plan gave them, and `all_sum` is the only place ranks meet.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.models.rope_utils import initialize_rope

from tpnet.model.kvcache import SlotCache
from tpnet.model.loader import ModelConfig, ModelSpec
from tpnet.model.shard import ShardPlan, SliceLoader

AllSum = Callable[[mx.array], Awaitable[mx.array]]

# Free (or kept) pool rows below the last one in use that decode attention
# reads anyway rather than gathering (see DecodeBatch): each costs a wasted
# row of attention, about what gathering a row in use costs.
POOL_SLACK_ROWS = 4


@dataclass
class Segment:
    """One sequence's rows in the step: rows [start, start+length) of the
    batch, written to its cache row at positions [offset, offset+length)."""

    start: int
    length: int
    row: int
    offset: int


@dataclass
class DecodeBatch:
    """What decode attention needs to know about the step's one-token
    sequences. It is the same in every layer, so `decode_batch` works it out
    once per step.

    Attention reads the pooled cache's first `pooled` rows in place, queries
    put in row order (a free row in between gets a dummy query whose output is
    dropped), which is far cheaper than gathering the sequences' keys and
    values out of the pool; with many free rows in between (more than
    POOL_SLACK_ROWS or the number of sequences) it gathers `rows` instead.
    It reads positions up to the longest sequence only, not the whole
    capacity: attention costs what it reads."""

    count: int
    index: mx.array | None  # their rows of the step's batch; None: all rows
    offsets: mx.array  # each one's new position, in batch order
    write_index: mx.array  # where their new keys and values go in the pool
    span: int  # positions read: up to the longest sequence's new one
    pooled: int | None  # read pool rows [0, pooled) in place; None: gather
    rows: mx.array  # each one's pool row, in batch order
    query_order: mx.array | None  # which query each pool row gets
    output_order: mx.array | None  # pool-row outputs back in batch order
    mask: mx.array  # [pool rows read, 1, 1, span]: positions each may see


def decode_batch(segments: list[Segment], cache: SlotCache) -> DecodeBatch | None:
    segs = [s for s in segments if s.length == 1]
    if not segs:
        return None
    starts = [s.start for s in segs]
    rows_list = [s.row for s in segs]
    offsets = mx.array([s.offset for s in segs])
    rows = mx.array(rows_list)
    span = max(s.offset for s in segs) + 1
    pooled: int | None = max(rows_list) + 1
    query_order = output_order = None
    mask_offsets = offsets
    if pooled > len(segs) + max(POOL_SLACK_ROWS, len(segs)):
        pooled = None
    elif rows_list != list(range(len(segs))):
        seq_of_row = [0] * pooled
        row_offsets = [0] * pooled
        for j, s in enumerate(segs):
            seq_of_row[s.row] = j
            row_offsets[s.row] = s.offset
        query_order, output_order = mx.array(seq_of_row), rows
        mask_offsets = mx.array(row_offsets)
    # Positions past each sequence's length hold stale or no data.
    visible = mx.arange(span)[None, :] <= mask_offsets[:, None]
    return DecodeBatch(
        count=len(segs),
        index=None if len(segs) == len(segments) else mx.array(starts),
        offsets=offsets,
        write_index=cache.position_index(rows, offsets),
        span=span,
        pooled=pooled,
        rows=rows,
        query_order=query_order,
        output_order=output_order,
        mask=visible[:, None, None, :],
    )


def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    return mx.fast.rms_norm(x, weight, eps)


class Attention:
    def __init__(
        self, cfg: ModelConfig, plan: ShardPlan, load: SliceLoader, p: str
    ) -> None:
        d = cfg.head_dim
        q0, q1 = plan.q_heads
        k0, k1 = plan.kv_heads
        self.n_heads = q1 - q0
        self.n_kv_heads = k1 - k0
        self.head_dim = d
        self.scale = d**-0.5
        self.eps = cfg.rms_norm_eps
        self.q_proj = load.linear(p + "q_proj", rows=(q0 * d, q1 * d))
        self.k_proj = load.linear(p + "k_proj", rows=(k0 * d, k1 * d))
        self.v_proj = load.linear(p + "v_proj", rows=(k0 * d, k1 * d))
        # A row-parallel bias is added once, by rank 0, before the sum.
        self.o_proj = load.linear(
            p + "o_proj", cols=(q0 * d, q1 * d), with_bias=plan.rank == 0
        )
        # With more ranks than KV heads, a rank's first query head may sit in
        # the middle of its KV head's group.
        group = cfg.num_heads // cfg.num_kv_heads
        self.kv_index = None
        if self.n_heads % max(self.n_kv_heads, 1) or q0 % group:
            self.kv_index = mx.array([h // group - k0 for h in range(q0, q1)])
        self.q_norm = self.k_norm = None
        if cfg.qk_norm:
            self.q_norm = load.vector(p + "q_norm.weight")
            self.k_norm = load.vector(p + "k_norm.weight")
        self.rope = initialize_rope(
            d,
            cfg.rope_theta,
            cfg.rope_traditional,
            cfg.rope_scaling,
            cfg.max_position_embeddings,
        )

    def __call__(
        self,
        x: mx.array,
        segments: list[Segment],
        decode: DecodeBatch | None,
        layer: int,
        cache: SlotCache,
    ) -> mx.array:
        # x: [T, hidden] -> partial o_proj output [T, hidden]
        d = self.head_dim
        q = self.q_proj(x).reshape(-1, self.n_heads, d)
        k = self.k_proj(x).reshape(-1, self.n_kv_heads, d)
        v = self.v_proj(x).reshape(-1, self.n_kv_heads, d)
        if self.q_norm is not None:
            q = rms_norm(q, self.q_norm, self.eps)
            k = rms_norm(k, self.k_norm, self.eps)
        if decode is not None and decode.count == len(segments):
            out = self._decode(q, k, v, decode, layer, cache)
            return self.o_proj(out.reshape(len(segments), -1))
        pieces = []
        decoded = None
        if decode is not None:
            decoded = self._decode(q, k, v, decode, layer, cache)
        j = 0
        for seg in segments:
            if seg.length == 1:
                pieces.append(decoded[j : j + 1].reshape(1, -1))
                j += 1
            else:
                pieces.append(self._span(q, k, v, seg, layer, cache))
        return self.o_proj(mx.concatenate(pieces, axis=0))

    def _decode(
        self,
        q: mx.array,
        k: mx.array,
        v: mx.array,
        batch: DecodeBatch,
        layer: int,
        cache: SlotCache,
    ) -> mx.array:
        """One new token for each of several sequences, attended together:
        [B, heads, d] in, [B, heads, d] out."""
        if batch.index is not None:
            q, k, v = q[batch.index], k[batch.index], v[batch.index]
        # [B, heads, 1, d], each sequence rotated at its own position
        q = self.rope(q[:, :, None, :], offset=batch.offsets)
        k = self.rope(k[:, :, None, :], offset=batch.offsets)
        cache.write_positions(layer, batch.write_index, k[:, :, 0, :], v)
        keys = cache.keys[layer][:, :, : batch.span]
        values = cache.values[layer][:, :, : batch.span]
        if batch.pooled is None:
            keys, values = keys[batch.rows], values[batch.rows]
        else:
            keys, values = keys[: batch.pooled], values[: batch.pooled]
            if batch.query_order is not None:
                q = q[batch.query_order]
        if self.kv_index is not None:
            keys, values = keys[:, self.kv_index], values[:, self.kv_index]
        o = mx.fast.scaled_dot_product_attention(
            q, keys, values, scale=self.scale, mask=batch.mask
        )
        if batch.output_order is not None:
            o = o[batch.output_order]
        return o[:, :, 0, :]

    def _span(
        self,
        q: mx.array,
        k: mx.array,
        v: mx.array,
        seg: Segment,
        layer: int,
        cache: SlotCache,
    ) -> mx.array:
        """Several new tokens of one sequence (a prompt chunk or drafts)."""
        rows = slice(seg.start, seg.start + seg.length)
        # [L, heads, d] -> [1, heads, L, d]
        qs = self.rope(q[rows].transpose(1, 0, 2)[None], offset=seg.offset)
        ks = self.rope(k[rows].transpose(1, 0, 2)[None], offset=seg.offset)
        vs = v[rows].transpose(1, 0, 2)
        keys, values = cache.write_span(layer, seg.row, seg.offset, ks[0], vs)
        if self.kv_index is not None:
            keys, values = keys[:, self.kv_index], values[:, self.kv_index]
        o = mx.fast.scaled_dot_product_attention(
            qs, keys, values, scale=self.scale, mask="causal"
        )
        return o[0].transpose(1, 0, 2).reshape(seg.length, -1)


class MLP:
    def __init__(self, plan: ShardPlan, load: SliceLoader, p: str) -> None:
        m = plan.mlp
        self.gate_proj = load.linear(p + "gate_proj", rows=m)
        self.up_proj = load.linear(p + "up_proj", rows=m)
        self.down_proj = load.linear(p + "down_proj", cols=m, with_bias=plan.rank == 0)

    def __call__(self, x: mx.array) -> mx.array:
        g = self.gate_proj(x)
        return self.down_proj(g * mx.sigmoid(g) * self.up_proj(x))


class Block:
    def __init__(
        self, cfg: ModelConfig, plan: ShardPlan, load: SliceLoader, i: int
    ) -> None:
        p = f"model.layers.{i}."
        self.self_attn = Attention(cfg, plan, load, p + "self_attn.")
        self.mlp = MLP(plan, load, p + "mlp.")
        self.input_layernorm = load.vector(p + "input_layernorm.weight")
        self.post_attention_layernorm = load.vector(
            p + "post_attention_layernorm.weight"
        )
        self.eps = cfg.rms_norm_eps


class ShardedModel:
    """This rank's part of the model; `forward` must be called by every rank
    with the same batch, in the same order."""

    def __init__(
        self,
        spec: ModelSpec,
        plan: ShardPlan,
        all_sum: AllSum,
        dtype: mx.Dtype = mx.float32,
        dequantize: bool = False,
    ) -> None:
        cfg = spec.config
        self.config = cfg
        self.plan = plan
        self.all_sum = all_sum
        self.dtype = dtype
        load = SliceLoader(spec, dtype, dequantize)
        self.embed_tokens = load.linear("model.embed_tokens", rows=plan.vocab)
        self.layers = [Block(cfg, plan, load, i) for i in range(cfg.num_layers)]
        self.norm = load.vector("model.norm.weight")
        if cfg.tie_word_embeddings:
            self.lm_head = self.embed_tokens
        else:
            self.lm_head = load.linear("lm_head", rows=plan.vocab)

    def new_cache(self) -> SlotCache:
        """An empty KV cache for this rank's KV heads."""
        attn = self.layers[0].self_attn
        return SlotCache(
            self.config.num_layers, attn.n_kv_heads, attn.head_dim, self.dtype
        )

    async def embed(self, tokens: mx.array) -> mx.array:
        # tokens: [T] int32 -> [T, hidden]; each rank looks up its vocabulary
        # slice and the sum fills in every row.
        v0, v1 = self.plan.vocab
        if (v0, v1) == (0, self.config.vocab_size):
            return self.embed_tokens.rows(tokens).astype(self.dtype)
        local = tokens - v0
        inside = (local >= 0) & (local < v1 - v0)
        rows = self.embed_tokens.rows(mx.where(inside, local, 0)).astype(self.dtype)
        return await self.all_sum(rows * inside[:, None])

    async def forward(
        self, tokens: mx.array, segments: list[Segment], cache: SlotCache
    ) -> mx.array:
        """Hidden states after the final norm, [T, hidden]."""
        h = await self.embed(tokens)
        decode = decode_batch(segments, cache)
        for i, layer in enumerate(self.layers):
            x = rms_norm(h, layer.input_layernorm, layer.eps)
            h = h + await self.all_sum(layer.self_attn(x, segments, decode, i, cache))
            x = rms_norm(h, layer.post_attention_layernorm, layer.eps)
            h = h + await self.all_sum(layer.mlp(x))
        return rms_norm(h, self.norm, self.config.rms_norm_eps)

    def logits(self, h: mx.array) -> mx.array:
        """This rank's vocabulary slice of the logits, [rows, vocab slice]."""
        return self.lm_head(h).astype(mx.float32)

    def resident_arrays(self) -> list[mx.array]:
        out = self.embed_tokens.arrays() + [self.norm]
        if self.lm_head is not self.embed_tokens:
            out += self.lm_head.arrays()
        for layer in self.layers:
            a, m = layer.self_attn, layer.mlp
            for lin in (
                a.q_proj,
                a.k_proj,
                a.v_proj,
                a.o_proj,
                m.gate_proj,
                m.up_proj,
                m.down_proj,
            ):
                out += lin.arrays()
            out += [layer.input_layernorm, layer.post_attention_layernorm]
        return out
