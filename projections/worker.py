"""The projection worker: events topic -> Redis read models, in batches.

decode -> plan (pure) -> idempotent Redis writes -> commit offsets. Where to resume is the
Redis watermark of each partition, not the Kafka committed offset: the read model says what
it already holds, so a worker killed between writing Redis and committing to Kafka neither
skips nor doubles anything, and a Redis that lost its data is rebuilt from the start of the log.
Committed offsets still move, so operators can see the group's lag with Kafka's tools.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import redis
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from projections.queries import ReadModels
from projections.store import Applied, ReadModelStore
from projections.views import WritePlan, latency_bucket, plan_writes
from schemas.codec import codec
from schemas.records import Event
from stockflow import metrics
from stockflow.errors import DecodeError
from stockflow.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

# Messages taken per consume() call while filling a batch: small, since one may hold many events.
CONSUME_STEP = 50
# What Redis being down (restarting, unreachable) raises once redis-py's own retries are spent.
UNREACHABLE = (redis.ConnectionError, redis.TimeoutError)
# What a Redis that answers but takes no writes for now raises: full (maxmemory, with the
# noeviction policy), or a replica. A write refused is written again once it takes them: the
# writes may be repeated, and a script refused at a write has written nothing.
REFUSES_WRITES = (redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError)
# The longest wait between two attempts to reach a Redis that is down.
MAX_RETRY_WAIT_S = 5.0
# How often the worker commits its offsets, as the processor does (its broker_commit_interval).
# The commit is only the lag that operators and publishers read, the worker resumes from Redis's
# watermarks; after every batch it was about 25 commits a second at 2,500 events/s, each one
# a request and an append to the broker's __consumer_offsets.
COMMIT_INTERVAL_S = 0.5
# Partitions a rebuild's worker reads at once: when one is read to its end, the other keeps the
# worker busy until the next one's first records come (0.05-0.8 s after it is assigned).
FOLD_PARTITIONS_AT_ONCE = 2
# A rebuild's fetch waits at most this long for records (librdkafka's default: 500). Its
# partitions stay assigned once read (a loss of Redis's data reads one again), and a fetch of
# those found nothing new and waited: a partition taken next got its first records 0.6-0.8 s
# later, 0.05-0.24 s at 10 ms.
FOLD_FETCH_WAIT_MS = 10


class ProjectionWorker:
    def __init__(self, settings: Settings, rebuilding: bool = False) -> None:
        """``rebuilding``: a worker of a rebuild (``projections.rebuild``), not a live worker.
        It leaves dead letters to the live workers, which parked them already, records no
        latencies (its events were created long ago) and commits no offsets."""
        self._settings = settings
        self._rebuilding = rebuilding
        client = redis.Redis.from_url(settings.redis_url)
        self._store = ReadModelStore(client, settings.recent_orders_per_sku, settings.order_retention_s)
        self._models = ReadModels(client)
        self._consumer = Consumer(
            settings.kafka_config()
            | {
                "group.id": settings.projection_group,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "enable.partition.eof": False,
                "client.id": f"stockflow-projection-{socket.gethostname()}-{os.getpid()}",
                # A dead worker's partitions go to the others after this long (default 45 s).
                "session.timeout.ms": int(settings.projection_session_timeout_s * 1000),
                "on_commit": self._on_commit,
            }
            | ({"fetch.wait.max.ms": FOLD_FETCH_WAIT_MS} if rebuilding else {})
        )
        self._dead_letters = Producer(settings.kafka_config() | {"enable.idempotence": True})
        self.events_applied = 0
        # What Redis should hold, per assigned partition: the watermark read when the partition
        # was assigned, then the last offset this worker applied.
        self._applied: dict[int, int] = {}
        # The batch being written to Redis, by a thread of its own (see poll_once).
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="redis-writer")
        self._writing: Future[Applied] | None = None
        self._written: list[tuple[int, int, Event | None]] = []
        # The batch read while the last one was being written: the next to write.
        self._next: list[tuple[int, int, Event | None]] = []
        self._writing_since = 0.0
        self._paused = False
        self._uncommitted = False  # offsets applied since the last commit
        self._committed_at = 0.0
        self._stopping = threading.Event()  # set once run() ends: stop waiting for Redis
        # Whether Redis answered the last call (or took the last write), from either thread:
        # each change is logged once and shown as stockflow_redis_unreachable, so a worker with
        # nothing to write still says that Redis is gone (its only call then is the watermark
        # check of every poll).
        self._redis_reachable = True
        self._reachable_lock = threading.Lock()

    def run(self, should_stop: Callable[[], bool]) -> None:
        self._consumer.subscribe(
            [self._settings.events_topic], on_assign=self._on_assign, on_revoke=self._on_revoke
        )
        gc.freeze()  # what is set up lives as long as the worker: keep it out of full collections
        try:
            while not should_stop():
                self.poll_once(timeout_s=0.5)
            self._stopping.set()  # one more attempt at the batch in flight, not a wait for Redis
            self._finish_write(wait=True)
        finally:
            self._close()

    def fold(self, take: Callable[[], tuple[int, int] | None], on_progress: Callable[[int], None]) -> None:
        """Fold partitions from the start of the log up to their end offsets; ``take()`` gives
        the next (partition, end offset), None when there are no more.

        The partitions are assigned, not balanced by the group: a rebuild's workers start at
        once, with no rebalance. A worker reads FOLD_PARTITIONS_AT_ONCE partitions at a time and
        takes the next as soon as one is read to its end, so that one worker left with the
        partitions of the hot SKUs does not fold them alone while the others are done.
        ``on_progress`` gets the offsets covered so far, in every partition taken.
        """
        topic = self._settings.events_topic
        # Leaders first: assigned "from the beginning" before librdkafka knows a partition's
        # leader, it asks for the offset only half a second later (measured: 0.5 s to the first
        # message, 0.03 s with the metadata read first).
        self._consumer.list_topics(topic, timeout=10)
        gc.freeze()  # as in run()
        ends: dict[int, int] = {}  # every partition taken so far -> its end offset
        reading: list[tuple[int, int]] = []  # taken, not yet read to the end
        taking = True
        try:
            while True:
                if reading:  # position: one past the last message consumed, kept by the client
                    read = self._consumer.position([TopicPartition(topic, p) for p, _ in reading])
                    reading = [
                        (tp.partition, ends[tp.partition]) for tp in read if tp.offset < ends[tp.partition]
                    ]
                while taking and len(reading) < FOLD_PARTITIONS_AT_ONCE:
                    share = take()
                    if share is None:
                        taking = False
                        break
                    reading.append(share)
                    ends[share[0]] = share[1]
                    # Added to what is assigned, not in place of it: a partition whose writes
                    # find that Redis lost data is read again from the start (_rebuild seeks it).
                    self._consumer.incremental_assign([TopicPartition(topic, share[0], OFFSET_BEGINNING)])
                covered = sum(min(self._applied.get(p, -1) + 1, end) for p, end in ends.items())
                on_progress(covered)
                if not taking and covered == sum(ends.values()):
                    break
                self.poll_once(timeout_s=0.5)
            self._finish_write(wait=True)  # read ahead past the end offsets: harmless, finished
        finally:
            self._close()

    def _close(self) -> None:
        if self._uncommitted:
            self._commit_applied()  # close() waits for it: the group's lag ends where this worker did
        self._consumer.close()  # leave the group now, so the others take over at once
        if self._dead_letters.flush(10) == 0:
            # Its connections end now, not when the worker is collected: a worker run in a
            # process that goes on (the bench) kept reconnecting to a broker that was gone.
            # With dead letters still unsent, close() would wait for them.
            self._dead_letters.close()
        self._writer.shutdown(wait=False)

    def poll_once(self, timeout_s: float) -> int:
        """Read the next batch while the last one is written to Redis, then write it.

        One batch is written at a time, in a thread of its own, while the next is fetched and
        decoded: the decoding and Redis's work overlap. When a write takes longer than
        STOCKFLOW_PROJECTION_PAUSE_AFTER_S the worker pauses its partitions and keeps polling:
        it stays in the group, fetches nothing, and the batch it holds waits for Redis.
        """
        if self._writing is not None and not self._paused:
            self._read_ahead(0.0)
        if self._uncommitted and time.monotonic() - self._committed_at >= COMMIT_INTERVAL_S:
            self._commit_applied()
        if not self._finish_write(wait=False):
            self._hold_back(timeout_s)
            return 0
        self._rebuild(self._lost_watermarks())
        self._read_ahead(0.0 if self._next else timeout_s)  # what came while the write finished
        batch, self._next = self._next, []
        if not batch:
            return 0
        if any(event is None for _, _, event in batch):
            self._dead_letters.flush(30)  # parked for good before the watermark moves past it
        # A copy: what Redis must hold as the write begins (a dozen partitions, not every event).
        held = dict(self._applied)
        plan = plan_writes(batch, expiring=self._settings.order_retention_s > 0)
        self._writing = self._writer.submit(self._write, plan, held, batch)
        self._written = batch
        self._writing_since = time.monotonic()
        return len(batch)

    def _read_ahead(self, timeout_s: float) -> None:
        """Add to the next batch up to STOCKFLOW_PROJECTION_BATCH_SIZE events.

        consume(n, timeout) waits for a full batch; wait only for the first event, then take
        what has already been fetched, so a trickle of events is not held back. A message may
        be a frame of many events: take messages in small steps until the batch is full.
        """
        room = self._settings.projection_batch_size - len(self._next)
        messages = self._consumer.consume(1, timeout_s) if room > 0 else []
        while messages:
            for message in messages:
                error = message.error()
                if error is not None:
                    if error.fatal():
                        raise RuntimeError(f"Kafka consumer failed: {error}")
                    log.warning("consumer error: %s", error)
                    continue
                partition, offset = message.partition(), message.offset()
                assert partition is not None and offset is not None
                # An EventBatch frame holds many events at one offset; None marks a dead letter.
                self._next.extend((partition, offset, event) for event in self._decode(message))
            room = self._settings.projection_batch_size - len(self._next)
            if room <= 0:
                break
            messages = self._consumer.consume(min(room, CONSUME_STEP), 0)

    def _write(
        self, plan: WritePlan, held: dict[int, int], batch: list[tuple[int, int, Event | None]]
    ) -> Applied:
        """Write ``plan``, then the latencies of ``batch``'s events, now visible; in the writer
        thread, waiting for Redis if it is down. Meanwhile the worker pauses its partitions and
        stays in the group, as it does while Redis is slow (poll_once); a Redis that comes back
        empty is rebuilt from the log."""
        outcome = self._once_reachable("writing the batch", lambda: self._store.apply(plan, held))
        if self._rebuilding:
            return outcome
        visible, decided = self._latencies(batch)
        self._once_reachable("recording latencies", lambda: self._store.record_latencies(visible, decided))
        return outcome

    def _once_reachable(self, what: str, attempt: Callable[[], T]) -> T:
        """``attempt()``, again and again while Redis cannot be reached (restarting, a network
        break), backing off up to MAX_RETRY_WAIT_S; given up once the worker is stopping."""
        wait_s = 0.5
        while True:
            try:
                outcome = attempt()
            except (*UNREACHABLE, *REFUSES_WRITES) as exc:
                if self._stopping.is_set():
                    raise
                self._redis_unreachable(exc, f"{what} again in {wait_s:.1f}s")
                self._stopping.wait(wait_s)
                wait_s = min(wait_s * 2, MAX_RETRY_WAIT_S)
            else:
                self._redis_answered()
                return outcome

    def _redis_unreachable(self, exc: Exception, then: str) -> None:
        if isinstance(exc, redis.exceptions.OutOfMemoryError):
            state = "is full and takes no writes"
            fix = "raise its maxmemory, or let orders' read models expire (STOCKFLOW_ORDER_RETENTION_S)"
        elif isinstance(exc, redis.exceptions.ReadOnlyError):
            state, fix = "is a read-only replica", "point STOCKFLOW_REDIS_URL at the primary"
        else:
            state, fix = "is unreachable", "is redis-server running there? (STOCKFLOW_REDIS_URL)"
        log.warning("Redis at %s %s (%s): %s; %s", self._settings.redis_url, state, exc, then, fix)
        with self._reachable_lock:
            self._redis_reachable = False
            metrics.REDIS_UNREACHABLE.set(1)

    def _redis_answered(self) -> None:
        if self._redis_reachable:
            return  # as nearly always: no lock taken
        with self._reachable_lock:
            if self._redis_reachable:
                return
            self._redis_reachable = True
            metrics.REDIS_UNREACHABLE.set(0)
        log.info("Redis at %s answers again", self._settings.redis_url)

    def _finish_write(self, wait: bool) -> bool:
        """Complete the batch in flight once Redis has it; False if it is still being written."""
        if self._writing is None:
            return True
        if self._paused and not wait:
            if not self._writing.done():
                return False
        elif not wait:
            # Wait as a synchronous worker would, up to the point where Redis counts as behind.
            pause_at = self._writing_since + self._settings.projection_pause_after_s
            try:
                self._writing.result(timeout=max(pause_at - time.monotonic(), 0.0))
            except TimeoutError:
                return False
        outcome, batch = self._writing.result(), self._written
        self._writing, self._written = None, []
        if self._paused:
            self._consumer.resume(self._consumer.assignment())
            self._paused = False
            metrics.PAUSED_PARTITIONS.set(0)
            log.info("Redis caught up: resuming")
        self.events_applied += outcome.events
        metrics.EVENTS_PROJECTED.inc(outcome.events)
        self._rebuild(outcome.gaps)
        done = {p: offset for p, offset, _ in batch if p not in outcome.gaps}
        self._applied.update(done)
        for partition, offset in done.items():
            tp = TopicPartition(self._settings.events_topic, partition)
            _low, high = self._consumer.get_watermark_offsets(tp, cached=True)  # from the last fetch
            lag = max(high - offset - 1, 0)
            metrics.CONSUMER_LAG.labels(self._settings.projection_group, partition).set(lag)
        self._uncommitted = self._uncommitted or bool(done)
        return True

    def _commit_applied(self) -> None:
        """Commit one past what Redis holds, for every assigned partition: the group's lag that
        operators and publishers read. Every partition each time, so a commit lost while the
        broker was away is made good by the next one, even on a partition with no new events."""
        self._uncommitted, self._committed_at = False, time.monotonic()
        if self._applied and not self._rebuilding:
            self._consumer.commit(
                offsets=[
                    TopicPartition(self._settings.events_topic, p, o + 1) for p, o in self._applied.items()
                ],
                asynchronous=True,
            )

    def _on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """A commit the broker refused or never got (it was restarting) is made again."""
        if error is not None or any(tp.error is not None for tp in partitions):
            self._uncommitted = True

    def _hold_back(self, timeout_s: float) -> None:
        """Redis is behind: stop fetching, but keep polling so the group keeps this worker."""
        if not self._paused:
            assigned = self._consumer.assignment()
            self._consumer.pause(assigned)
            self._paused = True
            metrics.PAUSED_PARTITIONS.set(len(assigned))
            log.warning(
                "Redis is behind (a write has taken over %.1fs): pausing %d partitions",
                time.monotonic() - self._writing_since,
                len(assigned),
            )
        message = self._consumer.poll(min(timeout_s, 0.1))  # serves heartbeats and rebalances
        if message is not None and message.error() is None:
            # Fetched before the pause took hold: put it back to be read after the resume.
            partition, offset = message.partition(), message.offset()
            assert partition is not None and offset is not None
            self._consumer.seek(TopicPartition(self._settings.events_topic, partition, offset))

    def _latencies(self, batch: list[tuple[int, int, Event | None]]) -> tuple[Counter[int], Counter[int]]:
        """Every event's latency, created -> visible and created -> decided, by histogram bucket,
        for Redis's histograms (the bench reads them); one per message goes into the Prometheus
        one, whose lock per observation cost the worker 7% of its time.

        Counted in milliseconds first and bucketed per distinct value: a batch's events share a
        few hundred values at most, and a bucket per event was 5% of a replay's time.
        """
        visible_ms = int(time.time() * 1000)
        last_of_message = {
            (partition, offset): event for partition, offset, event in batch if event is not None
        }
        for event in last_of_message.values():
            metrics.VISIBLE_LATENCY.observe((visible_ms - event.command_occurred_at) / 1000)
        events = [event for _, _, event in batch if event is not None]
        visible = Counter(visible_ms - event.command_occurred_at for event in events)
        decided = Counter(event.occurred_at - event.command_occurred_at for event in events)
        return _bucketed(visible), _bucketed(decided)

    def _lost_watermarks(self) -> set[int]:
        """Assigned partitions whose watermark has fallen below what Redis held before (it lost
        its data).

        One HGETALL per poll. It notices a loss even on partitions with no new events; the
        version and watermark checks in the store keep a loss during a write from ever being
        half-written over.
        """
        if not self._applied:
            return set()
        try:
            held = self._models.watermarks()
        except UNREACHABLE as exc:
            # Asked again at the next poll; the next write waits for Redis (_write).
            if self._redis_reachable:
                self._redis_unreachable(exc, "checking again at every poll")
            return set()
        self._redis_answered()
        return {p for p, offset in self._applied.items() if held.get(p, -1) < offset}

    def _forget(self, partitions: set[int]) -> None:
        """Drop what this worker holds of ``partitions``: their events read ahead, which must
        not be written past a loss or over a new owner, and the offsets it applied."""
        if not partitions:
            return
        self._next = [entry for entry in self._next if entry[0] not in partitions]
        for partition in partitions:
            self._applied.pop(partition, None)

    def _rebuild(self, partitions: set[int]) -> None:
        self._forget(partitions)
        for partition in partitions:
            log.warning("Redis lost data of events partition %s: replaying it from the start", partition)
            self._consumer.seek(TopicPartition(self._settings.events_topic, partition, OFFSET_BEGINNING))

    def _decode(self, message: Message) -> list[Event] | list[None]:
        value = message.value() or b""
        try:
            return codec.decode_events(value)
        except DecodeError as exc:
            if self._rebuilding:
                log.warning(
                    "skipped %s[%s]@%s: %s", message.topic(), message.partition(), message.offset(), exc
                )
                return [None]
            # Garbage in the event log must not stop the read models: park it and go on.
            log.error(
                "dead letter at %s[%s]@%s: %s", message.topic(), message.partition(), message.offset(), exc
            )
            self._dead_letters.produce(
                self._settings.events_dlq_topic,
                key=message.key(),
                value=value,
                headers=[
                    ("error.reason", str(exc).encode()),
                    ("error.type", type(exc).__name__.encode()),
                    ("source.topic", str(message.topic()).encode()),
                    ("source.partition", str(message.partition()).encode()),
                    ("source.offset", str(message.offset()).encode()),
                ],
            )
            self._dead_letters.poll(0)
            return [None]

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._paused = False  # a new assignment starts unpaused
        metrics.PAUSED_PARTITIONS.set(0)
        # Where the new partitions resume: wait for Redis if it is down.
        watermarks = self._once_reachable("reading the watermarks", self._models.watermarks)
        self._warn_if_redis_lost(consumer, [tp for tp in partitions if tp.partition not in watermarks])
        for tp in partitions:
            applied = watermarks.get(tp.partition)
            tp.offset = OFFSET_BEGINNING if applied is None else applied + 1
            if applied is not None:
                # From now on Redis must hold at least this much of the partition: a loss is
                # noticed even if no event comes (_lost_watermarks) or during a write (store).
                self._applied[tp.partition] = applied
        consumer.assign(partitions)
        # Where the worker resumes is where the group stands, even if no event comes (a commit of
        # the last batches may have been lost with the broker that ended the last assignment).
        self._commit_applied()
        log.info("assigned partitions %s", sorted(tp.partition for tp in partitions))

    def _warn_if_redis_lost(self, consumer: Consumer, unmarked: list[TopicPartition]) -> None:
        """Say so when the group got further than Redis remembers: Redis lost data while no
        worker held these partitions (poll_once notices it on the partitions held all along)."""
        try:
            committed = consumer.committed(unmarked, timeout=10) if unmarked else []
        except KafkaException:
            return  # only a diagnostic: the partitions are replayed from the start either way
        for tp in committed:
            if tp.offset > 0:
                log.warning(
                    "Redis lost data of events partition %s (the group had reached offset %s):"
                    " replaying it from the start",
                    tp.partition,
                    tp.offset,
                )

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # The next owner resumes from the watermarks in Redis: finish the batch in flight first.
        self._finish_write(wait=True)
        self._forget({tp.partition for tp in partitions})


def _bucketed(latencies: Counter[int]) -> Counter[int]:
    """Latency counts by millisecond -> counts by histogram bucket (views.latency_bucket)."""
    buckets: Counter[int] = Counter()
    for ms, count in latencies.items():
        buckets[latency_bucket(ms)] += count
    return buckets
