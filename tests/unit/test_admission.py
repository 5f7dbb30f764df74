"""Admission control: closes at the high-water mark, reopens only below the low-water mark."""

from __future__ import annotations

import pytest

from stockflow.errors import StackError
from stockflow.lag import Admission, Overloaded
from stockflow.settings import Settings


def admission(lags: list[int]) -> Admission:
    settings = Settings(backpressure_high_water=1000, backpressure_low_water=200, backpressure_refresh_s=1e-6)
    readings = iter(lags)
    return Admission(settings, lambda: next(readings))


def test_hysteresis_between_the_two_marks() -> None:
    gate = admission([500, 1000, 600, 199, 600])
    gate.admit(0)  # 500: open
    with pytest.raises(Overloaded):
        gate.admit(0)  # 1000: closes
    with pytest.raises(Overloaded):
        gate.admit(0)  # 600: still closed, above the low-water mark
    gate.admit(0)  # 199: open again
    gate.admit(0)  # 600: stays open below the high-water mark
    assert not gate.closed


def test_a_waiting_caller_gets_through_once_the_lag_drains() -> None:
    gate = admission([5000, 4000, 2000, 100])
    gate.admit(wait_s=5)
    assert not gate.closed and gate.waited_s > 0


def test_overloaded_says_how_far_behind_and_when_to_retry() -> None:
    gate = admission([3000, 2000, 2000])
    with pytest.raises(Overloaded) as refused:
        gate.admit(0)
    assert refused.value.lag == 3000
    assert "STOCKFLOW_BACKPRESSURE_HIGH_WATER" in str(refused.value)
    with pytest.raises(Overloaded) as again:
        gate.admit(0)  # fell 1000 in one refresh: about 2 refreshes to reach 200
    assert again.value.retry_after_ms >= 1


def test_the_low_water_mark_must_be_below_the_high_one() -> None:
    with pytest.raises(ValueError, match="LOW_WATER"):
        Settings(backpressure_high_water=100, backpressure_low_water=100)


def test_a_lag_that_cannot_be_read_keeps_the_last_reading() -> None:
    settings = Settings(backpressure_high_water=1000, backpressure_low_water=200, backpressure_refresh_s=1e-6)
    readings = iter([100, None, 5000])

    def read() -> int:
        value = next(readings)
        if value is None:
            raise StackError("Not coordinator")  # the broker is restarting
        return value

    gate = Admission(settings, read)
    gate.admit(0)
    gate.admit(0)  # unreadable: still open, nothing raised
    assert gate.lag == 100 and not gate.closed
    with pytest.raises(Overloaded):
        gate.admit(0)
