"""Two workers of each kind share the partitions; when one of each dies, the others take over."""

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
from stockflow.lag import LagProbe
from stockflow.settings import Settings
from stockflow.stack import LocalStack
from stockflow.verify import verify
from tests.integration.test_faults import quiet_verify
from tests.pipeline import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.fault]


def spread_over(probe: LagProbe, workers: int, partitions: int) -> dict[str, set[str]] | None:
    """Per group, the members holding partitions, once every group has all its partitions
    held by exactly ``workers`` members; None before that."""
    assignments = probe.assignments()
    members = {group: set(held.values()) for group, held in assignments.items()}
    settled = all(len(held) == partitions for held in assignments.values())
    return members if settled and all(len(m) == workers for m in members.values()) else None


def test_two_workers_of_each_kind_share_the_partitions_and_survive_losing_one(
    settings: Settings, stack: LocalStack, unique: Callable[[str], str]
) -> None:
    probe = LagProbe(settings)
    publisher = Publisher(settings)
    try:
        stack.start_workers("processor", 2)
        stack.start_workers("projection", 2)
        spread = wait_for(
            "both groups to spread their partitions over two workers",
            lambda: spread_over(probe, 2, settings.partitions),
            90,
        )
        print(f"\npartitions spread over: {spread}")

        baseline = verify(settings).decisions
        # Paced, so the kills land mid-load: unpaced, the batch frames are all in within a second.
        profile = LoadProfile(orders=20_000, rate=2_000, skus=200, sku_prefix=unique("SCALE") + "-", seed=11)
        for sku in profile.sku_names():
            publisher.send(restock(sku, 150))
        assert publisher.flush(30) == 0
        done: list[LoadReport] = []
        sender = threading.Thread(target=lambda: done.append(run_load(publisher, profile)))
        sender.start()
        wait_for("2,000 decisions of this load", lambda: verify(settings).decisions > baseline + 2_000, 120)

        for kind in ("processor", "projection"):
            pid = stack.worker(kind, 2).pid()
            assert pid is not None, f"{kind}-2 is not running"
            os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        taken_over: dict[str, float] = {}  # group -> seconds until one worker held it all
        while len(taken_over) < 2:
            assert time.monotonic() - killed_at < 120, f"no takeover within 120s: {probe.assignments()}"
            for group, held in probe.assignments().items():
                if (
                    group not in taken_over
                    and len(held) == settings.partitions
                    and len(set(held.values())) == 1
                ):
                    taken_over[group] = time.monotonic() - killed_at
            time.sleep(0.2)
        sender.join(300)
        assert done and done[0].acknowledged == 20_000, done and done[0].errors
        report = quiet_verify(settings, timeout_s=300)
        took = ", ".join(f"{group} {seconds:.1f}s" for group, seconds in taken_over.items())
        print(f"one of each killed; survivors held every partition after: {took}; {report.summary()}")
        assert report.problems == []
    finally:
        # The second workers are this test's: stopped (if a failure left them running) and
        # forgotten, so later tests see the stack they expect, one worker of each kind.
        for kind in ("processor", "projection"):
            stack.worker(kind, 2).stop()
        publisher.close()  # librdkafka clients left open can hang the interpreter's exit
        probe.close()
