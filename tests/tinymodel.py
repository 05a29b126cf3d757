"""A small random-weight model folder in the MLX / Hugging Face layout.

`build_tiny_model` writes config.json, model.safetensors and the tokenizer of
the default GGUF (SmolLM2, vocabulary 49,152) into a folder, so tests can
start real ranks that load in well under a second. The weights are random:
the text it generates is nonsense, but every code path of a real model runs.
"""

from __future__ import annotations

import json
import os
from typing import Any

import mlx.core as mx

# Small enough to load fast, large enough to shard over two ranks: 4 query
# heads over 2 KV heads, an MLP of 128 that splits on 32-wide groups.
BASE_CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 49152,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}
WEIGHT_SCALE = 0.02
SUPPORTED_TYPES = ("llama", "qwen3")

_tokenizer_cache: list[Any] = []


def _tokenizer() -> Any:
    # Loading the 98 MB GGUF takes a moment; every tiny model shares it.
    if not _tokenizer_cache:
        from tpnet.model.loader import load_model

        _tokenizer_cache.append(load_model(None).tokenizer)
    return _tokenizer_cache[0]


def _linear_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Checkpoint name -> (rows, columns) of every linear weight in a layer."""
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q_rows = config["num_attention_heads"] * head_dim
    kv_rows = config["num_key_value_heads"] * head_dim
    inter = config["intermediate_size"]
    return {
        "self_attn.q_proj": (q_rows, hidden),
        "self_attn.k_proj": (kv_rows, hidden),
        "self_attn.v_proj": (kv_rows, hidden),
        "self_attn.o_proj": (hidden, q_rows),
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
    }


def build_tiny_model(
    path: str | os.PathLike[str],
    model_type: str = "llama",
    quantize_bits: int | None = None,
    group_size: int = 32,
    seed: int = 0,
    **overrides: Any,
) -> str:
    """Write a random-weight model folder at `path` and return its path.

    `overrides` replace fields of config.json (hidden_size, num_hidden_layers
    …). With `quantize_bits` (4 or 8) every linear weight and the embedding
    are stored as `.weight` / `.scales` / `.biases`, as mlx-community does.
    """
    if model_type not in SUPPORTED_TYPES:
        raise ValueError(
            f"model_type must be one of {SUPPORTED_TYPES}, got {model_type!r}"
        )
    if quantize_bits not in (None, 4, 8):
        raise ValueError(f"quantize_bits must be None, 4 or 8, got {quantize_bits!r}")
    if group_size not in (32, 64):
        raise ValueError(f"group_size must be 32 or 64, got {group_size!r}")
    folder = os.fspath(path)
    os.makedirs(folder, exist_ok=True)
    config = {**BASE_CONFIG, "model_type": model_type, **overrides}
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    if model_type == "qwen3":
        config["head_dim"] = head_dim

    # 1. Random float32 weights named as in Hugging Face checkpoints.
    mx.random.seed(seed)
    weights: dict[str, mx.array] = {}

    def normal(shape: tuple[int, ...]) -> mx.array:
        return WEIGHT_SCALE * mx.random.normal(shape, dtype=mx.float32)

    weights["model.embed_tokens.weight"] = normal((config["vocab_size"], hidden))
    weights["model.norm.weight"] = mx.ones((hidden,), dtype=mx.float32)
    if not config["tie_word_embeddings"]:
        weights["lm_head.weight"] = normal((config["vocab_size"], hidden))
    linear = ["model.embed_tokens"] + (
        [] if config["tie_word_embeddings"] else ["lm_head"]
    )
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            weights[prefix + norm + ".weight"] = mx.ones((hidden,), dtype=mx.float32)
        if model_type == "qwen3":
            for norm in ("self_attn.q_norm", "self_attn.k_norm"):
                weights[prefix + norm + ".weight"] = mx.ones(
                    (head_dim,), dtype=mx.float32
                )
        for name, shape in _linear_shapes(config).items():
            weights[prefix + name + ".weight"] = normal(shape)
            linear.append(prefix + name)

    # 2. Quantize every linear weight and the embedding, if asked.
    if quantize_bits is not None:
        for name in linear:
            packed, scales, biases = mx.quantize(
                weights[name + ".weight"], group_size=group_size, bits=quantize_bits
            )
            weights[name + ".weight"] = packed
            weights[name + ".scales"] = scales
            weights[name + ".biases"] = biases
        config["quantization"] = {"group_size": group_size, "bits": quantize_bits}

    # 3. Write the folder: weights, config, tokenizer.
    mx.eval(weights)
    mx.save_safetensors(os.path.join(folder, "model.safetensors"), weights)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    _tokenizer().save_folder_files(folder)
    return folder
