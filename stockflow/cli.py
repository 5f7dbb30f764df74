"""`stockflow`: the one command-line entry point. Settings come from STOCKFLOW_* variables."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import redis
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from stockflow.errors import InvalidCommand, StackError, StockflowError
from stockflow.lag import Overloaded
from stockflow.metrics import serve as serve_metrics
from stockflow.settings import Settings
from stockflow.topics import require_broker

if TYPE_CHECKING:
    from producers.publisher import Publisher

app = typer.Typer(
    help="stockflow: event-sourced order intake on Kafka, Faust and Redis.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
stack_app = typer.Typer(help="Run the local Kafka broker and Redis (no Docker needed).", no_args_is_help=True)
worker_app = typer.Typer(help="Run a worker in the foreground.", no_args_is_help=True)
publish_app = typer.Typer(help="Publish one command and print where it landed.", no_args_is_help=True)
query_app = typer.Typer(help="Read the Redis read models.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")
app.add_typer(worker_app, name="worker")
app.add_typer(publish_app, name="publish")
app.add_typer(query_app, name="query")

console = Console()
errors = Console(stderr=True)


def main() -> None:
    try:
        app()
    except InvalidCommand as exc:
        errors.print(f"[red]refused:[/red] {exc}\nNothing was sent.")
        sys.exit(2)
    except Overloaded as exc:
        errors.print(f"[yellow]{exc}[/yellow]\nNothing was sent.")
        sys.exit(3)
    except StockflowError as exc:
        errors.print(f"[red]error:[/red] {exc}")
        sys.exit(1)
    except ValidationError as exc:  # a STOCKFLOW_* variable Settings refuses
        errors.print(f"[red]error:[/red] {settings_problems(exc)}")
        sys.exit(2)
    except (redis.ConnectionError, redis.TimeoutError) as exc:  # any command that reads Redis
        errors.print(
            f"[red]error:[/red] cannot reach Redis at {Settings().redis_url_without_password()}"
            f" ({exc}): start the stack (`stockflow stack up`) or set STOCKFLOW_REDIS_URL"
        )
        sys.exit(1)


def settings_problems(error: ValidationError) -> str:
    """What is wrong with the STOCKFLOW_* variables, one line each; not pydantic's report,
    which quotes every setting's value, a password too."""
    lines = []
    for problem in error.errors():
        message = problem["msg"].removeprefix("Value error, ")
        if problem["loc"]:
            message = f"STOCKFLOW_{str(problem['loc'][0]).upper()}: {message}"
        lines.append(message)
    return "\n".join(lines)


# -- stack ---------------------------------------------------------------------------------
@stack_app.command("up")
def stack_up(
    processors: Annotated[int, typer.Option(min=0, help="Processor workers to start in the background.")] = 0,
    projections: Annotated[
        int, typer.Option(min=0, help="Projection workers to start in the background.")
    ] = 0,
    api: Annotated[bool, typer.Option(help="Also serve the HTTP API in the background.")] = False,
) -> None:
    """Start Kafka and Redis (and optionally workers and the HTTP API), create the topics, and return.

    Example: `stockflow stack up --processors 1 --projections 1 --api`
    """
    from stockflow.stack import LocalStack

    stack = LocalStack(Settings(), say=console.print)
    stack.up()
    stack.start_workers("processor", processors)
    stack.start_workers("projection", projections)
    if api:
        stack.start_api()


@stack_app.command("scale")
def stack_scale(
    processors: Annotated[int | None, typer.Option(min=0, help="Processor workers to run.")] = None,
    projections: Annotated[int | None, typer.Option(min=0, help="Projection workers to run.")] = None,
) -> None:
    """Start or stop background workers until exactly that many of each kind named run.

    A stopped worker finishes its batch and hands its partitions to the others at once. More
    workers of a kind than partitions leave the extra ones idle.

    Example: `stockflow stack scale --processors 2 --projections 2`
    """
    from stockflow.stack import LocalStack

    if processors is None and projections is None:
        errors.print("say how many workers: --processors N, --projections N, or both")
        raise typer.Exit(2)
    stack = LocalStack(Settings(), say=console.print)
    if not (stack.kafka.running() and stack.redis.running()):
        raise StackError("the local stack is not running: start it with `stockflow stack up`")
    for kind, count in (("processor", processors), ("projection", projections)):
        if count is not None:
            stack.scale_workers(kind, count)


@stack_app.command("down")
def stack_down() -> None:
    """Stop the workers, Kafka and Redis that `stack up` started (by pid).

    Example: `stockflow stack down`
    """
    from stockflow.stack import LocalStack

    LocalStack(Settings(), say=console.print).down()


@stack_app.command("status")
def stack_status() -> None:
    """Show which stack processes run, with pids, addresses and logs.

    Example: `stockflow stack status`
    """
    from stockflow.stack import LocalStack

    table = Table("process", "pid", "state", "address / log")
    for row in LocalStack(Settings()).status():
        state = "[green]running[/green]" if row.running else "[red]stopped[/red]"
        table.add_row(row.name, str(row.pid or "-"), state, row.detail)
    console.print(table)


# -- workers -------------------------------------------------------------------------------
@worker_app.command("processor")
def worker_processor(
    web_port: Annotated[int | None, typer.Option(help="Serve Faust's web views on this port.")] = None,
) -> None:
    """Decide commands with the Faust processor (runs until SIGTERM or Ctrl-C).

    Start as many as there are partitions; each gets its own data dir.

    Example: `stockflow worker processor`
    """
    import faust

    from processors.app import create_app
    from stockflow.topics import ensure_topics

    settings = Settings()
    ensure_topics(settings)
    data_dir = settings.run_dir / "processor" / f"{socket.gethostname()}-{os.getpid()}"
    faust_app = create_app(settings, data_dir, web_port)
    print(f"metrics: {serve_metrics(settings, 'processor')}", flush=True)

    class Worker(faust.Worker):
        def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
            super().on_setup_root_logger(logger, level)
            # Faust logs a screenful per rebalance at INFO; the processor's own INFO lines (a
            # table restored, a partition taken over, with counts and times) are worth reading.
            logging.getLogger("processors").setLevel(logging.INFO)
            for handler in logger.handlers:
                handler.setLevel(logging.INFO)

    worker = Worker(faust_app, loglevel="WARN")
    # Faust's terminal spinner sets the root logger to DEBUG to spin on every record: every
    # per-message debug call in Faust and aiokafka then builds a record (about 10% of the CPU).
    worker.spinner = None
    worker.execute_from_commandline()


@worker_app.command("projection")
def worker_projection() -> None:
    """Fold events into the Redis read models (runs until SIGTERM or Ctrl-C).

    Example: `stockflow worker projection`
    """
    from projections.worker import ProjectionWorker
    from stockflow.topics import ensure_topics

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings()
    ensure_topics(settings)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    logging.getLogger(__name__).info("metrics: %s", serve_metrics(settings, "projection"))
    ProjectionWorker(settings).run(stop.is_set)


@app.command("api")
def api() -> None:
    """Serve the HTTP API: publish commands, read the read models (runs until Ctrl-C).

    Listens on STOCKFLOW_API_HOST:STOCKFLOW_API_PORT (127.0.0.1:8080); the README lists the routes.

    Example: `stockflow api`, then `curl -d '{"sku": "SKU-1", "qty": 2}' localhost:8080/orders`
    """
    from aiohttp import web

    from stockflow.api import create_api

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings()
    if not settings.api_token and settings.api_host not in ("127.0.0.1", "localhost", "::1"):
        logging.warning(
            "serving on %s with no STOCKFLOW_API_TOKEN: whoever reaches port %s can publish commands",
            settings.api_host,
            settings.api_port,
        )
    web.run_app(
        create_api(settings),
        host=settings.api_host,
        port=settings.api_port,
        print=lambda _: print(f"HTTP API on http://{settings.api_host}:{settings.api_port}", flush=True),
    )


# -- publish -------------------------------------------------------------------------------
def _publisher(settings: Settings) -> Publisher:
    """A publisher whose broker has answered: a stack that is down is said at once, not after
    the 30 s a command waits for its acknowledgement (60 s for `load`). ``settings`` come from
    _kafka_settings, which has found something listening there."""
    from producers.publisher import Publisher, PublishError

    publisher = Publisher(settings)
    try:
        publisher.check_broker()
    except PublishError:
        publisher.close()  # nothing queued: no wait; its clients stop retrying the broker now
        raise
    return publisher


def _kafka_settings() -> Settings:
    """The settings of a command that reads Kafka, once something listens at its address."""
    settings = Settings()
    require_broker(settings)
    return settings


def _publish(command: Any, wait_s: float = 0.0) -> None:
    receipt = _publisher(_kafka_settings()).publish(command)
    console.print(
        f"{type(command).__name__} {receipt.command_id}"
        f" -> partition {receipt.partition}, offset {receipt.offset}"
    )
    if wait_s:
        _show_decision(command, receipt.command_id, wait_s)


def _show_decision(command: Any, command_id: str, wait_s: float) -> None:
    """Print the decision about ``command`` once the read models show it (on its order, or a
    restock's on its SKU); exit 4 if they do not within ``wait_s``."""
    from schemas.records import Restock

    if isinstance(command, Restock):
        decision, where = _models().restock_decision(command.sku, command_id, wait_s), f"SKU {command.sku}"
    else:
        decision, where = (
            _models().decision(command.order_id, command_id, wait_s),
            f"order {command.order_id}",
        )
    if decision is None:
        errors.print(
            f"[yellow]no decision about {command_id} is visible on {where} after --wait {wait_s:g}:"
            "[/yellow] it is in the log; are the processor and a projection worker running and"
            " keeping up (`stockflow status`)? `stockflow query` shows it later"
        )
        raise typer.Exit(4)
    status = decision["status"]
    reason = f": {decision['reason']}" if decision["reason"] else ""
    colour = "yellow" if status == "rejected" else "green"
    console.print(
        f"[{colour}]{status}[/{colour}]{reason} (SKU {command.sku} at version {decision['version']})"
    )


Wait = Annotated[
    float,
    typer.Option(
        min=0,
        help="Seconds to wait for the decision to show in the read models, then print it (exit 4"
        " if it does not); 0 = do not wait.",
    ),
]


ExpectedVersion = Annotated[
    int | None, typer.Option(help="Decide only if the SKU is at this version (optimistic concurrency).")
]
CommandId = Annotated[
    str | None,
    typer.Option(
        help="The command's id (a new UUID if left out). Sent again with the same id, it is decided once."
    ),
]


@publish_app.command("order")
def publish_order(
    sku: str,
    qty: int,
    order_id: Annotated[str | None, typer.Option(help="Order id; a new UUID if left out.")] = None,
    expected_version: ExpectedVersion = None,
    command_id: CommandId = None,
    wait: Wait = 0.0,
) -> None:
    """Place an order for QTY units of SKU.

    Example: `stockflow publish order SKU-1 2 --order-id o-1001 --wait 30`
    """
    from producers.commands import place_order

    _publish(place_order(sku, qty, order_id, expected_version, command_id=command_id), wait)


@publish_app.command("cancel")
def publish_cancel(
    sku: str,
    order_id: str,
    expected_version: ExpectedVersion = None,
    command_id: CommandId = None,
    wait: Wait = 0.0,
) -> None:
    """Cancel a processed order, releasing its units.

    Example: `stockflow publish cancel SKU-1 o-1001 --wait 30`
    """
    from producers.commands import cancel_order

    _publish(cancel_order(sku, order_id, expected_version, command_id=command_id), wait)


@publish_app.command("restock")
def publish_restock(
    sku: str,
    qty: int,
    expected_version: ExpectedVersion = None,
    command_id: CommandId = None,
    wait: Wait = 0.0,
) -> None:
    """Add QTY units of SKU to stock.

    Example: `stockflow publish restock SKU-1 100 --expected-version 3 --wait 30`
    """
    from producers.commands import restock

    _publish(restock(sku, qty, expected_version, command_id=command_id), wait)


@app.command("load")
def load(
    orders: Annotated[int, typer.Option(min=1, help="How many orders to send, at most.")] = 10_000,
    rate: Annotated[float, typer.Option(min=0, help="Orders per second; 0 = as fast as possible.")] = 0.0,
    duration: Annotated[
        float, typer.Option(min=0, help="Stop sending after this many seconds; 0 = no limit.")
    ] = 0.0,
    skus: Annotated[int, typer.Option(min=1, help="How many SKUs (SKU-00000 ...).")] = 100,
    hot_skus: Annotated[int, typer.Option(min=0, help="The first N SKUs get --hot-share of the orders.")] = 0,
    hot_share: Annotated[float, typer.Option(min=0, max=1, help="Share of orders on the hot SKUs.")] = 0.8,
    seed: Annotated[int | None, typer.Option(help="Random seed, for a repeatable load.")] = None,
) -> None:
    """Generate PlaceOrder load with a progress bar, and report the acknowledged rate.

    Example: `stockflow load --rate 5000 --duration 30 --orders 1000000 --skus 1000 --hot-skus 10`
    """
    from rich.progress import Progress

    from producers.load import ACK_WAIT_S, LoadProfile, run_load

    if hot_skus > skus:
        raise typer.BadParameter(
            f"{hot_skus} is more than --skus ({skus}): the hot SKUs are the first N of them",
            param_hint="'--hot-skus'",
        )
    settings = _kafka_settings()
    profile = LoadProfile(orders, rate, duration, skus, hot_skus, hot_share, seed=seed)
    with Progress(console=console) as progress:
        task = progress.add_task("publishing", total=orders)
        # Not held in a variable: nothing here keeps it once run_load returns. Kept in this
        # frame, it lived on with the exception that ends a failed load and went on retrying a
        # broker that was gone (close() would wait for any unanswered command).
        report = run_load(_publisher(settings), profile, lambda sent: progress.update(task, completed=sent))
    console.print(
        f"{report.acknowledged} acknowledged, {report.failed} failed in {report.elapsed_s:.1f}s"
        f" ({report.rate:,.0f}/s); held back {report.held_back_s:.1f}s by backpressure"
    )
    for error in report.errors:
        errors.print(f"[red]{error}[/red]")
    if report.unanswered:
        errors.print(
            f"[red]{report.unanswered} commands sent got no answer from Kafka at"
            f" {settings.bootstrap_servers} within {ACK_WAIT_S:.0f}s: they may or may not be in the"
            " log (`stockflow verify` counts what was decided). Is the broker up (`stockflow stack"
            " status`, STOCKFLOW_BOOTSTRAP_SERVERS)?[/red]"
        )
    if report.failed or report.unanswered:
        raise typer.Exit(1)


# -- query ---------------------------------------------------------------------------------
def _models() -> Any:
    from projections.queries import ReadModels

    return ReadModels(redis.Redis.from_url(Settings().redis_url))


def _emit(data: Any, as_json: bool, title: str) -> None:
    if as_json:
        print(json.dumps(data, indent=2, sort_keys=True))
        return
    table = Table("field", "value", title=title)
    for key, value in data.items():
        table.add_row(str(key), json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    console.print(table)


JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _text(value: str) -> str:
    # An argument of bytes that are not UTF-8 (Python decodes it with surrogates) names
    # nothing that could have been published, and Redis clients cannot send it.
    from schemas.records import not_text

    problem = not_text(value)
    if problem:
        raise typer.BadParameter(problem)
    return value


SkuArgument = Annotated[str, typer.Argument(metavar="SKU", callback=_text)]
OrderIdArgument = Annotated[str, typer.Argument(metavar="ORDER_ID", callback=_text)]


@query_app.command("stock")
def query_stock(sku: SkuArgument, as_json: JsonFlag = False) -> None:
    """Stock of one SKU: available units, version, counters, recent orders.

    Example: `stockflow query stock SKU-1 --json`
    """
    row = _models().stock(sku)
    if row is None:
        errors.print(f"no events for SKU {sku!r} have been projected yet")
        raise typer.Exit(1)
    _emit(row, as_json, f"stock of {sku}")


@query_app.command("order")
def query_order(order_id: OrderIdArgument, as_json: JsonFlag = False) -> None:
    """Status of an order, one line per SKU.

    Example: `stockflow query order o-1001`
    """
    from projections.queries import order_not_found

    lines = _models().order(order_id)
    if not lines:
        errors.print(order_not_found(order_id, Settings().order_retention_s))
        raise typer.Exit(1)
    _emit(lines, as_json, f"order {order_id}")


@query_app.command("top")
def query_top(
    n: Annotated[int, typer.Option("-n", min=1, help="How many SKUs.")] = 10, as_json: JsonFlag = False
) -> None:
    """Top-selling SKUs by units sold.

    Example: `stockflow query top -n 5`
    """
    _emit(dict(_models().top(n)), as_json, "top sellers (units sold)")


@query_app.command("totals")
def query_totals(as_json: JsonFlag = False) -> None:
    """Counters over all SKUs and the lowest stock.

    Example: `stockflow query totals --json`
    """
    _emit(_models().totals(), as_json, "totals")


# -- demo ----------------------------------------------------------------------------------
@app.command("demo")
def demo(
    orders: Annotated[int, typer.Option(min=1, help="Orders to publish.")] = 3000,
    skus: Annotated[int, typer.Option(min=1, help="SKUs to restock and order.")] = 20,
    keep_running: Annotated[bool, typer.Option(help="Leave the stack and workers running.")] = False,
) -> None:
    """Start everything, publish orders (some rejected, some duplicated), print the read models.

    Example: `stockflow demo --orders 3000 --keep-running`
    """
    from stockflow.demo import DemoPlan, run_demo

    if not run_demo(Settings(), DemoPlan(orders=orders, skus=skus), keep_running, console):
        raise typer.Exit(1)


@app.command("bench")
def bench(
    orders: Annotated[
        int, typer.Option(min=1, help="Commands per phase (raw, ingest, end to end).")
    ] = 100_000,
    out: Annotated[Path, typer.Option(help="Folder for REPORT.md, the plots and the JSON.")] = Path(
        ".stockflow/bench"
    ),
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the results JSON here (default: OUT/results.json).")
    ] = None,
    latency_seconds: Annotated[float, typer.Option(min=1, help="Length of each offered-load run.")] = 10.0,
    crud_seconds: Annotated[int, typer.Option(min=1, help="Length of each PostgreSQL run.")] = 15,
    workload: Annotated[list[str] | None, typer.Option(help="uniform and/or hot (default: both).")] = None,
    processors: Annotated[int, typer.Option(min=1, help="Processor workers.")] = 1,
    projections: Annotated[int, typer.Option(min=1, help="Projection workers.")] = 1,
    replay_workers: Annotated[
        int,
        typer.Option(min=1, help="Processes folding the log in the replay (`stockflow rebuild --workers`)."),
    ] = os.cpu_count() or 1,
) -> None:
    """Measure the pipeline against raw Kafka and PostgreSQL CRUD on this machine, in one run.

    Starts its own Kafka, Redis and PostgreSQL on free ports and stops them at the end.
    Example: `stockflow bench --json results.json`
    """
    from stockflow.bench import WORKLOADS, BenchOptions, run_bench

    chosen = tuple(workload or WORKLOADS)
    unknown = [name for name in chosen if name not in WORKLOADS]
    if unknown:
        raise InvalidCommand(f"unknown workload {unknown}: choose from {', '.join(WORKLOADS)}")
    options = BenchOptions(
        out_dir=out,
        json_path=json_path or out / "results.json",
        orders=orders,
        latency_duration_s=latency_seconds,
        crud_duration_s=crud_seconds,
        workloads=chosen,
        processors=processors,
        projections=projections,
        replay_workers=replay_workers,
    )
    # Stopped with SIGTERM (a timeout, a CI runner), still stop the services it started.
    signal.signal(signal.SIGTERM, lambda _signo, _frame: sys.exit(143))
    run_bench(Settings(), options, say=console.print)
    console.print(f"Report: {out / 'REPORT.md'}; plots: {out}/*.png; JSON: {options.json_path}")


@app.command("status")
def status(
    once: Annotated[bool, typer.Option(help="Print one snapshot and exit (for scripts).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object; implies --once.")] = False,
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between refreshes.")] = 1.0,
) -> None:
    """Lag per partition of the processor and projection groups, who holds each partition, and
    rates, and how many dead letters each DLQ topic holds; refreshes until Ctrl-C.

    Example: `stockflow status --once --json`
    """
    from rich.live import Live

    from stockflow.lag import GroupLag, LagProbe
    from stockflow.metrics import endpoints as metric_endpoints

    settings = _kafka_settings()
    probe = LagProbe(settings)
    endpoints = metric_endpoints(settings)
    if as_json:
        groups = {g.group: g.as_json() for g in probe.read()}
        report = {"groups": groups, "dead_letters": probe.dead_letters(), "metrics": endpoints}
        print(json.dumps(report, indent=2))
        return

    def snapshot(previous: tuple[float, list[GroupLag]] | None) -> tuple[Table, tuple[float, list[GroupLag]]]:
        now, lags, held = time.monotonic(), probe.read(), probe.assignments()
        dead = ", ".join(f"{topic} {count:,}" for topic, count in probe.dead_letters().items())
        caption = f"dead letters: {dead} (`stockflow dlq list` says why)"
        if endpoints:
            caption += "\nmetrics: " + ", ".join(f"{name} {url}" for name, url in endpoints.items())
        table = Table("group", "partition", "lag", "held by", title="stockflow status", caption=caption)
        for i, group in enumerate(lags):
            rate = ""
            if previous is not None:
                rate = f"{(group.consumed - previous[1][i].consumed) / (now - previous[0]):,.0f}/s"
            for partition, lag in sorted(group.partitions.items()):
                table.add_row(group.group, str(partition), f"{lag:,}", held[group.group].get(partition, "-"))
            table.add_row(
                f"[bold]{group.group}[/bold]", "all", f"[bold]{group.total:,}[/bold]", rate, end_section=True
            )
        return table, (now, lags)

    table, previous = snapshot(None)
    if once:
        console.print(table)
        return
    with Live(table, console=console, auto_refresh=False) as live:
        try:
            while True:
                time.sleep(interval)
                table, previous = snapshot(previous)
                live.update(table, refresh=True)
        except KeyboardInterrupt:
            pass


# -- verify --------------------------------------------------------------------------------
@contextlib.contextmanager
def _stages(title: str) -> Iterator[Callable[[str, int, int], None]]:
    """A progress bar on stderr, gone once done, for work in stages: ``show(stage, done, of)``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=errors, transient=True) as progress:
        task = progress.add_task(title, total=None)

        def show(stage: str, done: int, total: int) -> None:
            progress.update(task, description=f"{title}: {stage}", completed=done, total=total)

        yield show


@app.command("verify")
def verify_command(
    wait: Annotated[
        float,
        typer.Option(
            min=0,
            help="Seconds to wait for undecided commands and views behind the log; exit 4 if some still are.",
        ),
    ] = 0.0,
    as_json: JsonFlag = False,
) -> None:
    """Fold the event log and compare it with the processor's table and the Redis read models
    (stock rows, top sellers, order statuses).

    Commands the processor has not reached yet and views only behind the log (lag) are listed
    but are not failures, so it can run on a live system; a command the processor has committed
    past without a decision is lost, and a table row behind the log once the processor has
    committed every command is a mismatch.

    Exits 1 and prints each difference if anything was lost, decided twice, or disagrees; with
    --wait, exits 4 if anything is still behind when the wait is over (the workers are down or
    slower than the load: see `stockflow status`).

    Example: `stockflow verify --wait 60`
    """
    from stockflow.verify import verify

    settings = _kafka_settings()
    deadline = time.monotonic() + wait
    with _stages("verify") as show:
        report = verify(settings, show)
        while report.behind and time.monotonic() < deadline:
            time.sleep(1)
            report = verify(settings, show)
    if as_json:
        print(json.dumps({**report.summary(), "problems": report.problems}, indent=2))
    else:
        _emit(report.summary(), False, "verify")
        for line in report.behind[:10]:
            console.print(f"[yellow]behind:[/yellow] {line}")
        for line in report.problems[:50]:
            console.print(f"[red]{line}[/red]")
    if report.problems:
        raise typer.Exit(1)
    if wait and report.behind:
        errors.print(
            f"[yellow]still behind after --wait {wait:g}:[/yellow] undecided commands:"
            f" {len(report.undecided)}, views behind the log: {len(report.behind) - len(report.undecided)};"
            " `stockflow status` shows the lag and which workers run"
        )
        raise typer.Exit(4)


# -- rebuild -------------------------------------------------------------------------------
@app.command("rebuild")
def rebuild_command(
    database: Annotated[
        int, typer.Option(min=0, help="Redis database to rebuild into; emptied first, never the live one.")
    ] = 1,
    workers: Annotated[
        int, typer.Option(min=1, help="Processes folding the log, taking the partitions one after another.")
    ] = os.cpu_count() or 1,
    check: Annotated[
        bool, typer.Option("--verify/--no-verify", help="Compare the result with a fold of the log.")
    ] = True,
    switch: Annotated[
        bool,
        typer.Option(
            "--switch",
            help="Then make it the live read models (SWAPDB); the projection workers must be stopped.",
        ),
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Fold the whole event log into an empty Redis database; readers keep the live one.

    With --switch the rebuilt database becomes the live one and the old read models move to
    --database, in one atomic SWAPDB; projection workers started afterwards go on from the
    rebuilt watermarks. Exits 1, switching nothing, if the check finds a difference.

    Example: `stockflow rebuild --database 1 --workers 2 --switch`
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from projections.rebuild import (
        database_url,
        ensure_no_projection_workers,
        live_database,
        rebuild,
        refuse_unless_possible,
    )
    from projections.rebuild import switch as switch_databases
    from stockflow.verify import verify_read_models

    settings = _kafka_settings()
    refuse_unless_possible(settings, database, workers)  # before a progress bar is drawn
    if switch:
        ensure_no_projection_workers(settings)  # before the work, not only after it
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[events]:,} events"))
    with Progress(*columns, TimeElapsedColumn(), console=errors, transient=as_json) as progress:
        task = progress.add_task(f"rebuilding into database {database}", total=None, events=0)

        def show(covered: int, total: int, events: int) -> None:
            progress.update(task, completed=covered, total=total, events=events)

        result = rebuild(settings, database, workers, show)
    summary: dict[str, Any] = {
        "database": result.database,
        "events": result.events,
        "workers": result.workers,
        "seconds": round(result.elapsed_s, 2),
        "events_per_s": round(result.events_per_s),
    }
    problems: list[str] = []
    if check:
        rebuilt = settings.model_copy(update={"redis_url": database_url(settings.redis_url, database)})
        with _stages(f"checking database {database} (--no-verify skips it)") as checked:
            report = verify_read_models(rebuilt, checked)
        problems = report.read_model_mismatches
        summary["verified_skus"] = report.skus
        summary["mismatches"] = len(problems)
    if switch and not problems:
        switch_databases(settings, database)
        summary["live_database"] = live_database(settings.redis_url)
        summary["switched"] = True
    _emit(summary, as_json, "rebuild")
    for line in problems[:50]:
        errors.print(f"[red]{line}[/red]")
    if problems:
        raise typer.Exit(1)
    if switch and not as_json:
        live = summary["live_database"]
        console.print(
            f"the rebuilt read models are live; the previous ones are in database {database}"
            f" (to go back: redis-cli -n {live} SWAPDB {live} {database})"
        )


# -- dead letters --------------------------------------------------------------------------
dlq_app = typer.Typer(help="Inspect and redrive dead letters.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")


@dlq_app.command("list")
def dlq_list(
    events: Annotated[
        bool, typer.Option("--events", help="The events DLQ instead of the commands DLQ.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """List dead letters with the reason each was parked.

    Example: `stockflow dlq list --json`
    """
    from stockflow.dlq import dead_letters

    settings = _kafka_settings()
    rows = [
        letter.summary() for letter in dead_letters(settings, settings.events_dlq_topic if events else None)
    ]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("id", "error", "reason", "source", "bytes", title=f"{len(rows)} dead letters")
    for row in rows:
        table.add_row(row["id"], row["error_type"], row["reason"], row["source"], row["bytes"])
    console.print(table)


@dlq_app.command("redrive")
def dlq_redrive(
    ids: Annotated[
        list[str] | None, typer.Argument(help="Dead letter ids (partition:offset) from `dlq list`.")
    ] = None,
    all_letters: Annotated[
        bool, typer.Option("--all", help="Every dead letter in the commands DLQ.")
    ] = False,
) -> None:
    """Re-publish dead letters that now decode and validate; say why the others cannot be.

    Exits 1 if any named letter could not be redriven.

    Example: `stockflow dlq redrive 0:17 3:2`
    """
    from stockflow.dlq import dead_letters, redrive

    settings = _kafka_settings()
    letters = dead_letters(settings)
    if not all_letters:
        wanted = set(ids or [])
        unknown = wanted - {letter.id for letter in letters}
        if unknown or not wanted:
            errors.print(
                f"no dead letter {sorted(unknown)}: name ids from `stockflow dlq list`, or use --all"
                if unknown
                else "name dead letter ids (partition:offset) from `stockflow dlq list`, or use --all"
            )
            raise typer.Exit(2)
        letters = [letter for letter in letters if letter.id in wanted]
    outcomes = redrive(settings, letters)
    for outcome in outcomes:
        if outcome.receipt is not None:
            console.print(
                f"{outcome.letter.id}: redriven as {outcome.receipt.command_id}"
                f" -> partition {outcome.receipt.partition}, offset {outcome.receipt.offset}"
            )
        else:
            errors.print(f"{outcome.letter.id}: not redriven: {outcome.refused}")
    if any(outcome.receipt is None for outcome in outcomes):
        raise typer.Exit(1)
