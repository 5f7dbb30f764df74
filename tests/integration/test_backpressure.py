"""Backpressure on the real stack: a stalled projection holds publishers back, then lets go."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

import pytest

from producers.commands import place_order, restock
from producers.publisher import Publisher
from stockflow.lag import LagProbe, Overloaded
from stockflow.settings import Settings
from stockflow.stack import LocalStack
from tests.integration.test_faults import quiet_verify
from tests.pipeline import wait_for

pytestmark = pytest.mark.integration

HIGH, LOW = 2_000, 500


def test_a_stalled_projection_holds_publishers_back_until_it_catches_up(
    settings: Settings, stack: LocalStack, unique: Callable[[str], str]
) -> None:
    tight = Settings(
        **{
            **settings.model_dump(),
            "backpressure_high_water": HIGH,
            "backpressure_low_water": LOW,
            "backpressure_refresh_s": 0.1,
        }
    )
    publisher = Publisher(tight)
    probe = LagProbe(settings)
    sku = unique("BP")
    publisher.publish(restock(sku, 1_000_000))
    projection = stack.worker("projection", 1).pid()
    assert projection is not None
    os.kill(projection, signal.SIGSTOP)  # the read models stop moving, as if Redis hung
    try:
        sent = 0
        with pytest.raises(Overloaded) as refused:
            for _ in range(50_000):
                publisher.send(place_order(sku, 1), wait_s=0)
                sent += 1
        assert refused.value.lag >= HIGH
        assert sent < 50_000
        lag = max(group.total for group in probe.read())
        # Bounded: the publisher stops within one lag refresh of crossing the mark.
        assert HIGH <= lag <= HIGH + 10_000, lag

        # A caller that can wait is held back rather than refused.
        waited: list[float] = []

        def patient_send() -> None:
            started = time.monotonic()
            publisher.publish(place_order(sku, 1), wait_s=120)
            waited.append(time.monotonic() - started)

        waiter = threading.Thread(target=patient_send)
        waiter.start()
        time.sleep(2)
        assert not waited, "sent while the projection was stalled"
    finally:
        os.kill(projection, signal.SIGCONT)
    waiter.join(120)
    assert waited and waited[0] >= 2
    assert publisher.admission is not None and not publisher.admission.closed
    wait_for("the lag to drain", lambda: max(g.total for g in probe.read()) < LOW, 60)
    publisher.close()
    probe.close()
    report = quiet_verify(settings)
    assert report.problems == []
