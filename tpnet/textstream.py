"""Streaming text out of generated tokens, one token at a time, without I/O.

`IncrementalDetokenizer` turns token ids into text that is final: it never
returns part of a UTF-8 character (a byte-level BPE token may end inside
one) and what it returns, joined with `flush()`, equals decoding all the ids
at once. `StopMatcher` cuts that text at the first stop string, even when the
stop string arrives split over several pieces, and never returns text that a
stop string may still claim.

Both do work proportional to the new text per call, not to the whole stream:
they run once per generated token for every open stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

# What a decoder writes for bytes that are not (yet) a whole UTF-8 character.
REPLACEMENT_CHARACTER = "\ufffd"


class TokenDecoder(Protocol):
    """The part of `tpnet.tokenizer.Tokenizer` that detokenizing needs."""

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str: ...


class IncrementalDetokenizer:
    """Text of a token stream, released as soon as it can no longer change.

    Only a short window of ids is decoded per token: the ids since the last
    release (the "read" part) after the ids of the release before it (the
    "prefix" part). The prefix gives the decoder the context it would have
    when decoding everything (a SentencePiece decoder drops a leading space
    only at the very start), and the new text is what the read part adds to
    the prefix's text. Text ending in U+FFFD is held: it may be a character
    whose remaining bytes are still to come."""

    def __init__(self, tokenizer: TokenDecoder, *, skip_special: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._window: list[int] = []  # prefix ids, then read ids
        self._read_start = 0  # index in the window where unreleased ids begin
        self._prefix_text = ""  # decoded text of window[:read_start]

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became final with it."""
        self._window.append(token_id)
        text = self._decode(self._window)
        if len(text) <= len(self._prefix_text) or text.endswith(REPLACEMENT_CHARACTER):
            return ""
        released = text[len(self._prefix_text) :]

        # The ids just released become the next prefix.
        del self._window[: self._read_start]
        self._read_start = len(self._window)
        self._prefix_text = self._decode(self._window)
        return released

    def flush(self) -> str:
        """Release what is held at the end of the stream: an unfinished or
        invalid byte sequence comes out as U+FFFD."""
        text = self._decode(self._window)
        released = text[len(self._prefix_text) :]
        self._read_start = len(self._window)
        self._prefix_text = text
        return released

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special=self._skip_special)


class StopMatcher:
    """Cuts a stream of text where the first stop string in it begins.

    "First" is by start position over the whole stream: with stops "b" and
    "abc", the text "abc" is cut before the "a", although "b" is complete
    sooner. So `push` returns only text that no stop string can claim any
    more, and holds the rest: the longest suffix that is a proper prefix of
    some stop, plus any complete stop found after the start of that suffix.
    Since a held suffix is shorter than the longest stop, so is what is held.

    Once a stop is decided, the stop string and everything after it are
    dropped and every later push returns ("", True)."""

    def __init__(self, stops: Sequence[str]) -> None:
        for index, stop in enumerate(stops):
            if not isinstance(stop, str) or not stop:
                raise ValueError(
                    f"stop strings must be non-empty strings, but stop {index} "
                    f"is {stop!r}"
                )
        self._stops = tuple(dict.fromkeys(stops))
        self._stop_prefixes = frozenset(
            stop[:length] for stop in self._stops for length in range(1, len(stop))
        )
        # A suffix can start a stop only if its last character does; checking
        # that first keeps the common push to one set lookup.
        self._prefix_last_characters = frozenset(
            prefix[-1] for prefix in self._stop_prefixes
        )
        self._longest_prefix = max((len(stop) - 1 for stop in self._stops), default=0)
        self._held = ""
        self._stopped = False

    @property
    def stopped(self) -> bool:
        """Whether a stop string was found, by `push` or by `flush`."""
        return self._stopped

    def push(self, text: str) -> tuple[str, bool]:
        """Add a piece of text; return (text to emit, whether a stop was hit)."""
        if self._stopped:
            return "", True
        if not self._stops:
            return text, False
        buffer = self._held + text
        cut = self._first_stop(buffer)
        undecided = len(buffer) - self._held_suffix_length(buffer)
        if cut is not None and cut <= undecided:
            self._held = ""
            self._stopped = True
            return buffer[:cut], True
        self._held = buffer[undecided:]
        return buffer[:undecided], False

    def flush(self) -> str:
        """Release held text at the end of the stream, cut at a stop string
        in it if there is one (then `stopped` turns true)."""
        held, self._held = self._held, ""
        if self._stopped:
            return ""
        cut = self._first_stop(held)
        if cut is None:
            return held
        self._stopped = True
        return held[:cut]

    def _first_stop(self, buffer: str) -> int | None:
        starts = [at for at in map(buffer.find, self._stops) if at >= 0]
        return min(starts) if starts else None

    def _held_suffix_length(self, buffer: str) -> int:
        if not buffer or buffer[-1] not in self._prefix_last_characters:
            return 0
        for length in range(min(len(buffer), self._longest_prefix), 0, -1):
            if buffer[-length:] in self._stop_prefixes:
                return length
        return 0
