"""The benchmark report: its ratios come from the measured figures, not from the page."""

from __future__ import annotations

from typing import Any

from stockflow.bench import reference_cpu_us, reference_work, report_markdown


def workload(e2e: float, pgbench: float) -> dict[str, Any]:
    return {
        "workload": {"skus": 1000, "hot_skus": 10},
        "raw_kafka_msgs_per_s": 100_000.0,
        "ingest_commands_per_s": 40_000.0,
        "backlog_commands_per_s": 5_000.0,
        "e2e_commands_per_s": e2e,
        "e2e_cpu_us_per_command": {"processor": 20.0, "projection": 10.5, "publisher": 12.0},
        "latency": [
            {
                "fraction": 0.5,
                "offered_per_s": e2e / 2,
                "p50": 20,
                "p99": 70,
                "p999": 90,
                "decided_p50": 12,
                "decided_p99": 40,
                "cpu_us_per_command": {"processor": 50.0, "projection": 30.0, "publisher": 20.0},
                "cores_busy": 0.6,
            }
        ],
        "latency_ms_at_half_load": {"p50": 20, "p99": 70, "p999": 90},
        "replay_events_per_s": 30_000.0,
        "crud_pgbench_tps": pgbench,
        "crud_python_tps": 3_000.0,
    }


def test_the_report_states_each_ratio_and_both_sides_durability() -> None:
    results = {
        "machine": {
            "cpus": 2,
            "python": "3.11",
            "kafka": "4.1.1",
            "reference_cpu_us_per_order": {"start": 20.0, "end": 30.0},
        },
        "settings": {"partitions": 12, "replay_workers": 2},
        "durability": {"pipeline": "acks=all", "crud": "fsync=on"},
        "workloads": {"hot": workload(e2e=6_000.0, pgbench=4_000.0)},
    }
    report = report_markdown(results)
    assert "| **end to end / pgbench** | **1.50x** | 5x |" in report
    assert "| end to end / Python service | 2.00x | |" in report
    assert (
        "| offered load | offered/s | p50 ms | p99 ms | p99.9 ms | decided p50 / p99 ms"
        " | CPU per command, us: processor / projection / publisher (total) | cores busy |" in report
    )
    assert "| 50% | 3,000 | 20 | 70 | 90 | 12 / 40 | 50.0 / 30.0 / 20.0 (total 100.0) | 0.60 |" in report
    assert (
        "| end to end, CPU per command, us: processor / projection / publisher"
        " | 20.0 / 10.5 / 12.0 (total 42.5) | |" in report
    )
    assert "| replay into an empty read model (2 processes), events/s | 30,000 | 200,000 |" in report
    assert "Reference work, us of CPU per order at the start / end of the run: 20.0 / 30.0." in report
    assert "- Pipeline: acks=all." in report and "- CRUD: fsync=on." in report


def test_the_reference_work_decides_and_round_trips_every_order() -> None:
    assert reference_work(orders=50) == 50  # one event per order, decoded back
    assert reference_cpu_us(rounds=1) > 0
