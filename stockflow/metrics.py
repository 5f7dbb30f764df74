"""Prometheus metrics of a worker, served over HTTP on a port of its own.

Each worker process serves ``/metrics`` on ``STOCKFLOW_METRICS_PORT`` (0, the default, takes a
free port, so many workers can share a machine) and records the address under
``<run_dir>/metrics/`` for ``stockflow status``; the log says it too.
"""

from __future__ import annotations

import atexit
import os
import socket
import urllib.request
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from stockflow.settings import Settings

# Command created -> decided / visible, in seconds: from a few ms to a backlog of minutes.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

COMMANDS_DECIDED = Counter(
    "stockflow_commands_decided_total",
    "Commands decided by the processor, by the event they caused",
    ["outcome"],
)
COMMAND_RETRIES = Counter(
    "stockflow_command_retries_total", "Commands recognised as a retry of one already decided"
)
SAVES_REFUSED = Counter(
    "stockflow_processor_saves_refused_total",
    "Batches a processor decided but did not save: the group had given their partitions to"
    " another worker (or was rebalancing) by the time their events were in the log",
)
DEAD_LETTERS = Counter("stockflow_dead_letters_total", "Messages parked in a dead-letter topic", ["type"])
DECIDED_LATENCY = Histogram(
    "stockflow_command_decided_seconds",
    "Command created -> decided by the processor (one sample per message: a frame counts once)",
    buckets=LATENCY_BUCKETS,
)
EVENTS_PROJECTED = Counter("stockflow_events_projected_total", "Events applied to the Redis read models")
VISIBLE_LATENCY = Histogram(
    "stockflow_command_visible_seconds",
    "Command created -> its event visible in Redis (one sample per message: a frame counts once)",
    buckets=LATENCY_BUCKETS,
)
ORDER_LINES = Gauge(
    "stockflow_order_lines",
    "Order lines a processor worker holds for cancels, about 256 bytes each (STOCKFLOW_CANCEL_WINDOW_S)",
    ["partition"],
)
PAUSED_PARTITIONS = Gauge(
    "stockflow_paused_partitions", "Partitions a projection worker stopped fetching while Redis is behind"
)
REDIS_UNREACHABLE = Gauge(
    "stockflow_redis_unreachable",
    "1 while a projection worker cannot reach Redis, or Redis takes no writes (full, a replica;"
    " its log says which), else 0",
)
CONSUMER_LAG = Gauge(
    "stockflow_consumer_lag",
    "Messages in the partition this worker has not handled yet",
    ["group", "partition"],
)


def serve(settings: Settings, kind: str) -> str:
    """Start the HTTP endpoint in a background thread; returns its URL."""
    server, _thread = start_http_server(settings.metrics_port, addr=settings.metrics_host)
    url = f"http://{settings.metrics_host}:{server.server_port}/metrics"
    folder = settings.run_dir / "metrics"
    folder.mkdir(parents=True, exist_ok=True)
    record = folder / f"{kind}-{socket.gethostname()}-{os.getpid()}.url"
    # Written aside, then renamed into place: readers (the bench, twenty times a second) found
    # the record created but still empty, and failed on the URL ''.
    partial = record.with_suffix(".partial")
    partial.write_text(url + "\n")
    partial.replace(record)
    atexit.register(record.unlink, missing_ok=True)
    return url


def counter_total(settings: Settings, name: str, kind: str) -> float:
    """A counter summed over the workers of one kind on this machine, e.g. commands decided by
    every processor. Only that kind is scraped: a scrape costs a worker a millisecond or more of
    its CPU, and the bench asks twenty times a second."""
    total = 0.0
    for worker, url in endpoints(settings).items():
        if not worker.startswith(f"{kind}-"):
            continue
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                text = response.read().decode()
        except OSError:
            continue  # a worker that exited since endpoints() looked
        for family in text_string_to_metric_families(text):
            total += sum(s.value for s in family.samples if s.name == f"{name}_total")
    return total


def endpoints(settings: Settings) -> dict[str, str]:
    """Worker name -> metrics URL, for the workers on this machine that are still running."""
    folder = settings.run_dir / "metrics"
    found = {}
    for record in sorted(folder.glob("*.url")) if folder.exists() else []:
        pid = record.stem.rsplit("-", 1)[-1]
        if pid.isdigit() and Path(f"/proc/{pid}").exists():
            found[record.stem] = record.read_text().strip()
    return found
