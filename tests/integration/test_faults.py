"""Faults injected into real processes under load; `verify` must pass afterwards."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

import pytest

from producers.commands import restock
from producers.load import LoadProfile, LoadReport, run_load
from producers.publisher import Publisher
from stockflow.settings import Settings
from stockflow.stack import LocalStack
from stockflow.verify import Report, verify
from tests.pipeline import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.fault]


def quiet_verify(settings: Settings, timeout_s: float = 180.0) -> Report:
    """Verify once the read models have caught up with the log."""

    def caught_up() -> Report | None:
        report = verify(settings)
        return None if report.behind or report.lost else report

    try:
        return wait_for("the read models to catch up with the event log", caught_up, timeout_s)
    except AssertionError:
        report = verify(settings)
        raise AssertionError(f"{report.summary()}\n{report.problems[:20]}\n{report.behind[:5]}") from None


def test_verify_passes_on_a_healthy_pipeline(settings: Settings, stack: LocalStack) -> None:
    publisher = Publisher(settings)
    publisher.publish(restock("VERIFY-1", 3))
    report = quiet_verify(settings)
    assert report.problems == []
    assert report.commands >= 1
    assert report.decisions >= report.commands - report.dead_letters


def test_a_processor_killed_mid_load_loses_and_doubles_nothing(
    settings: Settings, stack: LocalStack, unique: Callable[[str], str]
) -> None:
    publisher = Publisher(settings)
    prefix = unique("KILL") + "-"
    profile = LoadProfile(orders=20_000, skus=200, hot_skus=10, sku_prefix=prefix, seed=7)
    for sku in profile.sku_names():
        publisher.send(restock(sku, 150))
    assert publisher.flush(30) == 0

    done: list[LoadReport] = []
    sender = threading.Thread(target=lambda: done.append(run_load(publisher, profile)))
    sender.start()
    processor = stack.worker("processor", 1)
    wait_for("some decisions", lambda: verify(settings).decisions > 2_000, timeout_s=120)
    pid = processor.pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    wait_for("the killed processor to be gone", lambda: not processor.running(), timeout_s=10)
    stack.start_workers("processor", 1)
    sender.join(120)
    assert done and done[0].acknowledged == 20_000

    report = quiet_verify(settings, timeout_s=300)
    recovered_s = time.monotonic() - killed_at
    print(f"processor SIGKILL: recovered in {recovered_s:.1f}s, {report.summary()}")
    assert report.problems == []
