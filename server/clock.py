"""Injectable time: every deadline and window in the server reads `clock.now()`.

Round transitions happen when a request or the ticker looks at the clock, so a
`ManualClock` drives the whole round lifecycle in tests without sleeping.
"""
from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the Unix epoch."""


class SystemClock:
    def now(self) -> float:
        return time.time()


class ScaledClock:
    """Simulated time for emulated fleets: `start` + real seconds elapsed since `epoch` × `speed`.

    Gunicorn workers are separate processes; they agree on the time because
    they all derive it from the same real-time `epoch` (a config value), not
    from when each one started.
    """

    def __init__(self, start: float, speed: float, epoch: float):
        if speed <= 0:
            raise ValueError("clock speed must be > 0")
        self.start, self.speed, self.epoch = start, speed, epoch

    def now(self) -> float:
        return self.start + (time.time() - self.epoch) * self.speed


class ManualClock:
    """A clock that only moves when told to (thread-safe)."""

    def __init__(self, start: float = 1_700_000_000.0):
        self._now = float(start)
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError("a clock does not go backwards")
        with self._lock:
            self._now += seconds
            return self._now
