"""A token bucket with the clock passed in, so rate limits are tested without sleeping."""

from __future__ import annotations


class TokenBucket:
    """``rate`` tokens per second, holding at most ``burst``; starts full."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._stamp = now

    def _refill(self, now: float) -> None:
        if now > self._stamp:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now

    def try_take(self, amount: float, now: float) -> bool:
        """Take ``amount`` if available now; False (and nothing taken) if not."""
        self._refill(now)
        if self._tokens >= amount:
            self._tokens -= amount
            return True
        return False

    def take(self, amount: float, now: float) -> float:
        """Take ``amount`` unconditionally; return the seconds to wait to stay within rate.

        Amounts above ``burst`` are allowed (a large chunk is not refused); the
        debt is paid by waiting.
        """
        self._refill(now)
        self._tokens -= amount
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate
