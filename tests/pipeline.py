"""Test helpers that look at the real pipeline: read the event log, wait for a condition."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from confluent_kafka import Consumer, KafkaException, TopicPartition

from producers.publisher import Publisher, Receipt
from schemas.codec import codec
from schemas.records import Command, Event
from stockflow.lag import BROKER_SETTLING
from stockflow.logreader import Logged
from stockflow.logreader import read_topic as _read_topic
from stockflow.partitioning import partition_for
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


def read_topic(settings: Settings, topic: str) -> list[Logged]:
    return list(_read_topic(settings, topic))


def read_events(settings: Settings) -> list[Event]:
    records = read_topic(settings, settings.events_topic)
    return [event for record in records for event in codec.decode_events(record.value)]


def events_for(settings: Settings, sku: str) -> list[Event]:
    return [event for event in read_events(settings) if event.sku == sku]


def own_settings(settings: Settings, unique: Callable[[str], str], run_dir: Path, **update: Any) -> Settings:
    """``settings`` for workers of a test's own: topics, consumer groups and a run dir of their
    own (so their pid files and logs are theirs), and ``update``."""
    names = ("commands", "events", "dlq", "events-dlq")
    topics = {f"{name.replace('-', '_')}_topic": unique(name) for name in names}
    groups = {"processor_group": unique("processor"), "projection_group": unique("projection")}
    return settings.model_copy(update={**topics, **groups, "run_dir": run_dir, **update})


def sku_on_every_partition(settings: Settings, prefix: str) -> list[str]:
    """A SKU named ``<prefix>-<n>`` for each partition of the commands and events topics."""
    skus: dict[int, str] = {}
    for n in range(1000):
        skus.setdefault(partition_for(f"{prefix}-{n}".encode(), settings.partitions), f"{prefix}-{n}")
    assert len(skus) == settings.partitions
    return list(skus.values())


def publish_all(settings: Settings, *commands: Command) -> list[Receipt]:
    """Publish ``commands`` one after another, each acknowledged, from a publisher of its own."""
    publisher = Publisher(settings)
    try:
        return [publisher.publish(command) for command in commands]
    finally:
        publisher.close()


def commit_offset(settings: Settings, group: str, position: TopicPartition) -> None:
    """Commit ``position`` for ``group``, a group with no member, as if it had consumed that far."""
    committer = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": group})

    def committed() -> bool:
        try:
            committer.commit(offsets=[position], asynchronous=False)
        except KafkaException as exc:
            # On a broker just started, the group's coordinator may still be loading: the
            # commit is refused (NOT_COORDINATOR) and librdkafka finds it again for the next.
            if exc.args[0].code() in BROKER_SETTLING:
                return False
            raise
        return True

    try:
        wait_for(f"the coordinator of group {group} to take a commit", committed, 30)
    finally:
        committer.close()
