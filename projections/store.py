"""Redis read models, written idempotently and without multi-key operations across slots.

Keys (``{...}`` is a Redis Cluster hash tag: a SKU's keys share one slot):
  sf:stock:{SKU}      hash  available, version, updated_at, units_sold, one counter per event kind
  sf:recent:{SKU}     list  newest processed order ids first, trimmed
  sf:restocks:{SKU}   list  the SKU's newest restock decisions first, RECENT_RESTOCKS of them: JSON
                            documents naming their command (``projections.views.restock_document``)
  sf:order:{ORDER}    hash  "<SKU>:<status>:<version>" -> JSON document of that decision about
                            the order line, naming its command (``projections.views.line_status``
                            picks what the line shows); with a retention, it expires that long
                            after the order's placing or cancel
  sf:top              zset  SKU -> units sold, as of the version in {sf:top}:versions
  {sf:top}:versions   hash  SKU -> the SKU's version its sf:top score is at (the hash tag puts
                            it in sf:top's slot, so one script guards both)
  sf:skus             set   every SKU seen
  sf:watermarks       hash  events-topic partition -> last offset applied
  sf:latency_ms       hash  latency bucket (ms) -> events made visible that long after their
                            command was created (``projections.views.latency_bucket``)
  sf:latency_ms:decided  hash  the same for the decision, as each event records it: command
                            created -> decided; the rest of sf:latency_ms is the event log and
                            the projection

Every write is guarded by the SKU's event version (or the partition offset), checked inside a
Lua script on a single key slot, or is a decision's document under a field its event alone
names (HSETNX, no script: a Lua call per order cost Redis several times an HSETNX), so replaying
any part of the log leaves the models unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import hiredis
import redis
from redis._parsers.hiredis import NOT_ENOUGH_DATA
from redis.exceptions import NoScriptError

from projections.views import KIND, WritePlan

PREFIX = "sf"
STOCK_COUNTERS = ("units_sold", *KIND.values())

# KEYS: stock hash, recent list, restocks list. ARGV: recent max, restocks max, then
# available_after and occurred_at of the last event, then 4 per event, in rising versions:
# version, kind, qty, and the order id (an order's event) or the decision's document (a restock's).
# The events newer than the stored version are folded here, then written with one command per
# field: a Lua call per event, or five commands per event, was most of Redis's time.
# Returns {events applied, units sold, 1 if a version is missing before these events, the
# version now stored}. A missing version means Redis lost what it had (a restart, a flush):
# nothing is written, and the worker replays the partition from the start of the log.
_APPLY_SKU = """
local current = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
local recent_max = tonumber(ARGV[1])
local restocks_max = tonumber(ARGV[2])
local version = current
local counts = {}
local units, sold = 0, false
local recent = {}
local restocks = {}
for i = 5, #ARGV, 4 do
  local v = tonumber(ARGV[i])
  if v > version + 1 then
    return {0, tonumber(redis.call('HGET', KEYS[1], 'units_sold') or '0'), 1, current}
  end
  if v > version then
    local kind = ARGV[i + 1]
    counts[kind] = (counts[kind] or 0) + 1
    if kind == 'processed' then
      units, sold = units + tonumber(ARGV[i + 2]), true
      recent[#recent + 1] = ARGV[i + 3]
    elseif kind == 'cancelled' then
      units, sold = units - tonumber(ARGV[i + 2]), true
    elseif kind == 'replenished' or kind == 'restock_rejected' then
      restocks[#restocks + 1] = ARGV[i + 3]
    end
    version = v
  end
end
if version == current then
  return {0, tonumber(redis.call('HGET', KEYS[1], 'units_sold') or '0'), 0, current}
end
redis.call('HSET', KEYS[1], 'available', ARGV[3], 'version', version, 'updated_at', ARGV[4])
local applied = 0
for kind, count in pairs(counts) do
  redis.call('HINCRBY', KEYS[1], kind, count)
  applied = applied + count
end
if sold then
  redis.call('HINCRBY', KEYS[1], 'units_sold', units)
end
if #recent > 0 then
  -- Only the newest recent_max survive the trim; LPUSH puts the last one first.
  redis.call('LPUSH', KEYS[2], unpack(recent, math.max(1, #recent - recent_max + 1)))
  redis.call('LTRIM', KEYS[2], 0, recent_max - 1)
end
if #restocks > 0 then
  redis.call('LPUSH', KEYS[3], unpack(restocks, math.max(1, #restocks - restocks_max + 1)))
  redis.call('LTRIM', KEYS[3], 0, restocks_max - 1)
end
return {applied, tonumber(redis.call('HGET', KEYS[1], 'units_sold') or '0'), 0, version}
"""

# KEYS: top sellers zset, its versions hash. ARGV: SKU, version, units sold triples, as the SKU
# script returned them. A score is written only over an older version's: a worker paused between
# its SKU scripts and this call, past its session, would otherwise put back an older score over
# its replacement's. Sent for every SKU of a batch, new events or not: a worker that stopped
# before this call writes the score when it replays the batch. Three calls in all, not three a
# SKU: Redis took 3.4-4.8 us a SKU that way, 2.0-2.8 this way, 0.5-0.7 for a bare ZADD (calls
# of 1,000 SKUs, INFO commandstats).
_RAISE_TOP = """
local skus = {}
for i = 1, #ARGV, 3 do
  skus[#skus + 1] = ARGV[i]
end
local held = redis.call('HMGET', KEYS[2], unpack(skus))
local versions, scores = {}, {}
for j, sku in ipairs(skus) do
  local version = ARGV[3 * j - 1]
  if tonumber(version) > tonumber(held[j] or '0') then
    table.insert(versions, sku)
    table.insert(versions, version)
    table.insert(scores, ARGV[3 * j])
    table.insert(scores, sku)
  end
end
if #versions > 0 then
  redis.call('HSET', KEYS[2], unpack(versions))
  redis.call('ZADD', KEYS[1], unpack(scores))
end
"""

# SKUs a top sellers call: Lua's unpack takes at most about 8,000 values.
TOP_SKUS_PER_CALL = 1000

# KEYS: watermarks hash. ARGV: partition, held, offset triples; held is the watermark the
# writer last saw there (-1: none). Offsets only move forward. A watermark below what the writer
# saw means Redis lost data (a flush, a restart) since then, maybe between this batch's SKU
# writes and this call: the partition is returned, not advanced, and the worker replays it.
# Advanced anyway, it would mark as applied a partition whose older effects are gone.
_ADVANCE_WATERMARKS = """
local lost = {}
for i = 1, #ARGV, 3 do
  local current = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '-1')
  if current < tonumber(ARGV[i + 1]) then
    lost[#lost + 1] = tonumber(ARGV[i])
  elseif tonumber(ARGV[i + 2]) > current then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 2])
  end
end
return lost
"""


def stock_key(sku: str) -> str:
    return f"{PREFIX}:stock:{{{sku}}}"


def recent_key(sku: str) -> str:
    return f"{PREFIX}:recent:{{{sku}}}"


def restocks_key(sku: str) -> str:
    return f"{PREFIX}:restocks:{{{sku}}}"


# Restock decisions a SKU's read model keeps, newest first: what a client waiting for its
# restock's decision finds it among (a restock is rare beside the orders of a SKU).
RECENT_RESTOCKS = 20


def order_key(order_id: str) -> str:
    return f"{PREFIX}:order:{{{order_id}}}"


TOP_KEY = f"{PREFIX}:top"
TOP_VERSIONS_KEY = f"{{{TOP_KEY}}}:versions"
SKUS_KEY = f"{PREFIX}:skus"
WATERMARKS_KEY = f"{PREFIX}:watermarks"
LATENCY_KEY = f"{PREFIX}:latency_ms"
DECIDED_LATENCY_KEY = f"{PREFIX}:latency_ms:decided"


@dataclass
class Applied:
    events: int = 0  # events that changed a SKU (repeats and replays change nothing)
    gaps: set[int] = field(default_factory=set)  # partitions to replay from the start


class ReadModelStore:
    def __init__(
        self, client: redis.Redis, recent_orders_per_sku: int = 20, order_retention_s: float = 0
    ) -> None:
        """``order_retention_s``: how long an order's read model is kept after the decision that
        placed it, or its cancel; 0 keeps it for good."""
        self._redis = client
        self._recent_max = recent_orders_per_sku
        self._order_retention_ms = round(order_retention_s * 1000)
        self._apply_sku = client.register_script(_APPLY_SKU)
        self._raise_top = client.register_script(_RAISE_TOP)
        self._advance_watermarks = client.register_script(_ADVANCE_WATERMARKS)

    def apply(self, plan: WritePlan, held: Mapping[int, int] | None = None) -> Applied:
        """Write a plan; the partition watermarks go last, after every effect they cover.

        ``held``: per partition, the watermark the writer saw in Redis before this plan (read,
        or written by itself). A partition in which some SKU's history has a gap, or whose
        watermark has fallen below ``held``, gets no watermark: it must be replayed.
        """
        held = held or {}
        try:
            return self._apply(plan, held)
        except NoScriptError:
            # Redis restarted (or SCRIPT FLUSH): load the scripts and write the plan again,
            # which changes nothing it already wrote.
            for script in (self._apply_sku, self._raise_top, self._advance_watermarks):
                self._redis.script_load(script.script)
            return self._apply(plan, held)

    def _apply(self, plan: WritePlan, held: Mapping[int, int]) -> Applied:
        skus = list(plan.sku_events)
        commands: list[tuple[Any, ...]] = []
        for sku, events in plan.sku_events.items():
            commands.append(
                (
                    "EVALSHA",
                    self._apply_sku.sha,
                    3,
                    stock_key(sku),
                    recent_key(sku),
                    restocks_key(sku),
                    self._recent_max,
                    RECENT_RESTOCKS,
                    events.available_after,
                    events.occurred_at,
                    *events.script_args,
                )
            )
        for (order_id, line_field), document in plan.order_lines.items():
            commands.append(("HSETNX", order_key(order_id), line_field, document))
        commands += self._expiries(plan)
        if skus:
            commands.append(("SADD", SKUS_KEY, *skus))
        results = self._send(commands)
        outcome = Applied()
        commands = []
        top: list[Any] = []  # SKU, version, units sold, ...: one script for the batch
        for sku, (count, units_sold, gap, version) in zip(skus, results, strict=False):
            outcome.events += int(count)
            if gap:
                outcome.gaps.add(plan.sku_partitions[sku])
            else:
                top += (sku, int(version), int(units_sold))
        for start in range(0, len(top), 3 * TOP_SKUS_PER_CALL):
            chunk = top[start : start + 3 * TOP_SKUS_PER_CALL]
            commands.append(("EVALSHA", self._raise_top.sha, 2, TOP_KEY, TOP_VERSIONS_KEY, *chunk))
        marks = [
            (p, held.get(p, -1), offset) for p, offset in plan.watermarks.items() if p not in outcome.gaps
        ]
        if marks:
            args = [x for mark in marks for x in mark]
            commands.append(("EVALSHA", self._advance_watermarks.sha, 1, WATERMARKS_KEY, *args))
        replies = self._send(commands)
        if marks:
            outcome.gaps.update(int(p) for p in replies[-1])
        return outcome

    def _expiries(self, plan: WritePlan) -> list[tuple[Any, ...]]:
        """With a retention, when each order of the plan (made ``expiring``) expires.

        Timed from the decision, so a replay or a rebuild keeps what the live worker kept, and a
        time already past deletes the key. NX: set on a key that has none (a new order), so a
        replayed decision changes nothing; GT: a cancel moves it later, never sooner. One
        command an order, not both on every order: the second cost the worker 1-2 us an order.
        """
        if not self._order_retention_ms:
            return []
        retention = self._order_retention_ms
        commands: list[tuple[Any, ...]] = [
            ("PEXPIREAT", order_key(order_id), decided_at + retention, "NX")
            for order_id, decided_at in plan.order_decided_at.items()
        ]
        for order_id in plan.orders_cancelled:
            commands.append(
                ("PEXPIREAT", order_key(order_id), plan.order_decided_at[order_id] + retention, "GT")
            )
        return commands

    def record_latencies(self, visible: dict[int, int], decided: dict[int, int]) -> None:
        self._send(
            [
                ("HINCRBY", key, bucket, count)
                for key, counts in ((LATENCY_KEY, visible), (DECIDED_LATENCY_KEY, decided))
                for bucket, count in counts.items()
            ]
        )

    def _send(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        return exchange(self._redis, commands)


def exchange(client: redis.Redis, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
    """Send ``commands`` in one write and read their replies, in order.

    Not redis-py's pipeline: its bookkeeping cost 5.7 us of the worker's CPU per command,
    and a batch is mostly one command per order. Connection errors are retried as redis-py
    retries them (every command sent here may be repeated); an error reply raises, and the
    connection, with replies still unread on it, is closed.
    """
    if not commands:
        return []
    pool = client.connection_pool
    connection: Any = pool.get_connection()  # redis-py's connection methods are untyped
    packed = b"".join(hiredis.pack_command(command) for command in commands)

    def send() -> list[Any]:
        try:
            connection.send_packed_command([packed])
            return _replies(connection, len(commands))
        except BaseException:
            connection.disconnect()  # replies may be left unread on it
            raise

    try:
        return connection.retry.call_with_retry(send, lambda _error: None)  # type: ignore[no-any-return]
    finally:
        pool.release(connection)


def _replies(connection: Any, count: int) -> list[Any]:
    """The next ``count`` replies on ``connection``; an error reply raises, as redis-py raises it.

    The replies already read off the socket are taken straight from the connection's hiredis
    reader (redis-py's, an internal of the version requirements.lock pins); read_response, which
    reads the socket, only when none is left. read_response costs 1.0-1.5 us of Python a reply
    (0.2-0.35 this way), and a batch is mostly one HSETNX an order.
    """
    reader = connection._parser._reader
    replies = []
    for _ in range(count):
        reply = reader.gets()
        if reply is NOT_ENOUGH_DATA:
            reply = connection.read_response()
        elif isinstance(reply, Exception):  # an error reply, made by redis-py's parser
            raise reply  # NoScriptError, BusyLoadingError (retried as a connection error), ...
        replies.append(reply)
    return replies
