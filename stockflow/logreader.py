"""Read a topic from its start to its current end: for verify, tests, operators and the
processor's restore of its table."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

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


# Records read between two calls of read_topic's on_progress.
PROGRESS_EVERY = 10_000


def read_topic(
    settings: Settings,
    topic: str,
    timeout_s: float = 30.0,
    on_progress: Callable[[int, int], None] | None = None,
) -> Iterator[Logged]:
    """Every record in ``topic`` up to the end offsets it has when reading starts.

    ``on_progress(offsets covered, offsets in all)``, all partitions, every PROGRESS_EVERY
    records and at the end."""
    ends = end_offsets(settings, topic, timeout_s)
    # Assigned as soon as it is made: assigned later, even by 50 ms, a consumer got its first
    # record about a second after it was made (librdkafka waits to refresh its metadata).
    consumer = _reader(settings, {"enable.partition.eof": False})
    try:
        total, reached, count = sum(ends.values()), dict.fromkeys(ends, 0), 0
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
            if on_progress is not None:
                reached[partition], count = offset + 1, count + 1
                if count % PROGRESS_EVERY == 0 or not ends:
                    on_progress(sum(reached.values()), total)
            yield _logged(message, topic, partition, offset)
    finally:
        consumer.close()


class PartitionReader:
    """Reads the partitions of one topic one at a time, each to the end it has when its reading
    starts, through one consumer: one connection and one login for all of them. (A consumer
    made and closed for each partition of a SCRAM login logged an authentication error each
    time, closed while its connection to the group coordinator was still logging in.)"""

    def __init__(self, settings: Settings, topic: str, timeout_s: float = 30.0) -> None:
        self._topic, self._timeout_s = topic, timeout_s
        # A start no longer kept reads what is left.
        self._consumer = _reader(settings, {"enable.partition.eof": False, "auto.offset.reset": "earliest"})

    def read(
        self,
        partition: int,
        on_progress: Callable[[int, int], None] | None = None,
        span: tuple[int, int] | None = None,
    ) -> Iterator[Logged]:
        """The records of ``partition`` with offsets in ``span``, [start, end) (default: all it
        holds); ``on_progress(offsets covered, offsets in all)`` every PROGRESS_EVERY records
        and at the end."""
        tp = TopicPartition(self._topic, partition)
        first, end = span or _watermarks(self._consumer, tp, self._timeout_s)
        if end <= first:
            return
        # Assigned when the consumer is new, or knows the topic's leaders: it fetches at once.
        self._consumer.assign([TopicPartition(self._topic, partition, first)])
        count = 0
        while True:
            message = self._consumer.poll(self._timeout_s)
            if message is None:
                raise StackError(f"reading {self._topic}[{partition}] stalled before offset {end - 1}")
            offset = message.offset()
            if message.error() is not None or offset is None or message.partition() != partition:
                continue  # fetched for the partition read before, before its assignment ended
            if offset >= end:
                return  # the offsets up to the end held no record (a span's end past a gap)
            count += 1
            if on_progress is not None and (count % PROGRESS_EVERY == 0 or offset >= end - 1):
                on_progress(offset + 1 - first, end - first)
            yield _logged(message, self._topic, partition, offset)
            if offset >= end - 1:
                return

    def close(self) -> None:
        self._consumer.close()

    def __enter__(self) -> PartitionReader:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _reader(settings: Settings, options: dict[str, bool | str]) -> Consumer:
    """A consumer of assigned partitions in a group of its own that never commits: it leaves no
    trace in the broker."""
    group = f"stockflow-reader-{uuid.uuid4().hex}"
    # A reader reads what is there: a fetch at a partition's end waits 10 ms for more, not
    # librdkafka's 500, which read_latest's end-of-partition event (a processor's restore of its
    # table on taking partitions over) waited for: 0.6 s for a partition of 2,400 records, 0.1 at 10.
    config = settings.kafka_config() | {
        "group.id": group,
        "enable.auto.commit": False,
        "fetch.wait.max.ms": 10,
    }
    return Consumer(config | options)


def end_offsets(settings: Settings, topic: str, timeout_s: float = 30.0) -> dict[int, int]:
    """The end offset, now, of each partition of ``topic`` that holds records."""
    consumer = Consumer(settings.kafka_config() | {"group.id": "stockflow-reader"})
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
            f" (`stockflow stack up`), or check {settings.kafka_settings()}"
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
    with PartitionReader(settings, topic, timeout_s=60.0) as reader:
        return list(reader.read(partition, span=(start, end)))


@dataclass
class Latest:
    """What one partition of a compacted topic holds, read from its start to its end."""

    values: dict[bytes, bytes | None] = field(default_factory=dict)  # key -> last value; None: deleted
    last_offset: int = -1  # of the last record read; the end offset less one if none was
    records: int = 0  # records read, each key's superseded values included


def read_latest(
    settings: Settings, topic: str, partitions: Iterable[int], timeout_s: float = 30.0
) -> dict[int, Latest]:
    """Each key's last value in each of ``partitions`` of ``topic``, to the partition's end.

    Read in batches of thousands of records, the way a compacted changelog is restored: each
    partition ends at the end-of-partition event, so records deleted by the log cleaner at
    its tail cannot leave the reader waiting for an offset that no longer exists.
    """
    consumer = _reader(settings, {"enable.partition.eof": True})
    try:
        latest: dict[int, Latest] = {}
        starts = []
        for partition in partitions:
            low, high = _watermarks(consumer, TopicPartition(topic, partition), timeout_s)
            latest[partition] = Latest(last_offset=high - 1)
            if high > low:
                starts.append(TopicPartition(topic, partition, low))
        unfinished = {start.partition for start in starts}
        consumer.assign(starts)
        stall_at = time.monotonic() + timeout_s
        while unfinished:
            # consume() returns once it has this many records, or after its timeout: a short
            # one, or the last records would wait for it.
            messages = consumer.consume(10_000, 0.1)
            if messages:
                stall_at = time.monotonic() + timeout_s
            elif time.monotonic() > stall_at:
                raise StackError(f"reading {topic} stalled with partitions {sorted(unfinished)} unfinished")
            for message in messages:
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        unfinished.discard(message.partition())
                    continue
                number, offset, key = message.partition(), message.offset(), message.key()
                assert number is not None and offset is not None and key is not None
                part = latest[number]
                part.values[key] = message.value()
                part.records += 1
                part.last_offset = max(part.last_offset, offset)
        return latest
    finally:
        consumer.close()
