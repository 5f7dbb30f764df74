"""Fixtures shared by the integration and end-to-end tests.

The session starts its own stack on free ports under a temporary folder, so a developer's
running stack is never touched, and stops it even when tests fail. With a Docker engine
answering (and STOCKFLOW_TEST_STACK unset or "docker"), Kafka and Redis come from
testcontainers instead; the workers always run as real subprocesses.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis

from stockflow.settings import Settings
from stockflow.stack import LocalStack
from stockflow.topics import ensure_topics

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _docker_answers() -> bool:
    if os.environ.get("STOCKFLOW_TEST_STACK", "") == "local":
        return False
    try:
        import docker

        docker.from_env(timeout=2).ping()
    except Exception:  # no engine, no socket, no permission: use the local stack
        return False
    return True


@pytest.fixture(scope="session")
def docker_mode() -> bool:
    return _docker_answers()


@pytest.fixture(scope="session")
def settings(tmp_path_factory: pytest.TempPathFactory, docker_mode: bool) -> Iterator[Settings]:
    """Settings of a stack that belongs to this test session alone."""
    run_dir = tmp_path_factory.mktemp("stack")
    common: dict[str, Any] = {
        "partitions": 4,
        "run_dir": run_dir,
        "cache_dir": REPO / ".stockflow" / "cache",  # the jar cache is shared with `make demo`
        "processor_group": f"test-processor-{uuid.uuid4().hex[:6]}",
    }
    if docker_mode:
        from testcontainers.kafka import KafkaContainer
        from testcontainers.redis import RedisContainer

        with KafkaContainer().with_kraft() as kafka, RedisContainer() as redis_container:
            host = redis_container.get_container_host_ip()
            port = redis_container.get_exposed_port(6379)
            yield Settings(
                bootstrap_servers=kafka.get_bootstrap_server(),
                redis_url=f"redis://{host}:{port}/0",
                **common,
            )
        return
    yield Settings(
        kafka_port=free_port(),
        kafka_controller_port=free_port(),
        redis_port=free_port(),
        **common,
    )


@contextmanager
def pipeline_stack(settings: Settings, docker_mode: bool = False) -> Iterator[LocalStack]:
    """Kafka, Redis, topics, one processor and one projection worker; all stopped on leaving,
    however the block ends."""
    local = LocalStack(settings, say=lambda _msg: None)
    try:
        if docker_mode:  # containers run Kafka and Redis: only the topics are ours to create
            ensure_topics(settings)
        else:
            local.up()
        local.start_workers("processor", 1)
        local.start_workers("projection", 1)
        yield local
    finally:
        local.down()


@pytest.fixture(scope="session")
def stack(settings: Settings, docker_mode: bool) -> Iterator[LocalStack]:
    with pipeline_stack(settings, docker_mode) as local:
        yield local


@pytest.fixture
def redis_client(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.redis_url)


@pytest.fixture
def unique() -> Callable[[str], str]:
    """Names no other test uses, so tests sharing the stack never see each other's data."""
    run = uuid.uuid4().hex[:8]
    return lambda name: f"{name}-{run}"
