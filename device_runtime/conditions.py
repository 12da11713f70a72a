"""What the runtime needs to know about the device, and where it comes from.

`DeviceConditions` is one reading. A `ConditionSource` produces readings: the
emulated one (tests, the fleet emulator) is set by its owner; `LinuxConditions`
reads the real host, so the runtime can run on a laptop or a single-board
computer. Each field of a `LinuxConditions` reading comes from:

* charging: ``/sys/class/power_supply/*/type`` and ``online`` / ``status``.
  Charging if a supply of type ``Mains``, ``USB``, ``USB_C`` or ``USB_PD`` has
  ``online`` = 1, or a ``Battery`` reports ``status`` Charging or Full.
* battery: the lowest ``capacity`` (percent) of the ``Battery`` supplies,
  as 0..1 (a battery without ``capacity`` reads 0). A host with no battery
  at all (a desktop, a server, a board on a wall adapter) is on mains:
  charging at 1.0.
* idle: the 1-minute load average (first field of ``/proc/loadavg``) below
  ``idle_load_per_core`` (default 0.5) × the number of CPUs — nothing else
  is keeping the machine busy.
* unmetered: the interface of the default route, from ``/proc/net/route``
  (destination 00000000), else from ``/proc/net/ipv6_route`` (::/0, not
  ``lo``). Names starting ``wwan``, ``rmnet``, ``ccmni`` (cellular modems),
  ``ppp`` (dial-up / modem) or ``usb`` (phone tethering) are metered; any
  other (Ethernet, Wi-Fi) is not. No default route: metered (there is no
  network worth using).
* free memory: ``MemAvailable`` (kB) from ``/proc/meminfo``, in MiB; 0 if the
  kernel does not report it (older than 3.14).
* local time: ``datetime.now()``, the system clock in the host's time zone.
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
        iface = self._default_route_interface()
        return iface is not None and not iface.startswith(_METERED_PREFIXES)

    def _default_route_interface(self) -> str | None:
        for route in (_read(self.root / "proc/net/route") or "").splitlines()[1:]:
            fields = route.split()
            if len(fields) > 2 and fields[1] == "00000000":
                return fields[0]
        for route in (_read(self.root / "proc/net/ipv6_route") or "").splitlines():
            fields = route.split()
            if len(fields) == 10 and fields[0] == "0" * 32 and fields[1] == "00" and fields[9] != "lo":
                return fields[9]
        return None

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
