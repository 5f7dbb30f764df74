"""Where a rebuild writes (the live Redis URL with another database number), and in which order
its workers take the partitions."""

from __future__ import annotations

import pytest

from projections.rebuild import database_url, taking_order


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


def test_the_workers_take_the_partitions_with_the_most_messages_first() -> None:
    assert taking_order({0: 5, 2: 7, 3: 7, 9: 1}) == [(2, 7), (3, 7), (0, 5), (9, 1)]
    assert taking_order({}) == []
