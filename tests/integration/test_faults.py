"""Faults injected into real processes under load; `verify` must pass afterwards."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from confluent_kafka import Producer, TopicPartition

from producers.commands import cancel_order, place_order, restock
from producers.load import LoadProfile, LoadReport, run_load
from producers.publisher import Publisher
from projections.queries import ReadModels
from projections.store import TOP_KEY, order_key, recent_key, restocks_key
from schemas.records import Event, OrderCancelled, OrderRejected
from stockflow.lag import GroupLag, LagProbe
from stockflow.logreader import read_latest
from stockflow.partitioning import partition_for
from stockflow.settings import Settings
from stockflow.stack import LocalStack
from stockflow.topics import PROCESSOR_TABLES, changelog_topic, ensure_topics
from stockflow.verify import Report, verify
from tests.pipeline import commit_offset, events_for, own_settings, publish_all, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.fault]


def quiet_verify(settings: Settings, timeout_s: float = 180.0) -> Report:
    """Verify once the read models have caught up with the log; then both groups must have
    committed everything, since their committed lag is what operators and backpressure read."""

    def caught_up() -> Report | None:
        report = verify(settings)
        return None if report.behind or report.lost else report

    try:
        report = wait_for("the read models to catch up with the event log", caught_up, timeout_s)
    except AssertionError:
        report = verify(settings)
        raise AssertionError(f"{report.summary()}\n{report.problems[:20]}\n{report.behind[:5]}") from None
    probe = LagProbe(settings)
    try:
        lags: list[GroupLag] = []

        def committed_all() -> bool:
            lags[:] = probe.read()
            return all(lag.total == 0 for lag in lags)

        try:
            wait_for("both groups to commit every message they handled", committed_all, 30)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {[lag.as_json() for lag in lags]}") from None
    finally:
        probe.close()
    return report


def test_verify_passes_on_a_healthy_pipeline(settings: Settings, stack: LocalStack) -> None:
    publisher = Publisher(settings)
    publisher.publish(restock("VERIFY-1", 3))
    report = quiet_verify(settings)
    assert report.problems == []
    assert report.commands >= 1
    assert report.decisions >= report.commands - report.dead_letters


def test_verify_takes_one_command_id_on_two_partitions_for_two_commands(
    settings: Settings, stack: LocalStack, unique: Callable[[str], str]
) -> None:
    # The processor deduplicates a command id on its partition, where a retry lands (it names the
    # same SKU): a client that reuses an id for a SKU on another partition sends another
    # command, and both are decided. verify checks a partition at a time, as the processor
    # decides them, and agrees (checking the whole log at once, it had called them one
    # command decided twice).
    first = unique("REUSED")
    home = partition_for(first.encode(), settings.partitions)
    second = next(
        f"{first}-{n}"
        for n in range(100)
        if partition_for(f"{first}-{n}".encode(), settings.partitions) != home
    )
    command_id = unique("command")
    publish_all(settings, restock(first, 2, command_id=command_id), restock(second, 3, command_id=command_id))
    report = quiet_verify(settings)
    assert report.problems == []
    models = ReadModels(redis.Redis.from_url(settings.redis_url))
    decisions = [models.restock_decision(sku, command_id) for sku in (first, second)]
    assert [(d or {}).get("qty") for d in decisions] == [2, 3]


def test_verify_takes_a_table_row_behind_the_log_for_a_mismatch_once_every_command_is_committed(
    settings: Settings, stack: LocalStack, unique: Callable[[str], str]
) -> None:
    # What a processor paused past its session used to leave: an older row of a SKU saved after
    # the newer one. With the processor idle it can only be that, not a save still to come.
    sku = unique("STALE")
    publish_all(settings, restock(sku, 5), restock(sku, 3))
    assert quiet_verify(settings).problems == []
    changelog = changelog_topic(settings, PROCESSOR_TABLES[0])
    partition = partition_for(sku.encode(), settings.partitions)
    key = json.dumps(f"s:{sku}").encode()
    row = read_latest(settings, changelog, [partition])[partition].values[key]
    assert row is not None and json.loads(row)["version"] == 2
    older = json.dumps({**json.loads(row), "available": 5, "version": 1}).encode()
    raw = Producer({"bootstrap.servers": settings.bootstrap_servers})
    try:
        raw.produce(changelog, older, key, partition=partition)
        assert raw.flush(30) == 0
        report = verify(settings)
        assert [line for line in report.table_mismatches if sku in line] == [
            f"SKU {sku}: table at 1, log at 2, with every command committed: the changelog holds an older row"
        ]
        assert not [line for line in report.behind if sku in line]
    finally:
        raw.produce(changelog, row, key, partition=partition)  # the later tests share the table
        assert raw.flush(30) == 0


def test_verify_finds_read_models_that_differ_from_the_log_beyond_the_stock_counters(
    settings: Settings, stack: LocalStack, unique: Callable[[str], str]
) -> None:
    # Each tampered as a bug or a stale writer would leave it, then put back.
    sku = unique("TAMPER")
    order = place_order(sku, 2)
    publish_all(settings, restock(sku, 5), order)
    assert quiet_verify(settings).problems == []
    client = redis.Redis.from_url(settings.redis_url)
    key, name = order_key(order.order_id), f"{sku}:processed:2"  # the SKU's second event
    document: bytes | None = client.hget(key, name)  # type: ignore[assignment]
    assert document is not None and json.loads(document)["qty"] == 2

    def problems() -> list[str]:
        report = verify(settings)
        return [line for line in report.read_model_mismatches if sku in line or order.order_id in line]

    client.zadd(TOP_KEY, {sku: 1})  # a top-sellers score at the SKU's version
    try:
        assert problems() == [f"SKU {sku}: top sellers have 1 sold, the log 2"]
    finally:
        client.zadd(TOP_KEY, {sku: 2})
    client.lpush(recent_key(sku), "o-never-placed")
    try:
        assert problems() == [
            f"SKU {sku}: (read model, log) differ in"
            f" {{'recent_orders': (['o-never-placed', '{order.order_id}'], ['{order.order_id}'])}}"
        ]
    finally:
        client.lpop(recent_key(sku))
    forged = '{"status":"replenished","qty":9,"reason":"","version":9,"updated_at":0,"command_id":"c-never"}'
    client.lpush(restocks_key(sku), forged)
    try:
        [problem] = problems()
        assert problem.startswith(f"SKU {sku}: (read model, log) differ in {{'recent_restocks': ([{{'status'")
    finally:
        client.lpop(restocks_key(sku))
    try:
        tampered = document.replace(b'"qty":2', b'"qty":3')
        client.hset(key, name, tampered.decode())
        assert problems() == [
            f"order {order.order_id} line {name}: Redis has {tampered.decode()}, the log {document.decode()}"
        ]
        client.hdel(key, name)
        [missing] = problems()
        assert missing.startswith(f"order {order.order_id} line {name}: not in Redis, though applied up to")
    finally:
        client.hset(key, name, document.decode())
    assert problems() == []


def test_verify_run_under_load_finds_views_behind_the_log_not_mismatches(
    settings: Settings, stack: LocalStack, unique: Callable[[str], str]
) -> None:
    # verify used to read the log first and the views after it: the rows a live processor and
    # projection wrote for commands decided in between were ahead of the fold, and reported as
    # mismatches (exit 1), which `--wait` does not wait out. Nor is a command the processor has
    # not reached yet lost (the next test).
    publisher = Publisher(settings)
    profile = LoadProfile(orders=12_000, rate=2_000, skus=50, sku_prefix=unique("LIVE") + "-", seed=3)
    sender = threading.Thread(target=run_load, args=(publisher, profile))
    sender.start()
    reports: list[Report] = []
    try:
        while sender.is_alive():
            reports.append(verify(settings))
    finally:
        sender.join()
        publisher.close()
    for report in reports:
        assert report.problems == [], report.summary()
    assert any(report.behind for report in reports), "no verify ran while the workers were behind"
    assert quiet_verify(settings).problems == []


def test_verify_counts_a_command_lost_only_once_the_processor_committed_past_it(
    settings: Settings, stack: LocalStack, unique: Callable[[str], str], tmp_path: Path
) -> None:
    # Topics and a group of their own, which no processor works on: three commands on one
    # partition, the group's offset committed past the first two, none decided.
    own = own_settings(settings, unique, tmp_path)
    ensure_topics(own)
    sku = unique("SKU")
    commands = [restock(sku, 1) for _ in range(3)]
    receipts = publish_all(own, *commands)
    partition = partition_for(sku.encode(), own.partitions)
    assert [receipt.partition for receipt in receipts] == [partition] * 3
    commit_offset(
        own, own.processor_group, TopicPartition(own.commands_topic, partition, receipts[1].offset + 1)
    )
    report = verify(own)
    assert report.lost == sorted(command.command_id for command in commands[:2])
    assert report.undecided == [commands[2].command_id]
    assert report.problems == [f"lost command {command_id}" for command_id in report.lost]


@dataclass(frozen=True)
class FaultRun:
    report: Report
    pending: int  # commands of the run not yet decided when the fault hit (sent or still to send)
    recovered_s: float  # from the fault until verify passed (includes finishing the load)

    def line(self, fault: str) -> str:
        r = self.report
        return (
            f"{fault}: {self.pending} commands still to decide, {r.repeated_events} repeated events,"
            f" {r.command_repeats} retried commands, {len(r.lost)} lost,"
            f" {len(r.double_decisions)} double decisions, verified {self.recovered_s:.1f}s after"
        )


def load_with_fault(
    settings: Settings, stack: LocalStack, prefix: str, inject: Callable[[], None]
) -> FaultRun:
    """20,000 orders on 200 SKUs at 2,000/s, and 500 commands a publisher retries across the fault.

    ``inject`` runs once 2,000 of its commands are decided.
    """
    baseline = verify(settings).decisions  # the session's earlier tests share the topics
    publisher = Publisher(settings)
    # Paced over 10 s, so the fault lands mid-load: unpaced, batch frames are all in within a second.
    profile = LoadProfile(orders=20_000, rate=2_000, skus=200, hot_skus=10, sku_prefix=prefix, seed=7)
    for sku in profile.sku_names():
        publisher.send(restock(sku, 150))
    retried = [restock(sku, 1) for sku in profile.sku_names()[:100] for _ in range(5)]
    for command in retried:
        publisher.send(command)
    assert publisher.flush(30) == 0
    done: list[LoadReport] = []
    sender = threading.Thread(target=lambda: done.append(run_load(publisher, profile)))
    sender.start()
    started = wait_for("2,000 decisions", lambda: decided_beyond(settings, baseline + 2_000), 120)
    pending = baseline + len(profile.sku_names()) + len(retried) + profile.orders - started.decisions
    injected_at = time.monotonic()
    inject()
    sender.join(300)
    assert done and done[0].acknowledged == 20_000, done and done[0].errors
    for command in retried:  # the publisher timed out and sends them again, same ids
        publisher.send(command)
    assert publisher.flush(60) == 0
    publisher.close()
    report = quiet_verify(settings, timeout_s=300)
    assert report.command_repeats >= len(retried)
    return FaultRun(report, pending, time.monotonic() - injected_at)


def decided_beyond(settings: Settings, decisions: int) -> Report | None:
    report = verify(settings)
    return report if report.decisions > decisions else None


def kill_and_restart(stack: LocalStack, kind: str) -> None:
    worker = stack.worker(kind, 1)
    pid = worker.pid()
    assert pid is not None, f"{kind} worker is not running"
    os.kill(pid, signal.SIGKILL)
    wait_for(f"the killed {kind} to be gone", lambda: not worker.running(), timeout_s=10)
    stack.start_workers(kind, 1)


def test_a_processor_killed_mid_load_loses_and_doubles_nothing(
    settings: Settings, stack: LocalStack, unique: Callable[[str], str]
) -> None:
    run = load_with_fault(
        settings, stack, unique("KILLP") + "-", lambda: kill_and_restart(stack, "processor")
    )
    print(run.line("processor SIGKILL"))
    assert run.report.problems == []


def test_a_projection_killed_mid_batch_leaves_redis_equal_to_the_log(
    settings: Settings, stack: LocalStack, unique: Callable[[str], str]
) -> None:
    run = load_with_fault(
        settings, stack, unique("KILLR") + "-", lambda: kill_and_restart(stack, "projection")
    )
    print(run.line("projection SIGKILL"))
    assert run.report.problems == []


def test_a_broker_restart_mid_load_loses_and_doubles_nothing(
    settings: Settings, stack: LocalStack, docker_mode: bool, unique: Callable[[str], str]
) -> None:
    if docker_mode:
        pytest.skip("restarts the local stack's broker process; containers are not restarted here")

    def restart_broker() -> None:
        stack.kafka.stop()
        time.sleep(3)  # clients see the broker gone, not just a blip
        stack.start_kafka()

    run = load_with_fault(settings, stack, unique("BROKER") + "-", restart_broker)
    print(run.line("broker restart"))
    assert run.report.problems == []


def test_redis_losing_all_its_data_mid_load_is_noticed_and_rebuilt(
    settings: Settings, stack: LocalStack, unique: Callable[[str], str]
) -> None:
    client = redis.Redis.from_url(settings.redis_url)
    models = ReadModels(client)

    def lose_everything() -> None:
        # Redis must hold something to lose: on a fresh stack the projection may not have
        # written yet, and then there is nothing for it to notice.
        wait_for("watermarks of every partition", lambda: len(models.watermarks()) == settings.partitions)
        client.flushall()

    run = load_with_fault(settings, stack, unique("FLUSH") + "-", lose_everything)
    print(run.line("Redis FLUSHALL"))
    assert run.report.problems == []
    log = stack.worker("projection", 1).log_file.read_text()
    assert "Redis lost data" in log  # rebuilt because it noticed, not by chance


def test_redis_down_for_seconds_mid_load_is_waited_for_and_rebuilt(
    settings: Settings, stack: LocalStack, unique: Callable[[str], str]
) -> None:
    projection = stack.worker("projection", 1)

    def unreachable_said() -> int:
        return projection.log_file.read_text().count("is unreachable")

    def restart_redis() -> None:
        said = unreachable_said()
        stack.redis.stop()  # the local stack's Redis keeps nothing on disk: its data goes too
        try:
            time.sleep(3)  # longer than redis-py's own retries last
            # ... and until the worker has tried to write and waits: on a busy box the events
            # that make it write can come later than the 3 s (seen in CI: no write in them).
            wait_for("the projection to find Redis unreachable", lambda: unreachable_said() > said, 60)
        finally:
            stack.start_redis()

    run = load_with_fault(settings, stack, unique("REDIS") + "-", restart_redis)
    print(run.line("Redis down 3 s"))
    assert run.report.problems == []
    assert projection.running()  # it waited for Redis instead of exiting
    log = projection.log_file.read_text()
    assert "is unreachable" in log and "Redis lost data" in log


def test_an_order_placed_before_a_processor_crash_can_be_cancelled_after_it(
    settings: Settings, stack: LocalStack, unique: Callable[[str], str]
) -> None:
    # The processor's order lines live in its table's changelog, a record per batch: the
    # worker that takes over must find them to release an order's units.
    sku = unique("CRASH")
    publisher = Publisher(settings)
    publisher.publish(restock(sku, 10))
    placed = [place_order(sku, qty, order_id=unique(f"o{qty}")) for qty in (1, 2, 3)]
    publisher.send_many(placed)
    assert publisher.flush(30) == 0
    wait_for("the orders to be decided", lambda: len(events_for(settings, sku)) == 4, 60)

    kill_and_restart(stack, "processor")
    publisher.publish(cancel_order(sku, placed[1].order_id))
    publisher.publish(cancel_order(sku, placed[1].order_id))  # a second cancel is refused

    def cancels() -> list[Event] | None:
        decided = events_for(settings, sku)[4:]
        return decided if len(decided) == 2 else None

    events = wait_for("both cancels to be decided", cancels, 120)
    assert isinstance(events[0], OrderCancelled) and events[0].qty == 2 and events[0].available_after == 6
    assert isinstance(events[1], OrderRejected) and "already cancelled" in events[1].reason
    publisher.close()


def test_redis_losing_its_data_while_no_projection_runs_is_noticed_on_start(
    settings: Settings, stack: LocalStack, unique: Callable[[str], str]
) -> None:
    sku = unique("AWAY")
    publisher = Publisher(settings)
    publisher.publish(restock(sku, 5))
    publisher.publish(place_order(sku, 2))
    models = ReadModels(redis.Redis.from_url(settings.redis_url))
    wait_for("the order in Redis", lambda: (models.stock(sku) or {}).get("version") == 2, 60)
    worker = stack.worker("projection", 1)
    noticed_before = worker.log_file.read_text().count("the group had reached offset")

    assert worker.stop()
    redis.Redis.from_url(settings.redis_url).flushall()
    stack.start_workers("projection", 1)

    wait_for("Redis rebuilt from the log", lambda: (models.stock(sku) or {}).get("version") == 2, 120)
    assert worker.log_file.read_text().count("the group had reached offset") > noticed_before
    assert quiet_verify(settings).problems == []
    publisher.close()
