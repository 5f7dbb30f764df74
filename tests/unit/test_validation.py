from __future__ import annotations

import json
import uuid

import fastavro
import pytest

from producers.commands import cancel_order, place_order, restock
from schemas.codec import SCHEMA_DIR
from schemas.records import MAX_QTY, MAX_VERSION, Command, validate_command
from stockflow.errors import InvalidCommand


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (place_order("SKU-1", 0), "qty is 0: it must be a whole number of units, at least 1"),
        (place_order("SKU-1", -3), "qty is -3"),
        (place_order("", 1), "sku is empty"),
        (place_order("   ", 1), "sku is empty"),
        (place_order("S" * 65, 1), "sku is 65 characters long: at most 64"),
        (restock("SKU-1", 0), "qty is 0"),
        (cancel_order("SKU-1", ""), "order_id is empty"),
        (cancel_order("SKU-1", "o" * 129), "order_id is 129 characters long: at most 128"),
        (restock("SKU-1", 1, command_id="c" * 129), "command_id is 129 characters long: at most 128"),
        (place_order("SKU-1", 1, correlation_id="r" * 200), "correlation_id is 200 characters long"),
        (place_order("SKU-1", 1, expected_version=-1), "expected_version is -1"),
        (place_order("SKU-1", 2**31), "qty is 2147483648: at most 2147483647 units in one command"),
        (restock("SKU-1", 10**30), "qty is 1000000000000000000000000000000: at most"),
        (place_order("SKU-1", 1, expected_version=2**63), "expected_version is 9223372036854775808: use a"),
        # Bytes that were not UTF-8 (a command line's), or a JSON escape of half a surrogate pair
        (place_order("SKU-\udcff", 1), "sku holds U[+]DCFF at character 4, which is not text"),
        (cancel_order("SKU-1", "o-\ud800"), "order_id holds U[+]D800 at character 2"),
        (restock("SKU-1", 1, command_id="\udc80"), "command_id holds U[+]DC80"),
    ],
)
def test_invalid_commands_are_refused_with_what_to_fix(command: Command, message: str) -> None:
    with pytest.raises(InvalidCommand, match=message):
        validate_command(command)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(InvalidCommand) as caught:
        validate_command(place_order("", 0))
    assert "sku is empty" in str(caught.value)
    assert "qty is 0" in str(caught.value)


def test_valid_commands_pass() -> None:
    for command in (
        place_order("SKU-1", 1),
        restock("SKU-1", 5),
        cancel_order("SKU-1", "o-1"),
        restock("SKU-1", MAX_QTY, expected_version=MAX_VERSION),
        place_order("S" * 64, 1, order_id="o" * 128, correlation_id="r" * 128, command_id="c" * 128),
        place_order("Kaffeebohne-é-豆-☕", 1, order_id="o-\U0001f600"),  # any character of text
    ):
        validate_command(command)


def test_the_largest_values_allowed_are_the_schemas_own() -> None:
    schema = fastavro.parse_schema(json.loads((SCHEMA_DIR / "Restock.v1.avsc").read_text()))
    fields = vars(restock("SKU-1", MAX_QTY, expected_version=MAX_VERSION))
    assert fastavro.validate(fields, schema)
    for too_large in ({"qty": MAX_QTY + 1}, {"expected_version": MAX_VERSION + 1}):
        assert not fastavro.validate({**fields, **too_large}, schema, raise_errors=False)


def test_new_ids_are_distinct_random_uuids_in_canonical_text() -> None:
    ids = [place_order("SKU-1", 1).command_id for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert (parsed.version, parsed.variant, str(parsed)) == (4, uuid.RFC_4122, text)
    # Every hex digit outside the fixed version nibble varies, the variant digit over 8, 9, a, b.
    assert {text[19] for text in ids} == set("89ab")
    assert all(len({text[i] for text in ids}) == 16 for i in range(36) if i not in (8, 13, 14, 18, 19, 23))
