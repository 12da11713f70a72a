"""What the runtime needs to know about the device, and where it comes from.

`DeviceConditions` is one reading. A `ConditionSource` produces readings: the
emulated one (tests, the fleet emulator) is set by its owner; `LinuxConditions`
reads the real host, so the runtime can run on a laptop or a single-board
computer:

* charging / battery: ``/sys/class/power_supply/*`` — a supply of type
  ``Mains`` or ``USB`` that is ``online``, or a ``Battery`` whose ``status`` is
  Charging/Full, means charging; the battery's ``capacity`` is the level. A
  host with no battery at all (a desktop, a server) is always on mains: charging
  at 100%.
* idle: the 1-minute load average from ``/proc/loadavg`` below a threshold
  (default 0.5 per core) — nobody is using the machine.
* unmetered: the default route's interface from ``/proc/net/route``; a cellular
  (``wwan*``/``rmnet*``/``ppp*``) interface is metered, Ethernet and Wi-Fi are
  not. No default route: metered (no network worth using).
* free memory: ``MemAvailable`` from ``/proc/meminfo``.
* local time: the system clock in the host's time zone.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import os
from pathlib import Path
from typing import Callable, Protocol


@dataclasses.dataclass(frozen=True)
class DeviceConditions:
    charging: bool
    battery: float          # 0..1
    idle: bool
    unmetered: bool
    free_memory_mb: int
    local_time: dt.datetime  # wall-clock time where the device is (naive, local)

    def as_checkin(self) -> dict:
        """The fields a check-in reports to the server (local time stays on the device)."""
        return {"charging": self.charging, "battery": round(self.battery, 3), "idle": self.idle,
                "unmetered": self.unmetered, "free_memory_mb": self.free_memory_mb}


class ConditionSource(Protocol):
    def read(self) -> DeviceConditions: ...


class EmulatedConditions:
    """Conditions set by their owner (tests, the fleet emulator); time from a clock.

    Thread-safe enough for its use: fields are replaced whole, and a reader
    sees either the old or the new value.
    """

    def __init__(self, now: Callable[[], dt.datetime], *, charging: bool = True,
                 battery: float = 0.9, idle: bool = True, unmetered: bool = True,
                 free_memory_mb: int = 4096):
        self._now = now
        self.charging, self.battery, self.idle = charging, battery, idle
        self.unmetered, self.free_memory_mb = unmetered, free_memory_mb

    def read(self) -> DeviceConditions:
        return DeviceConditions(self.charging, self.battery, self.idle, self.unmetered,
                                self.free_memory_mb, self._now())


_METERED_PREFIXES = ("wwan", "rmnet", "ppp", "ccmni", "usb")


class LinuxConditions:
    """Conditions read from a real Linux host (see the module docstring)."""

    def __init__(self, root: str | Path = "/", idle_load_per_core: float = 0.5):
        self.root = Path(root)
        self.idle_load_per_core = idle_load_per_core

    def read(self) -> DeviceConditions:
        charging, battery = self._power()
        return DeviceConditions(charging, battery, self._idle(), self._unmetered(),
                                self._free_memory_mb(), dt.datetime.now())

    def _power(self) -> tuple[bool, float]:
        supplies = self.root / "sys/class/power_supply"
        batteries, mains_online = [], False
        for supply in sorted(supplies.iterdir()) if supplies.is_dir() else []:
            kind = _read(supply / "type")
            if kind == "Battery":
                batteries.append(supply)
            elif kind in ("Mains", "USB", "USB_C", "USB_PD") and _read(supply / "online") == "1":
                mains_online = True
        if not batteries:
            return True, 1.0
        levels = [float(_read(b / "capacity") or 0) / 100 for b in batteries]
        charging = mains_online or any(_read(b / "status") in ("Charging", "Full") for b in batteries)
        return charging, min(levels)

    def _idle(self) -> bool:
        load = float((_read(self.root / "proc/loadavg") or "0").split()[0])
        return load < self.idle_load_per_core * (os.cpu_count() or 1)

    def _unmetered(self) -> bool:
        routes = (_read(self.root / "proc/net/route") or "").splitlines()[1:]
        for route in routes:
            fields = route.split()
            if len(fields) > 2 and fields[1] == "00000000":   # the default route
                return not fields[0].startswith(_METERED_PREFIXES)
        return False

    def _free_memory_mb(self) -> int:
        for line in (_read(self.root / "proc/meminfo") or "").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
        return 0


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None
