"""`stockflow verify`: does every view of the event log agree with it?

Reads the commands topic, the dead letter topic and the event log from the start, folds the
log per SKU (checking that each SKU's history holds together), and compares the fold with the
processor's stock table (its changelog topic) and with the Redis read models: each SKU's stock
row (its recent orders and restock decisions too) and top-sellers score, and each order line's
decision documents. Safe on a live system: it only reads, and a view that is merely behind
(lower version than the log) or a command the processor has not reached yet is reported as
lag, not as a mismatch or a loss.

One partition at a time: a SKU's commands, events and read models all belong to the partition
its name hashes to, and the processor decides and deduplicates each partition on its own. So
verify holds one partition's history at a time (the command and event ids, each order line's
documents), not the whole log's.
"""

from __future__ import annotations

import json
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import redis

from processors.dedupe import decided_command_ids
from projections.queries import ReadModels
from projections.store import RECENT_RESTOCKS, STOCK_COUNTERS, TOP_KEY, TOP_VERSIONS_KEY, exchange, order_key
from projections.views import KIND, line_field, order_document, restock_document
from schemas.codec import codec
from schemas.records import (
    Event,
    OrderCancelled,
    OrderProcessed,
    OrderRejected,
    RestockRejected,
    StockReplenished,
)
from stockflow.errors import DecodeError
from stockflow.lag import GroupLag, LagProbe
from stockflow.logreader import PartitionReader, read_topic
from stockflow.partitioning import partition_for
from stockflow.settings import Settings
from stockflow.topics import changelog_topic


@dataclass
class SkuFold:
    """What the event log says about one SKU."""

    available: int = 0
    version: int = 0
    counters: Counter[str] = field(default_factory=Counter)
    orders: dict[str, tuple[int, bool]] = field(default_factory=dict)  # order id -> (qty, cancelled)
    partition: int = -1  # of the events topic
    recent: deque[str] = field(default_factory=deque)  # processed order ids, newest last
    # restock decisions' documents, newest last, as many as the read model keeps
    restocks: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECENT_RESTOCKS))
    # order id -> {order hash field: offset and document of the event that names it}
    documents: dict[str, dict[str, tuple[int, bytes]]] = field(default_factory=dict)

    def add(self, event: Event, offset: int) -> None:
        """Count ``event``, logged at ``offset``, in the stock, counters and order documents."""
        self.available, self.version = event.available_after, event.version
        self.counters[KIND[type(event)]] += 1
        if isinstance(event, OrderProcessed):
            self.counters["units_sold"] += event.qty
            self.recent.append(event.order_id)
        elif isinstance(event, OrderCancelled):
            self.counters["units_sold"] -= event.qty
        elif isinstance(event, StockReplenished | RestockRejected):
            self.restocks.append(json.loads(restock_document(event)))
        if isinstance(event, OrderProcessed | OrderRejected | OrderCancelled):
            line = self.documents.setdefault(event.order_id, {})
            line.setdefault(line_field(event.sku, event), (offset, order_document(event).encode()))


@dataclass
class RedisViews:
    """The read models of one partition's SKUs."""

    client: redis.Redis
    watermark: int  # the last offset of the partition applied, read before the rest (-1: none)
    rows: dict[str, dict[str, Any]]  # SKU -> stock row
    top: dict[str, tuple[int, int]]  # SKU -> the version its top-sellers score is at, the score


@dataclass
class Report:
    commands: int = 0  # distinct command ids that passed validation
    command_repeats: int = 0  # the same command id published again (retries)
    dead_letters: int = 0
    decisions: int = 0  # distinct event ids in the log
    repeated_events: int = 0  # an event id already in the log, same decision: harmless
    skus: int = 0
    # Accepted, not dead-lettered, undecided though the processor had committed past it
    lost: list[str] = field(default_factory=list)
    # Accepted, not decided yet, after the processor's committed offset: lag
    undecided: list[str] = field(default_factory=list)
    double_decisions: list[str] = field(default_factory=list)
    # Version gaps, negative stock, stock that does not add up, a cancel without its order: a
    # history no sequence of decisions could give.
    broken_history: list[str] = field(default_factory=list)
    table_mismatches: list[str] = field(default_factory=list)
    table_behind: list[str] = field(default_factory=list)  # changelog not flushed yet
    read_model_mismatches: list[str] = field(default_factory=list)
    read_model_behind: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        return [
            *(f"lost command {c}" for c in self.lost),
            *self.double_decisions,
            *self.broken_history,
            *self.table_mismatches,
            *self.read_model_mismatches,
        ]

    def summary(self) -> dict[str, Any]:
        return {
            "commands": self.commands,
            "command_repeats": self.command_repeats,
            "dead_letters": self.dead_letters,
            "decisions": self.decisions,
            "repeated_events": self.repeated_events,
            "skus": self.skus,
            "lost": len(self.lost),
            "undecided": len(self.undecided),
            "double_decisions": len(self.double_decisions),
            "broken_history": len(self.broken_history),
            "table_mismatches": len(self.table_mismatches),
            "read_model_mismatches": len(self.read_model_mismatches),
            "read_model_behind": len(self.read_model_behind),
            "table_behind": len(self.table_behind),
        }

    @property
    def behind(self) -> list[str]:
        undecided = [f"command {command_id}: not decided yet" for command_id in self.undecided]
        return undecided + self.table_behind + self.read_model_behind


# What verify is doing, for a progress bar: stage, done, of how many (offsets, or orders).
OnProgress = Callable[[str, int, int], None]


def _unshown(stage: str, done: int, total: int) -> None:
    """No progress shown."""


def verify(settings: Settings, on_progress: OnProgress = _unshown) -> Report:
    report = Report()
    probe = LagProbe(settings)
    client = redis.Redis.from_url(settings.redis_url)
    commands_log = PartitionReader(settings, settings.commands_topic)
    events_log = PartitionReader(settings, settings.events_topic)
    try:
        processor = _processor_lag(probe, settings)
        quiet = processor.consumed if processor.total == 0 else None
        # The views first, the log after: each is made from the log, so read in this order none
        # can be ahead of the fold, and one behind it is lag. Read after the log, a live
        # processor's rows for commands decided meanwhile were reported as mismatches.
        table = _read_table(settings, on_progress)
        skus = _skus_by_partition(client, settings.partitions)
        _count_dead_letters(settings, report)
        for partition in range(settings.partitions):
            stage = _in_partition(on_progress, partition, settings.partitions)
            commands = _accepted_commands(settings, commands_log, report, partition, stage)
            folds = _fold_and_compare(
                settings, events_log, client, skus[partition], report, partition, commands, stage
            )
            # What the fold did not find decided. The processor commits a command only once its
            # decision is in the log and its state saved, so one before the committed offset
            # read at the start is lost; one after it may not have been reached yet.
            committed = processor.committed.get(partition, 0)
            for command_id, offset in commands.items():
                (report.lost if offset < committed else report.undecided).append(command_id)
            _compare_with_table(report, folds, table)
        report.lost.sort()
        report.undecided.sort()
        if quiet is not None and _processor_lag(probe, settings).consumed == quiet:
            # The processor had committed every command before the reads began, and none came
            # while they ran: it commits only what its table saved, so a row behind the log is
            # not lag but an older row saved last (README: a worker paused past its session).
            report.table_mismatches += [
                f"{line}, with every command committed: the changelog holds an older row"
                for line in report.table_behind
            ]
            report.table_behind = []
    finally:
        probe.close()
        client.close()
        commands_log.close()
        events_log.close()
    return report


def _processor_lag(probe: LagProbe, settings: Settings) -> GroupLag:
    return next(lag for lag in probe.read() if lag.group == settings.processor_group)


def verify_read_models(settings: Settings, on_progress: OnProgress = _unshown) -> Report:
    """Fold the event log and compare it with the Redis read models alone (a rebuild's check)."""
    report = Report()
    with (
        redis.Redis.from_url(settings.redis_url) as client,
        PartitionReader(settings, settings.events_topic) as events_log,
    ):
        skus = _skus_by_partition(client, settings.partitions)
        for partition in range(settings.partitions):
            stage = _in_partition(on_progress, partition, settings.partitions)
            _fold_and_compare(settings, events_log, client, skus[partition], report, partition, {}, stage)
    return report


def _in_partition(on_progress: OnProgress, partition: int, partitions: int) -> OnProgress:
    """``on_progress`` with each stage named with its partition."""

    def show(stage: str, done: int, total: int) -> None:
        on_progress(f"partition {partition + 1} of {partitions}, {stage}", done, total)

    return show


def _fold_and_compare(
    settings: Settings,
    events_log: PartitionReader,
    client: redis.Redis,
    skus: list[str],
    report: Report,
    partition: int,
    undecided: dict[str, int],
    on_progress: OnProgress,
) -> dict[str, SkuFold]:
    """Read the read models of the partition's ``skus``, then fold its event log (taking each
    decided command out of ``undecided``) and compare the two; the fold, for the caller's other
    checks."""
    views = _read_redis(client, skus, partition)
    folds = _fold_event_log(settings, events_log, report, partition, undecided, on_progress)
    _compare_with_read_models(report, folds, views, settings.order_retention_s > 0, on_progress)
    return folds


def _count_dead_letters(settings: Settings, report: Report) -> None:
    # A repeat of a parked command (the processor crashed before saving) is one dead letter:
    # count where each came from, (partition, offset, index in its frame).
    dead = {
        tuple(int(r.headers.get(f"source.{name}", b"-1")) for name in ("partition", "offset", "index"))
        for r in read_topic(settings, settings.dlq_topic)
    }
    report.dead_letters = len(dead)


def _accepted_commands(
    settings: Settings, commands_log: PartitionReader, report: Report, partition: int, on_progress: OnProgress
) -> dict[str, int]:
    """The ids of the commands on ``partition`` the processor decides (not parks), each with
    the offset of its first copy. A command id is the processor's to deduplicate on its
    partition: the same id on another partition (another SKU) is another command."""
    accepted: dict[str, int] = {}
    for record in commands_log.read(partition, partial(on_progress, "commands")):
        # By the processor's own checks: a command it parks is in the DLQ, counted there.
        for command_id in decided_command_ids(record, settings.partitions):
            if command_id is None:
                continue
            if command_id in accepted:
                report.command_repeats += 1
            else:
                accepted[command_id] = record.offset
    report.commands += len(accepted)
    return accepted


def _fold_event_log(
    settings: Settings,
    events_log: PartitionReader,
    report: Report,
    partition: int,
    undecided: dict[str, int],
    on_progress: OnProgress,
) -> dict[str, SkuFold]:
    """Fold the partition's log per SKU; removes every decided command id from ``undecided``."""
    folds: dict[str, SkuFold] = {}
    first_seen: dict[str, tuple[str, int, int]] = {}  # event id -> (type, version, available)
    decision_of: dict[str, str] = {}  # command id -> event id
    for record in events_log.read(partition, partial(on_progress, "event log")):
        try:
            events = codec.decode_events(record.value)
        except DecodeError:
            continue  # parked in the events DLQ by the projection
        for event in events:
            fingerprint = (type(event).__name__, event.version, event.available_after)
            seen = first_seen.get(event.event_id)
            if seen is not None:
                if seen == fingerprint:
                    report.repeated_events += 1
                else:
                    report.double_decisions.append(
                        f"event {event.event_id} of command {event.command_id} logged twice with"
                        f" different outcomes: {seen} then {fingerprint}"
                    )
                continue
            first_seen[event.event_id] = fingerprint
            earlier = decision_of.setdefault(event.command_id, event.event_id)
            if earlier != event.event_id:
                report.double_decisions.append(f"command {event.command_id} decided twice")
            undecided.pop(event.command_id, None)
            fold = folds.get(event.sku)
            if fold is None:
                recent: deque[str] = deque(maxlen=settings.recent_orders_per_sku)
                fold = folds[event.sku] = SkuFold(partition=record.partition, recent=recent)
            if event.version != fold.version + 1:
                report.broken_history.append(
                    f"SKU {event.sku}: version {event.version} follows {fold.version} at"
                    f" {record.partition}@{record.offset}"
                )
            if event.available_after < 0:
                report.broken_history.append(f"SKU {event.sku}: negative stock at version {event.version}")
            problem = inconsistency(fold, event)
            if problem:
                report.broken_history.append(f"SKU {event.sku} version {event.version}: {problem}")
            fold.add(event, record.offset)
    report.decisions += len(first_seen)
    report.skus += len(folds)
    return folds


# How each kind of event moves a SKU's stock by its qty; a rejection leaves it.
STOCK_CHANGE: dict[type[Event], int] = {OrderProcessed: -1, OrderCancelled: 1, StockReplenished: 1}


def inconsistency(fold: SkuFold, event: Event) -> str:
    """What is wrong with ``event`` after the SKU's history so far, if anything: a cancel of an
    order the SKU never processed or already cancelled, or of another qty (the order lines are
    noted in ``fold``), or stock that does not add up.

    An order id processed again replaces its line: the processor forgets a line once the cancel
    window has passed, and then takes the same order id as a new order."""
    if isinstance(event, OrderProcessed):
        fold.orders[event.order_id] = (event.qty, False)
    elif isinstance(event, OrderCancelled):
        line = fold.orders.get(event.order_id)
        if line is None or line[1]:
            return f"order {event.order_id} cancelled, {'already cancelled' if line else 'never processed'}"
        if line[0] != event.qty:
            return f"order {event.order_id} cancelled with qty {event.qty}, processed with {line[0]}"
        fold.orders[event.order_id] = (line[0], True)
    expected = fold.available + STOCK_CHANGE.get(type(event), 0) * event.qty
    if event.available_after != expected:
        return f"available {event.available_after} after {type(event).__name__}, {expected} by the log"
    return ""


def _read_table(settings: Settings, on_progress: OnProgress) -> dict[str, dict[str, int]]:
    """The processor's SKU rows, as its table's changelog holds them now."""
    table: dict[str, dict[str, int]] = {}
    changelog = changelog_topic(settings, "state")
    for record in read_topic(settings, changelog, on_progress=partial(on_progress, "processor table")):
        key = json.loads(record.key) if record.key else ""  # Faust writes keys and values as JSON
        if not key.startswith("s:"):
            continue  # order lines and command markers
        sku = key[2:]
        if record.value:
            table[sku] = json.loads(record.value)
        else:
            table.pop(sku, None)  # a tombstone: the key was deleted
    return table


def _skus_by_partition(client: redis.Redis, partitions: int) -> dict[int, list[str]]:
    """The SKUs the read models have, by partition. Read once, before any of the log: a SKU
    first projected since is one whose row is not read, and shows as behind the log."""
    skus: dict[int, list[str]] = {partition: [] for partition in range(partitions)}
    for sku in ReadModels(client).skus():
        skus[partition_for(sku.encode(), partitions)].append(sku)
    return skus


def _read_redis(client: redis.Redis, skus: list[str], partition: int) -> RedisViews:
    """The partition's watermark, then the stock row and top-sellers score of each of ``skus``."""
    models = ReadModels(client)
    watermark = models.watermarks().get(partition, -1)
    rows = dict(zip(skus, models.stocks(skus), strict=True))
    pipe = client.pipeline(transaction=False)
    for sku in skus:
        pipe.hget(TOP_VERSIONS_KEY, sku)
        pipe.zscore(TOP_KEY, sku)
    replies = pipe.execute()
    top = {
        sku: (int(version), int(score or 0))
        for sku, version, score in zip(skus, replies[::2], replies[1::2], strict=True)
        if version is not None
    }
    return RedisViews(client, watermark, {sku: row for sku, row in rows.items() if row is not None}, top)


def _compare_with_table(report: Report, folds: dict[str, SkuFold], table: dict[str, dict[str, int]]) -> None:
    for sku, fold in folds.items():
        row = table.get(sku) or {"available": 0, "version": 0}
        if row["version"] < fold.version:
            # The table's changelog is flushed when the processor commits (every few seconds).
            report.table_behind.append(f"SKU {sku}: table at {row['version']}, log at {fold.version}")
        elif (row["available"], row["version"]) != (fold.available, fold.version):
            report.table_mismatches.append(
                f"SKU {sku}: processor table has {row}, the log says"
                f" available={fold.available} version={fold.version}"
            )


def _compare_with_read_models(
    report: Report, folds: dict[str, SkuFold], views: RedisViews, expiring: bool, on_progress: OnProgress
) -> None:
    for sku, fold in folds.items():
        row = views.rows.get(sku) or {"version": 0}
        if row["version"] < fold.version:
            report.read_model_behind.append(
                f"SKU {sku}: read model at {row['version']}, log at {fold.version}"
            )
            continue
        expected: dict[str, Any] = {"available": fold.available, "version": fold.version}
        expected.update({name: fold.counters[name] for name in STOCK_COUNTERS})
        # Newest first, as many as STOCKFLOW_RECENT_ORDERS_PER_SKU, which the workers share
        expected["recent_orders"] = list(reversed(fold.recent))
        expected["recent_restocks"] = list(reversed(fold.restocks))
        actual = {name: row.get(name, 0) for name in expected}
        if actual != expected:
            diff = {k: (actual[k], expected[k]) for k in expected if actual[k] != expected[k]}
            report.read_model_mismatches.append(f"SKU {sku}: (read model, log) differ in {diff}")
        top_version, top_units = views.top.get(sku, (0, 0))
        if top_version < fold.version:
            report.read_model_behind.append(f"SKU {sku}: top sellers at {top_version}, log at {fold.version}")
        elif top_units != (sold := fold.counters["units_sold"]):
            report.read_model_mismatches.append(
                f"SKU {sku}: top sellers have {top_units} sold, the log {sold}"
            )
    _compare_order_lines(report, folds, views, expiring, partial(on_progress, "order statuses"))


# Order lines (an order's statuses on one SKU) read from Redis per round trip.
ORDERS_PER_READ = 1000


def _compare_order_lines(
    report: Report,
    folds: dict[str, SkuFold],
    views: RedisViews,
    expiring: bool,
    on_progress: Callable[[int, int], None],
) -> None:
    """Each decision's document on its order in Redis against the event in the log.

    Read after the log, unlike the rest (the log names the orders): the projection writes a
    decision's document once, under a field its event alone names (HSETNX), so one written since
    is the same. A
    document missing at an offset its partition's watermark (read before the log) covers is a
    mismatch, one after it lag. ``expiring`` (an order retention): a missing one may have
    expired, and is not reported.
    """
    lines = [
        (fold.partition, order_id, line)
        for fold in folds.values()
        for order_id, line in fold.documents.items()
    ]
    for start in range(0, len(lines), ORDERS_PER_READ):
        chunk = lines[start : start + ORDERS_PER_READ]
        reads = [("HMGET", order_key(order_id), *line) for _, order_id, line in chunk]
        for (partition, order_id, line), stored in zip(chunk, exchange(views.client, reads), strict=True):
            for (name, (offset, document)), actual in zip(line.items(), stored, strict=True):
                if actual == document:
                    continue
                where = f"order {order_id} line {name}"
                if actual is not None:
                    report.read_model_mismatches.append(
                        f"{where}: Redis has {actual.decode()}, the log {document.decode()}"
                    )
                elif expiring:
                    continue  # it may have expired
                elif offset <= views.watermark:
                    report.read_model_mismatches.append(
                        f"{where}: not in Redis, though applied up to {partition}@{offset}"
                    )
                else:
                    report.read_model_behind.append(f"{where}: not in Redis")
        on_progress(start + len(chunk), len(lines))
