"""The processor's decisions: batches of command messages decided against its table, the
decisions appended to the event log.

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
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from faust.types import ProducerT

from processors.dedupe import RecentCommands, decided_command_ids, refusal
from processors.domain import OrderLine, Stock, decide, evolve
from processors.state import (
    ID_QUOTES_BYTES,
    LINE_NUMBERS_BYTES,
    Line,
    LineIndex,
    StateTable,
    line_key,
    within_a_message,
)
from schemas.codec import codec
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
from stockflow.logreader import Logged
from stockflow.settings import Settings

log = logging.getLogger(__name__)

# Reads the records of one partition of the commands topic with offsets in [start, end).
ReadRange = Callable[[int, int, int], Awaitable[list[Logged]]]
# Commits {commands partition: offset} as the group's member; False if the worker no longer
# holds them all (processors.transport.Consumer.commit_as_member).
CommitAsMember = Callable[[dict[int, int]], Awaitable[bool]]

# A line is forgotten once the cancel window has passed since it was placed plus this much (or
# plus the window, if shorter): a command appended later must find it past the window even if
# the broker's clock stepped back by less than this meanwhile.
CLOCK_SLACK_MS = 60_000

# Kafka's timestamp type of a record the broker stamped when it appended it (aiokafka's value).
LOG_APPEND_TIME = 1

# Events per EventBatch frame (an event is ~150 bytes): fewer when long ids make a frame larger
# than a Kafka message may be (``codec.encode_batches``).
EVENTS_PER_FRAME = 1000


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
        sent = [
            await self.table.write(partition, records, encoded[partition])
            for partition, records in changes.items()
        ]
        # Handed to the producer, the records leave when the event loop next runs its sender
        # task, which under load could be after the next batch had been decided: a pause then
        # landed this save after a replacement's (the test of a processor paused past its
        # session failed in 2 of 7 runs, a SKU's row 32 versions behind the log last in the
        # changelog; 14 of 14 passed with the wait). Waiting for the broker puts them on the wire.
        await asyncio.gather(*(delivery for deliveries in sent for delivery in deliveries))
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
