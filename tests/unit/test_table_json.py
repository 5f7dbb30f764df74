"""The processor's changelog records are the JSON Faust's own "json" serializer reads and writes:
a changelog written by one stockflow is read by another, and by Faust itself."""

from __future__ import annotations

from typing import Any

import pytest
from faust.serializers import codecs

from processors.state import LINE_NUMBERS_BYTES, from_json, line_key, to_json, within_a_message
from schemas.codec import MAX_FRAME_BYTES

# One of each record the table writes (see CommandHandler), with a SKU outside ASCII.
RECORDS: list[tuple[str, Any]] = [
    ("s:SKU-00042", {"available": 17, "version": 9, "offset": 1234}),
    ("s:Früh-ß", {"available": 0, "version": 1, "offset": 0}),
    ("l:3:12", {"SKU-00042/0b5f-order": (2, 1234, -1, 1795800000000), "Früh-ß/o-2": (1, 7, 9, 5)}),
    ("r:3:4", [1200, 1234, ["6f1c-id", "77aa-id"]]),
    ("p:3", 1234),
]


def _plain(value: Any) -> Any:
    """``value`` as JSON gives it back: tuples become lists."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


@pytest.mark.parametrize(("key", "value"), RECORDS, ids=[key for key, _ in RECORDS])
def test_a_record_reads_back_with_fausts_json_and_with_the_table_reader(key: str, value: Any) -> None:
    for encoded, expected in ((to_json(key), key), (to_json(value), _plain(value))):
        assert codecs.loads("json", encoded) == expected
        assert from_json(encoded) == expected


def test_records_faust_wrote_read_back_with_the_table_reader() -> None:
    for key, value in RECORDS:
        assert from_json(codecs.dumps("json", key)) == key
        assert from_json(codecs.dumps("json", value)) == _plain(value)


def test_an_order_line_key_names_one_sku_and_one_order() -> None:
    pairs = [
        ("K", "RED/o"),
        ("K/RED", "o"),
        ("K/", "RED/o"),
        ("K", "/RED/o"),
        ("K/RED/o", "x"),
        ("K%2FRED", "o"),
        ("K RED", "o"),
        ("K/RED", " o"),
    ]
    assert len({line_key(sku, order_id) for sku, order_id in pairs}) == len(pairs)
    # A SKU without "/" keeps the key the changelogs already hold its lines under.
    assert line_key("SKU-00042", "0b5f/order") == "SKU-00042/0b5f/order"


def test_a_changelog_record_is_cut_only_when_its_ids_could_outgrow_a_message() -> None:
    usual = [f"SKU-00042/{n:036d}" for n in range(2000)]
    assert within_a_message(usual, LINE_NUMBERS_BYTES) == [slice(0, 2000)]
    # The longest SKU with a "/" and the longest order id, percent-encoded 4-byte characters.
    long = [line_key("/" + "\U0001d11e" * 63, f"{n:04d}" + "\U0001d11e" * 124) for n in range(1000)]
    runs = within_a_message(long, LINE_NUMBERS_BYTES)
    assert len(runs) > 1
    assert [name for run in runs for name in long[run]] == long
    for run in runs:
        record = {name: (2_147_483_647, 2**63 - 1, 2**63 - 1, 2**63 - 1) for name in long[run]}
        assert len(to_json(record)) <= MAX_FRAME_BYTES
