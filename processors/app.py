"""The processor as a Faust app: one agent feeding batches of command messages to the
``CommandHandler`` (``processors.handler``), the table it decides against
(``processors.state``), and a watchdog that restarts a worker whose stream stopped delivering.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import ssl
import sys
import time
from pathlib import Path
from typing import Any, cast

import faust
from aiokafka.errors import KafkaError
from faust.types import TP, StreamT, TopicT
from faust.types.auth import CredentialsT

from processors.handler import CommandHandler
from processors.state import StateTable
from processors.transport import Consumer, Transport
from stockflow import metrics
from stockflow.logreader import Logged, read_range
from stockflow.settings import Settings
from stockflow.topics import PROCESSOR_TABLES

log = logging.getLogger(__name__)

# Container allocations between the garbage collector's young passes (Python's default: 700).
# A batch keeps tens of thousands of objects alive until it is saved, and at 700 the passes
# kept walking them and moving them on to the older generations: collection took 5-6% of a
# flat-out processor's time, against 1.7-2.4% at 10,000. Higher cuts it further but makes each
# young pass longer: up to 20-50 ms at 50,000, against 15-30 ms at 10,000.
GC_YOUNG_THRESHOLD = 10_000


def tune_garbage_collector() -> None:
    """Set the collector up for a worker holding a large, long-lived state.

    The modules, Faust and its clients, set up by now, live as long as the worker: frozen,
    they are left out of the full passes, which took 40-60 ms each with them in.
    """
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    if freeze_after_full_pass not in gc.callbacks:
        gc.callbacks.append(freeze_after_full_pass)


def freeze_after_full_pass(phase: str, info: dict[str, int]) -> None:
    """Keep what survived a full pass of the garbage collector out of the next ones.

    What survives one is mostly the worker's state, which grows with every order in the cancel
    window: walked by every full pass, it made them longer as it grew (up to 870 ms with 2
    million orders held). Frozen right after a pass, nothing frozen is garbage the pass had
    yet to find. An object frozen is not freed if it later ends up in a reference cycle; the
    state is dropped by reference counting, and the full passes logged (gc.DEBUG_STATS) while
    the processor ran flat out found no unreachable object at all.
    """
    if phase == "stop" and info["generation"] == 2:
        gc.freeze()


def broker_url(bootstrap_servers: str) -> str:
    return ";".join(f"kafka://{server.strip()}" for server in bootstrap_servers.split(","))


def broker_credentials(settings: Settings) -> CredentialsT | None:
    """How Faust's Kafka clients log in: the STOCKFLOW_KAFKA_* settings every other client
    takes through ``Settings.kafka_config``, in Faust's terms."""
    context = None
    if settings.kafka_tls:
        context = ssl.create_default_context(cafile=settings.kafka_ssl_ca_file or None)
    if settings.kafka_sasl:
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=settings.kafka_sasl_password,
            mechanism=settings.kafka_sasl_mechanism,
            ssl_context=context,
        )
    return None if context is None else faust.SSLCredentials(context)


def stalled(waiting: dict[int, int], idle_s: float, limit_s: float) -> bool:
    """True when commands wait on some partition but none has reached the agent for ``limit_s``.

    Faust's stream has been reported to stop delivering after a rebalance, with no error
    (faust-streaming issues 175, 523, 532); it was seen here once, with two processors.
    """
    return idle_s >= limit_s and any(count > 0 for count in waiting.values())


def stall_report(app: faust.App) -> str:
    """What a stalled worker's consumer, recovery and agent were doing: Faust's internals, read
    for the log only, so the cause of a stall can be found after the worker is gone."""
    try:
        return _describe(app)
    except Exception as exc:  # it reads Faust's internals, and must not stop the restart
        return f"unknown: {exc!r}"


def _describe(app: faust.App) -> str:
    consumer = cast(Any, app.consumer)
    recovery = cast(Any, app.tables).recovery
    state = {
        "assigned": sorted(f"{tp.topic}[{tp.partition}]" for tp in consumer.assignment()),
        "paused by faust": sorted(f"{tp.topic}[{tp.partition}]" for tp in consumer._paused_partitions),
        "paused in aiokafka": sorted(
            f"{tp.topic}[{tp.partition}]" for tp in consumer._thread._consumer.paused()
        ),
        "flow control active": app.flow_control.is_active(),
        "rebalancing": app.rebalancing,
        "in recovery": recovery.in_recovery,
        "recovery restart signalled": recovery.signal_recovery_start.is_set(),
        "unacked messages": len(consumer._unacked_messages),
    }
    return f"{state}\n{app.agents.human_tracebacks()}"


def create_app(settings: Settings, data_dir: Path, web_port: int | None = None) -> faust.App:
    data_dir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.processor_group,
        broker=broker_url(settings.bootstrap_servers),
        broker_credentials=broker_credentials(settings),
        store="memory://",
        datadir=str(data_dir),
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        producer_acks=-1,
        # The committed offset is what lag, `stockflow status` and publishers' backpressure
        # read; Faust's default of 2.8 s makes it trail far behind the work done.
        broker_commit_interval=0.5,
        # No standby copies of other workers' partitions: Faust would keep them current record
        # by record through its recovery path, and a standby made active is read from its
        # start anyway (the memory store has no persisted offset). A worker given a partition
        # restores it in seconds (StateTable). Workers on one host were given no standbys
        # even at Faust's default of 1 (checked with two): this matters across hosts.
        table_standby_replicas=0,
        broker_session_timeout=settings.processor_session_timeout_s,
        broker_client_id=f"stockflow-processor-{socket.gethostname()}-{os.getpid()}",
        web_enabled=web_port is not None,
        web_port=web_port or 6066,
    )

    # Faust's transport, but with a fetch wait that cannot stall the agent (processors.transport).
    app.transport = Transport(app.conf.broker_consumer, app)

    def raw_topic(name: str) -> TopicT:
        return app.topic(name, partitions=settings.partitions, key_serializer="raw", value_serializer="raw")

    async def read_commands(partition: int, start: int, end: int) -> list[Logged]:
        loop = asyncio.get_running_loop()
        topic = settings.commands_topic
        return await loop.run_in_executor(None, read_range, settings, topic, partition, start, end)

    # One table, so everything a command changes goes to one changelog partition, in order.
    # Its changelog topic is created by stockflow.topics.ensure_topics.
    table = StateTable(
        app,
        settings=settings,
        name=PROCESSOR_TABLES[0],
        beacon=app.tables.beacon,
        partitions=settings.partitions,
        key_type=str,
    )
    app.tables.add(table)

    async def commit_as_member(offsets: dict[int, int]) -> bool:
        consumer = cast(Consumer, app.consumer)  # built by processors.transport
        tps = {TP(settings.commands_topic, partition): offset for partition, offset in offsets.items()}
        return await consumer.commit_as_member(tps)

    handler = CommandHandler(settings, table, app.producer, read_commands, commit_as_member)

    def committable(tp: TP) -> int | None:
        """One past the last command handled on a commands partition, as the table has it (Faust
        flushes the producer before it commits, so the save is in the changelog first)."""
        handled = handler.saved_offset(tp.partition) if tp.topic == settings.commands_topic else -1
        return None if handled < 0 else handled + 1

    @app.agent(raw_topic(settings.commands_topic))
    async def process(stream: StreamT[bytes]) -> None:
        # take_events is on faust.Stream, the class every agent gets, not on the StreamT protocol.
        batches = cast(faust.Stream[bytes], stream).take_events(
            settings.processor_batch_size, within=settings.processor_batch_wait_s
        )
        tune_garbage_collector()
        cast(Consumer, app.consumer).committable = committable  # built by processors.transport
        async for events in batches:
            messages = [event.message for event in events]
            handler.check_timestamp_type(messages[0].timestamp_type)
            await handler.handle_batch(
                [
                    Logged(
                        m.topic, m.partition, m.offset, m.key, m.value or b"", {}, round(m.timestamp * 1000)
                    )
                    for m in messages
                ]
            )
            for tp in {m.tp for m in messages}:
                handled = handler.handled_offset(tp.partition)
                lag = max(app.consumer.highwater(tp) - handled - 1, 0)
                metrics.CONSUMER_LAG.labels(settings.processor_group, tp.partition).set(lag)

    restore_left = [-1]  # changelog records the table's restore still had to read, last check

    @app.timer(interval=5.0)  # type: ignore[untyped-decorator]  # faust's timer is untyped
    async def watchdog() -> None:
        recovery = cast(Any, app.tables).recovery  # the TableManager's, missing from its type
        if not recovery.completed.is_set():
            handler.last_batch_at = time.monotonic()  # restoring the table is work, not a stall
            return
        if recovery.in_recovery:
            # Faust sets `completed` once, after the first restore. A later one (a rebalance
            # gave this worker more partitions) counts as work while it gets through records.
            left = recovery.active_remaining_total()
            if left != restore_left[0]:
                handler.last_batch_at = time.monotonic()
            restore_left[0] = left
        idle_s = time.monotonic() - handler.last_batch_at
        if idle_s < settings.processor_stall_timeout_s:
            return
        commands = [tp for tp in app.consumer.assignment() if tp.topic == settings.commands_topic]
        # End offsets from the broker: the consumer's own high-water mark is only as new as its
        # last fetch, so a partition no longer fetched, or never fetched, looked idle by it.
        try:
            ends = await asyncio.wait_for(app.consumer.highwaters(*commands), 10)
        except (TimeoutError, KafkaError) as exc:
            log.warning("stall check skipped: cannot read end offsets (%r)", exc)
            return
        waiting = {}
        for tp in commands:
            waiting[tp.partition] = ends.get(tp, 0) - handler.handled_offset(tp.partition) - 1
        if stalled(waiting, idle_s, settings.processor_stall_timeout_s):
            log.error(
                "no command reached the agent for %.0fs while %s wait on partitions %s: the stream"
                " stopped delivering; restarting this worker in place, which the state is built to"
                " survive (STOCKFLOW_PROCESSOR_STALL_TIMEOUT_S)",
                idle_s,
                sum(count for count in waiting.values() if count > 0),
                sorted(p for p, count in waiting.items() if count > 0),
            )
            log.error("where the worker stood: %s", stall_report(app))
            logging.shutdown()
            # A fresh Faust in the same process, as abrupt as a crash: the same pid, so the
            # stack, compose and any supervisor still hold the right process, and nothing has
            # to be around to start it again. The stuck consumer is not trusted to leave the
            # group; the broker drops it after the session timeout.
            os.execv(sys.executable, sys.orig_argv)

    return app
