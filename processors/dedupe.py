"""The retry window: which command ids a partition has seen recently.

A publisher that times out and sends a command again (same command id) must not get a second
decision. The processor recognises such a retry if the first copy is among the last
``STOCKFLOW_DEDUPE_WINDOW`` command messages of its partition. The window is bounded, so memory
is too, and it needs no storage of its own: a worker taking a partition over rebuilds it by
reading those messages back from the commands topic.
"""

from __future__ import annotations

from schemas.codec import codec
from schemas.records import validate_command
from stockflow.errors import DecodeError, InvalidCommand
from stockflow.logreader import Logged
from stockflow.partitioning import partition_for


class RecentCommands:
    """Command ids decided in the partition's offsets ``(last_offset - size, last_offset]``.

    A ring of the last ``size`` messages' ids, and each id's latest offset for the lookup.
    """

    def __init__(self, size: int, last_offset: int) -> None:
        self.size = size
        self.last_offset = last_offset
        self._ring: list[str | None] = [None] * size  # slot offset % size: that message's id
        self._latest: dict[str, int] = {}  # command id -> offset of its latest copy

    def handled(self, offset: int, command_id: str | None) -> None:
        """Record the message at ``offset``: a decided command's id, or None for one parked."""
        self.last_offset = offset
        slot = offset % self.size
        leaving = self._ring[slot]  # from an offset at least `size` back
        if leaving is not None and self._latest.get(leaving, offset) <= offset - self.size:
            del self._latest[leaving]  # unless a retry since then keeps it in the window
        self._ring[slot] = command_id
        if command_id is not None:
            self._latest[command_id] = offset

    def __contains__(self, command_id: str) -> bool:
        return command_id in self._latest

    def __len__(self) -> int:
        return len(self._latest)


def decided_command_id(message: Logged, partitions: int) -> str | None:
    """The id of the command in ``message`` if the processor decides it, None if it parks it.

    The same checks as the processor's, in the same order: what was parked the first time is
    parked again, so a fixed copy redriven from the DLQ is never taken for a retry.
    """
    try:
        command = codec.decode_command(message.value)
        validate_command(command)
    except (DecodeError, InvalidCommand):
        return None
    if partition_for(command.sku.encode(), partitions) != message.partition:
        return None
    return command.command_id
