"""Smoke tests for the benchmark scripts: each runs to the end by itself,
exits 0 and prints its table. No speed is asserted; the numbers depend on
the machine and its load.

The scripts start their own processes on loopback (ranks, a tpnet cluster)
and stop them; the tests only bound how long they may take.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from _common import format_table, percentile  # noqa: E402

# Generous bounds for a loaded 2-core machine: the quick latency run takes
# seconds, the load run starts a 2-rank cluster (model load) first.
LATENCY_TIMEOUT_S = 240
LOAD_TIMEOUT_S = 420
# Loads the default model once per rank, in-process.
BATCH_STEP_TIMEOUT_S = 300


def run_script(args: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=BENCHMARKS.parent,
    )


def test_percentile_interpolates_between_ranks() -> None:
    samples = [4.0, 1.0, 3.0, 2.0]

    p50, p90 = percentile(samples, 50), percentile(samples, 90)

    assert p50 == pytest.approx(2.5)
    assert p90 == pytest.approx(3.7)


def test_format_table_aligns_text_left_and_numbers_right() -> None:
    table = format_table(["name", "us"], [["a", "1.0"], ["long", "10.5"]])

    assert table.splitlines() == ["name    us", "a      1.0", "long  10.5"]


def test_latency_quick_run_prints_the_table_and_ratios(tmp_path: Path) -> None:
    out = tmp_path / "latency.json"

    result = run_script(
        ["benchmarks/latency.py", "--quick", "--json", str(out)], LATENCY_TIMEOUT_S
    )

    assert result.returncode == 0, result.stderr[-3000:]
    assert "payload  operation" in result.stdout
    assert "tpnet all_sum 2 ranks / floor" in result.stdout
    assert "x" in result.stdout.split("tpnet all_sum 2 ranks / floor", 1)[1]
    summary = json.loads(out.read_text())
    spread = summary["results"]["spread"]
    assert {"raw", "frame", "tpnet2", "tpnet3"} <= set(spread)
    # The MLX ring columns are there, or the reason they are not is printed.
    for key in ("ring2", "ring3"):
        assert key in spread or f"skipped {key}:" in result.stdout


def test_load_run_against_its_own_cluster_prints_tokens_per_second(
    tmp_path: Path,
) -> None:
    out = tmp_path / "load.json"

    result = run_script(
        [
            "benchmarks/load.py",
            "--start-cluster",
            "--clients",
            "1,2",
            "--seconds",
            "3",
            "--warmup",
            "1",
            "--max-tokens",
            "8",
            "--json",
            str(out),
        ],
        LOAD_TIMEOUT_S,
    )

    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "tok/s" in result.stdout
    levels = json.loads(out.read_text())["levels"]
    assert [level["clients"] for level in levels] == [1, 2]
    assert all(level["requests"] >= 1 for level in levels)
    # Tokens arrived inside each level's steady window (1 s to 3 s) and the
    # whole-level count includes at least those.
    for level in levels:
        assert level["tokens_per_s"] > 0
        assert level["whole_tokens_per_s"] * level["wall_s"] >= (
            level["tokens_per_s"] * level["window_s"] - 1e-6
        )


def test_batch_step_run_prints_each_ranks_step_and_the_wait(tmp_path: Path) -> None:
    out = tmp_path / "batch.json"

    result = run_script(
        [
            "benchmarks/batch_step.py",
            "--batches",
            "1,3",
            "--steps",
            "1",
            "--context",
            "8",
            "--json",
            str(out),
        ],
        BATCH_STEP_TIMEOUT_S,
    )

    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "vs 1st" in result.stdout
    assert "waits" in result.stdout
    summary = json.loads(out.read_text())
    assert [(r["rank"], r["batch"]) for r in summary["rows"]] == [
        (0, 1),
        (0, 3),
        (1, 1),
        (1, 3),
    ]
    assert all(r["step"] > 0 for r in summary["rows"])
    # The two shards tile the model's query heads.
    assert (
        summary["shards"][0]["query_heads"][1] == summary["shards"][1]["query_heads"][0]
    )
