"""Helpers shared by the benchmark scripts: loopback ports, child processes
that are always stopped, line-oriented pipes read with a deadline, and
summary statistics.

Everything here talks to 127.0.0.1 only, and every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from typing import Any

LOOPBACK = "127.0.0.1"
# Ports are drawn from above the usual service ports and below Linux's
# ephemeral range (32768+), so an outgoing connection cannot take one between
# the check and the child's bind.
PORT_RANGE = (20000, 32000)
PORT_TRIES = 50
# A pipe line longer than this is a child gone wrong, not a result.
MAX_LINE_BYTES = 64 * 1024 * 1024


def free_port_range(count: int) -> int:
    """The first of `count` consecutive loopback ports that are free now."""
    for _ in range(PORT_TRIES):
        base = random.randrange(PORT_RANGE[0], PORT_RANGE[1] - count)
        if all(_port_free(base + i) for i in range(count)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports in {PORT_RANGE}")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


class LineReader:
    """Reads newline-terminated lines from a file descriptor with a deadline
    (select + os.read on its own buffer, so no line hides in a Python file
    buffer where select cannot see it)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buffer = b""

    def readline(self, timeout_s: float) -> bytes | None:
        """The next line without its newline; None at end of file. Raises
        TimeoutError when no full line arrives within timeout_s."""
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no line within {timeout_s:.0f} s")
            ready, _, _ = select.select([self.fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return None
            self._buffer += chunk
            if len(self._buffer) > MAX_LINE_BYTES:
                raise ValueError(f"line longer than {MAX_LINE_BYTES} bytes")
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line


def stop_process(proc: subprocess.Popen[Any], grace_s: float = 5.0) -> None:
    """SIGTERM, a bounded wait, then SIGKILL; for a process we started."""
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5.0)
    except ProcessLookupError:
        pass


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear between ranks; nan when empty."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def median(samples: Sequence[float]) -> float:
    return percentile(samples, 50.0)


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int = 1
) -> str:
    """The first `text_columns` columns left-aligned, numbers right-aligned."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        padded = [
            c.ljust(w) if i < text_columns else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(padded).rstrip()

    return "\n".join([line(headers), *(line(row) for row in rows)])


def positive_ints(text: str) -> list[int]:
    """An argparse type: "1,4,8" -> [1, 4, 8], every number at least 1."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"integers separated by commas expected, got {text!r}"
        ) from None
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"every number must be at least 1: {text!r}")
    return values


def write_json(path: str, data: Any) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
