"""The OpenAI-compatible API end to end: real ranks on loopback, real HTTP
clients (the official `openai` client, and raw http.client where the bytes on
the wire matter). Generation is slow on the test machine, so requests ask for
few tokens and share the session's 2-rank cluster of the default model."""

from __future__ import annotations

import http.client
import itertools
import json
import urllib.parse
from typing import Any

import openai
import pytest
from clusterutil import Cluster

CAPITAL_QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
STORY_MESSAGES = [
    {"role": "user", "content": "Write a long story about a dragon who paints."}
]
STORY_PROMPT = "Once upon a time"
# Greedy continuations used to pick stop strings; 16 tokens of the story
# prompt reach well past the first few words without costing much.
STORY_TOKENS = 16
# Far past the default context of 4096 tokens (each "hello " is one token).
TOO_LONG_TEXT = "hello " * 5000
HTTP_TIMEOUT = 120.0


# --- helpers -------------------------------------------------------------------


def raw_request(
    cluster: Cluster,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP exchange with nothing between the test and the bytes."""
    port = urllib.parse.urlsplit(cluster.url).port
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT)
    try:
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode()
        connection.request(
            method,
            path,
            body=body,
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def sse_data(stream: bytes) -> list[str]:
    """The `data:` payloads of a server-sent event stream, in order."""
    events = stream.decode().split("\n\n")
    assert events[-1] == "", f"stream ends inside an event: {events[-1]!r}"
    payloads = []
    for event in events[:-1]:
        assert event.startswith("data: "), f"not a data event: {event!r}"
        payloads.append(event.removeprefix("data: "))
    return payloads


def chat_text_tokens(choice: Any) -> list[str]:
    return [entry.token for entry in choice.logprobs.content]


def assert_error(body: bytes, status: int, param: str | None) -> dict[str, Any]:
    """The body is OpenAI-shaped error JSON naming `param`."""
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert param in error["message"]
    expected_type = {401: "authentication_error", 429: "rate_limit_error"}
    assert error["type"] == expected_type.get(status, "invalid_request_error")
    return error


def first_occurrence_inside_token(text: str, tokens: list[str]) -> tuple[str, int]:
    """A stop string strictly inside one generated token (neither end of it),
    found nowhere earlier in `text`, and the index of that token."""
    offset = 0
    for index, token in enumerate(tokens):
        if len(token) >= 5:
            stop = token[1:4]
            if text.find(stop) == offset + 1:
                return stop, index
        offset += len(token)
    raise AssertionError(f"no token fits a stop string inside it: {tokens}")


def first_occurrence_across_tokens(text: str, tokens: list[str]) -> tuple[str, int]:
    """A stop string made of the end of one token and the start of the next,
    found nowhere earlier in `text`, and the index of the token completing it."""
    offset = 0
    for index, (left, right) in enumerate(itertools.pairwise(tokens)):
        if len(left) >= 2 and len(right) >= 2:
            stop = left[-2:] + right[:2]
            if text.find(stop) == offset + len(left) - 2:
                return stop, index + 1
        offset += len(left)
    raise AssertionError(f"no token pair fits a stop string across it: {tokens}")


# --- fixtures ------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(smollm_cluster: Cluster) -> Cluster:
    return smollm_cluster


@pytest.fixture(scope="module")
def client(cluster: Cluster) -> openai.OpenAI:
    # No retries: a 429 or 5xx must reach the test, not be hidden by the client.
    return openai.OpenAI(
        base_url=cluster.url + "/v1", api_key="x", timeout=HTTP_TIMEOUT, max_retries=0
    )


@pytest.fixture(scope="module")
def story(client: openai.OpenAI) -> tuple[str, list[str]]:
    """The unstopped greedy continuation of STORY_PROMPT and its tokens."""
    response = client.completions.create(
        model="any",
        prompt=STORY_PROMPT,
        max_tokens=STORY_TOKENS,
        temperature=0,
        logprobs=0,
    )
    choice = response.choices[0]
    assert choice.finish_reason == "length"
    assert "".join(choice.logprobs.tokens) == choice.text
    return choice.text, choice.logprobs.tokens


# --- fidelity --------------------------------------------------------------------


def test_chat_answers_that_paris_is_the_capital_of_france(client, default_spec):
    prompt = default_spec.tokenizer.apply_chat_template(CAPITAL_QUESTION)

    response = client.chat.completions.create(
        model="any",
        messages=CAPITAL_QUESTION,
        max_tokens=16,
        temperature=0,
        logprobs=True,
    )

    choice = response.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    # The end-of-turn token is generated (and counted) but is not text.
    generated = len(chat_text_tokens(choice)) + 1
    assert response.usage.prompt_tokens == len(prompt)
    assert response.usage.completion_tokens == generated
    assert response.usage.total_tokens == len(prompt) + generated


def test_streamed_chat_answers_paris_with_role_first_and_finish_reason_last(
    client, default_spec
):
    prompt = default_spec.tokenizer.apply_chat_template(CAPITAL_QUESTION)

    chunks = list(
        client.chat.completions.create(
            model="any",
            messages=CAPITAL_QUESTION,
            max_tokens=16,
            temperature=0,
            logprobs=True,
            stream=True,
            stream_options={"include_usage": True},
        )
    )

    *choice_chunks, usage_chunk = chunks
    assert choice_chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in choice_chunks[1:])
    assert [c.choices[0].finish_reason for c in choice_chunks[:-1]] == [None] * (
        len(choice_chunks) - 1
    )
    assert choice_chunks[-1].choices[0].finish_reason == "stop"
    text = "".join(c.choices[0].delta.content or "" for c in choice_chunks)
    assert "Paris" in text
    tokens = [
        entry
        for c in choice_chunks
        if c.choices[0].logprobs is not None
        for entry in c.choices[0].logprobs.content
    ]
    assert usage_chunk.choices == []
    assert usage_chunk.usage.prompt_tokens == len(prompt)
    assert usage_chunk.usage.completion_tokens == len(tokens) + 1  # + end of turn
    assert len({c.id for c in chunks}) == 1


def test_a_stream_ends_with_done_after_the_last_choice(cluster):
    body = {
        "messages": CAPITAL_QUESTION,
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
    }

    status, headers, stream = raw_request(cluster, "POST", "/v1/chat/completions", body)

    assert status == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    *events, done = sse_data(stream)
    assert done == "[DONE]"
    chunks = [json.loads(event) for event in events]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in chunk for chunk in chunks)


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_streamed_deltas_join_to_the_whole_response_at_temperature_0(client, endpoint):
    if endpoint == "chat":
        create = client.chat.completions.create
        options: dict[str, Any] = {"messages": STORY_MESSAGES}
    else:
        create = client.completions.create
        options = {"prompt": STORY_PROMPT}
    options.update(model="any", max_tokens=8, temperature=0)

    whole = create(**options)
    stream = list(create(stream=True, **options))

    if endpoint == "chat":
        whole_text = whole.choices[0].message.content
        joined = "".join(c.choices[0].delta.content or "" for c in stream)
    else:
        whole_text = whole.choices[0].text
        joined = "".join(c.choices[0].text for c in stream)
    assert joined == whole_text
    assert stream[-1].choices[0].finish_reason == whole.choices[0].finish_reason


# --- stop strings -----------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("form", ["string", "list"])
@pytest.mark.parametrize("where", ["inside_a_token", "across_tokens"])
def test_a_stop_string_cuts_the_text_before_it(client, story, where, form, stream):
    text, tokens = story
    if where == "inside_a_token":
        stop, last_token = first_occurrence_inside_token(text, tokens)
    else:
        stop, last_token = first_occurrence_across_tokens(text, tokens)
    stop_field: str | list[str] = stop if form == "string" else ["@@never@@", stop]
    options: dict[str, Any] = {
        "model": "any",
        "prompt": STORY_PROMPT,
        "max_tokens": STORY_TOKENS,
        "temperature": 0,
        "stop": stop_field,
    }

    if stream:
        chunks = list(
            client.completions.create(
                stream=True, stream_options={"include_usage": True}, **options
            )
        )
        *choice_chunks, usage_chunk = chunks
        result = "".join(c.choices[0].text for c in choice_chunks)
        finish_reason = choice_chunks[-1].choices[0].finish_reason
        usage = usage_chunk.usage
    else:
        response = client.completions.create(**options)
        result = response.choices[0].text
        finish_reason = response.choices[0].finish_reason
        usage = response.usage

    assert result == text[: text.index(stop)]
    assert stop not in result
    assert finish_reason == "stop"
    # Generation ends at the token that completed the stop string.
    assert usage.completion_tokens == last_token + 1


# --- lengths, seeds, choices ----------------------------------------------------


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_a_token_limit_ends_with_length_after_exactly_that_many_tokens(cluster, field):
    body = {"messages": STORY_MESSAGES, "temperature": 0, field: 5}

    status, response = cluster.post("/v1/chat/completions", body)

    assert status == 200, response
    assert response["choices"][0]["finish_reason"] == "length"
    assert response["usage"]["completion_tokens"] == 5


def test_the_same_seed_at_temperature_1_gives_the_same_text_twice(client):
    options = {
        "model": "any",
        "prompt": STORY_PROMPT,
        "max_tokens": 8,
        "temperature": 1,
        "seed": 1234,
    }

    first = client.completions.create(**options).choices[0].text
    second = client.completions.create(**options).choices[0].text

    assert first == second


def test_n_2_returns_choices_with_indices_0_and_1(client):
    response = client.chat.completions.create(
        model="any",
        messages=STORY_MESSAGES,
        max_tokens=4,
        temperature=1,
        seed=5,
        n=2,
    )

    assert sorted(choice.index for choice in response.choices) == [0, 1]
    assert all(choice.finish_reason == "length" for choice in response.choices)
    assert response.usage.completion_tokens == 8


# --- logprobs and usage ------------------------------------------------------------


def test_chat_logprobs_report_the_chosen_token_and_its_top_alternatives(client):
    response = client.chat.completions.create(
        model="any",
        messages=STORY_MESSAGES,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )

    choice = response.choices[0]
    entries = choice.logprobs.content
    assert len(entries) == response.usage.completion_tokens == 6
    assert "".join(entry.token for entry in entries) == choice.message.content
    for entry in entries:
        alternatives = [alt.logprob for alt in entry.top_logprobs]
        assert len(alternatives) == 3
        assert alternatives == sorted(alternatives, reverse=True)
        # Greedy decoding picks the most likely token.
        assert entry.token == entry.top_logprobs[0].token
        assert entry.logprob == pytest.approx(alternatives[0])
        assert entry.logprob <= 0
        assert entry.bytes == list(entry.token.encode())


def test_chat_logprob_bytes_rebuild_characters_split_across_tokens(client):
    # The model answers in Japanese; each kana takes two byte-level tokens.
    question = [{"role": "user", "content": "Say a word in Japanese."}]

    response = client.chat.completions.create(
        model="any", messages=question, max_tokens=6, temperature=0, logprobs=True
    )

    choice = response.choices[0]
    entries = choice.logprobs.content
    assert any(not is_utf8(bytes(entry.bytes)) for entry in entries), (
        "pick a question whose answer splits a character across tokens"
    )
    joined = b"".join(bytes(entry.bytes) for entry in entries)
    assert joined.decode("utf-8", "replace") == choice.message.content
    for entry in entries:
        for alternative in entry.top_logprobs:
            assert alternative.bytes is not None


def is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def test_completion_logprobs_with_echo_cover_the_generated_tokens(client):
    response = client.completions.create(
        model="any",
        prompt=STORY_PROMPT,
        max_tokens=5,
        temperature=0,
        echo=True,
        logprobs=2,
    )

    choice = response.choices[0]
    logprobs = choice.logprobs
    assert choice.text.startswith(STORY_PROMPT)
    generated = choice.text[len(STORY_PROMPT) :]
    assert "".join(logprobs.tokens) == generated
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 5
    assert len(logprobs.top_logprobs) == 5
    assert all(1 <= len(alternatives) <= 2 for alternatives in logprobs.top_logprobs)
    expected_offsets, offset = [], len(STORY_PROMPT)
    for token in logprobs.tokens:
        expected_offsets.append(offset)
        offset += len(token)
    assert logprobs.text_offset == expected_offsets
    assert all(value <= 0 for value in logprobs.token_logprobs)


def test_include_usage_adds_one_final_chunk_with_no_choices(client):
    chunks = list(
        client.completions.create(
            model="any",
            prompt=STORY_PROMPT,
            max_tokens=3,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )

    with_usage = [c for c in chunks if c.usage is not None]
    assert with_usage == [chunks[-1]]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == 4
    assert chunks[-1].usage.completion_tokens == 3
    assert chunks[-1].usage.total_tokens == 7


def test_without_include_usage_no_chunk_carries_usage(client):
    chunks = list(
        client.completions.create(
            model="any",
            prompt=STORY_PROMPT,
            max_tokens=3,
            temperature=0,
            stream=True,
        )
    )

    assert all(c.usage is None for c in chunks)
    assert all(len(c.choices) == 1 for c in chunks)


# --- completions ------------------------------------------------------------------


def test_completions_continue_a_prompt_string(client):
    response = client.completions.create(
        model="any", prompt="The capital of France is", max_tokens=4, temperature=0
    )

    assert response.object == "text_completion"
    assert [choice.index for choice in response.choices] == [0]
    assert "Paris" in response.choices[0].text


@pytest.mark.parametrize("n", [1, 2])
def test_completions_of_two_prompts_answer_each_at_its_own_index(client, n):
    prompts = ["The capital of France is", "1, 2, 3, 4,"]

    response = client.completions.create(
        model="any", prompt=prompts, max_tokens=4, temperature=0, n=n
    )

    # Choice i of prompt p has index p * n + i.
    by_index = {choice.index: choice.text for choice in response.choices}
    assert sorted(by_index) == list(range(2 * n))
    assert all("Paris" in by_index[i] for i in range(n))
    assert all("5" in by_index[i] for i in range(n, 2 * n))
    assert response.usage.completion_tokens == 4 * 2 * n


# --- errors ------------------------------------------------------------------------

_HI = [{"role": "user", "content": "hi"}]
BAD_CHAT_BODIES = {
    "malformed_json": (b'{"messages": [', None),
    "body_not_an_object": ([_HI], None),
    "empty_messages": ({"messages": []}, "messages"),
    "unknown_role": (
        {"messages": [{"role": "wizard", "content": "hi"}]},
        "messages[0].role",
    ),
    "negative_temperature": ({"messages": _HI, "temperature": -0.5}, "temperature"),
    "top_p_over_1": ({"messages": _HI, "top_p": 1.5}, "top_p"),
    "n_0": ({"messages": _HI, "n": 0}, "n"),
    "negative_max_tokens": ({"messages": _HI, "max_tokens": -3}, "max_tokens"),
    "image_content_part": (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "x"}}],
                }
            ]
        },
        "messages[0].content[0].type",
    ),
    "prompt_longer_than_the_context": (
        {"messages": [{"role": "user", "content": TOO_LONG_TEXT}], "stream": True},
        "messages",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CHAT_BODIES))
def test_a_bad_chat_request_is_a_400_naming_the_field(cluster, case):
    body, param = BAD_CHAT_BODIES[case]

    status, headers, data = raw_request(cluster, "POST", "/v1/chat/completions", body)

    assert status == 400, data
    # JSON, not an event stream, even where the request asked to stream.
    assert headers["Content-Type"].startswith("application/json")
    assert_error(data, 400, param)


def test_a_completion_prompt_longer_than_the_context_is_a_400_before_any_event(
    cluster,
):
    body = {"prompt": TOO_LONG_TEXT, "stream": True, "max_tokens": 4}

    status, headers, data = raw_request(cluster, "POST", "/v1/completions", body)

    assert status == 400
    assert headers["Content-Type"].startswith("application/json")
    assert not data.startswith(b"data:")
    error = assert_error(data, 400, "prompt")
    assert error["code"] == "context_length_exceeded"


def test_an_unknown_path_is_a_404_in_openai_shape(cluster):
    status, _, data = raw_request(cluster, "GET", "/v1/no-such-thing")

    assert status == 404
    error = assert_error(data, 404, None)
    assert "/v1/no-such-thing" in error["message"]


def test_a_wrong_method_is_a_405_naming_the_allowed_one(cluster):
    status, headers, data = raw_request(cluster, "GET", "/v1/chat/completions")

    assert status == 405
    assert headers["Allow"] == "POST"
    error = assert_error(data, 405, None)
    assert "GET" in error["message"] and "POST" in error["message"]


def test_a_valid_request_works_after_a_run_of_bad_ones(cluster, client):
    for body, _ in BAD_CHAT_BODIES.values():
        raw_request(cluster, "POST", "/v1/chat/completions", body)
    raw_request(cluster, "GET", "/v1/no-such-thing")
    raw_request(cluster, "PUT", "/v1/completions", {"prompt": "x"})

    response = client.chat.completions.create(
        model="any", messages=_HI, max_tokens=2, temperature=0
    )

    assert response.choices[0].finish_reason in ("length", "stop")
    assert response.choices[0].message.content


# --- models, health ----------------------------------------------------------------


def test_models_lists_the_served_model(client):
    models = client.models.list().data

    assert len(models) == 1
    assert models[0].id.startswith("SmolLM2-135M-Instruct")
    assert client.models.retrieve(models[0].id).id == models[0].id


def test_health_reports_a_world_of_2(cluster):
    status, body = cluster.health()

    assert status == 200
    assert body["world_size"] == 2
    assert body["missing_ranks"] == []


# --- API key ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_cluster(tmp_path_factory: pytest.TempPathFactory):
    """One rank (it needs no peers) that requires the API key "k"."""
    cluster = Cluster(1, tmp_path_factory.mktemp("keyed"), extra=["--api-key", "k"])
    cluster.start()
    try:
        cluster.wait_healthy()
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.parametrize("key", [None, "wrong"])
def test_an_api_key_is_required_when_configured(keyed_cluster, key):
    headers = {"Authorization": f"Bearer {key}"} if key else {}

    status, response_headers, data = raw_request(
        keyed_cluster, "GET", "/v1/models", headers=headers
    )
    chat_status, _, _ = raw_request(
        keyed_cluster,
        "POST",
        "/v1/chat/completions",
        {"messages": _HI, "max_tokens": 1},
        headers=headers,
    )

    assert status == chat_status == 401
    assert response_headers["WWW-Authenticate"] == "Bearer"
    assert_error(data, 401, None)
    assert keyed_cluster.health()[0] == 200


def test_the_right_api_key_is_accepted(keyed_cluster):
    client = openai.OpenAI(
        base_url=keyed_cluster.url + "/v1", api_key="k", max_retries=0, timeout=60
    )
    wrong = openai.OpenAI(
        base_url=keyed_cluster.url + "/v1", api_key="nope", max_retries=0, timeout=60
    )

    response = client.chat.completions.create(
        model="any", messages=_HI, max_tokens=2, temperature=0
    )

    assert response.choices[0].finish_reason in ("length", "stop")
    assert len(client.models.list().data) == 1
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
