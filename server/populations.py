"""Populations: a named group of devices training one model, and its registration.

`register_population` is what `python -m server init` does: it stores the
initial checkpoint (re-saved with the server's metadata), the vocabulary and
the training plan exported by `python -m tflite_export plan` in the artifact
store, and records version 0. The server treats plans as opaque files; from
the plan's manifest it only reads the file list (to store and hash-check each
file) and the weight layout (which must equal the checkpoint's).
"""
from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path

from contract.model.weights import WeightLayout, load_checkpoint
from server.artifacts import ArtifactStore
from contract.clock import Clock
from server.errors import ErrorCode, ProtocolError
from server.store import Store


class RegistrationError(ValueError):
    """`init` input that cannot make a population; the message names the file."""


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


def load_population(conn: sqlite3.Connection, name: str) -> Population:
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


def set_vocabulary(tx: sqlite3.Connection, name: str, vocab_sha256: str, plan: Plan | None) -> None:
    """The population's vocabulary (and the plan re-issued with it) for its next assignments."""
    tx.execute("UPDATE populations SET vocab_sha256 = ?, plan_json = ? WHERE name = ?",
               (vocab_sha256, json.dumps(dataclasses.asdict(plan)) if plan else None, name))


def set_current(tx: sqlite3.Connection, name: str, version: int) -> None:
    """A new version is the one devices train next; one more trained since the last evaluation."""
    tx.execute("UPDATE populations SET current_version = ?, train_since_eval = train_since_eval + 1"
               " WHERE name = ?", (version, name))


def set_evaluated(tx: sqlite3.Connection, name: str) -> None:
    tx.execute("UPDATE populations SET train_since_eval = 0 WHERE name = ?", (name,))


def set_published(tx: sqlite3.Connection, name: str, version: int) -> None:
    """The version apps download (a publish, or an operator's rollback)."""
    tx.execute("UPDATE populations SET published_version = ? WHERE name = ?", (version, name))


def store_plan(artifacts: ArtifactStore, manifest_path: Path, layout: WeightLayout) -> Plan:
    """Store an exported plan (its manifest and every file it lists), checking each hash."""
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = {str(name): str(rec["sha256"]) for name, rec in manifest["files"].items()}
        artifact = manifest["artifact"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise RegistrationError(f"{manifest_path}: not a plan manifest ({e})") from None
    if "weight_layout" in manifest and WeightLayout.from_json(manifest["weight_layout"]) != layout:
        raise RegistrationError(f"{manifest_path}: the plan's weight layout is not the checkpoint's")
    for name, expected in files.items():
        path = manifest_path.parent / name
        if Path(name).name != name or not path.is_file():
            raise RegistrationError(f"{manifest_path}: listed file {name!r} is missing")
        actual = artifacts.put_file(path)
        if actual != expected:
            raise RegistrationError(f"{path}: sha256 {actual} is not the manifest's {expected}")
    if artifact not in files:
        raise RegistrationError(f"{manifest_path}: the plan file {artifact!r} has no hash")
    vocab = manifest.get("vocab_file")
    return Plan(manifest_sha256=artifacts.put_file(manifest_path), artifact_sha256=files[artifact],
                vocab_sha256=files.get(vocab) if vocab else None,
                batch_size=manifest.get("batch_size"))


def find_plan_manifest(plan_dir: Path) -> Path:
    candidates = [plan_dir / "plan.manifest.json"] + sorted(plan_dir.glob("*.manifest.json"))
    for path in candidates:
        if path.is_file():
            return path
    raise RegistrationError(f"--plan-dir: no *.manifest.json in {plan_dir}")


def find_vocab(checkpoint: Path) -> Path | None:
    """vocab.json beside a checkpoint or in its run directory (where `models simulate` puts it)."""
    for directory in (checkpoint.parent, checkpoint.parent.parent):
        if (directory / "vocab.json").is_file():
            return directory / "vocab.json"
    return None


def register_population(store: Store, artifacts: ArtifactStore, clock: Clock, name: str,
                        checkpoint: Path, vocab: Path | None = None, plan_dir: Path | None = None,
                        batch_size: int | None = None) -> Population:
    """Create population `name` with version 0 = `checkpoint`. Raises RegistrationError.

    `batch_size`: the configured client batch size, which must be the plan's (a
    TFLite plan trains fixed-size batches).
    """
    from server.versions import add_initial_version, save_version_checkpoint

    try:
        layout, flat, meta = load_checkpoint(checkpoint)
    except Exception as e:  # safetensors/LayoutError/FileNotFoundError: all mean "not usable"
        raise RegistrationError(f"--checkpoint: {checkpoint} is not a readable checkpoint ({e})") from None
    model_config = meta.get("model_config")
    plan = store_plan(artifacts, find_plan_manifest(plan_dir), layout) if plan_dir else None
    if plan and plan.batch_size and batch_size and plan.batch_size != batch_size:
        raise RegistrationError(f"--plan-dir: the plan trains batches of {plan.batch_size}, the config's "
                                f"client_batch_size is {batch_size}; export the plan with --batch-size "
                                f"{batch_size} or change the config")
    vocab = vocab or find_vocab(checkpoint)
    if vocab is not None and not vocab.is_file():
        raise RegistrationError(f"--vocab: no file at {vocab}")
    vocab_sha = artifacts.put_file(vocab) if vocab else (plan.vocab_sha256 if plan else None)
    with store.write() as tx:
        if tx.execute("SELECT 1 FROM populations WHERE name = ?", (name,)).fetchone():
            raise RegistrationError(f"population {name!r} already exists in {store.path}")
        checkpoint_sha = save_version_checkpoint(artifacts, layout, flat, name, 0, None, model_config)
        now = clock.now()
        tx.execute(
            "INSERT INTO populations (name, layout_json, model_config_json, plan_json, vocab_sha256,"
            " current_version, created_at) VALUES (?, ?, ?, ?, ?, 0, ?)",
            (name, json.dumps(layout.to_json()), json.dumps(model_config) if model_config else None,
             json.dumps(dataclasses.asdict(plan)) if plan else None, vocab_sha, now))
        add_initial_version(tx, name, checkpoint_sha, now, vocab_sha)
        return load_population(tx, name)
