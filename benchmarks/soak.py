"""Memory over many requests: does a rank's resident memory stay flat?

    python benchmarks/soak.py [--requests 3000] [--concurrency 8] [--world-size 2]
        [--model PATH] [--max-tokens 4]

Starts `python -m tpnet serve` on loopback (its own TPNET_HOME, free ports),
sends --requests short chat requests from --concurrency clients (streamed and
not, some cancelled mid-stream), and prints every rank's RSS after each tenth
of the run, with the growth from the first checkpoint (after warm-up) to the
last. Bounded: each request times out, and the cluster is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import aiohttp
import psutil
from _common import free_port_range

REQUEST_TIMEOUT_S = 120.0
READY_TIMEOUT_S = 180.0


def health_status(url: str) -> int:
    """GET /health: its status, 503 included; 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return 0


def rank_processes(serve: subprocess.Popen[bytes]) -> list[psutil.Process]:
    children = psutil.Process(serve.pid).children(recursive=True)
    return sorted(
        (p for p in children if "node" in p.cmdline()),
        key=lambda p: int(p.cmdline()[p.cmdline().index("--rank") + 1]),
    )


async def one_request(
    http: aiohttp.ClientSession, url: str, i: int, max_tokens: int
) -> bool:
    stream = i % 3 != 0
    body = {
        "messages": [
            {"role": "user", "content": f"Say something about the number {i}."}
        ],
        "max_tokens": max_tokens,
        "stream": stream,
    }
    async with http.post(url + "/v1/chat/completions", json=body) as response:
        if response.status != 200:
            return False
        if not stream:
            await response.read()
            return True
        async for _ in response.content:
            if i % 10 == 1:  # walk away mid-stream: the sequence is cancelled
                return True
    return True


async def drive(args: argparse.Namespace, url: str, ranks: list[psutil.Process]) -> int:
    checkpoints = [args.requests * k // 10 for k in range(1, 11)]
    done = failed = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(args.requests):
        queue.put_nowait(i)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    samples: list[tuple[int, list[float]]] = []
    async with aiohttp.ClientSession(timeout=timeout) as http:

        async def client() -> None:
            nonlocal done, failed
            while not queue.empty():
                i = queue.get_nowait()
                try:
                    ok = await one_request(http, url, i, args.max_tokens)
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                failed += not ok
                done += 1
                if done in checkpoints:
                    rss = [p.memory_info().rss / 1e6 for p in ranks]
                    samples.append((done, rss))
                    print(
                        f"soak: {done:6d} requests, {failed} failed, RSS MB "
                        + " / ".join(f"{r:.0f}" for r in rss),
                        flush=True,
                    )

        started = time.monotonic()
        await asyncio.gather(*(client() for _ in range(args.concurrency)))
        seconds = time.monotonic() - started
    first, last = samples[0][1], samples[-1][1]
    print(
        f"soak: {done} requests in {seconds:.0f} s, {failed} failed; RSS growth from "
        f"request {samples[0][0]} to {samples[-1][0]}: "
        + ", ".join(
            f"rank {r} {b - a:+.1f} MB" for r, (a, b) in enumerate(zip(first, last))
        )
    )
    return 1 if failed else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--model")
    p.add_argument("--max-tokens", type=int, default=4)
    args = p.parse_args()

    # The ranks' ports and the HTTP port, consecutive and all free now.
    base = free_port_range(args.world_size + 1)
    port = base + args.world_size
    home = tempfile.mkdtemp(prefix="tpnet-soak-")
    command = [
        sys.executable,
        "-m",
        "tpnet",
        "serve",
        "--world-size",
        str(args.world_size),
    ]
    command += ["--port", str(port), "--base-port", str(base)]
    command += ["--model", args.model] if args.model else []
    serve = subprocess.Popen(
        command,
        env=dict(os.environ, TPNET_HOME=home),
        stdout=subprocess.DEVNULL,
        stderr=open(os.path.join(home, "serve.log"), "wb"),
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    status = 1
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if health_status(url) == 200:
                break
            if serve.poll() is not None:
                print(
                    f"soak: tpnet serve exited; see {home}/serve.log", file=sys.stderr
                )
                return 1
            time.sleep(0.5)
        else:
            print("soak: the cluster did not become healthy", file=sys.stderr)
            return 1
        status = asyncio.run(drive(args, url, rank_processes(serve)))
        return status
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        try:
            serve.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
        if status == 0:
            shutil.rmtree(home, ignore_errors=True)
        else:
            print(f"soak: the cluster's log stays in {home}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
