"""The on-time forecast behind SSE ``metrics`` frames."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from orch.core.forecast import MIN_SPREAD_MS, RateTracker, on_time_probability


def steady_pool(tasks: int = 10, first_ms: float = 100.0, per_token_ms: float = 20.0) -> RateTracker:
    rates = RateTracker()
    for _ in range(tasks):
        rates.observe(first_ms, tokens=51, decode_ms=first_ms + 50 * per_token_ms)
    return rates


def test_the_tracker_learns_the_pool_rates():
    rates = steady_pool()
    assert abs(rates.first_token_ms - 100) < 1e-6 and abs(rates.ms_per_token - 20) < 1e-6
    assert abs(rates.tokens_per_s - 50) < 1e-6 and rates.tasks == 10
    expected, spread = rates.remaining_ms(10, first_token_seen=True)
    assert expected == 200 and spread == MIN_SPREAD_MS
    queued, _ = rates.remaining_ms(10, first_token_seen=False, wait_ms=500)
    assert queued == 500 + 100 + 200


def test_nothing_is_forecast_before_anything_was_measured():
    assert RateTracker().remaining_ms(10, first_token_seen=True) is None
    assert RateTracker().tokens_per_s is None


def test_probability_follows_the_deadline():
    rates = steady_pool()
    expected, spread = rates.remaining_ms(50, first_token_seen=True)  # about 1 s left to do
    generous = on_time_probability(5_000, expected, spread)
    tight = on_time_probability(300, expected, spread)
    borderline = on_time_probability(expected, expected, spread)
    assert generous > 0.99 and tight < 0.01 and borderline == 0.5
    assert on_time_probability(0, expected, spread) == 0.0


def test_an_erratic_pool_is_less_sure_than_a_steady_one():
    steady, erratic = steady_pool(), RateTracker()
    for index in range(10):
        per_token = 10.0 if index % 2 else 30.0
        erratic.observe(100.0, tokens=51, decode_ms=100 + 50 * per_token)
    time_left = 1.3 * steady.remaining_ms(50, first_token_seen=True)[0]
    assert on_time_probability(time_left, *erratic.remaining_ms(50, first_token_seen=True)) < \
        on_time_probability(time_left, *steady.remaining_ms(50, first_token_seen=True))


@given(left=st.floats(min_value=0, max_value=1e6), expected=st.floats(min_value=0, max_value=1e6),
       spread=st.floats(min_value=1, max_value=1e5))
def test_probability_is_a_probability_and_grows_with_time_left(left, expected, spread):
    p = on_time_probability(left, expected, spread)
    assert 0.0 <= p <= 1.0
    assert on_time_probability(left + 1000, expected, spread) >= p
