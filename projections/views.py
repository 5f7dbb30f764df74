"""What a batch of events means for the read models; pure, no Redis.

A batch of events becomes a ``WritePlan``: per SKU, the events to fold into its stock hash
(the store applies only versions newer than what it has); per order line, a document per
status it reached; per partition, the last offset covered (the watermark). The store turns the
plan into idempotent Redis writes, so applying a batch twice, or a decision the processor
repeated after a crash, changes nothing.

An order line's statuses are kept apart, first one wins (``HSETNX``): a line is processed
once, cancelled once, and a rejection never changes a line that was processed. So every write
is a plain single-key command, in any order, and a read picks the line's status by precedence
(``line_status``): cancelled, else processed, else rejected.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from schemas.records import (
    Event,
    OrderCancelled,
    OrderProcessed,
    OrderRejected,
    RestockRejected,
    StockReplenished,
)

# One short name per event type, used in Redis and in the totals.
KIND: dict[type[Event], str] = {
    OrderProcessed: "processed",
    OrderRejected: "rejected",
    OrderCancelled: "cancelled",
    StockReplenished: "replenished",
    RestockRejected: "restock_rejected",
}
ORDER_STATUS: dict[type[Event], str] = {
    OrderProcessed: "processed",
    OrderRejected: "rejected",
    OrderCancelled: "cancelled",
}
# Which of a line's statuses it shows: a cancel follows the processing it undoes, and a
# rejection (a duplicate order id, a cancel refused) leaves a processed line as it was.
STATUS_PRECEDENCE = {"cancelled": 0, "processed": 1, "rejected": 2}


@dataclass
class SkuEvents:
    """A SKU's events in a batch, as the store's script takes them: version, kind, qty and
    order id of each event, one after the other in rising versions; and the stock after the last.

    Flat, not a tuple an event: a replay plans hundreds of thousands of events, and with a
    NamedTuple each, sliced again by the store, planning and packing the commands took 36,000
    instructions an event against 32,000 (callgrind).
    """

    script_args: list[Any] = field(default_factory=list)
    version: int = 0  # the last event's
    available_after: int = 0
    occurred_at: int = 0


@dataclass
class WritePlan:
    sku_events: dict[str, SkuEvents] = field(default_factory=dict)
    sku_partitions: dict[str, int] = field(default_factory=dict)
    # (order id, line field) -> JSON document: status, qty, reason, version, updated_at
    order_lines: dict[tuple[str, str], str] = field(default_factory=dict)
    # Only in a plan made ``expiring``: order id -> when the batch's newest decision about it
    # was made (ms), and the orders it cancels; an order's read model is kept for
    # STOCKFLOW_ORDER_RETENTION_S after the decision that placed it, or after its cancel
    order_decided_at: dict[str, int] = field(default_factory=dict)
    orders_cancelled: set[str] = field(default_factory=set)
    watermarks: dict[int, int] = field(default_factory=dict)


def plan_writes(batch: Iterable[tuple[int, int, Event | None]], expiring: bool = False) -> WritePlan:
    """Fold ``(partition, offset, event)`` triples into a plan; ``None`` is a dead letter.

    Dead letters still advance the partition's watermark: they have been dealt with.
    ``expiring``: also note what an order retention needs, which cost a plan 10-20% more per
    event (0.2-0.4 us) when every event paid it.
    """
    plan = WritePlan()
    for partition, offset, event in batch:
        plan.watermarks[partition] = offset
        if event is None:
            continue
        kind = KIND[type(event)]
        order_id = getattr(event, "order_id", "")
        plan.sku_partitions[event.sku] = partition
        sku_events = plan.sku_events.get(event.sku)
        if sku_events is None:
            sku_events = plan.sku_events[event.sku] = SkuEvents()
        # A SKU's events go in strictly rising versions; a lower one is a decision the
        # processor repeated after a crash, and the SKU has it already.
        if event.version > sku_events.version:
            sku_events.script_args += (event.version, kind, event.qty, order_id)
            sku_events.version = event.version
            sku_events.available_after, sku_events.occurred_at = event.available_after, event.occurred_at
        if order_id:
            # The first document of a status wins, in the batch as in Redis (HSETNX).
            plan.order_lines.setdefault((order_id, line_field(event.sku, event)), order_document(event))
            if expiring:
                plan.order_decided_at[order_id] = max(
                    plan.order_decided_at.get(order_id, 0), event.occurred_at
                )
                if isinstance(event, OrderCancelled):
                    plan.orders_cancelled.add(order_id)
    return plan


def order_document(event: Event) -> str:
    """An order line's status as compact JSON: status, qty, reason, version, updated_at.

    Formatted directly: json.dumps of a dict per event was a quarter of a replay's time.
    """
    reason = getattr(event, "reason", "")
    return (
        f'{{"status":"{ORDER_STATUS[type(event)]}","qty":{event.qty},'
        f'"reason":{json.dumps(reason) if reason else chr(34) * 2},'
        f'"version":{event.version},"updated_at":{event.occurred_at}}}'
    )


def line_field(sku: str, event: Event) -> str:
    """The order hash field holding ``event``'s status of the line on ``sku``."""
    return f"{sku}:{ORDER_STATUS[type(event)]}"


def line_status(fields: dict[str, str]) -> dict[str, dict[str, Any]]:
    """An order's lines from its hash fields: per SKU, the status that takes precedence.

    A line processed or cancelled whose rejection came later (a cancel of a cancelled order,
    one with a stale ``expected_version``, an order id placed again) shows that refusal under
    ``refused`` (reason, version, updated_at): without it the client that sent the refused
    command could not tell from the order that it was refused. A rejection from before the
    status shown (a place refused, then the same order id placed once there was stock) was
    about an earlier request and is left out. Only the line's first rejection is kept (HSETNX).
    """
    statuses: dict[str, dict[str, dict[str, Any]]] = {}  # sku -> status -> document
    for name, document in fields.items():
        line = json.loads(document)
        sku, _, status = name.rpartition(":")
        if status not in STATUS_PRECEDENCE:
            sku, status = name, line["status"]  # written before each status had its own field
        statuses.setdefault(sku, {})[status] = line
    lines: dict[str, dict[str, Any]] = {}
    for sku, by_status in statuses.items():
        shown = by_status[min(by_status, key=STATUS_PRECEDENCE.__getitem__)]
        rejection = by_status.get("rejected")
        if rejection is not None and rejection is not shown and rejection["version"] > shown["version"]:
            refused = {key: rejection[key] for key in ("reason", "version", "updated_at")}
            shown = {**shown, "refused": refused}
        lines[sku] = shown
    return lines


def latency_bucket(ms: int) -> int:
    """The histogram bucket of a latency: exact below 100 ms, two significant digits above."""
    if ms < 100:
        return max(ms, 0)
    scale = int(10 ** (len(str(ms)) - 2))
    return ms // scale * scale


def percentile(histogram: dict[int, int], fraction: float) -> int:
    """The bucket below which ``fraction`` of the recorded latencies fall (0 if none)."""
    total = sum(histogram.values())
    if total == 0:
        return 0
    rank = fraction * total
    seen = 0
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        if seen >= rank:
            return bucket
    return max(histogram)
