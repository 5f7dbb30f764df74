"""Consumer lag of the processor and projection groups, and the admission control built on it.

Lag of a partition = its end offset - the group's committed offset. Both groups commit every
half second (the processor through Faust), so the figure is at most that stale. Reading it
costs one request for the committed offsets of each group and one for the end offsets of both
topics; publishers cache it for ``STOCKFLOW_BACKPRESSURE_REFRESH_S``.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec  # type: ignore[attr-defined]  # untyped export

from stockflow.errors import StackError, StockflowError
from stockflow.settings import Settings
from stockflow.topics import admin_client

# A group's coordinator or a partition's leader is moving, loading or not elected yet (a broker
# just started, a topic was just created): ask again shortly.
BROKER_SETTLING = {
    KafkaError.NOT_COORDINATOR,
    KafkaError.COORDINATOR_NOT_AVAILABLE,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.LEADER_NOT_AVAILABLE,
}

log = logging.getLogger(__name__)
T = TypeVar("T")

# What AdminClient.list_offsets is asked for: a partition's end, or its first offset still kept.
END_OFFSET: Any = OffsetSpec.latest()  # type: ignore[no-untyped-call]
FIRST_OFFSET: Any = OffsetSpec.earliest()  # type: ignore[no-untyped-call]


@dataclass(frozen=True)
class GroupLag:
    group: str
    topic: str
    partitions: dict[int, int]  # partition -> messages not yet committed by the group
    # partition -> the group's committed offset (the next message it takes), or the first
    # offset still kept where it never committed
    committed: dict[int, int]

    @property
    def total(self) -> int:
        return sum(self.partitions.values())

    @property
    def consumed(self) -> int:
        """Messages committed by the group, all partitions: for rates."""
        return sum(self.committed.values())

    def as_json(self) -> dict[str, object]:
        return {"topic": self.topic, "partitions": self.partitions, "total": self.total}


class LagProbe:
    """Reads the lag of the processor group (commands) and the projection group (events)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._groups = {
            settings.processor_group: settings.commands_topic,
            settings.projection_group: settings.events_topic,
        }
        # One consumer per group, never subscribed: it only asks the group coordinator for the
        # committed offsets, so it neither joins the group nor commits anything.
        self._consumers = {
            group: Consumer(
                settings.kafka_config()
                | {
                    "group.id": group,
                    "enable.auto.commit": False,
                    "client.id": f"stockflow-lag-{uuid.uuid4().hex[:6]}",
                }
            )
            for group in self._groups
        }
        # Asks for the end offsets, every partition of both topics in one request: asked one
        # partition at a time, each reading was 24 requests in a row (89 a second, measured, for
        # one `stockflow load`), round trips the publisher waited for and work for the broker.
        self._admin: AdminClient | None = None  # made at the first use

    def read(self, timeout_s: float = 5.0) -> list[GroupLag]:
        def lags() -> list[GroupLag]:
            ends = self._offsets(self._every_partition(self._groups.values()), END_OFFSET, timeout_s)
            return [self._group_lag(group, topic, ends, timeout_s) for group, topic in self._groups.items()]

        return self._asked("consumer lag", lags, timeout_s)

    def dead_letters(self, timeout_s: float = 5.0) -> dict[str, int]:
        """Messages each dead letter topic holds (the commands', the events'). They stay there
        (a redrive publishes a copy), so a count that grows means commands or events are being
        parked now: `stockflow dlq list` says why."""
        topics = [self._settings.dlq_topic, self._settings.events_dlq_topic]

        def held() -> dict[str, int]:
            wanted = self._every_partition(topics)
            ends = self._offsets(wanted, END_OFFSET, timeout_s)
            firsts = self._offsets(wanted, FIRST_OFFSET, timeout_s)
            return {topic: sum(ends[k] - firsts[k] for k in ends if k[0] == topic) for topic in topics}

        return self._asked("the dead letter topics", held, timeout_s)

    def _every_partition(self, topics: Iterable[str]) -> list[TopicPartition]:
        return [TopicPartition(topic, p) for topic in topics for p in range(self._settings.partitions)]

    def _asked(self, what: str, ask: Callable[[], T], timeout_s: float) -> T:
        """``ask()``, again while the broker settles (for up to ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return ask()
            except KafkaException as exc:
                if exc.args[0].code() in BROKER_SETTLING and time.monotonic() < deadline:
                    time.sleep(0.2)
                    continue
                raise StackError(
                    f"cannot read {what} from Kafka at {self._settings.bootstrap_servers}: {exc};"
                    f" is the stack up (`stockflow stack status`)? Check {self._settings.kafka_settings()}"
                ) from exc

    def _group_lag(
        self, group: str, topic: str, ends: dict[tuple[str, int], int], timeout_s: float
    ) -> GroupLag:
        wanted = [TopicPartition(topic, p) for p in range(self._settings.partitions)]
        committed = {
            tp.partition: tp.offset for tp in self._consumers[group].committed(wanted, timeout=timeout_s)
        }
        # Where a partition the group has never committed starts: its first offset still kept.
        unread = [TopicPartition(topic, p) for p, offset in committed.items() if offset < 0]
        starts = self._offsets(unread, FIRST_OFFSET, timeout_s) if unread else {}
        for p, offset in committed.items():
            if offset < 0:
                committed[p] = starts[(topic, p)]
        lags = {p: max(ends[(topic, p)] - offset, 0) for p, offset in committed.items()}
        return GroupLag(group, topic, lags, committed)

    def _offsets(
        self, partitions: list[TopicPartition], spec: Any, timeout_s: float
    ) -> dict[tuple[str, int], int]:
        """(topic, partition) -> its offset by ``spec`` (the end, or the first kept), in one
        request to each partition leader."""
        futures = self._admin_client().list_offsets(
            {tp: spec for tp in partitions}, request_timeout=timeout_s
        )
        return {(tp.topic, tp.partition): future.result().offset for tp, future in futures.items()}

    def assignments(self, timeout_s: float = 10.0) -> dict[str, dict[int, str]]:
        """Per group, which member (its client id) holds each partition.

        A group that does not answer in time (it may be rebalancing) shows no holders.
        """
        held: dict[str, dict[int, str]] = {group: {} for group in self._groups}
        described = self._admin_client().describe_consumer_groups(
            list(self._groups), request_timeout=timeout_s
        )
        for group, future in described.items():
            try:
                members = future.result().members
            except KafkaException:
                continue
            for member in members:
                name = member.client_id  # stockflow workers use <kind>-<host>-<pid>: unique
                for tp in member.assignment.topic_partitions if member.assignment else []:
                    if tp.topic == self._groups[group]:  # not the table's changelog, say
                        held[group][tp.partition] = name
        return held

    def _admin_client(self) -> AdminClient:
        if self._admin is None:
            self._admin = admin_client(self._settings)
        return self._admin

    def close(self) -> None:
        for consumer in self._consumers.values():
            consumer.close()
        self._admin = None  # an AdminClient has no close(): its connections end once it is freed


class Overloaded(StockflowError):
    """The pipeline is too far behind to take more commands now; nothing was sent."""

    def __init__(self, lag: int, high_water: int, retry_after_ms: int) -> None:
        super().__init__(
            f"overloaded: the workers are {lag:,} messages behind (high-water mark {high_water:,},"
            f" STOCKFLOW_BACKPRESSURE_HIGH_WATER); retry after {retry_after_ms} ms"
        )
        self.lag = lag
        self.retry_after_ms = retry_after_ms


class Admission:
    """Admission control with hysteresis: closed once lag reaches the high-water mark, open
    again only below the low-water mark, so publishers do not flap around one threshold."""

    def __init__(self, settings: Settings, read_lag: Callable[[], int]) -> None:
        self.high_water = settings.backpressure_high_water
        self.low_water = settings.backpressure_low_water
        self.refresh_s = settings.backpressure_refresh_s
        self._read_lag = read_lag
        self.closed = False
        self.lag = 0
        self.waited_s = 0.0  # total time callers were held back
        self._read_at = -float("inf")
        self._previous: tuple[float, int] | None = None

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._read_at < self.refresh_s:
            return
        try:
            lag = self._read_lag()
        except StockflowError as exc:
            # A broker restarting or a coordinator moving: keep the last reading and try again
            # at the next refresh rather than failing the send; the producer itself retries.
            log.warning("lag unknown for now, keeping the last reading (%s): %s", self.lag, exc)
            self._read_at = now
            return
        self._previous = (self._read_at, self.lag)
        self._read_at, self.lag = now, lag
        if self.closed and self.lag < self.low_water:
            self.closed = False
        elif not self.closed and self.lag >= self.high_water:
            self.closed = True

    def retry_after_ms(self) -> int:
        """How long until the lag is below the low-water mark, at the rate it last fell."""
        default = int(self.refresh_s * 1000)
        if self._previous is None:
            return default
        then, lag_then = self._previous
        falling_per_s = (lag_then - self.lag) / max(self._read_at - then, 1e-3)
        if falling_per_s <= 0:
            return max(default, 1000)
        return max(default, int((self.lag - self.low_water) / falling_per_s * 1000))

    def admit(self, wait_s: float) -> None:
        """Return when a command may be sent; raise Overloaded after waiting ``wait_s``."""
        self._refresh()
        if not self.closed:
            return
        deadline = time.monotonic() + wait_s
        started = time.monotonic()
        try:
            while self.closed:
                if time.monotonic() >= deadline:
                    raise Overloaded(self.lag, self.high_water, self.retry_after_ms())
                time.sleep(min(self.refresh_s, max(deadline - time.monotonic(), 0)))
                self._refresh()
        finally:
            self.waited_s += time.monotonic() - started
