"""Publish -> decide -> event log -> Redis, on the real broker and Redis the session starts."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence

import pytest
import redis
from confluent_kafka import Producer

from producers.commands import cancel_order, place_order, restock
from producers.load import LoadProfile, run_load
from producers.publisher import DeliveryCallback, PartitionCountMismatch, Publisher
from projections.queries import ReadModels
from schemas.codec import codec
from schemas.records import (
    Command,
    OrderCancelled,
    OrderProcessed,
    OrderRejected,
    PlaceOrder,
    StockReplenished,
)
from stockflow.partitioning import partition_for
from stockflow.settings import Settings
from stockflow.stack import LocalStack
from stockflow.topics import PROCESSOR_TABLES, changelog_topic
from tests.pipeline import events_for, read_events, read_topic, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("stack")]


@pytest.fixture
def publisher(settings: Settings, stack: LocalStack) -> Iterator[Publisher]:
    publisher = Publisher(settings)
    yield publisher
    publisher.close()


@pytest.fixture
def models(redis_client: redis.Redis) -> ReadModels:
    return ReadModels(redis_client)


def test_an_order_becomes_an_event_and_a_read_model(
    settings: Settings, publisher: Publisher, models: ReadModels, unique: Callable[[str], str]
) -> None:
    sku = unique("SKU")
    publisher.publish(restock(sku, 10))
    order = place_order(sku, 3, order_id=unique("order"))
    publisher.publish(order)

    row = wait_for("the order in the read model", lambda: (models.stock(sku) or {}).get("processed"))
    assert row == 1
    stock = models.stock(sku)
    assert stock is not None
    assert (stock["available"], stock["version"], stock["units_sold"]) == (7, 2, 3)
    assert stock["recent_orders"] == [order.order_id]
    line = models.order(order.order_id)[sku]
    assert (line["status"], line["qty"], line["version"]) == ("processed", 3, 2)

    events = events_for(settings, sku)
    assert [type(e) for e in events] == [StockReplenished, OrderProcessed]
    assert events[1].command_id == order.command_id
    assert events[1].available_after == 7


def test_an_order_larger_than_the_stock_is_rejected_and_changes_nothing(
    settings: Settings, publisher: Publisher, models: ReadModels, unique: Callable[[str], str]
) -> None:
    sku = unique("SKU")
    publisher.publish(restock(sku, 2))
    order = place_order(sku, 5)
    publisher.publish(order)

    wait_for("the rejection in the read model", lambda: (models.stock(sku) or {}).get("rejected"))
    stock = models.stock(sku)
    assert stock is not None
    assert (stock["available"], stock["units_sold"], stock["processed"]) == (2, 0, 0)
    line = models.order(order.order_id)[sku]
    assert line["status"] == "rejected"
    assert "insufficient stock: 5 requested, 2 available" in line["reason"]
    rejected = [e for e in events_for(settings, sku) if isinstance(e, OrderRejected)]
    assert [e.command_id for e in rejected] == [order.command_id]


def test_a_command_sent_twice_is_decided_once(
    settings: Settings, publisher: Publisher, models: ReadModels, unique: Callable[[str], str]
) -> None:
    sku = unique("SKU")
    publisher.publish(restock(sku, 10))
    order = place_order(sku, 4)
    publisher.publish(order)
    publisher.publish(order)  # a retry with the same command id
    publisher.publish(order)
    last = restock(sku, 1)  # same SKU, same partition: decided after the repeats
    publisher.publish(last)

    wait_for("the last restock", lambda: (models.stock(sku) or {}).get("version") == 3)
    events = events_for(settings, sku)
    assert [e.command_id for e in events].count(order.command_id) == 1
    assert [e.version for e in events] == [1, 2, 3]
    stock = models.stock(sku)
    assert stock is not None
    assert stock["available"] == 10 - 4 + 1


def test_an_order_line_is_found_on_its_own_sku_whatever_the_ids_hold(
    settings: Settings, publisher: Publisher, models: ReadModels, unique: Callable[[str], str]
) -> None:
    """SKU "K" with order "RED/o" and SKU "K/RED" with order "o", on one partition: the
    processor keeps a partition's order lines by SKU and order id, and must not take one line
    for the other (it once did, and a cancel of an order never placed on K/RED released the
    units of K's order there)."""
    sku = next(
        name
        for name in (unique(f"SKU{i}") for i in range(1000))
        if partition_for(name.encode(), settings.partitions)
        == partition_for(f"{name}/RED".encode(), settings.partitions)
    )
    slashed, order_id = f"{sku}/RED", unique("order")
    # Decided in batches before the commands below, the order's line saved before the slashed
    # SKU's row: a line saved after its SKU's row is taken for a crash's leftover, and ignored.
    first: list[Command] = [
        restock(sku, 10),
        place_order(sku, 3, order_id=f"RED/{order_id}"),
        restock(slashed, 10),
    ]
    for command in first:
        publisher.publish(command)
    wait_for("the first restocks and order", lambda: (models.stock(slashed) or {}).get("version") == 1)
    later: list[Command] = [
        cancel_order(slashed, order_id),  # never placed on the slashed SKU: refused
        place_order(slashed, 2, order_id=order_id),  # a new order there, not a repeat
        cancel_order(sku, f"RED/{order_id}"),
    ]
    for command in later:
        publisher.publish(command)

    wait_for("the last cancel", lambda: (models.stock(sku) or {}).get("version") == 3)
    wait_for("the slashed SKU's order", lambda: (models.stock(slashed) or {}).get("version") == 3)
    assert [(type(e), e.available_after) for e in events_for(settings, slashed)] == [
        (StockReplenished, 10),
        (OrderRejected, 10),
        (OrderProcessed, 8),
    ]
    assert [(type(e), e.available_after) for e in events_for(settings, sku)] == [
        (StockReplenished, 10),
        (OrderProcessed, 7),
        (OrderCancelled, 10),
    ]
    refused = events_for(settings, slashed)[1]
    assert isinstance(refused, OrderRejected) and "was never processed for this SKU" in refused.reason


def test_orders_with_the_longest_ids_allowed_are_decided_in_frames_kafka_takes(
    settings: Settings, publisher: Publisher, models: ReadModels, unique: Callable[[str], str]
) -> None:
    """2,000 orders with the longest SKU (with a "/") and ids allowed, of 4-byte characters:
    the publisher's frames, the processor's event frames and its changelog records of them
    would be 1-5 MB, and a message over 1 MB once stopped the processor for good."""
    clef = "\U0001d11e"  # 4 bytes of UTF-8
    sku = (unique("SKU") + "/" + clef * 64)[:64]
    run = unique("")
    orders = [
        place_order(
            sku,
            1,
            order_id=(f"{i:04d}{run}" + clef * 128)[:128],
            correlation_id=clef * 128,
            command_id=(f"{i:04d}{run}" + clef * 128)[:128],
        )
        for i in range(2000)
    ]
    publisher.publish(restock(sku, 2000))
    errors: list[Exception] = []
    publisher.send_many(orders, lambda _command, _receipt, error: errors.append(error) if error else None)
    assert publisher.flush(60) == 0 and errors == []
    publisher.publish(restock(sku, 1))  # decided after the orders

    wait_for("every order", lambda: (models.stock(sku) or {}).get("version") == 2002, 120)
    stock = models.stock(sku)
    assert stock is not None and (stock["processed"], stock["available"]) == (2000, 1)
    assert [e.order_id for e in events_for(settings, sku) if isinstance(e, OrderProcessed)] == [
        order.order_id for order in orders
    ]


def test_a_publisher_with_another_partition_count_than_the_topic_sends_nothing(
    settings: Settings, unique: Callable[[str], str]
) -> None:
    """With STOCKFLOW_PARTITIONS at twice the topic's, a SKU's partition is computed over
    partitions the topic lacks, or over the wrong count: its commands went where the processor
    refuses them, or the send failed in the Kafka client."""
    before = len(read_topic(settings, settings.commands_topic))
    wrong = Publisher(settings.model_copy(update={"partitions": 2 * settings.partitions}))
    try:
        with pytest.raises(PartitionCountMismatch, match=f"set STOCKFLOW_PARTITIONS={settings.partitions}"):
            wrong.send_many([restock(unique(f"SKU{i}"), 1) for i in range(50)])
        with pytest.raises(PartitionCountMismatch):
            wrong.check_broker()
    finally:
        wrong.close()
    assert len(read_topic(settings, settings.commands_topic)) == before


def test_garbage_goes_to_the_dead_letter_topic_and_the_worker_goes_on(
    settings: Settings, publisher: Publisher, models: ReadModels, unique: Callable[[str], str]
) -> None:
    sku = unique("SKU")
    partition = partition_for(sku.encode(), settings.partitions)
    raw = Producer({"bootstrap.servers": settings.bootstrap_servers})
    garbage = b"\x00not avro at all " + unique("marker").encode()
    raw.produce(settings.commands_topic, key=sku.encode(), value=garbage, partition=partition)
    invalid = PlaceOrder(unique("cmd"), "c", 0, sku, "o-1", qty=-5)  # skips the publisher's check
    raw.produce(settings.commands_topic, key=sku.encode(), value=codec.encode(invalid), partition=partition)
    assert raw.flush(10) == 0
    publisher.publish(restock(sku, 3))  # after the garbage, on the same partition

    wait_for("the restock after the garbage", lambda: models.stock(sku))
    dead = {r.value: r for r in read_topic(settings, settings.dlq_topic)}
    assert dead[garbage].headers["error.type"] == b"DecodeError"
    assert b"not an Avro single-object frame" in dead[garbage].headers["error.reason"]
    assert dead[garbage].headers["source.partition"] == str(partition).encode()
    bad_qty = dead[codec.encode(invalid)]
    assert bad_qty.headers["error.type"] == b"InvalidCommand"
    assert b"qty is -5" in bad_qty.headers["error.reason"]


def test_a_command_on_the_wrong_partition_is_refused_not_decided(
    settings: Settings, publisher: Publisher, models: ReadModels, unique: Callable[[str], str]
) -> None:
    sku = unique("SKU")
    home = partition_for(sku.encode(), settings.partitions)
    wrong = (home + 1) % settings.partitions
    stray = restock(sku, 50)
    raw = Producer({"bootstrap.servers": settings.bootstrap_servers})
    raw.produce(settings.commands_topic, key=b"not-the-sku", value=codec.encode(stray), partition=wrong)
    assert raw.flush(10) == 0
    publisher.publish(restock(sku, 1))

    wait_for("the well-routed restock", lambda: models.stock(sku))
    wait_for(
        "the stray command in the dead letter topic",
        lambda: [
            r
            for r in read_topic(settings, settings.dlq_topic)
            if r.headers.get("error.type") == b"WrongPartition"
        ],
    )
    assert stray.command_id not in {e.command_id for e in read_events(settings)}
    stock = models.stock(sku)
    assert stock is not None
    assert stock["available"] == 1


def test_a_paced_load_sends_no_command_before_it_is_due_and_waits_without_spinning(
    publisher: Publisher, unique: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A Kafka client's poll returns once it has served a delivery report, long before its
    # timeout at low rates; the load took that for its wait and sent 300 orders meant for
    # 100/s in 0.2 s, one command a frame. Then, polling until due, it spun through polls
    # shorter than the millisecond librdkafka can wait.
    sent_at: list[tuple[float, int]] = []  # (when, how many commands sent by then)
    send_many, poll = publisher.send_many, publisher.poll
    polls = [0]

    def recording(commands: Sequence[Command], on_delivery: DeliveryCallback | None = None) -> None:
        sent_at.append((time.monotonic(), (sent_at[-1][1] if sent_at else 0) + len(commands)))
        send_many(commands, on_delivery)

    def counting(timeout_s: float = 0.0) -> None:
        polls[0] += 1
        poll(timeout_s)

    monkeypatch.setattr(publisher, "send_many", recording)
    monkeypatch.setattr(publisher, "poll", counting)
    rate = 100.0
    started = time.monotonic()
    report = run_load(publisher, LoadProfile(orders=200, rate=rate, skus=5, sku_prefix=unique("PACED") + "-"))
    assert report.acknowledged == 200
    # Command i (from 0) is due i / rate after the start.
    early = [(round(when - started, 3), sent) for when, sent in sent_at if sent - 1 > (when - started) * rate]
    assert not early, f"(s after the start, commands sent by then) ahead of {rate:.0f}/s: {early[:5]}"
    # A poll waits a millisecond or more unless a delivery report ends it: one a frame.
    assert polls[0] <= report.elapsed_s * 1000 + 2 * len(sent_at), f"{polls[0]} polls"


def test_the_publisher_puts_a_sku_where_kafka_s_partitioner_does(
    settings: Settings, publisher: Publisher, unique: Callable[[str], str]
) -> None:
    for i in range(40):
        sku = unique(f"P{i}")
        receipt = publisher.publish(restock(sku, 1))
        assert receipt.partition == partition_for(sku.encode(), settings.partitions), sku


def test_a_batch_frame_is_decided_command_by_command_and_parks_only_its_bad_ones(
    settings: Settings, models: ReadModels, unique: Callable[[str], str]
) -> None:
    sku = unique("SKU")
    partition = partition_for(sku.encode(), settings.partitions)
    others = (unique(f"S{i}") for i in range(100))
    stray_sku = next(s for s in others if partition_for(s.encode(), settings.partitions) != partition)
    order = place_order(sku, 4, order_id=unique("order"))
    invalid = PlaceOrder(unique("cmd"), "c", 0, sku, "o-bad", qty=0)  # skips the publisher's check
    stray = restock(stray_sku, 9)
    # The order twice: a retry inside the frame.
    frame: list[Command] = [restock(sku, 10), order, invalid, stray, order, place_order(sku, 7)]
    raw = Producer({"bootstrap.servers": settings.bootstrap_servers})
    raw.produce(settings.commands_topic, value=codec.encode_batch(frame), partition=partition)
    assert raw.flush(10) == 0

    wait_for("the frame's last order", lambda: (models.stock(sku) or {}).get("version") == 3)
    events = events_for(settings, sku)
    assert [type(e) for e in events] == [StockReplenished, OrderProcessed, OrderRejected]
    assert events[1].command_id == order.command_id and events[2].available_after == 6

    def parked() -> dict[bytes, bytes]:
        bad = (codec.encode(invalid), codec.encode(stray))
        letters = [r for r in read_topic(settings, settings.dlq_topic) if r.value in bad]
        return {r.headers["error.type"]: r.headers["source.index"] for r in letters}

    wait_for("the frame's two bad commands in the DLQ", lambda: len(parked()) == 2)
    assert parked() == {b"InvalidCommand": b"2", b"WrongPartition": b"3"}
    assert stray_sku not in {e.sku for e in read_events(settings)}


def test_the_state_changelog_never_records_a_partition_handled_before_its_sku_rows(
    settings: Settings, unique: Callable[[str], str]
) -> None:
    # A crash keeps a prefix of a changelog partition, so the partition's handled offset must
    # come after the SKU rows of its commands. 400 rows of about 70 bytes are more than one
    # 16 KB Kafka record batch holds: the processor's save goes out as several, in order.
    candidates = (unique(f"R{i}") for i in range(100_000))
    partition = 0
    skus = [s for s in candidates if partition_for(s.encode(), settings.partitions) == partition][:400]
    offsets: list[int | None] = []
    raw = Producer({"bootstrap.servers": settings.bootstrap_servers})
    frame = codec.encode_batch([restock(s, 5) for s in skus])
    raw.produce(
        settings.commands_topic,
        frame,
        partition=partition,
        on_delivery=lambda _e, m: offsets.append(m.offset()),
    )
    assert raw.flush(10) == 0
    frame_offset = offsets[0]
    assert frame_offset is not None

    topic = changelog_topic(settings, PROCESSOR_TABLES[0])
    handled_key = f'"p:{partition}"'.encode()

    def handled(record: tuple[bytes, bytes]) -> bool:
        return record[0] == handled_key and int(record[1]) >= frame_offset

    def changelog() -> list[tuple[bytes, bytes]] | None:
        records = [(r.key or b"", r.value) for r in read_topic(settings, topic) if r.partition == partition]
        return records if any(handled(record) for record in records) else None

    records = wait_for("the frame handled in the changelog", changelog, 60)
    before = records[: next(i for i, record in enumerate(records) if handled(record))]
    rows = {key: json.loads(value) for key, value in before if key.startswith(b'"s:')}
    missing = [s for s in skus if rows.get(json.dumps(f"s:{s}").encode(), {}).get("offset") != frame_offset]
    assert missing == [], f"{len(missing)} SKU rows after the partition's handled offset"
