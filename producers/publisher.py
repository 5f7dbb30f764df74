"""Publish commands to Kafka: validated, Avro-framed, keyed by SKU, durably acknowledged.

The producer is idempotent with acks=all, so a retry inside the client never duplicates a
command in the log, and uses Kafka's murmur2 partitioner, so a SKU lands on the partition that
Java clients and the Faust processor (aiokafka) compute for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from schemas.codec import codec
from schemas.records import Command, validate_command
from stockflow.errors import StockflowError
from stockflow.lag import Admission, LagProbe
from stockflow.settings import Settings


class PublishError(StockflowError):
    """Kafka did not acknowledge a command."""


@dataclass(frozen=True)
class Receipt:
    """Where a command was durably written."""

    command_id: str
    partition: int
    offset: int


DeliveryCallback = Callable[[Command, Receipt | None, PublishError | None], None]


def producer_config(settings: Settings) -> dict[str, Any]:
    """How commands are produced: idempotent, acks=all, Java's murmur2 partitioner, lz4."""
    return {
        "bootstrap.servers": settings.bootstrap_servers,
        "enable.idempotence": True,
        "acks": "all",
        "partitioner": "murmur2_random",
        "linger.ms": 5,
        "compression.type": "lz4",
    }


class Publisher:
    """Publishes commands; holds them back while the workers lag (``stockflow.lag.Admission``)."""

    def __init__(self, settings: Settings, **extra_config: Any) -> None:
        self._settings = settings
        self._lag: LagProbe | None = None
        self.admission: Admission | None = None
        if settings.backpressure_high_water:
            self._lag = LagProbe(settings)
            self.admission = Admission(settings, self._worst_lag)
        self._producer = Producer(producer_config(settings) | extra_config)

    def _worst_lag(self) -> int:
        assert self._lag is not None
        return max(group.total for group in self._lag.read())

    def send(
        self,
        command: Command,
        on_delivery: DeliveryCallback | None = None,
        wait_s: float | None = None,
    ) -> None:
        """Queue one command; ``on_delivery`` runs from ``poll``/``flush`` once Kafka answers.

        Raises ``InvalidCommand`` before anything is sent if the command breaks the contract,
        and ``Overloaded`` if the workers are too far behind and have not caught up within
        ``wait_s`` (default STOCKFLOW_BACKPRESSURE_MAX_WAIT_S; 0 = do not wait).
        """
        validate_command(command)
        if self.admission is not None:
            self.admission.admit(self._settings.backpressure_max_wait_s if wait_s is None else wait_s)

        def delivered(error: KafkaError | None, message: Message) -> None:
            if on_delivery is None:
                return
            if error is not None:
                on_delivery(command, None, PublishError(f"{command.command_id}: {error.str()}"))
            else:
                receipt = Receipt(command.command_id, message.partition() or 0, message.offset() or 0)
                on_delivery(command, receipt, None)

        value = codec.encode(command)
        headers: list[tuple[str, str | bytes | None]] = [("type", type(command).__name__.encode())]
        while True:
            try:
                self._producer.produce(
                    self._settings.commands_topic,
                    key=command.sku.encode(),
                    value=value,
                    headers=headers,
                    on_delivery=delivered,
                )
                break
            except BufferError:
                self._producer.poll(0.1)  # local queue full: wait for deliveries, then retry
        self._producer.poll(0)

    def publish(self, command: Command, timeout_s: float = 30.0, wait_s: float | None = None) -> Receipt:
        """Send one command and wait until Kafka has acknowledged it."""
        outcome: list[Receipt | PublishError] = []
        self.send(command, lambda _cmd, receipt, error: outcome.append(receipt or error), wait_s)  # type: ignore[arg-type]
        self.flush(timeout_s)
        if not outcome:
            raise PublishError(
                f"no answer from Kafka at {self._settings.bootstrap_servers} within {timeout_s}s"
                f" for command {command.command_id}: is the stack up (`stockflow stack status`)?"
            )
        if isinstance(outcome[0], PublishError):
            raise outcome[0]
        return outcome[0]

    def poll(self, timeout_s: float = 0.0) -> None:
        self._producer.poll(timeout_s)

    def flush(self, timeout_s: float = 30.0) -> int:
        """Wait for outstanding deliveries; returns how many are still unacknowledged."""
        try:
            return self._producer.flush(timeout_s)
        except KafkaException as exc:
            raise PublishError(f"flush failed: {exc}") from exc

    def close(self) -> None:
        self.flush()
        if self._lag is not None:
            self._lag.close()
