from __future__ import annotations

import pytest

from protocol.ratelimit import TokenBucket


def test_burst_then_rate():
    bucket = TokenBucket(rate=10, burst=5, now=0.0)
    assert all(bucket.try_take(1, 0.0) for _ in range(5))
    assert not bucket.try_take(1, 0.0)
    assert not bucket.try_take(1, 0.05)  # half a token
    assert bucket.try_take(1, 0.1)
    assert bucket.try_take(4, 10.0)  # capped at burst: 5 available, not 100
    assert bucket.try_take(1, 10.0)
    assert not bucket.try_take(1, 10.0)


def test_take_returns_the_wait_that_keeps_the_rate():
    bucket = TokenBucket(rate=100, burst=100, now=0.0)
    assert bucket.take(100, 0.0) == 0.0
    assert bucket.take(50, 0.0) == pytest.approx(0.5)
    assert bucket.take(50, 0.5) == pytest.approx(0.5)  # still 50 in debt after paying half
    assert bucket.take(1000, 2.0) == pytest.approx(9.0)  # refilled to 100; 900 owed at 100/s


def test_clock_going_backwards_adds_nothing():
    bucket = TokenBucket(rate=1, burst=1, now=10.0)
    assert bucket.try_take(1, 10.0)
    assert not bucket.try_take(1, 5.0)


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (1, 0), (-1, 1)])
def test_invalid(rate, burst):
    with pytest.raises(ValueError):
        TokenBucket(rate, burst, 0.0)
