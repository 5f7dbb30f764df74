"""The local stack's pure parts."""

from __future__ import annotations

from stockflow.stack import kafka_cluster_id


def test_kafka_cluster_ids_never_look_like_an_option() -> None:
    ids = [kafka_cluster_id() for _ in range(2000)]  # about 31 would start with "-" unfiltered
    assert all(len(i) == 22 and not i.startswith("-") for i in ids)
    assert len(set(ids)) == len(ids)
