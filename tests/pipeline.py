"""Test helpers that look at the real pipeline: read the event log, wait for a condition."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from confluent_kafka import Consumer, KafkaException, TopicPartition

from schemas.codec import codec
from schemas.records import Event
from stockflow.settings import Settings

T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout_s: float = 60.0) -> T:
    """Poll ``probe`` until it returns something truthy; fail with ``what`` after the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.2)


@dataclass(frozen=True)
class Logged:
    partition: int
    offset: int
    value: bytes
    headers: dict[str, bytes]


def read_topic(settings: Settings, topic: str) -> list[Logged]:
    """Everything in ``topic`` right now, partition by partition, in offset order."""
    consumer = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": f"test-reader-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
        }
    )
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ends = {}
        for p in partitions:
            low, high = wait_for(
                f"the offsets of {topic}[{p}]",
                lambda p=p: _watermarks(consumer, TopicPartition(topic, p)),  # type: ignore[misc]
                timeout_s=30,
            )
            if high > low:
                ends[p] = high
        consumer.assign([TopicPartition(topic, p, 0) for p in ends])
        records: list[Logged] = []
        remaining = dict(ends)
        while remaining:
            message = consumer.poll(5)
            if message is None:
                raise AssertionError(f"could not read {topic} to its end: {remaining} left")
            if message.error():
                continue
            p, offset = message.partition(), message.offset()
            assert p is not None and offset is not None
            if p in remaining and offset >= remaining[p] - 1:
                del remaining[p]
            records.append(Logged(p, offset, message.value() or b"", _headers(message.headers() or [])))
        return records
    finally:
        consumer.close()


def _watermarks(consumer: Consumer, tp: TopicPartition) -> tuple[int, int] | None:
    try:
        return consumer.get_watermark_offsets(tp, timeout=10)
    except KafkaException:  # NOT_LEADER_FOR_PARTITION for a moment after topics are created
        return None


def _headers(
    raw: dict[str, str | bytes | None] | list[tuple[str, str | bytes | None]],
) -> dict[str, bytes]:
    pairs = raw.items() if isinstance(raw, dict) else raw
    return {k: v.encode() if isinstance(v, str) else v or b"" for k, v in pairs}


def read_events(settings: Settings) -> list[Event]:
    return [codec.decode_event(record.value) for record in read_topic(settings, settings.events_topic)]


def events_for(settings: Settings, sku: str) -> list[Event]:
    return [event for event in read_events(settings) if event.sku == sku]
