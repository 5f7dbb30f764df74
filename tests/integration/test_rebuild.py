"""`stockflow rebuild`: the whole log folded into an empty database by worker processes, checked,
and switched to only while no projection worker could write across the switch."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
import redis

from producers.commands import cancel_order, place_order, restock
from producers.publisher import Publisher
from projections.queries import ReadModels
from projections.rebuild import RebuildError, database_url, rebuild, switch
from stockflow.logreader import end_offsets
from stockflow.settings import Settings
from stockflow.stack import LocalStack
from stockflow.verify import verify_read_models
from tests.pipeline import sku_on_every_partition, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("stack")]

DATABASE = 13  # the live read models are in database 0; test_read_models scribbles on 15


@pytest.fixture
def rebuilt_db(settings: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(database_url(settings.redis_url, DATABASE))
    yield client
    client.flushdb()


def lazily_freed(client: redis.Redis) -> int:
    """Keys the Redis server has freed in its background thread since it started."""
    return int(cast(dict[str, Any], client.info("memory"))["lazyfreed_objects"])


def publish_history(settings: Settings, sku: str) -> int:
    """Restock, orders (one refused), a cancel; returns the SKU's version once all are visible."""
    publisher = Publisher(settings)
    kept = place_order(sku, 2)
    for command in (
        restock(sku, 5),
        kept,
        place_order(sku, 3),
        place_order(sku, 9),
        cancel_order(sku, kept.order_id),
    ):
        publisher.publish(command)
    publisher.close()
    models = ReadModels(redis.Redis.from_url(settings.redis_url))
    wait_for(f"{sku} in the live read models", lambda: (models.stock(sku) or {}).get("version") == 5, 60)
    return 5


def publish_on_every_partition(settings: Settings, prefix: str) -> None:
    """A restock on a SKU of each partition, so that a partition left out of a rebuild shows."""
    publisher = Publisher(settings)
    for sku in sku_on_every_partition(settings, prefix):
        publisher.publish(restock(sku, 1))
    publisher.close()


def read_model_of(client: redis.Redis, sku: str) -> dict[str, Any]:
    """The SKU's stock hash, recent orders and top-seller score, and its orders' documents."""
    recent = [order.decode() for order in cast(list[bytes], client.lrange(f"sf:recent:{{{sku}}}", 0, -1))]
    return {
        "stock": client.hgetall(f"sf:stock:{{{sku}}}"),
        "recent": recent,
        "top": client.zscore("sf:top", sku),
        "orders": [client.hgetall(f"sf:order:{{{order}}}") for order in recent],
    }


def test_a_rebuild_folds_the_whole_log_into_an_empty_database_equal_to_the_live_one(
    settings: Settings, rebuilt_db: redis.Redis, redis_client: redis.Redis, unique: Callable[[str], str]
) -> None:
    sku = unique("REBUILD")
    publish_history(settings, sku)
    publish_on_every_partition(settings, unique("REBUILD-SPREAD"))
    rebuilt_db.set("left-over", "from an earlier rebuild")
    freed_before = lazily_freed(redis_client)
    progress: list[tuple[int, int, int]] = []
    ends = end_offsets(settings, settings.events_topic)

    result = rebuild(settings, DATABASE, workers=2, on_progress=lambda *p: progress.append(p))

    assert result.workers == 2 and result.events >= 5
    assert rebuilt_db.get("left-over") is None  # the database was emptied first
    # ... by Redis's background thread, so emptying millions of keys holds no client up.
    wait_for("the emptied keys freed in the background", lambda: lazily_freed(redis_client) > freed_before)
    assert progress and progress[-1][0] == progress[-1][1] == result.offsets
    marks = ReadModels(rebuilt_db).watermarks()
    assert all(marks.get(p, -1) >= end - 1 for p, end in ends.items())  # every partition, to its end
    rebuilt = read_model_of(rebuilt_db, sku)
    assert rebuilt == read_model_of(redis_client, sku)
    stock = ReadModels(rebuilt_db).stock(sku)
    assert stock is not None and (stock["available"], stock["version"]) == (2, 5)
    assert len(rebuilt["recent"]) == 2
    # The rebuilt database against a fold of the log, every SKU of the session.
    report = verify_read_models(
        settings.model_copy(update={"redis_url": database_url(settings.redis_url, DATABASE)})
    )
    assert report.skus >= 1 and report.read_model_mismatches == []
    assert not rebuilt_db.exists("sf:latency_ms")  # replayed events were not made visible just now


@pytest.mark.parametrize(
    ("database", "workers", "reason"),
    [
        (0, 1, "holds the live read models"),
        (16, 1, "at least 17 databases"),
        (DATABASE, 0, "at least one worker"),
    ],
)
def test_a_rebuild_that_cannot_be_done_says_why_before_touching_anything(
    settings: Settings, database: int, workers: int, reason: str
) -> None:
    with pytest.raises(RebuildError, match=reason):
        rebuild(settings, database, workers)


def test_a_switch_is_refused_while_a_projection_worker_runs(
    settings: Settings, redis_client: redis.Redis, unique: Callable[[str], str]
) -> None:
    marker = unique("still-live")
    redis_client.set(marker, "1")
    with pytest.raises(RebuildError, match="projection worker"):
        switch(settings, DATABASE)
    assert redis_client.get(marker) == b"1"  # nothing was swapped
    redis_client.delete(marker)


def test_after_a_switch_a_new_projection_worker_goes_on_from_the_rebuilt_read_models(
    settings: Settings,
    stack: LocalStack,
    rebuilt_db: redis.Redis,
    redis_client: redis.Redis,
    unique: Callable[[str], str],
) -> None:
    sku = unique("SWITCH")
    publish_history(settings, sku)
    worker = stack.worker("projection", 1)
    replays_before = worker.log_file.read_text().count("replaying it from the start")
    assert worker.stop()
    try:
        rebuild(settings, DATABASE, workers=2)
        redis_client.set("only-in-the-old-read-models", "1")
        switch(settings, DATABASE)
        assert rebuilt_db.get("only-in-the-old-read-models") == b"1"  # the old ones moved over
        # Decided while no projection runs: only the worker started below can show it.
        publisher = Publisher(settings)
        publisher.publish(restock(sku, 10))
        publisher.close()
    finally:
        stack.start_workers("projection", 1)
    models = ReadModels(redis_client)
    wait_for("the restock after the switch", lambda: (models.stock(sku) or {}).get("version") == 6, 60)
    assert models.stock(sku)["available"] == 12  # type: ignore[index]
    assert worker.log_file.read_text().count("replaying it from the start") == replays_before
    report = verify_read_models(settings)
    assert report.read_model_mismatches == []
