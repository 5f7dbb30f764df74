"""One typed, frozen settings object, read from ``STOCKFLOW_*`` environment variables.

Built once at an entry point (the CLI) and passed down; nothing below reads ``os.environ``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STOCKFLOW_", frozen=True)

    # Where clients connect. Empty means "the local stack": 127.0.0.1 on the ports below.
    bootstrap_servers: str = ""
    redis_url: str = ""
    # How every Kafka client (publishers, workers, the CLI) connects: PLAINTEXT (the local
    # stack's), SSL, SASL_PLAINTEXT or SASL_SSL. With SASL, the mechanism and the user and
    # password to log in with; with SSL, the CA certificates (PEM) that signed the brokers'
    # (empty: the system's). The local stack's broker serves each of them (SASL with PLAIN, TLS
    # with a certificate of a CA of its own: stockflow.stack).
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    kafka_sasl_username: str = ""
    kafka_sasl_password: str = Field(default="", repr=False)
    kafka_ssl_ca_file: str = ""

    # Topics. Commands and events are co-partitioned: same partition count, key = SKU.
    partitions: int = Field(default=12, ge=1)
    # Copies of each topic stockflow creates, and how many of them must hold a write before the
    # broker acknowledges it to an acks=all producer (every producer here): a write acknowledged
    # by fewer could be lost with the leader. 0 = 2 with 3 or more replicas, else 1.
    replication_factor: int = Field(default=1, ge=1)
    min_insync_replicas: int = Field(default=0, ge=0)
    commands_topic: str = "stockflow.commands"
    events_topic: str = "stockflow.events"
    dlq_topic: str = "stockflow.commands.dlq"
    events_dlq_topic: str = "stockflow.events.dlq"

    # Consumer groups (the processor's group is its Faust app id).
    processor_group: str = "stockflow-processor"
    projection_group: str = "stockflow-projection"

    # How long a processor worker may go silent before the group gives its partitions to the
    # others: after a crash, the survivors (or the restarted worker) wait about this long.
    processor_session_timeout_s: float = Field(default=20.0, ge=6.0)
    # A processor whose stream delivers nothing this long while commands wait restarts itself
    # (see README). Longer than a rebalance: the session timeout plus a few seconds.
    processor_stall_timeout_s: float = Field(default=60.0, gt=0)

    # Publishers: at most this many commands of one partition in one Kafka message (send_many).
    publish_batch_size: int = Field(default=500, ge=1)

    # Processor: commands decided per batch (one broker round trip each), and how long a batch
    # waits to fill (Faust's take_events waits this long every batch). Shorter is not faster:
    # at 10 ms a processor fell behind at 4,000 commands/s, one it keeps up with at 30 ms
    # (docs/benchmarks.md, "The batch wait").
    processor_batch_size: int = Field(default=2000, ge=1)
    processor_batch_wait_s: float = Field(default=0.03, gt=0)
    # A command id seen among this many earlier commands on its partition is a retry and gets no
    # new decision. Memory grows with it (about 200 bytes per id); see README.
    dedupe_window: int = Field(default=50_000, ge=1)
    # An order can be cancelled this long after it was placed, by the broker's append times of
    # the two commands. The processor keeps each order line in memory (about 256 bytes) until
    # the window has passed, so its memory is about the orders of one window; see README.
    cancel_window_s: float = Field(default=86_400.0, ge=1)

    # Projection worker: how long a dead one holds its partitions, events per poll, and how
    # many order ids "recent orders" keeps per SKU.
    projection_session_timeout_s: float = Field(default=10.0, ge=6.0)
    # A Redis write taking longer than this pauses fetching until it is done (Redis is behind).
    projection_pause_after_s: float = Field(default=1.0, gt=0)
    projection_batch_size: int = Field(default=2000, ge=1)
    recent_orders_per_sku: int = Field(default=20, ge=1)
    # An order's read model (its status per line) expires this long after the decision that
    # placed it, or its cancel, by the decision's time, so a rebuild keeps the same orders; 0
    # keeps every order for good (about 380 bytes of Redis memory each; see README).
    order_retention_s: float = Field(default=0.0, ge=0)

    # Backpressure: publishers hold commands back once the processor or projection group is
    # this many messages behind, until it is below the low-water mark again; a caller that
    # cannot wait gets Overloaded with a retry-after. High-water 0 turns it off.
    backpressure_high_water: int = Field(default=100_000, ge=0)
    backpressure_low_water: int = Field(default=20_000, ge=0)
    backpressure_refresh_s: float = Field(default=0.5, gt=0)  # how stale the lag may be
    backpressure_max_wait_s: float = Field(default=30.0, ge=0)

    # Where `stockflow api` serves the HTTP API, and the token every request but GET /health
    # must carry (`Authorization: Bearer <token>`); empty = none asked for. Several, separated
    # by commas, are each accepted: a new token is added, clients move to it, the old one goes.
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8080, ge=1, le=65535)
    api_token: str = Field(default="", repr=False)

    # Each worker serves Prometheus metrics here; port 0 takes a free port (see stockflow status).
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=0, ge=0, le=65535)

    # Local stack (no Docker): jar cache, data, logs and pid files live under these folders.
    cache_dir: Path = Path(".stockflow/cache")
    run_dir: Path = Path(".stockflow/run")
    kafka_version: str = "4.1.1"
    kafka_port: int = 9092
    kafka_controller_port: int = 9093
    kafka_heap: str = "1g"
    redis_port: int = 6379

    @model_validator(mode="after")
    def _check_and_default_endpoints(self) -> Settings:
        if self.kafka_sasl and not (self.kafka_sasl_username and self.kafka_sasl_password):
            raise ValueError(
                f"STOCKFLOW_KAFKA_SECURITY_PROTOCOL is {self.kafka_security_protocol}: set"
                " STOCKFLOW_KAFKA_SASL_USERNAME and STOCKFLOW_KAFKA_SASL_PASSWORD to log in with"
            )
        if self.min_insync_replicas > self.replication_factor:
            raise ValueError(
                f"STOCKFLOW_MIN_INSYNC_REPLICAS ({self.min_insync_replicas}) is more than"
                f" STOCKFLOW_REPLICATION_FACTOR ({self.replication_factor}): no write could ever be"
                " acknowledged"
            )
        if self.api_token and not all(
            token and token.isprintable() and " " not in token for token in self.api_tokens
        ):
            raise ValueError(
                "STOCKFLOW_API_TOKEN holds an empty token, or one with a space or an unprintable"
                " character (several are separated by commas): a client could not send it as"
                " `Authorization: Bearer <token>`"
            )
        if self.backpressure_high_water and self.backpressure_low_water >= self.backpressure_high_water:
            raise ValueError(
                f"STOCKFLOW_BACKPRESSURE_LOW_WATER ({self.backpressure_low_water}) must be below"
                f" STOCKFLOW_BACKPRESSURE_HIGH_WATER ({self.backpressure_high_water})"
            )
        # Frozen model: fill derived defaults through object.__setattr__ once, at construction.
        if not self.bootstrap_servers:
            object.__setattr__(self, "bootstrap_servers", f"127.0.0.1:{self.kafka_port}")
        if not self.redis_url:
            object.__setattr__(self, "redis_url", f"redis://127.0.0.1:{self.redis_port}/0")
        return self

    @property
    def kafka_sasl(self) -> bool:
        """Whether Kafka clients log in (SASL_PLAINTEXT, SASL_SSL)."""
        return self.kafka_security_protocol.startswith("SASL")

    @property
    def kafka_tls(self) -> bool:
        """Whether Kafka clients connect over TLS (SSL, SASL_SSL)."""
        return self.kafka_security_protocol.endswith("SSL")

    @property
    def api_tokens(self) -> list[str]:
        """The tokens the HTTP API accepts, any of them (none: it asks for none)."""
        return [token.strip() for token in self.api_token.split(",")] if self.api_token else []

    def insync_replicas(self) -> int:
        """``min.insync.replicas`` of the topics stockflow creates (see min_insync_replicas)."""
        return self.min_insync_replicas or (2 if self.replication_factor >= 3 else 1)

    def kafka_config(self) -> dict[str, Any]:
        """Where and how a confluent-kafka client connects: the base of every client's config."""
        config = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.kafka_security_protocol,
        }
        if self.kafka_sasl:
            config |= {
                "sasl.mechanism": self.kafka_sasl_mechanism,
                "sasl.username": self.kafka_sasl_username,
                "sasl.password": self.kafka_sasl_password,
            }
        if self.kafka_ssl_ca_file and self.kafka_tls:
            config["ssl.ca.location"] = self.kafka_ssl_ca_file
        return config

    def redis_url_without_password(self) -> str:
        """``redis_url`` for a message: its password, if it holds one, left out."""
        url = urlsplit(self.redis_url)
        if url.password is None:
            return self.redis_url
        login = f"{url.username or ''}:***@"
        return urlunsplit(url._replace(netloc=login + url.netloc.rpartition("@")[2]))

    def kafka_settings(self) -> str:
        """The settings that decide whether Kafka answers this client, for an error to name:
        a broker that listens but does not answer may want another protocol or login."""
        protocol = self.kafka_security_protocol
        named = [
            f"STOCKFLOW_BOOTSTRAP_SERVERS ({self.bootstrap_servers})",
            f"STOCKFLOW_KAFKA_SECURITY_PROTOCOL ({protocol})",
        ]
        if self.kafka_sasl:
            named.append("STOCKFLOW_KAFKA_SASL_MECHANISM, _SASL_USERNAME, _SASL_PASSWORD")
        if self.kafka_tls:
            named.append(f"STOCKFLOW_KAFKA_SSL_CA_FILE ({self.kafka_ssl_ca_file or 'empty: the system CAs'})")
        return ", ".join(named[:-1]) + " and " + named[-1]
