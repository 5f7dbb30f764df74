"""The cancel window: a processor of its own, on topics of its own, with a window of seconds."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator

import pytest
import redis

from producers.commands import cancel_order, place_order, restock
from producers.publisher import Publisher
from projections.rebuild import database_url
from schemas.records import Event, OrderCancelled, OrderProcessed, OrderRejected, PlaceOrder
from stockflow.partitioning import partition_for
from stockflow.settings import Settings
from stockflow.stack import LocalStack
from stockflow.topics import changelog_topic, ensure_topics
from tests.integration.test_faults import kill_and_restart, quiet_verify
from tests.pipeline import events_for, own_settings, read_events, read_topic, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("stack")]

WINDOW_S = 2.0
# Lines are forgotten once the window and the clock slack (the window, when shorter than a
# minute) have passed since they were placed, at the partition's next batch.
FORGOTTEN_AFTER_S = 2 * WINDOW_S
DATABASE = 12  # read models of their own: the live ones are in database 0


@pytest.fixture
def windowed(
    settings: Settings, unique: Callable[[str], str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    """A processor with a 2 s cancel window and a projection, on topics, groups and a Redis
    database of their own; stopped at the end."""
    mine = own_settings(
        settings,
        unique,
        tmp_path_factory.mktemp("windowed"),
        redis_url=database_url(settings.redis_url, DATABASE),
        cancel_window_s=WINDOW_S,
    )
    ensure_topics(mine)
    workers = LocalStack(mine, say=lambda _msg: None)
    try:
        workers.start_workers("processor", 1)
        workers.start_workers("projection", 1)
        yield workers
    finally:
        for kind in ("processor", "projection"):
            workers.worker(kind, 1).stop()
        redis.Redis.from_url(mine.redis_url).flushdb()


@pytest.fixture
def publisher(windowed: LocalStack) -> Iterator[Publisher]:
    publisher = Publisher(windowed.settings)
    yield publisher
    publisher.close()


def decided(settings: Settings, sku: str, count: int) -> list[Event]:
    def enough() -> list[Event] | None:
        events = events_for(settings, sku)
        return events if len(events) >= count else None

    return wait_for(f"{count} decisions on {sku}", enough, 90)


def test_an_order_is_cancellable_within_the_window_then_forgotten(
    windowed: LocalStack, publisher: Publisher, unique: Callable[[str], str]
) -> None:
    settings = windowed.settings
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


def outcome(event: Event) -> tuple[str, int, int, int, str]:
    """What a decision decided, leaving out when it was made."""
    return type(event).__name__, event.version, event.available_after, event.qty, getattr(event, "reason", "")


def test_cancels_around_the_window_are_decided_the_same_after_a_crash_and_from_scratch(
    windowed: LocalStack,
    publisher: Publisher,
    unique: Callable[[str], str],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Orders, and cancels of orders placed up to twice the window before, for 12 s; the
    processor is SIGKILLed after 5 s and started again. Its successor decides again what the
    dead one had not saved: any cancel decided otherwise the second time is a double decision
    or a table mismatch to verify. Then a second processor decides the same commands from scratch, long
    after every window has passed by the clock: it must decide exactly the same."""
    settings = windowed.settings
    skus = [unique(f"SKU{i}") for i in range(20)]
    for sku in skus:
        publisher.send(restock(sku, 1_000_000))
    rng = random.Random(11)
    placed: list[tuple[float, PlaceOrder]] = []
    started = time.monotonic()
    killed = False
    while (now := time.monotonic()) < started + 12:
        for _ in range(25):  # about 250 commands/s
            recent = [order for at, order in placed[-600:] if at >= now - 2 * WINDOW_S]
            if recent and rng.random() < 0.4:
                order = rng.choice(recent)
                publisher.send(cancel_order(order.sku, order.order_id))
            else:
                order = place_order(rng.choice(skus), 1)
                placed.append((now, order))
                publisher.send(order)
        publisher.poll()
        if not killed and now > started + 5:
            kill_and_restart(windowed, "processor")
            killed = True
        time.sleep(0.1)
    assert publisher.flush(30) == 0

    report = quiet_verify(settings, 180)
    print(f"after the SIGKILL: {report.repeated_events} decisions made again, the same")
    assert report.problems == []
    events = read_events(settings)
    cancelled = sum(isinstance(e, OrderCancelled) for e in events)
    too_late = sum(isinstance(e, OrderRejected) and "cancel window" in e.reason for e in events)
    assert cancelled > 100 and too_late > 100, (cancelled, too_late)

    first = {event.event_id: outcome(event) for event in events}
    again = settings.model_copy(
        update={
            "events_topic": unique("events-again"),
            "dlq_topic": unique("dlq-again"),
            "processor_group": unique("processor-again"),
            "run_dir": tmp_path_factory.mktemp("again"),
        }
    )
    ensure_topics(again)
    second_processor = LocalStack(again, say=lambda _msg: None)
    try:
        second_processor.start_workers("processor", 1)

        def all_decided() -> list[Event] | None:
            events = read_events(again)
            return events if len({event.event_id for event in events}) >= len(first) else None

        second = wait_for("the second processor's decisions", all_decided, 120)
    finally:
        second_processor.worker("processor", 1).stop()
    assert {event.event_id: outcome(event) for event in second} == first
