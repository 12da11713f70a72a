"""Populations: a named group of devices training one model (the `populations` table's one owner).

A population's row says which model layout it trains, its plan and
vocabulary, the version devices train (`current_version`), the one apps get
(`published_version`) and how many versions were trained since the last
evaluation. Registering one (`python -m server init`) is server.registration.
"""
from __future__ import annotations

import dataclasses
import json

from contract.model.weights import WeightLayout
from server.errors import ErrorCode, ProtocolError
from server.store import Tx


@dataclasses.dataclass(frozen=True)
class Plan:
    manifest_sha256: str
    artifact_sha256: str
    vocab_sha256: str | None
    batch_size: int | None


@dataclasses.dataclass(frozen=True)
class Population:
    name: str
    layout: WeightLayout
    model_config: dict | None
    plan: Plan | None
    vocab_sha256: str | None
    current_version: int
    published_version: int | None
    train_since_eval: int


def load_population(conn: Tx, name: str) -> Population:
    row = conn.execute("SELECT * FROM populations WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise ProtocolError(ErrorCode.UNKNOWN_POPULATION, f"no population named {name!r}")
    plan = json.loads(row["plan_json"]) if row["plan_json"] else None
    return Population(
        name=row["name"], layout=WeightLayout.from_json(json.loads(row["layout_json"])),
        model_config=json.loads(row["model_config_json"]) if row["model_config_json"] else None,
        plan=Plan(**plan) if plan else None, vocab_sha256=row["vocab_sha256"],
        current_version=row["current_version"], published_version=row["published_version"],
        train_since_eval=row["train_since_eval"])


def names(conn: Tx) -> list[str]:
    """Every registered population's name."""
    return [r["name"] for r in conn.execute("SELECT name FROM populations ORDER BY name")]


def exists(conn: Tx, name: str) -> bool:
    return conn.execute("SELECT 1 FROM populations WHERE name = ?", (name,)).fetchone() is not None


def insert(tx: Tx, name: str, layout: WeightLayout, model_config: dict | None, plan: Plan | None,
           vocab_sha256: str | None, now: float) -> None:
    """A new population at version 0 (server.registration)."""
    tx.execute("INSERT INTO populations (name, layout_json, model_config_json, plan_json, vocab_sha256,"
               " current_version, created_at) VALUES (?, ?, ?, ?, ?, 0, ?)",
               (name, json.dumps(layout.to_json()), json.dumps(model_config) if model_config else None,
                json.dumps(dataclasses.asdict(plan)) if plan else None, vocab_sha256, now))


def set_vocabulary(tx: Tx, name: str, vocab_sha256: str, plan: Plan | None) -> None:
    """The population's vocabulary (and the plan re-issued with it) for its next assignments."""
    tx.execute("UPDATE populations SET vocab_sha256 = ?, plan_json = ? WHERE name = ?",
               (vocab_sha256, json.dumps(dataclasses.asdict(plan)) if plan else None, name))


def set_current(tx: Tx, name: str, version: int) -> None:
    """A new version is the one devices train next; one more trained since the last evaluation."""
    tx.execute("UPDATE populations SET current_version = ?, train_since_eval = train_since_eval + 1"
               " WHERE name = ?", (version, name))


def set_evaluated(tx: Tx, name: str) -> None:
    tx.execute("UPDATE populations SET train_since_eval = 0 WHERE name = ?", (name,))


def set_published(tx: Tx, name: str, version: int) -> None:
    """The version apps download (a publish, or an operator's rollback)."""
    tx.execute("UPDATE populations SET published_version = ? WHERE name = ?", (version, name))
