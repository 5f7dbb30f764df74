"""The inventory rules, as given events / when a command / then events."""

from __future__ import annotations

import uuid

from hypothesis import given, settings
from hypothesis import strategies as st

from processors.domain import Stock, decide, evolve, fold
from producers.commands import cancel_order, place_order, restock
from schemas.records import (
    Command,
    Event,
    OrderCancelled,
    OrderProcessed,
    OrderRejected,
    RestockRejected,
    StockReplenished,
    event_id_for,
)

SKU = "SKU-1"
NOW = 1_700_000_000_000


def given_(*commands: Command) -> Stock:
    """The state after deciding ``commands`` in order."""
    state = Stock(SKU)
    for command in commands:
        for event in decide(state, command, NOW):
            state = evolve(state, event)
    return state


def test_an_order_within_stock_is_processed_and_reserves_the_units() -> None:
    state = given_(restock(SKU, 5))
    order = place_order(SKU, 3, order_id="o-1")
    [event] = decide(state, order, NOW)
    assert isinstance(event, OrderProcessed)
    assert (event.order_id, event.qty, event.available_after, event.version) == ("o-1", 3, 2, 2)
    assert (event.command_id, event.correlation_id, event.command_occurred_at) == (
        order.command_id,
        order.correlation_id,
        order.occurred_at,
    )
    assert evolve(state, event).available == 2


def test_an_order_beyond_stock_is_rejected_with_the_reason_and_changes_nothing() -> None:
    state = given_(restock(SKU, 2))
    [event] = decide(state, place_order(SKU, 3), NOW)
    assert isinstance(event, OrderRejected)
    assert event.reason == "insufficient stock: 3 requested, 2 available"
    assert event.available_after == 2
    assert evolve(state, event).available == 2


def test_a_command_decided_before_yields_nothing() -> None:
    order = place_order(SKU, 1)
    state = given_(restock(SKU, 5), order)
    assert decide(state, order, NOW) == []


def test_the_same_command_gets_the_same_event_id_when_decided_again_from_the_same_state() -> None:
    state = given_(restock(SKU, 5))
    order = place_order(SKU, 1)
    assert decide(state, order, NOW) == decide(state, order, NOW)


def test_expected_version_must_match() -> None:
    state = given_(restock(SKU, 5))  # version 1
    [stale] = decide(state, place_order(SKU, 1, expected_version=0), NOW)
    assert isinstance(stale, OrderRejected)
    assert stale.reason == "version conflict: expected 0, SKU is at 1"
    [fresh] = decide(state, place_order(SKU, 1, expected_version=1), NOW)
    assert isinstance(fresh, OrderProcessed)
    [restock_conflict] = decide(state, restock(SKU, 1, expected_version=7), NOW)
    assert isinstance(restock_conflict, RestockRejected)


def test_cancel_releases_a_processed_order_once() -> None:
    order = place_order(SKU, 2, order_id="o-1")
    state = given_(restock(SKU, 5), order)
    [cancelled] = decide(state, cancel_order(SKU, "o-1"), NOW)
    assert isinstance(cancelled, OrderCancelled)
    assert (cancelled.qty, cancelled.available_after) == (2, 5)
    state = evolve(state, cancelled)
    [again] = decide(state, cancel_order(SKU, "o-1"), NOW)
    assert isinstance(again, OrderRejected)
    assert again.reason == "order o-1 is already cancelled"
    [unknown] = decide(state, cancel_order(SKU, "o-404"), NOW)
    assert isinstance(unknown, OrderRejected)
    assert unknown.reason.startswith("order o-404 was never processed for this SKU, or was placed")


def test_an_order_id_cannot_be_placed_twice_on_one_sku() -> None:
    state = given_(restock(SKU, 5), place_order(SKU, 1, order_id="o-1"))
    [event] = decide(state, place_order(SKU, 1, order_id="o-1"), NOW)
    assert isinstance(event, OrderRejected)
    assert event.reason == "order o-1 already exists for this SKU"


def test_restock_adds_units_and_every_event_bumps_the_version() -> None:
    state = given_(restock(SKU, 5), place_order(SKU, 9), restock(SKU, 2))
    assert (state.available, state.version) == (7, 3)
    [event] = decide(state, restock(SKU, 1), NOW)
    assert isinstance(event, StockReplenished)
    assert event.version == 4


commands = st.one_of(
    st.builds(lambda q: restock(SKU, q), st.integers(1, 20)),
    st.builds(lambda q, o: place_order(SKU, q, order_id=f"o-{o}"), st.integers(1, 20), st.integers(0, 9)),
    st.builds(lambda o: cancel_order(SKU, f"o-{o}"), st.integers(0, 9)),
)


@settings(max_examples=200)
@given(st.lists(commands, max_size=60), st.data())
def test_stock_never_goes_negative_and_replay_is_deterministic(
    history: list[Command], data: st.DataObject
) -> None:
    # Some commands arrive twice, as retries do.
    retried = [c for c in history for _ in range(data.draw(st.integers(1, 2)))]
    state, log = Stock(SKU), list[Event]()
    for command in retried:
        for event in decide(state, command, NOW):
            state = evolve(state, event)
            log.append(event)
        assert state.available >= 0
    assert len(log) == len({c.command_id for c in history})  # one decision per command
    assert [e.version for e in log] == list(range(1, len(log) + 1))
    assert fold(SKU, log) == state  # the log alone rebuilds the state
    reserved = sum(line.qty for line in state.orders.values() if not line.cancelled)
    restocked = sum(e.qty for e in log if isinstance(e, StockReplenished))
    assert state.available + reserved == restocked  # no unit created or lost


def test_event_ids_are_the_uuid5_of_the_command_id_and_index() -> None:
    namespace = uuid.UUID("6f1c7a52-3a57-4c1e-9a53-2f4f0d6c1b7e")
    for command_id in ("c-1", str(uuid.uuid4()), "ünïcode"):
        for index in (0, 1, 7):
            assert event_id_for(command_id, index) == str(uuid.uuid5(namespace, f"{command_id}/{index}"))
