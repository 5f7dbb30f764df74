"""A projection worker, in this process, on a topic, group and Redis database of its own."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import pytest
import redis
from confluent_kafka import Consumer, Producer, TopicPartition
from prometheus_client import REGISTRY

from producers.commands import place_order, restock
from projections.queries import ReadModels
from projections.rebuild import database_url
from projections.store import ReadModelStore, order_key
from projections.views import plan_writes
from projections.worker import ProjectionWorker
from schemas.codec import codec
from schemas.records import Event
from stockflow.settings import Settings
from stockflow.stack import LocalStack
from stockflow.topics import ensure_topics
from tests.conftest import free_port
from tests.history import decided
from tests.pipeline import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("stack")]

DATABASE = 11  # the live read models are in database 0


@pytest.fixture
def own(settings: Settings, unique: Callable[[str], str]) -> Iterator[Settings]:
    """The stack, with a fresh events topic, projection group and Redis database."""
    mine = settings.model_copy(
        update={
            "events_topic": unique("events"),
            "projection_group": unique("projection"),
            "redis_url": database_url(settings.redis_url, DATABASE),
        }
    )
    ensure_topics(mine)
    yield mine
    redis.Redis.from_url(mine.redis_url).flushdb()


@pytest.fixture
def own_redis(own: Settings, docker_mode: bool, tmp_path: Path) -> Iterator[tuple[Settings, LocalStack]]:
    """``own`` with a redis-server of the test's own, to stop or reconfigure without touching
    the stack's; stopped at the end."""
    if docker_mode:
        pytest.skip("needs a redis-server of its own, which only the local stack has")
    port = free_port()
    mine = own.model_copy(
        update={"redis_port": port, "redis_url": f"redis://127.0.0.1:{port}/0", "run_dir": tmp_path}
    )
    side = LocalStack(mine, say=lambda _msg: None)
    side.start_redis()
    try:
        yield mine, side
    finally:
        side.redis.stop()


def append_events(settings: Settings, events: list[Event], partition: int) -> None:
    """Append ``events`` to the events topic as one frame, as the processor does."""
    producer = Producer({"bootstrap.servers": settings.bootstrap_servers})
    producer.produce(settings.events_topic, codec.encode_batch(events), partition=partition)
    assert producer.flush(30) == 0
    producer.close()  # not left to reconnect to the session's broker after it stops


class Running:
    """A worker's run() in a thread, stopped and joined on leaving."""

    def __init__(self, settings: Settings) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=ProjectionWorker(settings).run, args=(self._stop.is_set,))

    def __enter__(self) -> Running:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive()


def test_a_loss_on_a_partition_without_new_events_is_noticed_by_a_worker_just_assigned_it(
    own: Settings, unique: Callable[[str], str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="projections.worker")
    sku = unique("SKU")
    events = decided(sku, restock(sku, 5), place_order(sku, 2))
    append_events(own, events, own.partitions - 1)
    client = redis.Redis.from_url(own.redis_url)
    models = ReadModels(client)

    def shown() -> bool:
        return (models.stock(sku) or {}).get("version") == len(events)

    with Running(own):
        wait_for(f"{sku} in the read models", shown)
    caplog.clear()
    with Running(own):
        # The new worker resumes after the watermarks; no event comes, and then Redis loses
        # everything. Only what it read at the assignment tells it the partition was applied.
        wait_for("the partitions to be assigned", lambda: "assigned partitions" in caplog.text)
        client.flushdb()
        wait_for(f"{sku} rebuilt after the loss", shown, 30)
    assert f"Redis lost data of events partition {own.partitions - 1}" in caplog.text


def test_a_worker_given_partitions_commits_where_redis_stands_even_if_no_event_comes(
    own: Settings, unique: Callable[[str], str]
) -> None:
    # Redis holds a partition's events, and the group never committed them: as after a commit
    # lost while the broker was away. No event comes after the worker is given the partition.
    sku = unique("SKU")
    partition = own.partitions - 1
    events = decided(sku, restock(sku, 5), place_order(sku, 2))
    append_events(own, events, partition)
    ReadModelStore(redis.Redis.from_url(own.redis_url)).apply(
        plan_writes([(partition, 0, e) for e in events])
    )
    group = Consumer({"bootstrap.servers": own.bootstrap_servers, "group.id": own.projection_group})
    tp = TopicPartition(own.events_topic, partition)

    def committed() -> int:
        return int(group.committed([tp], timeout=10)[0].offset)

    try:
        assert committed() < 0  # nothing committed yet
        with Running(own):
            wait_for("the group to commit past the events Redis holds", lambda: committed() == 1, 30)
    finally:
        group.close()


def test_a_worker_given_an_order_retention_lets_the_orders_expire(
    own: Settings, unique: Callable[[str], str]
) -> None:
    sku = unique("SKU")
    order = place_order(sku, 2)
    events = decided(sku, restock(sku, 5), order, now_ms=int(time.time() * 1000))
    append_events(own, events, 0)
    client = redis.Redis.from_url(own.redis_url)
    with Running(own.model_copy(update={"order_retention_s": 600})):
        wait_for(
            f"order {order.order_id} in the read models", lambda: ReadModels(client).order(order.order_id)
        )
    assert 0 < int(cast(int, client.pttl(order_key(order.order_id)))) <= 600_000


def test_a_worker_with_nothing_to_write_says_when_redis_goes_and_when_it_comes_back(
    own_redis: tuple[Settings, LocalStack], unique: Callable[[str], str], caplog: pytest.LogCaptureFixture
) -> None:
    mine, side = own_redis
    caplog.set_level(logging.INFO, logger="projections.worker")
    sku = unique("SKU")
    events = decided(sku, restock(sku, 5), place_order(sku, 2))
    append_events(mine, events, 0)
    models = ReadModels(redis.Redis.from_url(mine.redis_url))

    def shown() -> bool:
        return (models.stock(sku) or {}).get("version") == len(events)

    def unreachable() -> float | None:
        return REGISTRY.get_sample_value("stockflow_redis_unreachable")

    with Running(mine):
        wait_for(f"{sku} in the read models", shown)
        assert unreachable() == 0
        side.redis.stop()  # no event comes: the worker's only calls are its watermark checks
        wait_for("the worker to say Redis is unreachable", lambda: "is unreachable" in caplog.text, 30)
        assert unreachable() == 1
        assert f"Redis at {mine.redis_url} is unreachable" in caplog.text
        time.sleep(2)  # a few more polls, each checking the watermarks
        assert caplog.text.count("is unreachable") == 1  # said once, not at every poll
        side.start_redis()  # empty: the worker replays the partition
        wait_for(f"{sku} rebuilt in the read models", shown, 60)
        assert "answers again" in caplog.text
        assert unreachable() == 0


def test_a_full_redis_is_waited_for_and_said_so_and_nothing_is_skipped(
    own_redis: tuple[Settings, LocalStack], unique: Callable[[str], str], caplog: pytest.LogCaptureFixture
) -> None:
    """Redis at its maxmemory refuses writes (OOM): the worker used to stop with the error."""
    mine, _side = own_redis
    caplog.set_level(logging.INFO, logger="projections.worker")
    sku = unique("SKU")
    events = decided(sku, restock(sku, 50), *(place_order(sku, 1) for _ in range(20)))
    client = redis.Redis.from_url(mine.redis_url)
    models = ReadModels(client)

    def shown(version: int) -> Callable[[], bool]:
        return lambda: (models.stock(sku) or {}).get("version") == version

    with Running(mine):
        append_events(mine, events[:1], 0)
        wait_for(f"{sku} in the read models", shown(1))
        client.config_set("maxmemory", 1)  # any write is over it
        append_events(mine, events[1:], 0)
        wait_for("the worker to say Redis is full", lambda: "is full" in caplog.text, 30)
        assert "STOCKFLOW_ORDER_RETENTION_S" in caplog.text
        assert REGISTRY.get_sample_value("stockflow_redis_unreachable") == 1
        assert shown(1)()  # nothing written, nothing skipped
        client.config_set("maxmemory", 0)
        wait_for("every event once Redis takes writes", shown(len(events)), 60)
        assert "answers again" in caplog.text
        assert REGISTRY.get_sample_value("stockflow_redis_unreachable") == 0
        assert (models.stock(sku) or {}).get("processed") == 20
