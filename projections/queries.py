"""Reading the read models: what `stockflow query` and the HTTP API answer with."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis

from projections.store import (
    DECIDED_LATENCY_KEY,
    LATENCY_KEY,
    SKUS_KEY,
    STOCK_COUNTERS,
    TOP_KEY,
    WATERMARKS_KEY,
    order_key,
    recent_key,
    restocks_key,
    stock_key,
)
from projections.views import command_decision, find_command, line_status

# How often a wait for a decision looks at Redis again.
POLL_S = 0.02
T = TypeVar("T")


def _waited(look: Callable[[], T | None], wait_s: float) -> T | None:
    """``look()`` until it finds something, for up to ``wait_s``; None if it never did."""
    deadline = time.monotonic() + wait_s
    while (found := look()) is None:
        if time.monotonic() >= deadline:
            return None
        time.sleep(POLL_S)
    return found


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def order_not_found(order_id: str, retention_s: float) -> str:
    """Why an order has no read model: not decided yet, or, with a retention, expired."""
    reason = f"no decision about order {order_id!r} is projected yet"
    if retention_s:
        reason += (
            f", or it expired: STOCKFLOW_ORDER_RETENTION_S ({retention_s:g} s) after its placing or cancel"
        )
    return reason


def _stock_row(
    sku: str, raw: dict[bytes, bytes], recent: list[bytes], restocks: list[bytes]
) -> dict[str, Any] | None:
    if not raw:
        return None
    row: dict[str, Any] = {"sku": sku}
    row.update({_text(k): int(v) for k, v in raw.items()})
    for counter in STOCK_COUNTERS:
        row.setdefault(counter, 0)
    row["recent_orders"] = [_text(order_id) for order_id in recent]
    row["recent_restocks"] = _documents(restocks)
    return row


def _documents(raw: list[bytes]) -> list[dict[str, Any]]:
    return [json.loads(document) for document in raw]


class ReadModels:
    def __init__(self, client: redis.Redis) -> None:
        self._redis = client

    def stock(self, sku: str) -> dict[str, Any] | None:
        """Stock of one SKU, or None if no event about it has been projected yet."""
        return self.stocks([sku])[0]

    def stocks(self, skus: list[str]) -> list[dict[str, Any] | None]:
        """``stock`` of each SKU, in one round trip (verify reads every SKU's)."""
        pipe = self._redis.pipeline(transaction=False)
        for sku in skus:
            pipe.hgetall(stock_key(sku))
            pipe.lrange(recent_key(sku), 0, -1)
            pipe.lrange(restocks_key(sku), 0, -1)
        replies = pipe.execute()
        return [_stock_row(sku, *replies[3 * i : 3 * i + 3]) for i, sku in enumerate(skus)]

    def restocks(self, sku: str) -> list[dict[str, Any]]:
        """The SKU's newest restock decisions, newest first (``store.RECENT_RESTOCKS``)."""
        return self.skus_restocks([sku])[0]

    def skus_restocks(self, skus: list[str]) -> list[list[dict[str, Any]]]:
        """``restocks`` of each SKU, in one round trip."""
        pipe = self._redis.pipeline(transaction=False)
        for sku in skus:
            pipe.lrange(restocks_key(sku), 0, -1)
        return [_documents(documents) for documents in pipe.execute()]

    def restock_decision(self, sku: str, command_id: str, wait_s: float = 0.0) -> dict[str, Any] | None:
        """The decision about restock ``command_id`` of ``sku`` (status "replenished" or
        "rejected", qty, reason, version, updated_at, command_id), as ``decision``."""
        return _waited(lambda: find_command(self.restocks(sku), command_id), wait_s)

    def order(self, order_id: str) -> dict[str, dict[str, Any]]:
        """Status of each line (one per SKU) of an order; empty if unknown."""
        return line_status(self.order_fields(order_id))

    def decision(self, order_id: str, command_id: str, wait_s: float = 0.0) -> dict[str, Any] | None:
        """The decision about command ``command_id`` on order ``order_id``: the line's document
        (status, qty, reason, version, updated_at, command_id) and its SKU. Waits up to ``wait_s``
        for the read models to show it; None if they do not by then (not decided or not
        projected yet, or not about this order)."""
        return _waited(lambda: command_decision(self.order_fields(order_id), command_id), wait_s)

    def order_fields(self, order_id: str) -> dict[str, str]:
        """An order's hash as it is: a JSON document per decision about its lines
        (``projections.views.line_status`` and ``command_decision`` read them)."""
        return self.orders_fields([order_id])[0]

    def orders_fields(self, order_ids: list[str]) -> list[dict[str, str]]:
        """``order_fields`` of each order, in one round trip."""
        pipe = self._redis.pipeline(transaction=False)
        for order_id in order_ids:
            pipe.hgetall(order_key(order_id))
        return [{_text(name): _text(doc) for name, doc in raw.items()} for raw in pipe.execute()]

    def top(self, n: int = 10) -> list[tuple[str, int]]:
        if n < 1:
            return []  # Redis would read a range ending at -1 as "to the last"
        rows = self._redis.zrevrange(TOP_KEY, 0, n - 1, withscores=True)
        return [(_text(sku), int(score)) for sku, score in rows]  # type: ignore[union-attr]

    def skus(self) -> list[str]:
        members: set[bytes] = self._redis.smembers(SKUS_KEY)  # type: ignore[assignment]
        return sorted(_text(sku) for sku in members)

    def totals(self, skus: list[str] | None = None) -> dict[str, int]:
        """Counters summed over the given SKUs (default: all), and the lowest stock among them."""
        skus = self.skus() if skus is None else skus
        pipe = self._redis.pipeline(transaction=False)
        for sku in skus:
            pipe.hmget(stock_key(sku), ["available", *STOCK_COUNTERS])
        totals = dict.fromkeys(["skus", "available", "min_available", *STOCK_COUNTERS], 0)
        totals["skus"] = len(skus)
        minimum: int | None = None
        for values in pipe.execute():
            available, *counters = (int(v or 0) for v in values)
            totals["available"] += available
            minimum = available if minimum is None else min(minimum, available)
            for name, value in zip(STOCK_COUNTERS, counters, strict=True):
                totals[name] += value
        totals["min_available"] = minimum or 0
        return totals

    def latency_histogram(self, until: str = "visible") -> dict[int, int]:
        """Command created -> ``until`` ("visible" here, or "decided" by the processor), in ms:
        bucket -> events (see views.latency_bucket)."""
        key = {"visible": LATENCY_KEY, "decided": DECIDED_LATENCY_KEY}[until]
        raw: dict[bytes, bytes] = self._redis.hgetall(key)  # type: ignore[assignment]
        return {int(bucket): int(count) for bucket, count in raw.items()}

    def watermarks(self) -> dict[int, int]:
        raw: dict[bytes, bytes] = self._redis.hgetall(WATERMARKS_KEY)  # type: ignore[assignment]
        return {int(partition): int(offset) for partition, offset in raw.items()}
