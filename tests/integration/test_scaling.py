"""Two workers of each kind share the partitions; when one of each dies, the others take over."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from functools import partial

import pytest

from producers.commands import place_order, restock
from producers.load import LoadProfile, LoadReport, run_load
from producers.publisher import Publisher
from stockflow.lag import LagProbe
from stockflow.settings import Settings
from stockflow.stack import LocalStack
from stockflow.verify import Report, verify
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


def load_under_way(
    settings: Settings, publisher: Publisher, profile: LoadProfile, stock: int, decided: int
) -> tuple[threading.Thread, list[LoadReport]]:
    """Each SKU of ``profile`` stocked with ``stock``, then its orders sent from a thread, paced
    so that a fault lands mid-load (unpaced, the batch frames are all in within a second);
    returns once ``decided`` of them are decided, with the thread and where its report goes."""
    baseline = verify(settings).decisions
    for sku in profile.sku_names():
        publisher.send(restock(sku, stock))
    assert publisher.flush(30) == 0
    done: list[LoadReport] = []
    sender = threading.Thread(target=lambda: done.append(run_load(publisher, profile)))
    sender.start()
    wait_for(
        f"{decided:,} decisions of this load", lambda: verify(settings).decisions > baseline + decided, 120
    )
    return sender, done


def load_finished(
    settings: Settings, sender: threading.Thread, done: list[LoadReport], orders: int
) -> Report:
    """Once the load thread of ``load_under_way`` ends with every order acknowledged: what
    `verify` finds when nothing is behind."""
    sender.join(300)
    assert done and done[0].acknowledged == orders, done and done[0].errors
    return quiet_verify(settings, timeout_s=300)


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

        profile = LoadProfile(orders=20_000, rate=2_000, skus=200, sku_prefix=unique("SCALE") + "-", seed=11)
        sender, done = load_under_way(settings, publisher, profile, stock=150, decided=2_000)

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
        report = load_finished(settings, sender, done, profile.orders)
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


def held_by(probe: LagProbe, settings: Settings, members: int, group: str | None = None) -> bool:
    """True once exactly ``members`` workers of ``group`` (the processors' by default) hold all
    its partitions between them."""
    held = probe.assignments().get(group or settings.processor_group, {})
    return len(held) == settings.partitions and len(set(held.values())) == members


def test_a_processor_paused_past_its_session_saves_nothing_over_the_worker_that_replaced_it(
    settings: Settings, stack: LocalStack, unique: Callable[[str], str]
) -> None:
    """A worker stopped mid-load (SIGSTOP: a frozen VM or a network partition looks the same to
    the group) for longer than its session is replaced; when it runs again, the batch it was
    deciding must not be saved over what its replacement saved. The damage shows only when a
    later worker restores the table, so the replacement is then killed and the paused one takes
    everything over from the changelog, and decides more on it."""
    probe = LagProbe(settings)
    publisher = Publisher(settings)
    paused = stack.worker("processor", 1)
    pid = paused.pid()
    assert pid is not None, "processor-1 is not running"
    log_start = paused.log_file.stat().st_size
    try:
        stack.start_workers("processor", 2)
        wait_for("two processors to share the partitions", lambda: held_by(probe, settings, 2), 90)
        baseline = verify(settings).decisions
        profile = LoadProfile(orders=10_000, rate=2_000, skus=200, sku_prefix=unique("PAUSE") + "-", seed=5)
        sender, done = load_under_way(settings, publisher, profile, stock=100, decided=1_000)
        os.kill(pid, signal.SIGSTOP)
        sender.join(120)
        assert done and done[0].acknowledged == 10_000, done and done[0].errors
        wait_for("processor-2 to hold every partition", lambda: held_by(probe, settings, 1), 120)
        expected = baseline + len(profile.sku_names()) + profile.orders
        wait_for("processor-2 to decide the whole load", lambda: verify(settings).decisions >= expected, 120)
        os.kill(pid, signal.SIGCONT)
        wait_for("processor-1 to rejoin", lambda: held_by(probe, settings, 2), 120)
        # A few SKUs change, so each partition's handled offset moves on while most SKU rows
        # stay as processor-2 saved them: an older row saved after them would stay last.
        for sku in profile.sku_names()[:20]:
            publisher.send(restock(sku, 1))
        assert publisher.flush(30) == 0
        quiet_verify(settings)
        replacement = stack.worker("processor", 2).pid()
        assert replacement is not None, "processor-2 is not running"
        os.kill(replacement, signal.SIGKILL)
        wait_for("processor-1 to hold every partition", lambda: held_by(probe, settings, 1), 120)
        for sku in profile.sku_names():  # decided on the table processor-1 restored
            publisher.send(place_order(sku, 1))
        assert publisher.flush(30) == 0
        report = quiet_verify(settings, timeout_s=300)
        refused = paused.log_file.read_bytes()[log_start:].count(b"is not saved")
        print(f"\nbatches the paused worker did not save: {refused}; {report.summary()}")
        assert report.problems == []
    finally:
        os.kill(pid, signal.SIGCONT)  # the stack's own processor-1, whatever failed above
        stack.worker("processor", 2).stop()
        publisher.close()
        probe.close()


def test_scaling_down_under_load_hands_the_partitions_over_at_once_and_loses_nothing(
    settings: Settings, stack: LocalStack, unique: Callable[[str], str]
) -> None:
    """`stockflow stack scale` to fewer workers stops the extra ones by SIGTERM: each finishes
    its batch and leaves its group, so the rest hold every partition well before a session
    timeout, which is what a killed worker's partitions wait for."""
    probe = LagProbe(settings)
    publisher = Publisher(settings)
    own = {kind: stack.worker(kind, 1).pid() for kind in ("processor", "projection")}
    groups = {"processor": settings.processor_group, "projection": settings.projection_group}
    session_s = {
        "processor": settings.processor_session_timeout_s,
        "projection": settings.projection_session_timeout_s,
    }
    try:
        for kind in groups:
            stack.scale_workers(kind, 2)
        wait_for(
            "both groups to spread their partitions over two workers",
            lambda: spread_over(probe, 2, settings.partitions),
            90,
        )
        profile = LoadProfile(orders=10_000, rate=2_000, skus=200, sku_prefix=unique("SHRINK") + "-", seed=13)
        sender, done = load_under_way(settings, publisher, profile, stock=100, decided=1_000)

        handed_over: dict[str, float] = {}  # kind -> seconds from its worker's exit to one holder
        for kind, group in groups.items():
            stack.scale_workers(kind, 1)
            stopped_at = time.monotonic()
            assert set(stack.running_workers(kind)) == {1}, f"{kind}-2 still runs"
            wait_for(f"one {kind} to hold every partition", partial(held_by, probe, settings, 1, group), 60)
            handed_over[kind] = time.monotonic() - stopped_at
        report = load_finished(settings, sender, done, profile.orders)
        took = ", ".join(f"{kind} {seconds:.1f}s" for kind, seconds in handed_over.items())
        print(f"\nscaled to one of each under load; partitions handed over after: {took}; {report.summary()}")
        assert report.problems == []
        for kind, seconds in handed_over.items():
            assert seconds < session_s[kind], f"{kind}: its partitions waited out the session timeout"
        # The stack's own workers were left running, the same processes.
        assert {kind: stack.worker(kind, 1).pid() for kind in groups} == own
    finally:
        for kind in groups:
            stack.scale_workers(kind, 1)
        publisher.close()
        probe.close()
