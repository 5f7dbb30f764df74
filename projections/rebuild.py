"""Rebuild the read models: fold the whole event log into an empty Redis database, then,
if asked, make it the live one.

The read models are a fold of the event log, so they can always be made again: for a new
projection, or for damage the watermarks cannot see. Readers keep the live database meanwhile.
The partitions are folded by worker processes (the fold is CPU-bound Python, one process per
core), each a ``ProjectionWorker`` taking the next partition, the longest first, as soon as it
has read the last one up to the end offset it had when the rebuild began. Taken, not dealt out
in advance: with hot SKUs a few partitions hold most of the events, and a worker dealt them
folded them alone while the others were done. Assigned, not balanced by a consumer group, so no
worker waits for a rebalance.

The switch swaps the two databases (``SWAPDB``, atomic for every client), and only while no
projection worker is in its group: a live worker writing across the swap could put a
partition's watermark in the new database past events it wrote to the old one. Workers
started after the switch go on from the rebuilt database's watermarks. ``SWAPDB`` needs a
single Redis server (a Redis Cluster has only database 0).
"""

from __future__ import annotations

import multiprocessing
import queue
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis
from confluent_kafka import KafkaException

from projections.worker import ProjectionWorker
from stockflow.errors import StockflowError
from stockflow.logreader import end_offsets
from stockflow.settings import Settings
from stockflow.topics import admin_client

# How often each worker process reports the offsets it has covered.
PROGRESS_EVERY_S = 0.25


class RebuildError(StockflowError):
    """The rebuild could not be done, or not switched to; the live read models are untouched."""


@dataclass(frozen=True)
class Rebuilt:
    database: int
    events: int  # events folded (every event, in an empty database)
    offsets: int  # event-log messages covered, all partitions
    workers: int
    elapsed_s: float

    @property
    def events_per_s(self) -> float:
        return self.events / self.elapsed_s if self.elapsed_s else 0.0


def database_url(redis_url: str, database: int) -> str:
    """``redis_url`` with its database number replaced (or added: ``redis://host:6379``)."""
    return urlsplit(redis_url)._replace(path=f"/{database}").geturl()


def live_database(redis_url: str) -> int:
    return int(redis.Redis.from_url(redis_url).connection_pool.connection_kwargs.get("db", 0))


def rebuild(
    settings: Settings,
    database: int,
    workers: int,
    on_progress: Callable[[int, int, int], None] | None = None,
) -> Rebuilt:
    """Empty ``database`` and fold the event log into it with ``workers`` processes.

    ``on_progress(offsets covered, offsets in all, events folded)`` runs as the workers report.
    """
    # First: with Kafka unreachable, nothing is emptied. Partitions without records are left out.
    ends = end_offsets(settings, settings.events_topic)
    target = _emptied(settings, database, workers)
    processes = min(workers, len(ends))  # a worker with no partition to take would only start up
    total = sum(ends.values())
    started = time.monotonic()
    events = _fold_in_processes(target, taking_order(ends), processes, total, on_progress)
    return Rebuilt(database, events, total, processes, time.monotonic() - started)


def taking_order(ends: dict[int, int]) -> list[tuple[int, int]]:
    """The (partition, end offset) pairs with records, in the order the workers take them:
    the most messages first, so that the last ones taken are short and the workers finish
    together. Only a guide (a hot SKU's partition has fuller frames, not more of them): a
    worker taking the next as soon as it has read the last evens out the rest.
    """
    return sorted(ends.items(), key=lambda pair: (-pair[1], pair[0]))


def refuse_unless_possible(settings: Settings, database: int, workers: int) -> None:
    """Raise RebuildError if a rebuild into ``database`` with ``workers`` cannot be done."""
    if database == live_database(settings.redis_url):
        raise RebuildError(
            f"database {database} holds the live read models (STOCKFLOW_REDIS_URL): rebuild into"
            " another one (--database)"
        )
    if workers < 1:
        raise RebuildError(f"--workers is {workers}: a rebuild needs at least one worker process")


def _emptied(settings: Settings, database: int, workers: int) -> Settings:
    """Settings that write to ``database``, emptied; refuses a rebuild that cannot be done."""
    refuse_unless_possible(settings, database, workers)
    target = settings.model_copy(update={"redis_url": database_url(settings.redis_url, database)})
    try:
        # Freed in Redis's background thread: emptied in place, an earlier rebuild's 1.9 million
        # keys held every client of the server, the live readers too, for 3.7 s.
        redis.Redis.from_url(target.redis_url).flushdb(asynchronous=True)
    except redis.RedisError as exc:
        raise RebuildError(
            f"cannot empty database {database} of Redis at {target.redis_url_without_password()}"
            f" ({exc}): is redis-server running there (STOCKFLOW_REDIS_URL), with at least"
            f" {database + 1} databases (`databases` in redis.conf, 16 by default)?"
        ) from exc
    return target


def _fold_in_processes(
    target: Settings,
    order: list[tuple[int, int]],
    workers: int,
    total: int,
    on_progress: Callable[[int, int, int], None] | None,
) -> int:
    """``workers`` processes taking the partitions in ``order``; the events they folded."""
    context = multiprocessing.get_context("spawn")  # no librdkafka threads copied by a fork
    reports: Any = context.Queue()
    partitions: Any = context.Queue()  # (partition, end offset), then None for each worker
    for item in [*order, *[None] * workers]:
        partitions.put(item)
    processes = [
        context.Process(
            target=_fold_partitions, args=(target, partitions, i, reports), name=f"rebuild-{i}", daemon=True
        )
        for i in range(workers)
    ]
    covered = [0] * workers
    events = [0] * workers
    try:
        for process in processes:
            process.start()
        finished: set[int] = set()
        while len(finished) < len(processes):
            try:
                kind, i, offsets, folded = reports.get(timeout=1.0)
            except queue.Empty:
                _check_alive(processes, finished)
                continue
            if kind == "failed":
                raise RebuildError(f"rebuild worker {i} failed: {offsets}")
            covered[i], events[i] = offsets, folded
            if kind == "done":
                finished.add(i)
            if on_progress is not None:
                on_progress(sum(covered), total, sum(events))
    finally:
        for process in processes:
            if process.pid is None:
                continue  # never started: starting an earlier one failed
            if process.is_alive():
                process.terminate()  # by its pid; only when the rebuild failed or was interrupted
            process.join(10)
    return sum(events)


def _check_alive(processes: list[Any], finished: set[int]) -> None:
    for i, process in enumerate(processes):
        if i not in finished and not process.is_alive():
            raise RebuildError(
                f"rebuild worker {i} (pid {process.pid}) ended with exit code {process.exitcode}"
                " before it was done; its log lines are above"
            )


def _fold_partitions(settings: Settings, partitions: Any, index: int, reports: Any) -> None:
    """A worker process: fold the partitions it takes from ``partitions`` into the target
    database, reporting progress."""
    try:
        worker = ProjectionWorker(settings, rebuilding=True)
        reported = 0.0
        covered = 0

        def progress(offsets: int) -> None:
            nonlocal reported, covered
            covered = offsets
            if time.monotonic() - reported >= PROGRESS_EVERY_S:
                reports.put(("progress", index, covered, worker.events_applied))
                reported = time.monotonic()

        worker.fold(partitions.get, progress)
        reports.put(("done", index, covered, worker.events_applied))
    except BaseException:
        reports.put(("failed", index, traceback.format_exc(limit=5), 0))
        raise
    finally:
        reports.close()
        reports.join_thread()  # the parent gets the last report before this process ends


def projection_members(settings: Settings, timeout_s: float = 10.0) -> list[str]:
    """Client ids of the projection workers in their group now."""
    admin = admin_client(settings)  # kept until the result is in: a freed one never completes it
    future = admin.describe_consumer_groups([settings.projection_group], request_timeout=timeout_s)
    try:
        description = future[settings.projection_group].result()
    except KafkaException as exc:
        raise RebuildError(f"cannot describe group {settings.projection_group}: {exc}") from exc
    return sorted(member.client_id for member in description.members)


def ensure_no_projection_workers(settings: Settings) -> None:
    members = projection_members(settings)
    if members:
        raise RebuildError(
            f"{len(members)} projection worker(s) in group {settings.projection_group}"
            f" ({', '.join(members)}): a worker writing across the switch could leave the new read"
            " models a gap. Stop them, switch, then start them again; they go on from the"
            " rebuilt read models"
        )


def switch(settings: Settings, database: int) -> None:
    """Make ``database`` the live read models, and the live ones ``database``, atomically."""
    ensure_no_projection_workers(settings)
    redis.Redis.from_url(settings.redis_url).swapdb(live_database(settings.redis_url), database)
