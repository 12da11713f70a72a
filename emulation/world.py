"""Who the emulated phones are, and what happens to them: habits, conditions, faults.

A fleet is only a useful test of the system if its phones behave like phones.
Each `PhoneProfile` is a person: a time zone, a charging habit, home Wi-Fi or
not, a bedtime, a device speed. `ScheduledConditions` turns the profile and
the simulated local time into what the runtime's `ConditionSource` reports,
so eligibility emerges from people's days rather than being switched on:

* most phones go on the charger in the evening and come off in the morning
  (``overnight``); some come off in the middle of the night (``early``); some
  are charged at work in the afternoon and barely at night (``daytime``);
* the network is unmetered only at home, and only if the home has Wi-Fi;
* the phone is idle while its owner sleeps;
* the battery fills while charging and drains otherwise.

`Faults` are what an operator injects on demand, decided deterministically
from a seed and the session or request they hit: a fraction of the phones
given a training task is unplugged in the middle of it, a fraction of uploads
is lost once (the transport retries), any request may hit a network error,
a fraction of uploads is tampered with (an attacker claiming a huge weight,
sending a huge update or values off the grid), and a fraction of phones is
far too slow for the round's deadline.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from device_runtime.conditions import DeviceConditions, EmulatedConditions

HABITS = ("overnight", "early", "daytime")


@dataclasses.dataclass(frozen=True)
class PhoneProfile:
    index: int
    client_id: str              # the training client whose speeches this phone's user typed
    utc_offset_s: float
    habit: str                  # one of HABITS
    plug_in_h: float            # local hour the phone goes on the charger (may be > 24: next day)
    unplug_h: float             # local hour it comes off
    bedtime_h: float            # the owner sleeps (phone idle) from bedtime ...
    wake_h: float               # ... to wake-up
    home_wifi: bool
    free_memory_mb: int
    speed_factor: float         # training takes this many times longer than on this host
    slow: bool                  # fault: finishes only after the round's deadline
    seed: int


@dataclasses.dataclass(frozen=True)
class FleetMix:
    """The population's make-up; fractions are of all phones."""

    zones_h: tuple[float, ...] = (-8.0, -5.0, 0.0, 1.0, 5.5, 9.0)   # UTC offsets, equally likely
    early_fraction: float = 0.15        # come off the charger in the middle of the night
    daytime_fraction: float = 0.15      # charged in the afternoon, not at night
    no_wifi_fraction: float = 0.08      # metered everywhere
    low_memory_fraction: float = 0.05   # below the server's memory floor
    slow_fraction: float = 0.0          # fault: phones that finish after every deadline


def make_profiles(n: int, client_ids: Sequence[str], mix: FleetMix = FleetMix(),
                  seed: int = 0) -> list[PhoneProfile]:
    """`n` phones; phone i types the speeches of `client_ids[i % len(client_ids)]`."""
    if n < 1 or not client_ids:
        raise ValueError("a fleet needs at least one phone and one client")
    rng = np.random.default_rng(seed)
    profiles = []
    for i in range(n):
        u = rng.random()
        habit = ("early" if u < mix.early_fraction else
                 "daytime" if u < mix.early_fraction + mix.daytime_fraction else "overnight")
        if habit == "daytime":
            plug, unplug = rng.uniform(12, 15), rng.uniform(16, 18.5)
        else:
            plug = rng.uniform(21, 24.5)
            unplug = rng.uniform(0.5, 3.5) if habit == "early" else rng.uniform(6, 8)
        bedtime = rng.uniform(22, 25.5)
        profiles.append(PhoneProfile(
            index=i, client_id=client_ids[i % len(client_ids)],
            utc_offset_s=float(rng.choice(mix.zones_h)) * 3600.0, habit=habit,
            plug_in_h=plug % 24, unplug_h=unplug % 24, bedtime_h=bedtime % 24,
            wake_h=rng.uniform(6, 8.5), home_wifi=bool(rng.random() >= mix.no_wifi_fraction),
            free_memory_mb=int(rng.integers(800, 1800) if rng.random() < mix.low_memory_fraction
                               else rng.integers(2500, 6000)),
            speed_factor=float(np.clip(rng.lognormal(0.7, 0.5), 1, 8)),
            slow=bool(rng.random() < mix.slow_fraction), seed=int(rng.integers(2**31))))
    return profiles


def _within(h: float, start: float, end: float) -> bool:
    """Whether local hour `h` lies in [start, end), an interval that may wrap midnight."""
    return start <= h < end if start <= end else (h >= start or h < end)


def _hours_since(h: float, start: float) -> float:
    return (h - start) % 24


class ScheduledConditions(EmulatedConditions):
    """Conditions that follow a `PhoneProfile` through its owner's (simulated) day.

    The owner can also pull the plug at any moment: `unplug_after_reads(n)`
    makes the n-th following reading report the phone unplugged, for `hold_s`
    simulated seconds — how the fault injection unplugs a phone mid-training,
    since the runtime re-reads its conditions between training batches.
    """

    def __init__(self, profile: PhoneProfile, local_now: Callable[[], dt.datetime],
                 sim_now: Callable[[], float]):
        super().__init__(local_now, free_memory_mb=profile.free_memory_mb)
        self.profile = profile
        self._sim_now = sim_now
        self._lock = threading.Lock()
        self._unplug_in: int | None = None
        self._unplugged_until = float("-inf")
        self._hold_s = 0.0

    def unplug_after_reads(self, reads: int | None, hold_s: float = 3 * 3600.0) -> None:
        """Pull the plug at the `reads`-th reading from now (None: never mind)."""
        with self._lock:
            self._unplug_in, self._hold_s = (None if reads is None else max(1, reads)), hold_s

    def seconds_until_change(self, also_at_h: tuple[float, ...] = ()) -> float:
        """Simulated seconds until the owner's day next changes a condition (or until one of
        the local hours `also_at_h`, e.g. a training window's ends): how long a phone's OS
        would keep a job whose constraints are unmet asleep."""
        p, local = self.profile, self._now()
        h = local.hour + local.minute / 60 + local.second / 3600
        changes = (p.plug_in_h, p.unplug_h, p.bedtime_h, p.wake_h, 18.5, p.wake_h + 0.75,
                   p.plug_in_h + 0.5, *also_at_h)            # +0.5 h: the battery passes 50%
        ahead = min(((c - h) % 24 for c in changes if (c - h) % 24 > 1e-4), default=24.0) * 3600
        with self._lock:
            pulled_for = self._unplugged_until - self._sim_now()
        return max(1.0, min(ahead, pulled_for) if pulled_for > 0 else ahead) + 1.0

    def read(self) -> DeviceConditions:
        p, local = self.profile, self._now()
        h = local.hour + local.minute / 60 + local.second / 3600
        with self._lock:
            if self._unplug_in is not None:
                self._unplug_in -= 1
                if self._unplug_in <= 0:
                    self._unplug_in = None
                    self._unplugged_until = self._sim_now() + self._hold_s
            pulled = self._sim_now() < self._unplugged_until
        charging = _within(h, p.plug_in_h, p.unplug_h) and not pulled
        at_home = _within(h, 18.5, p.wake_h + 0.75)
        asleep = _within(h, p.bedtime_h, p.wake_h)
        if charging:
            battery = min(1.0, 0.35 + 0.3 * _hours_since(h, p.plug_in_h))
        else:
            battery = max(0.05, 0.95 - 0.05 * _hours_since(h, p.unplug_h))
        self.charging, self.battery, self.idle = charging, battery, asleep
        self.unmetered = at_home and p.home_wifi
        return DeviceConditions(self.charging, self.battery, self.idle, self.unmetered,
                                self.free_memory_mb, local)


def _uniform(*key: object) -> float:
    """A uniform number in [0, 1) determined by `key` (stable across processes and runs)."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@dataclasses.dataclass(frozen=True)
class Faults:
    """Faults injected on demand; all zero by default (a healthy fleet)."""

    unplug_fraction: float = 0.0          # of training tasks: the phone is unplugged mid-training
    upload_failure_fraction: float = 0.0  # of uploads: the first attempt is lost (then retried)
    network_error_rate: float = 0.0       # of all requests: a connection error before sending
    tamper_fraction: float = 0.0          # of uploads: altered by an attacker on the phone (TAMPERING)
    seed: int = 0
    # Secure aggregation: of the sessions reaching each point, the phone vanishes (its requests
    # fail for VANISHED_S of simulated time) after advertising keys, after sending shares, after
    # training (its masked upload never arrives), or just before revealing its shares.
    drop_after_keys: float = 0.0
    drop_after_shares: float = 0.0
    drop_after_training: float = 0.0
    drop_before_unmask: float = 0.0


VANISHED_S = 3600.0

# Where a phone can vanish from secure aggregation: the request that marks the point, and whether
# the phone goes after that request succeeds or instead of it.
SECAGG_DROPS = {"drop_after_keys": ("/secagg/keys", "after"), "drop_after_shares": ("/secagg/shares", "after"),
                "drop_after_training": ("/update", "before"), "drop_before_unmask": ("/secagg/reveal", "before")}


# What a tampering phone does to its upload (emulation.phones.tamper), in turn:
TAMPERING = ("claims_huge_weight",     # num_examples = 10^6: refused (weight above max_weight)
             "scaled_up",              # the update scaled by 10^6: refused (a scale off the grid)
             "out_of_range",           # a code beyond the quantized range: refused
             "max_values")             # every value at the top of its block's grid: accepted if its
                                       # norm stays within the clip, which bounds what it can do


class _Every:
    """Exactly `fraction` of the events counted so far (to within one), spread evenly:
    event k is picked when floor((k+1)·f + u) > floor(k·f + u), u a seeded phase."""

    def __init__(self, fraction: float, phase: float):
        self.fraction, self.phase, self.count = fraction, phase, 0

    def next(self) -> bool:
        k, self.count = self.count, self.count + 1
        f, u = self.fraction, self.phase
        return int((k + 1) * f + u) > int(k * f + u)


class FaultInjector:
    """Decides, thread-safely, which task or request a fault hits, and counts what it injected.

    Unplugging and lost uploads hit exact fractions of the training tasks and
    uploads (so a short test run still sees them); network errors are random
    per request at the given rate.
    """

    def __init__(self, faults: Faults = Faults(), now: Callable[[], float] = time.time):
        self.faults = faults
        self._now = now
        self._lock = threading.Lock()
        self._unplug = _Every(faults.unplug_fraction, _uniform(faults.seed, "unplug"))
        self._upload = _Every(faults.upload_failure_fraction, _uniform(faults.seed, "upload"))
        self._tamper = _Every(faults.tamper_fraction, _uniform(faults.seed, "tamper"))
        self._tampered: dict[str, str | None] = {}
        self._decided: dict[str, str | None] = {}
        self._calls = 0
        self._drops = {name: _Every(getattr(faults, name), _uniform(faults.seed, name)) for name in SECAGG_DROPS}
        self._vanished: dict[str, float] = {}          # credential → back at (simulated time)
        self._marked: set[tuple[str, str]] = set()
        self.injected = {"unplugged": 0, "request_lost": 0, "response_lost": 0, "network_error": 0,
                         **{kind: 0 for kind in TAMPERING}, **{name: 0 for name in SECAGG_DROPS}}

    def unplug(self) -> bool:
        """Whether the training task starting now is to be unplugged mid-way."""
        with self._lock:
            hit = self._unplug.next()
            self.injected["unplugged"] += hit
            return hit

    def unplug_read(self, session_id: str, batches: int) -> int:
        """Which condition reading of the task sees the plug pulled: after 1..batches batches."""
        return 2 + int(_uniform(self.faults.seed, "when", session_id) * max(1, batches))

    def lose_upload(self, url: str) -> str | None:
        """None, or how this upload attempt is lost: only an upload's first attempt ever is,
        half of them before the server saw it and half after (the answer is lost)."""
        with self._lock:
            if url in self._decided:
                return None
            lost = None
            if self._upload.next():
                lost = "request_lost" if _uniform(self.faults.seed, "how", url) < 0.5 else "response_lost"
                self.injected[lost] += 1
            self._decided[url] = lost
            return lost

    def tampering(self, url: str) -> str | None:
        """None, or how this upload (every attempt of it) is altered: one of TAMPERING, in turn."""
        with self._lock:
            if url not in self._tampered:
                kind = None
                if self._tamper.next():
                    done = sum(self.injected[k] for k in TAMPERING)
                    kind = TAMPERING[done % len(TAMPERING)]
                    self.injected[kind] += 1
                self._tampered[url] = kind
            return self._tampered[url]

    def vanishing(self, method: str, path: str, credential: str) -> str | None:
        """Secure aggregation's dropouts: "before" (this request fails: the phone is gone), "after"
        (it goes through, then the phone is gone), or None."""
        with self._lock:
            if self._vanished.get(credential, -1.0) > self._now():
                return "before"
            parts = path.split("/")
            if method != "POST" or len(parts) < 4 or parts[1:3] != ["v1", "sessions"]:
                return None
            for name, (suffix, when) in SECAGG_DROPS.items():
                if path.endswith(suffix) and (parts[3], name) not in self._marked:
                    self._marked.add((parts[3], name))
                    if self._drops[name].next():
                        self._vanished[credential] = self._now() + VANISHED_S
                        self.injected[name] += 1
                        return when
            return None

    def network_error(self) -> bool:
        with self._lock:
            self._calls += 1
            hit = _uniform(self.faults.seed, "net", self._calls) < self.faults.network_error_rate
            self.injected["network_error"] += hit
            return hit
