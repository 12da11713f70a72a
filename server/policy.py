"""Eligibility: which device check-ins may take part in a population's rounds.

A policy is a list of small named criteria, each a predicate over what the
device says about itself (`contract.protocol.wire.Conditions`) and what the server knows
(`Context`: the time and the device's last accepted report). `failures()`
names every criterion that failed, so a rejection can say why, and a
deployment composes its own list instead of editing one big `if`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Protocol

from contract.protocol.wire import Conditions
from server.config import EligibilityConfig


def parse_version(text: str) -> tuple[int, ...]:
    """A configured runtime version '1.2.10' → (1, 2, 10, 0); ValueError for anything else."""
    parts = text.split(".")
    if not 1 <= len(parts) <= 4 or not all(p.isdigit() and len(p) <= 9 for p in parts):
        raise ValueError(f"runtime version {text!r} is not dotted integers like '1.2.0'")
    return tuple(int(p) for p in parts) + (0,) * (4 - len(parts))


@dataclasses.dataclass(frozen=True)
class Context:
    now: float
    last_participation_at: float | None = None


class Criterion(Protocol):
    name: str

    def __call__(self, c: Conditions, ctx: Context) -> bool: ...


@dataclasses.dataclass(frozen=True)
class Flag:
    """A boolean condition that must be true (charging, idle, unmetered)."""

    name: str

    def __call__(self, c: Conditions, ctx: Context) -> bool:
        return bool(getattr(c, self.name))


@dataclasses.dataclass(frozen=True)
class AtLeast:
    """A numeric condition with a floor (battery, free memory, local examples)."""

    field: str
    minimum: float

    @property
    def name(self) -> str:
        return f"min_{self.field}"

    def __call__(self, c: Conditions, ctx: Context) -> bool:
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

    def __call__(self, c: Conditions, ctx: Context) -> bool:
        return self.remaining(ctx) == 0.0


@dataclasses.dataclass(frozen=True)
class RuntimeVersionRange:
    minimum: tuple[int, ...] | None = None
    maximum: tuple[int, ...] | None = None
    name: str = "runtime_version"

    def __call__(self, c: Conditions, ctx: Context) -> bool:
        return ((self.minimum is None or c.version_tuple >= self.minimum)
                and (self.maximum is None or c.version_tuple <= self.maximum))


class EligibilityPolicy:
    def __init__(self, criteria: Sequence[Criterion]):
        self.criteria = tuple(criteria)

    def failures(self, conditions: Conditions, ctx: Context) -> list[str]:
        return [c.name for c in self.criteria if not c(conditions, ctx)]

    def select(self, conditions: Conditions, ctx: Context) -> bool:
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
