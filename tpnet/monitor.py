"""`tpnet monitor`: a live terminal view of a running cluster.

It only reads rank 0's GET /health and GET /metrics (Prometheus text), the
same endpoints a scraper uses, so watching a cluster never disturbs it.
Rates (tokens/s) and recent latency percentiles come from the difference
between two refreshes; percentiles are estimated from histogram buckets by
linear interpolation inside the bucket, as Prometheus' histogram_quantile
does, so they are only as fine as the buckets.

`render(snapshot, previous)` is a pure function from two snapshots to the
frame's text; the loop around it only fetches, clears the screen and sleeps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

DEFAULT_URL = "http://127.0.0.1:8100"
# Longer than a scrape of a busy rank 0 takes, short enough that a hung
# cluster shows as unreachable within one refresh or two.
FETCH_TIMEOUT_SECONDS = 2.0
MIN_INTERVAL_SECONDS = 0.1
CLEAR = "\x1b[H\x1b[2J"
HIDE_CURSOR = "\x1b[?25l"
SHOW_CURSOR = "\x1b[?25h"
GREEN, RED, RESET = "\x1b[32m", "\x1b[31m", "\x1b[0m"

Series = list[tuple[dict[str, str], float]]


@dataclass
class Snapshot:
    """What one refresh saw. `error` is set when rank 0 could not be reached;
    `metrics_error` when /health answered but /metrics did not."""

    url: str
    taken_at: float = field(default_factory=time.monotonic)
    wall_time: float = field(default_factory=time.time)
    health: dict[str, Any] | None = None
    healthy: bool = False
    error: str | None = None
    metrics: dict[str, Series] = field(default_factory=dict)
    metrics_error: str | None = None

    def series(self, name: str) -> Series:
        return self.metrics.get(name, [])

    def value(self, name: str) -> float | None:
        """The sum of every series of one sample name (None if absent)."""
        series = self.metrics.get(name)
        return sum(v for _, v in series) if series else None


def parse_metrics(text: str) -> dict[str, Series]:
    """Prometheus text -> sample name -> [(labels, value)]."""
    out: dict[str, Series] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def _get(url: str, api_key: str | None, timeout: float) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or exc
    return str(reason) or type(exc).__name__


def fetch(
    url: str, api_key: str | None = None, timeout: float = FETCH_TIMEOUT_SECONDS
) -> Snapshot:
    snapshot = Snapshot(url)
    try:
        status, body = _get(url + "/health", api_key, timeout)
    except (OSError, ValueError) as exc:
        snapshot.error = _reason(exc)
        return snapshot
    try:
        health = json.loads(body or b"{}")
    except ValueError:
        health = None
    if not isinstance(health, dict):
        snapshot.error = f"/health answered HTTP {status} with no JSON body"
        return snapshot
    snapshot.health = health
    snapshot.healthy = status == 200 and bool(health.get("ok", True))
    try:
        status, body = _get(url + "/metrics", api_key, timeout)
        if status != 200:
            snapshot.metrics_error = f"/metrics answered HTTP {status}"
        else:
            snapshot.metrics = parse_metrics(body.decode("utf-8", "replace"))
    except (OSError, ValueError) as exc:
        snapshot.metrics_error = f"/metrics failed: {_reason(exc)}"
    return snapshot


# -- figures from snapshots ----------------------------------------------------------


def buckets(snapshot: Snapshot, name: str) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) of histogram `name`, by bound."""
    found: dict[float, float] = {}
    for labels, value in snapshot.series(name + "_bucket"):
        bound = float(labels.get("le", "+Inf"))
        found[bound] = found.get(bound, 0.0) + value
    return sorted(found.items())


def window(
    current: list[tuple[float, float]], previous: list[tuple[float, float]]
) -> list[tuple[float, float]]:
    """The observations between two scrapes of one histogram; empty when the
    bounds changed or a counter went back (the server restarted)."""
    if [b for b, _ in current] != [b for b, _ in previous]:
        return []
    diff = [(b, c - p) for (b, c), (_, p) in zip(current, previous)]
    return diff if all(c >= 0 for _, c in diff) else []


def quantile(cumulative: list[tuple[float, float]], q: float) -> float | None:
    """Estimate of the q-quantile; math.inf when it lies past the last finite
    bucket bound, None without observations."""
    total = cumulative[-1][1] if cumulative else 0.0
    if total <= 0:
        return None
    target = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in cumulative:
        if count >= target:
            if math.isinf(bound):
                return math.inf
            if count == lower_count:
                return bound
            share = (target - lower_count) / (count - lower_count)
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, count
    return None


def rate(snapshot: Snapshot, previous: Snapshot | None, name: str) -> float | None:
    """Per-second increase of counter `name` between two snapshots."""
    if previous is None:
        return None
    now, before = snapshot.value(name), previous.value(name)
    elapsed = snapshot.taken_at - previous.taken_at
    if now is None or before is None or elapsed <= 0 or now < before:
        return None
    return (now - before) / elapsed


# -- formatting ------------------------------------------------------------


def _bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return "-"


def _seconds(s: float | None, last_bound: float) -> str:
    if s is None:
        return "-"
    if math.isinf(s):
        return f">{_seconds(last_bound, last_bound)}"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def _number(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _latency_line(
    label: str, snapshot: Snapshot, previous: Snapshot | None, name: str
) -> str:
    current = buckets(snapshot, name)
    if not current:
        return f"{label:<13}no data"
    recent = window(current, buckets(previous, name)) if previous else []
    if recent and recent[-1][1] > 0:
        used = recent
        elapsed = snapshot.taken_at - previous.taken_at if previous else 0.0
        scope = f"{recent[-1][1]:.0f} in the last {elapsed:.1f} s"
    else:
        used = current
        scope = f"{current[-1][1]:.0f} since start"
    finite = [b for b, _ in current if not math.isinf(b)]
    last = finite[-1] if finite else 0.0
    p50 = _seconds(quantile(used, 0.5), last)
    p99 = _seconds(quantile(used, 0.99), last)
    return f"{label:<13}p50 {p50:>9}   p99 {p99:>9}   ({scope})"


def _by_label(series: Series, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for labels, value in series:
        key = labels.get(label, "?")
        out[key] = out.get(key, 0.0) + value
    return out


def _rank_key(text: str) -> tuple[int, str]:
    return (int(text), "") if text.isdigit() else (1 << 30, text)


def render(
    snapshot: Snapshot, previous: Snapshot | None = None, color: bool = False
) -> str:
    """One frame of the dashboard as text (ending in a newline)."""

    def paint(text: str, good: bool) -> str:
        return f"{GREEN if good else RED}{text}{RESET}" if color else text

    stamp = time.strftime("%H:%M:%S", time.localtime(snapshot.wall_time))
    lines = [f"tpnet monitor  {snapshot.url}  {stamp}"]

    # 1. Reachability and health.
    if snapshot.error is not None:
        lines.append(paint(f"unreachable: {snapshot.error}", False))
        return "\n".join(lines) + "\n"
    health = snapshot.health or {}
    missing = [str(r) for r in health.get("missing_ranks") or []]
    world = health.get("world_size")
    if snapshot.healthy:
        state = paint("ok", True)
    else:
        message = (health.get("error") or {}).get("message") or health.get("status")
        state = paint(f"unhealthy: {message or 'not ok'}", False)
    lines.append(
        f"{'health':<13}{state}  (world size {world if world is not None else '?'}, "
        f"{health.get('running', '-')} running, {health.get('queued', '-')} queued)"
    )

    # 2. One row per rank: connected or not, CPU, memory, bytes sent to it.
    cpu = _by_label(snapshot.series("tpnet_rank_cpu_percent"), "rank")
    memory = _by_label(snapshot.series("tpnet_rank_memory_bytes"), "rank")
    sent = _by_label(snapshot.series("tpnet_peer_bytes_sent"), "peer")
    ranks = {str(r) for r in range(world)} if isinstance(world, int) else set()
    ranks |= set(cpu) | set(memory) | set(sent) | set(missing)
    connected = len(ranks) - len(missing) if ranks else 0
    lines.append(
        f"{'ranks':<13}{connected} of {len(ranks)} connected; "
        f"missing {', '.join(missing) or 'none'}"
    )
    lines.append("")
    lines.append(f"{'':<9}{'state':<11}{'cpu %':>7}{'memory':>12}{'bytes sent':>13}")
    for rank in sorted(ranks, key=_rank_key):
        row_state = (
            paint(f"{'missing':<11}", False)
            if rank in missing
            else f"{'connected':<11}"
        )
        bytes_sent = _bytes(sent.get(rank)) if rank != "0" else "-"
        lines.append(
            f"rank {rank:<4}{row_state}{_number(cpu.get(rank)):>7}"
            f"{_bytes(memory.get(rank)):>12}{bytes_sent:>13}"
        )
    lines.append("")
    if snapshot.metrics_error is not None:
        lines.append(f"{'metrics':<13}unavailable: {snapshot.metrics_error}")
        return "\n".join(lines) + "\n"

    # 3. Throughput, requests and the scheduler's queues.
    generated = rate(snapshot, previous, "tpnet_completion_tokens_total")
    prompt = rate(snapshot, previous, "tpnet_prompt_tokens_total")
    total = snapshot.value("tpnet_completion_tokens_total")
    lines.append(
        f"{'tokens/s':<13}generated {_number(generated)}   prompt {_number(prompt)}"
        f"   ({_number(total, 0)} generated since start)"
    )
    statuses = _by_label(snapshot.series("tpnet_requests_total"), "status")
    by_status = "   ".join(f"{s}: {n:.0f}" for s, n in sorted(statuses.items()))
    lines.append(f"{'requests':<13}{by_status or 'none yet'}")
    lines.append(
        f"{'scheduler':<13}"
        f"queue depth {_number(snapshot.value('tpnet_queue_depth'), 0)}"
        f"   running sequences {_number(snapshot.value('tpnet_running_sequences'), 0)}"
        f"   steps {_number(snapshot.value('tpnet_steps'), 0)}"
    )

    # 4. Latencies from the histograms.
    lines.append(
        _latency_line(
            "first token", snapshot, previous, "tpnet_time_to_first_token_seconds"
        )
    )
    lines.append(
        _latency_line(
            "inter-token", snapshot, previous, "tpnet_inter_token_latency_seconds"
        )
    )
    lines.append(
        _latency_line(
            "all-reduce", snapshot, previous, "tpnet_allreduce_latency_seconds"
        )
    )

    # 5. Speculative decoding.
    accepted = snapshot.value("tpnet_speculative_accepted_tokens_total")
    drafted = snapshot.value("tpnet_speculative_drafted_tokens_total")
    if drafted:
        share = 100.0 * (accepted or 0.0) / drafted
        lines.append(
            f"{'speculative':<13}{share:.1f}% accepted "
            f"({accepted or 0:.0f} of {drafted:.0f} drafted)"
        )
    else:
        lines.append(f"{'speculative':<13}no drafted tokens")

    # 6. Prefix reuse.
    prompt_total = snapshot.value("tpnet_prompt_tokens_total")
    reused = snapshot.value("tpnet_prefix_reused_tokens_total") or 0.0
    if prompt_total:
        lines.append(
            f"{'prefix reuse':<13}{100.0 * reused / prompt_total:.1f}% of prompt "
            f"tokens taken from kept caches ({reused:.0f} of {prompt_total:.0f})"
        )
    else:
        lines.append(f"{'prefix reuse':<13}no prompt tokens yet")
    return "\n".join(lines) + "\n"


# -- the command -----------------------------------------------------------


def _base_url(args: argparse.Namespace) -> str:
    if args.cluster:
        from tpnet import cluster

        return cluster.load(args.cluster).http_url
    url = (args.url or DEFAULT_URL).rstrip("/")
    return url.removesuffix("/v1")


def cmd_monitor(args: argparse.Namespace) -> int:
    from tpnet.node import ConfigError

    url = _base_url(args)
    if args.interval < MIN_INTERVAL_SECONDS:
        raise ConfigError(
            f"--interval must be at least {MIN_INTERVAL_SECONDS} s, got {args.interval}"
        )
    if args.once:
        snapshot = fetch(url, args.api_key)
        sys.stdout.write(render(snapshot, None))
        return 0 if snapshot.healthy else 1

    color = sys.stdout.isatty()
    deadline = time.monotonic() + args.duration if args.duration else math.inf
    previous: Snapshot | None = None
    sys.stdout.write(HIDE_CURSOR)
    try:
        while True:
            snapshot = fetch(url, args.api_key)
            frame = render(snapshot, previous, color)
            if snapshot.error is not None:
                frame += f"retrying every {args.interval:g} s (Ctrl-C quits)\n"
            sys.stdout.write(CLEAR + frame)
            sys.stdout.flush()
            if snapshot.error is None:
                previous = snapshot
            if time.monotonic() + args.interval > deadline:
                break
            time.sleep(args.interval)
    except KeyboardInterrupt:
        pass
    finally:
        sys.stdout.write(SHOW_CURSOR)
        sys.stdout.flush()
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser(
        "monitor", help="live view of a running cluster's health and metrics"
    )
    p.add_argument("--url", help=f"rank 0's HTTP address (default {DEFAULT_URL})")
    p.add_argument("--cluster", help="take the HTTP address from this cluster file")
    p.add_argument(
        "--interval", type=float, default=1.0, help="seconds between refreshes"
    )
    p.add_argument(
        "--once",
        action="store_true",
        help="print one frame and exit: 0 if healthy, 1 if not",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=0.0,
        help="stop after this many seconds (0: until Ctrl-C)",
    )
    p.add_argument(
        "--api-key", default=os.environ.get("TPNET_API_KEY"),
        help="sent as Authorization: Bearer KEY",
    )  # fmt: skip
    p.set_defaults(func=cmd_monitor)
