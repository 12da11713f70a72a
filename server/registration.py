"""Registering a population: what `python -m server init` does.

It stores the initial checkpoint (re-saved with the server's metadata), the
vocabulary and the training plan exported by `python -m tflite_export plan`
in the artifact store, and records the population at version 0. The server
treats plans as opaque files: it reads their manifest with
`contract.artifacts.manifest` only for the file list (to store and hash-check
each file), the weight layout (which must equal the checkpoint's) and the
fixed batch size.
"""
from __future__ import annotations

from pathlib import Path

from contract.artifacts.errors import ArtifactError
from contract.artifacts.manifest import read_manifest
from contract.clock import Clock
from contract.model.weights import WeightLayout, load_checkpoint
from server import populations
from server.artifacts import ArtifactStore
from server.populations import Plan, Population
from server.store import Store
from server.versions import add_initial_version, save_version_checkpoint


class RegistrationError(ValueError):
    """`init` input that cannot make a population; the message names the file."""


def store_plan(artifacts: ArtifactStore, manifest_path: Path, layout: WeightLayout) -> Plan:
    """Store an exported plan (its manifest and every file it lists), checking each hash."""
    try:
        manifest = read_manifest(manifest_path)
        plan_layout = manifest.layout
    except (ArtifactError, ValueError, KeyError, TypeError) as e:
        raise RegistrationError(f"{manifest_path}: not a plan manifest ({e})") from None
    if plan_layout != layout:
        raise RegistrationError(f"{manifest_path}: the plan's weight layout is not the checkpoint's")
    files = {str(name): str(rec.get("sha256")) for name, rec in manifest.files.items()}
    for name, expected in files.items():
        path = manifest_path.parent / name
        if Path(name).name != name or not path.is_file():
            raise RegistrationError(f"{manifest_path}: listed file {name!r} is missing")
        actual = artifacts.put_file(path)
        if actual != expected:
            raise RegistrationError(f"{path}: sha256 {actual} is not the manifest's {expected}")
    if manifest.artifact not in files:
        raise RegistrationError(f"{manifest_path}: the plan file {manifest.artifact!r} has no hash")
    return Plan(manifest_sha256=artifacts.put_file(manifest_path), artifact_sha256=files[manifest.artifact],
                vocab_sha256=files.get(manifest.vocab_file) if manifest.vocab_file else None,
                batch_size=manifest.batch_size)


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
        if populations.exists(tx, name):
            raise RegistrationError(f"population {name!r} already exists in {getattr(store, 'path', store)}")
        checkpoint_sha = save_version_checkpoint(artifacts, layout, flat, name, 0, None, model_config)
        now = clock.now()
        populations.insert(tx, name, layout, model_config, plan, vocab_sha, now)
        add_initial_version(tx, name, checkpoint_sha, now, vocab_sha)
        return populations.load_population(tx, name)
