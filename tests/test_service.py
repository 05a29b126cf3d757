"""Tests for tpnet.service: the generated systemd unit and launchd plist, and
`tpnet service install|uninstall` writing below a temporary --path-root."""

from __future__ import annotations

import plistlib
from pathlib import Path

import pytest

from tpnet import cli, service

PYTHON = "/opt/tpnet/.venv/bin/python"
CLUSTER = "/etc/tpnet/cluster.toml"


def unit_lines(text: str) -> list[str]:
    return text.splitlines()


def test_a_system_unit_runs_the_rank_in_the_foreground_and_restarts_on_failure():
    text = service.systemd_unit(PYTHON, CLUSTER, 1, run_as="alice")

    lines = unit_lines(text)
    assert f"ExecStart={PYTHON} -m tpnet node --cluster {CLUSTER} --rank 1" in lines
    assert "Restart=on-failure" in lines
    assert "RestartSec=2" in lines
    assert "RestartPreventExitStatus=2" in lines
    assert "KillSignal=SIGTERM" in lines
    assert "TimeoutStopSec=20" in lines
    assert "After=network-online.target" in lines
    assert "Wants=network-online.target" in lines
    assert "User=alice" in lines
    assert "WantedBy=multi-user.target" in lines
    assert lines.index("[Unit]") < lines.index("[Service]") < lines.index("[Install]")


def test_a_user_unit_has_no_user_line_and_starts_with_the_user_session():
    lines = unit_lines(
        service.systemd_unit(PYTHON, CLUSTER, 0, user_service=True, run_as="alice")
    )

    assert not any(line.startswith("User=") for line in lines)
    assert "WantedBy=default.target" in lines


def test_exec_start_quotes_paths_with_spaces_and_escapes_specifiers():
    text = service.systemd_unit("/opt/my env/python", "/srv/100% cluster.toml", 0)

    assert (
        'ExecStart="/opt/my env/python" -m tpnet node '
        '--cluster "/srv/100%% cluster.toml" --rank 0' in text
    )


def test_a_launchd_plist_keeps_the_rank_alive_only_after_failures():
    text = service.launchd_plist(
        PYTHON, CLUSTER, 2, "/var/tpnet/rank2.log", "/var/tpnet", run_as="alice"
    )

    job = plistlib.loads(text.encode())
    assert job["Label"] == "com.tpnet.rank2"
    assert job["ProgramArguments"] == [
        PYTHON,
        "-m",
        "tpnet",
        "node",
        "--cluster",
        CLUSTER,
        "--rank",
        "2",
    ]
    assert job["KeepAlive"] == {"SuccessfulExit": False}
    assert job["RunAtLoad"] is True
    assert job["StandardOutPath"] == "/var/tpnet/rank2.log"
    assert job["StandardErrorPath"] == "/var/tpnet/rank2.log"
    assert job["WorkingDirectory"] == "/var/tpnet"
    assert job["ExitTimeOut"] == 20
    assert job["UserName"] == "alice"


@pytest.fixture
def cluster_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.delenv("SUDO_USER", raising=False)
    path = tmp_path / "cluster.toml"
    path.write_text(
        f'state_dir = "{tmp_path / "state"}"\n'
        '[[ranks]]\nhost = "192.0.2.10"\nport = 29500\n'
        '[[ranks]]\nhost = "192.0.2.11"\nport = 29500\n'
    )
    return path


def install(cluster_file: Path, root: Path, *extra: str) -> int:
    argv = ["service", "install", "--cluster", str(cluster_file), "--rank", "1"]
    return cli.main(argv + ["--path-root", str(root), *extra])


def uninstall(root: Path, *extra: str) -> int:
    return cli.main(
        ["service", "uninstall", "--rank", "1", "--path-root", str(root), *extra]
    )


def test_install_and_uninstall_a_system_unit_below_the_path_root(
    cluster_file, tmp_path, capsys
):
    root = tmp_path / "root"

    installed = install(cluster_file, root, "--platform", "linux", "--run-as", "bob")
    unit = root / "etc/systemd/system/tpnet-rank1.service"
    text = unit.read_text()
    printed = capsys.readouterr().out
    removed = uninstall(root, "--platform", "linux")
    removed_again = uninstall(root, "--platform", "linux")

    assert installed == 0
    assert f"--cluster {cluster_file} --rank 1" in text
    assert "User=bob" in text
    assert "systemctl enable --now tpnet-rank1.service" in printed
    assert removed == 0
    assert not unit.exists()
    assert removed_again == 1


def test_install_and_uninstall_a_user_unit_below_the_path_root(
    cluster_file, tmp_path, capsys
):
    root = tmp_path / "root"
    home = str(tmp_path / "home").lstrip("/")

    installed = install(cluster_file, root, "--platform", "linux", "--user")
    unit = root / home / ".config/systemd/user/tpnet-rank1.service"
    text = unit.read_text()
    printed = capsys.readouterr().out
    removed = uninstall(root, "--platform", "linux", "--user")

    assert installed == 0
    assert "WantedBy=default.target" in text
    assert "systemctl --user enable --now tpnet-rank1.service" in printed
    assert removed == 0
    assert not unit.exists()


@pytest.mark.parametrize(
    ("flags", "folder"),
    [(["--user"], "{home}/Library/LaunchAgents"), ([], "Library/LaunchDaemons")],
)
def test_install_and_uninstall_a_launchd_plist_below_the_path_root(
    cluster_file, tmp_path, capsys, flags, folder
):
    root = tmp_path / "root"
    home = str(tmp_path / "home").lstrip("/")

    installed = install(cluster_file, root, "--platform", "darwin", *flags)
    plist = root / folder.format(home=home) / "com.tpnet.rank1.plist"
    job = plistlib.loads(plist.read_bytes())
    printed = capsys.readouterr().out
    removed = uninstall(root, "--platform", "darwin", *flags)

    assert installed == 0
    assert job["ProgramArguments"][-4:] == [
        "--cluster",
        str(cluster_file),
        "--rank",
        "1",
    ]
    assert job["StandardErrorPath"] == str(tmp_path / "state" / "rank1.log")
    assert (tmp_path / "state").is_dir()
    assert "launchctl bootstrap" in printed
    assert removed == 0
    assert not plist.exists()


def test_dry_run_prints_the_unit_and_writes_nothing(cluster_file, tmp_path, capsys):
    root = tmp_path / "root"

    code = install(cluster_file, root, "--platform", "linux", "--dry-run")

    assert code == 0
    assert "ExecStart=" in capsys.readouterr().out
    assert not root.exists()


def test_install_refuses_a_rank_not_in_the_cluster_file(cluster_file, tmp_path, capsys):
    argv = ["service", "install", "--cluster", str(cluster_file), "--rank", "5"]

    code = cli.main(
        argv + ["--platform", "linux", "--path-root", str(tmp_path / "root")]
    )

    assert code == 2
    assert "--rank 5 is not in" in capsys.readouterr().err


def test_enable_cannot_act_on_a_path_root(cluster_file, tmp_path, capsys):
    code = install(cluster_file, tmp_path / "root", "--platform", "linux", "--enable")

    assert code == 2
    assert "drop --path-root" in capsys.readouterr().err
