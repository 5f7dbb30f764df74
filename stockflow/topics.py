"""Create stockflow's topics explicitly, with the configured partition count.

Auto-creation would give the broker's default partition count, which breaks co-partitioning
of commands, events and the processor's table changelogs.
"""

from __future__ import annotations

import socket
import time

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from stockflow.errors import StackError
from stockflow.settings import Settings

# The processor's Faust tables; each is backed by a compacted changelog topic.
PROCESSOR_TABLES = ("state",)

# The event log is the source of truth: never delete it by age or size. Dead letters are kept
# too, so that nothing a publisher sent is ever lost without an operator deciding so.
KEEP_FOREVER = {"retention.ms": "-1", "retention.bytes": "-1"}

# The cancel window is measured between the times the broker appended two commands: in the
# log, so a command decided again after a crash is decided the same, and from one clock, not
# the publishers'.
BROKER_TIMESTAMPS = {"message.timestamp.type": "LogAppendTime"}


# A worker restores the processor's table by reading its whole changelog before it decides
# anything, at start and whenever it takes partitions over. Kafka compacts (keeps the newest
# record of each key) only closed segments: with the default 1 GB segments nothing was ever
# compacted, and a restart read every SKU row every batch had written. Segments of 1 MiB (the
# least Kafka accepts) close often; the cleaner then runs once half a partition is stale.
COMPACTED_CHANGELOG = {"cleanup.policy": "compact", "segment.bytes": str(1024 * 1024)}


def changelog_topic(settings: Settings, table: str) -> str:
    """The name Faust gives a table's changelog: ``<app id>-<table>-changelog``."""
    return f"{settings.processor_group}-{table}-changelog"


def topic_configs(settings: Settings) -> dict[str, dict[str, str]]:
    configs = {
        settings.commands_topic: dict(BROKER_TIMESTAMPS),
        settings.events_topic: dict(KEEP_FOREVER),
        settings.dlq_topic: dict(KEEP_FOREVER),
        settings.events_dlq_topic: dict(KEEP_FOREVER),
    }
    # Created here rather than by Faust: a worker that creates a changelog at start-up can
    # write to it before its metadata shows any partition, and Faust then crashes the agent
    # with PartitionsMismatch ("... has 0 partitions").
    for table in PROCESSOR_TABLES:
        configs[changelog_topic(settings, table)] = dict(COMPACTED_CHANGELOG)
    # Every topic, the changelog too: a decision, or a save, acknowledged by fewer replicas could
    # be lost with its leader.
    for config in configs.values():
        config["min.insync.replicas"] = str(settings.insync_replicas())
    return configs


def require_broker(settings: Settings, timeout_s: float = 1.0) -> None:
    """Raise StackError, quietly, unless a bootstrap server accepts a TCP connection.

    A Kafka client that waits for metadata while nothing listens tries again about every 50 ms
    and logs each refused connection ("Connect to ... failed: Connection refused": 60 lines in
    3 s), so a command run with the stack down buried its own error under them. Whether Kafka
    answers there is for the client to find out; this only asks whether anything listens.
    """
    for server in settings.bootstrap_servers.split(","):
        host, _, port = server.strip().split("://")[-1].rpartition(":")
        if not port.isdigit():
            continue
        try:
            socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout_s).close()
        except OSError:
            continue
        return
    raise StackError(
        f"cannot reach Kafka at {settings.bootstrap_servers} (nothing accepts a connection there):"
        " start the stack (`stockflow stack up`) or set STOCKFLOW_BOOTSTRAP_SERVERS"
    )


def admin_client(settings: Settings) -> AdminClient:
    return AdminClient(settings.kafka_config())


def ensure_topics(settings: Settings, timeout_s: float = 30.0) -> list[str]:
    """Create missing topics; refuse to run on existing ones with another partition count.

    Returns the names of the topics it created.
    """
    admin = admin_client(settings)
    try:
        existing = admin.list_topics(timeout=timeout_s).topics
    except KafkaException as exc:
        raise StackError(
            f"cannot reach Kafka at {settings.bootstrap_servers}: {exc}. Start the stack with"
            f" `stockflow stack up`, or check {settings.kafka_settings()}"
        ) from exc
    wanted = topic_configs(settings)
    for name in wanted:
        if name in existing:
            have = len(existing[name].partitions)
            if have != settings.partitions:
                raise StackError(
                    f"topic {name} has {have} partitions but STOCKFLOW_PARTITIONS is"
                    f" {settings.partitions}: set STOCKFLOW_PARTITIONS={have}, or use new"
                    " topic names (STOCKFLOW_*_TOPIC)"
                )
    missing = [
        NewTopic(name, settings.partitions, settings.replication_factor, config=config)
        for name, config in wanted.items()
        if name not in existing
    ]
    if not missing:
        return []
    for name, future in admin.create_topics(missing, operation_timeout=timeout_s).items():
        try:
            future.result()
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):  # another worker won the race: fine
                raise StackError(f"cannot create topic {name}: {exc}") from exc
    created = [topic.topic for topic in missing]
    _wait_for_leaders(admin, created, timeout_s)
    return created


def _wait_for_leaders(admin: AdminClient, topics: list[str], timeout_s: float) -> None:
    # A new topic is usable only once every partition has a leader; until then clients get
    # NOT_LEADER_FOR_PARTITION, so the caller should not see the topic before that.
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        metadata = admin.list_topics(timeout=timeout_s).topics
        if all(
            name in metadata and all(p.leader >= 0 for p in metadata[name].partitions.values())
            for name in topics
        ):
            return
        time.sleep(0.1)
    raise StackError(f"topics {topics} have no leader after {timeout_s:.0f}s: is the broker healthy?")
