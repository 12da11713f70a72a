"""Time as the phone and the server read it: real, scaled for an emulated fleet, or moved by hand.

Everything that reads the time or waits goes through a `Clock`, so an
emulated fleet can let a night pass in minutes and a test can drive a whole
round lifecycle without sleeping. `ScaledClock` is shared by both ends:
simulated time = `start` + (real seconds since the real-time `epoch`) ×
`speed`. The server's gunicorn workers and the fleet's phones are given the
same three numbers, so deadlines and retry windows mean the same everywhere
(each process derives the time from the common epoch, not from when it started).
"""
from __future__ import annotations

import datetime as dt
import threading
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the Unix epoch (UTC)."""

    def sleep(self, seconds: float) -> None:
        """Wait `seconds` of this clock's time."""


class SystemClock:
    """Real time."""

    def now(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))


class ScaledClock:
    """Simulated time: `start` + (time.time() − `epoch`) × `speed`; `sleep` returns early once `stop` is set."""

    def __init__(self, start: float, speed: float, epoch: float | None = None,
                 stop: threading.Event | None = None):
        if speed <= 0:
            raise ValueError("clock speed must be > 0")
        self.start, self.speed = start, speed
        self.epoch = time.time() if epoch is None else epoch
        self.stop = stop or threading.Event()

    def now(self) -> float:
        return self.start + (time.time() - self.epoch) * self.speed

    def sleep(self, seconds: float) -> None:
        self.stop.wait(max(0.0, seconds) / self.speed)


class ManualClock:
    """A clock that only moves when told to (thread-safe); `sleep` moves it."""

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

    def sleep(self, seconds: float) -> None:
        self.advance(max(0.0, seconds))


def local_datetime(clock: Clock, utc_offset_s: float) -> dt.datetime:
    """Wall-clock time (naive) in a zone `utc_offset_s` from UTC."""
    return dt.datetime.fromtimestamp(clock.now() + utc_offset_s, dt.timezone.utc).replace(tzinfo=None)
