"""Each worker serves Prometheus metrics that move with the work it does."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Callable

import pytest

from producers.commands import place_order, restock
from producers.publisher import Publisher
from stockflow.metrics import endpoints
from stockflow.settings import Settings
from stockflow.stack import LocalStack
from tests.pipeline import wait_for

pytestmark = pytest.mark.integration


def scrape(url: str) -> dict[str, float]:
    """Sample name with labels -> value, from the Prometheus text format."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        match = re.fullmatch(r"([a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+)", line)
        if match:
            samples[match.group(1)] = float(match.group(2))
    return samples


def total(samples: dict[str, float], name: str) -> float:
    return sum(value for key, value in samples.items() if key == name or key.startswith(name + "{"))


def test_workers_count_decisions_projections_and_latency(
    settings: Settings, stack: LocalStack, unique: Callable[[str], str]
) -> None:
    def by_kind() -> dict[str, str] | None:
        urls = {name.split("-")[0]: url for name, url in endpoints(settings).items()}
        return urls if {"processor", "projection"} <= set(urls) else None

    urls = wait_for("both workers' metrics endpoints", by_kind, 60)
    processor, projection = urls["processor"], urls["projection"]
    before_decided = total(scrape(processor), "stockflow_commands_decided_total")
    before_projection = scrape(projection)
    before_projected = total(before_projection, "stockflow_events_projected_total")
    before_visible = before_projection.get("stockflow_command_visible_seconds_count", 0)

    sku = unique("METRICS")
    publisher = Publisher(settings)
    publisher.publish(restock(sku, 5))
    for _ in range(3):
        publisher.publish(place_order(sku, 2))  # 2 processed, 1 rejected
    publisher.close()

    def moved() -> dict[str, float] | None:
        samples = scrape(processor)
        return samples if total(samples, "stockflow_commands_decided_total") >= before_decided + 4 else None

    decided = wait_for("the processor's counters", moved, 60)
    assert decided['stockflow_commands_decided_total{outcome="OrderRejected"}'] >= 1
    assert decided["stockflow_command_decided_seconds_count"] >= 4
    assert any(key.startswith("stockflow_consumer_lag{") for key in decided)
    assert total(decided, "stockflow_order_lines") >= 2  # held for cancels
    wait_for(
        "the projection's counters",
        lambda: total(scrape(projection), "stockflow_events_projected_total") >= before_projected + 4,
        60,
    )
    # One latency sample per event message: the four events may share one batch frame (they do
    # when the processor starts after they were published).
    assert scrape(projection)["stockflow_command_visible_seconds_count"] >= before_visible + 1
