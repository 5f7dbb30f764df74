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
from schemas.codec import BATCHES, HEADER_SIZE, MAGIC, MAX_FRAME_BYTES, SCHEMA_DIR, AvroCodec, codec
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
    assert codec.decode(data) == [record]


def test_a_batch_frame_round_trips_in_order() -> None:
    records = every_record()
    commands = [r for r in records if isinstance(r, COMMAND_TYPES)]
    events = [r for r in records if isinstance(r, EVENT_TYPES)]
    assert codec.decode_commands(codec.encode_batch(commands)) == commands
    assert codec.decode_events(codec.encode_batch(events)) == events


def test_batch_frames_hold_every_record_in_order_within_the_count_and_the_bytes() -> None:
    usual = [place_order("SKU-1", 1) for _ in range(2500)]
    frames = codec.encode_batches(usual, 1000)
    assert [len(records) for records, _ in frames] == [1000, 1000, 500]  # usual ids: cut by count
    # The longest ids allowed, of 4-byte characters: 1,000 are over 1 MB of Avro.
    long = [
        place_order("S" * 64, 1, order_id=f"{i:04d}" + "\U0001d11e" * 124, correlation_id="\U0001d11e" * 128)
        for i in range(1000)
    ]
    frames = codec.encode_batches(long, 1000)
    assert len(frames) > 1
    assert all(len(frame) <= MAX_FRAME_BYTES for _, frame in frames)
    assert [record for records, _ in frames for record in records] == long
    assert [record for _, frame in frames for record in codec.decode(frame)] == long


def test_a_batch_holds_commands_or_events_not_both() -> None:
    with pytest.raises(ValueError, match="only commands or only events"):
        codec.encode_batch(every_record())


def test_commands_and_events_are_told_apart() -> None:
    with pytest.raises(DecodeError, match="expected events, got a Restock command"):
        codec.decode_events(codec.encode(restock("SKU-1", 1)))
    commands: list[Command] = [restock("SKU-1", 1), place_order("SKU-1", 1)]
    with pytest.raises(DecodeError, match="expected events, got a Restock command"):
        codec.decode_events(codec.encode_batch(commands))


def test_each_batch_schema_embeds_the_newest_schema_of_every_member() -> None:
    # A new version of a command or event needs a new version of its batch, or batch frames
    # would go on being written with the old one.
    for batch, (field, members) in BATCHES.items():
        newest = max(SCHEMA_DIR.glob(f"{batch}.v*.avsc"), key=lambda p: int(p.name.split(".")[1][1:]))
        [array] = [f["type"] for f in json.loads(newest.read_text())["fields"] if f["name"] == field]
        embedded = {item["name"]: item for item in array["items"]}
        assert set(embedded) == {cls.__name__ for cls in members}, batch
        for name, schema in embedded.items():
            member = max(SCHEMA_DIR.glob(f"{name}.v*.avsc"), key=lambda p: int(p.name.split(".")[1][1:]))
            assert schema == json.loads(member.read_text()), f"{batch} embeds an old {name}: add {batch} v+1"


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

    [decoded] = AvroCodec(tmp_path).decode(MAGIC + fp + body.getvalue())

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
    examples = {type(r).__name__: vars(r) for r in every_record()}
    commands = [r for r in every_record() if isinstance(r, COMMAND_TYPES)]
    events = [r for r in every_record() if isinstance(r, EVENT_TYPES)]
    for batch, records in (("CommandBatch", commands), ("EventBatch", events)):
        field = BATCHES[batch][0]
        examples[batch] = {field: [(f"stockflow.{type(r).__name__}", vars(r)) for r in records]}
    for name, paths in by_name.items():
        paths.sort(key=lambda p: int(p.name.split(".")[1][1:]))
        reader = fastavro.parse_schema(json.loads(paths[-1].read_text()))
        for path in paths:
            writer = fastavro.parse_schema(json.loads(path.read_text()))
            buffer = io.BytesIO()
            fastavro.schemaless_writer(buffer, writer, examples[name])
            buffer.seek(0)
            fastavro.schemaless_reader(buffer, writer, reader)  # raises if not resolvable
