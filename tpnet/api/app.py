"""The OpenAI-compatible HTTP server in front of the engine.

`create_app` returns an aiohttp application serving /v1/chat/completions,
/v1/completions, /v1/models and /health. What it promises:

- Every error, whatever raised it (validation, the engine, aiohttp's router,
  an unexpected exception), reaches the client as OpenAI-shaped JSON:
  `{"error": {"message", "type", "param", "code"}}`. Errors found before the
  first response byte carry their own HTTP status; an engine error in the
  middle of a stream is sent as one `data: {"error": ...}` event, after which
  the stream ends without `[DONE]`.
- Capacity is checked (`engine.admit`) before any byte is sent, so a prompt
  too long is a 400, a full queue a 429 with `Retry-After`, a missing rank a
  503.
- Text is produced by the same code for streamed and whole responses: per
  choice, tokens go through an `IncrementalDetokenizer` and then a
  `StopMatcher`, so a stream never splits a UTF-8 character nor shows any
  part of a stop string, and its joined deltas equal the whole response.
- Every engine generator a request opened is closed (`aclose`) when the
  request ends for any reason: finished, stop string, error, or the client
  going away. A client that disconnects is noticed within
  `DISCONNECT_POLL_SECONDS` even when nothing is being written.
- `completion_tokens` counts every token the engine generated for the
  request, the end-of-turn token included (it was computed like any other),
  up to the token that ended the choice; tokens after a stop string are
  never generated because the sequence is closed there.
- `model` in a request may name anything; responses name the served model.
- One INFO line on logger `tpnet.api` per /v1 request: id, endpoint, prompt
  and completion tokens, seconds, outcome (finish reasons or error code).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web
from aiohttp.http_exceptions import ContentLengthError, PayloadEncodingError

from tpnet.api.schemas import (
    ChatRequest,
    CompletionRequest,
    RequestError,
    parse_chat_request,
    parse_completion_request,
    sampling_params,
)
from tpnet.engine.types import (
    ContextTooLong,
    EngineError,
    GenerationRequest,
    TokenOutput,
)
from tpnet.textstream import (
    REPLACEMENT_CHARACTER,
    IncrementalDetokenizer,
    StopMatcher,
)
from tpnet.tokenizer import ChatTemplateError

logger = logging.getLogger("tpnet.api")

# Request bodies are JSON text: 4 MiB holds a prompt of about a million
# tokens, more than any context we serve, and stops a client from making the
# server buffer arbitrary amounts before validation can refuse it.
MAX_BODY_BYTES = 4 * 1024 * 1024
# Events waiting between a request's sequences and the task writing them to
# the client. When a client reads slowly the queue fills and the sequences
# stop pulling tokens from the engine instead of buffering without bound.
STREAM_QUEUE_EVENTS = 64
# How often a request that is waiting for tokens checks whether its client is
# still connected: the cost of a wasted second of generation against polling.
DISCONNECT_POLL_SECONDS = 1.0
# Sent with 429 and 503 when the engine error names no better value: queues
# drain and clusters re-form on the order of seconds.
RETRY_AFTER_SECONDS = 1
# Prompts longer than this are tokenized on a worker thread so the event loop
# keeps streaming other requests; shorter ones take well under a millisecond,
# less than the thread hop would.
TOKENIZE_IN_THREAD_CHARS = 16_384
# Status recorded (never sent) for a request whose client went away; the
# value nginx uses for the same event.
CLIENT_CLOSED_STATUS = 499


class Engine(Protocol):
    """What the api layer needs from the engine."""

    max_context: int

    def admit(self, prompt_len: int, max_tokens: int | None, count: int) -> None: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenOutput]: ...

    def health(self) -> dict[str, Any]: ...


class Tokenizer(Protocol):
    """What the api layer needs from `tpnet.tokenizer.Tokenizer`."""

    eos_token_ids: frozenset[int]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str: ...

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]: ...


class ApiMetrics(Protocol):
    """Hooks a metrics exporter implements; all times are in seconds."""

    def request_finished(
        self, endpoint: str, status: int, prompt_tokens: int, completion_tokens: int
    ) -> None: ...

    def first_token(self, seconds: float) -> None: ...

    def inter_token(self, seconds: float) -> None: ...


def create_app(
    engine: Engine,
    tokenizer: Tokenizer,
    model_id: str,
    api_key: str | None = None,
    metrics: ApiMetrics | None = None,
) -> web.Application:
    """The HTTP application; with `api_key`, every /v1 request must carry
    `Authorization: Bearer <api_key>` (/health stays open)."""
    api = _Api(engine, tokenizer, model_id, api_key, metrics)
    app = web.Application(
        client_max_size=MAX_BODY_BYTES,
        middlewares=[api.observe, api.authenticate],
    )
    app.router.add_post("/v1/chat/completions", api.chat_completions)
    app.router.add_post("/v1/completions", api.completions)
    app.router.add_get("/v1/models", api.list_models)
    app.router.add_get("/v1/models/{model_id:.+}", api.get_model)
    app.router.add_get("/health", api.health)
    return app


@dataclass
class _RequestRecord:
    """What the per-request log line and metrics report; handlers fill it."""

    request_id: str
    endpoint: str
    started: float
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose cache was reused
    completion_tokens: int = 0
    outcome: str | None = None
    status: int | None = None  # overrides the response status when set


_RECORD = web.RequestKey("tpnet_api_record", _RequestRecord)


class _ClientGone(Exception):
    """The client closed its connection while its request was running."""


# --- events between a request's sequences and its writer ---------------------


@dataclass
class _Piece:
    """New text of one choice, the tokens it came from (only when logprobs
    are wanted) with the offset in the choice's text where each one's text
    starts, and how many tokens the engine generated (end-of-turn included)."""

    index: int
    text: str
    tokens: list[TokenOutput]
    offsets: list[int]
    generated: int
    finish_reason: str | None


@dataclass
class _Failure:
    index: int
    error: Exception


class _TextPipe:
    """One choice's text: detokenize, then hold back anything a stop string
    may claim."""

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str]) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._stops = StopMatcher(stops) if stops else None
        self.stopped = False
        self.released = 0  # characters the detokenizer has released so far

    def push(self, token_id: int) -> str:
        return self._filter(self._detokenizer.push(token_id))

    def finish(self) -> str:
        """The held text at the end of the choice."""
        if self.stopped:
            return ""
        text = self._filter(self._detokenizer.flush())
        if self._stops is not None and not self.stopped:
            text += self._stops.flush()
        return text

    def _filter(self, text: str) -> str:
        self.released += len(text)
        if self._stops is None or not text:
            return text
        safe, self.stopped = self._stops.push(text)
        return safe


class _Run:
    """The sequences of one request, each pulled by its own task into one
    bounded queue, so n choices and several prompts run concurrently."""

    def __init__(
        self,
        api: _Api,
        request: web.Request,
        sequences: list[tuple[int, GenerationRequest]],
        stops: Sequence[str],
        want_logprobs: bool,
        samples_per_prompt: int,
    ) -> None:
        self._api = api
        self._samples_per_prompt = samples_per_prompt
        # prompt index -> its reused prompt tokens (the most any sample had)
        self._cached: dict[int, int] = {}
        self._request = request
        self.record = request[_RECORD]
        self._stops = stops
        self._want_logprobs = want_logprobs
        self._queue: asyncio.Queue[_Piece | _Failure] = asyncio.Queue(
            STREAM_QUEUE_EVENTS
        )
        self._first_token_seen = False
        self.unfinished = len(sequences)
        self._tasks = [
            asyncio.create_task(self._pull(index, sequence))
            for index, sequence in sequences
        ]

    async def next_event(self) -> _Piece | _Failure:
        """The next piece or failure; raises `_ClientGone` once the client
        has disconnected."""
        while True:
            if _client_gone(self._request):
                raise _ClientGone
            if not self._queue.empty():
                return self._queue.get_nowait()
            try:
                return await asyncio.wait_for(
                    self._queue.get(), DISCONNECT_POLL_SECONDS
                )
            except TimeoutError:
                continue

    async def close(self) -> None:
        """Stop every sequence; each task closes its engine generator."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _pull(self, index: int, sequence: GenerationRequest) -> None:
        pipe = _TextPipe(self._api.tokenizer, self._stops)
        outputs: AsyncIterator[TokenOutput] | None = None
        pending: list[TokenOutput] = []
        offsets: list[int] = []
        generated = 0
        first_output = True
        last_token_at: float | None = None
        try:
            outputs = self._api.engine.generate(sequence)
            async for output in outputs:
                last_token_at = self._observe_token(last_token_at)
                if first_output:
                    self._count_cached(index, output.cached_prompt_tokens)
                    first_output = False
                generated += 1

                # The end-of-turn token is generated but is not text.
                end_of_turn = output.finish_reason == "stop"
                offset = pipe.released
                text = "" if end_of_turn else pipe.push(output.token_id)
                if self._want_logprobs and not end_of_turn:
                    pending.append(output)
                    offsets.append(offset)
                finish_reason = output.finish_reason
                if pipe.stopped or finish_reason is not None:
                    text += pipe.finish()
                    finish_reason = "stop" if pipe.stopped else finish_reason
                    await self._queue.put(
                        _Piece(index, text, pending, offsets, generated, finish_reason)
                    )
                    return
                if text:
                    await self._queue.put(
                        _Piece(index, text, pending, offsets, generated, None)
                    )
                    pending, offsets, generated = [], [], 0
            raise EngineError(
                f"the engine ended sequence {sequence.request_id} without a "
                f"finish reason"
            )
        except EngineError as error:
            await self._queue.put(_Failure(index, error))
        except Exception as error:
            logger.exception(
                "sequence %s of request %s failed",
                sequence.request_id,
                self.record.request_id,
            )
            await self._queue.put(_Failure(index, error))
        finally:
            # Closing frees the sequence in the engine; closing a generator
            # that already finished does nothing.
            aclose = getattr(outputs, "aclose", None)
            if aclose is not None:
                await aclose()

    def _count_cached(self, index: int, cached: int) -> None:
        """Usage counts each prompt once (n samples share it), so its cached
        tokens are those of the sample that reused the most."""
        prompt = index // self._samples_per_prompt
        before = self._cached.get(prompt, 0)
        if cached > before:
            self._cached[prompt] = cached
            self.record.cached_tokens += cached - before

    def _observe_token(self, last_token_at: float | None) -> float:
        now = time.monotonic()
        metrics = self._api.metrics
        if metrics is not None:
            if not self._first_token_seen:
                metrics.first_token(now - self.record.started)
            elif last_token_at is not None:
                metrics.inter_token(now - last_token_at)
        self._first_token_seen = True
        return now


def _client_closed(record: _RequestRecord) -> web.Response:
    """Record that the client went away; the response is never delivered."""
    record.outcome = "client_disconnected"
    record.status = CLIENT_CLOSED_STATUS
    return web.Response(status=CLIENT_CLOSED_STATUS, reason="Client Closed")


def _status_and_code(error: Exception) -> tuple[int, str]:
    if isinstance(error, EngineError):
        return error.status, error.code
    return 500, "internal_error"


def _client_gone(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


# --- response shapes ---------------------------------------------------------


@dataclass
class _Choice:
    """A whole (non-streamed) choice as it accumulates."""

    text: list[str] = field(default_factory=list)
    tokens: list[TokenOutput] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    finish_reason: str | None = None


class _Format:
    """How one endpoint shapes choices; the serving logic is shared."""

    id_prefix: str
    object_name: str
    prompt_param: str  # the request field a too-long prompt came from
    chunk_object_name: str

    def __init__(self, tokenizer: Tokenizer, want_logprobs: bool) -> None:
        self._tokenizer = tokenizer
        self.want_logprobs = want_logprobs

    def stream_opening(self, index: int) -> dict[str, Any] | None:
        """A choice's first streamed entry, sent before any token."""
        return None

    def stream_choice(self, piece: _Piece) -> dict[str, Any]:
        raise NotImplementedError

    def whole_choice(self, index: int, choice: _Choice) -> dict[str, Any]:
        raise NotImplementedError

    def _token_text(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id])

    def _token_bytes(self, token_id: int, text: str) -> bytes:
        """The bytes a token stands for. A token holding part of a UTF-8
        character decodes to U+FFFD alone, so its bytes come from its
        vocabulary entry; clients join them to rebuild the character."""
        id_to_token = getattr(self._tokenizer, "id_to_token", None)
        if REPLACEMENT_CHARACTER not in text or id_to_token is None:
            return text.encode()
        try:
            piece = id_to_token(token_id)
        except ValueError:
            return text.encode()
        byte_token = _BYTE_FALLBACK_TOKEN.fullmatch(piece)
        if byte_token is not None:
            return bytes([int(byte_token[1], 16)])
        if all(char in _BYTE_LEVEL_CHARS for char in piece):
            return bytes(_BYTE_LEVEL_CHARS[char] for char in piece)
        return text.encode()


class _ChatFormat(_Format):
    id_prefix = "chatcmpl-"
    object_name = "chat.completion"
    prompt_param = "messages"
    chunk_object_name = "chat.completion.chunk"

    def stream_opening(self, index: int) -> dict[str, Any]:
        return {
            "index": index,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }

    def stream_choice(self, piece: _Piece) -> dict[str, Any]:
        return {
            "index": piece.index,
            "delta": {"content": piece.text} if piece.text else {},
            "logprobs": self._logprobs(piece.tokens),
            "finish_reason": piece.finish_reason,
        }

    def whole_choice(self, index: int, choice: _Choice) -> dict[str, Any]:
        return {
            "index": index,
            "message": {"role": "assistant", "content": "".join(choice.text)},
            "logprobs": self._logprobs(choice.tokens),
            "finish_reason": choice.finish_reason,
        }

    def _logprobs(self, tokens: list[TokenOutput]) -> dict[str, Any] | None:
        if not self.want_logprobs:
            return None
        return {"content": [self._entry(token) for token in tokens]}

    def _entry(self, token: TokenOutput) -> dict[str, Any]:
        entry = self._alternative(token.token_id, token.logprob)
        entry["top_logprobs"] = [
            self._alternative(token_id, logprob)
            for token_id, logprob in token.top_logprobs or ()
        ]
        return entry

    def _alternative(self, token_id: int, logprob: float | None) -> dict[str, Any]:
        text = self._token_text(token_id)
        raw = self._token_bytes(token_id, text)
        return {"token": text, "logprob": logprob, "bytes": list(raw)}


class _CompletionFormat(_Format):
    """Legacy completions. With `echo`, a choice's text starts with its
    prompt; logprobs cover generated tokens only (the engine reports none for
    the prompt). A token's `text_offset` is where its text starts in the
    choice's text: a token ending inside a character shares the offset of the
    token that completes it."""

    id_prefix = "cmpl-"
    object_name = "text_completion"
    prompt_param = "prompt"
    chunk_object_name = "text_completion"

    def __init__(
        self, tokenizer: Tokenizer, want_logprobs: bool, echo_texts: dict[int, str]
    ) -> None:
        super().__init__(tokenizer, want_logprobs)
        self._echo_texts = echo_texts

    def stream_opening(self, index: int) -> dict[str, Any] | None:
        echo = self._echo_texts.get(index, "")
        if not echo:
            return None
        return {"index": index, "text": echo, "logprobs": None, "finish_reason": None}

    def stream_choice(self, piece: _Piece) -> dict[str, Any]:
        return {
            "index": piece.index,
            "text": piece.text,
            "logprobs": self._logprobs(piece.index, piece.tokens, piece.offsets),
            "finish_reason": piece.finish_reason,
        }

    def whole_choice(self, index: int, choice: _Choice) -> dict[str, Any]:
        return {
            "index": index,
            "text": self._echo_texts.get(index, "") + "".join(choice.text),
            "logprobs": self._logprobs(index, choice.tokens, choice.offsets),
            "finish_reason": choice.finish_reason,
        }

    def _logprobs(
        self, index: int, tokens: list[TokenOutput], offsets: list[int]
    ) -> dict[str, Any] | None:
        if not self.want_logprobs:
            return None
        echo_length = len(self._echo_texts.get(index, ""))
        return {
            "tokens": [self._token_text(token.token_id) for token in tokens],
            "token_logprobs": [token.logprob for token in tokens],
            "top_logprobs": [
                {
                    self._token_text(token_id): logprob
                    for token_id, logprob in token.top_logprobs or ()
                }
                for token in tokens
            ],
            "text_offset": [echo_length + offset for offset in offsets],
        }


# A SentencePiece byte-fallback token (`<0xE3>`) stands for one raw byte.
_BYTE_FALLBACK_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_chars() -> dict[str, int]:
    """Byte-level BPE vocabularies spell every byte as one visible character:
    printable Latin-1 bytes as themselves, the other bytes, in order, as the
    code points from 256 up. Maps each such character back to its byte."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    chars: dict[str, int] = {}
    shifted = 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + shifted)] = byte
            shifted += 1
    return chars


_BYTE_LEVEL_CHARS = _byte_level_chars()


def _error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def _error_body(
    status: int, message: str, param: str | None, code: str | None
) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": _error_type(status),
            "param": param,
            "code": code,
        }
    }


def _dumps(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"), default=str)


def _sse(data: Any) -> bytes:
    return f"data: {_dumps(data)}\n\n".encode()


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


async def _read_json(request: web.Request) -> Any:
    try:
        raw = await request.read()  # past client_max_size: HTTPRequestEntityTooLarge
    except (PayloadEncodingError, ContentLengthError) as error:
        # A body the client encoded wrongly (bad gzip, short body) is its fault.
        raise RequestError(
            f"request body could not be decoded: {error}", None, "invalid_body"
        ) from None
    if not raw.strip():
        raise RequestError("request body is empty; expected a JSON object", None)
    try:
        return json.loads(raw, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as error:
        raise RequestError(
            f"request body is not valid JSON: {error}", None, "invalid_json"
        ) from None


def _engine_error_message(error: Exception) -> str:
    return str(error) or (type(error).__doc__ or type(error).__name__).strip()


# --- the application ---------------------------------------------------------


class _Api:
    def __init__(
        self,
        engine: Engine,
        tokenizer: Tokenizer,
        model_id: str,
        api_key: str | None,
        metrics: ApiMetrics | None,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.metrics = metrics
        self._api_key = api_key.encode() if api_key is not None else None
        self._created = int(time.time())

    # Middlewares. `observe` is outermost: it gives each request its record,
    # turns every failure into OpenAI-shaped JSON, then logs and measures.

    @web.middleware
    async def observe(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        record = _RequestRecord(
            request_id=f"req-{uuid.uuid4().hex}",
            endpoint=_endpoint_label(request),
            started=time.monotonic(),
        )
        request[_RECORD] = record
        response: web.StreamResponse | None = None
        try:
            response = await self._shaped(request, handler)
            if not response.prepared:
                response.headers["X-Request-Id"] = record.request_id
            return response
        except asyncio.CancelledError:
            # aiohttp cancels the handler when the client goes away (if so
            # configured); the handler has already closed its sequences.
            record.outcome = record.outcome or "client_disconnected"
            record.status = CLIENT_CLOSED_STATUS
            raise
        finally:
            status = record.status or (response.status if response else 500)
            self._report(request, record, status)

    async def _shaped(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        try:
            response: web.StreamResponse = await handler(request)
            return response
        except RequestError as error:
            return self._error(
                request, error.status, error.message, error.param, error.code
            )
        except EngineError as error:
            return self._engine_error(request, error)
        except web.HTTPException as error:
            if error.status < 400:
                raise
            return self._http_error(request, error)
        except ConnectionResetError:
            return _client_closed(request[_RECORD])
        except Exception:
            record = request[_RECORD]
            logger.exception(
                "request %s to %s failed unexpectedly", record.request_id, request.path
            )
            return self._error(
                request,
                500,
                f"internal server error while serving request {record.request_id}; "
                f"the server log has the details",
                None,
                "internal_error",
            )

    @web.middleware
    async def authenticate(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        if self._api_key is None or not (
            request.path == "/v1" or request.path.startswith("/v1/")
        ):
            response: web.StreamResponse = await handler(request)
            return response
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode("utf-8", "replace"), self._api_key
        ):
            response = await handler(request)
            return response
        return self._error(
            request,
            401,
            "missing or invalid API key: expected the header "
            "'Authorization: Bearer <key>'",
            None,
            "invalid_api_key",
            {"WWW-Authenticate": "Bearer"},
        )

    # Handlers.

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        chat = parse_chat_request(await _read_json(request))
        messages = [
            {"role": message.role, "content": message.content}
            for message in chat.messages
        ]
        size = sum(len(message.content) for message in chat.messages)
        try:
            prompt = await _off_loop_if_large(
                size, self.tokenizer.apply_chat_template, messages, True
            )
        except ChatTemplateError as error:
            raise RequestError(
                f"the model's chat template refused these messages: {error}",
                "messages",
            ) from None
        self._check_logit_bias(chat)
        return await self._serve(
            request, chat, [prompt], _ChatFormat(self.tokenizer, chat.logprobs)
        )

    async def completions(self, request: web.Request) -> web.StreamResponse:
        completion = parse_completion_request(await _read_json(request))
        single = len(completion.prompts) == 1
        prompts: list[list[int]] = []
        echo_texts: dict[int, str] = {}
        for prompt_index, prompt in enumerate(completion.prompts):
            param = "prompt" if single else f"prompt[{prompt_index}]"
            if isinstance(prompt, str):
                ids = await _off_loop_if_large(
                    len(prompt), self.tokenizer.encode, prompt
                )
                text = prompt
            else:
                ids = list(prompt)
                self._check_token_ids(ids, param)
                text = self.tokenizer.decode(ids) if completion.echo else ""
            if not ids:
                raise RequestError(
                    f"{param} encodes to no tokens; the model needs at least one",
                    param,
                )
            prompts.append(ids)
            if completion.echo:
                first = prompt_index * completion.n
                for index in range(first, first + completion.n):
                    echo_texts[index] = text
        self._check_logit_bias(completion)
        fmt = _CompletionFormat(
            self.tokenizer, completion.logprobs is not None, echo_texts
        )
        return await self._serve(request, completion, prompts, fmt)

    async def list_models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [self._model_card()]}, dumps=_dumps
        )

    async def get_model(self, request: web.Request) -> web.Response:
        requested = request.match_info["model_id"]
        if requested != self.model_id:
            return self._error(
                request,
                404,
                f"model {requested!r} does not exist; this server serves "
                f"{self.model_id!r}",
                "model",
                "model_not_found",
            )
        return web.json_response(self._model_card(), dumps=_dumps)

    async def health(self, request: web.Request) -> web.Response:
        try:
            health = dict(self.engine.health())
        except Exception:
            logger.exception("engine health check failed")
            health = {"ok": False, "error": "the engine health check failed"}
        if health.get("ok"):
            return web.json_response({"status": "ok", **health}, dumps=_dumps)
        missing = health.get("missing_ranks")
        message = (
            f"cluster unavailable: missing ranks {missing} of world size "
            f"{health.get('world_size')}"
            if missing
            else "cluster unavailable"
        )
        body = {
            "status": "unavailable",
            **health,
            **_error_body(503, message, None, "cluster_unavailable"),
        }
        request[_RECORD].outcome = "cluster_unavailable"
        return web.json_response(body, status=503, dumps=_dumps)

    # Serving a generation request.

    async def _serve(
        self,
        request: web.Request,
        options: ChatRequest | CompletionRequest,
        prompts: list[list[int]],
        fmt: _Format,
    ) -> web.StreamResponse:
        record = request[_RECORD]
        record.request_id = fmt.id_prefix + record.request_id.removeprefix("req-")
        record.prompt_tokens = sum(len(prompt) for prompt in prompts)

        # 1. Refuse before any byte is sent if the engine cannot take it.
        count = len(prompts) * options.n
        try:
            self.engine.admit(max(map(len, prompts)), options.max_tokens, count)
        except ContextTooLong as error:
            # The client's prompt is at fault: name the field it came from.
            raise RequestError(
                f"{fmt.prompt_param} is too long: {_engine_error_message(error)}",
                fmt.prompt_param,
                error.code,
            ) from None

        # 2. Start every sequence: choice p * n + i is sample i of prompt p.
        stop_token_ids = frozenset(self.tokenizer.eos_token_ids)
        sequences = []
        for prompt_index, prompt in enumerate(prompts):
            for sample in range(options.n):
                index = prompt_index * options.n + sample
                sequences.append(
                    (
                        index,
                        GenerationRequest(
                            request_id=f"{record.request_id}-{index}",
                            prompt_ids=prompt,
                            max_tokens=options.max_tokens,
                            sampling=sampling_params(options, index),
                            stop_token_ids=stop_token_ids,
                            speculative=options.speculative,
                        ),
                    )
                )
        run = _Run(self, request, sequences, options.stop, fmt.want_logprobs, options.n)

        # 3. Answer, and whatever happens close every sequence.
        try:
            if options.stream:
                return await self._stream(request, options, run, fmt, count)
            return await self._whole(request, run, fmt, count)
        except (_ClientGone, ConnectionResetError):
            return _client_closed(record)
        finally:
            await run.close()

    async def _whole(
        self, request: web.Request, run: _Run, fmt: _Format, count: int
    ) -> web.Response:
        record = request[_RECORD]
        choices = {index: _Choice() for index in range(count)}
        while run.unfinished:
            event = await run.next_event()
            if isinstance(event, _Failure):
                return self._failure(request, event)
            choice = choices[event.index]
            choice.text.append(event.text)
            choice.tokens.extend(event.tokens)
            choice.offsets.extend(event.offsets)
            record.completion_tokens += event.generated
            if event.finish_reason is not None:
                choice.finish_reason = event.finish_reason
                run.unfinished -= 1
        record.outcome = _finish_outcome(c.finish_reason for c in choices.values())
        body = {
            **self._envelope(record, fmt.object_name),
            "choices": [fmt.whole_choice(i, c) for i, c in choices.items()],
            "usage": self._usage(record),
        }
        return web.json_response(body, dumps=_dumps)

    async def _stream(
        self,
        request: web.Request,
        options: ChatRequest | CompletionRequest,
        run: _Run,
        fmt: _Format,
        count: int,
    ) -> web.StreamResponse:
        record = request[_RECORD]

        # 1. Wait for the first event: an error before it keeps its status.
        event = await run.next_event()
        if isinstance(event, _Failure):
            return self._failure(request, event)

        # 2. Open the stream and relay events until the end.
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",  # proxies must not batch events
                "X-Request-Id": record.request_id,
            }
        )
        await response.prepare(request)
        try:
            await self._relay(response, options, run, fmt, count, event)
        except (_ClientGone, ConnectionResetError):
            _client_closed(record)  # nothing more can be sent
        return response

    async def _relay(
        self,
        response: web.StreamResponse,
        options: ChatRequest | CompletionRequest,
        run: _Run,
        fmt: _Format,
        count: int,
        event: _Piece | _Failure,
    ) -> None:
        """Write the events of an open stream, starting with `event`."""
        record = run.record
        envelope = self._envelope(record, fmt.chunk_object_name)

        def chunk(choices: list[dict[str, Any]], usage: Any = None) -> bytes:
            data = {**envelope, "choices": choices}
            if options.include_usage:
                data["usage"] = usage
            return _sse(data)

        # 1. Open each choice (chat: the assistant role; completions: echo).
        for index in range(count):
            opening = fmt.stream_opening(index)
            if opening is not None:
                await response.write(chunk([opening]))

        # 2. Relay events until every choice has finished or one failed.
        finish_reasons: list[str | None] = []
        while True:
            if isinstance(event, _Failure):
                status, code = _status_and_code(event.error)
                record.outcome, record.status = code, status
                message = self._failure_message(record, event.error)
                await response.write(_sse(_error_body(status, message, None, code)))
                return
            record.completion_tokens += event.generated
            await response.write(chunk([fmt.stream_choice(event)]))
            if event.finish_reason is not None:
                finish_reasons.append(event.finish_reason)
                run.unfinished -= 1
                if not run.unfinished:
                    break
            event = await run.next_event()

        # 3. Usage, if asked for, then the end marker.
        record.outcome = _finish_outcome(finish_reasons)
        if options.include_usage:
            await response.write(chunk([], self._usage(record)))
        await response.write(b"data: [DONE]\n\n")

    # Pieces of responses.

    def _envelope(self, record: _RequestRecord, object_name: str) -> dict[str, Any]:
        return {
            "id": record.request_id,
            "object": object_name,
            "created": int(time.time()),
            "model": self.model_id,
        }

    @staticmethod
    def _usage(record: _RequestRecord) -> dict[str, Any]:
        return {
            "prompt_tokens": record.prompt_tokens,
            "completion_tokens": record.completion_tokens,
            "total_tokens": record.prompt_tokens + record.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": record.cached_tokens},
        }

    def _model_card(self) -> dict[str, Any]:
        return {
            "id": self.model_id,
            "object": "model",
            "created": self._created,
            "owned_by": "tpnet",
            "max_model_len": self.engine.max_context,
        }

    def _check_token_ids(self, ids: Iterable[int], param: str) -> None:
        vocab_size = getattr(self.tokenizer, "vocab_size", None)
        if not isinstance(vocab_size, int):
            return
        for position, token_id in enumerate(ids):
            if token_id >= vocab_size:
                raise RequestError(
                    f"{param}[{position}] must be a token id below the "
                    f"vocabulary size {vocab_size}, got {token_id}",
                    f"{param}[{position}]",
                )

    def _check_logit_bias(self, options: ChatRequest | CompletionRequest) -> None:
        vocab_size = getattr(self.tokenizer, "vocab_size", None)
        if not isinstance(vocab_size, int):
            return
        for token_id in options.logit_bias:
            if token_id >= vocab_size:
                raise RequestError(
                    f"logit_bias keys must be token ids below the vocabulary "
                    f"size {vocab_size}, got {token_id}",
                    f"logit_bias.{token_id}",
                )

    # Errors.

    def _error(
        self,
        request: web.Request,
        status: int,
        message: str,
        param: str | None,
        code: str | None,
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        record = request.get(_RECORD)
        if record is not None and record.outcome is None:
            record.outcome = code or str(status)
        return web.json_response(
            _error_body(status, message, param, code),
            status=status,
            headers=headers,
            dumps=_dumps,
        )

    def _engine_error(self, request: web.Request, error: EngineError) -> web.Response:
        headers = None
        if error.status in (429, 503):
            retry_after = getattr(error, "retry_after", RETRY_AFTER_SECONDS)
            headers = {"Retry-After": str(max(1, round(retry_after)))}
        return self._error(
            request,
            error.status,
            _engine_error_message(error),
            None,
            error.code,
            headers,
        )

    def _failure(self, request: web.Request, failure: _Failure) -> web.Response:
        """The answer to a sequence that failed before any byte was sent."""
        error = failure.error
        if isinstance(error, EngineError):
            return self._engine_error(request, error)
        record = request[_RECORD]
        return self._error(
            request, 500, self._failure_message(record, error), None, "internal_error"
        )

    @staticmethod
    def _failure_message(record: _RequestRecord, error: Exception) -> str:
        if isinstance(error, EngineError):
            return _engine_error_message(error)
        return (
            f"internal server error while generating for request "
            f"{record.request_id}; the server log has the details"
        )

    def _http_error(
        self, request: web.Request, error: web.HTTPException
    ) -> web.Response:
        headers = None
        code: str | None = None
        if isinstance(error, web.HTTPNotFound):
            message = f"no such endpoint: {request.method} {request.path}"
            code = "not_found"
        elif isinstance(error, web.HTTPMethodNotAllowed):
            allowed = ", ".join(sorted(error.allowed_methods))
            message = (
                f"method {error.method} is not allowed on {request.path}; "
                f"allowed: {allowed}"
            )
            code = "method_not_allowed"
            headers = {"Allow": error.headers["Allow"]}
        elif isinstance(error, web.HTTPRequestEntityTooLarge):
            message = f"request body is larger than the {MAX_BODY_BYTES}-byte limit"
            code = "request_too_large"
        else:
            message = error.text or error.reason
        return self._error(request, error.status, message, None, code, headers)

    # Reporting.

    def _report(
        self, request: web.Request, record: _RequestRecord, status: int
    ) -> None:
        seconds = time.monotonic() - record.started
        outcome = record.outcome or str(status)
        # Health checks arrive every few seconds from load balancers: they
        # are logged quietly and not counted as requests.
        is_health_check = record.endpoint == "/health"
        level = logging.DEBUG if is_health_check else logging.INFO
        logger.log(
            level,
            "%s %s %s prompt_tokens=%d completion_tokens=%d seconds=%.3f "
            "status=%d outcome=%s",
            record.request_id,
            request.method,
            record.endpoint,
            record.prompt_tokens,
            record.completion_tokens,
            seconds,
            status,
            outcome,
        )
        if self.metrics is not None and not is_health_check:
            try:
                self.metrics.request_finished(
                    record.endpoint,
                    status,
                    record.prompt_tokens,
                    record.completion_tokens,
                )
            except Exception:
                logger.exception("metrics hook failed for %s", record.request_id)


def _endpoint_label(request: web.Request) -> str:
    """The route's pattern (never the raw path, so labels stay few)."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def _finish_outcome(reasons: Iterable[str | None]) -> str:
    return ",".join(sorted({reason or "none" for reason in reasons}))


async def _off_loop_if_large(
    size: int, function: Callable[..., Any], *args: Any
) -> Any:
    """Run tokenizer work on a thread when the text is large."""
    if size > TOKENIZE_IN_THREAD_CHARS:
        return await asyncio.to_thread(function, *args)
    return function(*args)
