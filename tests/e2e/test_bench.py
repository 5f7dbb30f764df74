"""`stockflow bench` end to end at a tiny size: every figure is measured and written out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REQUIRED = (
    "e2e_commands_per_s",
    "ingest_commands_per_s",
    "raw_kafka_msgs_per_s",
    "crud_pgbench_tps",
    "crud_python_tps",
    "replay_events_per_s",
)


def test_bench_writes_every_figure_for_the_workload(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "stockflow",
            "bench",
            "--orders",
            "3000",
            "--latency-seconds",
            "1",
            "--crud-seconds",
            "2",
            "--workload",
            "hot",
            "--out",
            str(out),
            "--json",
            str(tmp_path / "results.json"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=os.environ | {"COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    hot = json.loads((tmp_path / "results.json").read_text())["workloads"]["hot"]
    for key in REQUIRED:
        assert hot[key] > 0, key
    assert set(hot["latency_ms_at_half_load"]) == {"p50", "p99", "p999"}
    assert "end to end / pgbench" in (out / "REPORT.md").read_text()
    assert all((out / name).stat().st_size > 0 for name in ("throughput.png", "latency.png", "lag.png"))
