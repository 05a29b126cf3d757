"""The engine's scheduling seen from outside: continuous batching, cancelling
a sequence whose client went away, the bounded queue, and memory that does
not grow with the number of requests served. Everything goes through HTTP to
real ranks on loopback."""

from __future__ import annotations

import asyncio
import http.client
import json
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import openai
import psutil
import pytest
from clusterutil import Cluster

# About 500 tokens: more than one prefill chunk (256 by default), so its
# prompt is fed over several steps while the others decode.
LONG_PROMPT = (
    " ".join(f"Note {i}: the river was calm at dawn." for i in range(40))
    + " Summarise the notes in one sentence."
)
# Prompts of different lengths and sampling options, so that the batch mixes
# prefill chunks of unequal size with decoding steps, and greedy sequences
# with a seeded one (whose seed must make it independent of its neighbours).
GREEDY = {"temperature": 0}
SEEDED = {"temperature": 1, "seed": 99}
BATCH_CASES = [
    ("Write a haiku about rain.", GREEDY),
    ("List three colours.", GREEDY),
    (
        (
            "Explain in one paragraph why the sky is blue, for a curious child "
            "who keeps asking questions."
        ),
        GREEDY,
    ),
    ("What is 12 times 12?", SEEDED),
    (LONG_PROMPT, GREEDY),
]
BATCH_TOKENS = 8
# Waits on the server are bounded; these are limits for a loaded 2-core
# machine, not speed expectations.
CANCEL_WAIT_SECONDS = 30.0
HTTP_TIMEOUT = 120.0


def messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


async def generated_tokens(
    client: openai.AsyncOpenAI, prompt: str, sampling: dict[str, float]
) -> list[str]:
    response = await client.chat.completions.create(
        model="any",
        messages=messages(prompt),
        max_tokens=BATCH_TOKENS,
        logprobs=True,
        **sampling,
    )
    return [entry.token for entry in response.choices[0].logprobs.content]


def post_status(
    cluster: Cluster, path: str, body: dict
) -> tuple[int, dict[str, str], dict]:
    """Status, headers and JSON body of one POST (error statuses included)."""
    port = urllib.parse.urlsplit(cluster.url).port
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT)
    try:
        connection.request(
            "POST",
            path,
            body=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), json.loads(response.read())
    finally:
        connection.close()


def open_request(cluster: Cluster, body: dict) -> http.client.HTTPConnection:
    """Send a completion request and leave its answer unread."""
    port = urllib.parse.urlsplit(cluster.url).port
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT)
    connection.request(
        "POST",
        "/v1/completions",
        body=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    return connection


def read_events(response: http.client.HTTPResponse, count: int) -> None:
    """Read `count` server-sent events of an open stream."""
    events = 0
    while events < count:
        line = response.readline()
        assert line, "the stream ended early"
        events += line.startswith(b"data: ")


def wait_for_health(cluster: Cluster, timeout: float, **want: int) -> dict:
    """Poll /health until its fields equal `want`; the last report."""
    deadline = time.monotonic() + timeout
    body: dict = {}
    while time.monotonic() < deadline:
        _, body = cluster.health()
        if all(body.get(key) == value for key, value in want.items()):
            return body
        time.sleep(0.05)
    raise AssertionError(f"/health never showed {want} within {timeout} s: {body}")


def wait_for_idle(cluster: Cluster, timeout: float) -> dict:
    """Poll /health until nothing runs or waits; the last report."""
    return wait_for_health(cluster, timeout, running=0, queued=0)


@pytest.fixture(scope="module")
def single_rank(tmp_path_factory: pytest.TempPathFactory):
    cluster = Cluster(1, tmp_path_factory.mktemp("single"))
    cluster.start()
    try:
        cluster.wait_healthy()
        yield cluster
    finally:
        cluster.stop()


# --- batching ------------------------------------------------------------------


async def test_a_batch_gives_each_prompt_the_tokens_it_gets_alone(smollm_cluster):
    async with openai.AsyncOpenAI(
        base_url=smollm_cluster.url + "/v1",
        api_key="x",
        timeout=HTTP_TIMEOUT,
        max_retries=0,
    ) as client:
        alone = [await generated_tokens(client, *case) for case in BATCH_CASES]

        together = await asyncio.gather(
            *(generated_tokens(client, *case) for case in BATCH_CASES)
        )

    for (prompt, _), solo, batched in zip(BATCH_CASES, alone, together, strict=True):
        assert batched == solo, prompt[:40]


# --- cancellation --------------------------------------------------------------


def test_a_client_that_disconnects_mid_stream_has_its_sequence_cancelled(
    smollm_cluster,
):
    wait_for_idle(smollm_cluster, CANCEL_WAIT_SECONDS)  # from earlier tests
    # The cancelled sequence's cache slot is the next one handed out: the
    # request after it must not see anything the cancelled one left there.
    probe = {"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0}
    status, before = smollm_cluster.post("/v1/completions", probe)
    assert status == 200, before
    connection = open_request(
        smollm_cluster,
        {"prompt": "Once upon a time", "max_tokens": 2000, "stream": True},
    )
    response = connection.getresponse()
    assert response.status == 200
    read_events(response, 2)
    assert smollm_cluster.health()[1]["running"] == 1

    response.close()
    connection.close()

    wait_for_idle(smollm_cluster, CANCEL_WAIT_SECONDS)
    status, after = smollm_cluster.post("/v1/completions", probe)
    assert status == 200, after
    assert after["choices"][0]["text"] == before["choices"][0]["text"]


def test_a_client_that_leaves_before_a_whole_response_has_it_cancelled(
    smollm_cluster,
):
    wait_for_idle(smollm_cluster, CANCEL_WAIT_SECONDS)  # from earlier tests
    connection = open_request(
        smollm_cluster, {"prompt": "Once upon a time", "max_tokens": 2000}
    )
    wait_for_health(smollm_cluster, CANCEL_WAIT_SECONDS, running=1)

    connection.close()

    wait_for_idle(smollm_cluster, CANCEL_WAIT_SECONDS)
    status, reply = smollm_cluster.post(
        "/v1/completions", {"prompt": "Hello", "max_tokens": 2}
    )
    assert status == 200, reply


# --- the queue -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_queue(tmp_path_factory: pytest.TempPathFactory):
    """One rank running one sequence at a time with room for one waiting."""
    cluster = Cluster(
        1,
        tmp_path_factory.mktemp("queue"),
        extra=["--max-running", "1", "--max-queued", "1"],
    )
    cluster.start()
    try:
        cluster.wait_healthy()
        yield cluster
    finally:
        cluster.stop()


def test_a_full_queue_answers_429_with_retry_after(tiny_queue):
    body = {"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0}
    concurrent = 6

    with ThreadPoolExecutor(concurrent) as pool:
        results = list(
            pool.map(
                lambda _: post_status(tiny_queue, "/v1/completions", body),
                range(concurrent),
            )
        )

    statuses = sorted(status for status, _, _ in results)
    assert set(statuses) <= {200, 429}, results
    assert 200 in statuses and 429 in statuses, statuses
    for status, headers, reply in results:
        if status == 429:
            assert int(headers["Retry-After"]) >= 1
            assert reply["error"]["code"] == "queue_full"
            assert reply["error"]["type"] == "rate_limit_error"
        else:
            assert reply["usage"]["completion_tokens"] == 24
    wait_for_idle(tiny_queue, CANCEL_WAIT_SECONDS)
    status, _, reply = post_status(tiny_queue, "/v1/completions", body)
    assert status == 200, reply


def test_a_client_that_leaves_while_queued_is_removed_from_the_queue(tiny_queue):
    wait_for_idle(tiny_queue, CANCEL_WAIT_SECONDS)  # from earlier tests
    running = open_request(
        tiny_queue, {"prompt": "Once upon a time", "max_tokens": 400, "stream": True}
    )
    stream = running.getresponse()
    read_events(stream, 1)
    queued = open_request(tiny_queue, {"prompt": "Hello", "max_tokens": 4})
    wait_for_health(tiny_queue, CANCEL_WAIT_SECONDS, running=1, queued=1)

    queued.close()

    wait_for_health(tiny_queue, CANCEL_WAIT_SECONDS, running=1, queued=0)
    stream.close()
    running.close()
    wait_for_idle(tiny_queue, CANCEL_WAIT_SECONDS)
    status, _, reply = post_status(
        tiny_queue, "/v1/completions", {"prompt": "Hello", "max_tokens": 2}
    )
    assert status == 200, reply


# --- memory --------------------------------------------------------------------

# A bound on growth between the 30th and the 150th request, not on speed:
# allocator pools and caches fill during the warm-up, after which a request
# that leaves behind what it allocated (its cache slot's arrays, its queues,
# its response buffers) adds up over 120 more requests.
RSS_GROWTH_LIMIT = 50 * 1024 * 1024
WARM_UP_REQUESTS = 30
TOTAL_REQUESTS = 150


def test_memory_stays_flat_over_many_short_requests(single_rank):
    rank0 = psutil.Process(single_rank.procs[0].pid)
    port = urllib.parse.urlsplit(single_rank.url).port
    # One kept-alive connection: the requests, not TCP set-up, take the time.
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT)
    body = json.dumps({"prompt": "Hello there", "max_tokens": 2, "temperature": 0})

    def complete() -> None:
        connection.request(
            "POST",
            "/v1/completions",
            body=body,
            headers={"Content-Type": "application/json"},
        )
        response = connection.getresponse()
        assert response.status == 200, response.read()
        response.read()

    for _ in range(WARM_UP_REQUESTS):
        complete()
    rss_after_warm_up = rank0.memory_info().rss
    for _ in range(TOTAL_REQUESTS - WARM_UP_REQUESTS):
        complete()
    rss_at_end = rank0.memory_info().rss
    connection.close()

    growth = rss_at_end - rss_after_warm_up
    assert growth < RSS_GROWTH_LIMIT, f"rank 0 grew by {growth / 2**20:.1f} MiB"
    assert wait_for_idle(single_rank, CANCEL_WAIT_SECONDS)["running"] == 0
