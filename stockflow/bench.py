"""`stockflow bench`: the pipeline against raw Kafka and a CRUD database, one box, one run.

First, unmeasured, the same number of orders through the whole pipeline, to warm the broker up.
Then per workload (uniform SKUs, and hot SKUs: 80% of orders on 10 of them), on a private stack
from which the topics and read models of the warm-up and of the workloads before are deleted:
1. raw Kafka: confluent-kafka produce (acks=all) and consume of command-sized messages;
2. ingest: commands published and acknowledged (acks=all) with the workers stopped;
3. backlog: the workers start and decide that backlog; its drain rate;
4. end to end: the same number of commands again, published at full speed with the workers
   running, until every decision is visible in Redis; lag is sampled throughout, and the CPU
   time each part of the pipeline spends per command is taken from /proc;
5. latency: the load offered at fractions of the end-to-end rate, and the projection's
   command-created -> visible-in-Redis histogram;
6. replay: `stockflow rebuild` folds the whole event log into an empty Redis database, one
   worker process per core;
7. CRUD: the same orders as PostgreSQL transactions, with pgbench and from Python.
Before and after it all, the pipeline's pure Python per command, timed alone: how fast the box
was around the run (``reference_cpu_us``).
Writes results.json, REPORT.md and PNG plots.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import random
import socket
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import NewTopic  # type: ignore[attr-defined]

from processors.domain import Stock, decide
from producers.commands import place_order, restock
from producers.load import ACK_WAIT_S, LoadProfile, run_load
from producers.publisher import Publisher, producer_config
from projections.queries import ReadModels
from projections.rebuild import rebuild
from projections.store import DECIDED_LATENCY_KEY, LATENCY_KEY
from projections.views import percentile
from schemas.codec import codec
from stockflow import metrics
from stockflow.crud import DURABILITY as CRUD_DURABILITY
from stockflow.crud import Postgres, Workload
from stockflow.errors import StackError
from stockflow.settings import Settings
from stockflow.stack import LocalStack
from stockflow.topics import admin_client, ensure_topics

Say = Callable[[str], None]

PIPELINE_DURABILITY = (
    "acks=all on every produce (commands, events, state changelog) to one broker that, like"
    " Kafka's default, leaves fsync to the OS: an acknowledged command survives a process crash,"
    " not a power loss; a multi-broker cluster with min.insync.replicas=2 survives a machine"
)


@dataclass(frozen=True)
class BenchOptions:
    out_dir: Path
    json_path: Path
    orders: int = 100_000  # per phase: raw, ingest, end to end
    latency_fractions: tuple[float, ...] = (0.25, 0.5, 0.75)
    latency_duration_s: float = 10.0
    crud_clients: int = 4
    crud_duration_s: int = 15
    workloads: tuple[str, ...] = ("uniform", "hot")
    processors: int = 1
    projections: int = 1
    replay_workers: int = os.cpu_count() or 1  # processes folding the log in the replay


WORKLOADS = {"uniform": Workload(1000, 0, 0.8), "hot": Workload(1000, 10, 0.8)}
REPLAY_REDIS_DB = 9  # workloads use databases 1, 2, ...; the replay folds into an empty one


@dataclass
class LagSample:
    t: float  # seconds since the phase started
    published: int  # commands sent in this phase and the ones before
    decided: int  # commands decided (the processors' counter)
    visible: int  # events applied to Redis


class Counts:
    """Where a workload's pipeline stands: commands published, events decided, events visible."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.models = ReadModels(redis.Redis.from_url(settings.redis_url))
        self.published = 0  # kept up to date by whoever publishes

    def visible(self) -> int:
        """Events the projection workers have applied to Redis (their metrics counter)."""
        return int(metrics.counter_total(self.settings, "stockflow_events_projected", "projection"))

    def sample(self, t: float) -> LagSample:
        # Counted in commands and events: with batch frames, message counts say little.
        decided = int(metrics.counter_total(self.settings, "stockflow_commands_decided", "processor"))
        return LagSample(t, self.published, decided, self.visible())


class Sampler:
    """Samples lag every ``interval_s`` in a thread, from start() until stop()."""

    def __init__(self, counts: Counts, interval_s: float = 0.5) -> None:
        self.counts = counts
        self.interval_s = interval_s
        self.samples: list[LagSample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started = 0.0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.counts.sample(time.monotonic() - self._started))
            self._stop.wait(self.interval_s)

    def start(self) -> Sampler:
        self._started = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> list[LagSample]:
        self._stop.set()
        self._thread.join()
        return self.samples


def wait_visible(counts: Counts, events: int, what: str, say: Say, timeout_s: float = 600) -> float:
    """Wait until ``events`` events are visible in Redis; returns the monotonic time it happened."""
    deadline = time.monotonic() + timeout_s
    last_said = 0.0
    while True:
        now = time.monotonic()
        visible = counts.visible()
        if visible >= events:
            return now
        if now > deadline:
            raise StackError(
                f"{what}: only {visible:,} of {events:,} events visible in Redis after"
                f" {timeout_s:.0f}s; see the worker logs under {counts.settings.run_dir / 'logs'}"
            )
        if now - last_said > 5:
            say(f"  {what}: {visible:,}/{events:,} events visible")
            last_said = now
        time.sleep(0.05)


def drain_rate(counts: Counts, backlog: int, started: float, say: Say) -> float:
    """Commands/s at which the workers drain ``backlog``: from the first event visible in Redis
    to the last, so that the workers' start-up is left out. A backlog drained before its first
    event was seen (a tiny one) is timed from ``started``, when the workers were started."""
    while (first := counts.visible()) == 0:
        if time.monotonic() - started > 600:
            raise StackError(
                "backlog: no event visible in Redis 600s after the workers started;"
                f" see the worker logs under {counts.settings.run_dir / 'logs'}"
            )
        time.sleep(0.01)
    first_at = time.monotonic()
    done_at = wait_visible(counts, backlog, "backlog", say)
    if first >= backlog:
        return backlog / (done_at - started)
    return (backlog - first) / (done_at - first_at)


def workload_prefix(run: str, name: str) -> str:
    """What the names of a workload's topics and consumer groups start with."""
    return f"bench-{run}.{name}."


def workload_settings(base: Settings, run: str, name: str, redis_db: int) -> Settings:
    prefix = workload_prefix(run, name).rstrip(".")
    redis_url = f"redis://127.0.0.1:{base.redis_port}/{redis_db}"
    return base.model_copy(
        update={
            "commands_topic": f"{prefix}.commands",
            "events_topic": f"{prefix}.events",
            "dlq_topic": f"{prefix}.commands.dlq",
            "events_dlq_topic": f"{prefix}.events.dlq",
            "processor_group": f"{prefix}.processor",
            "projection_group": f"{prefix}.projection",
            "redis_url": redis_url,
        }
    )


def clear_away(settings: Settings, prefix: str) -> None:
    """Delete the topics whose names start with ``prefix`` and empty the workload's Redis
    database, so that the next workload finds the broker and Redis as this one did.

    Left in place, the warm-up's and the first workload's topics doubled the broker's CPU per
    command in the second workload (16-20 us in the first, 37-42 in the second, whichever ran
    second; 16.5 for the second once they were deleted: docs/benchmarks.md). The likely part is
    the log cleaner compacting their processor changelogs; not measured thread by thread.
    """
    admin = admin_client(settings)
    names = [name for name in admin.list_topics(timeout=30).topics if name.startswith(prefix)]
    for future in admin.delete_topics(names, operation_timeout=30).values() if names else []:
        future.result()
    deadline = time.monotonic() + 30
    while any(name.startswith(prefix) for name in admin.list_topics(timeout=30).topics):
        if time.monotonic() > deadline:
            raise StackError(f"topics {prefix}* still listed 30 s after their deletion")
        time.sleep(0.2)
    redis.Redis.from_url(settings.redis_url).flushdb(asynchronous=True)


def raw_kafka(settings: Settings, workload: Workload, count: int, say: Say) -> dict[str, float]:
    """confluent-kafka alone: produce (acks=all, as the publisher) and consume ``count`` messages."""
    topic = f"{settings.commands_topic}.raw"
    admin = admin_client(settings)
    admin.create_topics([NewTopic(topic, settings.partitions, settings.replication_factor)])[topic].result()
    time.sleep(1)  # leaders
    size = len(codec.encode(place_order("SKU-00000", 1)))
    rng = random.Random(1)
    keys = [f"SKU-{workload.pick_sku(rng):05d}".encode() for _ in range(10_000)]
    value = os.urandom(size)
    producer = Producer(producer_config(settings))  # exactly as the publisher produces
    started = time.monotonic()
    for i in range(count):
        while True:
            try:
                producer.produce(topic, key=keys[i % len(keys)], value=value)
                break
            except BufferError:
                producer.poll(0.05)
        if i % 1000 == 0:
            producer.poll(0)
    producer.flush(60)
    produced = count / (time.monotonic() - started)
    consumer = Consumer(
        settings.kafka_config()
        | {
            "group.id": f"bench-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
        }
    )
    consumer.assign([TopicPartition(topic, p, 0) for p in range(settings.partitions)])
    started = time.monotonic()
    seen = 0
    while seen < count:
        seen += sum(1 for m in consumer.consume(10_000, 1.0) if m.error() is None)
        if time.monotonic() - started > 120:
            raise StackError(f"raw consume stalled at {seen:,} of {count:,} messages")
    consumed = count / (time.monotonic() - started)
    consumer.close()
    say(f"  raw Kafka: produce {produced:,.0f} msg/s, consume {consumed:,.0f} msg/s ({size} B each)")
    return {"produce_msgs_per_s": produced, "consume_msgs_per_s": consumed, "message_bytes": size}


def restock_every_sku(publisher: Publisher, workload: Workload) -> None:
    """Plenty of stock on every SKU, so that every order is processed, as in the CRUD baseline."""
    for sku in LoadProfile(orders=0, skus=workload.skus).sku_names():
        publisher.send(restock(sku, 1_000_000_000))


def publish_orders(
    publisher: Publisher,
    workload: Workload,
    orders: int,
    rate: float,
    seed: int,
    on_progress: Callable[[int], None] | None = None,
) -> float:
    """Publish orders (acks=all); returns the acknowledged commands per second.

    The publisher is reused across phases: a new one spends its first half second getting an
    idempotent producer id, which would show up as latency.
    """
    profile = LoadProfile(
        orders=orders,
        rate=rate,
        skus=workload.skus,
        hot_skus=workload.hot_skus,
        hot_share=workload.hot_share,
        seed=seed,
    )
    report = run_load(publisher, profile, on_progress)
    if report.failed:
        raise StackError(f"{report.failed} commands were not acknowledged: {report.errors[:3]}")
    if report.unanswered:
        raise StackError(
            f"{report.unanswered} commands got no answer from Kafka within {ACK_WAIT_S:.0f}s:"
            " the bench's broker stopped answering; see kafka-server.log under its run directory"
        )
    return report.rate


def replay(settings: Settings, expected: int, workers: int, say: Say) -> float:
    """Events per second folded from the event log into an empty Redis database by
    ``stockflow rebuild``'s worker processes, taking the partitions one after another."""
    rebuilt = rebuild(settings, REPLAY_REDIS_DB, workers)
    if rebuilt.events < expected:
        raise StackError(f"replay: {rebuilt.events:,} of {expected:,} events folded")
    say(
        f"  replay: {rebuilt.events:,} events in {rebuilt.elapsed_s:.1f}s by {rebuilt.workers} workers"
        f" = {rebuilt.events_per_s:,.0f} events/s"
    )
    return rebuilt.events_per_s


def latency_run(
    publisher: Publisher,
    workload: Workload,
    stack: LocalStack,
    counts: Counts,
    orders: int,
    rate: float,
    total: int,
    say: Say,
) -> dict[str, Any]:
    """Offer ``orders`` at ``rate``; percentiles of command created -> visible in Redis, and of
    command created -> decided (what of it the publisher and the processor take); and what the
    rate cost: each part's CPU per command, and the cores the parts kept busy together. Paced,
    commands travel in smaller frames and requests than flat out, so each costs more; the cores
    busy tell a box that has run out of them from a queue in the pipeline."""
    redis.Redis.from_url(counts.settings.redis_url).delete(LATENCY_KEY, DECIDED_LATENCY_KEY)
    cpu_before = cpu_by_part(stack)
    started = time.monotonic()
    publish_orders(publisher, workload, orders, rate, seed=3)
    visible_at = wait_visible(counts, total, f"latency at {rate:,.0f}/s", say)
    per_command = cpu_per_command(stack, cpu_before, orders)
    histogram = counts.models.latency_histogram()
    decided = counts.models.latency_histogram(until="decided")
    cores_busy = sum(per_command.values()) * orders / 1e6 / (visible_at - started)
    point: dict[str, Any] = {
        "offered_per_s": rate,
        "p50": percentile(histogram, 0.5),
        "p99": percentile(histogram, 0.99),
        "p999": percentile(histogram, 0.999),
        "decided_p50": percentile(decided, 0.5),
        "decided_p99": percentile(decided, 0.99),
        "cpu_us_per_command": per_command,
        "cores_busy": cores_busy,
    }
    say(
        f"  latency at {rate:,.0f}/s: p50 {point['p50']} ms, p99 {point['p99']} ms, p99.9 {point['p999']} ms"
        f" (decided: p50 {point['decided_p50']} ms, p99 {point['decided_p99']} ms);"
        f" CPU {sum(per_command.values()):.1f} us per command, {cores_busy:.2f} cores busy"
    )
    return point


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far, from Linux's /proc/<pid>/stat."""
    # utime and stime are the 12th and 13th fields after the ")" that ends the command name.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_by_part(stack: LocalStack) -> dict[str, float]:
    """CPU seconds used so far by each part of the pipeline: the workers of each kind, the
    broker, Redis, and this process, which publishes the load."""
    used = {"publisher": time.process_time()}
    for process in [*stack.worker_processes(), stack.kafka, stack.redis]:
        pid = process.pid()
        if pid is not None:
            part = "broker" if process.name == "kafka" else process.name.split("-")[0]
            used[part] = used.get(part, 0.0) + cpu_seconds(pid)
    return used


def cpu_per_command(stack: LocalStack, before: dict[str, float], commands: int) -> dict[str, float]:
    """Each part's CPU time (us) per command since the ``cpu_by_part`` reading ``before``."""
    return {
        part: (seconds - before.get(part, 0.0)) / commands * 1e6
        for part, seconds in cpu_by_part(stack).items()
    }


def end_to_end(
    publisher: Publisher,
    workload: Workload,
    stack: LocalStack,
    counts: Counts,
    orders: int,
    backlog: int,
    say: Say,
) -> tuple[float, dict[str, float], list[dict[str, Any]]]:
    """Publish ``orders`` at full speed onto a drained pipeline; commands/s until all are visible,
    the CPU time each part spent per command (us), and the lag samples taken meanwhile."""
    counts.published = backlog
    sampler = Sampler(counts).start()
    cpu_before = cpu_by_part(stack)
    started = time.monotonic()

    def published(sent: int) -> None:
        counts.published = backlog + sent

    publish_orders(publisher, workload, orders, 0, seed=2, on_progress=published)
    visible_at = wait_visible(counts, backlog + orders, "end to end", say)
    rate = orders / (visible_at - started)
    cpu = cpu_per_command(stack, cpu_before, orders)
    say(f"  end to end: {rate:,.0f} commands/s decided and visible in Redis")
    say("  CPU per command, us: " + ", ".join(f"{part} {us:.1f}" for part, us in cpu.items()))
    return rate, cpu, [dataclasses.asdict(s) for s in sampler.stop()]


def bench_pipeline(options: BenchOptions, name: str, settings: Settings, say: Say) -> dict[str, Any]:
    workload = WORKLOADS[name]
    result: dict[str, Any] = {"workload": {"skus": workload.skus, "hot_skus": workload.hot_skus}}
    ensure_topics(settings)
    redis.Redis.from_url(settings.redis_url).flushdb()
    counts = Counts(settings)
    workers = LocalStack(settings, say=lambda _m: None)
    try:
        raw = raw_kafka(settings, workload, options.orders, say)
        result["raw_kafka"] = raw
        result["raw_kafka_msgs_per_s"] = min(raw["produce_msgs_per_s"], raw["consume_msgs_per_s"])

        # Backpressure off: these phases measure how fast commands can go in, backlog or not.
        publisher = Publisher(settings.model_copy(update={"backpressure_high_water": 0}))
        restock_every_sku(publisher, workload)
        publisher.flush(60)
        result["ingest_commands_per_s"] = publish_orders(publisher, workload, options.orders, 0, seed=1)
        say(f"  ingest (workers stopped): {result['ingest_commands_per_s']:,.0f} commands/s acknowledged")

        started = time.monotonic()
        workers.start_workers("processor", options.processors)
        workers.start_workers("projection", options.projections)
        backlog = workload.skus + options.orders
        drain = drain_rate(counts, backlog, started, say)
        result["backlog_commands_per_s"] = drain
        say(f"  backlog of {backlog:,} drained at {drain:,.0f} commands/s (from the first visible event)")

        result["e2e_commands_per_s"], result["e2e_cpu_us_per_command"], result["e2e_lag"] = end_to_end(
            publisher, workload, workers, counts, options.orders, backlog, say
        )

        total = backlog + options.orders
        latency = []
        for fraction in options.latency_fractions:
            rate = fraction * result["e2e_commands_per_s"]
            orders = max(int(rate * options.latency_duration_s), 1)
            total += orders
            latency.append(latency_run(publisher, workload, workers, counts, orders, rate, total, say))
            latency[-1]["fraction"] = fraction
        result["latency"] = latency
        half = min(latency, key=lambda p: abs(p["fraction"] - 0.5))
        result["latency_ms_at_half_load"] = {k: half[k] for k in ("p50", "p99", "p999")}
    finally:
        for process in workers.worker_processes():
            process.stop()
    result["replay_events_per_s"] = replay(settings, total, options.replay_workers, say)
    return result


def warm_up(options: BenchOptions, settings: Settings, say: Say) -> None:
    """Send ``options.orders`` uniform orders through the whole pipeline, unmeasured, on topics
    of their own. A fresh broker compiles its hot paths as they get used: over four runs of
    100,000 orders it took 2.6, 1.3, 1.0 and 1.0 s of CPU, and the first workload paid for it."""
    ensure_topics(settings)
    workers = LocalStack(settings, say=lambda _m: None)
    publisher = Publisher(settings.model_copy(update={"backpressure_high_water": 0}))
    try:
        workers.start_workers("processor", options.processors)
        workers.start_workers("projection", options.projections)
        workload = WORKLOADS["uniform"]
        restock_every_sku(publisher, workload)
        publish_orders(publisher, workload, options.orders, 0, seed=4)
        wait_visible(Counts(settings), workload.skus + options.orders, "warm-up (not measured)", say)
    finally:
        publisher.close()
        for process in workers.worker_processes():
            process.stop()


def bench_crud(options: BenchOptions, say: Say) -> dict[str, dict[str, float]]:
    postgres = Postgres(port=_free_port())
    say("PostgreSQL: starting a private cluster")
    results: dict[str, dict[str, float]] = {}
    try:
        postgres.start()
        for name in options.workloads:
            workload = WORKLOADS[name]
            postgres.load(workload.skus, 1_000_000_000)
            tps = postgres.pgbench(workload, options.crud_clients, options.crud_duration_s)
            say(f"  {name}: pgbench {tps:,.0f} orders/s ({options.crud_clients} clients)")
            postgres.load(workload.skus, 1_000_000_000)
            python = postgres.python_service(workload, options.crud_clients, options.crud_duration_s)
            say(f"  {name}: Python service {python:,.0f} orders/s ({options.crud_clients} processes)")
            results[name] = {"crud_pgbench_tps": tps, "crud_python_tps": python}
    finally:
        postgres.stop()
    return results


# Orders in one round of the reference work (about 0.1 s of CPU here), and rounds per figure.
REFERENCE_ORDERS = 2_000
REFERENCE_ROUNDS = 7


def reference_work(orders: int = REFERENCE_ORDERS) -> int:
    """The Python every command costs the pipeline, without Kafka or Redis: its Avro round trip
    (the publisher's encoding, the processor's decoding), its decision, and its event's round
    trip (the processor's encoding, the projection's decoding). Returns the events decoded."""
    commands = [place_order(f"SKU-{i % 100:05d}", 1 + i % 3) for i in range(orders)]
    stock = Stock("", available=1_000_000)
    events = [
        event
        for command in codec.decode_commands(codec.encode_batch(commands))
        for event in decide(stock._replace(sku=command.sku), command, command.occurred_at)
    ]
    return len(codec.decode_events(codec.encode_batch(events)))


def reference_cpu_us(rounds: int = REFERENCE_ROUNDS) -> float:
    """CPU time of this thread per order of ``reference_work``, the median of ``rounds``.

    How fast the box runs the pipeline's kind of Python at the moment. Here it swings by up to
    3x within seconds, idle (rounds of 0.1 s took 29-96 us an order within 6 s), for every part
    alike; pgbench does not follow it (PostgreSQL waits on its commits more than on the CPU).
    Taken at the start and the end of a run, it says whether the box was fast or slow around it.
    """
    times = []
    for _ in range(rounds):
        started = time.thread_time()
        reference_work()
        times.append(time.thread_time() - started)
    return statistics.median(times) / REFERENCE_ORDERS * 1e6


def run_bench(base: Settings, options: BenchOptions, say: Say = print) -> dict[str, Any]:
    options.out_dir.mkdir(parents=True, exist_ok=True)
    settings = Settings(
        **{
            **base.model_dump(exclude={"bootstrap_servers", "redis_url"}),
            "run_dir": options.out_dir / "run",
            "kafka_port": _free_port(),
            "kafka_controller_port": _free_port(),
            "redis_port": _free_port(),
        }
    )
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "kafka": settings.kafka_version,
            "platform": platform.platform(),
        },
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in options.__dict__.items()},
        "settings": {
            "partitions": settings.partitions,
            "processor_batch_size": settings.processor_batch_size,
            "processor_batch_wait_s": settings.processor_batch_wait_s,
            "projection_batch_size": settings.projection_batch_size,
            "workers": f"{options.processors} processor, {options.projections} projection",
            "replay_workers": options.replay_workers,
        },
        "durability": {"pipeline": PIPELINE_DURABILITY, "crud": CRUD_DURABILITY},
        "workloads": {},
    }
    reference = {"start": reference_cpu_us()}
    say(f"Reference work: {reference['start']:.1f} us of CPU per order (the box's speed for Python)")
    crud = bench_crud(options, say)
    stack = LocalStack(settings, say=say)
    run = uuid.uuid4().hex[:6]
    try:
        say("Starting a private Kafka broker and Redis for the benchmark")
        stack.up()
        warm = workload_settings(settings, run, "warm-up", len(options.workloads) + 1)
        warm_up(options, warm, say)
        clear_away(warm, workload_prefix(run, "warm-up"))
        for db, name in enumerate(options.workloads, start=1):
            say(f"Workload {name}:")
            mine = workload_settings(settings, run, name, db)
            pipeline = bench_pipeline(options, name, mine, say)
            results["workloads"][name] = {**pipeline, **crud[name]}
            clear_away(mine, workload_prefix(run, name))
    finally:
        stack.down()
    reference["end"] = reference_cpu_us()
    results["machine"]["reference_cpu_us_per_order"] = reference
    options.json_path.parent.mkdir(parents=True, exist_ok=True)
    options.json_path.write_text(json.dumps(results, indent=2) + "\n")
    (options.out_dir / "REPORT.md").write_text(report_markdown(results))
    plot(results, options.out_dir)
    return results


TARGETS = {
    "e2e_commands_per_s": 50_000,
    "replay_events_per_s": 200_000,
}


def report_markdown(results: dict[str, Any]) -> str:
    """The report: one table per workload, ratios against CRUD, durability of each side."""
    machine = results["machine"]
    reference = machine["reference_cpu_us_per_order"]
    lines = [
        "# stockflow benchmark",
        "",
        f"{machine['cpus']} CPUs, Python {machine['python']}, Apache Kafka {machine['kafka']};"
        f" settings: {json.dumps(results['settings'])}.",
        "",
        "Reference work, us of CPU per order at the start / end of the run:"
        f" {reference['start']:.1f} / {reference['end']:.1f}. The Avro round trips of a command and"
        f" its event and its decision, timed alone in the bench process (median of {REFERENCE_ROUNDS}"
        " rounds): the box's speed for Python around the run, which pgbench does not follow. CPU"
        " figures of runs whose references differ much are not comparable.",
        "",
    ]
    for name, w in results["workloads"].items():
        half = w["latency_ms_at_half_load"]
        cpu = w["e2e_cpu_us_per_command"]
        lines += [
            f"## Workload: {name} ({w['workload']['skus']} SKUs, hot SKUs: {w['workload']['hot_skus']})",
            "",
            "| figure | value | target |",
            "| --- | ---: | ---: |",
            f"| raw Kafka (min of produce, consume), msgs/s | {w['raw_kafka_msgs_per_s']:,.0f} | |",
            f"| ingest (acks=all), commands/s | {w['ingest_commands_per_s']:,.0f} | |",
            f"| backlog drain, commands/s | {w['backlog_commands_per_s']:,.0f} | |",
            f"| end to end (decided and visible in Redis), commands/s | {w['e2e_commands_per_s']:,.0f}"
            f" | {TARGETS['e2e_commands_per_s']:,} |",
            f"| end to end, CPU per command, us: {' / '.join(cpu)} | {_cpu_figures(cpu)} | |",
            f"| latency at half load p50 / p99 / p99.9, ms | {half['p50']} / {half['p99']} / {half['p999']}"
            " | p99 <= 50 |",
            f"| replay into an empty read model ({results['settings']['replay_workers']} processes),"
            f" events/s | {w['replay_events_per_s']:,.0f}"
            f" | {TARGETS['replay_events_per_s']:,} |",
            f"| CRUD, pgbench, orders/s | {w['crud_pgbench_tps']:,.0f} | |",
            f"| CRUD, Python service, orders/s | {w['crud_python_tps']:,.0f} | |",
            f"| **end to end / pgbench** | **{w['e2e_commands_per_s'] / w['crud_pgbench_tps']:.2f}x** |"
            f" {'5x' if name == 'hot' else ''} |",
            f"| end to end / Python service | {w['e2e_commands_per_s'] / w['crud_python_tps']:.2f}x | |",
            f"| ingest / pgbench | {w['ingest_commands_per_s'] / w['crud_pgbench_tps']:.2f}x | |",
            "",
            "Latency from command created to visible in Redis, and to decided by the processor (the"
            " rest is the event log and the projection):",
            "",
            "| offered load | offered/s | p50 ms | p99 ms | p99.9 ms | decided p50 / p99 ms"
            f" | CPU per command, us: {' / '.join(cpu)} (total) | cores busy |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        lines += [
            f"| {p['fraction']:.0%} | {p['offered_per_s']:,.0f} | {p['p50']} | {p['p99']} | {p['p999']}"
            f" | {p['decided_p50']} / {p['decided_p99']} | {_cpu_figures(p['cpu_us_per_command'])}"
            f" | {p['cores_busy']:.2f} |"
            for p in w["latency"]
        ]
        lines.append("")
    lines += [
        "## Durability",
        "",
        f"- Pipeline: {results['durability']['pipeline']}.",
        f"- CRUD: {results['durability']['crud']}.",
        "",
    ]
    return "\n".join(lines)


def _cpu_figures(cpu: dict[str, float]) -> str:
    return " / ".join(f"{us:.1f}" for us in cpu.values()) + f" (total {sum(cpu.values()):.1f})"


def plot(results: dict[str, Any], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["workloads"])
    figures = [
        ("raw Kafka", "raw_kafka_msgs_per_s"),
        ("ingest", "ingest_commands_per_s"),
        ("end to end", "e2e_commands_per_s"),
        ("replay", "replay_events_per_s"),
        ("pgbench", "crud_pgbench_tps"),
        ("Python CRUD", "crud_python_tps"),
    ]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [results["workloads"][name][key] for _, key in figures]
        ax.bar([x + i * width for x in range(len(figures))], values, width, label=name)
    ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(figures))], [f for f, _ in figures])
    ax.set_yscale("log")
    ax.set_ylabel("per second (log scale)")
    _save(fig, "Throughput: stockflow vs raw Kafka vs PostgreSQL CRUD", out_dir / "throughput.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in names:
        points = results["workloads"][name]["latency"]
        for key, style in (("p50", "-o"), ("p99", "--s")):
            ax.plot(
                [p["offered_per_s"] for p in points], [p[key] for p in points], style, label=f"{name} {key}"
            )
    ax.set_xlabel("offered commands/s")
    ax.set_ylabel("command created -> visible in Redis, ms")
    _save(fig, "Latency against offered load", out_dir / "latency.png")

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in names:
        samples = results["workloads"][name]["e2e_lag"]
        t = [s["t"] for s in samples]
        ax.plot(t, [s["published"] - s["decided"] for s in samples], label=f"{name}: processor lag")
        ax.plot(t, [s["decided"] - s["visible"] for s in samples], "--", label=f"{name}: projection lag")
    ax.set_xlabel("seconds into the end-to-end run")
    ax.set_ylabel("commands behind")
    _save(fig, "Lag over time, end-to-end run", out_dir / "lag.png")


def _save(fig: Any, title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    for ax in fig.axes:
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
