"""benchmarks/speed.py runs end to end on a tiny random-weight model: every
fast row starts, answers, and lands in the table with its ratio columns.
No speed is asserted; this machine's load decides those."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tinymodel import build_tiny_model

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "speed.py"
FAST_ROWS = "stock,same,ws1,ws2,spec-repeat,spec-chat"
# The script bounds each of its own waits; this bounds the whole run.
RUN_TIMEOUT_S = 240


def test_quick_run_prints_the_table_with_ratio_columns(tmp_path: Path) -> None:
    model = build_tiny_model(tmp_path / "model")
    report = tmp_path / "speed.json"

    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--model",
            model,
            "--rows",
            FAST_ROWS,
            "--json",
            str(report),
            "--png",
            "",
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )

    assert done.returncode == 0, done.stdout + done.stderr
    header = next(line for line in done.stdout.splitlines() if line.startswith("row "))
    for column in ("decode tok/s", "prompt tok/s", "TTFT s", "AR/token"):
        assert column in header
    assert "x stock" in header and "x same" in header
    rows = {row["key"]: row for row in json.loads(report.read_text())["rows"]}
    assert list(rows) == FAST_ROWS.split(",")
    assert rows["same"]["vs_same"] == 1.0
    assert rows["ws2"]["rounds_per_token"] > 0
