"""Latency of one exchange between ranks on loopback, against its floors.

    python benchmarks/latency.py [--quick] [--rounds N] [--json PATH]
    python benchmarks/latency.py --profile [--quick]

For float32 payloads of 4 KB, 64 KB, 1 MB and 4 MB it times, per operation:

  raw     blocking TCP ping-pong of the payload (TCP_NODELAY): the floor
  frame   tpnet frame round trip: a TENSOR frame sent over a tpnet Mesh and
          echoed back by the other rank
  tpnet   tpnet.collective.Collective.all_sum, 2 and 3 ranks, with mx.eval
          of the result
  ring    mx.distributed.all_sum on MLX's ring backend, 2 and 3 ranks, with
          mx.eval of the result

Every rank is its own process, started by this script with sys.executable;
all of them run side by side for the whole run, idle (blocked on a pipe or a
socket) while another group measures. Each round times every group at every
payload in turn, the group order rotating per round, so drift in the load of
a shared machine touches all columns alike. Ratios are taken per round from
adjacent measurements, and their median over rounds is printed.

MLX ring ranks get the environment `mlx.launch --backend ring` gives them:
MLX_RANK and MLX_HOSTFILE (a JSON list with one ["127.0.0.1:PORT"] per rank).
The launcher itself is not used: its I/O threads select() on the children's
always-writable stdin pipes, so it spins a whole core for as long as the job
runs, which on a 2-core machine starves the ranks it launched.

Placement matters more than anything else on a small machine: a wake-up
across cores costs tens of microseconds in a VM, one on the same core a few.
So every batch runs under each of --placements: `spread` pins rank r to CPU
r mod N (ranks on their own cores, as when each computes its shard; with 3
ranks on 2 CPUs two share one), `same` pins all ranks to one CPU (the case
of the usual "7 us" ping-pong on an idle box, where the scheduler keeps both
ends together), `free` leaves placement to the scheduler (bimodal).

--profile runs a 2-rank 4 KB all-reduce with an instrumented copy of
Collective.all_sum and prints where the time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import itertools
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from _common import (
    LOOPBACK,
    LineReader,
    format_table,
    free_port_range,
    median,
    percentile,
    stop_process,
    write_json,
)

PAYLOADS = {"4 KB": 4 << 10, "64 KB": 64 << 10, "1 MB": 1 << 20, "4 MB": 4 << 20}
# Link polling before sleeping in an all-reduce, as tpnet does by default
# when every rank has a core (tpnet.node.DEFAULT_SPIN_US).
SPIN_US = 300.0

# Each batch (one group, payload and placement in one round) is sized from
# the last measured time per operation to take about BATCH_BUDGET_S, within
# [MIN_ITERATIONS, MAX_ITERATIONS]: 5 rounds x 2 placements x 4 payloads x 6
# groups x 0.25 s keeps a full run near a minute of measuring, whatever the
# speed of the slowest groups (MLX ring with 3 ranks on 2 cores takes tens of
# milliseconds per operation). A probe of PROBE_ITERATIONS gives the first
# estimate.
BATCH_BUDGET_S = 0.25
QUICK_BATCH_BUDGET_S = 0.02
MAX_ITERATIONS = {4 << 10: 2000, 64 << 10: 1000, 1 << 20: 200, 4 << 20: 60}
MIN_ITERATIONS = 5
QUICK_MIN_ITERATIONS = 3
PROBE_ITERATIONS = 3
# Untimed operations before each batch: at most this many, at most a fifth
# of the batch.
WARMUP = {4 << 10: 100, 64 << 10: 40, 1 << 20: 5, 4 << 20: 2}
ROUNDS = 5
PLACEMENTS = ("spread", "same")
QUICK_PLACEMENTS = ("spread",)
# A pause after each batch, so a rank that spins for a while after its last
# operation does not steal the CPU from the next group's measurement.
SETTLE_S = 0.02
PROFILE_ITERATIONS = 3000

# Bounds on the children: a group has this long to connect (13 processes
# importing MLX at once on 2 busy cores), one batch this long to finish, and
# every child ends itself (SIGALRM) after its lifetime even if orphaned.
READY_TIMEOUT_S = 120.0
BATCH_TIMEOUT_S = 120.0
CHILD_LIFETIME_S = 900
SOCKET_TIMEOUT_S = 60.0
# Links idle while other groups measure; the mesh must not call that a loss.
PEER_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Method:
    key: str
    role: str
    world: int
    label: str


METHODS = [
    Method("raw", "raw", 2, "raw TCP ping-pong (floor)"),
    Method("frame", "frame", 2, "tpnet frame round trip"),
    Method("tpnet2", "tpnet", 2, "tpnet all_sum, 2 ranks"),
    Method("tpnet3", "tpnet", 3, "tpnet all_sum, 3 ranks"),
    Method("ring2", "ring", 2, "MLX ring all_sum, 2 ranks"),
    Method("ring3", "ring", 3, "MLX ring all_sum, 3 ranks"),
]
RATIOS = [
    ("tpnet2", "raw", "tpnet all_sum 2 ranks / floor"),
    ("tpnet2", "ring2", "tpnet all_sum / MLX ring, 2 ranks"),
    ("tpnet3", "ring3", "tpnet all_sum / MLX ring, 3 ranks"),
]


# -- children: one process per rank -----------------------------------------


def _reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _commands(timeout_s: float) -> Any:
    """Commands from the driver, one JSON object a line, until quit or EOF.
    Each command first moves this process to the CPUs it names."""
    reader = LineReader(sys.stdin.fileno())
    while True:
        line = reader.readline(timeout_s)
        if line is None:
            return
        command = json.loads(line)
        if command["op"] == "quit":
            return
        if command.get("cpus"):
            _pin(set(command["cpus"]))
        yield command


def _pin(cpus: set[int]) -> None:
    """Every thread of this process onto `cpus` (sched_setaffinity(0) would
    move only the calling thread, not MLX's or the executor's)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:
            pass  # the thread ended meanwhile


def _payload(nbytes: int, rank: int) -> Any:
    import mlx.core as mx

    x = mx.full((nbytes // 4,), float(rank + 1), dtype=mx.float32)
    mx.eval(x)
    return x


def _expected_sum(world: int) -> float:
    return float(world * (world + 1) // 2)


def _raw_child(args: argparse.Namespace) -> None:
    """Rank 0 sends the payload and times until it is back; rank 1 receives
    the whole payload, then sends it back (blocking sockets, TCP_NODELAY)."""
    import numpy as np

    port = args.base_port
    if args.rank == 1:
        with socket.socket() as server:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind((LOOPBACK, port))
            server.listen(1)
            server.settimeout(SOCKET_TIMEOUT_S)
            conn, _ = server.accept()
    else:
        conn = _connect_bounded(port)
    conn.settimeout(SOCKET_TIMEOUT_S)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _reply({"ready": True})
    with conn:
        for command in _commands(args.lifetime):
            nbytes = command["nbytes"]
            total = command["warmup"] + command["iters"]
            payload = np.asarray(_payload(nbytes, args.rank)).data.cast("B")
            back = memoryview(bytearray(nbytes))
            samples = []
            for i in range(total):
                started = time.perf_counter()
                if args.rank == 0:
                    conn.sendall(payload)
                    _recv_exactly(conn, back)
                else:
                    _recv_exactly(conn, back)
                    conn.sendall(back)
                if i >= command["warmup"]:
                    samples.append((time.perf_counter() - started) * 1e6)
            if args.rank == 0:
                _reply({"samples_us": samples, "check": back.tobytes() == payload})
            else:
                _reply({"done": True})


def _connect_bounded(port: int) -> socket.socket:
    deadline = time.monotonic() + SOCKET_TIMEOUT_S
    while True:
        try:
            return socket.create_connection((LOOPBACK, port), timeout=5.0)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _recv_exactly(conn: socket.socket, into: memoryview) -> None:
    got = 0
    while got < into.nbytes:
        n = conn.recv_into(into[got:])
        if n == 0:
            raise ConnectionError("peer closed mid-payload")
        got += n


def _ring_child(args: argparse.Namespace) -> None:
    """One rank of MLX's ring backend (MLX_RANK, MLX_HOSTFILE set by us)."""
    import mlx.core as mx

    try:
        group = mx.distributed.init(backend="ring", strict=True)
    except (RuntimeError, ValueError) as exc:
        _reply({"error": f"mx.distributed.init(backend='ring') failed: {exc}"})
        return
    if group.size() != args.world:
        _reply({"error": f"ring group has {group.size()} ranks, want {args.world}"})
        return
    _reply({"ready": True})
    for command in _commands(args.lifetime):
        x = _payload(command["nbytes"], args.rank)
        samples = []
        for i in range(command["warmup"] + command["iters"]):
            started = time.perf_counter()
            y = mx.distributed.all_sum(x, group=group)
            mx.eval(y)
            if i >= command["warmup"]:
                samples.append((time.perf_counter() - started) * 1e6)
        check = y[0].item() == _expected_sum(args.world)
        _reply({"samples_us": samples, "check": check} if args.rank == 0 else {})


async def _mesh_child(args: argparse.Namespace) -> None:
    """One rank with a tpnet Mesh: frame echo (role frame) or all_sum."""
    from tpnet.collective import Collective
    from tpnet.net import Address, Mesh

    addresses = [Address(LOOPBACK, args.base_port + r) for r in range(args.world)]
    mesh = Mesh(
        args.rank,
        addresses,
        os.environ["TPNET_SECRET"].encode(),
        "latency-benchmark",
        peer_timeout_s=PEER_TIMEOUT_S,
    )
    collective = Collective(mesh) if args.role in ("tpnet", "profile") else None
    if args.role == "frame" and args.rank == 1:
        mesh.tensor_listeners.append(lambda rank: _echo(mesh, rank))
    await mesh.start()
    try:
        await mesh.wait_complete(READY_TIMEOUT_S)
        _reply({"ready": True})
        loop = asyncio.get_running_loop()
        commands = _commands(args.lifetime)
        while True:
            # Read in a thread so the mesh keeps its heartbeats meanwhile.
            command = await loop.run_in_executor(None, next, commands, None)
            if command is None:
                break
            if args.role == "frame":
                result = await _frame_batch(mesh, args.rank, command)
            elif args.role == "profile":
                assert collective is not None
                result = await _profile_batch(collective, command)
            else:
                assert collective is not None
                result = await _all_sum_batch(collective, command)
            _reply(result if args.rank == 0 else {})
    finally:
        await mesh.close()


def _echo(mesh: Any, rank: int) -> None:
    from tpnet import wire

    queue = mesh.tensors[rank]
    while queue:
        msg = queue.popleft()
        mesh.send(rank, wire.encode_tensor(msg.tag, msg.dtype, msg.shape, msg.payload))


async def _frame_batch(mesh: Any, rank: int, command: dict[str, Any]) -> dict[str, Any]:
    from tpnet import wire
    from tpnet.collective import to_buffer

    if rank != 0:
        return {}
    dtype, shape, buffer = to_buffer(_payload(command["nbytes"], rank))
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] | None = None

    def arrived(peer: int) -> None:
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    mesh.tensor_listeners.append(arrived)
    samples = []
    try:
        for i in range(command["warmup"] + command["iters"]):
            started = time.perf_counter()
            waiter = loop.create_future()
            mesh.send(1, wire.encode_tensor(i, dtype, shape, buffer))
            if not mesh.tensors[1]:
                await asyncio.wait_for(waiter, SOCKET_TIMEOUT_S)
            msg = mesh.tensors[1].popleft()
            if i >= command["warmup"]:
                samples.append((time.perf_counter() - started) * 1e6)
    finally:
        mesh.tensor_listeners.remove(arrived)
    check = msg.tag == i and bytes(msg.payload) == bytes(buffer)
    return {"samples_us": samples, "check": check}


async def _all_sum_batch(collective: Any, command: dict[str, Any]) -> dict[str, Any]:
    import mlx.core as mx

    x = _payload(command["nbytes"], collective.rank)
    collective.spin_s = command.get("spin_us", 0.0) / 1e6
    samples = []
    for i in range(command["warmup"] + command["iters"]):
        started = time.perf_counter()
        y = await collective.all_sum(x)
        mx.eval(y)
        if i >= command["warmup"]:
            samples.append((time.perf_counter() - started) * 1e6)
    check = y[0].item() == _expected_sum(collective.world_size)
    return {"samples_us": samples, "check": check}


# -- profile: an instrumented copy of Collective.all_sum ----------------------

PHASES = [
    ("to_buffer", "to_buffer (mx.eval + np.asarray)"),
    ("encode", "wire.encode_tensor"),
    ("send", "mesh.send (transport.writelines)"),
    ("wait", "until the peer's frame is decoded"),
    ("wake", "decoded -> coroutine resumed"),
    ("sum", "from_message + graph of the sum"),
    ("eval", "mx.eval(result)"),
]
# Part of "wait", shown apart: decoding the peer's frame on this side.
PARSE = ("parse", "  of the wait: FrameReader.buffer_filled")


async def _profile_batch(collective: Any, command: dict[str, Any]) -> dict[str, Any]:
    """Collective.all_sum's steps, timed one by one. The decode time of the
    peer's frame is taken in a mesh listener, which the mesh calls right
    after FrameReader hands it the message; the readers' buffer_filled are
    wrapped to time the decoding itself."""
    import mlx.core as mx

    from tpnet import wire
    from tpnet.collective import from_message, to_buffer

    mesh = collective.mesh
    decoded_at: list[float] = []
    mesh.tensor_listeners.insert(0, lambda rank: decoded_at.append(time.perf_counter()))
    parsing = [0.0]
    for link in mesh.links.values():
        link.reader.buffer_filled = _timed(link.reader.buffer_filled, parsing)
    x = _payload(command["nbytes"], collective.rank)
    phases: dict[str, list[float]] = {name: [] for name, _ in [*PHASES, PARSE]}
    totals = []
    others = [r for r in range(collective.world_size) if r != collective.rank]
    for i in range(command["warmup"] + command["iters"]):
        decoded_at.clear()
        parsing[0] = 0.0
        t0 = time.perf_counter()
        tag = collective._next_tag()
        dtype, shape, buf = to_buffer(x)
        t1 = time.perf_counter()
        frame = wire.encode_tensor(tag, dtype, shape, buf)
        t2 = time.perf_counter()
        for r in others:
            mesh.send(r, frame)
        t3 = time.perf_counter()
        parts = await collective._receive(others, tag)
        t5 = time.perf_counter()
        # A frame that was decoded before send finished waited 0.
        t4 = max(t3, decoded_at[-1]) if decoded_at else t3
        total = x
        for r in others:
            total = total + from_message(parts[r])
        t6 = time.perf_counter()
        mx.eval(total)
        t7 = time.perf_counter()
        if i < command["warmup"]:
            continue
        marks = [t0, t1, t2, t3, t4, t5, t6, t7]
        for (name, _), start, end in zip(PHASES, marks, marks[1:], strict=False):
            phases[name].append((end - start) * 1e6)
        phases["parse"].append(parsing[0] * 1e6)
        totals.append((t7 - t0) * 1e6)
    mesh.tensor_listeners.pop(0)
    for link in mesh.links.values():
        del link.reader.buffer_filled  # the class's method again
    return {"phases_us": phases, "samples_us": totals}


def _timed(method: Any, spent: list[float]) -> Any:
    def timed(nbytes: int) -> Any:
        started = time.perf_counter()
        try:
            return method(nbytes)
        finally:
            spent[0] += time.perf_counter() - started

    return timed


def _child_main(args: argparse.Namespace) -> None:
    # SIGALRM's default action ends the process: the bound on an orphan.
    signal.alarm(int(args.lifetime))
    if args.role == "raw":
        _raw_child(args)
    elif args.role == "ring":
        _ring_child(args)
    else:
        import uvloop

        uvloop.run(_mesh_child(args))


# -- driver ---------------------------------------------------------------------


class GroupFailed(Exception):
    pass


@dataclass
class Group:
    """The processes of one method, driven over their stdin/stdout."""

    method: Method
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    readers: list[LineReader] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)

    def start(self, base_port: int, workdir: str, secret: str, lifetime: int) -> None:
        m = self.method
        hostfile = os.path.join(workdir, f"{m.key}-hosts.json")
        if m.role == "ring":
            hosts = [[f"{LOOPBACK}:{base_port + r}"] for r in range(m.world)]
            with open(hostfile, "w") as f:
                json.dump(hosts, f)
        for rank in range(m.world):
            env = dict(os.environ, TPNET_SECRET=secret)
            if m.role == "ring":
                env.update(MLX_RANK=str(rank), MLX_HOSTFILE=hostfile)
            log = os.path.join(workdir, f"{m.key}-rank{rank}.log")
            with open(log, "wb") as stderr:
                proc = subprocess.Popen(
                    [
                        sys.executable,
                        os.path.abspath(__file__),
                        "--child",
                        m.role,
                        "--rank",
                        str(rank),
                        "--world",
                        str(m.world),
                        "--base-port",
                        str(base_port),
                        "--lifetime",
                        str(lifetime),
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=stderr,
                    env=env,
                )
            self.procs.append(proc)
            assert proc.stdout is not None
            self.readers.append(LineReader(proc.stdout.fileno()))
            self.logs.append(log)

    def _receive(self, rank: int, timeout_s: float) -> dict[str, Any]:
        try:
            line = self.readers[rank].readline(timeout_s)
        except TimeoutError:
            raise GroupFailed(
                f"rank {rank} gave no answer within {timeout_s:.0f} s"
                f"{self._log_tail(rank)}"
            ) from None
        if line is None:
            code = self.procs[rank].wait(5.0)
            raise GroupFailed(f"rank {rank} exited ({code}){self._log_tail(rank)}")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise GroupFailed(f"rank {rank}: {reply['error']}{self._log_tail(rank)}")
        return reply

    def _log_tail(self, rank: int) -> str:
        with open(self.logs[rank], errors="replace") as f:
            tail = f.read()[-1500:].strip()
        return f"; its stderr ends:\n{tail}" if tail else ""

    def wait_ready(self, deadline: float) -> None:
        for rank in range(self.method.world):
            self._receive(rank, max(1.0, deadline - time.monotonic()))

    def run(
        self, nbytes: int, iters: int, warmup: int, placement: str
    ) -> dict[str, Any]:
        for rank in range(self.method.world):
            command = {
                "op": "run",
                "nbytes": nbytes,
                "iters": iters,
                "warmup": warmup,
                "cpus": cpus_for(placement, rank),
                # tpnet's own policy (tpnet.node.spin_seconds): poll before
                # sleeping only when every rank has a core of its own.
                "spin_us": SPIN_US
                if placement == "spread" and self.method.world <= (os.cpu_count() or 1)
                else 0.0,
            }
            self._send(rank, command)
        replies = [self._receive(r, BATCH_TIMEOUT_S) for r in range(self.method.world)]
        if not replies[0].get("check", True):
            raise GroupFailed(f"{self.method.label}: wrong result at {nbytes} bytes")
        return replies[0]

    def _send(self, rank: int, command: dict[str, Any]) -> None:
        stdin = self.procs[rank].stdin
        assert stdin is not None
        try:
            stdin.write((json.dumps(command) + "\n").encode())
            stdin.flush()
        except BrokenPipeError:
            code = self.procs[rank].wait(5.0)
            raise GroupFailed(
                f"{self.method.label}: rank {rank} exited ({code})"
                f"{self._log_tail(rank)}"
            ) from None

    def stop(self) -> None:
        try:
            for rank in range(self.method.world):
                self._send(rank, {"op": "quit"})
        except (GroupFailed, OSError, subprocess.TimeoutExpired):
            pass
        for proc in self.procs:
            try:
                proc.wait(5.0)
            except subprocess.TimeoutExpired:
                pass
            stop_process(proc, grace_s=2.0)


def cpus_for(placement: str, rank: int) -> list[int]:
    """The CPUs a rank may run on: `spread` puts rank r on CPU r mod N (ranks
    on their own cores, as when each computes its shard), `same` puts every
    rank on the first CPU, `free` leaves it to the scheduler."""
    if placement == "free" or not hasattr(os, "sched_getaffinity"):
        return []
    cpus = sorted(os.sched_getaffinity(0))
    return [cpus[0]] if placement == "same" else [cpus[rank % len(cpus)]]


def _start_groups(
    methods: list[Method], workdir: str, lifetime: int
) -> tuple[dict[str, Group], dict[str, str]]:
    """Start every group side by side; a group that cannot start is skipped
    with its reason (the others still run)."""
    secret = os.urandom(16).hex()
    base = free_port_range(sum(m.world for m in methods))
    groups: dict[str, Group] = {}
    skipped: dict[str, str] = {}
    try:
        for m in methods:
            groups[m.key] = Group(m)
            groups[m.key].start(base, workdir, secret, lifetime)
            base += m.world
        deadline = time.monotonic() + READY_TIMEOUT_S
        for key, group in list(groups.items()):
            try:
                group.wait_ready(deadline)
            except GroupFailed as exc:
                skipped[key] = str(exc)
                group.stop()
                del groups[key]
    except BaseException:
        for group in groups.values():
            group.stop()
        raise
    return groups, skipped


def measure(args: argparse.Namespace) -> dict[str, Any]:
    budget_s = QUICK_BATCH_BUDGET_S if args.quick else BATCH_BUDGET_S
    least = QUICK_MIN_ITERATIONS if args.quick else MIN_ITERATIONS
    rounds = args.rounds or (1 if args.quick else ROUNDS)
    methods = [m for m in METHODS if m.key in args.methods]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tpnet-latency-") as workdir:
        groups, skipped = _start_groups(methods, workdir, args.lifetime)
        startup_s = time.monotonic() - started
        samples: dict[str, dict[str, dict[str, list[float]]]] = {
            place: {k: {p: [] for p in PAYLOADS} for k in groups}
            for place in args.placements
        }
        round_medians = copy.deepcopy(samples)
        per_op_s: dict[tuple[str, str, int], float] = {}
        try:
            for round_index in range(rounds):
                order = list(groups)
                shift = round_index % len(order) if order else 0
                order = order[shift:] + order[:shift]
                for place, (payload, nbytes), key in itertools.product(
                    args.placements, PAYLOADS.items(), order
                ):
                    batch = (place, key, nbytes)
                    if batch not in per_op_s:
                        probe = groups[key].run(nbytes, PROBE_ITERATIONS, 1, place)
                        per_op_s[batch] = median(probe["samples_us"]) / 1e6
                    iters = int(budget_s / per_op_s[batch])
                    iters = max(least, min(MAX_ITERATIONS[nbytes], iters))
                    warmup = min(WARMUP[nbytes], max(1, iters // 5))
                    reply = groups[key].run(nbytes, iters, warmup, place)
                    per_op_s[batch] = median(reply["samples_us"]) / 1e6
                    samples[place][key][payload].extend(reply["samples_us"])
                    round_medians[place][key][payload].append(
                        median(reply["samples_us"])
                    )
                    # Let the group just measured go idle before the next.
                    time.sleep(SETTLE_S)
        finally:
            for group in groups.values():
                group.stop()
    return {
        "rounds": rounds,
        "quick": args.quick,
        "placements": args.placements,
        "startup_s": round(startup_s, 1),
        "measure_s": round(time.monotonic() - started - startup_s, 1),
        "samples": samples,
        "round_medians": round_medians,
        "skipped": skipped,
        "labels": {m.key: m.label for m in methods},
    }


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    ratios: dict[str, Any] = {}
    for place in raw["placements"]:
        samples, medians = raw["samples"][place], raw["round_medians"][place]
        results[place] = {
            key: {
                payload: {
                    "label": raw["labels"][key],
                    "median_us": median(values),
                    "p90_us": percentile(values, 90),
                    "n": len(values),
                    "round_medians_us": medians[key][payload],
                }
                for payload, values in by_payload.items()
            }
            for key, by_payload in samples.items()
        }
        ratios[place] = {}
        for top, bottom, label in RATIOS:
            if top in medians and bottom in medians:
                ratios[place][f"{top}/{bottom}"] = {
                    "label": label,
                    **{
                        payload: _ratio(medians[top][payload], medians[bottom][payload])
                        for payload in PAYLOADS
                    },
                }
    return {
        "results": results,
        "ratios": ratios,
        "skipped": raw["skipped"],
        "rounds": raw["rounds"],
        "quick": raw["quick"],
        "placements": raw["placements"],
        "startup_s": raw["startup_s"],
        "measure_s": raw["measure_s"],
        "environment": _environment(),
    }


def _ratio(tops: list[float], bottoms: list[float]) -> float:
    """The median over rounds of each round's ratio: the two were measured
    moments apart, so a change in the machine's load cancels out."""
    return median([a / b for a, b in zip(tops, bottoms, strict=True)])


def _environment() -> dict[str, Any]:
    import mlx.core as mx

    return {
        "python": platform.python_version(),
        "mlx": getattr(mx, "__version__", "?"),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "loadavg": os.getloadavg(),
    }


PLACEMENT_TEXT = {
    "spread": "rank r pinned to CPU r mod N, as when every rank computes",
    "same": "every rank pinned to one CPU",
    "free": "no pinning, the scheduler places the ranks",
}


def report(summary: dict[str, Any]) -> str:
    env = summary["environment"]
    title = (
        f"tpnet latency on loopback: {summary['rounds']} round(s), groups "
        f"alternated; mlx {env['mlx']}, {env['cpus']} CPUs, load average "
        f"{env['loadavg'][0]:.1f}; times in microseconds"
    )
    lines = [title]
    for place in summary["placements"]:
        lines += ["", f"placement {place}: {PLACEMENT_TEXT[place]}"]
        rows = [
            [
                payload,
                r["label"],
                f"{r['median_us']:.1f}",
                f"{r['p90_us']:.1f}",
                str(r["n"]),
            ]
            for payload in PAYLOADS
            for r in (by[payload] for by in summary["results"][place].values())
        ]
        headers = ["payload", "operation", "median_us", "p90_us", "n"]
        lines += [format_table(headers, rows, text_columns=2), ""]
        ratio_rows = [
            [ratio["label"], *(f"{ratio[p]:.2f}x" for p in PAYLOADS)]
            for ratio in summary["ratios"][place].values()
        ]
        if ratio_rows:
            headers = [f"ratio, {place} (median of per-round ratios)", *PAYLOADS]
            lines.append(format_table(headers, ratio_rows))
    for key, reason in summary["skipped"].items():
        lines.append(f"skipped {key}: {reason}")
    lines.append(
        f"(start-up {summary['startup_s']} s, measuring {summary['measure_s']} s)"
    )
    return "\n".join(lines)


def profile(args: argparse.Namespace) -> str:
    """The 2-rank 4 KB all-reduce, phase by phase, per placement."""
    method = Method("profile", "profile", 2, "tpnet all_sum, 2 ranks, instrumented")
    iters = 300 if args.quick else PROFILE_ITERATIONS
    with tempfile.TemporaryDirectory(prefix="tpnet-latency-") as workdir:
        groups, skipped = _start_groups([method], workdir, args.lifetime)
        if skipped:
            raise GroupFailed(skipped["profile"])
        try:
            replies = {
                place: groups["profile"].run(4 << 10, iters, 200, place)
                for place in args.placements
            }
        finally:
            groups["profile"].stop()
    out = []
    for place, reply in replies.items():
        phases = {**reply["phases_us"], "total": reply["samples_us"]}
        rows = [
            [
                label,
                f"{median(phases[name]):.1f}",
                f"{percentile(phases[name], 90):.1f}",
            ]
            for name, label in [*PHASES, ("total", "total"), PARSE]
        ]
        out.append(
            f"tpnet all_sum, 2 ranks, 4 KB, placement {place}, rank 0, "
            f"{iters} operations (microseconds)"
        )
        out += [format_table(["phase", "median", "p90"], rows), ""]
    return "\n".join(out).rstrip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a few-second smoke run")
    parser.add_argument("--rounds", type=int, help=f"rounds (default {ROUNDS})")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument(
        "--methods",
        default=",".join(m.key for m in METHODS),
        help="comma-separated subset of " + ",".join(m.key for m in METHODS),
    )
    parser.add_argument(
        "--placements",
        help="where ranks run, any of spread,same,free (default "
        f"{','.join(PLACEMENTS)}; with --quick {','.join(QUICK_PLACEMENTS)})",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="time the phases of a 2-rank 4 KB tpnet all_sum instead",
    )
    # How the script starts its own children (one per rank).
    hidden = argparse.SUPPRESS
    parser.add_argument("--lifetime", type=int, default=CHILD_LIFETIME_S, help=hidden)
    parser.add_argument("--child", dest="role", help=hidden)
    parser.add_argument("--rank", type=int, default=0, help=hidden)
    parser.add_argument("--world", type=int, default=2, help=hidden)
    parser.add_argument("--base-port", type=int, default=0, help=hidden)
    args = parser.parse_args(argv)
    if args.role:
        _child_main(args)
        return 0
    args.methods = args.methods.split(",")
    unknown = set(args.methods) - {m.key for m in METHODS}
    if unknown:
        parser.error(f"unknown --methods {sorted(unknown)}")
    placements = args.placements or ",".join(
        QUICK_PLACEMENTS if args.quick else PLACEMENTS
    )
    args.placements = placements.split(",")
    if not set(args.placements) <= set(PLACEMENT_TEXT):
        parser.error(f"--placements must be among {sorted(PLACEMENT_TEXT)}")
    if not hasattr(os, "sched_setaffinity"):
        args.placements = ["free"]  # no pinning on this platform (macOS)
    # SIGTERM unwinds like Ctrl-C, so the children are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    try:
        if args.profile:
            print(profile(args))
            return 0
        summary = summarize(measure(args))
    except GroupFailed as exc:
        print(f"latency: a group of ranks failed: {exc}", file=sys.stderr)
        return 1
    print(report(summary))
    if args.json:
        write_json(args.json, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
