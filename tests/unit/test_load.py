"""The load generator's report accounts for every command it sent."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import producers.load
import stockflow.cli
from producers.load import LoadProfile, run_load
from producers.publisher import Publisher
from stockflow.cli import app
from stockflow.settings import Settings

# Nothing listens on port 1: the commands are sent into the client's queue and never answered.
NO_BROKER = "127.0.0.1:1"


@pytest.fixture(autouse=True)
def short_ack_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(producers.load, "ACK_WAIT_S", 0.5)


def test_commands_kafka_never_answered_for_are_counted_as_unanswered() -> None:
    publisher = Publisher(Settings(bootstrap_servers=NO_BROKER, backpressure_high_water=0))
    report = run_load(publisher, LoadProfile(orders=7, skus=3, seed=1))
    assert (report.sent, report.acknowledged, report.failed) == (7, 0, 0)
    assert report.unanswered == 7


def test_the_load_command_says_so_and_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STOCKFLOW_BOOTSTRAP_SERVERS", NO_BROKER)
    monkeypatch.setenv("STOCKFLOW_BACKPRESSURE_HIGH_WATER", "0")
    # As if the broker answered the checks `load` makes first, then went away.
    monkeypatch.setattr(stockflow.cli, "require_broker", lambda _settings: None)
    monkeypatch.setattr(stockflow.cli, "_publisher", Publisher)
    result = CliRunner().invoke(app, ["load", "--orders", "5"])
    said = " ".join(result.output.split())  # as one line, however the console wrapped it
    assert result.exit_code == 1, said
    assert "5 commands sent got no answer from Kafka at 127.0.0.1:1" in said
    assert "STOCKFLOW_BOOTSTRAP_SERVERS" in said
