"""The broker the local stack starts runs with the settings stockflow writes for it.

Kafka only warns about a setting it does not know, so a misspelt one would go unnoticed.
"""

from __future__ import annotations

import pytest
from confluent_kafka.admin import ConfigResource, ResourceType  # type: ignore[attr-defined]

from stockflow.settings import Settings
from stockflow.topics import admin_client


@pytest.mark.usefixtures("stack")
def test_the_broker_takes_the_settings_the_stack_writes(settings: Settings, docker_mode: bool) -> None:
    if docker_mode:
        pytest.skip("the broker is a test container with its own settings, not the local stack's")
    admin = admin_client(settings)  # kept: a freed AdminClient never completes its futures
    broker = ConfigResource(ResourceType.BROKER, "1")
    configs = admin.describe_configs([broker])[broker].result(timeout=30)

    assert configs["auto.create.topics.enable"].value == "false"
    assert configs["group.initial.rebalance.delay.ms"].value == "0"
    assert configs["log.cleaner.dedupe.buffer.size"].value == str(16 * 1024 * 1024)
