"""The processor as a Faust app: commands in, decisions appended to the event log.

Thin wiring around ``processors.domain``: decode -> load the SKU's state from the table ->
decide -> append events -> save the new state. The table is co-partitioned with the commands
topic (same partition count, key = SKU), and every event is written to the same partition
number of the events topic as its command, so a SKU's history stays in one partition.

Processing guarantee: Faust's at-least-once, made exact for decisions.
- Each event is acknowledged by the broker before the state records its command as applied.
- Everything a command changes is one table, so it goes to one changelog partition in order,
  the SKU row and the partition's handled offset last: a crash keeps a consistent prefix.
- A replayed command already in the state is skipped by offset; one whose state did not
  survive is decided again from the same prior state, giving the same event (same id, same
  version), which every reader drops as a repeat.
- Faust's stream was seen to start past unhandled commands after a worker was SIGKILLed and
  replaced; the agent notices the jump and reads the missed range from Kafka first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import faust
from faust.types import StreamT, TableT, TopicT

from processors.domain import OrderLine, Stock, decide, evolve
from schemas.codec import codec
from schemas.records import CancelOrder, Command, PlaceOrder, validate_command
from stockflow.errors import DecodeError, InvalidCommand
from stockflow.logreader import Logged, read_range
from stockflow.partitioning import partition_for
from stockflow.settings import Settings
from stockflow.topics import PROCESSOR_TABLES

log = logging.getLogger(__name__)


def broker_url(bootstrap_servers: str) -> str:
    return ";".join(f"kafka://{server.strip()}" for server in bootstrap_servers.split(","))


class CommandHandler:
    """Decides one command message against the table. Table keys:

    - ``s:<sku>``: ``{"available", "version", "offset"}``, offset of the last command applied
    - ``o:<sku>/<order_id>``: ``{"qty", "cancelled"}``, what a cancel needs
    - ``c:<command_id>``: offset of the message that was decided; the retry dedupe set. Kept
      for good: memory grows with the number of distinct command ids (see README).
    - ``p:<partition>``: offset of the last command message handled on that partition
    """

    def __init__(
        self, settings: Settings, table: TableT[str, Any], events: TopicT, dead_letters: TopicT
    ) -> None:
        self.settings = settings
        self.table = table
        self.events = events
        self.dead_letters = dead_letters

    def handled_up_to(self, partition: int) -> int | None:
        offset = self.table.get(f"p:{partition}")
        return None if offset is None else int(offset)

    async def handle(self, message: Logged) -> None:
        """Decide one command message; always ends by recording its offset as handled."""
        try:
            command = codec.decode_command(message.value)
            validate_command(command)
            home = partition_for(command.sku.encode(), self.settings.partitions)
            if home != message.partition:
                await self._park(
                    message,
                    f"command for SKU {command.sku!r} arrived on partition {message.partition}"
                    f" but the SKU belongs on partition {home}: publish with key=SKU and"
                    " Kafka's murmur2 partitioner",
                    "WrongPartition",
                )
            else:
                await self._decide(command, message)
        except (DecodeError, InvalidCommand) as exc:
            await self._park(message, str(exc), type(exc).__name__)
        self.table[f"p:{message.partition}"] = message.offset

    async def _decide(self, command: Command, message: Logged) -> None:
        state = self._load(command, message.offset)
        if state is None:
            return  # replayed after a restart: its effects and events are already there
        new_state = state
        for decision in decide(state, command, now_ms=int(time.time() * 1000)):
            new_state = evolve(new_state, decision)
            # Wait for the broker's ack before the state records the command as applied:
            # state saying "done" for an event that never reached the log is a lost decision.
            delivered = await self.events.send(
                key=command.sku.encode(),
                value=codec.encode(decision),
                partition=message.partition,
                headers=[
                    ("type", type(decision).__name__.encode()),
                    ("correlation_id", decision.correlation_id.encode()),
                ],
            )
            await delivered
        self._save(state, new_state, message.offset)

    def _load(self, command: Command, offset: int) -> Stock | None:
        """The SKU's state, or None if this very message was applied before a crash."""
        row = self.table.get(f"s:{command.sku}") or {"available": 0, "version": 0, "offset": -1}
        if offset <= row["offset"]:
            return None
        order_lines: dict[str, OrderLine] = {}
        if isinstance(command, (PlaceOrder, CancelOrder)):
            line = self.table.get(f"o:{command.sku}/{command.order_id}")
            if line is not None:
                order_lines[command.order_id] = OrderLine(line["qty"], line["cancelled"])
        decided_at = self.table.get(f"c:{command.command_id}")
        # The same id at another offset is a publisher's retry; at this offset it is a replay of
        # a message whose SKU row did not survive the crash, which must be decided again.
        retried = decided_at is not None and decided_at != offset
        seen = frozenset({command.command_id}) if retried else frozenset()
        return Stock(command.sku, row["available"], row["version"], order_lines, seen)

    def _save(self, before: Stock, after: Stock, offset: int) -> None:
        # Order matters: a crash keeps a prefix of these writes, and the SKU row comes last.
        for command_id in after.decided - before.decided:
            self.table[f"c:{command_id}"] = offset
        for order_id, line in after.orders.items():
            if before.orders.get(order_id) != line:
                self.table[f"o:{after.sku}/{order_id}"] = {"qty": line.qty, "cancelled": line.cancelled}
        self.table[f"s:{after.sku}"] = {
            "available": after.available,
            "version": after.version,
            "offset": offset,
        }

    async def _park(self, message: Logged, reason: str, error_type: str) -> None:
        delivered = await self.dead_letters.send(
            key=message.key,
            value=message.value,
            headers=[
                ("error.reason", reason.encode()),
                ("error.type", error_type.encode()),
                ("source.topic", message.topic.encode()),
                ("source.partition", str(message.partition).encode()),
                ("source.offset", str(message.offset).encode()),
            ],
        )
        await delivered


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
        broker_session_timeout=settings.processor_session_timeout_s,
        web_enabled=web_port is not None,
        web_port=web_port or 6066,
    )

    def raw_topic(name: str) -> TopicT:
        return app.topic(name, partitions=settings.partitions, key_serializer="raw", value_serializer="raw")

    commands = raw_topic(settings.commands_topic)
    handler = CommandHandler(
        settings,
        # One table, so everything a command changes goes to one changelog partition, in order.
        # Its changelog topic is created by stockflow.topics.ensure_topics.
        app.Table(PROCESSOR_TABLES[0], partitions=settings.partitions, key_type=str),
        raw_topic(settings.events_topic),
        raw_topic(settings.dlq_topic),
    )

    @app.agent(commands)
    async def process(stream: StreamT[bytes]) -> None:
        async for event in stream.events():
            message = event.message
            handled = handler.handled_up_to(message.partition)
            if handled is not None and message.offset <= handled:
                continue  # replayed after a restart; handled before the crash
            if handled is not None and message.offset > handled + 1:
                await repair_gap(message.topic, message.partition, handled + 1, message.offset)
            await handler.handle(
                Logged(message.topic, message.partition, message.offset, message.key, message.value, {})
            )

    async def repair_gap(topic: str, partition: int, start: int, end: int) -> None:
        # Faust's stream skipped commands nobody had handled (seen after a worker was SIGKILLed
        # and replaced). Read them from Kafka and handle them first, in order.
        log.warning(
            "commands %s[%s] %s..%s were skipped by the stream; handling them now",
            topic,
            partition,
            start,
            end - 1,
        )
        loop = asyncio.get_running_loop()
        for missed in await loop.run_in_executor(None, read_range, settings, topic, partition, start, end):
            await handler.handle(missed)

    return app
