from __future__ import annotations

import pytest

from stockflow.partitioning import murmur2, partition_for


# Vectors from Kafka's own UtilsTest.testMurmur2.
@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (b"21", -973932308),
        (b"foobar", -790332482),
        (b"a-little-bit-long-string", -985981536),
        (b"a-little-bit-longer-string", -1486304829),
        (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
        (b"abc", 479470107),
    ],
)
def test_murmur2_matches_kafka(key: bytes, expected: int) -> None:
    assert murmur2(key) == expected


def test_partition_is_positive_hash_mod_count() -> None:
    assert partition_for(b"21", 12) == (-973932308 & 0x7FFFFFFF) % 12
    assert all(0 <= partition_for(f"SKU-{i}".encode(), 7) < 7 for i in range(500))
