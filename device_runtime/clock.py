"""Time as the device runtime sees it: real, or simulated for the fleet emulator.

Everything in the runtime that reads the time or waits goes through a `Clock`,
so the emulator can let a night pass in minutes: `ScaledClock` runs `speed`
times faster than real time from a chosen start (the server is given the same
start and speed, so deadlines mean the same on both sides).
"""
from __future__ import annotations

import datetime as dt
import threading
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float: ...                 # seconds since the epoch (UTC)
    def sleep(self, seconds: float) -> None: ...


class RealClock:
    def now(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))


class ScaledClock:
    """Simulated time = start + (real time elapsed since creation) × speed."""

    def __init__(self, start: float, speed: float, stop: threading.Event | None = None):
        if speed <= 0:
            raise ValueError("speed must be > 0")
        self.start, self.speed = start, speed
        self._t0 = time.monotonic()
        self.stop = stop or threading.Event()

    def now(self) -> float:
        return self.start + (time.monotonic() - self._t0) * self.speed

    def sleep(self, seconds: float) -> None:
        """Sleep simulated seconds; returns early if the emulator is stopping."""
        self.stop.wait(max(0.0, seconds) / self.speed)


def local_datetime(clock: Clock, utc_offset_s: float) -> dt.datetime:
    """The device's wall-clock time (naive) in a zone `utc_offset_s` from UTC."""
    return dt.datetime.fromtimestamp(clock.now() + utc_offset_s, dt.timezone.utc).replace(tzinfo=None)
