"""How the login settings become each client's configuration, and stay out of messages."""

from __future__ import annotations

from pathlib import Path

import faust
import pytest
from pydantic import ValidationError

from processors.app import broker_credentials
from stockflow.cli import settings_problems
from stockflow.errors import StackError
from stockflow.settings import Settings
from stockflow.stack import LocalStack

SASL = {"kafka_sasl_username": "app", "kafka_sasl_password": "hunter2"}


def test_plaintext_clients_get_the_servers_and_nothing_to_log_in_with() -> None:
    settings = Settings(bootstrap_servers="k1:9092,k2:9092")
    assert settings.kafka_config() == {
        "bootstrap.servers": "k1:9092,k2:9092",
        "security.protocol": "PLAINTEXT",
    }
    assert broker_credentials(settings) is None
    assert "SASL" not in settings.kafka_settings()


def test_sasl_over_tls_gives_every_client_the_login_and_the_ca() -> None:
    settings = Settings.model_validate(
        {"kafka_security_protocol": "SASL_SSL", "kafka_sasl_mechanism": "SCRAM-SHA-512", **SASL}
    )
    assert settings.kafka_config() | {"bootstrap.servers": ""} == {
        "bootstrap.servers": "",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "app",
        "sasl.password": "hunter2",
    }
    credentials = broker_credentials(settings)
    assert isinstance(credentials, faust.SASLCredentials)
    assert (credentials.username, credentials.password) == ("app", "hunter2")
    assert (credentials.protocol.value, credentials.mechanism.value) == ("SASL_SSL", "SCRAM-SHA-512")
    assert credentials.ssl_context is not None
    assert settings.kafka_settings().endswith(
        "_SASL_PASSWORD and STOCKFLOW_KAFKA_SSL_CA_FILE (empty: the system CAs)"
    )


def test_tls_alone_trusts_the_ca_file_given(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    settings = Settings(kafka_security_protocol="SSL", kafka_ssl_ca_file=str(ca))
    assert settings.kafka_config()["ssl.ca.location"] == str(ca)
    with pytest.raises(FileNotFoundError):  # Faust's context loads the CA file: it must exist
        broker_credentials(settings)


def test_sasl_without_a_user_and_password_is_refused_naming_both_and_quoting_no_value() -> None:
    with pytest.raises(ValidationError) as error:
        Settings(kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_password="hunter2")
    problems = settings_problems(error.value)
    assert "STOCKFLOW_KAFKA_SASL_USERNAME and STOCKFLOW_KAFKA_SASL_PASSWORD" in problems
    assert "hunter2" not in problems
    with pytest.raises(ValidationError) as error:
        Settings.model_validate({"kafka_security_protocol": "TLS", "partitions": 0})
    assert settings_problems(error.value).splitlines() == [
        "STOCKFLOW_KAFKA_SECURITY_PROTOCOL: Input should be"
        " 'PLAINTEXT', 'SSL', 'SASL_PLAINTEXT' or 'SASL_SSL'",
        "STOCKFLOW_PARTITIONS: Input should be greater than or equal to 1",
    ]


def test_the_local_broker_takes_the_settings_login_when_asked(tmp_path: Path) -> None:
    # A mechanism matters only with SASL: the default local stack takes any.
    plain_settings = Settings.model_validate({"kafka_sasl_mechanism": "SCRAM-SHA-256"})
    plain = LocalStack(plain_settings, say=lambda _msg: None)._server_properties(tmp_path)
    assert "listeners=PLAINTEXT://" in plain and "sasl" not in plain
    secured = Settings.model_validate({"kafka_security_protocol": "SASL_PLAINTEXT", **SASL})
    properties = LocalStack(secured, say=lambda _msg: None)._server_properties(tmp_path)
    assert f"listeners=SASL_PLAINTEXT://127.0.0.1:{secured.kafka_port},CONTROLLER://" in properties
    assert 'username="app" password="hunter2" user_app="hunter2";' in properties
    # SCRAM logins too, checked against credentials the stack stores once the broker is up
    assert "sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-256,SCRAM-SHA-512" in properties


@pytest.mark.parametrize(
    ("login", "named"),
    [
        ({"kafka_security_protocol": "SSL"}, "STOCKFLOW_KAFKA_SSL_CA_FILE=.*tls/ca.pem: set it"),
        ({"kafka_security_protocol": "SASL_PLAINTEXT", **SASL, "kafka_sasl_password": 'a"b'}, "_PASSWORD"),
    ],
)
def test_a_login_the_local_broker_cannot_serve_is_refused_naming_the_setting(
    tmp_path: Path, login: dict[str, str], named: str
) -> None:
    with pytest.raises(StackError, match=named):
        LocalStack(Settings.model_validate(login), say=lambda _msg: None)._server_properties(tmp_path)


def test_a_redis_password_is_left_out_of_messages() -> None:
    shown = Settings(redis_url="rediss://app:s3cret@cache.example:6380/2").redis_url_without_password()
    assert shown == "rediss://app:***@cache.example:6380/2"
    assert Settings(redis_url="redis://:s3cret@h/0").redis_url_without_password() == "redis://:***@h/0"
    assert Settings(redis_url="redis://h:6379/0").redis_url_without_password() == "redis://h:6379/0"


def test_the_api_takes_several_tokens_separated_by_commas_and_refuses_one_it_could_not_be_sent() -> None:
    assert Settings().api_tokens == []
    assert Settings(api_token="new-one, old-one").api_tokens == ["new-one", "old-one"]
    for bad in ("new-one,,old-one", "a token", "tab\there"):
        with pytest.raises(ValidationError) as refused:
            Settings(api_token=bad)
        message = settings_problems(refused.value)
        assert message.startswith("STOCKFLOW_API_TOKEN holds an empty token, or one with a space")
        assert bad not in message  # a token is a secret: not quoted back
