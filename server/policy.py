"""Eligibility: which device check-ins may take part in a population's rounds.

A policy is a list of small named criteria, each a predicate over what the
device says about itself (`DeviceConditions`) and what the server knows
(`Context`: the time and the device's last accepted report). `failures()`
names every criterion that failed, so a rejection can say why, and a
deployment composes its own list instead of editing one big `if`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from server import validation as v
from server.config import EligibilityConfig
from server.errors import BadRequest


def parse_version(text: str) -> tuple[int, ...]:
    """'1.2.10' → (1, 2, 10, 0) (padded, so '1.2' == '1.2.0'); anything else is a BadRequest."""
    parts = text.split(".")
    if not 1 <= len(parts) <= 4 or not all(p.isdigit() and len(p) <= 9 for p in parts):
        raise BadRequest(f"runtime_version {text!r} is not dotted integers like '1.2.0'",
                         code="invalid_field")
    return tuple(int(p) for p in parts) + (0,) * (4 - len(parts))


@dataclasses.dataclass(frozen=True)
class DeviceConditions:
    """What a device reports at check-in."""

    charging: bool
    idle: bool
    unmetered: bool
    battery: float          # 0..1
    free_memory_mb: int
    num_examples: int       # local training examples
    runtime_version: tuple[int, ...]

    @classmethod
    def from_json(cls, obj: Any) -> "DeviceConditions":
        obj = v.as_object(obj, "conditions")
        w = "conditions."
        return cls(
            charging=v.boolean(obj, "charging", where=w),
            idle=v.boolean(obj, "idle", where=w),
            unmetered=v.boolean(obj, "unmetered", where=w),
            battery=v.number(obj, "battery", lo=0.0, hi=1.0, where=w),
            free_memory_mb=v.integer(obj, "free_memory_mb", lo=0, where=w),
            num_examples=v.integer(obj, "num_examples", lo=0, where=w),
            runtime_version=parse_version(v.string(obj, "runtime_version", max_len=40, where=w)))


@dataclasses.dataclass(frozen=True)
class Context:
    now: float
    last_participation_at: float | None = None


class Criterion(Protocol):
    name: str

    def __call__(self, c: DeviceConditions, ctx: Context) -> bool: ...


@dataclasses.dataclass(frozen=True)
class Flag:
    """A boolean condition that must be true (charging, idle, unmetered)."""

    name: str

    def __call__(self, c: DeviceConditions, ctx: Context) -> bool:
        return bool(getattr(c, self.name))


@dataclasses.dataclass(frozen=True)
class AtLeast:
    """A numeric condition with a floor (battery, free memory, local examples)."""

    field: str
    minimum: float

    @property
    def name(self) -> str:
        return f"min_{self.field}"

    def __call__(self, c: DeviceConditions, ctx: Context) -> bool:
        return getattr(c, self.field) >= self.minimum


@dataclasses.dataclass(frozen=True)
class MinSeparation:
    """At least `seconds` between a device's accepted reports (the server's record)."""

    seconds: float
    name: str = "min_separation"

    def remaining(self, ctx: Context) -> float:
        if ctx.last_participation_at is None:
            return 0.0
        return max(0.0, ctx.last_participation_at + self.seconds - ctx.now)

    def __call__(self, c: DeviceConditions, ctx: Context) -> bool:
        return self.remaining(ctx) == 0.0


@dataclasses.dataclass(frozen=True)
class RuntimeVersionRange:
    minimum: tuple[int, ...] | None = None
    maximum: tuple[int, ...] | None = None
    name: str = "runtime_version"

    def __call__(self, c: DeviceConditions, ctx: Context) -> bool:
        return ((self.minimum is None or c.runtime_version >= self.minimum)
                and (self.maximum is None or c.runtime_version <= self.maximum))


class EligibilityPolicy:
    def __init__(self, criteria: Sequence[Criterion]):
        self.criteria = tuple(criteria)

    def failures(self, conditions: DeviceConditions, ctx: Context) -> list[str]:
        return [c.name for c in self.criteria if not c(conditions, ctx)]

    def select(self, conditions: DeviceConditions, ctx: Context) -> bool:
        return not self.failures(conditions, ctx)

    def wait_s(self, ctx: Context) -> float:
        """Seconds until the separation criteria allow this device again."""
        return max([c.remaining(ctx) for c in self.criteria if isinstance(c, MinSeparation)],
                   default=0.0)


def build_policy(config: EligibilityConfig) -> EligibilityPolicy:
    """The criteria a population's `EligibilityConfig` asks for, in a fixed order."""
    criteria: list[Criterion] = [Flag(name) for name, required in
                                 (("charging", config.require_charging), ("idle", config.require_idle),
                                  ("unmetered", config.require_unmetered)) if required]
    floors: Mapping[str, float] = {"battery": config.min_battery,
                                   "free_memory_mb": config.min_free_memory_mb,
                                   "num_examples": config.min_examples}
    criteria += [AtLeast(field, floor) for field, floor in floors.items() if floor > 0]
    if config.min_separation_s > 0:
        criteria.append(MinSeparation(config.min_separation_s))
    if config.min_runtime_version or config.max_runtime_version:
        criteria.append(RuntimeVersionRange(
            parse_version(config.min_runtime_version) if config.min_runtime_version else None,
            parse_version(config.max_runtime_version) if config.max_runtime_version else None))
    return EligibilityPolicy(criteria)
