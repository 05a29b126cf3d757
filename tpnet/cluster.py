"""Cluster files, and `tpnet start|stop|status` for the ranks of this machine.

A cluster file (TOML) names every rank's address, the model, the secret file,
the state directory (pid files, logs) and rank 0's HTTP address; the same file
is copied to every machine. `load` validates all of it at once and raises a
`ConfigError` naming the field, what it expected and what it found. Relative
paths in the file are relative to the file itself, so a service started from
any directory reads the same paths.

start/stop/status act only on this machine's ranks: those whose host is one
of its own addresses (or names), or those given with --rank. A started rank
is a detached `python -m tpnet node` process whose pid lives in
STATE/rankR.pid; stop sends SIGTERM (the node stops accepting requests, fails
the in-flight ones, closes its links and exits 0) and SIGKILLs it only after
a bounded wait.
"""

from __future__ import annotations

import argparse
import ipaddress
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import psutil

from tpnet.node import ConfigError, create_secret, read_secret

DEFAULT_HOME = os.environ.get("TPNET_HOME", "~/.tpnet")
DEFAULT_HTTP_HOST = "127.0.0.1"
DEFAULT_HTTP_PORT = 8100
# A rank that cannot load its model or parse its settings exits within a few
# seconds (imports take about one on a 2-core machine); one that is still up
# after this window has got past configuration.
START_CHECK_SECONDS = 4.0
# The node's own shutdown is bounded by its HTTP drain and peer close, about
# a second; 15 s leaves room for a slow machine before SIGKILL.
STOP_TIMEOUT_SECONDS = 15.0
HEALTH_TIMEOUT_SECONDS = 2.0
LOG_TAIL_LINES = 20

_TOP_KEYS = ("model", "secret_file", "state_dir", "http", "ranks")
_HTTP_KEYS = ("host", "port", "api_key_file")
_RANK_KEYS = ("host", "port", "listen")


@dataclass(frozen=True)
class RankEntry:
    index: int
    host: str
    port: int
    listen: str | None = None

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class ClusterFile:
    path: str
    ranks: tuple[RankEntry, ...]
    model: str | None
    secret_file: str
    state_dir: str
    http_host: str = DEFAULT_HTTP_HOST
    http_port: int = DEFAULT_HTTP_PORT
    api_key_file: str | None = None

    @property
    def peers(self) -> str:
        return ",".join(r.address for r in self.ranks)

    def pid_path(self, rank: int) -> str:
        return os.path.join(self.state_dir, f"rank{rank}.pid")

    def log_path(self, rank: int) -> str:
        return os.path.join(self.state_dir, f"rank{rank}.log")

    def output_path(self, rank: int) -> str:
        """Where a started rank's stdout/stderr go: what it printed before
        its logging was set up, and tracebacks from outside logging."""
        return os.path.join(self.state_dir, f"rank{rank}.out")

    @property
    def http_url(self) -> str:
        """Rank 0's HTTP address as a client on this machine reaches it."""
        host = self.http_host
        # A wildcard bind address is reachable on loopback.
        if host == "0.0.0.0":
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.http_port}"


# -- reading and validating -----------------------------------------------------


def load(path: str) -> ClusterFile:
    path = os.path.abspath(os.path.expanduser(path))
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read cluster file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"cluster file {path} is not valid TOML: {exc}") from None
    base = os.path.dirname(path)

    def fail(message: str) -> ConfigError:
        return ConfigError(f"{path}: {message}")

    _check_keys(raw, _TOP_KEYS, "", fail)
    model = _string(raw, "model", "model", fail)
    secret_file = _string(raw, "secret_file", "secret_file", fail)
    state_dir = _string(raw, "state_dir", "state_dir", fail)
    http = raw.get("http", {})
    if not isinstance(http, dict):
        raise fail(f"http must be a table ([http]), got {_kind(http)}")
    _check_keys(http, _HTTP_KEYS, "http.", fail)
    http_host = _string(http, "host", "http.host", fail) or DEFAULT_HTTP_HOST
    http_port = _port(http, "port", "http.port", fail, DEFAULT_HTTP_PORT)
    api_key_file = _string(http, "api_key_file", "http.api_key_file", fail)

    ranks_raw = raw.get("ranks")
    if ranks_raw is None:
        raise fail("no ranks: add one [[ranks]] table with host and port per rank")
    if not isinstance(ranks_raw, list) or not ranks_raw:
        raise fail(
            "ranks must be a non-empty array of [[ranks]] tables, "
            f"got {_kind(ranks_raw)}"
        )
    ranks: list[RankEntry] = []
    seen: dict[tuple[str, int], int] = {}
    for i, entry in enumerate(ranks_raw):
        where = f"ranks[{i}]"
        if not isinstance(entry, dict):
            raise fail(
                f"{where} must be a table with host and port, got {_kind(entry)}"
            )
        _check_keys(entry, _RANK_KEYS, f"{where}.", fail)
        host = _host(entry, "host", f"{where}.host", fail, required=True)
        port = _port(entry, "port", f"{where}.port", fail, None)
        listen = _host(entry, "listen", f"{where}.listen", fail, required=False)
        key = (host.lower(), port)
        if key in seen:
            raise fail(
                f"{where} repeats the address {host}:{port} of ranks[{seen[key]}]"
            )
        seen[key] = i
        ranks.append(RankEntry(i, host, port, listen))
    peer_bind = ranks[0].listen or ranks[0].host
    wildcard = {"0.0.0.0", "::"}
    if http_port == ranks[0].port and (
        http_host == peer_bind or {http_host, peer_bind} & wildcard
    ):
        raise fail(
            f"http.port {http_port} is also the peer port of ranks[0] on the "
            "same address; rank 0 listens on both, so they must differ"
        )

    home = os.path.expanduser(DEFAULT_HOME)
    return ClusterFile(
        path=path,
        ranks=tuple(ranks),
        model=_resolve(model, base) if model else None,
        secret_file=_resolve(secret_file or os.path.join(home, "cluster.key"), base),
        state_dir=_resolve(state_dir or home, base),
        http_host=http_host,
        http_port=http_port,
        api_key_file=_resolve(api_key_file, base) if api_key_file else None,
    )


def _kind(value: Any) -> str:
    names = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "a table",
    }
    return f"{names.get(type(value), type(value).__name__)} ({value!r})"


def _check_keys(
    table: dict[str, Any], known: tuple[str, ...], prefix: str, fail: Any
) -> None:
    for key in table:
        if key not in known:
            raise fail(
                f"unknown key '{prefix}{key}'; expected one of {', '.join(known)}"
            )


def _string(table: dict[str, Any], key: str, field: str, fail: Any) -> str | None:
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise fail(f"{field} must be a string, got {_kind(value)}")
    return value or None


def _host(
    table: dict[str, Any], key: str, field: str, fail: Any, required: bool
) -> Any:
    value = _string(table, key, field, fail)
    if value is None:
        if required:
            raise fail(f"{field} is missing: give the address the other ranks dial")
        return None
    value = value.strip("[]")
    if any(c.isspace() for c in value) or "/" in value:
        raise fail(f"{field} must be a host name or IP address, got {value!r}")
    if ":" in value:
        try:
            ipaddress.IPv6Address(value)
        except ValueError:
            raise fail(
                f"{field} must be a host name or IP address without a port "
                f"(the port is its own key), got {value!r}"
            ) from None
    return value


def _port(
    table: dict[str, Any], key: str, field: str, fail: Any, default: int | None
) -> int:
    value = table.get(key, default)
    if value is None:
        raise fail(f"{field} is missing: give a TCP port from 1 to 65535")
    if isinstance(value, bool) or not isinstance(value, int):
        raise fail(f"{field} must be an integer from 1 to 65535, got {_kind(value)}")
    if not 1 <= value <= 65535:
        raise fail(f"{field} must be from 1 to 65535, got {value}")
    return value


def _resolve(path: str, base: str) -> str:
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))


def read_api_key(path: str) -> str:
    """The HTTP API key from a file that only its owner may read."""
    try:
        mode = os.stat(path).st_mode
        with open(path) as f:
            key = f.read().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read http.api_key_file {path}: {exc}") from None
    if mode & 0o077:
        raise ConfigError(
            f"http.api_key_file {path} is readable by others (mode {mode & 0o777:o}); "
            "run chmod 600 on it"
        )
    if not key:
        raise ConfigError(f"http.api_key_file {path} is empty")
    return key


def apply_defaults(cl: ClusterFile, args: argparse.Namespace) -> None:
    """Fill the settings the command line left out from the cluster file.

    A value given on the command line wins. Options with an argparse default
    cannot tell "given" from "defaulted", so --port counts as given only when
    it differs from the parser's default.
    """
    if getattr(args, "peers", "") is None:
        args.peers = cl.peers
    if getattr(args, "model", "") is None:
        args.model = cl.model
    if getattr(args, "secret_file", "") is None:
        args.secret_file = cl.secret_file
    if getattr(args, "http_host", "") is None:
        args.http_host = cl.http_host
    if getattr(args, "port", None) == DEFAULT_HTTP_PORT:
        args.port = cl.http_port
    rank: int | None = getattr(args, "rank", None)
    if (
        getattr(args, "listen_host", "") is None
        and rank is not None
        and 0 <= rank < len(cl.ranks)
    ):
        args.listen_host = cl.ranks[rank].listen
    if getattr(args, "api_key", "") is None and cl.api_key_file:
        args.api_key = read_api_key(cl.api_key_file)


# -- which ranks are on this machine --------------------------------------------


def local_addresses() -> set[str]:
    """The IP addresses of this machine's interfaces."""
    found = set()
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family in (socket.AF_INET, socket.AF_INET6):
                found.add(addr.address.split("%")[0].lower())
    return found


def is_local(host: str, addresses: set[str] | None = None) -> bool:
    """Whether `host` names this machine. Host names are compared with this
    machine's own name only, never looked up, so no DNS query is made."""
    host = host.lower()
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        own = socket.gethostname().lower().removesuffix(".local")
        return host == "localhost" or host.removesuffix(".local") == own
    if ip.is_loopback:
        return True
    return str(ip) in (local_addresses() if addresses is None else addresses)


def check_rank(cl: ClusterFile, rank: int) -> None:
    if not 0 <= rank < len(cl.ranks):
        raise ConfigError(
            f"--rank {rank} is not in {cl.path}, "
            f"which lists ranks 0 to {len(cl.ranks) - 1}"
        )


def select_ranks(cl: ClusterFile, wanted: list[int] | None) -> list[RankEntry]:
    if wanted:
        for r in wanted:
            check_rank(cl, r)
        return [cl.ranks[r] for r in sorted(set(wanted))]
    addresses = local_addresses()
    ranks = [r for r in cl.ranks if is_local(r.host, addresses)]
    if not ranks:
        raise ConfigError(
            f"no rank in {cl.path} has a host of this machine "
            f"({socket.gethostname()}, {', '.join(sorted(addresses))}); pass --rank R"
        )
    return ranks


# -- pid files ------------------------------------------------------------------


def read_pid(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def rank_alive(pid: int, rank: int) -> bool:
    """Whether `pid` is a live `tpnet node` process of `rank`; a reused pid
    of an unrelated process does not count."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        cmdline = proc.cmdline()
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True
    pairs = list(itertools.pairwise(cmdline))
    return "node" in cmdline and ("--rank", str(rank)) in pairs


def _write_pid(path: str, pid: int) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{pid}\n")
    os.replace(tmp, path)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _tail(path: str, lines: int = LOG_TAIL_LINES) -> list[str]:
    try:
        with open(path, errors="replace") as f:
            return f.read().splitlines()[-lines:]
    except OSError:
        return []


# -- commands ---------------------------------------------------------------------


def cmd_start(args: argparse.Namespace) -> int:
    cl = load(args.cluster)
    ranks = select_ranks(cl, args.rank)
    if args.create_secret and not os.environ.get("TPNET_SECRET"):
        create_secret(cl.secret_file)
    read_secret(cl.secret_file)  # a missing or open secret fails here, not in a log
    os.makedirs(cl.state_dir, exist_ok=True)

    # 1. Spawn every rank not already running, detached from this terminal.
    started: dict[int, subprocess.Popen[bytes]] = {}
    status = 0
    for entry in ranks:
        pid_path = cl.pid_path(entry.index)
        pid = read_pid(pid_path)
        if pid is not None and rank_alive(pid, entry.index):
            print(
                f"rank {entry.index}: already running (pid {pid}); "
                "run `tpnet stop` first"
            )
            status = 1
            continue
        if pid is not None:
            print(
                f"rank {entry.index}: removing stale pid file "
                f"(pid {pid} is not running)"
            )
        command = [
            sys.executable, "-m", "tpnet", "node",
            "--cluster", cl.path,
            "--rank", str(entry.index),
            "--log-file", cl.log_path(entry.index),
        ]  # fmt: skip
        if args.log_level:
            command += ["--log-level", args.log_level]
        with open(cl.output_path(entry.index), "wb") as out:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cl.state_dir,
                start_new_session=True,
                env=dict(os.environ, PYTHONUNBUFFERED="1"),
            )
        _write_pid(pid_path, proc.pid)
        started[entry.index] = proc

    # 2. Watch them for a moment: a bad model or setting exits at once.
    deadline = time.monotonic() + args.wait
    while started and time.monotonic() < deadline:
        if any(p.poll() is not None for p in started.values()):
            break
        time.sleep(0.1)
    for rank, proc in started.items():
        code = proc.poll()
        if code is None:
            print(f"rank {rank}: started, pid {proc.pid}, log {cl.log_path(rank)}")
            continue
        status = 1
        _remove(cl.pid_path(rank))
        # Its stderr holds every log line and what came before logging.
        print(f"rank {rank}: exited at once with status {code}; its last lines:")
        for line in _tail(cl.output_path(rank)):
            print(f"  {line}")
    if 0 in started and started[0].poll() is None:
        print(f"OpenAI API, once every rank has joined: {cl.http_url}/v1")
    return status


def cmd_stop(args: argparse.Namespace) -> int:
    cl = load(args.cluster)
    # Rank 0 first: it stops accepting requests and fails the in-flight ones
    # with a clear error while its workers are still there to finish a step.
    ranks = sorted(select_ranks(cl, args.rank), key=lambda r: r.index)
    status = 0
    for entry in ranks:
        pid_path = cl.pid_path(entry.index)
        pid = read_pid(pid_path)
        if pid is None:
            print(f"rank {entry.index}: not running (no pid file)")
            continue
        if not rank_alive(pid, entry.index):
            print(
                f"rank {entry.index}: not running; removed stale pid file (pid {pid})"
            )
            _remove(pid_path)
            continue
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        started = time.monotonic()
        while (
            rank_alive(pid, entry.index) and time.monotonic() - started < args.timeout
        ):
            time.sleep(0.1)
        if rank_alive(pid, entry.index):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            print(
                f"rank {entry.index}: did not exit {args.timeout:g} s after SIGTERM; "
                f"killed pid {pid}"
            )
            status = 1
        else:
            print(
                f"rank {entry.index}: stopped "
                f"(pid {pid}, {time.monotonic() - started:.1f} s)"
            )
        _remove(pid_path)
    return status


def check_health(url: str, timeout: float = HEALTH_TIMEOUT_SECONDS) -> tuple[bool, str]:
    """GET /health: whether the cluster serves, and a one-line reason."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            body = json.loads(exc.read() or b"{}")
        except ValueError:
            body = {}
        message = (
            (body.get("error") or {}).get("message") if isinstance(body, dict) else None
        )
        return False, f"HTTP {exc.code}: {message or exc.reason}"
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return False, f"unreachable: {reason}"
    missing = body.get("missing_ranks") or []
    return (
        True,
        f"ok: world size {body.get('world_size')}, missing ranks {missing or 'none'}",
    )


def cmd_status(args: argparse.Namespace) -> int:
    cl = load(args.cluster)
    ranks = select_ranks(cl, args.rank)
    status = 0
    for entry in ranks:
        where = f"rank {entry.index} ({entry.address})"
        pid = read_pid(cl.pid_path(entry.index))
        if pid is None:
            print(f"{where}: not running")
            status = 1
        elif rank_alive(pid, entry.index):
            print(f"{where}: running, pid {pid}, log {cl.log_path(entry.index)}")
        else:
            print(
                f"{where}: not running; stale pid file "
                f"{cl.pid_path(entry.index)} (pid {pid})"
            )
            status = 1
    if any(r.index == 0 for r in ranks):
        url = cl.http_url + "/health"
        ok, message = check_health(url)
        print(f"health {url}: {message}")
        status = status or (0 if ok else 1)
    return status


def add_commands(sub: Any) -> None:
    from tpnet import monitor, service

    def cluster_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--cluster", required=True, help="cluster file (TOML)")
        p.add_argument(
            "--rank", type=int, action="append",
            help="act on this rank (repeatable; "
            "default: the ranks whose host is this machine)",
        )  # fmt: skip

    start = sub.add_parser("start", help="start this machine's ranks in the background")
    cluster_options(start)
    start.add_argument(
        "--wait", type=float, default=START_CHECK_SECONDS,
        help="seconds to watch for a rank that exits at once",
    )  # fmt: skip
    start.add_argument(
        "--create-secret", action="store_true",
        help="create the cluster's secret file if missing "
        "(then copy it to the other machines)",
    )  # fmt: skip
    start.add_argument("--log-level", help="log level of the started ranks")
    start.set_defaults(func=cmd_start)

    stop = sub.add_parser(
        "stop", help="stop this machine's ranks (SIGTERM, then SIGKILL)"
    )
    cluster_options(stop)
    stop.add_argument(
        "--timeout", type=float, default=STOP_TIMEOUT_SECONDS,
        help="seconds to wait after SIGTERM before SIGKILL",
    )  # fmt: skip
    stop.set_defaults(func=cmd_stop)

    status = sub.add_parser(
        "status", help="show this machine's ranks and rank 0's health"
    )
    cluster_options(status)
    status.set_defaults(func=cmd_status)

    service.add_commands(sub)
    monitor.add_commands(sub)
