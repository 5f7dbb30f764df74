"""docker-compose.yml says the same things as the settings and the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.main import get_command

from stockflow.cli import app
from stockflow.settings import Settings

COMPOSE = yaml.safe_load((Path(__file__).parents[2] / "docker-compose.yml").read_text())
WORKERS = ("processor", "projection")
SERVICES = (*WORKERS, "api")  # every service that runs stockflow


def env_of(service: str) -> dict[str, str]:
    env: dict[str, Any] = COMPOSE["services"][service].get("environment", {})
    return {k: str(v) for k, v in env.items()}


@pytest.mark.parametrize("service", SERVICES)
def test_every_stockflow_variable_is_a_setting(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fields = {f"STOCKFLOW_{name.upper()}" for name in Settings.model_fields}
    env = env_of(service)
    unknown = {k for k in env if k.startswith("STOCKFLOW_")} - fields
    assert not unknown, f"{service} sets variables Settings does not read: {unknown}"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    Settings()  # and the values are valid


def test_workers_reach_the_compose_services() -> None:
    kafka = COMPOSE["services"]["kafka"]["environment"]
    for service in SERVICES:
        env = env_of(service)
        assert f"PLAINTEXT://{env['STOCKFLOW_BOOTSTRAP_SERVERS']}" in kafka["KAFKA_ADVERTISED_LISTENERS"]
        assert env["STOCKFLOW_REDIS_URL"].startswith("redis://redis:")
        assert env["STOCKFLOW_PARTITIONS"] == kafka["KAFKA_NUM_PARTITIONS"]
        assert env["STOCKFLOW_PARTITIONS"] == str(Settings.model_fields["partitions"].default)


@pytest.mark.parametrize("service", WORKERS)
def test_worker_commands_exist_in_the_cli(service: str) -> None:
    argv = COMPOSE["services"][service]["command"]
    assert argv[:2] == ["stockflow", "worker"]
    group = get_command(app).commands["worker"]  # type: ignore[attr-defined]
    assert argv[2] in group.commands


def test_the_api_service_runs_the_api_command_on_its_published_port() -> None:
    api = COMPOSE["services"]["api"]
    assert api["command"] == ["stockflow", "api"]
    assert "api" in get_command(app).commands  # type: ignore[attr-defined]
    port = str(Settings.model_fields["api_port"].default)
    assert env_of("api")["STOCKFLOW_API_HOST"] == "0.0.0.0"  # reachable from outside the container
    assert f"{port}:{port}" in api["ports"]


def test_the_broker_image_matches_the_local_stack_version() -> None:
    image = COMPOSE["services"]["kafka"]["image"]
    assert image == f"apache/kafka:{Settings.model_fields['kafka_version'].default}"
