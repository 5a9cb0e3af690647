"""Will a task finish before its deadline? A forecast from the pool's measured rates.

The pool measures, per finished task, the time to its first token and its decode rate
(tokens per second), and keeps moving averages of both and of their spread. A running or
queued task's remaining time is then: the wait for a slot (queued only), the first-token
time (not started yet), and ``max_tokens - tokens_out`` tokens at the measured rate. That
is an upper estimate, since a task may stop early at an end-of-sequence token. The
probability of being on time is the normal probability that the actual time stays under
the deadline, with a spread from the measured variability (at least ``MIN_RELATIVE_SPREAD``
of the estimate and ``MIN_SPREAD_MS``, so that a few steady tasks never make it
overconfident). Plain Python, no Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

#: Smoothing of the moving averages (weight of the newest task).
ALPHA = 0.2
#: The forecast never claims more precision than this share of the estimate...
MIN_RELATIVE_SPREAD = 0.15
#: ...or than this many milliseconds.
MIN_SPREAD_MS = 50.0


@dataclass
class RateTracker:
    """Moving averages of a pool's first-token time and decode rate, with their spreads."""

    first_token_ms: Optional[float] = None
    first_token_dev_ms: float = 0.0
    ms_per_token: Optional[float] = None
    ms_per_token_dev: float = 0.0
    tasks: int = 0

    def observe(self, first_token_ms: Optional[float], tokens: int, decode_ms: float) -> None:
        """One finished task: its time to first token and its decode time for ``tokens``."""
        if first_token_ms is not None and first_token_ms >= 0:
            self.first_token_ms, self.first_token_dev_ms = _blend(self.first_token_ms, self.first_token_dev_ms,
                                                                  first_token_ms)
        if tokens > 1 and decode_ms > 0:
            per_token = max(0.0, decode_ms - (first_token_ms or 0.0)) / (tokens - 1)
            self.ms_per_token, self.ms_per_token_dev = _blend(self.ms_per_token, self.ms_per_token_dev, per_token)
        self.tasks += 1

    @property
    def tokens_per_s(self) -> Optional[float]:
        if not self.ms_per_token:
            return None
        return 1000.0 / self.ms_per_token

    def remaining_ms(self, tokens_left: int, *, first_token_seen: bool,
                     wait_ms: float = 0.0) -> Optional[tuple[float, float]]:
        """(expected, spread) in ms for the rest of a task; None until the pool has measured."""
        if self.ms_per_token is None and tokens_left > 0:
            return None
        expected = wait_ms
        variance = (0.5 * wait_ms) ** 2  # queue waits are the least certain part
        if not first_token_seen:
            expected += self.first_token_ms or 0.0
            variance += self.first_token_dev_ms ** 2
        per_token = self.ms_per_token or 0.0
        expected += tokens_left * per_token
        # Token times within one task are strongly correlated (same load, same batch), so
        # their deviation adds up linearly rather than as independent draws.
        variance += (tokens_left * self.ms_per_token_dev) ** 2
        spread = max(math.sqrt(variance), MIN_RELATIVE_SPREAD * expected, MIN_SPREAD_MS)
        return expected, spread


def on_time_probability(time_left_ms: float, expected_ms: float, spread_ms: float) -> float:
    """P(actual <= time_left) for a normal estimate; rounded to 3 places for display."""
    if time_left_ms <= 0:
        return 0.0
    z = (time_left_ms - expected_ms) / (spread_ms * math.sqrt(2.0))
    return round(0.5 * (1.0 + math.erf(z)), 3)


def _blend(mean: Optional[float], deviation: float, sample: float) -> tuple[float, float]:
    if mean is None:
        return sample, 0.0
    new_mean = (1 - ALPHA) * mean + ALPHA * sample
    new_deviation = (1 - ALPHA) * deviation + ALPHA * abs(sample - mean)
    return new_mean, new_deviation
