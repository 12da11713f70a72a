"""Task kinds: what a round of each kind assigns, how its reports count, and how it finishes.

A round runs one task kind of `contract.tasks.KINDS` — train, eval,
personalize or discover — and each kind is one module here holding both
halves of its job, as Flower's `Strategy` pairs `configure_fit` with
`aggregate_fit`:

    due         whether a round of this kind should open next
    plan        what the round is bound to when it opens (its update spec, a goal)
    opened      what the kind starts when its round opens
    admits      whether a device may be selected into its round (participation rules)
    assignment  what a selected device's assignment carries beyond the common fields
    check       one report, checked: a 4xx if the round cannot use it, and nothing stored
    prepare     what must happen before the commit (the train kind folds the update into a shard)
    record      how an accepted report is added to the round, inside the one commit
    finish      how the round completes: its result (a new version, an evaluation, ...)
    discard     what goes when the round closes (its partial sums, votes, counts)
    detail      what the round's analytics show about it

The lifecycle (server.rounds) and the session commit (server.reporting) reach a
kind only through the `TaskRegistry`: neither names a kind module nor tests a
report's type. Each kind owns the tables of its task (the train kind the
round's running sum through server.partials, personalize `personal_evals`,
discover `discovery` and `discovery_votes`); the rounds table is read and moved
only through `RoundHistory`, which server.rounds implements.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any, ContextManager, Protocol

from contract.update.spec import RoundSpec, UpdateSpec, rotation_seed
from server.config import PopulationConfig
from server.populations import Population
from server.round import Round
from server.store import Row, Tx


@dataclasses.dataclass(frozen=True)
class RoundPlan:
    """What a round about to open is bound to."""

    goal: int | None = None             # reports it wants (None: the population's goal)
    update: RoundSpec | None = None     # how its reports are encoded or masked, frozen into the round


class RoundFailed(Exception):
    """`finish` cannot produce a result: the round fails with `reason`, a code shown in its analytics."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class RoundRefused(Exception):
    """A round of kind `task` may not open now (the privacy budget): recorded once as a failed round whose
    `reason` check-ins are told (a rejection reason of contract.protocol.wire)."""

    def __init__(self, reason: str, detail: str = "", task: str = "train"):
        super().__init__(detail or reason)
        self.reason, self.task = reason, task


@dataclasses.dataclass
class Contribution:
    """One accepted report on its way into the commit: what the kind's `record` adds, and its size.

    `counted` is set by server.reporting once the commit decided (a report that
    arrives after the round closed is aborted, not counted)."""

    report: Any
    nbytes: int = 0
    counted: bool = False


class RoundHistory(Protocol):
    """The `rounds` table as the kinds may read and move it (server.rounds owns it)."""

    def latest_of(self, conn: Tx, population: str, task: str, state: str | None = None) -> Round | None: ...

    def completed_since(self, conn: Tx, population: str, task: str, after_number: int) -> int: ...

    def last_completed_number(self, conn: Tx, population: str, task: str) -> int: ...

    def recent(self, conn: Tx, population: str, task: str, limit: int) -> list[Round]: ...

    def metric_sums(self, conn: Tx, round_id: int) -> dict: ...

    def add_metrics(self, tx: Tx, round_id: int, values: Mapping[str, float], weight: float | None = None) -> None: ...

    def count(self, tx: Tx, round_id: int, **deltas: float) -> None: ...


class TaskKind(Protocol):
    name: str

    def due(self, tx: Tx, population: Population, cfg: PopulationConfig) -> bool: ...

    def plan(self, tx: Tx, population: Population, cfg: PopulationConfig, number: int) -> RoundPlan: ...

    def opened(self, tx: Tx, rnd: Round) -> None: ...

    def admits(self, tx: Tx, rnd: Round, device_id: str) -> str | None: ...

    def assignment(self, tx: Tx, rnd: Round, population: Population, cfg: PopulationConfig) -> dict: ...

    def check(self, conn: Tx, session: Row, rnd: Round, report: Any) -> Any: ...

    def prepare(self, conn: Tx, rnd: Round, checked: Any) -> ContextManager[Contribution | None]: ...

    def record(self, tx: Tx, rnd: Round, session_id: str, contribution: Contribution) -> None: ...

    def finish(self, tx: Tx, rnd: Round) -> int | None: ...

    def discard(self, tx: Tx, rnd: Round, completed: bool) -> None: ...

    def detail(self, conn: Tx, rnd: Round) -> dict: ...


class KindBase:
    """Defaults for the optional steps: nothing to start, admit everyone, nothing extra, nothing to drop."""

    name = "base"

    def opened(self, tx: Tx, rnd: Round) -> None:
        return None

    def admits(self, tx: Tx, rnd: Round, device_id: str) -> str | None:
        return None

    def assignment(self, tx: Tx, rnd: Round, population: Population, cfg: PopulationConfig) -> dict:
        return {}

    def check(self, conn: Tx, session: Row, rnd: Round, report: Any) -> Any:
        return report

    @contextlib.contextmanager
    def prepare(self, conn: Tx, rnd: Round, checked: Any) -> Iterator[Contribution | None]:
        yield Contribution(checked)

    def discard(self, tx: Tx, rnd: Round, completed: bool) -> None:
        return None

    def detail(self, conn: Tx, rnd: Round) -> dict:
        return {}


def bind_round_spec(update: UpdateSpec, population: Population, cfg: PopulationConfig, number: int,
                    dp: tuple | None = None, zeroing_limit: float = 0.0) -> RoundSpec:
    """A population's update spec frozen into round `number` (its layout, seeds, cohort; DP and zeroing)."""
    return update.bind(population.layout.size, population.layout.sha256, f"{population.name}/{number}",
                       rotation_seed(cfg.seed, number), cfg.max_selected, dp, zeroing_limit)


class TaskRegistry:
    """Kind names → kinds, and which kind's round opens next.

    `ORDER` is the precedence when several are due: an evaluation of the newest
    version first (publishing waits on it), then the personalization
    evaluation, then a discovery pass; training is the fallback and always due.
    """

    ORDER = ("eval", "personalize", "discover", "train")

    def __init__(self) -> None:
        self._kinds: dict[str, TaskKind] = {}

    def register(self, *kinds: TaskKind) -> "TaskRegistry":
        for kind in kinds:
            if kind.name not in self.ORDER:
                raise ValueError(f"unknown task kind {kind.name!r}")
            self._kinds[kind.name] = kind
        return self

    def __getitem__(self, name: str) -> TaskKind:
        return self._kinds[name]

    def __iter__(self) -> Iterator[TaskKind]:
        return iter(self._kinds[n] for n in self.ORDER if n in self._kinds)

    def next_due(self, tx: Tx, population: Population, cfg: PopulationConfig) -> TaskKind:
        for kind in self:
            if kind.due(tx, population, cfg):
                return kind
        raise RuntimeError("no task kind is due (the train kind is always due)")
