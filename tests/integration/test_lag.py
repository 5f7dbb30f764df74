"""The lag that publishers' backpressure and `stockflow status` read, on the session's broker."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from confluent_kafka import Producer, TopicPartition

from stockflow.lag import LagProbe
from stockflow.settings import Settings
from stockflow.topics import admin_client, ensure_topics
from tests.pipeline import commit_offset


@pytest.mark.usefixtures("stack")
def test_lag_is_the_end_offset_less_the_commit_or_the_first_offset_kept(
    settings: Settings, unique: Callable[[str], str]
) -> None:
    # Topics and groups of its own: the session's workers neither write nor commit here.
    own = settings.model_copy(
        update={
            "commands_topic": unique("lag.commands"),
            "events_topic": unique("lag.events"),
            "processor_group": unique("lag-processor"),
            "projection_group": unique("lag-projection"),
        }
    )
    ensure_topics(own)
    producer = Producer({"bootstrap.servers": own.bootstrap_servers})
    for topic, partition, count in (
        (own.commands_topic, 0, 5),
        (own.commands_topic, 1, 3),
        (own.events_topic, 2, 4),
    ):
        for _ in range(count):
            producer.produce(topic, b"x", partition=partition)
    assert producer.flush(30) == 0

    commit_offset(own, own.processor_group, TopicPartition(own.commands_topic, 0, 2))
    # Partition 1 keeps its last record alone, and the group has never committed there.
    admin = admin_client(own)  # kept: a freed AdminClient never completes its futures
    for future in admin.delete_records([TopicPartition(own.commands_topic, 1, 2)]).values():
        future.result(timeout=30)

    probe = LagProbe(own)
    try:
        processor, projection = probe.read()
    finally:
        probe.close()

    assert processor.group == own.processor_group and processor.topic == own.commands_topic
    assert processor.partitions == {0: 3, 1: 1, 2: 0, 3: 0}
    assert processor.consumed == 2 + 2  # committed on 0; the first offset kept on 1
    assert projection.partitions == {0: 0, 1: 0, 2: 4, 3: 0}
    assert projection.consumed == 0
