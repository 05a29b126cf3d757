"""The `tpnet` command.

tpnet serve            all ranks of a local cluster on loopback, foreground
tpnet node             one rank (what a service manager runs)
tpnet start|stop|status   the ranks of this machine from a cluster file
tpnet service install|uninstall   a systemd unit or launchd plist per rank
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time

from tpnet import cluster
from tpnet.engine.engine import EngineLimits
from tpnet.engine.step import MAX_SLOTS
from tpnet.net import Address
from tpnet.node import (
    ConfigError,
    NodeConfig,
    create_secret,
    dequantize_by_default,
    read_secret,
    run_node,
    setup_logging,
)

DEFAULT_BASE_PORT = 29500


def _add_serving_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        help="GGUF file or MLX/Hugging Face folder (default: SmolLM2-135M-Instruct)",
    )
    p.add_argument("--secret-file", help="cluster key file (or set TPNET_SECRET)")
    p.add_argument(
        "--http-host", default=None, help="HTTP bind address (default 127.0.0.1)"
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("TPNET_API_KEY"),
        help="require Authorization: Bearer KEY",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        help="activation dtype: float32, float16, bfloat16",
    )
    p.add_argument(
        "--dequantize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="expand quantized weights to --dtype at load (default: on a Linux CPU with OpenBLAS)",
    )
    p.add_argument(
        "--rank-weights", help="comma-separated share of each rank, e.g. 2,1"
    )
    p.add_argument("--max-running", type=int, default=EngineLimits.max_running)
    p.add_argument("--max-queued", type=int, default=EngineLimits.max_queued)
    p.add_argument("--max-context", type=int, default=EngineLimits.max_context)
    p.add_argument("--prefill-chunk", type=int, default=EngineLimits.prefill_chunk)
    p.add_argument(
        "--speculative-tokens",
        type=int,
        default=EngineLimits.speculative_tokens,
        help="draft tokens verified per step at first (adapts; 0 turns speculative decoding off)",
    )
    p.add_argument(
        "--prefix-cache-rows",
        type=int,
        default=EngineLimits.prefix_rows,
        help="caches of finished sequences kept for prompts that start the same "
        "way (0 turns prefix reuse off)",
    )
    p.add_argument(
        "--prefix-cache-idle",
        type=float,
        default=EngineLimits.prefix_idle_s,
        help="seconds without work after which the kept caches are freed",
    )
    p.add_argument(
        "--draft-model",
        help="small model of the same tokenizer that drafts on rank 0 (default: prompt lookup)",
    )
    p.add_argument(
        "--heartbeat",
        type=float,
        default=0.5,
        help="seconds between pings on an idle link",
    )
    p.add_argument(
        "--peer-timeout",
        type=float,
        default=3.0,
        help="seconds of silence before a rank is declared lost",
    )
    p.add_argument(
        "--spin-us",
        type=float,
        default=None,
        help="poll links this long before sleeping in an exchange "
        "(default: 300 when each rank on this machine has a core, else 0)",
    )
    p.add_argument("--log-level", default="INFO")


# Each kept cache is a row of the KV cache on every rank.
MAX_PREFIX_CACHE_ROWS = 256


def _limits(args: argparse.Namespace) -> EngineLimits:
    for name in ("max_running", "max_queued", "max_context", "prefill_chunk"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.speculative_tokens <= 8:
        raise ConfigError("--speculative-tokens must be between 0 and 8")
    if not 0 <= args.prefix_cache_rows <= MAX_PREFIX_CACHE_ROWS:
        raise ConfigError(
            f"--prefix-cache-rows must be between 0 and {MAX_PREFIX_CACHE_ROWS}"
        )
    slots = args.max_running + args.max_queued + args.prefix_cache_rows
    if slots > MAX_SLOTS:
        raise ConfigError(
            f"--max-running + --max-queued + --prefix-cache-rows is {slots}; "
            f"the ranks hold at most {MAX_SLOTS} sequence caches"
        )
    if not args.prefix_cache_idle > 0:  # also refuses nan
        raise ConfigError("--prefix-cache-idle must be a positive number of seconds")
    return EngineLimits(
        args.max_running,
        args.max_queued,
        args.prefill_chunk,
        args.max_context,
        args.speculative_tokens,
        prefix_rows=args.prefix_cache_rows,
        prefix_idle_s=args.prefix_cache_idle,
    )


def _weights(text: str | None) -> list[float] | None:
    if not text:
        return None
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise ConfigError(
            f"--rank-weights must be numbers separated by commas, got {text!r}"
        ) from None


def cmd_node(args: argparse.Namespace) -> int:
    cl = cluster.load(args.cluster) if args.cluster else None
    if cl is not None:
        cluster.apply_defaults(cl, args)
    if args.peers is None:
        raise ConfigError("give --peers HOST:PORT,... (one per rank) or --cluster FILE")
    addresses = [Address.parse(p) for p in args.peers.split(",")]
    if args.rank is None:
        raise ConfigError("give --rank")
    if args.world_size is not None and args.world_size != len(addresses):
        raise ConfigError(
            f"--world-size {args.world_size} but --peers lists {len(addresses)} addresses"
        )
    setup_logging(args.rank, args.log_level, args.log_file)
    cfg = NodeConfig(
        rank=args.rank,
        addresses=addresses,
        secret=read_secret(args.secret_file),
        model=args.model,
        listen_host=args.listen_host,
        http_host=args.http_host or "127.0.0.1",
        http_port=args.port,
        api_key=args.api_key,
        dtype=args.dtype,
        dequantize=dequantize_by_default()
        if args.dequantize is None
        else args.dequantize,
        rank_weights=_weights(args.rank_weights),
        limits=_limits(args),
        draft_model=args.draft_model,
        spin_us=args.spin_us,
        heartbeat_s=args.heartbeat,
        peer_timeout_s=args.peer_timeout,
    )
    import uvloop

    return uvloop.run(run_node(cfg))


def cmd_serve(args: argparse.Namespace) -> int:
    """Start every rank of a local cluster as child processes; stop them all
    on SIGINT/SIGTERM. A rank that dies is restarted (as a service manager
    would), so the cluster re-forms by itself."""
    setup_logging(None, args.log_level)
    secret_file = args.secret_file or os.path.join(
        os.path.expanduser(cluster.DEFAULT_HOME), "cluster.key"
    )
    if not os.environ.get("TPNET_SECRET"):
        create_secret(secret_file)
    n = args.world_size
    if n < 1:
        raise ConfigError("--world-size must be at least 1")
    peers = ",".join(f"127.0.0.1:{args.base_port + r}" for r in range(n))
    log_dir = args.log_dir
    children: dict[int, subprocess.Popen[bytes]] = {}

    def command(rank: int) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "tpnet",
            "node",
            "--rank",
            str(rank),
            "--peers",
            peers,
            "--secret-file",
            secret_file,
            "--port",
            str(args.port),
            "--dtype",
            args.dtype,
            "--log-level",
            args.log_level,
            "--max-running",
            str(args.max_running),
            "--max-queued",
            str(args.max_queued),
            "--max-context",
            str(args.max_context),
            "--prefill-chunk",
            str(args.prefill_chunk),
            "--heartbeat",
            str(args.heartbeat),
            "--peer-timeout",
            str(args.peer_timeout),
            "--speculative-tokens",
            str(args.speculative_tokens),
            "--prefix-cache-rows",
            str(args.prefix_cache_rows),
            "--prefix-cache-idle",
            str(args.prefix_cache_idle),
            *(["--spin-us", str(args.spin_us)] if args.spin_us is not None else []),
        ]
        if args.draft_model:
            cmd += ["--draft-model", args.draft_model]
        if args.model:
            cmd += ["--model", args.model]
        if args.http_host:
            cmd += ["--http-host", args.http_host]
        if args.api_key:
            cmd += ["--api-key", args.api_key]
        if args.dequantize is not None:
            cmd.append("--dequantize" if args.dequantize else "--no-dequantize")
        if args.rank_weights:
            cmd += ["--rank-weights", args.rank_weights]
        if log_dir:
            cmd += ["--log-file", os.path.join(log_dir, f"rank{rank}.log")]
        return cmd

    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    for rank in range(n):
        children[rank] = subprocess.Popen(command(rank))
    print(
        f"tpnet: {n} ranks starting; OpenAI API on http://{args.http_host or '127.0.0.1'}:{args.port}/v1",
        file=sys.stderr,
        flush=True,
    )
    status = 0
    while not stopping:
        time.sleep(0.2)
        for rank, child in list(children.items()):
            code = child.poll()
            if code is None or stopping:
                continue
            # 0: the rank was stopped on purpose; 2: its configuration or
            # model cannot work, so restarting would fail the same way.
            if code in (0, 2) or not args.restart:
                print(
                    f"tpnet: rank {rank} exited with status {code}; stopping",
                    file=sys.stderr,
                )
                stopping, status = True, code or 1
                break
            print(
                f"tpnet: rank {rank} exited with status {code}; restarting it",
                file=sys.stderr,
            )
            children[rank] = subprocess.Popen(command(rank))
    for child in children.values():
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    for child in children.values():
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tpnet",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve", help="run a local cluster on loopback in the foreground"
    )
    serve.add_argument("--world-size", type=int, default=2)
    serve.add_argument(
        "--port", type=int, default=cluster.DEFAULT_HTTP_PORT, help="HTTP port"
    )
    serve.add_argument(
        "--base-port",
        type=int,
        default=DEFAULT_BASE_PORT,
        help="rank r listens on base+r",
    )
    serve.add_argument("--log-dir", help="also write each rank's log to DIR/rankR.log")
    serve.add_argument(
        "--no-restart",
        dest="restart",
        action="store_false",
        help="do not restart a rank that dies",
    )
    _add_serving_options(serve)
    serve.set_defaults(func=cmd_serve)

    node = sub.add_parser("node", help="run one rank")
    node.add_argument("--rank", type=int)
    node.add_argument("--world-size", type=int)
    node.add_argument("--peers", help="HOST:PORT of every rank, in rank order")
    node.add_argument(
        "--listen-host", help="address to listen on (default: this rank's peer host)"
    )
    node.add_argument(
        "--port", type=int, default=cluster.DEFAULT_HTTP_PORT, help="HTTP port (rank 0)"
    )
    node.add_argument("--log-file", help="also log to this rotating file")
    node.add_argument(
        "--cluster", help="cluster file (TOML); command-line options override it"
    )
    _add_serving_options(node)
    node.set_defaults(func=cmd_node)

    cluster.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"tpnet: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    sys.exit(main())
