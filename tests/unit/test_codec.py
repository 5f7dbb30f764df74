"""The Avro contract: round trips, framing, and refusing what cannot be read."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import fastavro
import pytest
from fastavro.schema import fingerprint, to_parsing_canonical_form

from producers.commands import cancel_order, place_order, restock
from schemas.codec import HEADER_SIZE, MAGIC, SCHEMA_DIR, AvroCodec, codec
from schemas.records import COMMAND_TYPES, EVENT_TYPES, Command, Record, Restock
from stockflow.errors import DecodeError
from tests.history import decided


def every_record() -> list[Record]:
    order = place_order("SKU-1", 2, order_id="o-1", expected_version=1)
    commands: list[Command] = [
        restock("SKU-1", 5),
        order,
        place_order("SKU-1", 99),
        cancel_order("SKU-1", "o-1"),
        restock("SKU-1", 1, expected_version=0),
    ]
    return [*commands, *decided("SKU-1", *commands)]


def test_every_record_type_is_covered() -> None:
    assert {type(r) for r in every_record()} == {*COMMAND_TYPES, *EVENT_TYPES}


@pytest.mark.parametrize("record", every_record(), ids=lambda r: type(r).__name__)
def test_round_trip(record: Record) -> None:
    data = codec.encode(record)
    assert data[:2] == MAGIC
    assert codec.decode(data) == record


def test_commands_and_events_are_told_apart() -> None:
    with pytest.raises(DecodeError, match="expected an event, got a Restock command"):
        codec.decode_event(codec.encode(restock("SKU-1", 1)))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not an Avro single-object frame"),
        (b'{"sku": "x"}', "not an Avro single-object frame"),
        (MAGIC + b"\x00" * 8 + b"\x02", "unknown schema fingerprint 0000000000000000"),
    ],
)
def test_bytes_that_are_not_a_known_frame_are_refused_with_the_reason(data: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        codec.decode(data)


def test_a_truncated_body_is_refused() -> None:
    data = codec.encode(place_order("SKU-1", 1))
    with pytest.raises(DecodeError, match="corrupt PlaceOrder v1 body"):
        codec.decode(data[: HEADER_SIZE + 3])


def test_a_message_written_with_an_older_schema_is_read_with_the_newest(tmp_path: Path) -> None:
    # Pretend Restock once had no expected_version (v0). A v0 message, framed with v0's
    # fingerprint, must decode to today's Restock with the field's default.
    for path in SCHEMA_DIR.glob("*.avsc"):
        (tmp_path / path.name).write_text(path.read_text())
    v1 = json.loads((SCHEMA_DIR / "Restock.v1.avsc").read_text())
    v0 = {**v1, "fields": [f for f in v1["fields"] if f["name"] != "expected_version"]}
    (tmp_path / "Restock.v0.avsc").write_text(json.dumps(v0))
    body = io.BytesIO()
    fields = {"command_id": "c-1", "correlation_id": "c-1", "occurred_at": 5, "sku": "SKU-1", "qty": 4}
    fastavro.schemaless_writer(body, fastavro.parse_schema(v0), fields)
    fp = bytes.fromhex(fingerprint(to_parsing_canonical_form(v0), "CRC-64-AVRO"))

    decoded = AvroCodec(tmp_path).decode(MAGIC + fp + body.getvalue())

    assert decoded == Restock("c-1", "c-1", 5, "SKU-1", 4, expected_version=None)
    with pytest.raises(DecodeError, match="unknown schema fingerprint"):
        codec.decode(MAGIC + fp + body.getvalue())  # the shipped codec never saw v0


def test_each_record_class_has_exactly_the_fields_of_its_newest_schema() -> None:
    for cls in (*COMMAND_TYPES, *EVENT_TYPES):
        newest = max(SCHEMA_DIR.glob(f"{cls.__name__}.v*.avsc"), key=lambda p: int(p.name.split(".")[1][1:]))
        schema_fields = [f["name"] for f in json.loads(newest.read_text())["fields"]]
        assert schema_fields == [f.name for f in dataclasses.fields(cls)], cls.__name__


def test_every_historical_schema_resolves_to_the_newest_version() -> None:
    by_name: dict[str, list[Path]] = {}
    for path in SCHEMA_DIR.glob("*.avsc"):
        by_name.setdefault(path.name.split(".")[0], []).append(path)
    examples = {type(r).__name__: r for r in every_record()}
    for name, paths in by_name.items():
        paths.sort(key=lambda p: int(p.name.split(".")[1][1:]))
        reader = fastavro.parse_schema(json.loads(paths[-1].read_text()))
        for path in paths:
            writer = fastavro.parse_schema(json.loads(path.read_text()))
            buffer = io.BytesIO()
            fastavro.schemaless_writer(buffer, writer, dataclasses.asdict(examples[name]))
            buffer.seek(0)
            fastavro.schemaless_reader(buffer, writer, reader)  # raises if not resolvable
