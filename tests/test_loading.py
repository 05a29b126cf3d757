"""Model folders as mlx-community publishes them (random weights, built by
the test) run through the same tensor-parallel equivalence check as the real
model: 4-bit and unquantized, llama and qwen3, on 1, 2 and 3 ranks. Broken
or unsupported models fail at start-up with a message naming what was found."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from clusterutil import Cluster
from reference import greedy
from tinymodel import build_tiny_model

from tpnet.model.loader import ModelError, load_model

GENERATED = 16
LOGPROB_TOLERANCE = 2e-3
# head_dim 32 keeps every shard on 32-wide quantization groups; 2 KV heads
# make 3 ranks replicate a KV head.
SHAPE = dict(
    hidden_size=128, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256
)
PROMPT = "The quick brown fox jumps over the lazy dog"


def reference_run(folder: str, prompt_ids: list[int], banned: list[int]):
    from mlx_lm.utils import load_model as mlx_lm_load

    model, _ = mlx_lm_load(Path(folder))
    return greedy(model, prompt_ids, GENERATED, banned)


def cluster_run(cluster: Cluster, banned: list[int]) -> dict:
    status, body = cluster.post(
        "/v1/completions",
        {
            "prompt": PROMPT,
            "max_tokens": GENERATED,
            "temperature": 0,
            "logprobs": 1,
            "logit_bias": {str(t): -100 for t in banned},
        },
    )
    assert status == 200, body
    return body["choices"][0]["logprobs"]


@pytest.mark.parametrize(
    "model_type,bits",
    [("llama", None), ("llama", 4), ("qwen3", None), ("qwen3", 4)],
)
def test_a_random_mlx_folder_generates_the_same_tokens_on_1_2_and_3_ranks(
    tmp_path, model_type, bits
):
    folder = build_tiny_model(tmp_path / "model", model_type, bits, seed=7, **SHAPE)
    spec = load_model(folder)
    banned = sorted(spec.tokenizer.eos_token_ids)
    tokens, logprobs = reference_run(folder, spec.tokenizer.encode(PROMPT), banned)
    expected = [spec.tokenizer.decode([t]) for t in tokens]
    want = np.array([lp[t] for lp, t in zip(logprobs, tokens)])

    for world in (1, 2, 3):
        # Quantized models also run with their weights as stored on 3 ranks.
        extra = ["--no-dequantize"] if bits and world == 3 else []
        cluster = Cluster(world, tmp_path / f"logs{world}", model=folder, extra=extra)
        cluster.start()
        try:
            cluster.wait_healthy()
            got = cluster_run(cluster, banned)
        finally:
            cluster.stop()

        assert got["tokens"] == expected, f"world size {world}"
        np.testing.assert_allclose(got["token_logprobs"], want, atol=LOGPROB_TOLERANCE)


def test_an_unsupported_architecture_is_refused_naming_it(tmp_path):
    folder = build_tiny_model(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    config["model_type"] = "gpt_neox"
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))

    with pytest.raises(ModelError, match="model_type 'gpt_neox' is not supported"):
        load_model(folder)


def test_a_truncated_weights_file_is_a_clear_error(tmp_path):
    folder = build_tiny_model(tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])

    with pytest.raises(ModelError, match="cannot read weights"):
        load_model(folder)


def test_a_missing_tensor_is_named(tmp_path):
    import mlx.core as mx

    folder = build_tiny_model(tmp_path / "model")
    path = str(tmp_path / "model" / "model.safetensors")
    weights = mx.load(path)
    del weights["model.layers.1.mlp.up_proj.weight"]
    mx.save_safetensors(path, weights)

    with pytest.raises(ModelError, match="model.layers.1.mlp.up_proj.weight"):
        load_model(folder)


def test_a_rank_with_a_broken_model_exits_at_once_with_status_2(tmp_path):
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + b"\0" * 100)

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tpnet",
            "node",
            "--rank",
            "1",
            "--peers",
            "127.0.0.1:1,127.0.0.1:2",
            "--model",
            str(tmp_path / "broken.gguf"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"TPNET_SECRET": "x" * 32, "PATH": "/usr/bin:/bin"},
    )

    assert result.returncode == 2
    assert "is not a GGUF model or is damaged" in result.stderr
    assert "waiting for" not in result.stderr
