"""Build event histories through the real domain, for tests of what consumes events."""

from __future__ import annotations

from processors.domain import Stock, decide, evolve
from schemas.records import Command, Event


def decided(sku: str, *commands: Command, now_ms: int = 1) -> list[Event]:
    """The events that deciding ``commands`` in order, from an empty SKU, appends to the log."""
    state, events = Stock(sku), []
    for command in commands:
        for event in decide(state, command, now_ms):
            state = evolve(state, event)
            events.append(event)
    return events
