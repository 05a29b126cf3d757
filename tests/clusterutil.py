"""Real tpnet clusters for tests: one `python -m tpnet node` process per rank on
loopback, each with its own log file, stopped (SIGTERM, then SIGKILL) at the
end. Waits are bounded; a rank that dies early fails the wait with its log."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

SECRET = "test-cluster-secret-0123456789abcdef"


def free_ports(count: int) -> list[int]:
    socks, ports = [], []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


class Cluster:
    def __init__(
        self,
        world_size: int,
        log_dir: Path,
        model: str | None = None,
        extra: list[str] | None = None,
        secret: str = SECRET,
        heartbeat: float = 0.25,
        peer_timeout: float = 2.0,
    ) -> None:
        self.world_size = world_size
        ports = free_ports(world_size + 1)
        self.http_port = ports[-1]
        self.peer_ports = ports[:-1]
        self.peers = ",".join(f"127.0.0.1:{p}" for p in self.peer_ports)
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.model = model
        self.extra = extra or []
        self.secrets = [secret] * world_size
        self.heartbeat = heartbeat
        self.peer_timeout = peer_timeout
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.url = f"http://127.0.0.1:{self.http_port}"

    def command(self, rank: int, extra: list[str] | None = None) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "tpnet",
            "node",
            "--rank",
            str(rank),
            "--peers",
            self.peers,
            "--port",
            str(self.http_port),
            "--heartbeat",
            str(self.heartbeat),
            "--peer-timeout",
            str(self.peer_timeout),
        ]
        if self.model:
            cmd += ["--model", self.model]
        return cmd + self.extra + (extra or [])

    def log_path(self, rank: int) -> Path:
        return self.log_dir / f"rank{rank}.log"

    def start_rank(
        self, rank: int, extra: list[str] | None = None, secret: str | None = None
    ) -> subprocess.Popen[bytes]:
        env = dict(
            os.environ, TPNET_SECRET=secret or self.secrets[rank], PYTHONUNBUFFERED="1"
        )
        log = open(self.log_path(rank), "ab")
        proc = subprocess.Popen(
            self.command(rank, extra), stdout=log, stderr=subprocess.STDOUT, env=env
        )
        log.close()
        self.procs[rank] = proc
        return proc

    def start(self) -> Cluster:
        for rank in range(self.world_size):
            self.start_rank(rank)
        return self

    def log(self, rank: int) -> str:
        try:
            return self.log_path(rank).read_text(errors="replace")
        except OSError:
            return ""

    def health(self) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")
        except (OSError, ValueError) as e:
            return 0, {"error": str(e)}

    def wait_healthy(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for rank, proc in self.procs.items():
                if proc.poll() is not None and rank == 0:
                    raise AssertionError(
                        f"rank 0 exited ({proc.returncode}):\n{self.log(0)}"
                    )
            status, _ = self.health()
            if status == 200:
                return
            time.sleep(0.2)
        logs = "\n".join(f"--- rank {r}\n{self.log(r)[-3000:]}" for r in self.procs)
        raise AssertionError(f"cluster not healthy within {timeout} s\n{logs}")

    def wait_status(self, want: int, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        body: dict = {}
        while time.monotonic() < deadline:
            status, body = self.health()
            if status == want:
                return body
            time.sleep(0.1)
        raise AssertionError(
            f"/health never answered {want} within {timeout} s: {body}"
        )

    def signal(self, rank: int, sig: int) -> None:
        self.procs[rank].send_signal(sig)

    def stop_rank(self, rank: int, timeout: float = 15.0) -> int | None:
        proc = self.procs.get(rank)
        if proc is None:
            return None
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGCONT)
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def stop(self) -> dict[int, int | None]:
        # Workers first would make rank 0 log losses; stop rank 0 last so the
        # API answers until the end of a test.
        return {rank: self.stop_rank(rank) for rank in sorted(self.procs, reverse=True)}

    def post(self, path: str, body: dict, timeout: float = 120.0) -> tuple[int, dict]:
        req = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")
