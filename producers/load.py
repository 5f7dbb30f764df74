"""Load generator: PlaceOrder commands at a target rate, optionally skewed onto hot SKUs."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from producers.commands import place_order
from producers.publisher import Publisher, PublishError, Receipt
from schemas.records import Command

# How long a due command may wait for others to share its batch frame, like a producer's linger.
LINGER_S = 0.02
# The shortest wait a poll is asked for (see run_load).
MIN_POLL_S = 0.001
# How long the load waits, once everything is sent, for Kafka to answer for every command.
ACK_WAIT_S = 60.0


@dataclass(frozen=True)
class LoadProfile:
    orders: int  # how many PlaceOrder commands to send, at most
    rate: float = 0.0  # commands per second; 0 = as fast as the producer takes them
    duration_s: float = 0.0  # stop sending after this long, even before `orders`; 0 = no limit
    skus: int = 100
    hot_skus: int = 0  # the first N SKUs get hot_share of the orders
    hot_share: float = 0.8
    max_qty: int = 3
    sku_prefix: str = "SKU-"
    seed: int | None = None

    def sku_names(self) -> list[str]:
        return [f"{self.sku_prefix}{i:05d}" for i in range(self.skus)]


@dataclass
class LoadReport:
    sent: int = 0
    acknowledged: int = 0
    failed: int = 0
    elapsed_s: float = 0.0
    held_back_s: float = 0.0  # time the publisher waited for the workers to catch up
    errors: list[str] = field(default_factory=list)

    @property
    def unanswered(self) -> int:
        """Commands Kafka neither acknowledged nor refused within ACK_WAIT_S: they may or may
        not be in the log."""
        return self.sent - self.acknowledged - self.failed

    @property
    def rate(self) -> float:
        return self.acknowledged / self.elapsed_s if self.elapsed_s else 0.0


def run_load(
    publisher: Publisher,
    profile: LoadProfile,
    on_progress: Callable[[int], None] | None = None,
) -> LoadReport:
    """Send up to ``profile.orders`` orders for up to ``profile.duration_s``, pacing to
    ``profile.rate``; then wait for every acknowledgement."""
    rng = random.Random(profile.seed)
    skus = profile.sku_names()
    hot = skus[: profile.hot_skus] if profile.hot_skus else []
    report = LoadReport()

    def delivered(_command: Command, receipt: Receipt | None, error: PublishError | None) -> None:
        if receipt is not None:
            report.acknowledged += 1
        else:
            report.failed += 1
            if len(report.errors) < 10:
                report.errors.append(str(error))

    pending: list[Command] = []  # due, not yet sent: they go out together, as batch frames
    pending_since = 0.0
    chunk = publisher.batch_capacity

    def send_pending() -> None:
        publisher.send_many(pending, delivered)
        report.sent += len(pending)
        pending.clear()
        if on_progress is not None:
            on_progress(report.sent)

    waited_before = publisher.admission.waited_s if publisher.admission else 0.0
    started = time.monotonic()
    stop_at = started + profile.duration_s if profile.duration_s > 0 else float("inf")
    for i in range(profile.orders):
        now = time.monotonic()
        if now >= stop_at:
            break
        if profile.rate > 0:
            # Pace against the schedule, not the previous send, so the rate holds on average.
            # Poll until the command is due: a poll returns as soon as it has served a delivery
            # report, and taking that as the wait sent low rates out as fast as Kafka answered.
            due = started + i / profile.rate
            while now < due:
                if pending and due - pending_since >= LINGER_S:
                    send_pending()  # do not hold a due command longer than LINGER_S
                # At least a millisecond: librdkafka waits whole ones, so a shorter poll returns at
                # once and the loop spun (318 us of CPU a command at 3,000/s against 71). A
                # command sent up to a millisecond late puts the next ones behind the schedule,
                # and they go without waiting until it is caught up.
                publisher.poll(max(due - now, MIN_POLL_S))
                now = time.monotonic()
        if not pending:
            pending_since = time.monotonic()
        sku = rng.choice(hot) if hot and rng.random() < profile.hot_share else rng.choice(skus)
        pending.append(place_order(sku, rng.randint(1, profile.max_qty)))
        if len(pending) >= chunk:
            send_pending()
    if pending:
        send_pending()
    publisher.flush(ACK_WAIT_S)
    report.elapsed_s = time.monotonic() - started
    report.held_back_s = (publisher.admission.waited_s if publisher.admission else 0.0) - waited_before
    return report
