"""Single-request speed of tpnet against mlx-lm, on one model, in one run.

    python benchmarks/speed.py [--model PATH] [--repeats 3] [--max-tokens 64]
        [--tpnet-args "--dequantize"] [--openblas [LIB] | --bundled-blas]
        [--rows KEY,...] [--quick] [--json PATH] [--png PATH] [--cache-dir DIR]

Rows (--rows takes their keys; default: all):

  stock        mlx-lm's generate_step on the unsharded model, dtypes as stored,
               MLX's bundled BLAS: mlx-lm as a user runs it
  same         the same in the compute settings tpnet's ranks report and map:
               their activation dtype, dequantized weights if they dequantize,
               and their OpenBLAS (LD_PRELOAD, OPENBLAS_NUM_THREADS=1) if they
               have one. --tpnet-args, --openblas and --bundled-blas set tpnet's
               settings; this row and the ring row follow them.
  ws1 ws2 ws3  `python -m tpnet serve --world-size W`, speculative decoding off
  ws2-repeat   ws2 on the repeating task, speculative decoding off
  spec-repeat  ws2 with speculative decoding, repeating task (output repeats
               the prompt, so prompt lookup drafts well)
  spec-chat    ws2 with speculative decoding, free chat
  tp-stock, tp-same, ring, tp-ws2
               the same comparison on a random-weight Llama whose heads divide
               by 2 (SmolLM2's 9 heads over 3 KV heads do not, and mlx-lm's
               `model.shard()` needs that): mlx-lm stock and same settings,
               mlx-lm's own tensor parallelism over MLX's ring backend with 2
               processes on loopback (same settings), and tpnet ws2
  memory       peak RSS of one mlx-lm process against each tpnet rank at ws2,
               on a random-weight float32 Llama of about 1 GB (built once,
               cached under --cache-dir)

Every row answers the same chat prompt (the repeating rows a paragraph to
copy with one word changed) greedily, one request at a time, up to
--max-tokens tokens. Decode tok/s is (tokens - 1) / (last token - first
token); prompt tok/s is prompt tokens / time to first token (TTFT), with
tpnet's prefix reuse off (each row asks the same prompt again). tpnet is
driven over HTTP with streaming, so its times include the API; mlx-lm runs in
a child process of this script that times its own tokens.

All processes of every row start first and stay up, idle, while the others
measure. Each repetition then measures every row once, the order rotated per
repetition, so a change in the load of a shared machine touches all rows
alike. Columns are medians over repetitions; the ratio columns are medians of
per-repetition ratios against the baseline row of the same model measured in
that repetition. Peak RSS is VmHWM of each process at the end. All-reduce
rounds per generated token come from rank 0's /metrics (the count of
tpnet_allreduce_latency_seconds over tpnet_completion_tokens_total, prefill
included); for the ring row the children count their own
mx.distributed.all_sum calls.

MLX ring processes get the environment `mlx.launch --backend ring` gives its
children (MLX_RANK and MLX_HOSTFILE, a JSON list of ["127.0.0.1:PORT"] per
rank); the launcher itself is not used, because its I/O threads spin a core
for the whole job (see benchmarks/latency.py), which on 2 cores would starve
the ranks. Everything runs on 127.0.0.1 and every wait is bounded.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import psutil
from _common import (
    LOOPBACK,
    LineReader,
    format_table,
    free_port_range,
    median,
    stop_process,
    write_json,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPENBLAS_LIBRARY = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"

CHAT_PROMPT = (
    "Write a short story about a lighthouse keeper who finds a message in a "
    "bottle. Use at least three paragraphs."
)
# Long enough (about 150 tokens) that copying it outlasts --max-tokens 64.
PARAGRAPH = (
    "The river runs slowly through the old town, past the mill and the stone "
    "bridge, where children throw bread to the ducks every morning. In spring "
    "the river rises and covers the meadow, and the farmers move their cows to "
    "the hill. In summer the river is low and clear, and you can see the fish "
    "resting in the shade of the willows. In autumn the leaves fall on the "
    "river and drift towards the sea, and in winter the river sometimes "
    "freezes at the edges, so that the ducks stand on the ice and wait for the "
    "children to come back with more bread."
)
REPEAT_PROMPT = (
    "Repeat the following paragraph word for word, but write 'canal' "
    "instead of 'river':\n\n" + PARAGRAPH
)
PROMPTS = {"chat": CHAT_PROMPT, "repeat": REPEAT_PROMPT}

# A model like SmolLM2-135M (hidden 576, 30 layers, MLP 1536, 4-bit groups
# of 32) but with 8 query heads over 4 KV heads, which 2 ranks split evenly.
TP_MODEL = {
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "intermediate_size": 1536,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "vocab_size": 49152,
    "rope_theta": 100000.0,
    "max_position_embeddings": 8192,
}
TP_QUICK_MODEL = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 8192,
}
TP_BITS = 4
# Float32, about 1 GB: the 75M-parameter embedding (vocabulary 49,152, the
# tokenizer's) plus 7 layers of 25M parameters, so weights dominate RSS.
MEMORY_MODEL = {
    "hidden_size": 1536,
    "num_hidden_layers": 7,
    "intermediate_size": 4096,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "max_position_embeddings": 8192,
}
MEMORY_QUICK_MODEL = {
    "hidden_size": 256,
    "num_hidden_layers": 2,
    "intermediate_size": 512,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 8192,
}
MEMORY_TOKENS = 8

# Many processes load models at once on 2 cores: give them minutes. One
# request of 64 tokens takes seconds; 300 s means a row has hung.
STARTUP_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 300.0
BUILD_TIMEOUT_S = 900.0
HEALTH_POLL_S = 0.25
# Children end themselves after this long even if this script vanished
# without closing their stdin (they also end at end of file).
CHILD_LIFETIME_S = 6 * 3600
# Between two measurements, so a process finishing its last step does not
# share the CPU with the next row's first.
SETTLE_S = 0.2
# The all-reduce histogram of /metrics counts every exchange; scraping it
# during a request as well as around it costs rank 0 about a millisecond.
METRICS_POLL_S = 0.5
# Idle clusters wait while others saturate both cores; a lost heartbeat there
# must not dissolve a cluster mid-run. The heartbeat itself stays default.
PEER_TIMEOUT_S = 30.0
WARMUP_TOKENS = 8


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    model: str  # "main" (--model) or "tp" (the random Llama with even heads)
    backend: str  # "stock", "same", "ring" or "tpnet"
    world: int
    prompt: str
    speculative: bool = False

    @property
    def server(self) -> str:
        return f"{self.model}-{self.backend}-{self.world}"


ROWS = [
    Row("stock", "mlx-lm stock", "main", "stock", 1, "chat"),
    Row("same", "mlx-lm same settings", "main", "same", 1, "chat"),
    Row("ws1", "tpnet ws1", "main", "tpnet", 1, "chat"),
    Row("ws2", "tpnet ws2", "main", "tpnet", 2, "chat"),
    Row("ws3", "tpnet ws3", "main", "tpnet", 3, "chat"),
    Row("ws2-repeat", "tpnet ws2 (repeating task)", "main", "tpnet", 2, "repeat"),
    Row(
        "spec-repeat",
        "tpnet ws2 + speculative (repeating task)",
        "main",
        "tpnet",
        2,
        "repeat",
        True,
    ),
    Row(
        "spec-chat",
        "tpnet ws2 + speculative (free chat)",
        "main",
        "tpnet",
        2,
        "chat",
        True,
    ),
    Row("tp-stock", "mlx-lm stock", "tp", "stock", 1, "chat"),
    Row("tp-same", "mlx-lm same settings", "tp", "same", 1, "chat"),
    Row("ring", "MLX tensor parallel (ring) ws2", "tp", "ring", 2, "chat"),
    Row("tp-ws2", "tpnet ws2", "tp", "tpnet", 2, "chat"),
]
ROW_KEYS = [r.key for r in ROWS] + ["memory"]


class BenchError(RuntimeError):
    """A row could not be measured; the message says which and why."""


# -- children: mlx-lm in one process, or one rank of MLX's ring -------------------


def _reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _blas_in_use() -> str:
    """The library this process's MLX calls for float matmuls: whoever
    exports cblas_sgemm globally (a preloaded BLAS interposes on the one
    libmlx links), else the reference BLAS bundled with the mlx-cpu wheel.
    A mere "openblas" in the memory map would be wrong: numpy maps its own
    libscipy_openblas64_, whose symbols are suffixed and which MLX never calls."""
    import ctypes

    if sys.platform == "darwin":
        return "Accelerate/Metal"
    try:
        address = ctypes.cast(ctypes.CDLL(None).cblas_sgemm, ctypes.c_void_p).value
    except AttributeError:
        return "MLX's bundled BLAS"
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            low, high = (int(x, 16) for x in parts[0].split("-"))
            if address is not None and low <= address < high and len(parts) > 5:
                name = os.path.basename(parts[-1])
                return "OpenBLAS" if "openblas" in parts[-1] else name
    return "unknown BLAS"


def _rank_blas(pid: int) -> str | None:
    """The OpenBLAS mapped into another process, if any (numpy's own
    libscipy_openblas, which MLX never calls, does not count)."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                path = line.split()[-1]
                if "openblas" in path and "scipy_openblas" not in path:
                    return path
    except OSError:
        pass
    return None


def _load_for_mlx_lm(args: argparse.Namespace) -> Any:
    """mlx-lm's model class with the weights of args.model: as stored, or in
    tpnet's compute settings."""
    import mlx.core as mx

    if os.path.isdir(args.model):
        from pathlib import Path

        from mlx_lm.utils import load_model

        model, _ = load_model(Path(args.model), lazy=True)
    else:
        from tpnet.model.loader import load_model as load_spec
        from tpnet.model.mlxlm import mlx_lm_model

        spec = load_spec(args.model)
        model = mlx_lm_model(spec)
        if args.settings == "stock":
            # mlx_lm_model widens float16 to float32; stock keeps the file's.
            model.load_weights(list(spec.tensors.items()))
    if args.settings == "same":
        if args.dequantize:
            from mlx_lm.utils import dequantize_model

            model = dequantize_model(model)
        dtypes = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
        model.set_dtype(dtypes[args.dtype])
    return model


def _activation_dtype(model: Any) -> str:
    import mlx.core as mx

    try:
        return str(model.model.embed_tokens(mx.array([[0]])).dtype).split(".")[-1]
    except AttributeError:
        return "?"


def _mlx_child(args: argparse.Namespace) -> None:
    """Serve generate commands from stdin with mlx-lm's generate_step; with
    --ring-world, as one rank of mlx-lm's tensor parallelism over MLX's ring."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    signal.alarm(CHILD_LIFETIME_S)
    calls = [0]
    try:
        model = _load_for_mlx_lm(args)
        if args.ring_world:
            group = mx.distributed.init(backend="ring", strict=True)
            if group.size() != args.ring_world:
                raise RuntimeError(
                    f"ring group has {group.size()} ranks, want {args.ring_world}"
                )
            if not hasattr(model, "shard"):
                raise RuntimeError(f"mlx-lm's {type(model).__module__} has no shard()")
            model.shard(group)
            all_sum = mx.distributed.all_sum

            def counted(*a: Any, **k: Any) -> Any:
                calls[0] += 1
                return all_sum(*a, **k)

            # Sharded layers look all_sum up at call time, so this counts them.
            mx.distributed.all_sum = counted
        mx.eval(model.parameters())
    except (RuntimeError, ValueError, OSError, KeyError, AttributeError) as exc:
        _reply({"error": f"{type(exc).__name__}: {exc}"})
        return
    activations = f"{_activation_dtype(model)} activations" + (
        " (as stored)" if args.settings == "stock" else ""
    )
    weights = (
        "dequantized weights"
        if args.settings == "same" and args.dequantize
        else "weights as stored"
    )
    _reply({"ready": True, "compute": f"{activations}, {weights}, {_blas_in_use()}"})

    reader = LineReader(sys.stdin.fileno())
    while True:
        line = reader.readline(CHILD_LIFETIME_S)
        if line is None:
            return
        command = json.loads(line)
        if command["op"] == "quit":
            return
        eos = set(command["eos"])
        prompt = mx.array(command["prompt"])
        calls[0] = 0
        first = last = None
        tokens = 0
        started = time.perf_counter()
        for token, _ in generate_step(prompt, model, max_tokens=command["max_tokens"]):
            if token in eos:
                break
            last = time.perf_counter()
            first = first or last
            tokens += 1
        _reply(
            {
                "ttft_s": (first or time.perf_counter()) - started,
                "decode_s": (last - first) if first and last else 0.0,
                "tokens": tokens,
                "prompt_tokens": len(command["prompt"]),
                "rounds": calls[0] if args.ring_world else None,
            }
        )


def _build_child(args: argparse.Namespace) -> None:
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from tinymodel import build_tiny_model

    config = json.loads(args.config)
    build_tiny_model(args.model, quantize_bits=config.pop("bits", None), **config)


# -- driver: processes of each row ------------------------------------------------


@dataclass
class Sample:
    ttft_s: float
    decode_s: float
    tokens: int
    prompt_tokens: int
    rounds: int | None = None
    counted_tokens: int | None = None
    drafted: int | None = None
    accepted: int | None = None

    @property
    def decode_tps(self) -> float:
        if self.tokens < 2 or self.decode_s <= 0:
            return float("nan")
        return (self.tokens - 1) / self.decode_s

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.ttft_s if self.ttft_s > 0 else float("nan")


def _peak_rss_mb(pid: int, field: str = "VmHWM") -> float:
    """VmHWM (peak resident set) or VmRSS (now) of a live process, in MB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    try:
        return psutil.Process(pid).memory_info().rss / 1e6  # current, not peak
    except psutil.Error:
        return float("nan")


def _tail(path: str, size: int = 3000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-size:]
    except OSError:
        return ""


class MlxServer:
    """mlx-lm in one child process, or one child per rank of MLX's ring."""

    def __init__(
        self, key: str, model: str, settings: str, world: int, opts: Options
    ) -> None:
        self.key = key
        self.model = model
        self.settings = settings
        self.world = world
        self.opts = opts
        self.procs: list[subprocess.Popen[bytes]] = []
        self.readers: list[LineReader] = []
        self.logs: list[str] = []
        self.compute = "?"

    def start(self) -> None:
        ring = self.settings == "ring"
        settings = Settings() if self.settings == "stock" else self.opts.same
        assert settings is not None
        env = settings.child_env()
        hostfile = os.path.join(self.opts.workdir, f"{self.key}-hosts.json")
        if ring:
            base = free_port_range(self.world)
            with open(hostfile, "w") as f:
                json.dump([[f"{LOOPBACK}:{base + r}"] for r in range(self.world)], f)
        for rank in range(self.world):
            command = [
                sys.executable,
                os.path.abspath(__file__),
                "--child",
                "mlx",
                "--model",
                self.model,
                "--settings",
                "stock" if self.settings == "stock" else "same",
                "--dtype",
                settings.dtype,
            ]
            if settings.dequantize:
                command.append("--dequantize")
            rank_env = dict(env)
            if ring:
                command += ["--ring-world", str(self.world)]
                rank_env.update(MLX_RANK=str(rank), MLX_HOSTFILE=hostfile)
            log = os.path.join(self.opts.workdir, f"{self.key}-rank{rank}.log")
            with open(log, "wb") as stderr:
                proc = subprocess.Popen(
                    command,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=stderr,
                    env=rank_env,
                )
            assert proc.stdout is not None
            self.procs.append(proc)
            self.readers.append(LineReader(proc.stdout.fileno()))
            self.logs.append(log)

    def _read(self, rank: int, timeout_s: float) -> dict[str, Any]:
        try:
            line = self.readers[rank].readline(timeout_s)
        except TimeoutError:
            line = b'{"error": "no answer within %d s"}' % int(timeout_s)
        if line is None:
            line = b'{"error": "exited with status %r"}' % (self.procs[rank].poll(),)
        reply = json.loads(line)
        if "error" in reply:
            raise BenchError(
                f"{self.key} rank {rank}: {reply['error']}\n{_tail(self.logs[rank])}"
            )
        return reply

    def wait_ready(self) -> None:
        replies = [self._read(r, STARTUP_TIMEOUT_S) for r in range(self.world)]
        self.compute = replies[0]["compute"]

    def generate(
        self, row: Row, prompt: list[int], eos: list[int], max_tokens: int
    ) -> Sample:
        command = {
            "op": "generate",
            "prompt": prompt,
            "eos": eos,
            "max_tokens": max_tokens,
        }
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write((json.dumps(command) + "\n").encode())
            proc.stdin.flush()
        replies = [self._read(r, REQUEST_TIMEOUT_S) for r in range(self.world)]
        first = replies[0]
        return Sample(
            first["ttft_s"],
            first["decode_s"],
            first["tokens"],
            first["prompt_tokens"],
            first["rounds"],
            first["tokens"] if first["rounds"] is not None else None,
        )

    def peak_rss(self, field: str = "VmHWM") -> list[float]:
        return [_peak_rss_mb(p.pid, field) for p in self.procs]

    def stop(self) -> None:
        for proc in self.procs:
            try:
                if proc.stdin is not None:
                    proc.stdin.close()
            except OSError:
                pass
        for proc in self.procs:
            stop_process(proc, grace_s=10.0)


class TpnetServer:
    """`python -m tpnet serve` on loopback ports of its own, driven over HTTP."""

    def __init__(self, key: str, model: str, world: int, opts: Options) -> None:
        self.key = key
        self.model = model
        self.world = world
        self.opts = opts
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = os.path.join(opts.workdir, f"{key}.log")
        self.port = 0
        self.compute = "?"
        self.settings: Settings | None = None

    def start(self) -> None:
        base = free_port_range(self.world + 1)
        self.port = base + self.world
        home = os.path.join(self.opts.workdir, f"{self.key}-home")
        command = [
            sys.executable,
            "-m",
            "tpnet",
            "serve",
            "--world-size",
            str(self.world),
            "--port",
            str(self.port),
            "--base-port",
            str(base),
            "--model",
            self.model,
            "--no-restart",
            "--peer-timeout",
            str(PEER_TIMEOUT_S),
            # Every request here is the same prompt: with prefix reuse the
            # prompt figures would time cache hits, not prompt processing.
            "--prefix-cache-rows",
            "0",
            *self.opts.tpnet_args,
        ]
        env = dict(os.environ, TPNET_HOME=home, PYTHONUNBUFFERED="1")
        env.pop("TPNET_SECRET", None)
        env.update(self.opts.tpnet_env)
        with open(self.log, "wb") as log:
            # A session of its own, so ranks left by a killed serve go with it.
            self.proc = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
                start_new_session=True,
            )

    def wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(
                    f"{self.key}: tpnet serve exited with {self.proc.returncode}\n"
                    f"{_tail(self.log)}"
                )
            try:
                with urllib.request.urlopen(
                    f"http://{LOOPBACK}:{self.port}/health", timeout=2.0
                ) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            time.sleep(HEALTH_POLL_S)
        else:
            raise BenchError(
                f"{self.key}: /health not 200 within {STARTUP_TIMEOUT_S:.0f} s\n"
                f"{_tail(self.log)}"
            )
        paths = set()
        with open(self.log, errors="replace") as f:
            for line in f:
                if " computes with " in line:
                    paths.add(line.split(" computes with ", 1)[1].strip())
        logged = " | ".join(sorted(paths)) or "?"
        # The BLAS is read from each rank's memory map rather than trusted
        # from the log: what a process claims and what it mapped can differ.
        blas = {_rank_blas(pid) for pid in self.rank_pids().values()}
        self.settings = Settings.of_tpnet(logged, min(blas, key=str) if blas else None)
        names = " | ".join(
            sorted(f"OpenBLAS ({p})" if p else "MLX's bundled BLAS" for p in blas)
        )
        self.compute = f"{logged.rsplit(', ', 1)[0]}, {names}"
        if ("OpenBLAS" in logged) != any(blas):
            self.compute += f" (but tpnet logs: {logged})"

    def metrics(self) -> dict[str, float]:
        wanted = {
            "tpnet_allreduce_latency_seconds_count": "rounds",
            "tpnet_completion_tokens_total": "tokens",
            "tpnet_speculative_drafted_tokens_total": "drafted",
            "tpnet_speculative_accepted_tokens_total": "accepted",
        }
        url = f"http://{LOOPBACK}:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=10.0) as resp:
            text = resp.read().decode()
        found = {}
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name in wanted:
                found[wanted[name]] = float(value)
        return found

    def generate(
        self, row: Row, prompt: list[int], eos: list[int], max_tokens: int
    ) -> Sample:
        body = {
            "messages": [{"role": "user", "content": PROMPTS[row.prompt]}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "speculative": row.speculative,
        }
        before = self.metrics()
        stop = threading.Event()
        poller = threading.Thread(target=self._drain_metrics, args=(stop,), daemon=True)
        if self.world > 1:
            poller.start()
        try:
            sent, arrivals, usage = self._stream(body)
        finally:
            stop.set()
            if poller.is_alive():
                poller.join(15.0)
        after = self.metrics()
        if not arrivals or usage is None:
            raise BenchError(f"{self.key}: a stream without tokens or usage")

        def delta(name: str) -> int:
            return int(after.get(name, 0) - before.get(name, 0))

        return Sample(
            arrivals[0] - sent,
            arrivals[-1] - arrivals[0],
            int(usage["completion_tokens"]),
            int(usage["prompt_tokens"]),
            delta("rounds"),
            delta("tokens"),
            delta("drafted"),
            delta("accepted"),
        )

    def _drain_metrics(self, stop: threading.Event) -> None:
        while not stop.wait(METRICS_POLL_S):
            try:
                self.metrics()
            except OSError:
                return

    def _stream(self, body: dict[str, Any]) -> tuple[float, list[float], Any]:
        """One streaming chat request: when it was sent, when each content
        chunk arrived, and the usage of the last chunk."""
        conn = http.client.HTTPConnection(
            LOOPBACK, self.port, timeout=REQUEST_TIMEOUT_S
        )
        arrivals: list[float] = []
        usage = None
        try:
            sent = time.perf_counter()
            conn.request(
                "POST",
                "/v1/chat/completions",
                body=json.dumps(body),
                headers={"Content-Type": "application/json"},
            )
            resp = conn.getresponse()
            if resp.status != 200:
                raise BenchError(
                    f"{self.key}: HTTP {resp.status}: {resp.read()[:300]!r}"
                )
            while time.perf_counter() - sent < REQUEST_TIMEOUT_S:
                raw = resp.readline(1 << 20)
                if not raw:
                    break  # end of the body
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    return sent, arrivals, usage
                event = json.loads(data)
                if "error" in event:
                    raise BenchError(f"{self.key}: stream error {event['error']}")
                usage = event.get("usage") or usage
                if any(c.get("delta", {}).get("content") for c in event["choices"]):
                    arrivals.append(time.perf_counter())
        finally:
            conn.close()
        raise BenchError(f"{self.key}: the stream ended without [DONE]")

    def rank_pids(self) -> dict[int, int]:
        assert self.proc is not None
        pids = {}
        for child in psutil.Process(self.proc.pid).children():
            cmd = child.cmdline()
            if "--rank" in cmd:
                pids[int(cmd[cmd.index("--rank") + 1])] = child.pid
        return pids

    def peak_rss(self, field: str = "VmHWM") -> list[float]:
        pids = self.rank_pids()
        return [_peak_rss_mb(pids[r], field) for r in sorted(pids)]

    def stop(self) -> None:
        if self.proc is None:
            return
        stop_process(self.proc, grace_s=20.0)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


Server = MlxServer | TpnetServer


@dataclass(frozen=True)
class Settings:
    """How the matmuls run: what tpnet's ranks use, which the same-settings
    and ring rows then copy."""

    dtype: str = "float32"
    dequantize: bool = False
    blas: str | None = None  # path of the OpenBLAS preloaded, None: MLX's own

    @classmethod
    def of_tpnet(cls, logged: str, blas: str | None) -> Settings:
        """From a rank's "computes with ..." line and its memory map."""
        return cls(logged.split()[0], "dequantized weights" in logged, blas)

    def child_env(self) -> dict[str, str]:
        """The environment of an mlx-lm child in these settings. TPNET_BLAS
        keeps tpnet's own OpenBLAS loader (tpnet/blas.py, run on import) out
        of the child; LD_PRELOAD decides alone."""
        env = dict(os.environ, TPNET_BLAS="bundled")
        env.pop("LD_PRELOAD", None)
        if self.blas:
            env.update(LD_PRELOAD=self.blas, OPENBLAS_NUM_THREADS="1")
        return env


@dataclass
class Options:
    workdir: str
    tpnet_args: list[str]
    tpnet_env: dict[str, str] = field(default_factory=dict)
    openblas: str | None = None
    # Filled in from the first tpnet server that is up (or a guess when no
    # tpnet row runs), before any same-settings process starts.
    same: Settings | None = None


def make_server(row: Row, model: str, opts: Options) -> Server:
    if row.backend == "tpnet":
        return TpnetServer(row.server, model, row.world, opts)
    return MlxServer(row.server, model, row.backend, row.world, opts)


# -- models ----------------------------------------------------------------------


def cached_model(cache_dir: str, name: str, config: dict[str, Any]) -> str:
    """A random-weight model folder built once (in a child, so its memory
    goes back) and renamed into place whole."""
    path = os.path.join(cache_dir, name)
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    os.makedirs(cache_dir, exist_ok=True)
    partial = f"{path}.partial-{os.getpid()}"
    print(f"speed: building {name} in {cache_dir} …", file=sys.stderr, flush=True)
    subprocess.run(
        [
            sys.executable,
            os.path.abspath(__file__),
            "--child",
            "build",
            "--model",
            partial,
            "--config",
            json.dumps(config),
        ],
        check=True,
        timeout=BUILD_TIMEOUT_S,
    )
    os.rename(partial, path)
    return path


def _folder_name(prefix: str, config: dict[str, Any]) -> str:
    c = config
    bits = f"q{c['bits']}" if c.get("bits") else "f32"
    return (
        f"{prefix}-h{c['hidden_size']}-l{c['num_hidden_layers']}"
        f"-i{c['intermediate_size']}-a{c['num_attention_heads']}"
        f"-kv{c['num_key_value_heads']}-{bits}"
    )


def _weights_mb(path: str) -> float:
    if os.path.isdir(path):
        return (
            sum(
                os.path.getsize(os.path.join(path, f))
                for f in os.listdir(path)
                if f.endswith(".safetensors")
            )
            / 1e6
        )
    return os.path.getsize(path) / 1e6


# -- the run ---------------------------------------------------------------------


def measure(
    rows: list[Row],
    models: dict[str, str],
    args: argparse.Namespace,
    opts: Options,
) -> dict[str, Any]:
    from tpnet.model.loader import load_model

    prompts: dict[tuple[str, str], list[int]] = {}
    eos: dict[str, list[int]] = {}
    for name in {r.model for r in rows}:
        tokenizer = load_model(models[name]).tokenizer
        eos[name] = sorted(tokenizer.eos_token_ids)
        for kind, text in PROMPTS.items():
            messages = [{"role": "user", "content": text}]
            prompts[name, kind] = tokenizer.apply_chat_template(messages)

    servers: dict[str, Server] = {}
    for row in rows:
        if row.server not in servers:
            servers[row.server] = make_server(row, models[row.model], opts)
    samples: dict[str, list[Sample]] = {r.key: [] for r in rows}
    failed: dict[str, str] = {}  # server key -> why its rows are left out

    def attempt(server: Server, action: Any) -> bool:
        try:
            action()
            return True
        except (BenchError, OSError, http.client.HTTPException, ValueError) as exc:
            # OSError: a child's pipe or a server's socket closed under us.
            if not isinstance(exc, BenchError):
                exc = BenchError(f"{server.key}: {type(exc).__name__}: {exc}")
            failed[server.key] = str(exc)
            print(f"speed: {exc}", file=sys.stderr, flush=True)
            server.stop()
            return False

    def run(row: Row, max_tokens: int) -> Sample | None:
        server = servers[row.server]
        if server.key in failed:
            return None
        prompt = prompts[row.model, row.prompt]
        got: list[Sample] = []
        attempt(
            server,
            lambda: got.append(
                server.generate(row, prompt, eos[row.model], max_tokens)
            ),
        )
        return got[0] if got else None

    try:
        # 1. Start tpnet and the stock rows, and once tpnet is up, the rows
        #    that copy its settings; a row whose processes fail is left out
        #    and the failure reported.
        first = [s for s in servers.values() if not _copies_tpnet(s)]
        for server in first:
            server.start()
        for server in first:
            if attempt(server, server.wait_ready):
                print(f"speed: {server.key} ready", file=sys.stderr, flush=True)
        opts.same = _settings_to_copy(servers, failed, opts)
        later = [s for s in servers.values() if _copies_tpnet(s)]
        for server in later:
            server.start()
        for server in later:
            if attempt(server, server.wait_ready):
                print(f"speed: {server.key} ready", file=sys.stderr, flush=True)

        # 2. One untimed request per row (first allocations, caches).
        for row in rows:
            run(row, WARMUP_TOKENS)

        # 3. Every row once per repetition, in a rotating order.
        for rep in range(args.repeats):
            shift = rep % len(rows)
            for row in rows[shift:] + rows[:shift]:
                time.sleep(SETTLE_S)
                sample = run(row, args.max_tokens)
                if sample is not None:
                    samples[row.key].append(sample)
            print(
                f"speed: repetition {rep + 1}/{args.repeats} done",
                file=sys.stderr,
                flush=True,
            )
        rss = {k: s.peak_rss() for k, s in servers.items() if k not in failed}
    finally:
        for server in servers.values():
            server.stop()
    return {
        # A server that failed mid-run leaves rows with fewer repetitions.
        "samples": {r.key: samples[r.key] for r in rows if r.server not in failed},
        "compute": {key: s.compute for key, s in servers.items()},
        "rss": rss,
        "failed": failed,
    }


def _copies_tpnet(server: Server) -> bool:
    return isinstance(server, MlxServer) and server.settings != "stock"


def _settings_to_copy(
    servers: dict[str, Server], failed: dict[str, str], opts: Options
) -> Settings:
    """The first tpnet server's settings; without one, the options' own
    --dtype / --dequantize / --openblas, as written."""
    seen = {
        s.key: s.settings
        for s in servers.values()
        if isinstance(s, TpnetServer) and s.key not in failed and s.settings
    }
    if seen:
        if len(set(seen.values())) > 1:
            print(f"speed: tpnet servers differ in settings: {seen}", file=sys.stderr)
        return next(iter(seen.values()))
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--dequantize", action=argparse.BooleanOptionalAction)
    known, _ = p.parse_known_args(opts.tpnet_args)
    print(
        "speed: no tpnet server is up to copy settings from; same-settings rows "
        "use --tpnet-args and --openblas as written",
        file=sys.stderr,
    )
    return Settings(known.dtype, bool(known.dequantize), opts.openblas)


def measure_memory(path: str, opts: Options) -> dict[str, Any]:
    """Peak RSS of one mlx-lm process and of each tpnet rank at ws2, each
    after loading the model and generating MEMORY_TOKENS tokens."""
    from tpnet.model.loader import load_model

    tokenizer = load_model(path).tokenizer
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": CHAT_PROMPT}])
    eos = sorted(tokenizer.eos_token_ids)
    result: dict[str, Any] = {"model": path, "weights_mb": _weights_mb(path)}
    single_row = Row("mem-single", "", "mem", "stock", 1, "chat")
    same_row = Row("mem-same", "", "mem", "same", 1, "chat")
    tpnet_row = Row("mem-ws2", "", "mem", "tpnet", 2, "chat")
    # tpnet first: the same-settings process copies the settings its ranks
    # report.
    for row, name in (
        (tpnet_row, "ranks"),
        (single_row, "single"),
        (same_row, "same"),
    ):
        server = make_server(row, path, opts)
        try:
            server.start()
            server.wait_ready()
            if isinstance(server, TpnetServer):
                opts.same = _settings_to_copy({server.key: server}, {}, opts)
            server.generate(row, prompt, eos, MEMORY_TOKENS)
            peaks, now = server.peak_rss(), server.peak_rss("VmRSS")
            one = name in ("single", "same")
            result[name] = peaks[0] if one else peaks
            result[f"{name}_now"] = now[0] if one else now
            result[f"{name}_compute"] = server.compute
        finally:
            server.stop()
    return result


# -- report ----------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.{digits}f}"


def _short_compute(text: str) -> str:
    """'float32 activations, dequantized weights, OpenBLAS' -> 'f32/deq/OpenBLAS'."""
    parts = [p.strip() for p in text.split(" (but tpnet logs:")[0].split(",")]
    if len(parts) != 3:
        return text
    act = parts[0].split()[0].replace("float", "f").replace("bfloat", "bf")
    if "as stored" in parts[0]:
        act += "(stored)"
    weights = "deq" if parts[1].startswith("dequantized") else "stored"
    blas = "OpenBLAS" if "OpenBLAS" in parts[2] else parts[2].replace("MLX's ", "")
    return f"{act}/{weights}/{blas}"


def _median(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return median(kept) if kept else float("nan")


def summarize(rows: list[Row], result: dict[str, Any]) -> list[dict[str, Any]]:
    samples = result["samples"]
    summary = []
    for row in rows:
        mine = samples.get(row.key)
        if not mine:
            continue
        counted = [s for s in mine if s.rounds is not None and s.counted_tokens]
        entry: dict[str, Any] = {
            "key": row.key,
            "label": row.label,
            "model": row.model,
            "prompt": row.prompt,
            "compute": result["compute"][row.server],
            "decode_tps": _median([s.decode_tps for s in mine]),
            "prompt_tps": _median([s.prompt_tps for s in mine]),
            "ttft_s": _median([s.ttft_s for s in mine]),
            "tokens": _median([float(s.tokens) for s in mine]),
            "prompt_tokens": mine[0].prompt_tokens,
            "peak_rss_mb": result["rss"][row.server],
            "rounds_per_token": (
                sum(s.rounds or 0 for s in counted)
                / sum(s.counted_tokens or 0 for s in counted)
                if counted
                else (0.0 if row.world == 1 else None)
            ),
            "samples": [s.__dict__ | {"decode_tps": s.decode_tps} for s in mine],
        }
        if row.speculative:
            entry["drafted"] = sum(s.drafted or 0 for s in mine)
            entry["accepted"] = sum(s.accepted or 0 for s in mine)
        # Per repetition against the baseline measured in the same repetition.
        for base in ("stock", "same"):
            base_samples = samples.get(base if row.model == "main" else f"tp-{base}")
            entry[f"vs_{base}"] = (
                _median(
                    [
                        a.decode_tps / b.decode_tps
                        for a, b in zip(mine, base_samples, strict=False)
                    ]
                )
                if base_samples and len(base_samples) == len(mine)
                else None
            )
        summary.append(entry)
    return summary


HEADERS = [
    "row",
    "prompt",
    "compute",
    "decode tok/s",
    "prompt tok/s",
    "TTFT s",
    "tokens",
    "peak RSS/rank MB",
    "AR/token",
    "x stock",
    "x same",
]


def render(
    summary: list[dict[str, Any]],
    models: dict[str, str],
    memory: dict[str, Any] | None,
    failed: dict[str, str],
) -> str:
    out = []
    for name in ("main", "tp"):
        entries = [e for e in summary if e["model"] == name]
        if not entries:
            continue
        out.append(f"\nmodel: {models[name]}")
        if name == "tp":
            with open(os.path.join(models[name], "config.json")) as f:
                c = json.load(f)
            out.append(
                f"  (random weights, {c['num_attention_heads']} query heads over "
                f"{c['num_key_value_heads']} KV heads; the ring row runs mlx-lm's "
                "model.shard() in tpnet's compute settings)"
            )
        table = [
            [
                e["label"],
                e["prompt"],
                _short_compute(e["compute"]),
                _fmt(e["decode_tps"]),
                _fmt(e["prompt_tps"]),
                _fmt(e["ttft_s"], 3),
                _fmt(e["tokens"], 0),
                "/".join(_fmt(v, 0) for v in e["peak_rss_mb"]),
                _fmt(e["rounds_per_token"]),
                _fmt(e["vs_stock"], 2),
                _fmt(e["vs_same"], 2),
            ]
            for e in entries
        ]
        out.append(format_table(HEADERS, table, text_columns=3))
        out.append("compute paths:")
        for e in entries:
            out.append(f"  {e['label']}: {e['compute']}")
            if "drafted" in e:
                out.append(
                    f"    speculative: {e['accepted']} of {e['drafted']} drafted "
                    "tokens accepted"
                )
            if e["key"] == "ring":
                out.append(
                    "    AR/token counted in the ranks; mlx-lm's shard() all-sums "
                    "twice per layer per forward pass"
                )
    for key, why in failed.items():
        out.append(f"\nFAILED {key}, its rows are left out: {why}")
    if memory and "error" in memory:
        out.append(f"\nmemory: FAILED: {memory['error']}")
    elif memory:
        single = memory["single"]
        out.append(
            f"\nmemory: {memory['model']} ({memory['weights_mb']:.0f} MB of weights)"
        )
        same = memory["same"]
        rows = [
            [
                "mlx-lm, one process, stock",
                _fmt(single, 0),
                "1.00",
                _fmt(same and single / same, 2),
                _fmt(memory["single_now"], 0),
            ],
            [
                "mlx-lm, one process, same settings",
                _fmt(same, 0),
                _fmt(same / single, 2),
                "1.00",
                _fmt(memory["same_now"], 0),
            ],
        ]
        for rank, (peak, now) in enumerate(
            zip(memory["ranks"], memory["ranks_now"], strict=True)
        ):
            rows.append(
                [
                    f"tpnet ws2 rank {rank}",
                    _fmt(peak, 0),
                    _fmt(peak / single, 2),
                    _fmt(peak / same, 2),
                    _fmt(now, 0),
                ]
            )
        headers = ["process", "peak RSS MB", "x stock", "x same", "RSS at end MB"]
        out.append(format_table(headers, rows))
        out.append(f"  mlx-lm stock: {memory['single_compute']}")
        out.append(f"  mlx-lm same settings: {memory['same_compute']}")
        out.append(f"  tpnet:  {memory['ranks_compute']}")
    return "\n".join(out)


def write_chart(path: str, summary: list[dict[str, Any]], title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "speed: matplotlib is not installed (pip install matplotlib); "
            "no chart written",
            flush=True,
        )
        return
    labels = [
        e["label"] + (" [even-heads model]" if e["model"] == "tp" else "")
        for e in summary
    ]
    decode = [e["decode_tps"] for e in summary]
    prompt = [e["prompt_tps"] for e in summary]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.5 * len(summary) + 2), sharey=True)
    axes[0].barh(labels, decode, color="tab:blue")
    axes[0].set_xlabel("decode tok/s (median; x = ratio to mlx-lm same settings)")
    for y, e in enumerate(summary):
        if e["vs_same"] is not None:
            axes[0].annotate(
                f" x{e['vs_same']:.2f}",
                (0 if math.isnan(decode[y]) else decode[y], y),
                va="center",
                fontsize=8,
            )
    axes[1].barh(labels, prompt, color="tab:orange")
    axes[1].set_xlabel("prompt tok/s (median)")
    axes[0].invert_yaxis()
    fig.suptitle(textwrap.fill(title, 150), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"chart: {path}", flush=True)


# -- command line ----------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", help="GGUF file or model folder (default: SmolLM2 GGUF)")
    p.add_argument("--quick", action="store_true", help="tiny run for smoke tests")
    p.add_argument("--repeats", type=int, default=None, help="repetitions (default 3)")
    p.add_argument("--max-tokens", type=int, default=None, help="default 64")
    p.add_argument("--rows", help=f"comma-separated subset of {','.join(ROW_KEYS)}")
    p.add_argument(
        "--tpnet-args",
        default="",
        help="extra `tpnet serve` options, e.g. '--dequantize' (also sets the "
        "same-settings and ring rows)",
    )
    blas = p.add_mutually_exclusive_group()
    blas.add_argument(
        "--openblas",
        nargs="?",
        const=OPENBLAS_LIBRARY,
        help=f"LD_PRELOAD this BLAS into the tpnet ranks (default "
        f"{OPENBLAS_LIBRARY}); the same-settings rows copy what the ranks map",
    )
    blas.add_argument(
        "--bundled-blas",
        action="store_true",
        help="TPNET_BLAS=bundled for the tpnet ranks: keep MLX's reference BLAS",
    )
    p.add_argument("--json", help="write every sample and the summary here")
    p.add_argument("--png", default="speed.png", help="chart path ('' for none)")
    p.add_argument(
        "--cache-dir",
        default=os.path.join(tempfile.gettempdir(), "tpnet-bench-models"),
        help="where random-weight models are built once",
    )
    # Children.
    p.add_argument("--child", choices=["mlx", "build"], help=argparse.SUPPRESS)
    p.add_argument("--settings", choices=["stock", "same"], help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--dequantize", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ring-world", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    # "--tpnet-args --dequantize" would read as two options: glue the value on.
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(argv[:-1]):
        if arg == "--tpnet-args":
            argv[i : i + 2] = [f"--tpnet-args={argv[i + 1]}"]
            break
    args = p.parse_args(argv)
    if args.child:
        return args
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.max_tokens = args.max_tokens or (8 if args.quick else 64)
    if args.repeats < 1 or args.max_tokens < 2:
        p.error("--repeats must be at least 1 and --max-tokens at least 2")
    keys = args.rows.split(",") if args.rows else ROW_KEYS
    unknown = [k for k in keys if k not in ROW_KEYS]
    if unknown:
        p.error(f"--rows: unknown {unknown}; choose from {ROW_KEYS}")
    args.row_keys = keys
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child == "mlx":
        _mlx_child(args)
        return 0
    if args.child == "build":
        _build_child(args)
        return 0
    sys.path.insert(0, REPO)
    from tpnet.model.loader import default_model_path

    tpnet_args = shlex.split(args.tpnet_args)
    tpnet_env: dict[str, str] = {}
    if args.openblas:
        if not os.path.exists(args.openblas):
            print(f"speed: --openblas {args.openblas}: no such file", file=sys.stderr)
            return 2
        tpnet_env = {"LD_PRELOAD": args.openblas, "OPENBLAS_NUM_THREADS": "1"}
    if args.bundled_blas:
        tpnet_env["TPNET_BLAS"] = "bundled"
    rows = [r for r in ROWS if r.key in args.row_keys]
    models = {"main": args.model or default_model_path()}
    command = shlex.join([sys.executable, *sys.argv])
    print(f"command: {command}")
    print(
        f"machine: {platform.machine()} {platform.system()}, {os.cpu_count()} CPUs; "
        f"{args.repeats} repetitions, up to {args.max_tokens} tokens, greedy; "
        f"tpnet serve {shlex.join(tpnet_args) or '(defaults)'}"
        + (f"; LD_PRELOAD={args.openblas}" if args.openblas else "")
        + ("; TPNET_BLAS=bundled" if args.bundled_blas else ""),
        flush=True,
    )

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="tpnet-speed-") as workdir:
        opts = Options(workdir, tpnet_args, tpnet_env, args.openblas)
        try:
            if any(r.model == "tp" for r in rows):
                tp = {**(TP_QUICK_MODEL if args.quick else TP_MODEL), "bits": TP_BITS}
                models["tp"] = cached_model(args.cache_dir, _folder_name("tp", tp), tp)
            result = measure(rows, models, args, opts) if rows else None
            memory = None
            if "memory" in args.row_keys:
                config = MEMORY_QUICK_MODEL if args.quick else MEMORY_MODEL
                path = cached_model(args.cache_dir, _folder_name("mem", config), config)
                try:
                    memory = measure_memory(path, opts)
                except BenchError as exc:
                    memory = {"model": path, "error": str(exc)}
        except subprocess.SubprocessError as exc:
            print(f"speed: building a model failed: {exc}", file=sys.stderr)
            return 1
    summary = summarize(rows, result) if result else []
    failed = result["failed"] if result else {}
    print(render(summary, models, memory, failed), flush=True)
    print(
        "(medians over repetitions; x stock / x same: medians of per-repetition "
        "decode ratios to the mlx-lm rows of the same model, which answer the chat "
        "prompt, also for rows on the repeat prompt; AR = all-reduce)"
    )
    if args.json:
        write_json(
            args.json,
            {
                "command": command,
                "repeats": args.repeats,
                "max_tokens": args.max_tokens,
                "tpnet_args": tpnet_args,
                "openblas": args.openblas,
                "models": models,
                "rows": summary,
                "failed": failed,
                "memory": memory,
            },
        )
    if args.png and summary:
        write_chart(args.png, summary, command)
    return 1 if failed or (memory and "error" in memory) else 0


if __name__ == "__main__":
    sys.exit(main())
