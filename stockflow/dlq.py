"""Dead letters: list what was parked and why, and send repaired commands back in.

A dead letter is redriven only if it now decodes and validates (a schema added since, a
stray key): it is re-published through the publisher, keyed by its SKU, with its original
command id, so redriving the same letter twice still yields one decision.
"""

from __future__ import annotations

from dataclasses import dataclass

from producers.publisher import Publisher, Receipt
from schemas.codec import codec
from schemas.records import Command, validate_command
from stockflow.errors import DecodeError, InvalidCommand
from stockflow.logreader import Logged, read_topic
from stockflow.settings import Settings


@dataclass(frozen=True)
class DeadLetter:
    record: Logged

    @property
    def id(self) -> str:
        """How `stockflow dlq redrive` names it: <dlq partition>:<dlq offset>."""
        return f"{self.record.partition}:{self.record.offset}"

    def header(self, name: str) -> str:
        return self.record.headers.get(name, b"").decode(errors="replace")

    def summary(self) -> dict[str, str]:
        return {
            "id": self.id,
            "error_type": self.header("error.type"),
            "reason": self.header("error.reason"),
            "source": f"{self.header('source.topic')}[{self.header('source.partition')}]"
            f"@{self.header('source.offset')}",
            "bytes": str(len(self.record.value)),
        }


def dead_letters(settings: Settings, topic: str | None = None) -> list[DeadLetter]:
    return [DeadLetter(record) for record in read_topic(settings, topic or settings.dlq_topic)]


def repaired_command(letter: DeadLetter) -> Command:
    """The command in a dead letter, if it is one the pipeline would now accept."""
    commands = codec.decode_commands(letter.record.value)
    if len(commands) != 1:
        # The processor parks the commands of a batch frame one by one; this came from elsewhere.
        raise DecodeError(f"a dead letter holds one command, this one holds {len(commands)}")
    validate_command(commands[0])
    return commands[0]


@dataclass(frozen=True)
class Redriven:
    letter: DeadLetter
    receipt: Receipt | None
    refused: str  # why it was not sent; empty if it was


def redrive(settings: Settings, letters: list[DeadLetter]) -> list[Redriven]:
    publisher = Publisher(settings)
    outcomes = []
    for letter in letters:
        try:
            command = repaired_command(letter)
        except (DecodeError, InvalidCommand) as exc:
            outcomes.append(Redriven(letter, None, str(exc)))
            continue
        outcomes.append(Redriven(letter, publisher.publish(command), ""))
    return outcomes
