"""When a phone may train: overnight, charging, idle, on unmetered Wi-Fi.

Gboard trains only when the device is idle, charging and on an unmetered
network (Hard et al. 2018); Nightjar adds a local time window (default
22:00–06:00; equal start and end mean all day), a battery floor, a
free-memory floor and a minimum number of local examples. The policy is
checked before a check-in and again between training batches: the moment a
reason appears, training stops.
"""
from __future__ import annotations

import dataclasses
import datetime as dt

from device_runtime.conditions import DeviceConditions


@dataclasses.dataclass(frozen=True)
class TrainingPolicy:
    window_start: dt.time = dt.time(22, 0)   # local time training may begin
    window_end: dt.time = dt.time(6, 0)      # local time it must stop (may wrap midnight)
    require_charging: bool = True
    require_idle: bool = True
    require_unmetered: bool = True
    min_battery: float = 0.5                 # 0..1
    min_free_memory_mb: int = 512
    min_examples: int = 1                    # local sentences needed to volunteer

    def in_window(self, t: dt.time) -> bool:
        start, end = self.window_start, self.window_end
        if start == end:
            return True
        if start < end:
            return start <= t < end
        return t >= start or t < end

    def blockers(self, c: DeviceConditions, num_examples: int | None = None) -> list[str]:
        """Why the device may not train now; empty means it may.

        Reasons are stable codes the runtime reports to the server as the
        failure reason when a running task has to stop. `num_examples` is
        checked only when given (before a check-in: a running task already
        has its examples), and its reason `too_few_examples` is never sent.
        """
        reasons = []
        if self.require_charging and not c.charging:
            reasons.append("unplugged")
        if self.require_idle and not c.idle:
            reasons.append("not_idle")
        if self.require_unmetered and not c.unmetered:
            reasons.append("metered_network")
        if c.battery < self.min_battery:
            reasons.append("low_battery")
        if c.free_memory_mb < self.min_free_memory_mb:
            reasons.append("low_memory")
        if not self.in_window(c.local_time.time()):
            reasons.append("outside_window")
        if num_examples is not None and num_examples < self.min_examples:
            reasons.append("too_few_examples")
        return reasons

    def seconds_until_window(self, now: dt.datetime) -> float:
        """0 inside the window, else seconds until it next opens."""
        if self.in_window(now.time()):
            return 0.0
        start = dt.datetime.combine(now.date(), self.window_start)
        if start <= now:
            start += dt.timedelta(days=1)
        return (start - now).total_seconds()
