"""The shard plan: which slice of every weight each rank holds.

Megatron-style: q/k/v and gate/up are column-parallel (each rank owns whole
output rows), o_proj and down_proj row-parallel (each rank owns the matching
input columns), the embedding and LM head split by vocabulary. Attention
splits by whole KV-head groups, so a query head stays with its KV head;
splits may be uneven (3 KV heads over 2 ranks is 2 + 1) and weighted. With
more ranks than KV heads, query heads are split and each rank keeps a copy of
the KV heads its query heads use.

Quantized weights are sliced as packed words, scales and biases together,
never dequantized; a row-parallel split falls on quantization-group
boundaries. `load_slices` evaluates only this rank's slices, so a rank keeps
about 1/N of the weights resident.
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass

import mlx.core as mx

from tpnet.model.loader import ModelConfig, ModelError, ModelSpec


def _find_malloc_trim():  # type: ignore[no-untyped-def]
    if sys.platform != "linux":
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_malloc_trim = _find_malloc_trim()


@dataclass(frozen=True)
class ShardPlan:
    rank: int
    world_size: int
    q_heads: tuple[int, int]  # [start, end) of the query heads this rank owns
    kv_heads: tuple[int, int]  # [start, end) of the KV heads it keeps
    mlp: tuple[int, int]  # [start, end) of the intermediate dimension
    vocab: tuple[int, int]  # [start, end) of the vocabulary


def split_units(total: int, weights: list[float]) -> list[int]:
    """Split `total` units into len(weights) counts proportional to weights,
    each at least 1 (largest-remainder rounding)."""
    n = len(weights)
    if total < n:
        raise ModelError(f"cannot split {total} units over {n} ranks")
    scale = sum(weights)
    exact = [total * w / scale for w in weights]
    counts = [max(1, int(e)) for e in exact]
    while sum(counts) > total:
        i = max(range(n), key=lambda j: counts[j] - exact[j])
        counts[i] -= 1
    while sum(counts) < total:
        i = max(range(n), key=lambda j: exact[j] - counts[j])
        counts[i] += 1
    return counts


def _range(counts: list[int], rank: int, unit: int = 1) -> tuple[int, int]:
    start = sum(counts[:rank]) * unit
    return start, start + counts[rank] * unit


def plan_shard(
    config: ModelConfig,
    rank: int,
    world_size: int,
    weights: list[float] | None = None,
    mlp_unit: int = 32,
) -> ShardPlan:
    """The slices of `rank` among `world_size`; `weights` give each rank's
    share (a faster machine may take more), equal by default."""
    weights = weights or [1.0] * world_size
    if len(weights) != world_size or min(weights) <= 0:
        raise ModelError(f"need {world_size} positive rank weights, got {weights}")
    group = config.num_heads // config.num_kv_heads
    if world_size <= config.num_kv_heads:
        kv_counts = split_units(config.num_kv_heads, weights)
        kv = _range(kv_counts, rank)
        q = (kv[0] * group, kv[1] * group)
    else:
        if world_size > config.num_heads:
            raise ModelError(
                f"world size {world_size} exceeds the model's {config.num_heads} "
                "query heads: every rank needs at least one"
            )
        q = _range(split_units(config.num_heads, weights), rank)
        kv = (q[0] // group, -(-q[1] // group))
    if config.intermediate_size % mlp_unit:
        mlp_unit = 1
    mlp = _range(
        split_units(config.intermediate_size // mlp_unit, weights), rank, mlp_unit
    )
    vocab = _range(split_units(config.vocab_size, weights), rank)
    return ShardPlan(rank, world_size, q, kv, mlp, vocab)


def mlp_unit_for(spec: ModelSpec) -> int:
    """Row-parallel splits of down_proj must fall on its quantization groups."""
    q = spec.quantization.get("model.layers.0.mlp.down_proj")
    return q[0] if q else 32


@dataclass
class LinearWeights:
    """One (possibly quantized) weight matrix slice, laid out [out, in]."""

    weight: mx.array
    scales: mx.array | None = None
    biases: mx.array | None = None
    bias: mx.array | None = None
    group_size: int = 0
    bits: int = 0

    def __call__(self, x: mx.array) -> mx.array:
        if self.scales is not None:
            y = mx.quantized_matmul(
                x,
                self.weight,
                self.scales,
                self.biases,
                transpose=True,
                group_size=self.group_size,
                bits=self.bits,
            )
        else:
            y = x @ self.weight.T
        if self.bias is not None:
            y = y + self.bias
        return y

    def rows(self, ids: mx.array) -> mx.array:
        """Rows of the matrix (embedding lookup), dequantized."""
        if self.scales is None:
            return self.weight[ids]
        return mx.dequantize(
            self.weight[ids],
            self.scales[ids],
            self.biases[ids],
            group_size=self.group_size,
            bits=self.bits,
        )

    def arrays(self) -> list[mx.array]:
        return [
            a
            for a in (self.weight, self.scales, self.biases, self.bias)
            if a is not None
        ]


class SliceLoader:
    """Cuts this rank's slices out of the lazily loaded tensors of a spec.

    It consumes them: each full tensor is removed from `spec.tensors` as its
    slice is taken, so that once read (and evaluated) it can be freed; a rank
    never holds the whole model at once, only one full tensor at a time."""

    def __init__(self, spec: ModelSpec, dtype: mx.Dtype, dequantize: bool) -> None:
        self.spec = spec
        self.dtype = dtype
        self.dequantize = dequantize

    def vector(self, name: str) -> mx.array:
        return self._materialise(self.spec.tensors.pop(name).astype(self.dtype))

    def _materialise(self, x: mx.array) -> mx.array:
        # A copy detaches the slice from the full tensor, so the full tensor's
        # memory is released once loading moves on.
        x = mx.array(x) if x.size else x
        mx.eval(x)
        return x

    @staticmethod
    def release() -> None:
        """Return the full tensors just freed to the system (MLX caches freed
        buffers, glibc keeps freed heap): without it the loading peak holds
        several full tensors more than the slices."""
        mx.clear_cache()
        if _malloc_trim is not None:
            _malloc_trim(0)

    def linear(
        self,
        name: str,
        rows: tuple[int, int] | None = None,
        cols: tuple[int, int] | None = None,
        with_bias: bool = True,
    ) -> LinearWeights:
        t = self.spec.tensors
        weight = t.pop(name + ".weight")
        quant = self.spec.quantization.get(name)
        scales = t.pop(name + ".scales", None)
        biases = t.pop(name + ".biases", None)
        bias = t.pop(name + ".bias", None)
        bias = bias if with_bias else None
        if rows is not None:
            weight = weight[rows[0] : rows[1]]
            if scales is not None:
                scales, biases = scales[rows[0] : rows[1]], biases[rows[0] : rows[1]]
            if bias is not None:
                bias = bias[rows[0] : rows[1]]
        if cols is not None:
            if quant is None:
                weight = weight[:, cols[0] : cols[1]]
            else:
                group, bits = quant
                if cols[0] % group or cols[1] % group:
                    raise ModelError(
                        f"{name}: split at columns {cols} does not fall on "
                        f"{group}-wide quantization groups"
                    )
                per_word = 32 // bits if 32 % bits == 0 else None
                if per_word is None:
                    raise ModelError(
                        f"{name}: {bits}-bit weights cannot be column-split"
                    )
                weight = weight[:, cols[0] // per_word : cols[1] // per_word]
                scales = scales[:, cols[0] // group : cols[1] // group]
                biases = biases[:, cols[0] // group : cols[1] // group]
        if quant is not None and self.dequantize:
            # Scales in the compute dtype: dequantizing with float16 scales
            # would round every weight to float16.
            weight = mx.dequantize(
                weight,
                scales.astype(self.dtype),
                biases.astype(self.dtype),
                group_size=quant[0],
                bits=quant[1],
            )
            scales = biases = None
            quant = None
        if quant is None:
            weight = weight.astype(self.dtype)
        else:
            scales = scales.astype(self.dtype)
            biases = biases.astype(self.dtype)
        out = LinearWeights(
            self._materialise(weight),
            None if scales is None else self._materialise(scales),
            None if biases is None else self._materialise(biases),
            None if bias is None else self._materialise(bias.astype(self.dtype)),
            quant[0] if quant else 0,
            quant[1] if quant else 0,
        )
        self.release()
        return out
