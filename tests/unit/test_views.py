"""What a batch of events plans to write, before any Redis is involved."""

from __future__ import annotations

import json
from typing import Any

from producers.commands import cancel_order, place_order, restock
from projections.queries import order_not_found
from projections.views import (
    ORDER_STATUS,
    WritePlan,
    command_decision,
    latency_bucket,
    line_status,
    order_document,
    percentile,
    plan_writes,
    restock_document,
)
from schemas.records import Event, OrderProcessed, OrderRejected
from tests.history import decided


def test_watermarks_are_the_last_offset_per_partition_dead_letters_included() -> None:
    events = decided("SKU-1", restock("SKU-1", 1))
    plan = plan_writes([(0, 5, events[0]), (3, 7, None), (0, 6, None)])
    assert plan.watermarks == {0: 6, 3: 7}
    assert plan.sku_events["SKU-1"].script_args[::4] == [1]  # the versions


def lines(plan: WritePlan, order_id: str) -> dict[str, dict[str, Any]]:
    """The order's lines as a read would show them after the plan is written to Redis."""
    return line_status({name: doc for (order, name), doc in plan.order_lines.items() if order == order_id})


def test_a_refused_cancel_does_not_overwrite_the_cancelled_order() -> None:
    order = place_order("SKU-1", 1, order_id="o-1")
    events = decided(
        "SKU-1", restock("SKU-1", 3), order, cancel_order("SKU-1", "o-1"), cancel_order("SKU-1", "o-1")
    )
    plan = plan_writes([(0, i, e) for i, e in enumerate(events)])
    assert isinstance(events[-1], OrderRejected)
    line = lines(plan, "o-1")["SKU-1"]
    assert (line["status"], line["version"]) == ("cancelled", 3)
    # The client that sent the second cancel reads why it was refused on the order itself.
    assert line["refused"] == {
        "reason": "order o-1 is already cancelled",
        "version": 4,
        "updated_at": events[-1].occurred_at,
        "command_id": events[-1].command_id,
    }


def test_a_cancel_with_a_stale_version_shows_as_refused_on_the_processed_line() -> None:
    place = place_order("SKU-1", 1, order_id="o-1")
    events = decided("SKU-1", restock("SKU-1", 3), place, cancel_order("SKU-1", "o-1", expected_version=1))
    line = lines(plan_writes([(0, i, e) for i, e in enumerate(events)]), "o-1")["SKU-1"]
    assert (line["status"], line["refused"]["reason"]) == (
        "processed",
        "version conflict: expected 1, SKU is at 2",
    )


def test_a_repeated_older_decision_does_not_win_over_a_newer_one() -> None:
    order = place_order("SKU-1", 1, order_id="o-1")
    events = decided("SKU-1", restock("SKU-1", 3), order, cancel_order("SKU-1", "o-1"))
    replayed = [*events, events[1]]  # the processed event again, after the cancel
    line = lines(plan_writes([(0, i, e) for i, e in enumerate(replayed)]), "o-1")["SKU-1"]
    assert (line["status"], line["version"]) == ("cancelled", 3)


def test_an_order_rejected_then_placed_again_shows_processed() -> None:
    events = decided(
        "SKU-1",
        place_order("SKU-1", 2, order_id="o-1"),  # no stock yet: rejected
        restock("SKU-1", 5),
        place_order("SKU-1", 2, order_id="o-1"),
    )
    assert [type(e).__name__ for e in events] == ["OrderRejected", "StockReplenished", "OrderProcessed"]
    line = lines(plan_writes([(0, i, e) for i, e in enumerate(events)]), "o-1")["SKU-1"]
    assert (line["status"], line["version"]) == ("processed", 3)
    assert "refused" not in line  # the rejection was of the first place, before this one


def test_every_refusal_is_kept_and_the_newest_shows() -> None:
    events = decided(
        "SKU-1",
        restock("SKU-1", 5),
        place_order("SKU-1", 2, order_id="o-1"),
        place_order("SKU-1", 2, order_id="o-1"),  # a duplicate order id: refused
        cancel_order("SKU-1", "o-1", expected_version=1),  # a stale version: refused
    )
    assert [type(e).__name__ for e in events[2:]] == ["OrderRejected", "OrderRejected"]
    plan = plan_writes([(0, i, e) for i, e in enumerate(events)])
    line = lines(plan, "o-1")["SKU-1"]
    assert (line["status"], line["refused"]["version"]) == ("processed", 4)
    assert line["refused"]["reason"] == "version conflict: expected 1, SKU is at 3"
    fields = {name: doc for (_, name), doc in plan.order_lines.items()}
    assert sorted(fields) == ["SKU-1:processed:2", "SKU-1:rejected:3", "SKU-1:rejected:4"]
    # Each refused command finds its own decision on the order.
    for event in events[1:]:
        decision = command_decision(fields, event.command_id)
        assert decision is not None
        assert (decision["sku"], decision["version"]) == ("SKU-1", event.version)
    assert command_decision(fields, events[0].command_id) is None  # the restock: not about o-1


def test_an_order_id_placed_again_after_its_cancel_shows_the_new_order() -> None:
    # The processor forgets a line once the cancel window has passed: the same id is a new order.
    events = decided(
        "SKU-1", restock("SKU-1", 5), place_order("SKU-1", 2, order_id="o-1"), cancel_order("SKU-1", "o-1")
    )
    again = OrderProcessed(
        **{**vars(events[1]), "event_id": "e-again", "command_id": "c-again", "version": 9}
    )
    line = lines(plan_writes([(0, i, e) for i, e in enumerate([*events, again])]), "o-1")["SKU-1"]
    assert (line["status"], line["version"], line["command_id"]) == ("processed", 9, "c-again")


def test_a_line_shows_its_newest_decision_per_sku() -> None:
    def doc(status: str, version: int) -> str:
        return json.dumps({"status": status, "version": version})

    fields = {
        "A:B:rejected:1": doc("rejected", 1),
        "A:B:processed:2": doc("processed", 2),
        "C:rejected:1": doc("rejected", 1),
        "C:rejected:4": doc("rejected", 4),
    }
    assert line_status(fields) == {
        "A:B": {"status": "processed", "version": 2},
        "C": {"status": "rejected", "version": 4},
    }
    fields["A:B:cancelled:3"] = doc("cancelled", 3)
    assert line_status(fields)["A:B"] == {"status": "cancelled", "version": 3}
    # Lines older projections wrote: a field per status ("<SKU>:<status>", first one kept), and
    # before that one field per SKU, named by the SKU alone.
    older = {"A:B:processed": doc("processed", 2), "A:B:cancelled": doc("cancelled", 3)}
    assert line_status(older) == {"A:B": {"status": "cancelled", "version": 3}}
    assert line_status({"OLD:1": doc("processed", 1)}) == {"OLD:1": {"status": "processed", "version": 1}}


def test_latency_buckets_keep_two_significant_digits() -> None:
    assert [latency_bucket(ms) for ms in (-3, 0, 7, 99, 100, 123, 1999, 45_678)] == [
        0,
        0,
        7,
        99,
        100,
        120,
        1900,
        45_000,
    ]


def test_percentiles_of_a_histogram() -> None:
    histogram = {1: 50, 2: 40, 10: 9, 500: 1}
    assert percentile(histogram, 0.5) == 1
    assert percentile(histogram, 0.9) == 2
    assert percentile(histogram, 0.99) == 10
    assert percentile(histogram, 0.999) == 500
    assert percentile({}, 0.99) == 0


def test_an_order_document_is_the_json_of_its_status() -> None:
    awkward = OrderRejected(
        "e", 'c "1" \\', "c", 1, 1, "SKU-1", 3, "o-1", 2, 0, 'a "quoted" \\ reason, ünïcode'
    )
    events: list[Event] = [*decided("SKU-1", place_order("SKU-1", 1), restock("SKU-1", 1)), awkward]
    events.append(decided("SKU-1", restock("SKU-1", 5), place_order("SKU-1", 2))[1])
    for event in events:
        if not hasattr(event, "order_id"):
            continue
        expected = {
            "status": ORDER_STATUS[type(event)],
            "qty": event.qty,
            "reason": getattr(event, "reason", ""),
            "version": event.version,
            "updated_at": event.occurred_at,
            "command_id": event.command_id,
        }
        assert json.loads(order_document(event)) == expected


def test_the_plan_notes_each_orders_newest_decision_for_its_retention() -> None:
    placed = place_order("SKU-1", 2)
    placing = decided("SKU-1", restock("SKU-1", 5), placed, now_ms=1_000)
    cancelling = decided(
        "SKU-1", restock("SKU-1", 5), placed, cancel_order("SKU-1", placed.order_id), now_ms=9_000
    )
    plan = plan_writes([(0, 0, placing[0]), (0, 1, placing[1]), (0, 2, cancelling[2])], expiring=True)
    assert plan.order_decided_at == {placed.order_id: 9_000}  # the cancel's, not the placing's
    assert plan.orders_cancelled == {placed.order_id}
    placed_only = plan_writes([(0, 1, placing[1])], expiring=True)
    assert (placed_only.order_decided_at, placed_only.orders_cancelled) == ({placed.order_id: 1_000}, set())


def test_a_missing_order_names_the_retention_only_when_there_is_one() -> None:
    assert order_not_found("o-1", 0) == "no decision about order 'o-1' is projected yet"
    assert "it expired: STOCKFLOW_ORDER_RETENTION_S (86400 s)" in order_not_found("o-1", 86_400)


def test_a_restock_goes_to_its_skus_script_as_the_document_of_its_decision() -> None:
    events = decided("SKU-1", restock("SKU-1", 3), place_order("SKU-1", 1, order_id="o-1"))
    args = plan_writes([(0, i, e) for i, e in enumerate(events)]).sku_events["SKU-1"].script_args
    assert args[3] == restock_document(events[0])  # the restock's: version, kind, qty, document
    assert json.loads(args[3]) | {"updated_at": 0} == {
        "status": "replenished",
        "qty": 3,
        "reason": "",
        "version": 1,
        "updated_at": 0,
        "command_id": events[0].command_id,
    }
    assert args[4:] == [2, "processed", 1, "o-1"]  # an order's: its id
