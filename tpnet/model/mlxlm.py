"""mlx-lm's own model classes holding a ModelSpec's weights, unsharded: the
reference the tensor-parallel model is tested against, and the draft model
of speculative decoding."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama, qwen3

from tpnet.model.loader import ModelSpec


def mlx_lm_model(spec: ModelSpec) -> nn.Module:
    """mlx-lm's model for the spec's architecture, holding the same weights."""
    c = spec.config
    common = dict(
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_layers,
        intermediate_size=c.intermediate_size,
        num_attention_heads=c.num_heads,
        rms_norm_eps=c.rms_norm_eps,
        vocab_size=c.vocab_size,
        num_key_value_heads=c.num_kv_heads,
        rope_theta=c.rope_theta,
        tie_word_embeddings=c.tie_word_embeddings,
        head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings,
        rope_scaling=c.rope_scaling,
    )
    if c.architecture == "qwen3":
        model = qwen3.Model(qwen3.ModelArgs(model_type="qwen3", **common))
    else:
        model = llama.Model(
            llama.ModelArgs(
                model_type="llama", rope_traditional=c.rope_traditional, **common
            )
        )
    q = spec.quantization
    nn.quantize(
        model,
        class_predicate=lambda p, m: (
            {"group_size": q[p][0], "bits": q[p][1]} if p in q else False
        ),
    )
    model.load_weights(list(spec.tensors.items()))
    model.set_dtype(mx.float32, lambda dtype: dtype in (mx.float16, mx.bfloat16))
    return model
