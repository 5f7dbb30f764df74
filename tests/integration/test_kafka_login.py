"""A stack whose broker takes SASL logins only: every client, Faust's included, must log in."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from producers.commands import place_order, restock
from producers.publisher import Publisher, PublishError
from projections.queries import ReadModels
from stockflow.settings import Settings
from stockflow.verify import Report, verify
from tests.conftest import REPO, free_port, pipeline_stack
from tests.pipeline import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory, docker_mode: bool) -> Iterator[Settings]:
    """A broker of its own on SASL_PLAINTEXT (PLAIN), Redis, a processor and a projection
    worker, all logging in with these settings; stopped at the end."""
    if docker_mode:
        pytest.skip("needs a broker of its own, which only the local stack starts")
    mine = Settings(
        kafka_port=free_port(),
        kafka_controller_port=free_port(),
        redis_port=free_port(),
        run_dir=tmp_path_factory.mktemp("sasl-stack"),
        cache_dir=REPO / ".stockflow" / "cache",
        partitions=2,
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_username="stockflow-test",
        kafka_sasl_password=uuid.uuid4().hex,
    )
    with pipeline_stack(mine):
        yield mine


def test_commands_are_decided_and_projected_through_a_broker_that_wants_a_login(secured: Settings) -> None:
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

    # The processor (Faust's clients), the projection and verify's readers all logged in.
    def checked() -> Report | None:
        report = verify(secured)
        return report if report.decisions == 2 and not report.behind else None

    assert wait_for("verify to see both decisions everywhere", checked).problems == []


@pytest.mark.parametrize(
    ("login", "named"),
    [
        ({"kafka_sasl_password": "wrong"}, "_SASL_PASSWORD"),
        ({"kafka_security_protocol": "PLAINTEXT"}, "STOCKFLOW_KAFKA_SECURITY_PROTOCOL (PLAINTEXT)"),
    ],
)
def test_a_client_with_the_wrong_login_is_told_which_settings_to_check(
    secured: Settings, login: dict[str, str], named: str
) -> None:
    wrong = secured.model_copy(update={**login, "backpressure_high_water": 0})
    publisher = Publisher(wrong)
    try:
        with pytest.raises(PublishError, match="does it take this client's login") as error:
            publisher.check_broker(timeout_s=2.0)
    finally:
        publisher.close()
    assert named in str(error.value)
