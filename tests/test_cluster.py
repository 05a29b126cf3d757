"""Tests for tpnet.cluster: cluster files (valid and every kind of invalid),
how they fill in the command line, which ranks are local, and `tpnet
start|status|stop` managing two real ranks of a tiny model on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
from clusterutil import free_ports
from tinymodel import build_tiny_model

from tpnet import cli, cluster
from tpnet.node import ConfigError

# A rank on this 2-core machine imports MLX and loads the tiny model in a
# few seconds; joining the mesh adds well under one.
HEALTHY_WITHIN_SECONDS = 60
COMMAND_TIMEOUT_SECONDS = 60
SECRET = "cluster-test-secret-0123456789abcdef"


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def secret_file(folder: Path, text: str = SECRET) -> Path:
    path = folder / "cluster.key"
    path.write_text(text)
    path.chmod(0o600)
    return path


TWO_RANKS = """
[[ranks]]
host = "127.0.0.1"
port = 29500
[[ranks]]
host = "127.0.0.1"
port = 29501
"""


# -- parsing -------------------------------------------------------------------------


def test_a_full_cluster_file_loads_with_paths_resolved(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = write(
        tmp_path / "c.toml",
        """
        model = "models/tiny"
        secret_file = "~/.tpnet/cluster.key"
        state_dir = "/var/tmp/tpnet-state"
        [http]
        host = "0.0.0.0"
        port = 8200
        api_key_file = "api.key"
        [[ranks]]
        host = "192.0.2.10"
        port = 29500
        listen = "0.0.0.0"
        [[ranks]]
        host = "fe80::1"
        port = 29501
        """,
    )

    cl = cluster.load(str(path))

    assert cl.path == str(path)
    assert cl.model == str(tmp_path / "models" / "tiny")
    assert cl.secret_file == str(tmp_path / "home" / ".tpnet" / "cluster.key")
    assert cl.state_dir == "/var/tmp/tpnet-state"
    assert (cl.http_host, cl.http_port) == ("0.0.0.0", 8200)
    assert cl.api_key_file == str(tmp_path / "api.key")
    assert cl.ranks[0] == cluster.RankEntry(0, "192.0.2.10", 29500, "0.0.0.0")
    assert cl.ranks[1] == cluster.RankEntry(1, "fe80::1", 29501, None)
    assert cl.peers == "192.0.2.10:29500,[fe80::1]:29501"
    assert cl.http_url == "http://127.0.0.1:8200"
    assert cl.pid_path(1) == "/var/tmp/tpnet-state/rank1.pid"


def test_a_minimal_cluster_file_takes_the_defaults(tmp_path):
    path = write(tmp_path / "c.toml", TWO_RANKS)

    cl = cluster.load(str(path))

    home = os.path.expanduser(cluster.DEFAULT_HOME)
    assert cl.model is None
    assert cl.api_key_file is None
    assert cl.secret_file == os.path.join(home, "cluster.key")
    assert cl.state_dir == home
    assert (cl.http_host, cl.http_port) == ("127.0.0.1", 8100)


RANK0 = '[[ranks]]\nhost = "127.0.0.1"\nport = 29500\n'

INVALID_FILES = [
    ('model = "m"\n', "no ranks"),
    ("ranks = []\n", "ranks must be a non-empty array"),
    ('ranks = "127.0.0.1:29500"\n', "ranks must be a non-empty array"),
    ("[[ranks]]\nport = 29500\n", "ranks[0].host is missing"),
    (RANK0 + '[[ranks]]\nhost = "127.0.0.1"\n', "ranks[1].port is missing"),
    (
        '[[ranks]]\nhost = "h"\nport = 70000\n',
        "ranks[0].port must be from 1 to 65535, got 70000",
    ),
    (
        '[[ranks]]\nhost = "h"\nport = 0\n',
        "ranks[0].port must be from 1 to 65535, got 0",
    ),
    ('[[ranks]]\nhost = "h"\nport = "29500"\n', "ranks[0].port must be an integer"),
    ('[[ranks]]\nhost = "h"\nport = true\n', "ranks[0].port must be an integer"),
    ("[[ranks]]\nhost = 10\nport = 1\n", "ranks[0].host must be a string"),
    (
        '[[ranks]]\nhost = "1.2.3.4:5"\nport = 1\n',
        "ranks[0].host must be a host name or IP address without a port",
    ),
    (
        '[[ranks]]\nhost = "a b"\nport = 1\n',
        "ranks[0].host must be a host name or IP address",
    ),
    (
        '[[ranks]]\nhost = "h"\nport = 1\nlisten = 0\n',
        "ranks[0].listen must be a string",
    ),
    (RANK0 + RANK0, "ranks[1] repeats the address 127.0.0.1:29500 of ranks[0]"),
    ('modle = "m"\n' + RANK0, "unknown key 'modle'"),
    ("[http]\nprot = 1\n" + RANK0, "unknown key 'http.prot'"),
    ('[[ranks]]\nhost = "h"\nport = 1\nhots = "x"\n', "unknown key 'ranks[0].hots'"),
    ("[http]\nport = 99999\n" + RANK0, "http.port must be from 1 to 65535, got 99999"),
    (
        "[http]\nport = 29500\n" + RANK0,
        "http.port 29500 is also the peer port of ranks[0]",
    ),
    ('http = "127.0.0.1:8100"\n' + RANK0, "http must be a table"),
    ("model = 5\n" + RANK0, "model must be a string, got an integer (5)"),
    ("secret_file = ['a']\n" + RANK0, "secret_file must be a string"),
    ("state_dir = false\n" + RANK0, "state_dir must be a string"),
    ("[http]\napi_key_file = 1\n" + RANK0, "http.api_key_file must be a string"),
    ("ranks = [1, 2]\n", "ranks[0] must be a table"),
    ("[[ranks]\n", "is not valid TOML"),
]


@pytest.mark.parametrize(("text", "expected"), INVALID_FILES)
def test_an_invalid_cluster_file_is_refused_naming_the_field(tmp_path, text, expected):
    path = tmp_path / "bad.toml"
    path.write_text(text)

    with pytest.raises(ConfigError) as raised:
        cluster.load(str(path))

    assert expected in str(raised.value)
    assert str(path) in str(raised.value)


def test_a_missing_cluster_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read cluster file"):
        cluster.load(str(tmp_path / "absent.toml"))


# -- the command line --------------------------------------------------------


@pytest.fixture
def node_file(tmp_path, monkeypatch):
    monkeypatch.delenv("TPNET_API_KEY", raising=False)
    key = tmp_path / "api.key"
    key.write_text("sk-from-file\n")
    key.chmod(0o600)
    return write(
        tmp_path / "c.toml",
        """
        model = "/models/tiny"
        secret_file = "/keys/cluster.key"
        [http]
        host = "0.0.0.0"
        port = 8200
        api_key_file = "api.key"
        [[ranks]]
        host = "10.0.0.1"
        port = 29500
        [[ranks]]
        host = "10.0.0.2"
        port = 29500
        listen = "0.0.0.0"
        """,
    )


def test_the_cluster_file_fills_what_the_command_line_left_out(node_file):
    args = cli.build_parser().parse_args(
        ["node", "--cluster", str(node_file), "--rank", "1"]
    )

    cluster.apply_defaults(cluster.load(args.cluster), args)

    assert args.peers == "10.0.0.1:29500,10.0.0.2:29500"
    assert args.model == "/models/tiny"
    assert args.secret_file == "/keys/cluster.key"
    assert args.http_host == "0.0.0.0"
    assert args.port == 8200
    assert args.listen_host == "0.0.0.0"
    assert args.api_key == "sk-from-file"


def test_explicit_command_line_values_win_over_the_cluster_file(node_file):
    argv = [
        "node", "--cluster", str(node_file), "--rank", "1",
        "--peers", "127.0.0.1:1,127.0.0.1:2", "--model", "/other",
        "--secret-file", "/other.key", "--http-host", "127.0.0.1",
        "--port", "9000", "--listen-host", "127.0.0.1", "--api-key", "sk-flag",
    ]  # fmt: skip
    args = cli.build_parser().parse_args(argv)

    cluster.apply_defaults(cluster.load(args.cluster), args)

    assert args.peers == "127.0.0.1:1,127.0.0.1:2"
    assert args.model == "/other"
    assert args.secret_file == "/other.key"
    assert args.http_host == "127.0.0.1"
    assert args.port == 9000
    assert args.listen_host == "127.0.0.1"
    assert args.api_key == "sk-flag"


def test_an_api_key_file_readable_by_others_is_refused(node_file, tmp_path):
    (tmp_path / "api.key").chmod(0o644)
    args = cli.build_parser().parse_args(
        ["node", "--cluster", str(node_file), "--rank", "0"]
    )

    with pytest.raises(ConfigError, match="readable by others"):
        cluster.apply_defaults(cluster.load(args.cluster), args)


def test_loopback_addresses_and_this_machines_name_are_local():
    addresses = {"192.0.2.7"}

    assert cluster.is_local("127.0.0.1", addresses)
    assert cluster.is_local("127.3.4.5", addresses)
    assert cluster.is_local("::1", addresses)
    assert cluster.is_local("localhost", addresses)
    assert cluster.is_local("192.0.2.7", addresses)
    assert cluster.is_local(os.uname().nodename, addresses)
    assert not cluster.is_local("192.0.2.8", addresses)
    assert not cluster.is_local("some-other-host", addresses)


def test_a_machine_without_ranks_in_the_file_must_name_them(tmp_path):
    path = write(tmp_path / "c.toml", '[[ranks]]\nhost = "192.0.2.99"\nport = 29500\n')
    cl = cluster.load(str(path))

    with pytest.raises(ConfigError, match="pass --rank"):
        cluster.select_ranks(cl, None)
    with pytest.raises(ConfigError, match="--rank 3 is not in"):
        cluster.select_ranks(cl, [3])
    assert [r.index for r in cluster.select_ranks(cl, [0])] == [0]


# -- start, status, stop -----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


def tpnet(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("TPNET_SECRET", "TPNET_API_KEY")
    }
    return subprocess.run(
        [sys.executable, "-m", "tpnet", *argv],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=COMMAND_TIMEOUT_SECONDS,
    )


def local_cluster(folder: Path, model: str | None) -> Path:
    http_port, port0, port1 = free_ports(3)
    secret = secret_file(folder)
    model_line = f'model = "{model}"\n' if model else ""
    return write(
        folder / "cluster.toml",
        f"""
        {model_line}
        secret_file = "{secret}"
        state_dir = "{folder / "state"}"
        [http]
        host = "127.0.0.1"
        port = {http_port}
        [[ranks]]
        host = "127.0.0.1"
        port = {port0}
        [[ranks]]
        host = "127.0.0.1"
        port = {port1}
        """,
    )


@pytest.fixture
def cleanup_ranks():
    """Kill whatever rank a failed test left running, by its pid file."""
    files: list[cluster.ClusterFile] = []
    yield files.append
    for cl in files:
        for entry in cl.ranks:
            pid = cluster.read_pid(cl.pid_path(entry.index))
            if pid is not None and cluster.rank_alive(pid, entry.index):
                os.kill(pid, signal.SIGKILL)


def chat(url: str) -> dict:
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
    request = urllib.request.Request(
        url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_start_status_and_stop_manage_two_real_ranks(
    tmp_path, tiny_model, cleanup_ranks
):
    path = local_cluster(tmp_path, tiny_model)
    cl = cluster.load(str(path))
    cleanup_ranks(cl)

    started = tpnet("start", "--cluster", str(path))
    assert started.returncode == 0, started.stdout + started.stderr
    assert "rank 0: started" in started.stdout
    assert "rank 1: started" in started.stdout
    again = tpnet("start", "--cluster", str(path))
    assert again.returncode == 1
    assert "already running" in again.stdout

    deadline = time.monotonic() + HEALTHY_WITHIN_SECONDS
    status = tpnet("status", "--cluster", str(path))
    while status.returncode != 0 and time.monotonic() < deadline:
        time.sleep(1)
        status = tpnet("status", "--cluster", str(path))
    assert status.returncode == 0, status.stdout + status.stderr
    assert "ok: world size 2, missing ranks none" in status.stdout
    reply = chat(cl.http_url)
    assert reply["usage"]["completion_tokens"] >= 1

    stopped = tpnet("stop", "--cluster", str(path))
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "rank 0: stopped" in stopped.stdout
    assert "rank 1: stopped" in stopped.stdout
    for rank in (0, 1):
        assert not os.path.exists(cl.pid_path(rank))
        log = Path(cl.log_path(rank)).read_text()
        assert f"rank {rank} tpnet.node INFO rank {rank} shutting down" in log
    assert "POST /v1/chat/completions" in Path(cl.log_path(0)).read_text()
    after = tpnet("status", "--cluster", str(path))
    assert after.returncode == 1
    assert "not running" in after.stdout


def test_a_rank_that_cannot_load_its_model_is_reported_at_start(
    tmp_path, cleanup_ranks
):
    path = local_cluster(tmp_path, str(tmp_path / "no-such-model"))
    cl = cluster.load(str(path))
    cleanup_ranks(cl)

    result = tpnet("start", "--cluster", str(path), "--rank", "1", "--wait", "30")

    assert result.returncode == 1
    assert "rank 1: exited at once with status 2" in result.stdout
    assert "does not exist" in result.stdout
    assert not os.path.exists(cl.pid_path(1))


def test_start_refuses_a_missing_secret_before_starting_anything(tmp_path):
    path = local_cluster(tmp_path, None)
    os.remove(tmp_path / "cluster.key")

    result = tpnet("start", "--cluster", str(path))

    assert result.returncode == 2
    assert "cannot read the secret file" in result.stderr
    assert not (tmp_path / "state").exists()


def test_status_reports_a_stale_pid_file(tmp_path):
    path = local_cluster(tmp_path, None)
    cl = cluster.load(str(path))
    os.makedirs(cl.state_dir)
    # This test's own pid: alive, but not a tpnet rank.
    Path(cl.pid_path(1)).write_text(f"{os.getpid()}\n")

    status = tpnet("status", "--cluster", str(path), "--rank", "1")
    stopped = tpnet("stop", "--cluster", str(path), "--rank", "1")

    assert status.returncode == 1
    assert "stale pid file" in status.stdout
    assert stopped.returncode == 0
    assert "removed stale pid file" in stopped.stdout
    assert not os.path.exists(cl.pid_path(1))


def test_the_example_cluster_file_is_valid():
    example = Path(__file__).parent.parent / "examples" / "cluster.toml"

    cl = cluster.load(str(example))

    assert [r.address for r in cl.ranks] == ["192.0.2.10:29500", "192.0.2.11:29500"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-queued", "4090"], "the ranks hold at most 4096 sequence caches"),
        (["--prefix-cache-rows", "-1"], "--prefix-cache-rows must be between"),
        (["--prefix-cache-idle", "0"], "--prefix-cache-idle must be a positive"),
        (["--prefix-cache-idle", "nan"], "--prefix-cache-idle must be a positive"),
    ],
)
def test_engine_limits_that_cannot_work_are_refused_naming_the_flag(flags, message):
    args = cli.build_parser().parse_args(["serve", *flags])

    with pytest.raises(ConfigError, match=message):
        cli._limits(args)
