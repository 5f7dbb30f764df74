"""The processor as a Faust app: commands in, decisions appended to the event log.

Thin wiring around ``processors.domain``: decode -> load the SKU's state from tables ->
decide -> save the new state -> append events. Tables are co-partitioned with the commands
topic (same partition count, key = SKU), and every event is written to the same partition
number of the events topic as its command, so a SKU's history stays in one partition.

Processing guarantee: Faust's at-least-once, made exact for decisions. A crash replays
commands from the last committed offset. The SKU row records the offset of the last command
applied to it, so a replayed command already in the state is skipped; one whose state did not
survive is decided again from the same prior state, which gives the same event (same id, same
version), and every reader drops such repeats by version. Why not Faust's exactly_once: see
the processor-kill test and the notes in README.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import faust
from faust.types import StreamT

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


def create_app(settings: Settings, data_dir: Path, web_port: int | None = None) -> faust.App:  # noqa: PLR0915
    data_dir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.processor_group,
        broker=broker_url(settings.bootstrap_servers),
        store="memory://",
        datadir=str(data_dir),
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        producer_acks=-1,
        web_enabled=web_port is not None,
        web_port=web_port or 6066,
    )
    commands = app.topic(
        settings.commands_topic,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.partitions,
    )
    events = app.topic(
        settings.events_topic,
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.partitions,
    )
    dead_letters = app.topic(settings.dlq_topic, key_serializer="raw", value_serializer="raw")
    # One table, so that everything a command changes goes to one changelog partition (the
    # command's), in order. A crash keeps a prefix of those writes, and the SKU row is written
    # last: if it survived, so did the rest. Keys:
    #   "s:<sku>"             {"available", "version", "offset"}: offset of the last command applied
    #   "o:<sku>/<order_id>"  {"qty", "cancelled"}: what a cancel needs
    #   "c:<command_id>"      offset of the command message that was decided: the retry dedupe set
    #   "p:<partition>"       offset of the last command message handled on that partition
    # The changelog topic is created by stockflow.topics.ensure_topics.
    (state_table,) = PROCESSOR_TABLES
    table = app.Table(state_table, partitions=settings.partitions, key_type=str)

    def load(command: Command, offset: int) -> Stock | None:
        """The SKU's state, or None if this very message was applied before a crash."""
        row = table.get(f"s:{command.sku}") or {"available": 0, "version": 0, "offset": -1}
        if offset <= row["offset"]:
            return None  # replayed after a restart: its effects and events are already there
        order_lines: dict[str, OrderLine] = {}
        if isinstance(command, (PlaceOrder, CancelOrder)):
            line = table.get(f"o:{command.sku}/{command.order_id}")
            if line is not None:
                order_lines[command.order_id] = OrderLine(line["qty"], line["cancelled"])
        decided_at = table.get(f"c:{command.command_id}")
        # The same id at another offset is a publisher's retry; at this offset it is a replay of
        # a message whose SKU row did not survive the crash, which must be decided again.
        retried = decided_at is not None and decided_at != offset
        seen = frozenset({command.command_id}) if retried else frozenset()
        return Stock(command.sku, row["available"], row["version"], order_lines, seen)

    def save(before: Stock, after: Stock, offset: int) -> None:
        for command_id in after.decided - before.decided:
            table[f"c:{command_id}"] = offset
        for order_id, line in after.orders.items():
            if before.orders.get(order_id) != line:
                table[f"o:{after.sku}/{order_id}"] = {"qty": line.qty, "cancelled": line.cancelled}
        table[f"s:{after.sku}"] = {"available": after.available, "version": after.version, "offset": offset}

    async def reject(command: Logged, reason: str, error_type: str) -> None:
        delivered = await dead_letters.send(
            key=command.key,
            value=command.value,
            headers=[
                ("error.reason", reason.encode()),
                ("error.type", error_type.encode()),
                ("source.topic", command.topic.encode()),
                ("source.partition", str(command.partition).encode()),
                ("source.offset", str(command.offset).encode()),
            ],
        )
        await delivered

    async def handle(message: Logged) -> None:
        """Decide one command message; always ends by recording its offset as handled."""
        try:
            command = codec.decode_command(message.value)
            validate_command(command)
        except (DecodeError, InvalidCommand) as exc:
            await reject(message, str(exc), type(exc).__name__)
            table[f"p:{message.partition}"] = message.offset
            return
        home = partition_for(command.sku.encode(), settings.partitions)
        if home != message.partition:
            await reject(
                message,
                f"command for SKU {command.sku!r} arrived on partition {message.partition}"
                f" but the SKU belongs on partition {home}: publish with key=SKU and"
                " Kafka's murmur2 partitioner",
                "WrongPartition",
            )
            table[f"p:{message.partition}"] = message.offset
            return
        state = load(command, message.offset)
        if state is not None:
            new_state = state
            for decision in decide(state, command, now_ms=int(time.time() * 1000)):
                new_state = evolve(new_state, decision)
                # Wait for the broker's ack before the state records the command as applied:
                # state saying "done" for an event that never reached the log is a lost decision.
                delivered = await events.send(
                    key=command.sku.encode(),
                    value=codec.encode(decision),
                    partition=message.partition,
                    headers=[
                        ("type", type(decision).__name__.encode()),
                        ("correlation_id", decision.correlation_id.encode()),
                    ],
                )
                await delivered
            save(state, new_state, message.offset)
        table[f"p:{message.partition}"] = message.offset

    @app.agent(commands)
    async def process(stream: StreamT[bytes]) -> None:
        async for event in stream.events():
            message = event.message
            handled = table.get(f"p:{message.partition}")
            if handled is not None and message.offset <= handled:
                continue  # replayed after a restart; handled before the crash
            if handled is not None and message.offset > handled + 1:
                # Faust's stream skipped commands (seen after a worker was SIGKILLed and
                # replaced: the new one started past offsets nobody had handled). Read the
                # missed range from Kafka and handle it first, in order.
                missed = await asyncio.get_running_loop().run_in_executor(
                    None,
                    read_range,
                    settings,
                    message.topic,
                    message.partition,
                    handled + 1,
                    message.offset,
                )
                log.warning(
                    "commands %s[%s] %s..%s were skipped by the stream; handling them now",
                    message.topic,
                    message.partition,
                    handled + 1,
                    message.offset - 1,
                )
                for command in missed:
                    await handle(command)
            await handle(
                Logged(
                    message.topic,
                    message.partition,
                    message.offset,
                    message.key,
                    message.value,
                    {},
                )
            )

    return app
