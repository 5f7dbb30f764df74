from __future__ import annotations

import dataclasses

import pytest

from schemas.records import OrderProcessed, PlaceOrder, _one_step_init


def test_records_are_built_with_every_field_and_stay_frozen() -> None:
    command = PlaceOrder("c-1", "r-1", 1, "SKU-1", "o-1", 2)
    assert dataclasses.asdict(command) == {
        "command_id": "c-1",
        "correlation_id": "r-1",
        "occurred_at": 1,
        "sku": "SKU-1",
        "order_id": "o-1",
        "qty": 2,
        "expected_version": None,
    }
    assert command == PlaceOrder(
        command_id="c-1", correlation_id="r-1", occurred_at=1, sku="SKU-1", order_id="o-1", qty=2
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        command.qty = 3  # type: ignore[misc]
    with pytest.raises(TypeError, match="missing 1 required positional argument: 'qty'"):
        OrderProcessed("e", "c", "r", 1, 1, "SKU-1", 1, "o-1", available_after=0)  # type: ignore[call-arg]


def test_a_field_it_cannot_set_in_one_step_is_refused() -> None:
    @dataclasses.dataclass(frozen=True)
    class WithFactory:
        ids: list[str] = dataclasses.field(default_factory=list)

    with pytest.raises(TypeError, match="WithFactory: its fields cannot be set in one step"):
        _one_step_init(WithFactory)
