"""Validation of OpenAI-style request bodies, with no I/O.

`parse_chat_request` and `parse_completion_request` take the decoded JSON body
of /v1/chat/completions and /v1/completions and either return a typed, frozen
request or raise `RequestError`. A `RequestError` names the offending field as
a path (`messages[1].content[0].type`) and says what was expected and what
arrived, so the HTTP layer can answer 400 with no further thought.

What this module promises:

- Every number is checked against its bound (OpenAI's where one exists), both
  for type and range; booleans are never taken for numbers.
- `null` means "use the default" for every optional field, as in OpenAI.
- Fields this server does not know are ignored: OpenAI clients send extras.
  Fields it knows but cannot honour (tools, `suffix`, non-text content parts,
  a `tool` role, JSON response formats) are refused, because ignoring them
  would silently answer a different question than the one asked.
- The `model` field is accepted whatever model it names; the server answers
  with the id of the model it serves.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from tpnet.engine.types import SamplingParams

# Bounds on request fields. Where OpenAI documents a bound we use it; the rest
# keep one request from costing the cluster far more than its peers.
MAX_N = 16  # choices per prompt; each is a full sequence in the batch
MAX_PROMPTS = 64  # prompts in one /v1/completions batch
# Sequences started by one request (prompts x n): the engine's batch is shared,
# and one request past this should be several requests.
MAX_CHOICES_PER_REQUEST = 64
MAX_STOP_SEQUENCES = 4  # OpenAI's limit
# The stop matcher holds back up to len(stop) - 1 characters of every stream,
# so a long stop string delays streaming by that much; 512 covers real use.
MAX_STOP_CHARS = 512
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for the legacy completions API
MAX_LOGIT_BIAS_ENTRIES = 300  # each entry touches every decoding step
LOGIT_BIAS_RANGE = (-100, 100)
# Token ids and token counts stay within a signed 32-bit integer so no later
# stage (tensors, wire frames) has to think about overflow.
MAX_TOKEN_ID = 2**31 - 1
MAX_TOKENS_LIMIT = 2**31 - 1
# Seeds are signed 64-bit integers: what a torch generator accepts.
SEED_RANGE = (-(2**63), 2**63 - 1)

CHAT_ROLES = ("system", "developer", "user", "assistant")
# "developer" is OpenAI's newer name for "system"; chat templates know "system".
_ROLE_ALIASES = {"developer": "system"}
_TOKEN_ID_KEY = re.compile(r"[0-9]{1,10}")


class RequestError(ValueError):
    """The client sent a request this server refuses. `param` is the path of
    the offending field (None for the body as a whole) and `code` a short
    machine-readable reason in the style of OpenAI's error codes."""

    status = 400

    def __init__(
        self, message: str, param: str | None, code: str = "invalid_value"
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


@dataclass(frozen=True)
class ChatMessage:
    """One chat turn; `role` is already normalised ("developer" -> "system")
    and `content` is plain text (text parts joined with newlines)."""

    role: str
    content: str


@dataclass(frozen=True, kw_only=True)
class RequestOptions:
    """Fields shared by chat and completion requests; defaults follow OpenAI,
    except that `max_tokens` None means "until end of turn or the context is
    full" for both endpoints."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    n: int = 1
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    user: str | None = None
    speculative: bool = True


@dataclass(frozen=True, kw_only=True)
class ChatRequest(RequestOptions):
    messages: tuple[ChatMessage, ...]
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass(frozen=True, kw_only=True)
class CompletionRequest(RequestOptions):
    """`prompts` holds one entry per prompt: text, or token ids as a tuple.
    Choice `i` of prompt `p` has index `p * n + i` in the response."""

    prompts: tuple[str | tuple[int, ...], ...]
    echo: bool = False
    logprobs: int | None = None  # None: no logprobs; k: k alternatives each


def parse_chat_request(body: Any) -> ChatRequest:
    """Validate a /v1/chat/completions body."""
    fields = _object_body(body)
    messages = _messages(fields)
    _refuse_tools(fields)
    logprobs = _boolean(fields, "logprobs", default=False)
    top_logprobs = _integer(fields, "top_logprobs", low=0, high=MAX_TOP_LOGPROBS)
    if top_logprobs is not None and not logprobs:
        raise RequestError(
            f"top_logprobs requires logprobs to be true, got top_logprobs="
            f"{top_logprobs} with logprobs={_describe(fields.get('logprobs'))}",
            "top_logprobs",
        )
    return ChatRequest(
        messages=messages,
        logprobs=logprobs,
        top_logprobs=top_logprobs or 0,
        **_common_options(fields),
    )


def parse_completion_request(body: Any) -> CompletionRequest:
    """Validate a /v1/completions body."""
    fields = _object_body(body)
    prompts = _prompts(fields)
    suffix = fields.get("suffix")
    if suffix is not None and suffix != "":
        raise RequestError(
            f"suffix is not supported (insertion is not implemented), "
            f"got {_describe(suffix)}",
            "suffix",
            "unsupported_parameter",
        )
    options = _common_options(fields)
    best_of = _integer(fields, "best_of", low=1, high=MAX_N)
    if best_of is not None and best_of != options["n"]:
        raise RequestError(
            f"best_of must equal n (ranking candidates on the server is not "
            f"supported), got best_of={best_of} with n={options['n']}",
            "best_of",
            "unsupported_value",
        )
    choices = len(prompts) * options["n"]
    if choices > MAX_CHOICES_PER_REQUEST:
        raise RequestError(
            f"the number of prompts times n must be at most "
            f"{MAX_CHOICES_PER_REQUEST}, got {len(prompts)} prompts x "
            f"n={options['n']} = {choices}",
            "n",
        )
    return CompletionRequest(
        prompts=prompts,
        echo=_boolean(fields, "echo", default=False),
        logprobs=_integer(fields, "logprobs", low=0, high=MAX_COMPLETION_LOGPROBS),
        **options,
    )


def sampling_params(
    request: ChatRequest | CompletionRequest, choice_index: int = 0
) -> SamplingParams:
    """The engine's sampling options for one choice of `request`.

    With a seed, choice i samples with seed + i (wrapped to 64 bits), so n > 1
    gives n different but reproducible answers and choice 0 uses the seed as
    given."""
    seed = request.seed
    if seed is not None and choice_index:
        low, high = SEED_RANGE
        seed = (seed + choice_index - low) % (high - low + 1) + low
    if isinstance(request, ChatRequest):
        logprobs, top_logprobs = request.logprobs, request.top_logprobs
    else:
        logprobs = request.logprobs is not None
        top_logprobs = request.logprobs or 0
    return SamplingParams(
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,
        min_p=request.min_p,
        seed=seed,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        repetition_penalty=request.repetition_penalty,
        logit_bias=dict(request.logit_bias),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )


# --- shared fields ---------------------------------------------------------


def _object_body(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise RequestError(
            f"request body must be a JSON object, got {_describe(body)}", None
        )
    return body


def _common_options(fields: dict[str, Any]) -> dict[str, Any]:
    """Options shared by both endpoints, as keyword arguments."""
    stream = _boolean(fields, "stream", default=False)
    return {
        "model": _string(fields, "model"),
        "max_tokens": _max_tokens(fields),
        "temperature": _number(fields, "temperature", 1.0, low=0, high=2),
        "top_p": _number(fields, "top_p", 1.0, low=0, high=1, low_open=True),
        "top_k": _integer(fields, "top_k", low=0) or 0,
        "min_p": _number(fields, "min_p", 0.0, low=0, high=1),
        "seed": _integer(fields, "seed", low=SEED_RANGE[0], high=SEED_RANGE[1]),
        "presence_penalty": _number(fields, "presence_penalty", 0.0, low=-2, high=2),
        "frequency_penalty": _number(fields, "frequency_penalty", 0.0, low=-2, high=2),
        "repetition_penalty": _number(
            fields, "repetition_penalty", 1.0, low=0, low_open=True
        ),
        "logit_bias": _logit_bias(fields),
        "n": _integer(fields, "n", low=1, high=MAX_N) or 1,
        "stop": _stop(fields),
        "stream": stream,
        "include_usage": _include_usage(fields, stream),
        "user": _string(fields, "user"),
        "speculative": _boolean(fields, "speculative", default=True),
    }


def _max_tokens(fields: dict[str, Any]) -> int | None:
    """`max_completion_tokens` is OpenAI's newer name for `max_tokens`; when
    both are given it wins, as it does in OpenAI's API."""
    legacy = _integer(fields, "max_tokens", low=1, high=MAX_TOKENS_LIMIT)
    current = _integer(fields, "max_completion_tokens", low=1, high=MAX_TOKENS_LIMIT)
    return current if current is not None else legacy


def _stop(fields: dict[str, Any]) -> tuple[str, ...]:
    value = fields.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        _check_stop_string(value, "stop")
        return (value,)
    if not isinstance(value, list):
        raise RequestError(
            f"stop must be a string or a list of up to {MAX_STOP_SEQUENCES} "
            f"strings, got {_describe(value)}",
            "stop",
        )
    if len(value) > MAX_STOP_SEQUENCES:
        raise RequestError(
            f"stop must hold at most {MAX_STOP_SEQUENCES} strings, got {len(value)}",
            "stop",
        )
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise RequestError(
                f"stop[{index}] must be a string, got {_describe(item)}",
                f"stop[{index}]",
            )
        _check_stop_string(item, f"stop[{index}]")
    return tuple(value)


def _check_stop_string(value: str, param: str) -> None:
    if not value:
        raise RequestError(f"{param} must be a non-empty string, got ''", param)
    if len(value) > MAX_STOP_CHARS:
        raise RequestError(
            f"{param} must be at most {MAX_STOP_CHARS} characters, got {len(value)}",
            param,
        )


def _logit_bias(fields: dict[str, Any]) -> dict[int, float]:
    value = fields.get("logit_bias")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RequestError(
            f"logit_bias must be an object mapping token ids to biases, "
            f"got {_describe(value)}",
            "logit_bias",
        )
    if len(value) > MAX_LOGIT_BIAS_ENTRIES:
        raise RequestError(
            f"logit_bias must have at most {MAX_LOGIT_BIAS_ENTRIES} entries, "
            f"got {len(value)}",
            "logit_bias",
        )
    biases: dict[int, float] = {}
    low, high = LOGIT_BIAS_RANGE
    for key, bias in value.items():
        param = f"logit_bias.{key}"
        valid = isinstance(key, str) and _TOKEN_ID_KEY.fullmatch(key) is not None
        if not valid or int(key) > MAX_TOKEN_ID:
            raise RequestError(
                f"logit_bias keys must be token ids (decimal integers from 0 "
                f"to {MAX_TOKEN_ID}), got {key!r}",
                param,
            )
        biases[int(key)] = _check_number(bias, param, low=low, high=high)
    return biases


def _include_usage(fields: dict[str, Any], stream: bool) -> bool:
    options = fields.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise RequestError(
            "stream_options is only allowed when stream is true", "stream_options"
        )
    if not isinstance(options, dict):
        raise RequestError(
            f"stream_options must be an object, got {_describe(options)}",
            "stream_options",
        )
    usage = options.get("include_usage")
    if usage is None:
        return False
    if not isinstance(usage, bool):
        raise RequestError(
            f"stream_options.include_usage must be a boolean, got {_describe(usage)}",
            "stream_options.include_usage",
        )
    return usage


# --- chat messages -----------------------------------------------------------


def _messages(fields: dict[str, Any]) -> tuple[ChatMessage, ...]:
    value = fields.get("messages")
    if value is None:
        raise RequestError(
            "messages is required: a non-empty list of {role, content} objects",
            "messages",
            "missing_required_parameter",
        )
    if not isinstance(value, list):
        raise RequestError(
            f"messages must be a list of message objects, got {_describe(value)}",
            "messages",
        )
    if not value:
        raise RequestError(
            "messages must contain at least one message, got an empty list",
            "messages",
        )
    return tuple(_message(item, index) for index, item in enumerate(value))


def _message(item: Any, index: int) -> ChatMessage:
    path = f"messages[{index}]"
    if not isinstance(item, dict):
        raise RequestError(
            f"{path} must be an object with role and content, got {_describe(item)}",
            path,
        )
    role = item.get("role")
    if role == "tool" or role == "function":
        raise RequestError(
            f"{path}.role {role!r} is not supported: this server does not run "
            f"tools; expected one of {', '.join(CHAT_ROLES)}",
            f"{path}.role",
            "unsupported_value",
        )
    if not isinstance(role, str) or role not in CHAT_ROLES:
        raise RequestError(
            f"{path}.role must be one of {', '.join(CHAT_ROLES)}, "
            f"got {_describe(role)}",
            f"{path}.role",
        )
    if item.get("tool_calls"):
        raise RequestError(
            f"{path}.tool_calls is not supported: this server does not run tools",
            f"{path}.tool_calls",
            "unsupported_parameter",
        )
    content = item.get("content")
    if content is None and role == "assistant":
        # OpenAI lets an assistant turn have null content (it then carried
        # tool calls, refused above); as plain history it is an empty turn.
        content = ""
    return ChatMessage(
        role=_ROLE_ALIASES.get(role, role), content=_content(content, path)
    )


def _content(content: Any, path: str) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        raise RequestError(
            f"{path}.content is required: a string or a list of text parts",
            f"{path}.content",
            "missing_required_parameter",
        )
    if not isinstance(content, list):
        raise RequestError(
            f"{path}.content must be a string or a list of text parts, "
            f"got {_describe(content)}",
            f"{path}.content",
        )
    texts = []
    for index, part in enumerate(content):
        part_path = f"{path}.content[{index}]"
        if not isinstance(part, dict):
            raise RequestError(
                f"{part_path} must be an object like "
                f'{{"type": "text", "text": "..."}}, got {_describe(part)}',
                part_path,
            )
        kind = part.get("type")
        if kind != "text":
            raise RequestError(
                f"{part_path}.type must be 'text' (this model reads text only), "
                f"got {_describe(kind)}",
                f"{part_path}.type",
                "unsupported_value" if isinstance(kind, str) else "invalid_value",
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise RequestError(
                f"{part_path}.text must be a string, got {_describe(text)}",
                f"{part_path}.text",
            )
        texts.append(text)
    # Parts are separate pieces of one turn; a newline keeps them from running
    # into each other, as other OpenAI-compatible servers do.
    return "\n".join(texts)


def _refuse_tools(fields: dict[str, Any]) -> None:
    for name in ("tools", "functions"):
        if fields.get(name):
            raise RequestError(
                f"{name} is not supported: this server does not run tools",
                name,
                "unsupported_parameter",
            )
    response_format = fields.get("response_format")
    if response_format is None:
        return
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind != "text":
        raise RequestError(
            f"response_format.type must be 'text' (structured output is not "
            f"supported), got {_describe(kind)}",
            "response_format.type",
            "unsupported_value",
        )


# --- completion prompts ------------------------------------------------------

_PROMPT_FORMS = (
    "a string, a list of strings, a list of token ids or a list of token-id lists"
)


def _prompts(fields: dict[str, Any]) -> tuple[str | tuple[int, ...], ...]:
    value = fields.get("prompt")
    if value is None:
        raise RequestError(
            f"prompt is required: {_PROMPT_FORMS}",
            "prompt",
            "missing_required_parameter",
        )
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list):
        raise RequestError(
            f"prompt must be {_PROMPT_FORMS}, got {_describe(value)}", "prompt"
        )
    if not value:
        raise RequestError("prompt must not be an empty list", "prompt")
    first = value[0]
    if _is_integer(first):
        return (_token_ids(value, "prompt"),)
    if len(value) > MAX_PROMPTS:
        raise RequestError(
            f"prompt must hold at most {MAX_PROMPTS} prompts, got {len(value)}",
            "prompt",
        )
    if isinstance(first, str):
        for index, item in enumerate(value):
            if not isinstance(item, str):
                raise RequestError(
                    f"prompt[{index}] must be a string like prompt[0], "
                    f"got {_describe(item)}",
                    f"prompt[{index}]",
                )
        return tuple(value)
    if isinstance(first, list):
        prompts: list[str | tuple[int, ...]] = []
        for index, item in enumerate(value):
            path = f"prompt[{index}]"
            if not isinstance(item, list) or not item:
                raise RequestError(
                    f"{path} must be a non-empty list of token ids like "
                    f"prompt[0], got {_describe(item)}",
                    path,
                )
            prompts.append(_token_ids(item, path))
        return tuple(prompts)
    raise RequestError(
        f"prompt must be {_PROMPT_FORMS}, got a list starting with {_describe(first)}",
        "prompt[0]",
    )


def _token_ids(items: list[Any], path: str) -> tuple[int, ...]:
    for index, item in enumerate(items):
        if not _is_integer(item) or not 0 <= item <= MAX_TOKEN_ID:
            raise RequestError(
                f"{path}[{index}] must be a token id (an integer from 0 to "
                f"{MAX_TOKEN_ID}), got {_describe(item)}",
                f"{path}[{index}]",
            )
    return tuple(items)


# --- scalar fields -----------------------------------------------------------


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _boolean(fields: dict[str, Any], name: str, *, default: bool) -> bool:
    value = fields.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be a boolean, got {_describe(value)}", name)
    return value


def _string(fields: dict[str, Any], name: str) -> str | None:
    value = fields.get(name)
    if value is not None and not isinstance(value, str):
        raise RequestError(f"{name} must be a string, got {_describe(value)}", name)
    return value


def _integer(
    fields: dict[str, Any],
    name: str,
    *,
    low: int | None = None,
    high: int | None = None,
) -> int | None:
    value = fields.get(name)
    if value is None:
        return None
    if not _is_integer(value):
        raise RequestError(f"{name} must be an integer, got {_describe(value)}", name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise RequestError(
            f"{name} must be {_bounds(low, high, False)}, got {value}", name
        )
    return int(value)


def _number(
    fields: dict[str, Any],
    name: str,
    default: float,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
) -> float:
    value = fields.get(name)
    if value is None:
        return default
    return _check_number(value, name, low=low, high=high, low_open=low_open)


def _check_number(
    value: Any,
    param: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise RequestError(f"{param} must be a number, got {_describe(value)}", param)
    number = float(value)
    in_range = math.isfinite(number) and not (
        (low is not None and (number < low or (low_open and number == low)))
        or (high is not None and number > high)
    )
    if not in_range:
        raise RequestError(
            f"{param} must be {_bounds(low, high, low_open)}, got {value!r}",
            param,
        )
    return number


def _bounds(low: float | None, high: float | None, low_open: bool) -> str:
    """Says a range in words: "between 0 and 2", "greater than 0"."""
    if low is not None and high is not None and not low_open:
        return f"between {low} and {high}"
    words = []
    if low is not None:
        words.append(f"greater than {low}" if low_open else f"at least {low}")
    if high is not None:
        words.append(f"at most {high}")
    return " and ".join(words) or "a finite number"


def _describe(value: Any) -> str:
    """A short description of a JSON value for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"the string {shown!r}"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return f"a list of {len(value)} item{'' if len(value) == 1 else 's'}"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
