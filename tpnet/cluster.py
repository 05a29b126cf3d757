"""Cluster files (TOML): the ranks, the model, the secret and the HTTP address."""

from __future__ import annotations

import argparse
import tomllib
from typing import Any

from tpnet.node import ConfigError


def load(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read cluster file {path}: {exc}") from None


def apply_defaults(cl: dict[str, Any], args: argparse.Namespace) -> None:
    ranks = cl.get("ranks", [])
    if args.peers is None and ranks:
        args.peers = ",".join(f"{r['host']}:{r['port']}" for r in ranks)
    if args.model is None:
        args.model = cl.get("model")
    if args.secret_file is None:
        args.secret_file = cl.get("secret_file")


def add_commands(sub: Any) -> None:
    return None
