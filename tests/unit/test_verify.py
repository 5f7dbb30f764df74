"""`stockflow verify`'s check that a SKU's history holds together, event by event."""

from __future__ import annotations

import dataclasses

import pytest

from producers.commands import cancel_order, place_order, restock
from projections.views import order_document
from schemas.records import Command, Event
from stockflow.verify import SkuFold, inconsistency
from tests.history import decided


def problems(events: list[Event]) -> list[str]:
    fold, found = SkuFold(), []
    for event in events:
        problem = inconsistency(fold, event)
        if problem:
            found.append(problem)
        fold.available = event.available_after
    return found


def history() -> list[Event]:
    """Restock 10, order o-1 (3), an order too large (rejected), cancel o-1, order o-2 (2)."""
    return decided(
        "SKU-1",
        restock("SKU-1", 10),
        place_order("SKU-1", 3, order_id="o-1"),
        place_order("SKU-1", 50),
        cancel_order("SKU-1", "o-1"),
        place_order("SKU-1", 2, order_id="o-2"),
    )


def test_a_history_the_domain_decided_holds_together() -> None:
    events = history()
    assert [type(e).__name__ for e in events] == [
        "StockReplenished",
        "OrderProcessed",
        "OrderRejected",
        "OrderCancelled",
        "OrderProcessed",
    ]
    assert problems(events) == []


@pytest.mark.parametrize(
    ("tamper", "problem"),
    [
        # A cancel of an order the SKU never processed (another SKU's order of the same id, as
        # the processor once took a line of SKU "K" for one of "K/RED").
        (lambda e: e[:1] + e[2:], "order o-1 cancelled, never processed"),
        (lambda e: [*e[:4], e[3], *e[4:]], "order o-1 cancelled, already cancelled"),
        (lambda e: [*e[:2], e[1], *e[2:]], "available 7 after OrderProcessed, 4 by the log"),
        (lambda e: [*e[:3], dataclasses.replace(e[3], qty=5, available_after=12), *e[4:]], "with qty 5"),
        (
            lambda e: [*e[:1], dataclasses.replace(e[1], available_after=8), *e[2:]],
            "available 8 after OrderProcessed, 7 by",
        ),
    ],
)
def test_a_history_no_decisions_could_give_is_named(tamper: object, problem: str) -> None:
    found = problems(tamper(history()))  # type: ignore[operator]
    assert any(problem in line for line in found), found


def test_the_fold_keeps_each_decisions_document_under_its_own_field() -> None:
    # What the projection writes (HSETNX): a document per decision about a line, under a field
    # its event names. Here o-1 placed again (rejected: it exists), cancelled twice, and its
    # processing logged again after a crash (the same field: nothing new).
    commands: list[Command] = [
        restock("SKU-1", 10),
        place_order("SKU-1", 3, order_id="o-1"),
        place_order("SKU-1", 50, order_id="o-big"),
        cancel_order("SKU-1", "o-1"),
        place_order("SKU-1", 2, order_id="o-1"),
        cancel_order("SKU-1", "o-1"),
    ]
    events = decided("SKU-1", *commands)
    assert [type(e).__name__ for e in events[4:]] == ["OrderRejected", "OrderRejected"]
    fold = SkuFold()
    for offset, event in enumerate([*events, events[1]]):
        fold.add(event, offset)
    offsets = {
        order: {name: offset for name, (offset, _) in line.items()} for order, line in fold.documents.items()
    }
    assert offsets == {
        "o-1": {"SKU-1:processed:2": 1, "SKU-1:cancelled:4": 3, "SKU-1:rejected:5": 4, "SKU-1:rejected:6": 5},
        "o-big": {"SKU-1:rejected:3": 2},
    }
    assert fold.documents["o-1"]["SKU-1:rejected:5"][1] == order_document(events[4]).encode()
