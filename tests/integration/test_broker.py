"""The broker the local stack starts, and the topics stockflow creates, run with the settings
stockflow writes for them.

Kafka only warns about a setting it does not know, so a misspelt one would go unnoticed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from confluent_kafka.admin import ConfigResource, ConfigSource, ResourceType  # type: ignore[attr-defined]

from stockflow.settings import Settings
from stockflow.stack import LocalStack, settings_env
from stockflow.topics import admin_client, changelog_topic
from tests.conftest import REPO, free_port

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


def test_a_first_publish_on_a_fresh_broker_prints_no_client_retries(
    tmp_path: Path, docker_mode: bool
) -> None:
    """A fresh broker answers the first producer that asks for an id "coordinator load in
    progress" while it gets its ids from its controller, and librdkafka printed a retry line
    ("Failed to acquire idempotence PID") over the user's first publish. `stack up` returns
    once the broker hands ids out (the test failed before it waited: one line each run)."""
    if docker_mode:
        pytest.skip("needs a broker of its own, which only the local stack starts")
    fresh = Settings(
        kafka_port=free_port(),
        kafka_controller_port=free_port(),
        redis_port=free_port(),
        run_dir=tmp_path,
        cache_dir=REPO / ".stockflow" / "cache",
        partitions=1,
    )
    stack = LocalStack(fresh, say=lambda _m: None)
    try:
        stack.up()
        result = subprocess.run(
            [sys.executable, "-m", "stockflow", "publish", "restock", "SKU-1", "1"],
            env=settings_env(fresh),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        stack.down()
    assert result.returncode == 0, result.stderr
    assert "rdkafka" not in result.stderr, result.stderr
