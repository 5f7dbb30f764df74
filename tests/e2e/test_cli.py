"""The `stockflow` CLI as a user drives it, against the session's real stack."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from confluent_kafka import Producer

from producers.commands import restock
from projections.queries import ReadModels
from projections.rebuild import database_url
from schemas.codec import codec
from stockflow.partitioning import partition_for
from stockflow.settings import Settings
from stockflow.stack import LocalStack, settings_env
from stockflow.topics import ensure_topics
from tests.conftest import free_port
from tests.pipeline import own_settings, publish_all, read_topic, sku_on_every_partition, wait_for

pytestmark = pytest.mark.e2e


def stockflow(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stockflow", *args],
        env=settings_env(settings) | {"COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["stack", "up"],
        ["stack", "down"],
        ["stack", "status"],
        ["stack", "scale"],
        ["worker", "processor"],
        ["worker", "projection"],
        ["publish", "order"],
        ["publish", "cancel"],
        ["publish", "restock"],
        ["load"],
        ["query", "stock"],
        ["query", "order"],
        ["query", "top"],
        ["query", "totals"],
        ["demo"],
        ["verify"],
        ["rebuild"],
        ["status"],
        ["bench"],
        ["api"],
        ["dlq", "list"],
        ["dlq", "redrive"],
    ],
    ids=lambda c: " ".join(c) or "stockflow",
)
def test_every_command_has_help(command: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "stockflow", *command, "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    if command:  # each leaf command shows an example
        assert "Example" in result.stdout or "Commands" in result.stdout


@pytest.mark.parametrize(
    ("command", "what", "setting"),
    [
        ("query stock SKU-1", "cannot reach Redis", "STOCKFLOW_REDIS_URL"),
        ("query top", "cannot reach Redis", "STOCKFLOW_REDIS_URL"),
        ("publish restock SKU-1 5", "cannot reach Kafka", "STOCKFLOW_BOOTSTRAP_SERVERS"),
        ("load --orders 10", "cannot reach Kafka", "STOCKFLOW_BOOTSTRAP_SERVERS"),
        ("verify", "cannot reach Kafka", "STOCKFLOW_BOOTSTRAP_SERVERS"),
        ("rebuild", "cannot reach Kafka", "STOCKFLOW_BOOTSTRAP_SERVERS"),
        ("status --once", "cannot reach Kafka", "STOCKFLOW_BOOTSTRAP_SERVERS"),
        ("dlq list", "cannot reach Kafka", "STOCKFLOW_BOOTSTRAP_SERVERS"),
        ("stack scale --processors 2", "the local stack is not running", "stockflow stack up"),
    ],
)
def test_a_stack_that_is_not_up_is_one_error_naming_what_to_set(
    tmp_path: Path, command: str, what: str, setting: str
) -> None:
    nothing = Settings(kafka_port=free_port(), redis_port=free_port(), run_dir=tmp_path)
    result = stockflow(nothing, *command.split())
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    # Nor the Kafka client's retries ("%3|<time>|FAIL|rdkafka#producer-1| ... Connection
    # refused"): publish used to wait 36 s, logging one every 50 ms.
    assert "|FAIL|" not in result.stderr
    error = " ".join(result.stderr.split())  # the console wraps long lines
    assert what in error and setting in error, result.stderr


@pytest.mark.parametrize(
    ("command", "option"),
    [
        ("load --skus 0", "--skus"),
        ("load --skus 5 --hot-skus 10", "--hot-skus"),
        ("load --rate -1", "--rate"),
        ("query top -n 0", "-n"),  # Redis read -n 0 as every SKU
        ("verify --wait -1", "--wait"),
        ("rebuild --workers 0", "--workers"),
        ("stack scale --processors -1", "--processors"),
        ("query stock SKU-\udcff", "SKU"),  # the byte 0xff: not UTF-8
        ("query order o-\udcff", "ORDER_ID"),
    ],
)
def test_an_option_out_of_range_is_refused_naming_it_before_anything_runs(
    tmp_path: Path, command: str, option: str
) -> None:
    nothing = Settings(kafka_port=free_port(), redis_port=free_port(), run_dir=tmp_path)
    result = stockflow(nothing, *command.split())
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"Invalid value for '{option}'" in result.stderr and "Traceback" not in result.stderr


def test_stack_scale_without_a_count_says_which_options_take_one(tmp_path: Path) -> None:
    nothing = Settings(kafka_port=free_port(), redis_port=free_port(), run_dir=tmp_path)
    result = stockflow(nothing, "stack", "scale")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--processors N" in result.stderr and "--projections N" in result.stderr


@pytest.mark.usefixtures("stack")
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["publish", "order", "SKU-1", "0"], "qty is 0"),
        (["publish", "order", "", "2"], "sku is empty"),
        (["publish", "restock", "--", "SKU-1", "-4"], "qty is -4"),
        (["publish", "restock", "SKU-1", "3000000000"], "qty is 3000000000: at most 2147483647"),
        (["publish", "order", "SKU-\udcff", "1"], "sku holds U+DCFF at character 4, which is not text"),
    ],
)
def test_invalid_input_is_refused_with_exit_2_and_nothing_is_sent(
    settings: Settings, args: list[str], message: str
) -> None:
    before = len(read_topic(settings, settings.commands_topic))
    result = stockflow(settings, *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in " ".join(result.stderr.split())  # the console wraps long lines
    assert "Nothing was sent" in result.stderr
    assert len(read_topic(settings, settings.commands_topic)) == before


@pytest.mark.usefixtures("stack")
def test_publish_then_query_by_hand(settings: Settings, unique: Callable[[str], str]) -> None:
    sku, order_id = unique("SKU"), unique("order")
    restocked = stockflow(settings, "publish", "restock", sku, "5", "--command-id", unique("restock"))
    assert restocked.returncode == 0, restocked.stderr
    assert "Restock" in restocked.stdout and "partition" in restocked.stdout
    # Sent again with its id (a retry after a timeout): decided once, so 5 units, not 10.
    again = stockflow(settings, "publish", "restock", sku, "5", "--command-id", unique("restock"))
    assert again.returncode == 0, again.stderr
    ordered = stockflow(settings, "publish", "order", sku, "2", "--order-id", order_id)
    assert ordered.returncode == 0, ordered.stderr

    def stock() -> dict[str, object] | None:
        result = stockflow(settings, "query", "stock", sku, "--json")
        row: dict[str, object] = json.loads(result.stdout) if result.returncode == 0 else {}
        return row if row.get("processed") == 1 else None

    row = wait_for("the order in `stockflow query stock`", stock)
    assert (row["available"], row["units_sold"], row["recent_orders"]) == (3, 2, [order_id])
    order = stockflow(settings, "query", "order", order_id, "--json")
    assert json.loads(order.stdout)[sku]["status"] == "processed"
    missing = stockflow(settings, "query", "stock", unique("never-seen"))
    assert missing.returncode == 1
    assert "no events for SKU" in missing.stderr

    # --wait prints the decision about the command sent, once the read models show it.
    cancelled = stockflow(settings, "publish", "cancel", sku, order_id, "--wait", "60")
    assert cancelled.returncode == 0, cancelled.stderr
    assert f"cancelled (SKU {sku} at version 3)" in cancelled.stdout
    refused = stockflow(settings, "publish", "cancel", sku, order_id, "--wait", "60")
    assert refused.returncode == 0, refused.stderr
    assert f"rejected: order {order_id} is already cancelled (SKU {sku} at version 4)" in refused.stdout
    stale = stockflow(settings, "publish", "restock", sku, "1", "--expected-version", "2", "--wait", "60")
    assert stale.returncode == 0, stale.stderr
    assert f"rejected: version conflict: expected 2, SKU is at 4 (SKU {sku} at version 5)" in stale.stdout


def test_stack_status_names_each_process(settings: Settings, stack: LocalStack) -> None:
    result = stockflow(settings, "stack", "status")
    assert result.returncode == 0, result.stderr
    for name in ("kafka", "redis", "processor-1", "projection-1"):
        assert name in result.stdout
    assert "stopped" not in result.stdout


@pytest.mark.usefixtures("stack")
def test_a_dead_letter_is_listed_and_a_repaired_one_is_redriven(
    settings: Settings, unique: Callable[[str], str]
) -> None:
    def parked() -> int:
        status = stockflow(settings, "status", "--once", "--json")
        assert status.returncode == 0, status.stderr
        count: int = json.loads(status.stdout)["dead_letters"][settings.dlq_topic]
        return count

    before = parked()
    sku = unique("SKU")
    stray = restock(sku, 9)  # valid, but produced on the wrong partition: parked
    garbage = b"junk " + unique("junk").encode()
    raw = Producer({"bootstrap.servers": settings.bootstrap_servers})
    wrong = (partition_for(sku.encode(), settings.partitions) + 1) % settings.partitions
    raw.produce(settings.commands_topic, key=b"x", value=codec.encode(stray), partition=wrong)
    raw.produce(settings.commands_topic, key=b"x", value=garbage, partition=wrong)
    assert raw.flush(10) == 0

    def ours() -> dict[str, dict[str, str]] | None:
        rows: list[dict[str, str]] = json.loads(stockflow(settings, "dlq", "list", "--json").stdout)
        found = {r["error_type"]: r for r in rows if sku in r["reason"] or r["bytes"] == str(len(garbage))}
        return found if len(found) == 2 else None

    by_type = wait_for("both dead letters in `stockflow dlq list`", ours)
    assert parked() >= before + 2  # `stockflow status` counts them (other tests may park more)
    assert "belongs on partition" in by_type["WrongPartition"]["reason"]
    assert "not an Avro single-object frame" in by_type["DecodeError"]["reason"]

    redriven = stockflow(settings, "dlq", "redrive", by_type["WrongPartition"]["id"])
    assert redriven.returncode == 0, redriven.stderr
    assert f"redriven as {stray.command_id}" in redriven.stdout
    row = wait_for(
        "the redriven restock in the read model",
        lambda: json.loads(stockflow(settings, "query", "stock", sku, "--json").stdout or "null"),
    )
    assert row["available"] == 9

    refused = stockflow(settings, "dlq", "redrive", by_type["DecodeError"]["id"])
    assert refused.returncode == 1
    assert "not redriven: not an Avro single-object frame" in refused.stderr


def test_status_json_reports_the_lag_of_every_partition_of_both_groups(
    settings: Settings, stack: LocalStack
) -> None:
    result = stockflow(settings, "status", "--once", "--json")
    assert result.returncode == 0, result.stderr
    groups = json.loads(result.stdout)["groups"]
    assert set(groups) == {settings.processor_group, settings.projection_group}
    for group in groups.values():
        assert len(group["partitions"]) == settings.partitions
        assert group["total"] == sum(group["partitions"].values())
    table = stockflow(settings, "status", "--once")
    assert table.returncode == 0, table.stderr
    assert settings.projection_group in table.stdout and "held by" in table.stdout
    assert f"dead letters: {settings.dlq_topic}" in " ".join(table.stdout.split())


@pytest.mark.usefixtures("stack")
def test_rebuild_folds_the_log_checks_it_and_refuses_to_switch_under_a_running_worker(
    settings: Settings, unique: Callable[[str], str]
) -> None:
    # A SKU on every partition: a rebuild gives a worker only partitions that hold events, and
    # two workers need events on partitions of both of their shares.
    skus = sku_on_every_partition(settings, unique("CLI-REBUILD"))
    for sku in skus:
        assert stockflow(settings, "publish", "restock", sku, "4").returncode == 0
    models = ReadModels(redis.Redis.from_url(settings.redis_url))
    wait_for("the restocks in the read models", lambda: all(models.stock(sku) for sku in skus), 60)
    try:
        result = stockflow(settings, "rebuild", "--database", "12", "--workers", "2", "--json")

        assert result.returncode == 0, result.stderr
        summary = json.loads(result.stdout)
        assert summary["events"] >= 1 and summary["workers"] == 2 and summary["mismatches"] == 0
        assert summary["verified_skus"] >= len(skus)

        refused = stockflow(settings, "rebuild", "--database", "12", "--switch")
        assert refused.returncode == 1
        assert "projection worker(s) in group" in refused.stderr
    finally:
        redis.Redis.from_url(database_url(settings.redis_url, 12)).flushdb()


@pytest.mark.usefixtures("stack")
def test_verify_and_publish_with_wait_exit_4_while_a_command_is_still_undecided(
    settings: Settings, unique: Callable[[str], str], tmp_path: Path
) -> None:
    # Topics and groups of their own, which no processor works on: the command stays undecided.
    own = own_settings(settings, unique, tmp_path)
    ensure_topics(own)
    publish_all(own, restock(unique("SKU"), 1))
    at_once = stockflow(own, "verify", "--json")
    assert at_once.returncode == 0, at_once.stderr  # lag alone is not a failure
    assert json.loads(at_once.stdout)["undecided"] == 1
    waited = stockflow(own, "verify", "--wait", "2")
    assert waited.returncode == 4, waited.stdout + waited.stderr
    assert "still behind after --wait 2: undecided commands: 1, views behind the log: 0" in waited.stderr
    assert "stockflow status" in waited.stderr
    for publish in (["order", unique("SKU"), "1"], ["restock", unique("SKU"), "1"]):
        sent = stockflow(own, "publish", *publish, "--wait", "1")
        assert sent.returncode == 4, sent.stdout + sent.stderr
        assert "partition" in sent.stdout  # sent, and said so
        said = " ".join(sent.stderr.split())  # as one line: the console wraps long ones
        assert "no decision about" in said and "(`stockflow status`)" in said
