"""The processor's watchdog: when does a quiet stream count as stalled."""

from __future__ import annotations

from typing import Any, cast

from processors.app import stall_report, stalled


def test_a_processor_is_stalled_only_when_commands_wait_and_nothing_arrives() -> None:
    assert stalled({0: 5, 1: 0}, idle_s=130, limit_s=120)
    assert not stalled({0: 5}, idle_s=60, limit_s=120)  # not quiet for long enough
    assert not stalled({0: 0, 1: 0}, idle_s=600, limit_s=120)  # quiet because nothing waits
    assert not stalled({}, idle_s=600, limit_s=120)  # no partitions assigned


def test_a_report_that_cannot_read_faust_says_so_instead_of_stopping_the_restart() -> None:
    # An app without a started consumer: the report reads attributes that are not there.
    report = stall_report(cast(Any, object()))
    assert report.startswith("unknown: AttributeError")
