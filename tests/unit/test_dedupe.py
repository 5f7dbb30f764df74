"""The retry window: bounded in commands, and rebuilt with the processor's own checks."""

from __future__ import annotations

import dataclasses

from processors.dedupe import RecentCommands, decided_command_ids
from producers.commands import place_order
from schemas.codec import codec
from stockflow.logreader import Logged
from stockflow.partitioning import partition_for

PARTITIONS = 4


def test_an_id_stays_for_exactly_size_commands() -> None:
    recent = RecentCommands(size=3, last_offset=-1)
    recent.handled(0, "a")
    recent.handled(1, None)  # a parked command is not in the window
    recent.handled(1, "b")
    recent.handled(2, "c")  # a, b, c: the window is full
    assert "a" in recent and recent.last_offset == 2
    recent.handled(2, "d")  # a batch frame: many commands at one offset
    assert "a" not in recent
    assert ("b" in recent, "c" in recent, "d" in recent, len(recent)) == (True, True, True, 3)


def test_a_retry_inside_the_window_keeps_the_id_longer() -> None:
    recent = RecentCommands(size=2, last_offset=-1)
    recent.handled(0, "a")
    recent.handled(1, "a")  # the retry
    recent.handled(2, "b")
    assert "a" in recent
    recent.handled(3, "c")
    assert "a" not in recent and len(recent) == 2


def test_the_ids_added_since_the_last_take_are_handed_out_once_in_order() -> None:
    recent = RecentCommands(size=2, last_offset=-1)
    recent.handled(0, "a")
    recent.handled(0, None)  # parked: not in the window, so not saved with it
    recent.handled(1, "b")
    recent.handled(2, "c")  # "a" has left the window, but it was decided in this batch
    assert recent.take_unsaved() == ["a", "b", "c"]
    recent.handled(3, "b")  # a retry is in the window again
    assert recent.take_unsaved() == ["b"]
    assert recent.take_unsaved() == []


def test_ids_found_at_a_take_over_count_as_recent_but_are_not_saved_again() -> None:
    recent = RecentCommands(size=2, last_offset=9, saved=["a", "b", "c"])
    assert "a" not in recent and "b" in recent and "c" in recent
    assert recent.take_unsaved() == []
    recent.handled(10, "d")
    assert recent.take_unsaved() == ["d"]
    assert "b" not in recent and recent.last_offset == 10


def test_memory_is_bounded_by_the_window() -> None:
    recent = RecentCommands(size=1000, last_offset=-1)
    for offset in range(100_000):
        recent.handled(offset, f"command-{offset}")
    assert len(recent) == 1000
    assert "command-99000" in recent and "command-98999" not in recent


def logged(value: bytes, partition: int) -> Logged:
    return Logged("stockflow.commands", partition, 0, None, value, {}, 0)


def test_decided_command_ids_parks_what_the_processor_parks() -> None:
    command = place_order("SKU-7", 2)
    home = partition_for(b"SKU-7", PARTITIONS)
    value = codec.encode(command)
    assert decided_command_ids(logged(value, home), PARTITIONS) == [command.command_id]
    assert decided_command_ids(logged(value, (home + 1) % PARTITIONS), PARTITIONS) == [None]
    assert decided_command_ids(logged(b"\x00garbage", home), PARTITIONS) == [None]
    invalid = dataclasses.replace(command, qty=-1)
    assert decided_command_ids(logged(codec.encode(invalid), home), PARTITIONS) == [None]
    other = place_order("SKU-7", 1)
    frame = codec.encode_batch([command, invalid, other])
    assert decided_command_ids(logged(frame, home), PARTITIONS) == [
        command.command_id,
        None,
        other.command_id,
    ]
