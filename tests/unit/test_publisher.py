"""A closed publisher lets go of the broker."""

from __future__ import annotations

import time

import pytest

from producers.publisher import Publisher
from stockflow.settings import Settings

NO_BROKER = "127.0.0.1:1"  # nothing listens on port 1: the client keeps trying, and says so


def test_a_closed_publisher_stops_trying_to_reach_the_broker(capfd: pytest.CaptureFixture[str]) -> None:
    publisher = Publisher(Settings(bootstrap_servers=NO_BROKER))
    publisher.poll(0.5)
    assert "Connection refused" in capfd.readouterr().err

    publisher.close()  # nothing was queued: the flush returns at once
    capfd.readouterr()
    time.sleep(1.0)  # long enough for librdkafka to try again (it backs off from 0.1 s)
    assert "Connection refused" not in capfd.readouterr().err
