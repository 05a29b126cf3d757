"""What one decode step costs each rank as the batch grows, in-process.

    python benchmarks/batch_step.py [--world-size 2] [--batches 1,2,4,8,16]
        [--context 80] [--steps 20] [--model PATH] [--json PATH]

For every rank of a --world-size plan of the model (the default model unless
--model), this loads that rank's shard alone, puts B sequences of --context
cached positions in its KV cache (rows deliberately out of order, as they are
once requests come and go), and times decode steps of all B sequences: the
attention half of every layer (norm, q/k/v, attention over the cache, o_proj),
the MLP half (norm, gate/up/down), and the LM head over the B rows. Each half
is evaluated on its own, where the cluster exchanges partial sums, but no
exchange happens here: the figures are the rank's compute, what the cluster's
step waits for. It prints milliseconds per step and each total relative to
B = 1, then, per B, how long the rank with less attention work waits for the
other after attention in every layer (the difference of their attention
times).

One rank is loaded at a time: the machine's other core stays idle.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from types import SimpleNamespace
from typing import Any

# isort: off
# tpnet first: it loads OpenBLAS, which must happen before MLX is imported.
import tpnet  # noqa: F401
import mlx.core as mx
from _common import format_table, positive_ints, write_json
from tpnet.model.llama import Segment, ShardedModel, decode_batch, rms_norm
from tpnet.model.loader import load_model
from tpnet.model.shard import mlp_unit_for, plan_shard
from tpnet.node import compute_path, dequantize_by_default

# isort: on

WARMUP_STEPS = 3
TOKEN = 7  # any id: decode cost does not depend on it


async def _no_exchange(x: mx.array) -> mx.array:
    return x


def _timed(totals: dict[str, float], part: str, compute: Any) -> mx.array:
    started = time.perf_counter()
    out = compute()
    mx.eval(out)
    totals[part] += time.perf_counter() - started
    return out


def _decode_step(
    model: ShardedModel, segments: list[Segment], cache: Any, totals: dict[str, float]
) -> None:
    tokens = mx.array([TOKEN] * len(segments), dtype=mx.int32)
    h = _timed(totals, "embed", lambda: model.embed_tokens.rows(tokens))
    decode = decode_batch(segments, cache)
    for i, layer in enumerate(model.layers):
        attention = layer.self_attn(
            rms_norm(h, layer.input_layernorm, layer.eps), segments, decode, i, cache
        )
        h = h + _timed(totals, "attention", lambda a=attention: a)
        mlp = layer.mlp(rms_norm(h, layer.post_attention_layernorm, layer.eps))
        h = h + _timed(totals, "mlp", lambda m=mlp: m)
    logits = model.logits(rms_norm(h, model.norm, model.config.rms_norm_eps))
    _timed(totals, "lm_head", lambda: logits)


def measure_rank(
    args: argparse.Namespace, rank: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    spec = load_model(args.model, with_tokenizer=False)
    plan = plan_shard(spec.config, rank, args.world_size, mlp_unit=mlp_unit_for(spec))
    model = ShardedModel(spec, plan, _no_exchange, dequantize=args.dequantize)
    rows = []
    rng = random.Random(rank)
    for batch in args.batches:
        cache = model.new_cache()
        slots = list(range(batch))
        for slot in slots:
            cache.open(slot)
            cache.length[slot] = args.context
        cache.reserve(args.context + WARMUP_STEPS + args.steps)
        rng.shuffle(slots)  # batch order differs from row order
        totals = dict.fromkeys(("embed", "attention", "mlp", "lm_head"), 0.0)
        for step in range(WARMUP_STEPS + args.steps):
            if step == WARMUP_STEPS:
                totals = dict.fromkeys(totals, 0.0)
            segments = [
                Segment(j, 1, cache.row_of[slot], cache.length[slot])
                for j, slot in enumerate(slots)
            ]
            _decode_step(model, segments, cache, totals)
            for slot in slots:
                cache.length[slot] += 1
        ms = {part: total / args.steps * 1e3 for part, total in totals.items()}
        rows.append({"rank": rank, "batch": batch, **ms, "step": sum(ms.values())})
        print(
            f"  rank {rank}, {batch} sequence(s): {rows[-1]['step']:.1f} ms",
            file=sys.stderr,
            flush=True,
        )
    shard = {
        "rank": rank,
        "query_heads": list(plan.q_heads),
        "kv_heads": list(plan.kv_heads),
        "mlp": list(plan.mlp),
        "vocab": list(plan.vocab),
    }
    return shard, rows


def report(args: argparse.Namespace, shards: list[dict], rows: list[dict]) -> None:
    print(
        f"tpnet batch step: {args.model or 'default model'}, {args.world_size} "
        f"ranks' shards, {args.context} cached positions, {args.steps} steps "
        "(ms per step)"
    )
    path = compute_path(SimpleNamespace(dtype="float32", dequantize=args.dequantize))
    print(f"compute path: {path}")
    for shard in shards:
        print(
            f"rank {shard['rank']}: query heads {shard['query_heads']}, KV heads "
            f"{shard['kv_heads']}, MLP {shard['mlp']}, vocabulary {shard['vocab']}"
        )
    table = []
    for row in rows:
        first = next(
            r
            for r in rows
            if r["rank"] == row["rank"] and r["batch"] == rows[0]["batch"]
        )
        table.append(
            [
                str(row["rank"]),
                str(row["batch"]),
                f"{row['attention']:.1f}",
                f"{row['mlp']:.1f}",
                f"{row['lm_head']:.1f}",
                f"{row['step']:.1f}",
                f"{row['step'] / first['step']:.2f}x",
            ]
        )
    print(
        format_table(
            ["rank", "sequences", "attention", "mlp", "lm head", "step", "vs 1st"],
            table,
            text_columns=0,
        )
    )
    if args.world_size > 1:
        for batch in args.batches:
            at_batch = [r for r in rows if r["batch"] == batch]
            slowest = max(r["attention"] for r in at_batch)
            fastest = min(r["attention"] for r in at_batch)
            print(
                f"{batch} sequence(s): the rank with least attention work waits "
                f"{slowest - fastest:.1f} ms per step after attention "
                f"({(slowest - fastest) / max(r['step'] for r in at_batch):.0%} "
                f"of the slowest rank's step)"
            )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--batches", type=positive_ints, default="1,2,4,8,16")
    parser.add_argument("--context", type=int, default=80)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--model", help="model path (default: the default model)")
    parser.add_argument(
        "--dequantize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="expand quantized weights (default: as tpnet does on this machine)",
    )
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.world_size < 1 or args.context < 1 or args.steps < 1:
        parser.error("--world-size, --context and --steps must be at least 1")
    if args.dequantize is None:
        args.dequantize = dequantize_by_default()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shards, rows = [], []
    for rank in range(args.world_size):
        shard, rank_rows = measure_rank(args, rank)
        shards.append(shard)
        rows.extend(rank_rows)
    report(args, shards, rows)
    if args.json:
        write_json(args.json, {"shards": shards, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
