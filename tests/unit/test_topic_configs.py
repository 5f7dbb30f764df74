"""The configuration stockflow creates its topics with."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from stockflow.settings import Settings
from stockflow.topics import topic_configs


@pytest.mark.parametrize(
    ("replicas", "insync", "wanted"),
    [(1, 0, "1"), (2, 0, "1"), (3, 0, "2"), (5, 0, "2"), (3, 3, "3"), (2, 2, "2")],
)
def test_every_topic_wants_its_writes_on_enough_replicas(replicas: int, insync: int, wanted: str) -> None:
    settings = Settings.model_validate({"replication_factor": replicas, "min_insync_replicas": insync})
    configs = topic_configs(settings)
    assert len(configs) == 5  # commands, events, both dead-letter topics, the changelog
    assert {config["min.insync.replicas"] for config in configs.values()} == {wanted}


def test_more_insync_replicas_than_replicas_is_refused_naming_both() -> None:
    with pytest.raises(ValidationError, match="STOCKFLOW_MIN_INSYNC_REPLICAS \\(2\\) is more than"):
        Settings.model_validate({"replication_factor": 1, "min_insync_replicas": 2})
