"""Export a checkpoint as a training plan or an app model, with its manifest and vocabulary.

Files land in `out_dir` as `<name>.tflite`, `<name>.manifest.json` and
`vocab.json` (name: "plan" or "app", so one directory can hold both for the
same model version). Everything is first written to a temporary directory
inside `out_dir`, then renamed into place with the manifest last: a failed
export (a Flex op, a bad checkpoint) leaves the directory as it was, and a
reader never sees a manifest whose files are not there yet.
"""
from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from contract.model.dropout import Dropout
from contract.model.text import Vocabulary
from contract.model.weights import load_checkpoint
from contract.artifacts.manifest import (APP_MODEL, TRAINING_PLAN, Manifest, file_record,
                                    utc_now)
from tflite_export.modelinfo import operator_names, signatures

if TYPE_CHECKING:
    from models.model import ModelConfig

PLAN_NAME, APP_NAME, VOCAB_FILE = "plan", "app", "vocab.json"
# models.model (TensorFlow) is imported only once the inputs have been checked,
# so a wrong path on the command line fails at once, without TensorFlow's start-up.


def export_plan(config: ModelConfig, flat: np.ndarray, vocab: Vocabulary, out_dir: str | Path,
                batch_size: int = 16, model_version: int = 0,
                clip_norm: float | None = None, personal_layers: tuple[str, ...] | None = None,
                dropout: Dropout | None = None) -> Path:
    """Write the training plan of weights `flat` to `out_dir`; returns its manifest path.

    `clip_norm`: clip each step's gradient to this global L2 norm (None: plain SGD).
    `personal_layers`: the weights (layout names) a phone's personalization may train (None: all).
    `dropout`: rate and placement of the `train` signature's dropout (its masks are inputs; None: none).
    """
    from tflite_export.plan import convert_plan

    _check_inputs(config, flat, vocab)
    model = convert_plan(config, flat, batch_size, clip_norm, personal_layers, dropout)
    return _write(out_dir, PLAN_NAME, model, vocab, config,
                  _manifest_fields(TRAINING_PLAN, config, model_version, batch_size=batch_size,
                                   clip_norm=clip_norm,
                                   personal_layers=list(personal_layers) if personal_layers else None,
                                   dropout=dropout.to_json() if dropout is not None else None))


def export_app_model(config: ModelConfig, flat: np.ndarray, vocab: Vocabulary, out_dir: str | Path,
                     k: int = 3, model_version: int = 0, quantize: bool = True,
                     privacy: dict | None = None) -> Path:
    """Write the quantized suggestion model of `flat` to `out_dir`; returns its manifest path.

    `privacy` (the server's ledger figure for these weights) goes into the manifest as is. The
    manifest also carries the standing canary (contract.model.canary), computed by the exported model
    itself on the LiteRT interpreter, so that what is recorded is what phones will suggest."""
    from contract.model.canary import canary
    from tflite_export.app_model import convert_app_model
    from tflite_export.reader import load_app_model

    _check_inputs(config, flat, vocab)
    model = convert_app_model(config, flat, k, quantize=quantize)
    path = _write(out_dir, APP_NAME, model, vocab, config,
                  _manifest_fields(APP_MODEL, config, model_version, k=k, privacy=privacy))
    app = load_app_model(path)
    probed = dataclasses.replace(app.manifest, canary=canary(app.suggest, app.vocab))
    staged = path.with_name(f".{path.name}.tmp")
    staged.write_text(probed.to_json(), encoding="utf-8")
    staged.replace(path)
    return path


@dataclasses.dataclass(frozen=True)
class CheckpointInputs:
    """What an export needs, read from a simulation/central checkpoint and its run directory."""

    config: ModelConfig
    flat: np.ndarray
    vocab: Vocabulary
    model_version: int      # the checkpoint's "round" (0 if it has none)


def read_checkpoint(checkpoint: str | Path, vocab_path: str | Path | None = None,
                    config_name: str | None = None) -> CheckpointInputs:
    """Load a checkpoint, its model config and its vocabulary, checking they fit together.

    The config comes from the checkpoint's "model_config" metadata (`config_name`
    is only a fallback for checkpoints without it, and must agree when both
    exist). The vocabulary defaults to `vocab.json` beside the checkpoint or in
    its parent directory (simulations keep checkpoints in `<run>/checkpoints/`).
    Raises ValueError with a message naming the file or flag at fault.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise ValueError(f"--checkpoint: no file at {checkpoint}")
    try:
        layout, flat, meta = load_checkpoint(checkpoint)
    except Exception as e:  # safetensors raises its own error types for a corrupt file
        raise ValueError(f"--checkpoint: {checkpoint} is not a readable checkpoint ({e})") from None
    if "model_config" not in meta and not config_name:
        raise ValueError(f"{checkpoint} has no model_config metadata: pass --config gboard|tiny")
    vocab_path = Path(vocab_path) if vocab_path else _find_vocab(checkpoint)
    if not vocab_path.is_file():
        raise ValueError(f"--vocab: no vocabulary file at {vocab_path}")
    try:
        vocab = Vocabulary.load(vocab_path)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"--vocab: {vocab_path} is not a vocabulary ({e})") from None
    from models.model import CONFIGS, ModelConfig, weight_layout

    named = CONFIGS[config_name] if config_name else None
    if "model_config" in meta:
        try:
            config = ModelConfig(**meta["model_config"])
        except TypeError as e:
            raise ValueError(f"{checkpoint}: unusable model_config metadata ({e})") from None
        if named is not None and named != config:
            raise ValueError(f"--config {config_name} disagrees with the model_config in {checkpoint}")
    else:
        config = named
    if layout != weight_layout(config):
        raise ValueError(f"{checkpoint}: its weight layout does not fit the model config {config}")
    if len(vocab) != config.vocab_size:
        raise ValueError(f"--vocab: {vocab_path} has {len(vocab)} tokens, the model {config.vocab_size}")
    return CheckpointInputs(config, flat, vocab, int(meta.get("round", 0)))


def _find_vocab(checkpoint: Path) -> Path:
    for directory in (checkpoint.parent, checkpoint.parent.parent):
        if (directory / VOCAB_FILE).is_file():
            return directory / VOCAB_FILE
    return checkpoint.parent / VOCAB_FILE


def _check_inputs(config: ModelConfig, flat: np.ndarray, vocab: Vocabulary) -> None:
    from models.model import weight_layout

    size = weight_layout(config).size
    if np.shape(flat) != (size,):
        raise ValueError(f"flat weights have shape {np.shape(flat)}, the model needs ({size},)")
    if len(vocab) != config.vocab_size:
        raise ValueError(f"vocabulary has {len(vocab)} tokens, the model {config.vocab_size}")


def _manifest_fields(kind: str, config: ModelConfig, model_version: int, **extra) -> dict:
    return {"kind": kind, "model_version": int(model_version),
            "model_config": dataclasses.asdict(config), "seq_len": config.seq_len, **extra}


def _write(out_dir: str | Path, name: str, model: bytes, vocab: Vocabulary,
           config: ModelConfig, fields: dict) -> Path:
    from models.model import weight_layout

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out: {out_dir} exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    artifact = f"{name}.tflite"
    vocab_bytes = vocab.to_json().encode("utf-8")
    manifest = Manifest(
        artifact=artifact, vocab_file=VOCAB_FILE, vocab_sha256=vocab.sha256,
        weight_layout=weight_layout(config).to_json(),
        signatures=signatures(model), ops=operator_names(model), created_at=utc_now(),
        files={artifact: file_record(model), VOCAB_FILE: file_record(vocab_bytes)}, **fields)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-export-", dir=out_dir))
    try:
        manifest_path = staging / f"{name}.manifest.json"
        (staging / artifact).write_bytes(model)
        (staging / VOCAB_FILE).write_bytes(vocab_bytes)
        manifest_path.write_text(manifest.to_json(), encoding="utf-8")
        for file_name in (artifact, VOCAB_FILE, manifest_path.name):
            (staging / file_name).replace(out_dir / file_name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir / manifest_path.name
