"""The broker the local stack starts, and the topics stockflow creates, run with the settings
stockflow writes for them.

Kafka only warns about a setting it does not know, so a misspelt one would go unnoticed.
"""

from __future__ import annotations

import pytest
from confluent_kafka.admin import ConfigResource, ConfigSource, ResourceType  # type: ignore[attr-defined]

from stockflow.settings import Settings
from stockflow.topics import admin_client, changelog_topic

TOPIC_CONFIG = ConfigSource.DYNAMIC_TOPIC_CONFIG.value  # a config set on the topic itself


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


@pytest.mark.usefixtures("stack")
def test_the_topics_carry_the_configs_stockflow_creates_them_with(settings: Settings) -> None:
    admin = admin_client(settings)
    wanted = {
        settings.commands_topic: {"message.timestamp.type": "LogAppendTime"},
        settings.events_topic: {"retention.ms": "-1", "retention.bytes": "-1"},
        changelog_topic(settings, "state"): {"cleanup.policy": "compact", "segment.bytes": "1048576"},
    }
    for topic, configs in wanted.items():
        resource = ConfigResource(ResourceType.TOPIC, topic)
        found = admin.describe_configs([resource])[resource].result(timeout=30)
        # Set on the topic, not taken from the broker (with one broker, 1 is both).
        for name, value in {**configs, "min.insync.replicas": "1"}.items():
            entry = found[name]
            assert (topic, name, entry.value, entry.source) == (topic, name, value, TOPIC_CONFIG)
