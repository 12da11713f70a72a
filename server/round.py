"""A round as the lifecycle (server.rounds) and the task kinds (server.tasks) both read it.

A value, parsed from a `rounds` row by its owner (server.rounds); nothing here
touches the database.
"""
from __future__ import annotations

import dataclasses
import json

from contract.update.spec import RoundSpec
from server.store import Row

OPEN_STATES = ("selecting", "reporting")


@dataclasses.dataclass(frozen=True)
class Round:
    id: int
    population: str
    number: int
    task: str                   # a kind of contract.tasks.KINDS
    model_version: int
    attempt: int
    state: str                  # selecting → reporting → completed | failed
    goal: int
    max_selected: int
    min_selected: int
    min_reports: int
    hyperparameters: dict
    opened_at: float
    selection_ends_at: float
    deadline: float
    closed_at: float | None
    selected: int
    reported: int
    aborted: int
    failed: int
    update: RoundSpec | None    # rounds whose reports go through the update pipeline (or are masked)
    reason: str | None = None   # why it failed (None while open or once completed)

    @classmethod
    def from_row(cls, row: Row) -> "Round":
        names = {f.name for f in dataclasses.fields(cls)} - {"hyperparameters", "update"}
        spec = row["update_spec_json"]
        return cls(hyperparameters=json.loads(row["hyperparameters_json"]),
                   update=RoundSpec.from_json(json.loads(spec)) if spec else None,
                   **{n: row[n] for n in names})

    @property
    def is_open(self) -> bool:
        return self.state in OPEN_STATES

    @property
    def secure(self) -> bool:
        """Its reports are masked (server.secagg): the server sees only their sum."""
        return self.update is not None and self.update.spec.secure_aggregation

    @property
    def outstanding(self) -> int:
        """Selected devices that may still report."""
        return self.selected - self.reported - self.failed - self.aborted

    def accepts_reports(self, now: float) -> bool:
        return self.is_open and now < self.deadline and self.reported < self.goal


def phases(row: Row, now: float) -> dict:
    """A round row's phase durations: selection = opened → selection closed, reporting = selection closed →
    closed, finalize = the time its kind spent finishing it."""
    selection_end = row["selection_closed_at"] or row["closed_at"] or now
    reporting = ((row["closed_at"] or now) - selection_end) if row["selection_closed_at"] else 0.0
    return {"selection_s": selection_end - row["opened_at"], "reporting_s": reporting,
            "finalize_s": row["finalize_s"]}
