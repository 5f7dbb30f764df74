"""The retry window: which command ids a partition has seen recently.

A publisher that times out and sends a command again (same command id) must not get a second
decision. The processor recognises such a retry if the first copy is among the last
``STOCKFLOW_DEDUPE_WINDOW`` commands decided on its partition. The window is bounded, so memory
is too. The processor saves each batch's ids in its table (``processors.handler``), so a worker
taking a partition over finds them there; what they do not cover (a table written before they
were saved, a larger window) it reads back from the commands topic.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from schemas.codec import codec
from schemas.records import Command, validate_command
from stockflow.errors import DecodeError, InvalidCommand
from stockflow.logreader import Logged
from stockflow.partitioning import partition_for


class RecentCommands:
    """The ids of the last ``size`` commands decided on a partition, up to ``last_offset``.

    Counted in commands, not messages, since one message may hold a batch of them. A queue of
    the ids in log order, and how many times each is in it, for the lookup.
    """

    def __init__(self, size: int, last_offset: int, saved: Iterable[str] = ()) -> None:
        """``saved``: ids of commands decided up to ``last_offset``, oldest first, that need no
        saving (a worker taking the partition over found them in its table or the log)."""
        self.size = size
        self.last_offset = last_offset  # the last command message handled
        self._ids: deque[str] = deque()
        self._copies: dict[str, int] = {}
        for command_id in saved:
            self._add(command_id)
        self._unsaved: list[str] = []  # ids added since the last take_unsaved()

    def handled(self, offset: int, command_id: str | None) -> None:
        """Record a command of the message at ``offset``: its id, or None if it was parked."""
        self.last_offset = offset
        if command_id is None:
            return
        self._unsaved.append(command_id)
        self._add(command_id)

    def _add(self, command_id: str) -> None:
        self._ids.append(command_id)
        self._copies[command_id] = self._copies.get(command_id, 0) + 1
        if len(self._ids) > self.size:
            leaving = self._ids.popleft()
            if self._copies[leaving] == 1:
                del self._copies[leaving]
            else:
                self._copies[leaving] -= 1  # a retry since then keeps it in the window

    def take_unsaved(self) -> list[str]:
        """The ids added since the last call, in order: what the processor saves with a batch."""
        unsaved, self._unsaved = self._unsaved, []
        return unsaved

    def __contains__(self, command_id: str) -> bool:
        return command_id in self._copies

    def __len__(self) -> int:
        return len(self._copies)


def refusal(command: Command, partition: int, partitions: int) -> tuple[str, str] | None:
    """Why the processor parks ``command`` found on ``partition``: (reason, error type); None
    if it decides it."""
    try:
        validate_command(command)
    except InvalidCommand as exc:
        return str(exc), type(exc).__name__
    home = partition_for(command.sku.encode(), partitions)
    if home != partition:
        reason = (
            f"command for SKU {command.sku!r} arrived on partition {partition} but the SKU belongs"
            f" on partition {home}: publish with key=SKU and Kafka's murmur2 partitioner"
        )
        return reason, "WrongPartition"
    return None


def decided_command_ids(message: Logged, partitions: int) -> list[str | None]:
    """Per command in ``message``, its id if the processor decides it, None if it parks it.

    The processor's own checks (``refusal``): what was parked the first time is parked again,
    so a fixed copy redriven from the DLQ is never taken for a retry.
    """
    try:
        commands = codec.decode_commands(message.value)
    except DecodeError:
        return [None]
    return [None if refusal(c, message.partition, partitions) else c.command_id for c in commands]
