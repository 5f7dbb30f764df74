"""The cancel window: a processor of its own, on topics of its own, with a window of seconds."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import pytest

from producers.commands import cancel_order, place_order, restock
from producers.publisher import Publisher
from schemas.records import Event, OrderCancelled, OrderProcessed, OrderRejected
from stockflow.partitioning import partition_for
from stockflow.settings import Settings
from stockflow.stack import LocalStack
from stockflow.topics import changelog_topic, ensure_topics
from tests.pipeline import events_for, read_topic, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("stack")]

WINDOW_S = 2.0
# Lines are forgotten once the window and the clock slack (the window, when shorter than a
# minute) have passed since they were placed, at the partition's next batch.
FORGOTTEN_AFTER_S = 2 * WINDOW_S


@pytest.fixture
def windowed(
    settings: Settings, unique: Callable[[str], str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    """A processor worker with a 2 s cancel window on fresh topics and group; stopped at the end."""
    mine = settings.model_copy(
        update={
            "commands_topic": unique("commands"),
            "events_topic": unique("events"),
            "dlq_topic": unique("dlq"),
            "processor_group": unique("processor"),
            "cancel_window_s": WINDOW_S,
            "run_dir": tmp_path_factory.mktemp("windowed"),
        }
    )
    ensure_topics(mine)
    workers = LocalStack(mine, say=lambda _msg: None)
    try:
        workers.start_workers("processor", 1)
        yield workers
    finally:
        workers.worker("processor", 1).stop()


def decided(settings: Settings, sku: str, count: int) -> list[Event]:
    def enough() -> list[Event] | None:
        events = events_for(settings, sku)
        return events if len(events) >= count else None

    return wait_for(f"{count} decisions on {sku}", enough, 90)


def test_an_order_is_cancellable_within_the_window_then_forgotten(
    windowed: LocalStack, unique: Callable[[str], str]
) -> None:
    settings = windowed.settings
    publisher = Publisher(settings)
    sku = unique("SKU")
    first, second = place_order(sku, 2), place_order(sku, 3)
    for command in (restock(sku, 10), first, second, cancel_order(sku, first.order_id)):
        publisher.publish(command)
    placed_at = time.monotonic()
    events = decided(settings, sku, 4)
    assert [type(e) for e in events] == [type(events[0]), OrderProcessed, OrderProcessed, OrderCancelled]
    assert events[3].available_after == 7  # 10 - 2 - 3, then the 2 back

    time.sleep(max(0.0, placed_at + WINDOW_S + 0.5 - time.monotonic()))
    publisher.publish(cancel_order(sku, second.order_id))  # appended after the window
    [late] = decided(settings, sku, 5)[4:]
    assert isinstance(late, OrderRejected), late
    assert "cancel window" in late.reason and late.available_after == 7

    # Past the window and the slack, the partition's next batch deletes the order-line records.
    time.sleep(max(0.0, placed_at + FORGOTTEN_AFTER_S + 0.5 - time.monotonic()))
    publisher.publish(restock(sku, 1))
    decided(settings, sku, 6)
    partition = partition_for(sku.encode(), settings.partitions)
    prefix = f"l:{partition}:"

    def forgotten() -> dict[str, bool] | None:
        written: dict[str, bool] = {}  # l: key -> deleted
        for record in read_topic(settings, changelog_topic(settings, "state")):
            key = json.loads(record.key or b'""')
            if key.startswith(prefix):
                written[key] = not record.value
        return written if written and all(written.values()) else None

    wait_for("every order-line record of the partition to be deleted", forgotten, 30)

    # A restarted worker restores the table without them, and still decides as before.
    windowed.worker("processor", 1).stop()
    windowed.start_workers("processor", 1)
    third = place_order(sku, 4)
    for command in (cancel_order(sku, second.order_id), third, cancel_order(sku, third.order_id)):
        publisher.publish(command)
    again, placed, cancelled = decided(settings, sku, 9)[6:]
    assert isinstance(again, OrderRejected) and "cancel window" in again.reason
    assert isinstance(placed, OrderProcessed) and isinstance(cancelled, OrderCancelled)
    assert cancelled.available_after == 8
