"""Whether anything listens at the broker's address, asked without a Kafka client."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from stockflow.errors import StackError
from stockflow.settings import Settings
from stockflow.topics import require_broker


@pytest.fixture
def listening() -> Iterator[int]:
    """A port on which a socket listens (not Kafka: only the connection is asked for)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield int(server.getsockname()[1])


@pytest.fixture
def closed() -> int:
    """A port on which nothing listens."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_listening_server_among_the_bootstrap_servers_is_enough(listening: int, closed: int) -> None:
    require_broker(Settings(bootstrap_servers=f"127.0.0.1:{closed}, PLAINTEXT://localhost:{listening}"))


def test_nothing_listening_is_an_error_naming_the_address_and_the_setting(closed: int) -> None:
    with pytest.raises(StackError) as error:
        require_broker(Settings(bootstrap_servers=f"127.0.0.1:{closed},no-port-here"))
    assert f"127.0.0.1:{closed},no-port-here" in str(error.value)
    assert "STOCKFLOW_BOOTSTRAP_SERVERS" in str(error.value)
    assert "stockflow stack up" in str(error.value)
