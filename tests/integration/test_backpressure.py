"""Backpressure on the real stack: a stalled projection holds publishers back, a slow Redis
pauses the projection; both let go once the workers catch up."""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from producers.commands import place_order, restock
from producers.load import LoadProfile, LoadReport, run_load
from producers.publisher import Publisher
from projections.queries import ReadModels
from stockflow.lag import LagProbe, Overloaded
from stockflow.metrics import endpoints
from stockflow.settings import Settings
from stockflow.stack import LocalStack
from tests.integration.test_faults import quiet_verify
from tests.pipeline import wait_for

pytestmark = pytest.mark.integration

# Lag counts messages, and both the load and the processor send batch frames: at 2,000
# commands/s the events topic grows by a few hundred messages a second.
HIGH, LOW, REFRESH_S, RATE = 300, 75, 0.1, 2_000


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def test_a_stalled_projection_holds_publishers_back_until_it_catches_up(
    settings: Settings, stack: LocalStack, unique: Callable[[str], str]
) -> None:
    tight = settings.model_copy(
        update={
            "backpressure_high_water": HIGH,
            "backpressure_low_water": LOW,
            "backpressure_refresh_s": REFRESH_S,
        }
    )
    publisher = Publisher(tight)
    probe = LagProbe(settings)
    projection = stack.worker("projection", 1).pid()
    assert projection is not None
    profile = LoadProfile(orders=12_000, rate=RATE, skus=50, sku_prefix=unique("BP") + "-", seed=5)
    try:
        for sku in profile.sku_names():
            publisher.send(restock(sku, 1_000_000))
        publisher.flush(30)
        models = ReadModels(redis.Redis.from_url(settings.redis_url))
        wait_for("the workers to be up", lambda: all(models.stock(s) for s in profile.sku_names()), 60)
        memory_before = rss_mb(projection)
        os.kill(projection, signal.SIGSTOP)  # the read models stop moving, as if Redis hung
        stalled_at = time.monotonic()
        done: list[LoadReport] = []
        sender = threading.Thread(target=lambda: done.append(run_load(publisher, profile)))
        sender.start()
        # (seconds since the stall, processor lag, projection lag), in messages
        samples: list[tuple[float, int, int]] = []
        while time.monotonic() - stalled_at < 6:
            samples.append((time.monotonic() - stalled_at, *(g.total for g in probe.read())))  # type: ignore[arg-type]
            time.sleep(0.25)

        # A caller that cannot wait is refused, and told why and when to retry.
        with pytest.raises(Overloaded) as refused:
            publisher.send(place_order(profile.sku_names()[0], 1), wait_s=0)
        assert refused.value.lag > LOW and refused.value.retry_after_ms > 0  # held until below LOW
    finally:
        os.kill(projection, signal.SIGCONT)
    resumed_at = time.monotonic()
    while sender.is_alive() and time.monotonic() - resumed_at < 120:
        samples.append((time.monotonic() - stalled_at, *(g.total for g in probe.read())))  # type: ignore[arg-type]
        time.sleep(0.25)
    sender.join(1)
    print(
        "\nseconds after the stall -> processor lag / projection lag: "
        + ", ".join(f"{t:.1f}s {p}/{q}" for t, p, q in samples[::4])
    )
    assert done and done[0].acknowledged == profile.orders, done and done[0].errors
    # Publishers were slowed, not failed: they waited while the projection was stalled.
    assert done[0].held_back_s > 2, done[0]
    # Lag stays under the high-water mark plus what the publisher sends in one lag refresh
    # (and the processor's commit interval, 0.5 s, which delays what the lag shows).
    peak = max(max(lags) for _, *lags in samples)
    assert peak <= HIGH + RATE * (REFRESH_S + 1), samples
    # While the projection is stalled, its lag goes up to the marks and then stays flat: the
    # publisher is held back instead of filling the log.
    stalled = [projection_lag for t, _, projection_lag in samples if 3 <= t < 6]
    assert min(stalled) > LOW and max(stalled) - min(stalled) <= RATE * REFRESH_S, samples
    memory_after = rss_mb(projection)
    print(f"projection worker RSS: {memory_before:.0f} MB before the stall, {memory_after:.0f} MB after")
    assert memory_after < memory_before + 100
    wait_for("the lag to drain", lambda: max(g.total for g in probe.read()) < LOW, 60)
    publisher.close()
    probe.close()
    report = quiet_verify(settings)
    assert report.problems == []


def test_a_slow_redis_pauses_the_projection_which_stays_in_the_group(
    settings: Settings, stack: LocalStack, unique: Callable[[str], str]
) -> None:
    def projection_metrics() -> str:
        url = next(url for name, url in endpoints(settings).items() if name.startswith("projection-"))
        body: bytes = urllib.request.urlopen(url, timeout=10).read()
        return body.decode()

    def paused() -> float:
        line = next(
            x for x in projection_metrics().splitlines() if x.startswith("stockflow_paused_partitions ")
        )
        return float(line.split()[1])

    probe = LagProbe(settings)
    publisher = Publisher(settings)
    sku = unique("SLOW")
    publisher.publish(restock(sku, 1_000))
    try:
        # Redis holds every write (scripts included) for 5 s; reads still answer.
        redis.Redis.from_url(settings.redis_url).client_pause(5000, all=False)
        for _ in range(200):
            publisher.send(place_order(sku, 1))
        publisher.flush(30)
        wait_for("the projection to pause its partitions", lambda: paused() > 0, 5)
        held = probe.assignments()[settings.projection_group]
        assert len(held) == settings.partitions  # still in the group, holding its partitions
        wait_for("the projection to resume", lambda: paused() == 0, 30)
    finally:
        publisher.close()
        probe.close()
    log = stack.worker("projection", 1).log_file.read_text()
    assert "Redis is behind" in log and "Redis caught up: resuming" in log
    assert quiet_verify(settings).problems == []
