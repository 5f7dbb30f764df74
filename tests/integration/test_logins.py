"""Stacks that want logins: a broker that takes TLS connections only, with and without SASL
logins (PLAIN), one that takes SCRAM logins without TLS, and with SASL a Redis that wants a
password. Every client, Faust's included, must connect that way."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest
import redis

from producers.commands import place_order, restock
from producers.publisher import Publisher, PublishError
from projections.queries import ReadModels
from stockflow.settings import Settings
from stockflow.stack import LocalStack, settings_env
from stockflow.verify import Report, verify
from tests.conftest import REPO, free_port, pipeline_stack
from tests.pipeline import wait_for

pytestmark = pytest.mark.integration

REDIS_PASSWORD = "redis-" + uuid.uuid4().hex


@pytest.fixture(
    scope="module",
    params=[("SSL", "PLAIN"), ("SASL_SSL", "PLAIN"), ("SASL_PLAINTEXT", "SCRAM-SHA-512")],
    ids=["SSL", "SASL_SSL-PLAIN", "SASL_PLAINTEXT-SCRAM"],
)
def secured(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, docker_mode: bool
) -> Iterator[Settings]:
    """A broker of its own on TLS (a certificate of the stack's own CA) with SASL (PLAIN) or
    without, or with SCRAM logins and no TLS; Redis (with SASL, wanting a password), a
    processor and a projection worker, all connecting with these settings; stopped at the end."""
    protocol, mechanism = request.param
    if docker_mode:
        pytest.skip("needs a broker of its own, which only the local stack starts")
    run_dir = tmp_path_factory.mktemp("tls-stack")
    redis_port = free_port()
    login = {
        "kafka_sasl_username": "stockflow-test",
        "kafka_sasl_password": uuid.uuid4().hex,
        "redis_url": f"redis://:{REDIS_PASSWORD}@127.0.0.1:{redis_port}/0",
    }
    fields = {
        "kafka_port": free_port(),
        "kafka_controller_port": free_port(),
        "redis_port": redis_port,
        "run_dir": run_dir,
        "cache_dir": REPO / ".stockflow" / "cache",
        "partitions": 2,
        "kafka_security_protocol": protocol,
        "kafka_sasl_mechanism": mechanism,
        **(login if protocol.startswith("SASL") else {}),
    }
    if protocol.endswith("SSL"):
        ca_file = LocalStack(Settings.model_validate(fields)).tls_ca_file  # made when the broker starts
        fields["kafka_ssl_ca_file"] = str(ca_file)
    mine = Settings.model_validate(fields)
    with pipeline_stack(mine):
        yield mine


def test_commands_are_decided_and_projected_through_a_broker_that_wants_tls(secured: Settings) -> None:
    publisher = Publisher(secured)
    try:
        publisher.publish(restock("SKU-1", 5))
        order = place_order("SKU-1", 2)
        publisher.publish(order)
    finally:
        publisher.close()
    models = ReadModels(redis.Redis.from_url(secured.redis_url))
    line = wait_for("the order in Redis", lambda: models.order(order.order_id).get("SKU-1"), 120)
    assert line["status"] == "processed"

    # The processor (Faust's clients), the projection and verify's readers all connected.
    def checked() -> Report | None:
        report = verify(secured)
        return report if report.decisions == 2 and not report.behind else None

    assert wait_for("verify to see both decisions everywhere", checked).problems == []


def test_a_client_connecting_the_wrong_way_is_told_which_settings_to_check(secured: Settings) -> None:
    wrong_ways = [({"kafka_security_protocol": "PLAINTEXT"}, "STOCKFLOW_KAFKA_SECURITY_PROTOCOL (PLAINTEXT)")]
    if secured.kafka_tls:  # a CA that did not sign the broker's certificate
        wrong_ways.append(({"kafka_ssl_ca_file": ""}, "STOCKFLOW_KAFKA_SSL_CA_FILE (empty: the system CAs)"))
    if secured.kafka_sasl:
        wrong_ways.append(({"kafka_sasl_password": "wrong"}, "_SASL_PASSWORD"))
    for change, named in wrong_ways:
        publisher = Publisher(secured.model_copy(update={**change, "backpressure_high_water": 0}))
        try:
            with pytest.raises(PublishError, match="does it take this client's login") as error:
                publisher.check_broker(timeout_s=2.0)
        finally:
            publisher.close()
        assert named in str(error.value)


def test_a_reader_with_the_wrong_redis_password_is_told_so_without_the_password(secured: Settings) -> None:
    # Both stacks run it: with no password wanted, any password is refused too.
    wrong = secured.model_copy(update={"redis_url": f"redis://:not-it@127.0.0.1:{secured.redis_port}/0"})
    result = subprocess.run(
        [sys.executable, "-m", "stockflow", "query", "top"],
        env=settings_env(wrong) | {"COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert f"cannot reach Redis at redis://:***@127.0.0.1:{secured.redis_port}/0" in result.stderr
    assert "not-it" not in result.stderr
