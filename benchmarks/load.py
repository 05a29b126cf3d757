"""Throughput and latency of a tpnet cluster under concurrent streaming chats.

    python benchmarks/load.py [--url http://127.0.0.1:8100] [--clients 1,4,8,16]
        [--seconds 30] [--max-tokens 64] [--temperature 0] [--api-key KEY]
        [--json PATH]
    python benchmarks/load.py --start-cluster [--world-size 2] [--model PATH] ...

For each level N of --clients, N clients each send streaming chat requests
back to back (one of a fixed set of prompts, stream_options.include_usage on)
for --seconds; requests still running at the end are waited for (each within
REQUEST_TIMEOUT_S). Per level it prints:

- tok/s: the aggregate output rate while all N clients are busy: completion
  tokens that arrived between --warmup seconds after the level started and
  the end of its --seconds, divided by that time. Every client sends its
  next request as soon as the last one ends, so the whole window runs at
  concurrency N: it leaves out the start, where all N prompts arrive at
  once, and the drain at the end, where fewer and fewer requests are left.
  Each request's completion tokens (from its usage chunk) are spread over
  the arrival times of its content chunks.
- whole: all completion tokens of the level over its whole wall time,
  start and drain included, for comparison.
- requests completed, errors, time to first token and the gaps between
  content chunks (p50, p99), and tok/s relative to the first level.

--start-cluster runs `python -m tpnet serve` itself on loopback (its own
TPNET_HOME in a temporary folder, free ports), waits until /health answers
200, and stops it at the end: SIGTERM, a bounded wait, then SIGKILL of the
process group it started.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from _common import (
    LOOPBACK,
    free_port_range,
    percentile,
    positive_ints,
    stop_process,
    write_json,
)

PROMPTS = [
    "In three sentences, explain why the sky is blue.",
    "Describe a quiet morning in a small fishing village in a few sentences.",
    "Give a short explanation of how a bicycle stays upright.",
    "Write a few sentences about the history of the printing press.",
    "Explain in a few sentences what a hash table is and why it is fast.",
    "In a few sentences, describe the water cycle to a child.",
    "Summarize the plot of a heist story you invent, in four sentences.",
    "Explain in a few sentences why bread rises when it is baked.",
]
# A request that has not finished this long after it was sent counts as an
# error and is abandoned, so a level always ends.
REQUEST_TIMEOUT_S = 120.0
# The cluster started by --start-cluster must answer /health with 200 within
# this time (it loads the model on every rank first), and gets this long to
# stop after SIGTERM before it is killed.
STARTUP_TIMEOUT_S = 180.0
SHUTDOWN_GRACE_S = 20.0
HEALTH_POLL_S = 0.25


@dataclass
class Level:
    clients: int
    wall_s: float = 0.0
    requests: int = 0
    errors: int = 0
    completion_tokens: int = 0
    missing_usage: int = 0
    window_s: float = 0.0
    window_tokens: float = 0.0
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)

    # the steady window, as time.perf_counter() values
    window_start: float = 0.0
    window_end: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.window_tokens / self.window_s if self.window_s else 0.0

    @property
    def whole_tokens_per_s(self) -> float:
        return self.completion_tokens / self.wall_s if self.wall_s else 0.0

    def count_in_window(self, tokens: int, arrivals: list[float]) -> None:
        """Spread a request's tokens over its chunk arrivals and count those
        that fell inside the steady window."""
        if not arrivals:
            return
        inside = sum(self.window_start <= t < self.window_end for t in arrivals)
        self.window_tokens += tokens * inside / len(arrivals)

    def note_error(self, text: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(text[:300])

    def summary(self, baseline: float | None) -> dict[str, Any]:
        return {
            "clients": self.clients,
            "wall_s": round(self.wall_s, 3),
            "requests": self.requests,
            "errors": self.errors,
            "completion_tokens": self.completion_tokens,
            "missing_usage": self.missing_usage,
            "tokens_per_s": self.tokens_per_s,
            "window_s": round(self.window_s, 3),
            "whole_tokens_per_s": self.whole_tokens_per_s,
            "vs_first_level": self.tokens_per_s / baseline if baseline else None,
            "ttft_ms_p50": percentile(self.ttft_s, 50) * 1e3,
            "ttft_ms_p99": percentile(self.ttft_s, 99) * 1e3,
            "itl_ms_p50": percentile(self.itl_s, 50) * 1e3,
            "itl_ms_p99": percentile(self.itl_s, 99) * 1e3,
            "error_samples": self.error_samples,
        }


# -- one streaming request ------------------------------------------------------


async def stream_chat(
    session: aiohttp.ClientSession,
    args: argparse.Namespace,
    prompt: str,
    level: Level,
) -> None:
    """Send one streaming chat request and record what arrived, when."""
    body = {
        "model": args.model_id,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter()
    arrivals: list[float] = []
    usage: dict[str, Any] | None = None
    done = False
    async with session.post(f"{args.url}/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            level.note_error(f"HTTP {resp.status}: {(await resp.text())[:200]}")
            return
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                level.note_error(f"stream error: {event['error']}")
                return
            if event.get("usage"):
                usage = event["usage"]
            if any(c.get("delta", {}).get("content") for c in event["choices"]):
                arrivals.append(time.perf_counter())
    if not done:
        level.note_error("stream ended without [DONE]")
        return
    level.requests += 1
    if usage is None:
        level.missing_usage += 1
    else:
        level.completion_tokens += int(usage["completion_tokens"])
        level.count_in_window(int(usage["completion_tokens"]), arrivals)
    if arrivals:
        level.ttft_s.append(arrivals[0] - sent)
        level.itl_s.extend(b - a for a, b in itertools.pairwise(arrivals))


async def client(
    session: aiohttp.ClientSession,
    args: argparse.Namespace,
    index: int,
    deadline: float,
    level: Level,
) -> None:
    """Requests back to back until the deadline; each bounded in time."""
    sent = 0
    while time.monotonic() < deadline:
        prompt = PROMPTS[(index + sent * 3) % len(PROMPTS)]
        sent += 1
        try:
            await asyncio.wait_for(
                stream_chat(session, args, prompt, level), REQUEST_TIMEOUT_S
            )
        except TimeoutError:
            level.note_error(f"no complete answer within {REQUEST_TIMEOUT_S:.0f} s")
        except (aiohttp.ClientError, ValueError, KeyError) as exc:
            level.note_error(f"{type(exc).__name__}: {exc}")
            # A refused connection fails at once: do not spin on it.
            await asyncio.sleep(0.1)


async def run_levels(args: argparse.Namespace) -> list[Level]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    connector = aiohttp.TCPConnector(limit=max(args.clients))
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    levels = []
    async with aiohttp.ClientSession(
        connector=connector, headers=headers, timeout=timeout
    ) as session:
        args.model_id = args.model_id or await _served_model(session, args.url)
        for n in args.clients:
            level = Level(n)
            started = time.monotonic()
            deadline = started + args.seconds
            now = time.perf_counter()
            level.window_start = now + args.warmup
            level.window_end = now + args.seconds
            level.window_s = args.seconds - args.warmup
            await asyncio.gather(
                *(client(session, args, i, deadline, level) for i in range(n))
            )
            level.wall_s = time.monotonic() - started
            levels.append(level)
            print(
                f"  {n} client(s): {level.requests} requests, "
                f"{level.tokens_per_s:.1f} tok/s steady, "
                f"{level.whole_tokens_per_s:.1f} tok/s whole level",
                file=sys.stderr,
                flush=True,
            )
    return levels


async def _served_model(session: aiohttp.ClientSession, url: str) -> str:
    try:
        async with session.get(f"{url}/v1/models") as resp:
            if resp.status != 200:
                raise SystemExit(f"load: GET {url}/v1/models answered {resp.status}")
            return str((await resp.json())["data"][0]["id"])
    except aiohttp.ClientError as exc:
        raise SystemExit(f"load: no tpnet cluster answers at {url}: {exc}") from None


# -- a cluster of our own -----------------------------------------------------


@contextmanager
def own_cluster(args: argparse.Namespace) -> Any:
    """`tpnet serve` on loopback for the duration of the block."""
    base = free_port_range(args.world_size + 1)
    http_port = args.port or base + args.world_size
    with tempfile.TemporaryDirectory(prefix="tpnet-load-") as home:
        command = [
            sys.executable,
            "-m",
            "tpnet",
            "serve",
            "--world-size",
            str(args.world_size),
            "--port",
            str(http_port),
            "--base-port",
            str(args.base_port or base),
        ]
        if args.model:
            command += ["--model", args.model]
        if args.api_key:
            command += ["--api-key", args.api_key]
        command += args.serve_arg
        log_path = os.path.join(home, "serve.log")
        env = dict(os.environ, TPNET_HOME=home)
        with open(log_path, "wb") as log:
            # A session of its own, so the ranks it starts can be killed with
            # it if it does not stop in time.
            proc = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        try:
            args.url = f"http://{LOOPBACK}:{http_port}"
            _wait_healthy(args.url, proc, log_path)
            args.compute_path = _compute_path(log_path)
            print(f"load: cluster up on {args.url}", file=sys.stderr, flush=True)
            yield
        finally:
            _stop_cluster(proc)
            if args.cluster_log:
                with open(log_path, "rb") as src, open(args.cluster_log, "wb") as dst:
                    dst.write(src.read())


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log_path: str) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(
                f"load: tpnet serve exited with {proc.returncode}:\n{_tail(log_path)}"
            )
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2.0) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(HEALTH_POLL_S)
    raise SystemExit(
        f"load: {url}/health not 200 within {STARTUP_TIMEOUT_S:.0f} s:\n"
        f"{_tail(log_path)}"
    )


def _stop_cluster(proc: subprocess.Popen[bytes]) -> None:
    stop_process(proc, grace_s=SHUTDOWN_GRACE_S)
    try:
        # Ranks left behind by a serve that had to be killed.
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _compute_path(log_path: str) -> str | None:
    """What rank 0 logs about its matmul path ("computes with ..."), if it
    does: the same model is several times faster or slower depending on it."""
    with open(log_path, errors="replace") as f:
        for line in f:
            if "rank 0 " in line and "computes with" in line:
                return line.split("computes with", 1)[1].strip()
    return None


def _tail(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-3000:]


# -- report -------------------------------------------------------------------


def report(args: argparse.Namespace, levels: list[Level]) -> dict[str, Any]:
    baseline = levels[0].tokens_per_s if levels else None
    rows = [level.summary(baseline) for level in levels]
    print(
        f"tpnet load: {args.url}, model {args.model_id}, max_tokens "
        f"{args.max_tokens}, temperature {args.temperature}, {args.seconds:g} s "
        f"per level, tok/s counted from {args.warmup:g} s on"
    )
    if args.compute_path:
        print(f"compute path (rank 0): {args.compute_path}")
    header = (
        f"{'clients':>7} {'requests':>8} {'errors':>6} {'tok/s':>8} "
        f"{'vs first':>8} {'whole':>7} {'ttft p50':>9} {'ttft p99':>9} {'itl p50':>8} "
        f"{'itl p99':>8}"
    )
    print(header + "   (times in ms)")
    for r in rows:
        ratio = f"{r['vs_first_level']:.2f}x" if r["vs_first_level"] else "-"
        print(
            f"{r['clients']:>7} {r['requests']:>8} {r['errors']:>6} "
            f"{r['tokens_per_s']:>8.1f} {ratio:>8} {r['whole_tokens_per_s']:>7.1f} "
            f"{r['ttft_ms_p50']:>9.1f} "
            f"{r['ttft_ms_p99']:>9.1f} {r['itl_ms_p50']:>8.1f} {r['itl_ms_p99']:>8.1f}"
        )
    for r in rows:
        for sample in r["error_samples"]:
            print(f"error at {r['clients']} client(s): {sample}")
        if r["missing_usage"]:
            print(
                f"warning: {r['missing_usage']} request(s) at {r['clients']} "
                "client(s) ended without a usage chunk; their tokens are not counted"
            )
    return {
        "url": args.url,
        "model": args.model_id,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "seconds_per_level": args.seconds,
        "warmup_s": args.warmup,
        "compute_path": args.compute_path,
        "levels": rows,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default=f"http://{LOOPBACK}:8100")
    parser.add_argument(
        "--clients", type=positive_ints, default="1,4,8,16", help="levels, e.g. 1,4,8"
    )
    parser.add_argument("--seconds", type=float, default=30.0, help="per level")
    parser.add_argument(
        "--warmup",
        type=float,
        default=5.0,
        help="seconds at the start of a level left out of tok/s",
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--api-key", default=os.environ.get("TPNET_API_KEY"))
    parser.add_argument(
        "--model-id", help="the request's model field (default: from /v1/models)"
    )
    parser.add_argument("--json", help="also write the results to this file")
    cluster = parser.add_argument_group("a cluster of this script's own")
    cluster.add_argument("--start-cluster", action="store_true")
    cluster.add_argument("--world-size", type=int, default=2)
    cluster.add_argument("--model", help="model for tpnet serve (default: its own)")
    cluster.add_argument("--port", type=int, help="HTTP port (default: a free one)")
    cluster.add_argument("--base-port", type=int, help="rank ports (default: free)")
    cluster.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        help="extra argument for tpnet serve (repeatable), e.g. --serve-arg=--dequantize",
    )
    cluster.add_argument("--cluster-log", help="copy the cluster's log here")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.max_tokens < 1:
        parser.error("--seconds must be positive and --max-tokens at least 1")
    if not 0 <= args.warmup < args.seconds:
        parser.error("--warmup must be at least 0 and less than --seconds")
    args.url = args.url.rstrip("/")
    args.compute_path = None  # known only for a cluster started here
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so an own cluster is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    if args.start_cluster:
        with own_cluster(args):
            levels = asyncio.run(run_levels(args))
    else:
        levels = asyncio.run(run_levels(args))
    result = report(args, levels)
    if args.json:
        write_json(args.json, result)
    return 0 if all(level.requests for level in levels) else 1


if __name__ == "__main__":
    sys.exit(main())
