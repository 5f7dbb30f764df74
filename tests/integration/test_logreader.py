"""Reading a topic from its start to its end, as `verify` and the processor's restore do."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import Producer

from stockflow.logreader import PROGRESS_EVERY, read_topic
from stockflow.settings import Settings
from stockflow.topics import ensure_topics
from tests.pipeline import own_settings

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("stack")]


def test_reading_a_topic_reports_the_offsets_covered_as_it_goes(
    settings: Settings, unique: Callable[[str], str], tmp_path: Path
) -> None:
    mine = own_settings(settings, unique, tmp_path)
    ensure_topics(mine)
    records = 2 * PROGRESS_EVERY + 500
    producer = Producer({"bootstrap.servers": mine.bootstrap_servers, "linger.ms": 20})
    for n in range(records):
        producer.produce(mine.commands_topic, b"x", str(n).encode(), partition=n % mine.partitions)
        producer.poll(0)
    assert producer.flush(30) == 0
    seen: list[tuple[int, int]] = []
    assert (
        sum(1 for _ in read_topic(mine, mine.commands_topic, on_progress=lambda *p: seen.append(p)))
        == records
    )
    # Every PROGRESS_EVERY records, then once at the end; the totals are every partition's end.
    assert [total for _, total in seen] == [records] * 3
    covered = [done for done, _ in seen]
    assert covered == sorted(covered) and covered[-1] == records
    assert PROGRESS_EVERY <= covered[0] < covered[1] < records
