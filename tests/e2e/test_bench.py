"""`stockflow bench` end to end at a tiny size: every figure is measured and written out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from projections.rebuild import database_url
from stockflow.bench import clear_away, workload_prefix, workload_settings
from stockflow.settings import Settings
from stockflow.topics import admin_client, ensure_topics, topic_configs
from tests.pipeline import wait_for

pytestmark = pytest.mark.e2e

DATABASE = 14  # the live read models are in database 0

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
    bench = subprocess.Popen(
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
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=os.environ | {"COLUMNS": "200"},
    )
    try:
        output, _ = bench.communicate(timeout=600)
    finally:
        if bench.poll() is None:  # timed out or interrupted: SIGTERM lets it stop what it started
            bench.terminate()
            bench.wait(120)
    assert bench.returncode == 0, output[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["machine"]["reference_cpu_us_per_order"]) == {"start", "end"}
    assert all(us > 0 for us in results["machine"]["reference_cpu_us_per_order"].values())
    hot = results["workloads"]["hot"]
    for key in REQUIRED:
        assert hot[key] > 0, key
    assert set(hot["latency_ms_at_half_load"]) == {"p50", "p99", "p999"}
    # CPU per command of every part, from /proc; Redis and the broker may use less than a tick.
    cpu = hot["e2e_cpu_us_per_command"]
    assert set(cpu) == {"processor", "projection", "broker", "redis", "publisher"}, cpu
    assert cpu["processor"] > 0 and cpu["projection"] > 0 and cpu["publisher"] > 0, cpu
    # Each event is decided before it is visible, so the decided percentiles are never higher.
    for point in hot["latency"]:
        assert 0 <= point["decided_p50"] <= point["p50"], point
        assert point["decided_p99"] <= point["p99"], point
        # What each offered rate cost, part by part, and the cores they kept busy (of 2 here).
        assert set(point["cpu_us_per_command"]) == set(cpu), point
        assert point["cpu_us_per_command"]["processor"] > 0, point
        assert 0 < point["cores_busy"] <= (os.cpu_count() or 1) * 1.05, point
    assert "end to end / pgbench" in (out / "REPORT.md").read_text()
    assert all((out / name).stat().st_size > 0 for name in ("throughput.png", "latency.png", "lag.png"))


@pytest.mark.usefixtures("stack")
def test_a_workload_cleared_away_leaves_no_topic_or_read_model_and_spares_the_others(
    settings: Settings, unique: Callable[[str], str]
) -> None:
    run = unique("run")
    first, second = (
        # The session's Redis, wherever it runs (the bench's is always the local stack's)
        workload_settings(settings, run, name, DATABASE).model_copy(
            update={"redis_url": database_url(settings.redis_url, DATABASE)}
        )
        for name in ("uniform", "hot")
    )
    ensure_topics(first)
    ensure_topics(second)
    client = redis.Redis.from_url(first.redis_url)
    client.set("left-by-the-workload", 1)

    clear_away(first, workload_prefix(run, "uniform"))

    topics = admin_client(settings).list_topics(timeout=30).topics
    assert not [name for name in topics if name.startswith(workload_prefix(run, "uniform"))]
    assert set(topic_configs(second)) <= set(topics)  # "hot" is not a prefix of it, nor it of "hot"
    wait_for("the workload's database to be emptied", lambda: client.dbsize() == 0, 10)
