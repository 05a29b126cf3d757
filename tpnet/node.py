"""One rank of a tpnet cluster: the same program on every machine.

Start-up order: load and shard the model (a broken model fails here, before
this rank waits on anyone), then join the mesh; rank 0 also starts the
scheduler and the HTTP front end. Workers run the steps rank 0 sends.

Shutdown order (SIGTERM or SIGINT): stop accepting HTTP requests, fail the
in-flight ones with a clear error, close the links to the peers, exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

from tpnet import wire
from tpnet.collective import Collective, StepAborted
from tpnet.engine.engine import Engine, EngineLimits
from tpnet.engine.step import BadStep, StepRunner, validate_step
from tpnet.model.llama import ShardedModel
from tpnet.model.loader import ModelError, ModelSpec, load_model
from tpnet.model.shard import SliceLoader, mlp_unit_for, plan_shard
from tpnet.net import Address, Mesh, PeerLost

logger = logging.getLogger("tpnet.node")

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


@dataclass
class NodeConfig:
    rank: int
    addresses: list[Address]
    secret: bytes
    model: str | None = None
    listen_host: str | None = None
    http_host: str = "127.0.0.1"
    http_port: int = 8100
    api_key: str | None = None
    dtype: str = "float32"
    dequantize: bool = False
    rank_weights: list[float] | None = None
    limits: EngineLimits = field(default_factory=EngineLimits)
    heartbeat_s: float = 0.5
    peer_timeout_s: float = 3.0
    model_id: str | None = None
    draft_model: str | None = None
    spin_us: float | None = None  # None: decide from the ranks on this machine

    @property
    def world_size(self) -> int:
        return len(self.addresses)


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the setting."""


def check_config(cfg: NodeConfig) -> None:
    if not 0 <= cfg.rank < cfg.world_size:
        raise ConfigError(
            f"--rank {cfg.rank} is outside the {cfg.world_size} peers given"
        )
    if len(set(cfg.addresses)) != len(cfg.addresses):
        raise ConfigError("two ranks share one HOST:PORT in --peers")
    if len(cfg.secret) < 16:
        raise ConfigError("the cluster secret must be at least 16 bytes")
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}")


def build_model(spec: ModelSpec, cfg: NodeConfig, collective_all_sum) -> ShardedModel:
    plan = plan_shard(
        spec.config,
        cfg.rank,
        cfg.world_size,
        cfg.rank_weights,
        mlp_unit=mlp_unit_for(spec),
    )
    logger.info(
        "rank %d shard: query heads %s, KV heads %s, MLP %s, vocab %s",
        cfg.rank,
        plan.q_heads,
        plan.kv_heads,
        plan.mlp,
        plan.vocab,
    )
    return ShardedModel(
        spec, plan, collective_all_sum, DTYPES[cfg.dtype], cfg.dequantize
    )


# Seconds between the resource reports a worker sends rank 0.
STATS_INTERVAL_S = 2.0


def _on_control(
    mesh: Mesh, rank: int, body: dict, metrics: Any = None, collective: Any = None
) -> None:
    kind = body.get("type")
    if kind == "step_failed" and collective is not None:
        # A worker lost a peer mid-step: the others wait for its parts in vain.
        collective.abort(f"rank {rank} failed the step: {body.get('reason', '')}")
    elif kind == "shutdown":
        link = mesh.links.get(rank)
        if link is not None:
            link.close(f"rank {rank} is shutting down: {body.get('reason', '')}")
    elif kind == "stats" and metrics is not None and body.get("rank") == rank:
        try:
            metrics.worker_stats[rank] = {
                "cpu_percent": float(body.get("cpu_percent", 0)),
                "rss_bytes": float(body.get("rss_bytes", 0)),
                "gpu_memory_bytes": None
                if body.get("gpu_memory_bytes") is None
                else float(body["gpu_memory_bytes"]),
            }
        except (TypeError, ValueError):
            logger.warning("rank %d sent malformed stats", rank)


async def _report_stats(mesh: Mesh) -> None:
    from tpnet.metrics import rank_stats

    while True:
        await asyncio.sleep(STATS_INTERVAL_S)
        if 0 in mesh.links:
            try:
                mesh.send_json(0, wire.Kind.CONTROL, rank_stats(mesh.rank))
            except PeerLost:
                pass


async def _rank0_inbox(mesh: Mesh, metrics: Any, collective: Collective) -> None:
    while True:
        rank, msg = await mesh.inbox.get()
        if msg.kind == wire.Kind.CONTROL:
            _on_control(mesh, rank, msg.meta, metrics, collective)
        else:
            logger.warning("ignoring message kind %d from rank %d", msg.kind, rank)


def _say_goodbye(mesh: Mesh, reason: str) -> None:
    for rank in list(mesh.links):
        try:
            mesh.send_json(
                rank, wire.Kind.CONTROL, {"type": "shutdown", "reason": reason}
            )
        except PeerLost:
            pass


async def _worker_loop(mesh: Mesh, runner: StepRunner, vocab: int) -> None:
    """Read the inbox and run the steps rank 0 sends, one at a time. A STEP of
    a new epoch arriving while a step runs voids that step (rank 0 gave up on
    it), so no rank waits for parts that will never come."""
    steps: asyncio.Queue[wire.Message] = asyncio.Queue()
    runner_task = asyncio.create_task(_run_steps(mesh, runner, vocab, steps))
    try:
        while True:
            rank, msg = await mesh.inbox.get()
            if msg.kind == wire.Kind.CONTROL:
                _on_control(mesh, rank, msg.meta, collective=runner.collective)
            elif msg.kind == wire.Kind.STEP and rank == 0:
                if msg.meta.get("epoch") != runner.epoch:
                    runner.collective.abort("rank 0 started a new epoch")
                steps.put_nowait(msg)
            else:
                logger.warning("ignoring message kind %d from rank %d", msg.kind, rank)
    finally:
        runner_task.cancel()


async def _run_steps(
    mesh: Mesh, runner: StepRunner, vocab: int, steps: asyncio.Queue[wire.Message]
) -> None:
    while True:
        msg = await steps.get()
        tokens = (
            np.frombuffer(msg.payload, dtype=np.int32)
            if msg.payload is not None
            else np.zeros(0, np.int32)
        )
        try:
            validate_step(msg.meta, tokens, vocab)
            if mesh.missing:
                # Rank 0 saw every rank join it, but this rank's links to the
                # other workers may still be forming: wait for them briefly.
                await mesh.wait_complete(mesh.peer_timeout_s)
            await runner.run(msg.meta, tokens)
        except BadStep as exc:
            logger.error("bad step from rank 0: %s; closing the link", exc)
            link = mesh.links.get(0)
            if link is not None:
                link.close(f"bad step: {exc}")
        except StepAborted as exc:
            logger.warning("step aborted: %s", exc)
        except (PeerLost, TimeoutError) as exc:
            # TimeoutError: links to other workers did not form in time.
            logger.warning("step failed: %s", exc)
            if getattr(exc, "rank", None) != 0 and 0 in mesh.links:
                try:
                    mesh.send_json(
                        0,
                        wire.Kind.CONTROL,
                        {"type": "step_failed", "reason": str(exc)},
                    )
                except PeerLost:
                    pass


async def run_node(cfg: NodeConfig, stop: asyncio.Event | None = None) -> int:
    check_config(cfg)
    started = time.monotonic()
    try:
        spec = load_model(cfg.model, with_tokenizer=cfg.rank == 0)
    except ModelError as exc:
        logger.error("cannot load the model: %s", exc)
        await Mesh.send_fault_notice(
            cfg.addresses, cfg.rank, cfg.secret, f"cannot load the model: {exc}"
        )
        return 2
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass

    mesh = Mesh(
        cfg.rank,
        cfg.addresses,
        cfg.secret,
        spec.fingerprint,
        cfg.listen_host,
        cfg.heartbeat_s,
        cfg.peer_timeout_s,
    )
    collective = Collective(mesh, spin_seconds(cfg))
    try:
        model = build_model(spec, cfg, collective.all_sum)
    except ModelError as exc:
        logger.error("cannot shard the model: %s", exc)
        return 2
    SliceLoader.release()
    logger.info("rank %d computes with %s", cfg.rank, compute_path(cfg))
    from tpnet import blas

    if sys.platform == "linux" and blas.loaded is None:
        logger.info(
            "no system OpenBLAS found: prompts and batches run far slower on the "
            "CPU (Debian/Ubuntu: apt-get install libopenblas0-pthread)"
        )
    resident = sum(a.nbytes for a in model.resident_arrays())
    logger.info(
        "rank %d loaded %s (%s) in %.1f s: %.1f MB of weights resident",
        cfg.rank,
        spec.name,
        spec.source_format,
        time.monotonic() - started,
        resident / 1e6,
    )
    vocab_columns = []
    for r in range(cfg.world_size):
        v0, v1 = plan_shard(spec.config, r, cfg.world_size, cfg.rank_weights).vocab
        vocab_columns.append(v1 - v0)
    runner = StepRunner(model, collective, vocab_columns)
    if cfg.world_size > 1:
        try:
            await mesh.start()
        except OSError as exc:
            logger.error("cannot listen on %s: %s", cfg.addresses[cfg.rank], exc)
            return 2

    http_runner = None
    engine = None
    tasks: list[asyncio.Task[None]] = []
    try:
        if cfg.rank == 0:
            from aiohttp import web

            from tpnet.api.app import create_app
            from tpnet.metrics import Metrics

            metrics = Metrics(mesh if cfg.world_size > 1 else None, collective)
            drafter = None
            if cfg.draft_model:
                from tpnet.engine.speculative import DraftModel

                try:
                    drafter = DraftModel(cfg.draft_model)
                except ModelError as exc:
                    logger.error("cannot load the draft model: %s", exc)
                    return 2
                if drafter.vocab_size != spec.config.vocab_size:
                    logger.error(
                        "the draft model's vocabulary (%d) differs from the model's (%d)",
                        drafter.vocab_size,
                        spec.config.vocab_size,
                    )
                    return 2
            engine = Engine(
                runner,
                mesh if cfg.world_size > 1 else None,
                cfg.limits,
                metrics,
                drafter,
            )
            metrics.engine = engine
            engine.start()
            if cfg.world_size > 1:
                tasks.append(
                    asyncio.create_task(_rank0_inbox(mesh, metrics, collective))
                )
            app = create_app(
                engine,
                spec.tokenizer,
                cfg.model_id or spec.name,
                api_key=cfg.api_key,
                metrics=metrics,
            )

            async def serve_metrics(request: web.Request) -> web.Response:
                return web.Response(
                    body=metrics.render(),
                    headers={"Content-Type": "text/plain; version=0.0.4"},
                )

            app.router.add_get("/metrics", serve_metrics)
            http_runner = web.AppRunner(app, handle_signals=False, access_log=None)
            await http_runner.setup()
            site = web.TCPSite(http_runner, cfg.http_host, cfg.http_port)
            try:
                await site.start()
            except OSError as exc:
                logger.error(
                    "cannot serve HTTP on %s:%d: %s", cfg.http_host, cfg.http_port, exc
                )
                return 2
            logger.info(
                "serving the OpenAI API on http://%s:%d/v1",
                cfg.http_host,
                cfg.http_port,
            )
        else:
            tasks.append(
                asyncio.create_task(_worker_loop(mesh, runner, spec.config.vocab_size))
            )
            tasks.append(asyncio.create_task(_report_stats(mesh)))
        await stop.wait()
        logger.info("rank %d shutting down", cfg.rank)
    finally:
        # 1. stop accepting requests; 2. fail in-flight ones; 3. close peers.
        if http_runner is not None:
            await http_runner.shutdown()
        if engine is not None:
            await engine.close("server shutting down")
        if http_runner is not None:
            await http_runner.cleanup()
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        if cfg.world_size > 1:
            _say_goodbye(mesh, "stopped by signal")
            await mesh.close()
    return 0


def compute_path(cfg: NodeConfig) -> str:
    """What runs the matmuls, for logs and benchmarks: the activation dtype,
    whether quantized weights were expanded, and which BLAS is loaded."""
    from tpnet import blas

    if sys.platform == "darwin":
        library = "Metal/Accelerate"
    elif blas.loaded:
        library = f"OpenBLAS ({blas.loaded})"
    else:
        library = "MLX's bundled reference BLAS"
    weights = "dequantized weights" if cfg.dequantize else "weights as stored"
    return f"{cfg.dtype} activations, {weights}, {library}"


def dequantize_by_default() -> bool:
    """Expand quantized weights on a CPU with OpenBLAS: its float matmuls
    beat MLX's quantized CPU kernels, by far for steps of many tokens. On a
    Mac the GPU's quantized kernels are the fast path."""
    from tpnet import blas

    return sys.platform == "linux" and blas.loaded is not None


# Polling a collective's links this long before sleeping saves the kernel's
# wake-up of a sleeping rank (hundreds of microseconds on a virtual machine);
# a decode step's exchanges are spaced about a millisecond apart.
DEFAULT_SPIN_US = 300.0


def spin_seconds(cfg: NodeConfig) -> float:
    """Spin only when every rank on this machine has a core of its own:
    spinning ranks that share a core would steal it from each other."""
    if cfg.spin_us is not None:
        return cfg.spin_us / 1e6
    from tpnet.cluster import is_local, local_addresses

    mine = local_addresses()
    local_ranks = sum(1 for a in cfg.addresses if is_local(a.host, mine))
    return DEFAULT_SPIN_US / 1e6 if local_ranks <= (os.cpu_count() or 1) else 0.0


def read_secret(path: str | None) -> bytes:
    """The cluster secret: $TPNET_SECRET, or a key file only its owner may read."""
    env = os.environ.get("TPNET_SECRET")
    if env:
        return env.encode()
    if not path:
        raise ConfigError(
            "no cluster secret: set TPNET_SECRET or pass --secret-file "
            "(`tpnet serve` creates one)"
        )
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"cannot read the secret file {path}: {exc}") from None
    if st.st_mode & 0o077:
        raise ConfigError(
            f"secret file {path} is readable by others (mode {st.st_mode & 0o777:o}); "
            "run chmod 600 on it"
        )
    with open(path, "rb") as f:
        return f.read().strip()


def create_secret(path: str) -> None:
    """Write a fresh random secret, readable only by its owner, if missing."""
    if os.path.exists(path):
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(os.urandom(32).hex())


def setup_logging(
    rank: int | None, level: str = "INFO", log_file: str | None = None
) -> None:
    prefix = f"rank {rank} " if rank is not None else ""
    fmt = f"%(asctime)s {prefix}%(name)s %(levelname)s %(message)s"
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        from logging.handlers import RotatingFileHandler

        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        handlers.append(
            RotatingFileHandler(log_file, maxBytes=10_000_000, backupCount=3)
        )
    logging.basicConfig(level=level, format=fmt, handlers=handlers, force=True)
