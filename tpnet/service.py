"""One rank as an operating-system service: a systemd unit on Linux, a launchd
plist on macOS, both running `python -m tpnet node --cluster FILE --rank R`
in the foreground so the service manager sees its exit status.

The policy is the same on both: start at boot, restart a rank that fails,
leave alone one that exits cleanly (it was stopped on purpose), stop with
SIGTERM so the node drains and fails in-flight requests before exiting, and
SIGKILL only after a bounded wait. `systemd_unit` and `launchd_plist` are pure
functions of their arguments, so tests check the files on any platform.

`tpnet service install` writes the file and prints the commands that enable
it; it runs them only with --enable. --path-root writes below a directory
instead of the system paths (for tests and for staging images).
"""

from __future__ import annotations

import argparse
import getpass
import os
import plistlib
import re
import subprocess
import sys
from typing import Any

from tpnet import cluster
from tpnet.node import ConfigError

# systemd: seconds between a failure and the restart; the node's own
# shutdown takes about a second, 20 s before SIGKILL leaves room for a slow
# drain. Exit status 2 means the configuration or model cannot work
# (tpnet.cli), so restarting would fail the same way.
RESTART_SECONDS = 2
STOP_TIMEOUT_SECONDS = 20
NO_RESTART_STATUS = 2
# launchd restarts a job no sooner than this after its last start; its
# default, kept explicit so a broken configuration is retried slowly.
LAUNCHD_THROTTLE_SECONDS = 10
PLATFORMS = ("linux", "darwin")


def unit_name(rank: int) -> str:
    return f"tpnet-rank{rank}.service"


def launchd_label(rank: int) -> str:
    return f"com.tpnet.rank{rank}"


def node_command(python: str, cluster_file: str, rank: int) -> list[str]:
    return [
        python,
        "-m",
        "tpnet",
        "node",
        "--cluster",
        cluster_file,
        "--rank",
        str(rank),
    ]


def _systemd_word(word: str) -> str:
    # systemd expands %-specifiers and $VARIABLES in ExecStart and splits on
    # whitespace honouring double quotes with C-style escapes.
    word = word.replace("%", "%%").replace("$", "$$")
    if word and not re.search(r"[\s\"'\\;]", word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def systemd_unit(
    python: str,
    cluster_file: str,
    rank: int,
    user_service: bool = False,
    run_as: str | None = None,
) -> str:
    """The unit file text; `run_as` sets User= of a system unit."""
    exec_start = " ".join(
        _systemd_word(w) for w in node_command(python, cluster_file, rank)
    )
    lines = [
        "[Unit]",
        f"Description=tpnet rank {rank} ({cluster_file})",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        f"ExecStart={exec_start}",
        "Environment=PYTHONUNBUFFERED=1",
    ]
    if run_as and not user_service:
        lines.append(f"User={run_as}")
    lines += [
        "Restart=on-failure",
        f"RestartSec={RESTART_SECONDS}",
        f"RestartPreventExitStatus={NO_RESTART_STATUS}",
        "KillSignal=SIGTERM",
        f"TimeoutStopSec={STOP_TIMEOUT_SECONDS}",
        "",
        "[Install]",
        f"WantedBy={'default.target' if user_service else 'multi-user.target'}",
        "",
    ]
    return "\n".join(lines)


def launchd_plist(
    python: str,
    cluster_file: str,
    rank: int,
    log_path: str,
    working_dir: str,
    run_as: str | None = None,
) -> str:
    """The plist text; `run_as` sets UserName of a LaunchDaemon."""
    job: dict[str, Any] = {
        "Label": launchd_label(rank),
        "ProgramArguments": node_command(python, cluster_file, rank),
        "RunAtLoad": True,
        # Restart only after a failure: a clean exit was a requested stop.
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": LAUNCHD_THROTTLE_SECONDS,
        # launchd sends SIGTERM, then SIGKILL after this many seconds.
        "ExitTimeOut": STOP_TIMEOUT_SECONDS,
        # Background jobs get throttled CPU and I/O; a rank must not be.
        "ProcessType": "Interactive",
        "StandardOutPath": log_path,
        "StandardErrorPath": log_path,
        "WorkingDirectory": working_dir,
        "EnvironmentVariables": {"PYTHONUNBUFFERED": "1"},
    }
    if run_as:
        job["UserName"] = run_as
    return plistlib.dumps(job, sort_keys=False).decode()


def service_path(platform: str, rank: int, user_service: bool, root: str | None) -> str:
    home = os.path.expanduser("~")
    if platform == "linux":
        if user_service:
            config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
            folder = os.path.join(config, "systemd", "user")
        else:
            folder = "/etc/systemd/system"
        path = os.path.join(folder, unit_name(rank))
    else:
        # A LaunchAgent runs only while its user is logged in; a LaunchDaemon
        # starts at boot, which a headless cluster machine needs.
        folder = (
            os.path.join(home, "Library", "LaunchAgents")
            if user_service
            else "/Library/LaunchDaemons"
        )
        path = os.path.join(folder, f"{launchd_label(rank)}.plist")
    return os.path.join(root, path.lstrip("/")) if root else path


def enable_commands(
    platform: str, rank: int, user_service: bool, path: str
) -> list[list[str]]:
    if platform == "linux":
        ctl = ["systemctl", "--user"] if user_service else ["systemctl"]
        return [ctl + ["daemon-reload"], ctl + ["enable", "--now", unit_name(rank)]]
    domain = f"gui/{os.getuid()}" if user_service else "system"
    return [["launchctl", "bootstrap", domain, path]]


def disable_commands(platform: str, rank: int, user_service: bool) -> list[list[str]]:
    if platform == "linux":
        ctl = ["systemctl", "--user"] if user_service else ["systemctl"]
        return [ctl + ["disable", "--now", unit_name(rank)]]
    domain = f"gui/{os.getuid()}" if user_service else "system"
    return [["launchctl", "bootout", f"{domain}/{launchd_label(rank)}"]]


def _platform(args: argparse.Namespace) -> str:
    platform = args.platform or ("darwin" if sys.platform == "darwin" else sys.platform)
    if platform.startswith("linux"):
        return "linux"
    if platform not in PLATFORMS:
        raise ConfigError(
            f"services are written for Linux (systemd) and macOS (launchd); "
            f"this platform is {platform!r}"
        )
    return platform


def _run(commands: list[list[str]]) -> int:
    for command in commands:
        print("+ " + " ".join(command))
        try:
            code = subprocess.run(command, check=False).returncode
        except OSError as exc:
            print(f"cannot run {command[0]}: {exc}", file=sys.stderr)
            return 1
        if code:
            print(f"{command[0]} exited with status {code}", file=sys.stderr)
            return 1
    return 0


def _show(commands: list[list[str]]) -> str:
    return "\n".join("  " + " ".join(c) for c in commands)


def cmd_install(args: argparse.Namespace) -> int:
    platform = _platform(args)
    cl = cluster.load(args.cluster)
    cluster.check_rank(cl, args.rank)
    if args.enable and args.path_root:
        raise ConfigError(
            "--enable acts on this machine's service manager; drop --path-root"
        )
    python = os.path.abspath(args.python or sys.executable)
    run_as = args.run_as
    if run_as is None and not args.user:
        # Under sudo, run as the user who asked, so ~ in the cluster file
        # means their home, not root's.
        name = os.environ.get("SUDO_USER") or getpass.getuser()
        run_as = None if name == "root" else name

    # 1. Build the file.
    if platform == "linux":
        text = systemd_unit(python, cl.path, args.rank, args.user, run_as)
    else:
        text = launchd_plist(
            python, cl.path, args.rank, cl.log_path(args.rank), cl.state_dir, run_as
        )
    path = service_path(platform, args.rank, args.user, args.path_root)
    if args.dry_run:
        print(f"# {path}")
        print(text, end="")
        return 0

    # 2. Write it; launchd also needs the log folder to exist.
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        existed = os.path.exists(path)
        with open(path, "w") as f:
            f.write(text)
        if platform == "darwin":
            os.makedirs(cl.state_dir, exist_ok=True)
    except OSError as exc:
        print(
            f"cannot write {path}: {exc}; run with sudo, or pass --user for a "
            "per-user service",
            file=sys.stderr,
        )
        return 1
    print(f"{'updated' if existed else 'wrote'} {path}")

    # 3. Enable it, or say how.
    commands = enable_commands(platform, args.rank, args.user, path)
    if args.enable:
        return _run(commands)
    print("enable and start it with:\n" + _show(commands))
    if platform == "linux" and args.user:
        print(
            "to start it at boot without logging in:\n  loginctl enable-linger "
            + getpass.getuser()
        )
    return 0


def cmd_uninstall(args: argparse.Namespace) -> int:
    platform = _platform(args)
    if args.disable and args.path_root:
        raise ConfigError(
            "--disable acts on this machine's service manager; drop --path-root"
        )
    path = service_path(platform, args.rank, args.user, args.path_root)
    commands = disable_commands(platform, args.rank, args.user)
    if args.disable and _run(commands):
        return 1
    try:
        os.remove(path)
    except FileNotFoundError:
        print(f"rank {args.rank} has no service file at {path}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"cannot remove {path}: {exc}; run with sudo", file=sys.stderr)
        return 1
    print(f"removed {path}")
    if not args.disable:
        print(
            "if the service was enabled, stop it with the command below "
            "(or uninstall with --disable, which runs it first):\n" + _show(commands)
        )
    return 0


def add_commands(sub: Any) -> None:
    service = sub.add_parser(
        "service", help="install one rank as a systemd or launchd service"
    )
    actions = service.add_subparsers(dest="service_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--rank", type=int, required=True)
        p.add_argument(
            "--user", action="store_true",
            help="a per-user service (systemd --user, launchd LaunchAgent)",
        )  # fmt: skip
        p.add_argument("--platform", choices=PLATFORMS, help="default: this machine's")
        p.add_argument(
            "--path-root", help="write below DIR instead of the system paths"
        )

    install = actions.add_parser("install", help="write the service file for one rank")
    common(install)
    install.add_argument("--cluster", required=True, help="cluster file (TOML)")
    install.add_argument(
        "--dry-run", action="store_true", help="print the file, write nothing"
    )
    install.add_argument(
        "--enable", action="store_true",
        help="also run systemctl/launchctl to enable and start it",
    )  # fmt: skip
    install.add_argument("--python", help="interpreter to run (default: this one)")
    install.add_argument(
        "--run-as", help="user a system service runs as (default: the invoking user)"
    )
    install.set_defaults(func=cmd_install)

    uninstall = actions.add_parser("uninstall", help="remove one rank's service file")
    common(uninstall)
    uninstall.add_argument(
        "--disable", action="store_true",
        help="first stop and disable it with systemctl/launchctl",
    )  # fmt: skip
    uninstall.set_defaults(func=cmd_uninstall)
