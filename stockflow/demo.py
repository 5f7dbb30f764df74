"""`make demo`: the whole pipeline on the local stack, with a reconciliation at the end."""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass

import redis
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from producers.commands import place_order, restock
from producers.publisher import Publisher, PublishError, Receipt
from projections.queries import ReadModels
from schemas.records import Command
from stockflow.errors import StockflowError
from stockflow.settings import Settings
from stockflow.stack import LocalStack


@dataclass(frozen=True)
class DemoPlan:
    orders: int = 3000
    skus: int = 20
    stock_per_sku: int = 100
    duplicates: int = 200
    hot_skus: int = 5
    timeout_s: float = 180.0


def run_demo(settings: Settings, plan: DemoPlan, keep_running: bool, console: Console) -> bool:
    """Run the demo; returns True if the reconciliation holds."""
    stack = LocalStack(settings, say=console.print)
    already_up = stack.kafka.running() and stack.redis.running()
    stack.up()
    started = stack.start_workers("processor", 1) + stack.start_workers("projection", 1)
    try:
        return _drive(settings, plan, console, stack)
    finally:
        if keep_running:
            console.print("Stack left running: `stockflow stack status`; stop it with `make down`.")
        elif already_up:
            for process in stack.worker_processes():
                if process.pid() in started:
                    process.stop()
        else:
            stack.down()


def _drive(settings: Settings, plan: DemoPlan, console: Console, stack: LocalStack) -> bool:
    run = uuid.uuid4().hex[:6]
    skus = [f"DEMO-{run}-{i:02d}" for i in range(plan.skus)]
    rng = random.Random(run)
    publisher = Publisher(settings)
    failures: list[str] = []

    def delivered(_c: Command, _r: Receipt | None, error: PublishError | None) -> None:
        if error is not None:
            failures.append(str(error))

    restocks: list[Command] = [restock(sku, plan.stock_per_sku) for sku in skus]
    orders: list[Command] = [
        place_order(rng.choice(skus[: plan.hot_skus] if rng.random() < 0.5 else skus), rng.randint(1, 3))
        for _ in range(plan.orders)
    ]
    resent = rng.sample(orders, min(plan.duplicates, len(orders)))
    console.print(
        f"Demo run {run}: restocking {plan.skus} SKUs with {plan.stock_per_sku} units each, then"
        f" {plan.orders} orders for 1-3 units (more than the stock), {len(resent)} of them sent twice."
    )
    with Progress(console=console, transient=True) as progress:
        sending = progress.add_task("publishing", total=len(restocks) + len(orders) + len(resent))
        try:
            for command in restocks:
                publisher.send(command, delivered)
                progress.advance(sending)
            publisher.flush()  # stock first, so the first orders find some
            for command in orders + resent:  # the re-sends reuse command ids: retries
                publisher.send(command, delivered)
                progress.advance(sending)
            if publisher.flush(60) or failures:
                raise StockflowError(f"Kafka did not acknowledge every command: {failures[:3]}")
        finally:
            publisher.close()  # before the stack stops, or its clients complain about the broker

        accepted = len(restocks) + len(orders)
        models = ReadModels(redis.Redis.from_url(settings.redis_url))
        waiting = progress.add_task("waiting for the read models", total=accepted)
        deadline = time.monotonic() + plan.timeout_s
        while True:
            totals = models.totals(skus)
            decided = totals["processed"] + totals["rejected"] + totals["replenished"]
            progress.update(waiting, completed=decided)
            if decided >= accepted or time.monotonic() > deadline:
                break
            for worker in stack.worker_processes():
                if not worker.running():
                    raise StockflowError(f"worker {worker.name} died; its log ends:\n{worker.log_tail()}")
            time.sleep(0.25)

    _print_models(console, models, skus, orders[0].order_id if orders else None)  # type: ignore[union-attr]
    processed, rejected, restocked = totals["processed"], totals["rejected"], totals["replenished"]
    ok = (
        processed + rejected + restocked == accepted
        and totals["min_available"] >= 0
        and totals["restock_rejected"] == 0
    )
    console.print(
        f"[bold]reconciliation:[/bold] {accepted} commands accepted ({len(resent)} duplicate sends"
        f" not counted) = {processed} processed + {rejected} rejected + {restocked} restocked;"
        f" lowest stock {totals['min_available']} >= 0: "
        + ("[green]OK[/green]" if ok else "[red]MISMATCH[/red]")
    )
    return ok


def _print_models(console: Console, models: ReadModels, skus: list[str], order_id: str | None) -> None:
    table = Table(title="Stock per SKU (Redis read model)")
    for column in ("sku", "available", "version", "units sold", "processed", "rejected"):
        table.add_column(column, justify="right" if column != "sku" else "left")
    for sku in skus:
        row = models.stock(sku)
        if row is None:
            table.add_row(sku, "-", "-", "-", "-", "-")
            continue
        table.add_row(
            sku,
            *(str(row[k]) for k in ("available", "version", "units_sold", "processed", "rejected")),
        )
    console.print(table)
    top = Table(title="Top sellers (all SKUs)")
    top.add_column("sku")
    top.add_column("units sold", justify="right")
    for sku, units in models.top(5):
        top.add_row(sku, str(units))
    console.print(top)
    if order_id is not None:
        console.print(f"Order {order_id}: {models.order(order_id)}")
