"""The processor restores its table from the changelog itself, on the real broker."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import NewTopic  # type: ignore[attr-defined]

from producers.commands import cancel_order, place_order, restock
from producers.publisher import Publisher
from schemas.records import Event, OrderCancelled, OrderProcessed, OrderRejected, StockReplenished
from stockflow.logreader import read_latest
from stockflow.partitioning import partition_for
from stockflow.settings import Settings
from stockflow.stack import LocalStack
from stockflow.topics import PROCESSOR_TABLES, admin_client, changelog_topic, ensure_topics
from tests.pipeline import events_for, own_settings, wait_for

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


WINDOW = 30  # the retry window of the processor below, in commands


@pytest.fixture
def small_window(
    settings: Settings, unique: Callable[[str], str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    """A processor with a retry window of 30 commands, on topics and a group of its own."""
    with own_processor(
        settings, unique, tmp_path_factory.mktemp("small-window"), dedupe_window=WINDOW
    ) as workers:
        yield workers


@contextmanager
def own_processor(
    settings: Settings, unique: Callable[[str], str], run_dir: Path, **update: Any
) -> Iterator[LocalStack]:
    """A processor worker on topics and a group of its own, with ``update`` to its settings."""
    mine = own_settings(settings, unique, run_dir, **update)
    ensure_topics(mine)
    workers = LocalStack(mine, say=lambda _msg: None)
    try:
        workers.start_workers("processor", 1)
        yield workers
    finally:
        workers.worker("processor", 1).stop()


def decisions(settings: Settings, sku: str, count: int) -> Callable[[], list[Event] | None]:
    def probe() -> list[Event] | None:
        events = events_for(settings, sku)
        return events if len(events) == count else None

    return probe


def test_a_restarted_processor_finds_its_retry_window_in_its_table(
    small_window: LocalStack, unique: Callable[[str], str]
) -> None:
    settings = small_window.settings
    sku = unique("WINDOW")
    partition = partition_for(sku.encode(), settings.partitions)
    publisher = Publisher(settings)
    publisher.publish(restock(sku, 1000))
    orders = [place_order(sku, 1, order_id=unique(f"o{i}")) for i in range(50)]
    for start in range(0, len(orders), 7):  # one batch at a time: an r: record each
        publisher.send_many(orders[start : start + 7])
        assert publisher.flush(30) == 0
        wait_for("the batch to be decided", decisions(settings, sku, 1 + len(orders[: start + 7])), 90)

    # The changelog keeps the newest records that hold a window's ids, and no older one.
    changelog = changelog_topic(settings, PROCESSOR_TABLES[0])
    latest = read_latest(settings, changelog, [partition])[partition]
    prefix = f'"r:{partition}:'.encode()
    records = sorted(
        (int(key[len(prefix) : -1]), json.loads(value))
        for key, value in latest.values.items()
        if key.startswith(prefix) and value is not None
    )
    held = sum(len(ids) for _n, (_first, _last, ids) in records)
    assert held >= WINDOW and held - len(records[0][1][2]) < WINDOW

    processor = small_window.worker("processor", 1)
    assert processor.stop()
    # What a worker that crashed after a batch's r: record but before its handled offset leaves:
    # a record past the offset, here holding the id of a command not yet sent. It must count
    # for nothing, and be deleted.
    after = place_order(sku, 1, order_id=unique("after"))
    saved = read_latest(settings, changelog, [partition])[partition].values[f'"p:{partition}"'.encode()]
    assert saved is not None
    handled = json.loads(saved)
    stale_key = f'"r:{partition}:1000"'.encode()
    raw = Producer({"bootstrap.servers": settings.bootstrap_servers})
    raw.produce(
        changelog, json.dumps([handled + 1, handled + 1, [after.command_id]]), stale_key, partition=partition
    )
    assert raw.flush(30) == 0
    small_window.start_workers("processor", 1)
    for order in orders[-10:]:
        publisher.publish(order)  # retries of commands inside the window: no new decision
    publisher.publish(after)
    publisher.close()

    def after_decided() -> list[Event] | None:
        events = events_for(settings, sku)
        return events if any(event.command_id == after.command_id for event in events) else None

    # The retries were appended before it, on its partition: decided, they would be in the log.
    assert len(wait_for("the order after the retries to be decided", after_decided, 90)) == 52
    resumed = [
        line
        for line in processor.log_file.read_text().splitlines()
        if f"partition {partition}: resum" in line
    ]
    assert f"with {WINDOW} recent command ids (0 read from the log)" in resumed[-1]
    assert read_latest(settings, changelog, [partition])[partition].values[stale_key] is None


STALL_S = 8  # the stall timeout of the processor below


def test_a_restarted_processor_with_nothing_to_decide_is_not_taken_for_stalled(
    settings: Settings, unique: Callable[[str], str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    # The watchdog restarts a worker whose stream stops delivering while commands wait. A
    # worker restarted after every command was decided gets nothing from its stream, and once
    # counted every command of the topic as waiting (its batches had not yet reached any
    # partition): it restarted itself after each stall timeout, for as long as it was quiet.
    run_dir = tmp_path_factory.mktemp("quiet")
    with own_processor(settings, unique, run_dir, processor_stall_timeout_s=STALL_S) as workers:
        mine = workers.settings
        sku = unique("QUIET")
        with closing(Publisher(mine)) as publisher:
            publisher.publish(restock(sku, 10))
            wait_for("the restock to be decided", decisions(mine, sku, 1), 90)
            processor = workers.worker("processor", 1)
            assert processor.stop()
            workers.start_workers("processor", 1)
            wait_for(
                "the restarted worker to restore its table",
                lambda: processor.log_file.read_text().count("restored ") >= 2,
                90,
            )
            time.sleep(3 * STALL_S)  # quiet for three stall timeouts; the watchdog looks every 5 s

            log = processor.log_file.read_text()
            assert "the stream stopped delivering" not in log, log[-3000:]
            publisher.publish(place_order(sku, 4, order_id=unique("after")))  # and it still decides
            wait_for("the order to be decided", decisions(mine, sku, 2), 90)
