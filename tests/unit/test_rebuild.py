"""Where a rebuild writes (the live Redis URL with another database number), and how it shares
the partitions among its workers."""

from __future__ import annotations

import pytest

from projections.rebuild import database_url, split_partitions


@pytest.mark.parametrize(
    ("live", "rebuilt"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/7"),
        ("redis://cache:6379", "redis://cache:6379/7"),  # no database in the URL: 0 is live
        ("redis://:secret@cache:6379/3?socket_timeout=5", "redis://:secret@cache:6379/7?socket_timeout=5"),
    ],
)
def test_the_rebuilt_database_is_the_live_url_with_another_number(live: str, rebuilt: str) -> None:
    assert database_url(live, 7) == rebuilt


@pytest.mark.parametrize(
    ("ends", "workers", "shares"),
    [
        ({0: 5, 2: 7}, 2, [{0: 5}, {2: 7}]),  # events on partitions of one parity only
        ({0: 1, 1: 2, 2: 3, 3: 4}, 2, [{0: 1, 2: 3}, {1: 2, 3: 4}]),
        ({3: 9}, 4, [{3: 9}]),  # more workers than partitions with records: one each
        ({}, 2, []),
    ],
)
def test_every_worker_gets_partitions_with_records(
    ends: dict[int, int], workers: int, shares: list[dict[int, int]]
) -> None:
    assert split_partitions(ends, workers) == shares
