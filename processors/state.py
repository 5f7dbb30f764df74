"""The processor's state: one Faust table, ``StateTable``, and the records it keeps.

Everything a command changes is in this one table, so a batch's changes go to one changelog
partition in order (``processors.handler`` says which records and why). Keys and values are
compact JSON; a batch's order lines on a partition are one record, cut into several only when
long ids could make it outgrow a Kafka message.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Sequence
from typing import Any, cast
from urllib.parse import quote

import faust
import orjson
from faust.types import TP

from schemas.codec import MAX_FRAME_BYTES
from stockflow.logreader import Latest, read_latest
from stockflow.settings import Settings

log = logging.getLogger(__name__)

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


class LineIndex(dict[str, Line]):
    """A partition's order lines by ``line_key(sku, order_id)``: hundreds of thousands of them.

    A dict subclass only so that the garbage collector keeps tracking it. It stops tracking a
    plain dict whose values it does not track (tuples of ints) in each full pass, and starts
    again when the next line goes in, as a young object: so it never stayed frozen (see
    ``processors.app.freeze_after_full_pass``), and each full pass walked every partition's
    index whole, 250,000-490,000 references each with 2 million orders held.
    """


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

    async def write(
        self, partition: int, changes: Sequence[tuple[str, Any]], batches: list[Any]
    ) -> list[asyncio.Future[Any]]:
        """Set each key to its value (None deletes it) and hand ``batches``, the changes as
        ``encode`` gave them, to the producer for one changelog partition, in order; the
        futures of their delivery."""
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
        return [await producer.send_batch(batch, topic, partition=partition) for batch in batches]
