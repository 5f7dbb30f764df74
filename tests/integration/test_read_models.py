"""The Redis store is idempotent: applying events again, or replaying, changes nothing."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
import redis

from producers.commands import cancel_order, place_order, restock
from projections.queries import ReadModels
from projections.store import RECENT_RESTOCKS, ReadModelStore, order_key
from projections.views import plan_writes
from stockflow.settings import Settings
from tests.history import decided

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("stack")]


@pytest.fixture
def scratch(settings: Settings) -> Iterator[redis.Redis]:
    """Database 15 of the stack's Redis; the projection worker writes to database 0.

    (The URL's database wins over a ``db=`` argument in redis-py, so the URL is rewritten.)
    """
    base, _, database = settings.redis_url.rpartition("/")
    assert database == "0", settings.redis_url
    client = redis.Redis.from_url(f"{base}/15")
    assert client.connection_pool.connection_kwargs["db"] == 15
    client.flushdb()
    yield client
    client.flushdb()


def snapshot(client: redis.Redis) -> dict[bytes, object]:
    dump: dict[bytes, object] = {}
    for key in client.scan_iter():
        kind = client.type(key)
        if kind == b"hash":
            dump[key] = client.hgetall(key)
        elif kind == b"list":
            dump[key] = client.lrange(key, 0, -1)
        elif kind == b"zset":
            dump[key] = client.zrange(key, 0, -1, withscores=True)
        elif kind == b"set":
            dump[key] = client.smembers(key)
    return dump


def test_applying_the_same_events_again_changes_nothing(
    scratch: redis.Redis, unique: Callable[[str], str]
) -> None:
    sku = unique("SKU")
    order = place_order(sku, 2)
    events = decided(
        sku, restock(sku, 5), order, place_order(sku, 9), cancel_order(sku, order.order_id), restock(sku, 1)
    )
    batch = [(0, offset, event) for offset, event in enumerate(events)]
    store = ReadModelStore(scratch)

    assert store.apply(plan_writes(batch)).events == len(events)
    first = snapshot(scratch)
    assert store.apply(plan_writes(batch)).events == 0  # whole batch again
    assert store.apply(plan_writes(batch[1:3])).events == 0  # a slice of it
    assert store.apply(plan_writes([(0, 9, events[1])])).events == 0  # a repeated decision, later offset
    assert snapshot(scratch) | {b"sf:watermarks": None} == first | {b"sf:watermarks": None}

    models = ReadModels(scratch)
    stock = models.stock(sku)
    assert stock is not None
    assert (stock["available"], stock["units_sold"], stock["version"]) == (6, 0, 5)
    assert (stock["processed"], stock["rejected"], stock["cancelled"], stock["replenished"]) == (1, 1, 1, 2)
    assert models.order(order.order_id)[sku]["status"] == "cancelled"
    assert models.top(1) == [(sku, 0)]
    assert models.top(0) == []  # not every SKU, as Redis reads the range 0..-1
    assert models.watermarks() == {0: 9}


def test_events_applied_one_by_one_give_the_same_model_as_one_batch(
    scratch: redis.Redis, unique: Callable[[str], str]
) -> None:
    sku = unique("SKU")
    events = decided(sku, restock(sku, 3), *[place_order(sku, 1) for _ in range(5)])
    store = ReadModelStore(scratch)
    store.apply(plan_writes([(0, i, e) for i, e in enumerate(events)]))
    batched = snapshot(scratch)
    scratch.flushdb()
    for i, event in enumerate(events):
        store.apply(plan_writes([(0, i, event)]))
    assert snapshot(scratch) == batched


def test_a_sku_keeps_its_newest_restock_decisions_whole_or_one_by_one(
    scratch: redis.Redis, unique: Callable[[str], str]
) -> None:
    sku = unique("SKU")
    restocks = [restock(sku, 1) for _ in range(RECENT_RESTOCKS + 5)]
    restocks[-1] = restock(sku, 1, expected_version=0)  # a version conflict: refused
    events = decided(sku, *restocks, place_order(sku, 2))
    store, models = ReadModelStore(scratch), ReadModels(scratch)
    store.apply(plan_writes([(0, i, e) for i, e in enumerate(events)]))
    kept = models.restocks(sku)
    assert [d["version"] for d in kept] == list(range(RECENT_RESTOCKS + 5, 5, -1))  # newest first
    assert (kept[0]["status"], kept[0]["reason"]) == (
        "rejected",
        f"version conflict: expected 0, SKU is at {RECENT_RESTOCKS + 4}",
    )
    assert kept[1] == {
        "status": "replenished",
        "qty": 1,
        "reason": "",
        "version": RECENT_RESTOCKS + 4,
        "updated_at": events[RECENT_RESTOCKS + 3].occurred_at,
        "command_id": restocks[-2].command_id,
    }
    assert models.restock_decision(sku, restocks[-1].command_id) == kept[0]
    assert models.restock_decision(sku, restocks[0].command_id) is None  # trimmed away
    assert models.stock(sku)["recent_restocks"] == kept  # type: ignore[index]
    batched = snapshot(scratch)
    scratch.flushdb()
    for i, event in enumerate(events):
        store.apply(plan_writes([(0, i, event)]))
    assert snapshot(scratch) == batched


def test_overlapping_batches_and_repeats_give_the_same_model_as_one_batch(
    scratch: redis.Redis, unique: Callable[[str], str]
) -> None:
    sku = unique("SKU")
    orders = [place_order(sku, 1) for _ in range(30)]  # more than the 20 recent orders kept
    events = decided(sku, restock(sku, 50), *orders, cancel_order(sku, orders[3].order_id))
    store = ReadModelStore(scratch)
    store.apply(plan_writes([(0, i, e) for i, e in enumerate(events)]))
    whole = snapshot(scratch)
    scratch.flushdb()
    # Batches that overlap what Redis holds, the way a worker resumes after a crash, and a
    # decision repeated after newer ones in the same batch.
    for start, end in ((0, 10), (5, 20), (18, 19), (12, len(events))):
        window = [(0, i, events[i]) for i in range(start, end)]
        store.apply(plan_writes([*window, (0, end, events[start])]))
    assert snapshot(scratch) | {b"sf:watermarks": None} == whole | {b"sf:watermarks": None}
    stock = ReadModels(scratch).stock(sku)
    assert stock is not None
    assert (stock["available"], stock["units_sold"], stock["version"]) == (21, 29, 32)
    assert stock["recent_orders"] == [o.order_id for o in reversed(orders[10:])]


def test_a_gap_in_a_sku_s_history_is_reported_and_nothing_after_it_is_written(
    scratch: redis.Redis, unique: Callable[[str], str]
) -> None:
    sku = unique("SKU")
    events = decided(sku, restock(sku, 5), place_order(sku, 1), place_order(sku, 1))
    store = ReadModelStore(scratch)
    # Redis "lost" versions 1 and 2: only the third event arrives.
    outcome = store.apply(plan_writes([(2, 7, events[2])]))
    assert (outcome.events, outcome.gaps) == (0, {2})
    assert ReadModels(scratch).stock(sku) is None
    assert ReadModels(scratch).watermarks() == {}  # the partition must be replayed
    replay = store.apply(plan_writes([(2, i, e) for i, e in enumerate(events)]))
    assert (replay.events, replay.gaps) == (3, set())
    stock = ReadModels(scratch).stock(sku)
    assert stock is not None
    assert (stock["available"], stock["version"]) == (3, 3)


def test_scripts_flushed_from_redis_are_loaded_again(
    scratch: redis.Redis, unique: Callable[[str], str]
) -> None:
    sku = unique("SKU")
    events = decided(sku, restock(sku, 5), place_order(sku, 2))
    store = ReadModelStore(scratch)
    store.apply(plan_writes([(0, 0, events[0])]))
    scratch.script_flush()  # as after a Redis restart
    assert store.apply(plan_writes([(0, 1, events[1])])).events == 1
    stock = ReadModels(scratch).stock(sku)
    assert stock is not None
    assert (stock["available"], stock["version"]) == (3, 2)
    assert ReadModels(scratch).watermarks() == {0: 1}


def test_an_error_reply_raises_and_the_next_write_is_whole(
    scratch: redis.Redis, unique: Callable[[str], str]
) -> None:
    sku = unique("SKU")
    blocked, later = place_order(sku, 1), place_order(sku, 1)
    events = decided(sku, restock(sku, 5), blocked, later)
    scratch.set(order_key(blocked.order_id), "not a hash")  # its order line cannot be written
    store = ReadModelStore(scratch)
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        store.apply(plan_writes([(0, i, e) for i, e in enumerate(events[:2])]))
    scratch.delete(order_key(blocked.order_id))
    outcome = store.apply(plan_writes([(0, i, e) for i, e in enumerate(events)]))
    assert (outcome.events, outcome.gaps) == (1, set())  # the first two were written before the error
    assert ReadModels(scratch).order(blocked.order_id)[sku]["status"] == "processed"
    assert ReadModels(scratch).order(later.order_id)[sku]["status"] == "processed"
    assert ReadModels(scratch).watermarks() == {0: 2}


def test_a_watermark_lost_while_a_batch_is_written_is_reported_and_not_advanced(
    scratch: redis.Redis, unique: Callable[[str], str]
) -> None:
    first, later = unique("SKU"), unique("LATER")
    history = decided(first, restock(first, 5), place_order(first, 1))
    store = ReadModelStore(scratch)
    store.apply(plan_writes([(3, i, e) for i, e in enumerate(history)]))
    assert ReadModels(scratch).watermarks() == {3: 1}
    # Redis loses everything just before the next batch: a new SKU, so no version is missing,
    # and only the partition's watermark shows that the older SKU's writes are gone.
    scratch.flushdb()
    new = decided(later, restock(later, 2))
    outcome = store.apply(plan_writes([(3, 2, new[0])]), held={3: 1})
    assert outcome.gaps == {3}
    assert ReadModels(scratch).watermarks() == {}  # not advanced: the partition must be replayed
    replay = store.apply(plan_writes([(3, i, e) for i, e in enumerate([*history, *new])]))
    assert (replay.events, replay.gaps) == (2, set())  # the new SKU's event was already there
    assert ReadModels(scratch).watermarks() == {3: 2}
    stock = ReadModels(scratch).stock(first)
    assert stock is not None
    assert (stock["available"], stock["version"]) == (4, 2)


class PausedAfterSkus(ReadModelStore):
    """Runs ``meanwhile`` after a batch's SKU scripts, before its top sellers and watermarks: a
    worker paused there past its session while its replacement went on, or one that crashed."""

    def __init__(self, client: redis.Redis, meanwhile: Callable[[], object]) -> None:
        super().__init__(client)
        self._meanwhile = meanwhile
        self._sends = 0

    def _send(self, commands: Any) -> list[Any]:
        self._sends += 1
        if self._sends == 2:
            self._meanwhile()
        return super()._send(commands)


def test_a_worker_paused_between_its_sku_writes_and_the_top_sellers_does_not_put_back_an_older_score(
    scratch: redis.Redis, unique: Callable[[str], str]
) -> None:
    sku = unique("SKU")
    events = decided(sku, restock(sku, 10), place_order(sku, 2), place_order(sku, 3))
    batch = [(0, i, e) for i, e in enumerate(events)]
    replacement = ReadModelStore(scratch)
    paused = PausedAfterSkus(scratch, lambda: replacement.apply(plan_writes(batch)))
    paused.apply(plan_writes(batch[:2]))  # its SKU script wrote 2 sold; the replacement then 5
    assert ReadModels(scratch).top(1) == [(sku, 5)]  # (sku, 2) before scores carried versions
    assert ReadModels(scratch).watermarks() == {0: 2}


def test_a_worker_stopped_before_the_top_sellers_writes_them_when_it_replays_the_batch(
    scratch: redis.Redis, unique: Callable[[str], str]
) -> None:
    sku = unique("SKU")
    plan = plan_writes([(0, i, e) for i, e in enumerate(decided(sku, restock(sku, 10), place_order(sku, 4)))])

    def crash() -> None:
        raise ConnectionError("the worker stopped")

    with pytest.raises(ConnectionError):
        PausedAfterSkus(scratch, crash).apply(plan)
    assert ReadModels(scratch).top(1) == []
    assert ReadModelStore(scratch).apply(plan).events == 0  # the SKU's events were all written
    assert ReadModels(scratch).top(1) == [(sku, 4)]


def test_a_batch_of_more_skus_than_a_lua_call_can_unpack_ranks_them_all(
    scratch: redis.Redis, unique: Callable[[str], str]
) -> None:
    skus = [unique(f"MANY{i}") for i in range(9_000)]  # Lua's unpack stops at about 8,000 values
    events = [event for sku in skus for event in decided(sku, restock(sku, 5), place_order(sku, 2))]
    outcome = ReadModelStore(scratch).apply(plan_writes([(0, i, e) for i, e in enumerate(events)]))
    assert (outcome.events, outcome.gaps) == (len(events), set())
    assert dict(ReadModels(scratch).top(len(skus) + 1)) == dict.fromkeys(skus, 2)


def expires_in_ms(client: redis.Redis, order_id: str) -> int:
    """The order key's time to live: -1 if it never expires, -2 if it is not there."""
    return int(cast(int, client.pttl(order_key(order_id))))


def test_with_a_retention_an_order_expires_that_long_after_its_newest_decision(
    scratch: redis.Redis, unique: Callable[[str], str]
) -> None:
    sku, now_ms = unique("SKU"), int(time.time() * 1000)
    kept, old = place_order(sku, 1), place_order(sku, 1)
    placed = decided(sku, restock(sku, 5), kept, now_ms=now_ms)
    cancelled = decided(sku, restock(sku, 5), kept, cancel_order(sku, kept.order_id), now_ms=now_ms + 30_000)
    long_ago = decided(unique("OLD"), restock(unique("OLD"), 5), old, now_ms=now_ms - 120_000)
    store = ReadModelStore(scratch, order_retention_s=60)

    store.apply(plan_writes([(0, 0, placed[0]), (0, 1, placed[1])], expiring=True))
    assert 55_000 < expires_in_ms(scratch, kept.order_id) <= 60_000
    store.apply(plan_writes([(0, 2, cancelled[2])], expiring=True))  # a later decision: kept longer
    assert 85_000 < expires_in_ms(scratch, kept.order_id) <= 90_000
    store.apply(plan_writes([(0, 1, placed[1])], expiring=True))  # the older one again: not brought forward
    assert 85_000 < expires_in_ms(scratch, kept.order_id) <= 90_000
    assert ReadModels(scratch).order(kept.order_id)[sku]["status"] == "cancelled"

    store.apply(plan_writes([(1, 0, long_ago[0]), (1, 1, long_ago[1])], expiring=True))  # 2 minutes ago
    assert not scratch.exists(order_key(old.order_id))  # as a rebuild of an old log leaves it
    assert ReadModels(scratch).stock(long_ago[0].sku) is not None  # the SKU's row is kept

    ReadModelStore(scratch).apply(plan_writes([(2, 0, placed[1])]))  # no retention: kept for good
    assert expires_in_ms(scratch, kept.order_id) > 0  # ... and an expiry set is left as it was
    other = place_order(sku, 1)
    ReadModelStore(scratch).apply(plan_writes([(2, 1, decided(sku, restock(sku, 5), other)[1])]))
    assert expires_in_ms(scratch, other.order_id) == -1
