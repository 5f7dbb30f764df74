"""The processor as a Faust app: commands in, decisions appended to the event log.

Thin wiring around ``processors.domain``, one batch of command messages at a time: decode ->
load each SKU's state from the table -> decide -> send the events -> wait for the broker to
acknowledge all of them -> save the new state. A message holds one command or a batch frame
of many; the events of a batch go out as one ``EventBatch`` frame per partition. The table is
co-partitioned with the commands topic (same partition count, key = SKU), and every event is
written to the same partition number of the events topic as its command, so a SKU's history
stays in one partition.

Processing guarantee: Faust's at-least-once, made exact for decisions.
- A batch's events are acknowledged by the broker before the state records any of its commands
  as applied: state saying "done" for an event that never reached the log is a lost decision.
  Waiting once per batch, not once per command, is what makes the processor fast.
- Everything a command changes is one table, so it goes to one changelog partition in order,
  the SKU rows and the partition's handled offset last: a crash keeps a consistent prefix, and
  order lines carry the offsets that wrote them, so a line ahead of its SKU row is ignored.
  A batch's order lines are one changelog record per partition, not one per order (more only
  when long ids could make one outgrow a Kafka message), and all its changes of a partition go
  out as one Kafka record batch unless they outgrow one.
- A replayed command already in the state is skipped by offset; one whose state did not
  survive is decided again from the same prior state, giving the same event (same id, same
  version), which every reader drops as a repeat.
- Retries (the same command id published again) are recognised within a bounded window of
  recent commands per partition, whose ids each batch saves in the table; a worker taking a
  partition over reads what they do not cover back from the commands topic
  (``processors.dedupe``).
- Faust's stream was seen to start past unhandled commands after a worker was SIGKILLed and
  replaced; the handler notices the jump and reads the missed range from Kafka first.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import os
import socket
import sys
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

import faust
import orjson
from aiokafka.errors import KafkaError
from faust.types import TP, ProducerT, StreamT, TopicT

from processors.dedupe import RecentCommands, decided_command_ids, refusal
from processors.domain import OrderLine, Stock, decide, evolve
from processors.transport import Consumer, Transport
from schemas.codec import MAX_FRAME_BYTES, codec
from schemas.records import (
    CancelOrder,
    Command,
    Event,
    OrderCancelled,
    OrderProcessed,
    PlaceOrder,
)
from stockflow import metrics
from stockflow.errors import DecodeError
from stockflow.logreader import Latest, Logged, read_latest, read_range
from stockflow.settings import Settings
from stockflow.topics import PROCESSOR_TABLES

log = logging.getLogger(__name__)

# Reads the records of one partition of the commands topic with offsets in [start, end).
ReadRange = Callable[[int, int, int], Awaitable[list[Logged]]]
# Commits {commands partition: offset} as the group's member; False if the worker no longer
# holds them all (processors.transport.Consumer.commit_as_member).
CommitAsMember = Callable[[dict[int, int]], Awaitable[bool]]

# The changelog's keys and values are compact JSON, what Faust's own "json" serializer reads and
# writes. orjson, not the json module: encoding a batch's records took 18,200 instructions per
# command with json's C encoder and takes 4,600 with orjson; reading them back in a restore
# 25,500 and 7,700 (callgrind, 2,000 uniform orders a round). Tuples are written as arrays.
to_json = orjson.dumps
from_json = orjson.loads

# An order line as the table keeps it: (qty, placed_at, cancelled_at, placed_ms): the offsets of
# the commands that placed and cancelled it (-1 = not yet), and when the broker appended the one
# that placed it; a JSON array in the changelog. A tuple, not a list: a tuple of ints drops out
# of the garbage collector's view, and with a list per order each full collection paused the
# processor for longer (45 ms at 100,000 orders, 130 ms at 300,000).
Line = tuple[int, int, int, int]


def line_key(sku: str, order_id: str) -> str:
    """The key of a SKU's order line in a partition's index and its changelog's l: records.

    ``<sku>/<order_id>`` names one line only while the SKU holds no "/": SKU "K" with order
    "RED/o" and SKU "K/RED" with order "o" would share one. A SKU with a "/" gets a key with no
    "/" at all, so no ``<sku>/<order_id>`` key can be it: both parts percent-encoded, joined by
    a space. The keys of the other SKUs stay as the changelogs already hold them. (A line such
    a SKU got under the old key is not found, and a cancel of it is refused as past the window.)
    """
    if "/" in sku:
        return f"{quote(sku, safe='')} {quote(order_id, safe='')}"
    return f"{sku}/{order_id}"


# A changelog record is one Kafka message, so a batch's order lines or ids on a partition are
# cut into several records when their JSON could outgrow a frame (long ids only). JSON takes at
# most 6 bytes a character (orjson writes a control character as \u00XX); an order line's four
# numbers take at most 100 with their punctuation.
JSON_BYTES_PER_CHAR = 6
LINE_NUMBERS_BYTES = 100
ID_QUOTES_BYTES = 3


def within_a_message(texts: list[str], overhead: int) -> list[slice]:
    """Runs of a changelog record's entries, known by their ids (``texts``, in order), whose
    JSON takes at most MAX_FRAME_BYTES, each entry ``overhead`` bytes besides its id: one run
    unless the ids are long. Bounded first by their length (cutting entry by entry cost 0.7 us
    a command), then, only if that bound is over, cut by each id's JSON. None for no entries."""
    if not texts:
        return []
    if JSON_BYTES_PER_CHAR * sum(map(len, texts)) + overhead * len(texts) <= MAX_FRAME_BYTES:
        return [slice(0, len(texts))]
    runs, start, total = [], 0, 0
    for index, text in enumerate(texts):
        cost = len(to_json(text)) + overhead
        if index > start and total + cost > MAX_FRAME_BYTES:
            runs.append(slice(start, index))
            start, total = index, 0
        total += cost
    runs.append(slice(start, len(texts)))
    return runs


# A line is forgotten once the cancel window has passed since it was placed plus this much (or
# plus the window, if shorter): a command appended later must find it past the window even if
# the broker's clock stepped back by less than this meanwhile.
CLOCK_SLACK_MS = 60_000


class LineIndex(dict[str, Line]):
    """A partition's order lines by ``line_key(sku, order_id)``: hundreds of thousands of them.

    A dict subclass only so that the garbage collector keeps tracking it. It stops tracking a
    plain dict whose values it does not track (tuples of ints) in each full pass, and starts
    again when the next line goes in, as a young object: so it never stayed frozen (see
    ``freeze_after_full_pass``), and each full pass walked every partition's index whole,
    250,000-490,000 references each with 2 million orders held.
    """


# Kafka's timestamp type of a record the broker stamped when it appended it (aiokafka's value).
LOG_APPEND_TIME = 1

# Events per EventBatch frame (an event is ~150 bytes): fewer when long ids make a frame larger
# than a Kafka message may be (``codec.encode_batches``).
EVENTS_PER_FRAME = 1000

# Container allocations between the garbage collector's young passes (Python's default: 700).
# A batch keeps tens of thousands of objects alive until it is saved, and at 700 the passes
# kept walking them and moving them on to the older generations: collection took 5-6% of a
# flat-out processor's time, against 1.7-2.4% at 10,000. Higher cuts it further but makes each
# young pass longer: up to 20-50 ms at 50,000, against 15-30 ms at 10,000.
GC_YOUNG_THRESHOLD = 10_000


def tune_garbage_collector() -> None:
    """Set the collector up for a worker holding a large, long-lived state.

    The modules, Faust and its clients, set up by now, live as long as the worker: frozen,
    they are left out of the full passes, which took 40-60 ms each with them in.
    """
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    if freeze_after_full_pass not in gc.callbacks:
        gc.callbacks.append(freeze_after_full_pass)


def freeze_after_full_pass(phase: str, info: dict[str, int]) -> None:
    """Keep what survived a full pass of the garbage collector out of the next ones.

    What survives one is mostly the worker's state, which grows with every order in the cancel
    window: walked by every full pass, it made them longer as it grew (up to 870 ms with 2
    million orders held). Frozen right after a pass, nothing frozen is garbage the pass had
    yet to find. An object frozen is not freed if it later ends up in a reference cycle; the
    state is dropped by reference counting, and the full passes logged (gc.DEBUG_STATS) while
    the processor ran flat out found no unreachable object at all.
    """
    if phase == "stop" and info["generation"] == 2:
        gc.freeze()


def broker_url(bootstrap_servers: str) -> str:
    return ";".join(f"kafka://{server.strip()}" for server in bootstrap_servers.split(","))


class StateTable(faust.Table[str, Any]):
    """A Faust table whose writes name their changelog partition and are sent directly.

    A plain table takes the changelog partition from the event being iterated, so it can only
    be written inside per-event iteration, and queues each write in Faust's producer buffer,
    which throttles the stream once it holds 100 messages. The processor writes a whole batch
    after its events are acknowledged, so it names each write's partition and sends it itself.
    Keys and values are JSON, as Faust's own "json" serializer writes them (recovery reads them
    back with it), encoded here without the serializer registry, which cost a fifth of a write.

    It also restores itself. Faust's recovery reads a changelog record by record through its
    stream machinery, about 3,000 records a second here: 26 s for the 78,000 records a million
    orders leave. So when the worker is given partitions, the table reads their changelogs
    itself, with a confluent-kafka consumer, and tells Faust it has them up to their ends
    (``persisted_offset``), so Faust's recovery finds nothing left to read.
    """

    def __init__(self, app: faust.App, *, settings: Settings, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.settings = settings
        # Changelog partitions this worker holds up to date as their active owner -> the offset
        # they are restored up to, which Faust's recovery starts after.
        self.restored: dict[TP, int] = {}
        # Partitions restored anew since the handler last indexed them: its index of their
        # order lines points at the records the store held before.
        self.reloaded: set[int] = set()
        self.member_id: str | None = None  # this worker's in the group, as of the last rebalance

    def persisted_offset(self, tp: TP) -> int | None:
        return self.restored.get(tp)

    async def on_rebalance(
        self, assigned: set[TP], revoked: set[TP], newly_assigned: set[TP], generation_id: int = 0
    ) -> None:
        """Restore the changelog partitions this worker has just become the owner of; for the
        ones it keeps, its memory already holds everything up to their ends."""
        await super().on_rebalance(assigned, revoked, newly_assigned, generation_id)
        member_id = cast(Any, self.app.consumer)._thread._consumer._coordinator.member_id
        if self.member_id is not None and member_id != self.member_id:
            # The group dropped this worker (paused or cut off past its session timeout) and took
            # it back as a new member. Others may have held its partitions meanwhile and written
            # their changelogs: what its memory holds of them is not to be trusted.
            log.warning("rejoined the group as a new member: restoring every partition given")
            self.restored = {}
        self.member_id = member_id
        topic = self.changelog_topic.get_topic_name()
        actives = {tp for tp in self.app.assignor.assigned_actives() if tp.topic == topic}
        kept = [tp for tp in actives if tp in self.restored]
        new = sorted(tp.partition for tp in actives if tp not in self.restored)
        self.restored = {}
        await self.app.producer.flush()  # this worker's own writes: in the log, below its end
        if kept:
            ends = await self.app.consumer.highwaters(*kept)
            self.restored = {tp: ends[tp] - 1 for tp in kept}
        if new:
            started = time.monotonic()
            loop = asyncio.get_running_loop()
            latest = await loop.run_in_executor(None, read_latest, self.settings, topic, new)
            # Values parsed from JSON hold no reference cycles, so the collector has nothing to
            # find among them: it is off while they are built (it walked the millions of lists
            # a restore builds several times over), and they are kept out of its passes after.
            gc.disable()
            try:
                keys = self._apply(latest)
            finally:
                gc.enable()
            gc.freeze()
            self.reloaded |= set(new)
            self.restored |= {TP(topic, partition): part.last_offset for partition, part in latest.items()}
            log.info(
                "restored %s keys of changelog partitions %s from %s records in %.1fs",
                keys,
                new,
                sum(part.records for part in latest.values()),
                time.monotonic() - started,
            )

    def _apply(self, latest: dict[int, Latest]) -> int:
        """Replace what the store holds of these partitions with what their changelogs hold."""
        store = cast(Any, self.data)  # Faust's memory store: the dict, and each key's partition
        data, key_partition = store.data, store._key_partition
        for key in [key for key, partition in key_partition.items() if partition in latest]:
            data.pop(key, None)  # left from an earlier turn as owner: the changelog has it anew
            del key_partition[key]
        for partition, part in latest.items():
            for key_bytes, value_bytes in part.values.items():
                key = from_json(key_bytes)
                if value_bytes is None:  # deleted
                    data.pop(key, None)
                else:
                    data[key] = from_json(value_bytes)
                    key_partition[key] = partition
        return sum(1 for partition in key_partition.values() if partition in latest)

    def encode(self, changes: Sequence[tuple[str, Any]]) -> list[Any]:
        """``changes`` (key, value; None deletes the key) as Kafka record batches for the
        changelog, built here (aiokafka's create_batch), usually one: a record batch is appended
        to the log whole, and a change costs about 2 us this way against about 9 us as a send of
        its own (one future each). Nothing is sent, and the store is not changed yet."""
        producer = cast(Any, self.app.producer)._ensure_producer()  # Faust's aiokafka producer
        batches = [producer.create_batch()]
        for key, value in changes:
            key_bytes = to_json(key)
            value_bytes = None if value is None else to_json(value)  # None: a tombstone
            # None: the batch is full. Start another, which takes any one record.
            while batches[-1].append(key=key_bytes, value=value_bytes, timestamp=None) is None:
                batches.append(producer.create_batch())
        return batches

    async def write(self, partition: int, changes: Sequence[tuple[str, Any]], batches: list[Any]) -> None:
        """Set each key to its value (None deletes it) and send ``batches``, the changes as
        ``encode`` gave them, to one changelog partition, in order."""
        producer = cast(Any, self.app.producer)._ensure_producer()
        topic = self.changelog_topic.get_topic_name()
        store = cast(Any, self.data)
        # Each key's partition, as Faust's memory store notes it when it restores a key: when
        # the partition goes to another worker, the store drops its keys after the rebalance.
        data, key_partition = store.data, store._key_partition
        for key, value in changes:
            if value is None:
                data.pop(key, None)
                key_partition.pop(key, None)
            else:
                data[key] = value
                key_partition[key] = partition
        for batch in batches:
            await producer.send_batch(batch, topic, partition=partition)


@dataclass
class Working:
    """One SKU's state while a batch is being decided.

    Each command is decided on a ``Stock`` holding only what it touches (its order line, its
    id if a retry), the slice ``decide`` looks at: a Stock carrying the batch's every order and
    id would be copied by each ``evolve``, quadratic in a hot SKU's share of the batch.
    """

    available: int
    version: int
    orders: dict[str, OrderLine]  # order lines this batch has loaded or changed
    placed_ms: dict[str, int]  # when the broker appended the command that placed each of those
    partition: int
    saved_offset: int  # offset of the last command applied, as the table has it
    offset: int  # offset of the last command applied, including this batch


@dataclass
class Batch:
    """What a batch of commands changes, held until the broker has acknowledged its events."""

    skus: dict[str, Working] = field(default_factory=dict)
    lines: dict[int, dict[str, Line]] = field(default_factory=dict)  # partition -> new lines
    events: dict[int, list[Event]] = field(default_factory=dict)  # partition -> events, in order
    deliveries: list[Awaitable[Any]] = field(default_factory=list)
    handled: dict[int, int] = field(default_factory=dict)  # partition -> last offset handled
    first: dict[int, int] = field(default_factory=dict)  # partition -> first offset handled
    commands: int = 0


class CommandHandler:
    """Decides batches of command messages against the table. Table keys:

    - ``s:<sku>``: ``{"available", "version", "offset"}``, offset of the last command applied
    - ``l:<partition>:<n>``: the order lines a batch placed or cancelled on the partition,
      ``{line_key(sku, order_id): [qty, placed_at, cancelled_at, placed_ms]}`` (see ``Line``), what
      a cancel needs; n counts up, and a later record's line replaces an earlier one. A record
      is deleted once every line in it is past the cancel window: a cancel could not reach
      them, so memory holds about one window of orders
    - ``r:<partition>:<n>``: ``[first, last, ids]``, the ids of the commands a batch decided on
      the partition (the retry window's), from the messages at offsets first..last. The oldest
      records are deleted while the newer ones still hold a window's worth of ids
    - ``p:<partition>``: offset of the last command message handled on that partition

    Reads go to ``table.data`` (the store) directly: a Table's own get() takes a slow path
    through __missing__ for every key it lacks, and most order ids are new.
    """

    def __init__(
        self,
        settings: Settings,
        table: StateTable,
        producer: ProducerT,
        read_commands: ReadRange,
        commit_as_member: CommitAsMember,
    ) -> None:
        self.settings = settings
        self.table = table
        # Faust's own producer (aiokafka), used directly: a Faust Topic.send costs about as
        # much again per message in bookkeeping this handler does not need.
        self.producer = producer
        self.read_commands = read_commands
        self.commit_as_member = commit_as_member
        self.lines: dict[int, LineIndex] = {}  # partition -> order lines saved, not forgotten
        self.next_chunk: dict[int, int] = {}  # partition -> n of its next l: record
        # partition -> (n, newest placed_ms) of each of its l: records, oldest first
        self.chunks: dict[int, deque[tuple[int, int]]] = {}
        self.appended_ms: dict[int, int] = {}  # partition -> newest broker time of a command handled
        self.window_ms = round(settings.cancel_window_s * 1000)
        self.timestamps_checked = False
        self.recent: dict[int, RecentCommands] = {}
        # partition -> (n, how many ids) of each of its r: records, oldest first; their ids in
        # all; the n of its next one; records a crash left ahead of the handled offset
        self.id_records: dict[int, deque[tuple[int, int]]] = {}
        self.saved_ids: dict[int, int] = {}
        self.next_id_record: dict[int, int] = {}
        self.stale_id_records: dict[int, list[str]] = {}
        self.last_batch_at = time.monotonic()

    def check_timestamp_type(self, timestamp_type: int) -> None:
        """Warn, once, if the commands topic carries the publishers' timestamps."""
        if not self.timestamps_checked and timestamp_type != LOG_APPEND_TIME:
            log.warning(
                "%s has the publishers' timestamps, so their clocks measure the cancel window: set"
                " message.timestamp.type=LogAppendTime on it (README: Processor state)",
                self.settings.commands_topic,
            )
        self.timestamps_checked = True

    async def handle_batch(self, messages: Sequence[Logged]) -> None:
        """Decide a batch; returns once its events are in the log and its state is saved.

        Messages may be batch frames, so the work is cut into rounds of about
        STOCKFLOW_PROCESSOR_BATCH_SIZE commands, each ending with one wait for the broker.
        """
        self.last_batch_at = time.monotonic()
        batch = Batch()
        for partition in sorted({message.partition for message in messages}):
            await self._take_over_if_needed(partition)
        for message in messages:
            recent = self.recent[message.partition]
            if message.offset <= recent.last_offset:
                continue  # replayed after a restart; handled before the crash
            if message.offset > recent.last_offset + 1:
                await self._repair_gap(message, recent.last_offset + 1, batch)
            await self._handle(message, batch)
            if batch.commands >= self.settings.processor_batch_size:
                if not await self._complete(batch):
                    return  # the rest comes again, to whoever holds its partitions now
                batch = Batch()
        await self._complete(batch)

    async def _complete(self, batch: Batch) -> bool:
        """Send the batch's events and, once they are in the log, save its state; False if the
        worker turned out to have lost its partitions, and saved nothing.

        The save waits for the broker to confirm the worker is still the group's member holding
        the partitions. A worker paused or cut off past its session timeout (a stopped process,
        a frozen VM, a network partition) has been replaced, and the worker given its partitions
        restored their table and went on. Its save, landing after that worker's, would put older
        SKU rows and order lines last in the changelog, and the next worker to restore them
        would decide from them: seen on a stack, a processor stopped for 40 s mid-load left 36 SKU
        rows older than the log, and once the other one was killed, versions already in the log
        were decided again from them. Its events are harmless: decided
        from the same table, the same commands give the same events (same ids and versions),
        which the read models and verify take as repeats.
        """
        await self._send_events(batch)
        # The state's records are built while the broker takes the events, so that once it has
        # confirmed the membership only handing them to the producer is left: a pause between
        # the two would still land the save late. On a debug stack at 2,000 orders/s (batches of
        # 100-115 commands) that took 0.37-0.44 ms at the median, against 1.0-1.3 ms with the
        # records built after the confirmation; 4.7 ms for batches of 2,300 commands flat out.
        offsets = {partition: self.saved_offset(partition) + 1 for partition in batch.handled}
        changes = self._changes(batch)
        encoded = {partition: self.table.encode(records) for partition, records in changes.items()}
        await asyncio.gather(*batch.deliveries)
        if offsets and not await self.commit_as_member(offsets):
            self._drop_unsaved(batch)
            return False
        for partition, records in changes.items():
            await self.table.write(partition, records, encoded[partition])
        return True

    def _drop_unsaved(self, batch: Batch) -> None:
        """Forget what a batch that could not be saved decided: its partitions' retry windows and
        indexes of order lines and records are built again from the table
        (``_take_over_if_needed``), which holds the state before the batch (``_changes`` moved
        the indexes on, but only ``write`` changes the table), and its commands are decided
        again by whoever holds them next."""
        metrics.SAVES_REFUSED.inc()
        for partition in batch.handled:
            del self.recent[partition]
        log.warning(
            "the group no longer gives this worker commands partitions %s (it was paused or cut off"
            " past STOCKFLOW_PROCESSOR_SESSION_TIMEOUT_S, or the group is rebalancing): their batch"
            " of %s commands is not saved; its commands will be decided again by their holder",
            sorted(batch.handled),
            batch.commands,
        )

    def saved_offset(self, partition: int) -> int:
        """The offset of the last command the table records as handled on ``partition``, -1 if
        none: saved once the events of its batch were acknowledged."""
        saved = self.table.data.get(f"p:{partition}")
        return -1 if saved is None else int(saved)

    def handled_offset(self, partition: int) -> int:
        """The offset of the last command message handled on ``partition``: as this worker's
        batches left it, else as its table has it (no batch has reached the partition since it
        was assigned, as on a restarted worker with no new commands)."""
        recent = self.recent.get(partition)
        return recent.last_offset if recent is not None else self.saved_offset(partition)

    async def _take_over_if_needed(self, partition: int) -> None:
        """Rebuild a partition's retry window unless this worker has handled it all along."""
        handled = self.saved_offset(partition)
        recent = self.recent.get(partition)
        if recent is not None and recent.last_offset == handled and partition not in self.table.reloaded:
            return
        self.table.reloaded.discard(partition)
        size = self.settings.dedupe_window
        saved, first = self._index_ids(partition, handled)
        # What the saved ids do not cover, older commands read back from the log.
        older = await self._recent_ids(partition, first - 1, size - len(saved)) if len(saved) < size else []
        recent = RecentCommands(size, last_offset=handled, saved=(older + saved)[-size:])
        self.recent[partition] = recent
        self._index_lines(partition)
        log.info(
            "partition %s: resuming after offset %s with %s recent command ids (%s read from the log)",
            partition,
            handled,
            len(recent),
            len(older),
        )

    def _index_ids(self, partition: int, handled: int) -> tuple[list[str], int]:
        """The retry window's ids the table holds for the partition, oldest first, and the
        offset of the first message they cover (``handled`` + 1 if none).

        A record of a batch past the handled offset was saved by a worker that crashed before
        the batch's offset was: its commands will be decided again, and saved again in a new
        record, so it is deleted.
        """
        prefix = f"r:{partition}:"
        records = self._numbered(prefix)
        valid = [(n, first, ids) for n, (first, last, ids) in records if last <= handled]
        self.stale_id_records[partition] = [f"{prefix}{n}" for n, (_f, last, _i) in records if last > handled]
        self.id_records[partition] = deque((n, len(ids)) for n, _first, ids in valid)
        self.saved_ids[partition] = sum(len(ids) for _n, _first, ids in valid)
        self.next_id_record[partition] = records[-1][0] + 1 if records else 0
        saved = [command_id for _n, _first, ids in valid for command_id in ids]
        return saved, valid[0][1] if valid else handled + 1

    def _index_lines(self, partition: int) -> None:
        """Index the partition's order lines as the table holds them, newest record last."""
        prefix = f"l:{partition}:"
        chunks = self._numbered(prefix)
        lines = LineIndex()
        self.chunks[partition] = deque()
        for n, restored in chunks:
            # JSON gave lists. A line saved before there was a cancel window has no placed_ms:
            # it counts as placed long ago.
            chunk: dict[str, Line] = {name: (*line, 0)[:4] for name, line in restored.items()}
            self.table.data[f"{prefix}{n}"] = chunk
            lines.update(chunk)
            self.chunks[partition].append((n, max((line[3] for line in chunk.values()), default=0)))
        self.lines[partition] = lines
        self.next_chunk[partition] = chunks[-1][0] + 1 if chunks else 0

    def _numbered(self, prefix: str) -> list[tuple[int, Any]]:
        """(n, value) of the table's ``<prefix><n>`` records (l: or r: of a partition), by n."""
        return sorted(
            (int(key[len(prefix) :]), value)
            for key, value in self.table.data.items()
            if key.startswith(prefix)
        )

    async def _recent_ids(self, partition: int, handled: int, size: int) -> list[str]:
        """The ids of the last ``size`` commands decided up to offset ``handled``, from the log.

        Read backwards in steps, as many messages as the commands still missing need at the
        commands-per-message seen so far: a window of batch frames is a few messages.
        """
        chunks: list[list[str]] = []
        found, end, step = 0, handled + 1, min(size, 100)
        while found < size and end > 0:
            start = max(0, end - step)
            messages = await self.read_commands(partition, start, end)
            ids = [
                command_id
                for message in messages
                for command_id in decided_command_ids(message, self.settings.partitions)
                if command_id is not None
            ]
            chunks.append(ids)
            found += len(ids)
            if not messages or messages[0].offset > start:
                break  # the older commands are gone by retention
            per_message = found / (handled + 1 - start)
            step = min(size, math.ceil((size - found) / max(per_message, 1 / size)))
            end = start
        return [command_id for ids in reversed(chunks) for command_id in ids][-size:]

    async def _repair_gap(self, message: Logged, start: int, batch: Batch) -> None:
        # Faust's stream skipped commands nobody had handled (seen after a worker was SIGKILLed
        # and replaced). Read them from Kafka and handle them first, in order.
        log.warning(
            "commands %s[%s] %s..%s were skipped by the stream; handling them now",
            message.topic,
            message.partition,
            start,
            message.offset - 1,
        )
        for missed in await self.read_commands(message.partition, start, message.offset):
            await self._handle(missed, batch)

    async def _handle(self, message: Logged, batch: Batch) -> None:
        try:
            commands = codec.decode_commands(message.value)
        except DecodeError as exc:
            await self._park(message, str(exc), type(exc).__name__, batch)
            commands = []
        batch.commands += len(commands)
        appended = self.appended_ms.get(message.partition, 0)
        self.appended_ms[message.partition] = max(appended, message.timestamp_ms)
        sampled = False
        for index, command in enumerate(commands):
            refused = refusal(command, message.partition, self.settings.partitions)
            if refused is not None:
                # A command parked out of a batch frame goes to the DLQ on its own, redrivable.
                item = None if len(commands) == 1 else (index, command)
                await self._park(message, *refused, batch, item)
                continue
            if self._decide(command, message, batch) and not sampled:
                # One latency sample per message: a frame's commands were created within a few
                # ms of each other, and a sample per command cost the processor 7% of its time.
                metrics.DECIDED_LATENCY.observe(time.time() - command.occurred_at / 1000)
                sampled = True
        batch.first.setdefault(message.partition, message.offset)
        batch.handled[message.partition] = message.offset

    def _decide(self, command: Command, message: Logged, batch: Batch) -> bool:
        """Decide one command into the batch; False if it was decided before a restart."""
        working = batch.skus.get(command.sku) or self._load(command.sku, message.partition)
        batch.skus[command.sku] = working
        recent = self.recent[message.partition]
        if message.offset <= working.saved_offset:
            recent.handled(message.offset, command.command_id)
            return False  # replayed after a restart: its effects and events are already there
        # A command id among the partition's recent commands is a publisher's retry.
        seen = frozenset({command.command_id}) if command.command_id in recent else frozenset()
        if seen:
            metrics.COMMAND_RETRIES.inc()
        orders: dict[str, OrderLine] = {}
        if isinstance(command, (PlaceOrder, CancelOrder)):
            line = self._order_line(working, command.sku, command.order_id, message.timestamp_ms)
            orders = {command.order_id: line} if line else {}
        state = Stock(command.sku, working.available, working.version, orders, decided=seen)
        now_ms = int(time.time() * 1000)
        for decision in decide(state, command, now_ms):
            state = evolve(state, decision)
            if isinstance(decision, OrderProcessed):
                working.placed_ms[decision.order_id] = message.timestamp_ms
            self._remember_line(decision, message, batch)
            batch.events.setdefault(message.partition, []).append(decision)
        recent.handled(message.offset, command.command_id)
        working.available, working.version = state.available, state.version
        working.orders.update(state.orders)
        working.offset = message.offset
        return True

    def _load(self, sku: str, partition: int) -> Working:
        row = self.table.data.get(f"s:{sku}") or {"available": 0, "version": 0, "offset": -1}
        return Working(row["available"], row["version"], {}, {}, partition, row["offset"], row["offset"])

    def _order_line(self, working: Working, sku: str, order_id: str, now_ms: int) -> OrderLine | None:
        """The order's line as this batch left it, else as the table has it; None if it has
        none, or if more than the cancel window has passed between its placing and ``now_ms``
        (when the broker appended the command asking): then it is as good as forgotten."""
        if order_id in working.orders:
            line = working.orders[order_id]
        else:
            saved = self.lines[working.partition].get(line_key(sku, order_id))
            # A line written after its SKU row was saved belongs to commands that will be
            # decided again: a crash kept the line but not the row.
            if saved is None or saved[1] > working.saved_offset:
                return None
            qty, _placed_at, cancelled_at, placed_ms = saved
            line = OrderLine(qty, 0 <= cancelled_at <= working.saved_offset)
            working.placed_ms[order_id] = placed_ms
        if now_ms - working.placed_ms[order_id] > self.window_ms:
            return None
        return line

    def _remember_line(self, decision: Event, message: Logged, batch: Batch) -> None:
        partition = message.partition
        if isinstance(decision, OrderProcessed):
            key = line_key(decision.sku, decision.order_id)
            line = (decision.qty, message.offset, -1, message.timestamp_ms)
            batch.lines.setdefault(partition, {})[key] = line
        elif isinstance(decision, OrderCancelled):
            key = line_key(decision.sku, decision.order_id)
            new = batch.lines.setdefault(partition, {})
            qty, placed_at, _, placed_ms = new.get(key) or self.lines[partition][key]
            new[key] = (qty, placed_at, message.offset, placed_ms)

    async def _send_events(self, batch: Batch) -> None:
        for partition, events in batch.events.items():
            for frame, value in codec.encode_batches(events, EVENTS_PER_FRAME):
                delivery = await self.producer.send(
                    self.settings.events_topic,
                    None,  # the partition is named; the frame holds many SKUs of it
                    value,
                    partition,
                    None,
                    [("type", b"EventBatch"), ("count", str(len(frame)).encode())],
                )
                batch.deliveries.append(delivery)
            for kind, count in Counter(type(event).__name__ for event in events).items():
                metrics.COMMANDS_DECIDED.labels(kind).inc(count)

    def _changes(self, batch: Batch) -> dict[int, list[tuple[str, Any]]]:
        """What saving the batch writes to each changelog partition, in order; the indexes of
        order lines and records move on with it.

        Order matters within a partition: a crash keeps a prefix of its changes, so its order
        lines go first, then its SKU rows, then the offset it has handled."""
        changes: dict[int, list[tuple[str, Any]]] = {}
        # Before this batch's records join them: only records already in the table are dropped.
        forgotten = {partition: self._forget_past_window(partition) for partition in batch.handled}
        for partition, lines in batch.lines.items():
            names = list(lines)
            runs = within_a_message(names, LINE_NUMBERS_BYTES)
            records = (
                [lines] if len(runs) == 1 else [{name: lines[name] for name in names[run]} for run in runs]
            )
            for record in records:
                chunk = self.next_chunk[partition]
                self.next_chunk[partition] = chunk + 1
                changes.setdefault(partition, []).append((f"l:{partition}:{chunk}", record))
                self.lines[partition].update(record)
                self.chunks[partition].append((chunk, max(line[3] for line in record.values())))
        for partition, last in batch.handled.items():
            changes.setdefault(partition, []).extend(self._save_ids(partition, batch.first[partition], last))
        for sku, working in batch.skus.items():
            if working.offset != working.saved_offset:
                row = {"available": working.available, "version": working.version, "offset": working.offset}
                changes.setdefault(working.partition, []).append((f"s:{sku}", row))
        for partition, offset in batch.handled.items():
            changes.setdefault(partition, []).append((f"p:{partition}", offset))
            # Last: a deletion a crash kept comes with everything before it, so no command
            # appended before the newest one handled here will be decided again.
            changes[partition] += forgotten[partition] + self._trim_ids(partition)
            metrics.ORDER_LINES.labels(partition).set(len(self.lines[partition]))
        return changes

    def _save_ids(self, partition: int, first: int, last: int) -> list[tuple[str, Any]]:
        """The batch's retry-window ids as an r: record (several if they are long), after
        deleting any a crash left stale (before the partition's handled offset moves past them,
        or they would look valid)."""
        changes: list[tuple[str, Any]] = [(key, None) for key in self.stale_id_records[partition]]
        self.stale_id_records[partition] = []
        ids = self.recent[partition].take_unsaved()
        for run in within_a_message(ids, ID_QUOTES_BYTES):
            record_ids = ids[run]
            n = self.next_id_record[partition]
            self.next_id_record[partition] = n + 1
            changes.append((f"r:{partition}:{n}", [first, last, record_ids]))
            self.id_records[partition].append((n, len(record_ids)))
            self.saved_ids[partition] += len(record_ids)
        return changes

    def _trim_ids(self, partition: int) -> list[tuple[str, None]]:
        """Delete the partition's oldest r: records the newer ones no longer need: those still
        hold a whole window. Written after the handled offset, as the records that replace
        them are before it."""
        records, deletions = self.id_records[partition], []
        while records and self.saved_ids[partition] - records[0][1] >= self.settings.dedupe_window:
            n, count = records.popleft()
            self.saved_ids[partition] -= count
            deletions.append((f"r:{partition}:{n}", None))
        return deletions

    def _forget_past_window(self, partition: int) -> list[tuple[str, None]]:
        """Drop the partition's oldest l: records whose every line was placed more than the
        cancel window (and the clock slack) before the newest command handled; their deletions.

        Such a line reads as absent to every command appended since (``_order_line``), so
        dropping it changes no decision, whenever it happens.
        """
        horizon = self.appended_ms[partition] - self.window_ms - min(CLOCK_SLACK_MS, self.window_ms)
        chunks, lines = self.chunks[partition], self.lines[partition]
        deletions: list[tuple[str, None]] = []
        while chunks and chunks[0][1] < horizon:
            key = f"l:{partition}:{chunks.popleft()[0]}"
            for name, line in self.table.data[key].items():
                if lines.get(name) is line:  # not replaced by a later record (a cancel)
                    del lines[name]
            deletions.append((key, None))
        return deletions

    async def _park(
        self,
        message: Logged,
        reason: str,
        error_type: str,
        batch: Batch,
        item: tuple[int, Command] | None = None,
    ) -> None:
        """Send the message to the DLQ with the reason, or only ``item``: (place, command) in it."""
        metrics.DEAD_LETTERS.labels(error_type).inc()
        self.recent[message.partition].handled(message.offset, None)
        headers = [
            ("error.reason", reason.encode()),
            ("error.type", error_type.encode()),
            ("source.topic", message.topic.encode()),
            ("source.partition", str(message.partition).encode()),
            ("source.offset", str(message.offset).encode()),
        ]
        value = message.value
        if item is not None:
            headers.append(("source.index", str(item[0]).encode()))
            value = codec.encode(item[1])
        delivery = await self.producer.send(self.settings.dlq_topic, message.key, value, None, None, headers)
        batch.deliveries.append(delivery)


def stalled(waiting: dict[int, int], idle_s: float, limit_s: float) -> bool:
    """True when commands wait on some partition but none has reached the agent for ``limit_s``.

    Faust's stream has been reported to stop delivering after a rebalance, with no error
    (faust-streaming issues 175, 523, 532); it was seen here once, with two processors.
    """
    return idle_s >= limit_s and any(count > 0 for count in waiting.values())


def stall_report(app: faust.App) -> str:
    """What a stalled worker's consumer, recovery and agent were doing: Faust's internals, read
    for the log only, so the cause of a stall can be found after the worker is gone."""
    try:
        return _describe(app)
    except Exception as exc:  # it reads Faust's internals, and must not stop the restart
        return f"unknown: {exc!r}"


def _describe(app: faust.App) -> str:
    consumer = cast(Any, app.consumer)
    recovery = cast(Any, app.tables).recovery
    state = {
        "assigned": sorted(f"{tp.topic}[{tp.partition}]" for tp in consumer.assignment()),
        "paused by faust": sorted(f"{tp.topic}[{tp.partition}]" for tp in consumer._paused_partitions),
        "paused in aiokafka": sorted(
            f"{tp.topic}[{tp.partition}]" for tp in consumer._thread._consumer.paused()
        ),
        "flow control active": app.flow_control.is_active(),
        "rebalancing": app.rebalancing,
        "in recovery": recovery.in_recovery,
        "recovery restart signalled": recovery.signal_recovery_start.is_set(),
        "unacked messages": len(consumer._unacked_messages),
    }
    return f"{state}\n{app.agents.human_tracebacks()}"


def create_app(settings: Settings, data_dir: Path, web_port: int | None = None) -> faust.App:
    data_dir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.processor_group,
        broker=broker_url(settings.bootstrap_servers),
        store="memory://",
        datadir=str(data_dir),
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        producer_acks=-1,
        # The committed offset is what lag, `stockflow status` and publishers' backpressure
        # read; Faust's default of 2.8 s makes it trail far behind the work done.
        broker_commit_interval=0.5,
        # No standby copies of other workers' partitions: Faust would keep them current record
        # by record through its recovery path, and a standby made active is read from its
        # start anyway (the memory store has no persisted offset). A worker given a partition
        # restores it in seconds (StateTable). Workers on one host were given no standbys
        # even at Faust's default of 1 (checked with two): this matters across hosts.
        table_standby_replicas=0,
        broker_session_timeout=settings.processor_session_timeout_s,
        broker_client_id=f"stockflow-processor-{socket.gethostname()}-{os.getpid()}",
        web_enabled=web_port is not None,
        web_port=web_port or 6066,
    )

    # Faust's transport, but with a fetch wait that cannot stall the agent (processors.transport).
    app.transport = Transport(app.conf.broker_consumer, app)

    def raw_topic(name: str) -> TopicT:
        return app.topic(name, partitions=settings.partitions, key_serializer="raw", value_serializer="raw")

    async def read_commands(partition: int, start: int, end: int) -> list[Logged]:
        loop = asyncio.get_running_loop()
        topic = settings.commands_topic
        return await loop.run_in_executor(None, read_range, settings, topic, partition, start, end)

    # One table, so everything a command changes goes to one changelog partition, in order.
    # Its changelog topic is created by stockflow.topics.ensure_topics.
    table = StateTable(
        app,
        settings=settings,
        name=PROCESSOR_TABLES[0],
        beacon=app.tables.beacon,
        partitions=settings.partitions,
        key_type=str,
    )
    app.tables.add(table)

    async def commit_as_member(offsets: dict[int, int]) -> bool:
        consumer = cast(Consumer, app.consumer)  # built by processors.transport
        tps = {TP(settings.commands_topic, partition): offset for partition, offset in offsets.items()}
        return await consumer.commit_as_member(tps)

    handler = CommandHandler(settings, table, app.producer, read_commands, commit_as_member)

    def committable(tp: TP) -> int | None:
        """One past the last command handled on a commands partition, as the table has it (Faust
        flushes the producer before it commits, so the save is in the changelog first)."""
        handled = handler.saved_offset(tp.partition) if tp.topic == settings.commands_topic else -1
        return None if handled < 0 else handled + 1

    @app.agent(raw_topic(settings.commands_topic))
    async def process(stream: StreamT[bytes]) -> None:
        # take_events is on faust.Stream, the class every agent gets, not on the StreamT protocol.
        batches = cast(faust.Stream[bytes], stream).take_events(
            settings.processor_batch_size, within=settings.processor_batch_wait_s
        )
        tune_garbage_collector()
        cast(Consumer, app.consumer).committable = committable  # built by processors.transport
        async for events in batches:
            messages = [event.message for event in events]
            handler.check_timestamp_type(messages[0].timestamp_type)
            await handler.handle_batch(
                [
                    Logged(
                        m.topic, m.partition, m.offset, m.key, m.value or b"", {}, round(m.timestamp * 1000)
                    )
                    for m in messages
                ]
            )
            for tp in {m.tp for m in messages}:
                handled = handler.handled_offset(tp.partition)
                lag = max(app.consumer.highwater(tp) - handled - 1, 0)
                metrics.CONSUMER_LAG.labels(settings.processor_group, tp.partition).set(lag)

    restore_left = [-1]  # changelog records the table's restore still had to read, last check

    @app.timer(interval=5.0)  # type: ignore[untyped-decorator]  # faust's timer is untyped
    async def watchdog() -> None:
        recovery = cast(Any, app.tables).recovery  # the TableManager's, missing from its type
        if not recovery.completed.is_set():
            handler.last_batch_at = time.monotonic()  # restoring the table is work, not a stall
            return
        if recovery.in_recovery:
            # Faust sets `completed` once, after the first restore. A later one (a rebalance
            # gave this worker more partitions) counts as work while it gets through records.
            left = recovery.active_remaining_total()
            if left != restore_left[0]:
                handler.last_batch_at = time.monotonic()
            restore_left[0] = left
        idle_s = time.monotonic() - handler.last_batch_at
        if idle_s < settings.processor_stall_timeout_s:
            return
        commands = [tp for tp in app.consumer.assignment() if tp.topic == settings.commands_topic]
        # End offsets from the broker: the consumer's own high-water mark is only as new as its
        # last fetch, so a partition no longer fetched, or never fetched, looked idle by it.
        try:
            ends = await asyncio.wait_for(app.consumer.highwaters(*commands), 10)
        except (TimeoutError, KafkaError) as exc:
            log.warning("stall check skipped: cannot read end offsets (%r)", exc)
            return
        waiting = {}
        for tp in commands:
            waiting[tp.partition] = ends.get(tp, 0) - handler.handled_offset(tp.partition) - 1
        if stalled(waiting, idle_s, settings.processor_stall_timeout_s):
            log.error(
                "no command reached the agent for %.0fs while %s wait on partitions %s: the stream"
                " stopped delivering; restarting this worker in place, which the state is built to"
                " survive (STOCKFLOW_PROCESSOR_STALL_TIMEOUT_S)",
                idle_s,
                sum(count for count in waiting.values() if count > 0),
                sorted(p for p, count in waiting.items() if count > 0),
            )
            log.error("where the worker stood: %s", stall_report(app))
            logging.shutdown()
            # A fresh Faust in the same process, as abrupt as a crash: the same pid, so the
            # stack, compose and any supervisor still hold the right process, and nothing has
            # to be around to start it again. The stuck consumer is not trusted to leave the
            # group; the broker drops it after the session timeout.
            os.execv(sys.executable, sys.orig_argv)

    return app
