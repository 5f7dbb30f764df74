"""The processor as a Faust app: commands in, decisions appended to the event log.

Thin wiring around ``processors.domain``: decode -> load the SKU's state from tables ->
decide -> save the new state -> append events. Tables are co-partitioned with the commands
topic (same partition count, key = SKU), and every event is written to the same partition
number of the events topic as its command, so a SKU's history stays in one partition.

Processing guarantee: Faust's at-least-once. Events sent from the agent are attached to the
command's offset and published before that offset is committed; a crash replays commands
whose decisions may already be in the log, and the deterministic event ids and per-SKU
versions let every reader drop such repeats.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import faust
from faust.types import EventT, StreamT

from processors.domain import OrderLine, Stock, decide, evolve
from schemas.codec import codec
from schemas.records import CancelOrder, Command, PlaceOrder, validate_command
from stockflow.errors import DecodeError, InvalidCommand
from stockflow.partitioning import partition_for
from stockflow.settings import Settings
from stockflow.topics import PROCESSOR_TABLES


def broker_url(bootstrap_servers: str) -> str:
    return ";".join(f"kafka://{server.strip()}" for server in bootstrap_servers.split(","))


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
    # The changelog topics behind these tables are created by stockflow.topics.ensure_topics.
    stock_table, orders_table, decided_table = PROCESSOR_TABLES
    # Per SKU: {"available": int, "version": int}.
    stock = app.Table(stock_table, partitions=settings.partitions, key_type=str)
    # Per "<sku>/<order_id>": {"qty": int, "cancelled": bool}; what a cancel needs.
    orders = app.Table(orders_table, partitions=settings.partitions, key_type=str)
    # Per command id: the SKU version its decision got. The dedupe set for retried commands.
    decided = app.Table(decided_table, partitions=settings.partitions, key_type=str)

    def load(command: Command) -> Stock:
        row = stock.get(command.sku) or {"available": 0, "version": 0}
        order_lines: dict[str, OrderLine] = {}
        if isinstance(command, (PlaceOrder, CancelOrder)):
            line = orders.get(f"{command.sku}/{command.order_id}")
            if line is not None:
                order_lines[command.order_id] = OrderLine(line["qty"], line["cancelled"])
        seen = frozenset({command.command_id}) if command.command_id in decided else frozenset()
        return Stock(command.sku, row["available"], row["version"], order_lines, seen)

    def save(before: Stock, after: Stock) -> None:
        stock[after.sku] = {"available": after.available, "version": after.version}
        for order_id, line in after.orders.items():
            if before.orders.get(order_id) != line:
                orders[f"{after.sku}/{order_id}"] = {"qty": line.qty, "cancelled": line.cancelled}
        for command_id in after.decided - before.decided:
            decided[command_id] = after.version

    async def reject(event: EventT[Any], reason: str, error_type: str) -> None:
        message = event.message
        await dead_letters.send(
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

    @app.agent(commands)
    async def process(stream: StreamT[bytes]) -> None:
        async for event in stream.events():
            message = event.message
            try:
                command = codec.decode_command(message.value)
                validate_command(command)
            except (DecodeError, InvalidCommand) as exc:
                await reject(event, str(exc), type(exc).__name__)
                continue
            home = partition_for(command.sku.encode(), settings.partitions)
            if home != message.partition:
                await reject(
                    event,
                    f"command for SKU {command.sku!r} arrived on partition {message.partition}"
                    f" but the SKU belongs on partition {home}: publish with key=SKU and"
                    " Kafka's murmur2 partitioner",
                    "WrongPartition",
                )
                continue
            state = load(command)
            new_state = state
            for decision in decide(state, command, now_ms=int(time.time() * 1000)):
                new_state = evolve(new_state, decision)
                await events.send(
                    key=command.sku.encode(),
                    value=codec.encode(decision),
                    partition=message.partition,
                    headers=[
                        ("type", type(decision).__name__.encode()),
                        ("correlation_id", decision.correlation_id.encode()),
                    ],
                )
            save(state, new_state)

    return app
