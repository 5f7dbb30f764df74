"""The processor restores its table from the changelog itself, on the real broker."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import NewTopic  # type: ignore[attr-defined]

from producers.commands import cancel_order, place_order, restock
from producers.publisher import Publisher
from schemas.records import Event, OrderCancelled, OrderProcessed, OrderRejected, StockReplenished
from stockflow.logreader import read_latest
from stockflow.settings import Settings
from stockflow.stack import LocalStack
from stockflow.topics import admin_client
from tests.pipeline import events_for, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("stack")]


def test_reading_a_changelog_gives_each_key_s_last_value_up_to_the_end(
    settings: Settings, unique: Callable[[str], str]
) -> None:
    topic = unique("changelog")
    admin = admin_client(settings)  # held: the result fails once the client is collected
    admin.create_topics([NewTopic(topic, 3, 1, config={"cleanup.policy": "compact"})])[topic].result(30)
    producer = Producer({"bootstrap.servers": settings.bootstrap_servers})
    records: list[tuple[int, bytes, bytes | None]] = [
        (0, b"a", b"1"),
        (0, b"b", b"2"),
        (0, b"a", b"3"),
        (0, b"b", None),  # a tombstone: b is deleted
        (2, b"c", b"4"),
    ]
    for partition, key, value in records:
        producer.produce(topic, value, key, partition=partition)
    assert producer.flush(30) == 0

    latest = read_latest(settings, topic, [0, 1, 2])

    assert latest[0].values == {b"a": b"3", b"b": None}
    assert (latest[0].last_offset, latest[0].records) == (3, 4)
    assert (latest[1].values, latest[1].last_offset, latest[1].records) == ({}, -1, 0)
    assert (latest[2].values, latest[2].last_offset) == ({b"c": b"4"}, 0)


def test_a_restarted_processor_goes_on_from_its_restored_table_deciding_nothing_again(
    settings: Settings, stack: LocalStack, unique: Callable[[str], str]
) -> None:
    # Every decision is a function of the state before it, so a worker that lost its table
    # would decide the partition's commands again from the start: the same events, appended
    # once more. One that restored it goes on from where the table says it was.
    sku = unique("RESTORE")
    publisher = Publisher(settings)
    publisher.publish(restock(sku, 10))
    placed = [place_order(sku, qty, order_id=unique(f"o{qty}")) for qty in (2, 3)]
    publisher.send_many(placed)
    assert publisher.flush(30) == 0
    wait_for("the orders to be decided", lambda: len(events_for(settings, sku)) == 3, 60)

    processor = stack.worker("processor", 1)
    assert processor.stop(), "the processor worker is not running"
    stack.start_workers("processor", 1)
    publisher.publish(place_order(sku, 6, order_id=unique("too-many")))  # 5 left: rejected
    publisher.publish(cancel_order(sku, placed[0].order_id))

    def decided() -> list[Event] | None:
        events = events_for(settings, sku)
        return events if len(events) >= 5 else None

    events = wait_for("the new commands to be decided", decided, 120)
    publisher.close()

    assert [type(event) for event in events] == [
        StockReplenished,
        OrderProcessed,
        OrderProcessed,
        OrderRejected,
        OrderCancelled,
    ]
    assert (events[3].available_after, events[4].available_after) == (5, 7)
    assert max(Counter(event.event_id for event in events).values()) == 1
