"""Read a topic from its start to its current end: for verify, tests and operators."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from stockflow.errors import StackError
from stockflow.settings import Settings


@dataclass(frozen=True)
class Logged:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: dict[str, bytes]
    timestamp_ms: int  # the record's Kafka timestamp: on commands, when the broker appended it


def read_topic(settings: Settings, topic: str, timeout_s: float = 30.0) -> Iterator[Logged]:
    """Every record in ``topic`` up to the end offsets it has when reading starts."""
    consumer = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": f"stockflow-reader-{uuid.uuid4().hex}",  # never commits: leaves no trace
            "enable.auto.commit": False,
            "enable.partition.eof": False,
        }
    )
    try:
        ends = end_offsets(settings, topic, timeout_s)
        consumer.assign([TopicPartition(topic, p, 0) for p in ends])
        while ends:
            message = consumer.poll(timeout_s)
            if message is None:
                raise StackError(f"reading {topic} stalled with partitions {sorted(ends)} unfinished")
            if message.error() is not None:
                continue
            partition, offset = message.partition(), message.offset()
            assert partition is not None and offset is not None
            if offset >= ends.get(partition, 0) - 1:
                ends.pop(partition, None)
            yield _logged(message, topic, partition, offset)
    finally:
        consumer.close()


def end_offsets(settings: Settings, topic: str, timeout_s: float = 30.0) -> dict[int, int]:
    """The end offset, now, of each partition of ``topic`` that holds records."""
    consumer = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": "stockflow-reader"})
    try:
        metadata = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
        if metadata is None or metadata.error is not None:
            raise StackError(f"topic {topic} is missing: start the stack or check STOCKFLOW_*_TOPIC")
        ends = {}
        for partition in metadata.partitions:
            low, high = _watermarks(consumer, TopicPartition(topic, partition), timeout_s)
            if high > low:
                ends[partition] = high
        return ends
    except KafkaException as exc:
        raise StackError(
            f"cannot reach Kafka at {settings.bootstrap_servers} ({exc}): start the stack"
            " (`stockflow stack up`) or set STOCKFLOW_BOOTSTRAP_SERVERS"
        ) from exc
    finally:
        consumer.close()


def _watermarks(consumer: Consumer, tp: TopicPartition, timeout_s: float) -> tuple[int, int]:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return consumer.get_watermark_offsets(tp, timeout=timeout_s)
        except KafkaException:  # NOT_LEADER_FOR_PARTITION for a moment after a (re)start
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _logged(message: Message, topic: str, partition: int, offset: int) -> Logged:
    return Logged(
        topic,
        partition,
        offset,
        message.key(),
        message.value() or b"",
        _headers(message.headers() or []),
        message.timestamp()[1],
    )


def _headers(
    raw: dict[str, str | bytes | None] | list[tuple[str, str | bytes | None]],
) -> dict[str, bytes]:
    pairs = raw.items() if isinstance(raw, dict) else raw
    return {k: v.encode() if isinstance(v, str) else v or b"" for k, v in pairs}


def read_range(settings: Settings, topic: str, partition: int, start: int, end: int) -> list[Logged]:
    """The records of one partition with offsets in [start, end), in offset order."""
    consumer = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": f"stockflow-reader-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",  # start is gone by retention: read what is left
        }
    )
    records: list[Logged] = []
    try:
        consumer.assign([TopicPartition(topic, partition, start)])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            message = consumer.poll(1.0)
            if message is None or message.error() is not None:
                continue
            offset = message.offset()
            assert offset is not None
            if offset >= end:
                return records
            records.append(_logged(message, topic, partition, offset))
            if offset == end - 1:
                return records
        raise StackError(f"could not read {topic}[{partition}] offsets {start}..{end - 1} within 60s")
    finally:
        consumer.close()
