"""The manifest beside every exported artifact, and its verification. TensorFlow-free.

A manifest (`plan.manifest.json`, `app.manifest.json`) is the contract between
the server that exports a model and the phone that runs it: what the file is,
which weights and vocabulary it belongs to, the flat weight layout
(`contract.model.weights.WeightLayout`, the one mapping of weights to a flat vector),
the signatures it exposes and the sha256 of every file. `load_verified` is the
only way the device side opens an artifact, so a truncated download, a
manifest from a newer server or a vocabulary from another model version is
refused with an `ArtifactError` before any inference runs.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

from contract.model.dropout import Dropout
from contract.model.text import Vocabulary
from contract.model.weights import LayoutError, WeightLayout
from contract.artifacts.errors import (HashMismatch, MissingArtifact, SchemaMismatch,
                                  VocabularyMismatch)

SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = (1,)
TRAINING_PLAN, APP_MODEL = "training_plan", "app_model"
KINDS = (TRAINING_PLAN, APP_MODEL)


@dataclasses.dataclass(frozen=True)
class Manifest:
    """Everything a device needs to know about one exported `.tflite` file."""

    kind: str                       # TRAINING_PLAN or APP_MODEL
    model_version: int              # the server's version of the weights inside
    model_config: dict              # models.model.ModelConfig fields
    artifact: str                   # the .tflite file name (same directory)
    vocab_file: str                 # the vocabulary file name (same directory)
    vocab_sha256: str               # contract.model.text.Vocabulary.sha256 of it
    seq_len: int
    weight_layout: list[dict]       # WeightLayout.to_json(): name, shape, offset
    signatures: dict                # models.modelinfo.signatures() of the artifact
    files: dict[str, dict]          # file name → {"sha256": hex, "bytes": n}
    created_at: str                 # UTC, ISO 8601
    batch_size: int | None = None   # training plan: the fixed batch of train/infer
    k: int | None = None            # app model: suggestions per call
    clip_norm: float | None = None  # training plan: gradient clip (global L2 norm), if any
    personal_layers: list[str] | None = None   # training plan: what `personalize` trains (None: all)
    dropout: dict | None = None     # training plan: {rate, placement} of `train`'s dropout (None: none)
    privacy: dict | None = None     # app model trained under DP: {epsilon, delta, accountant, rounds}
    canary: dict | None = None      # app model: {probe context: first suggestion} (contract.model.canary)
    ops: list[str] = dataclasses.field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    @property
    def layout(self) -> WeightLayout:
        return WeightLayout.from_json(self.weight_layout)

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data = {"schema_version": data.pop("schema_version"), "kind": data.pop("kind"), **data}
        return json.dumps({k: v for k, v in data.items() if v is not None}, indent=2)

    @classmethod
    def from_json(cls, text: str, source: object = "manifest") -> "Manifest":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SchemaMismatch(f"{source}: not a JSON manifest ({e})") from None
        if not isinstance(data, dict):
            raise SchemaMismatch(f"{source}: not a JSON manifest object")
        version = data.get("schema_version")
        if version not in SUPPORTED_SCHEMA_VERSIONS:
            raise SchemaMismatch(f"{source}: manifest schema version {version!r} is not supported "
                                 f"(this reader knows {list(SUPPORTED_SCHEMA_VERSIONS)})")
        if data.get("kind") not in KINDS:
            raise SchemaMismatch(f"{source}: unknown artifact kind {data.get('kind')!r}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        required = [n for n, f in fields.items() if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING]
        missing = [n for n in required if n not in data]
        if missing:
            raise SchemaMismatch(f"{source}: manifest lacks field(s) {', '.join(missing)}")
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise SchemaMismatch(f"{source}: manifest has unknown field(s) {', '.join(unknown)}")
        manifest = cls(**data)
        needed = "batch_size" if manifest.kind == TRAINING_PLAN else "k"
        if not isinstance(getattr(manifest, needed), int):
            raise SchemaMismatch(f"{source}: a {manifest.kind} manifest needs an integer '{needed}'")
        try:
            manifest.layout
        except (LayoutError, KeyError, TypeError) as e:
            raise SchemaMismatch(f"{source}: invalid weight_layout ({e})") from None
        try:
            Dropout.from_json(manifest.dropout)
        except ValueError as e:
            raise SchemaMismatch(f"{source}: invalid dropout ({e})") from None
        return manifest

    @property
    def training_dropout(self) -> Dropout | None:
        """The plan's dropout option (None: its `train` takes no masks)."""
        return Dropout.from_json(self.dropout)


FIELD_DOCS = {
    "schema_version": f"manifest format version ({SCHEMA_VERSION})",
    "kind": f"{TRAINING_PLAN} or {APP_MODEL}",
    "model_version": "the server's version of the weights inside",
    "model_config": "the model's sizes (vocab_size, embedding_dim, units, seq_len, ...)",
    "artifact": "the .tflite file's name (beside the manifest)",
    "vocab_file": "the vocabulary's file name: a JSON list of tokens, the four special ones first",
    "vocab_sha256": "contract.model.text.Vocabulary.sha256 of the vocabulary",
    "seq_len": "tokens per window the model reads",
    "weight_layout": "the flat weight vector's order: [{name, shape, offset}], tensors in this order",
    "signatures": "the .tflite's signatures: {name: {inputs, outputs}} with shapes and dtypes",
    "files": "every file of the export: {name: {sha256, bytes}}",
    "created_at": "UTC, ISO 8601",
    "batch_size": "training plan: the fixed batch of train/infer",
    "k": "app model: suggestions per call",
    "clip_norm": "training plan: each SGD step's gradient clip (global L2), if any",
    "personal_layers": "training plan: the weights its personalize signature trains (null: all of them)",
    "dropout": "training plan: {rate, placement} of the train signature's dropout; its keep_<placement> inputs "
               "are 0/1 masks the device draws from the session's seed (contract.model.dropout); absent: none",
    "privacy": "app model trained under user-level DP: the server ledger's {epsilon, delta, accountant, rounds}",
    "canary": "app model: the first suggestion after each standing probe context (contract.model.canary), "
              "computed by this model on the LiteRT interpreter",
    "ops": "the TFLite built-in operators the model uses",
}


def manifest_schema() -> dict:
    """The manifest's JSON Schema (documentation: `Manifest.from_json` is what checks one)."""
    fields = dataclasses.fields(Manifest)
    required = [f.name for f in fields if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    return {"type": "object", "required": required, "additionalProperties": False,
            "properties": {f.name: {"description": FIELD_DOCS[f.name]} for f in fields},
            "description": "plan.manifest.json / app.manifest.json, beside every exported model"}


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_record(data: bytes) -> dict:
    return {"sha256": sha256_bytes(data), "bytes": len(data)}


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_manifest(path: str | Path) -> Manifest:
    """Parse and schema-check a manifest (files are not verified: see `load_verified`)."""
    path = Path(path)
    if not path.is_file():
        raise MissingArtifact(f"no manifest at {path}")
    return Manifest.from_json(path.read_text(encoding="utf-8"), source=path)


@dataclasses.dataclass(frozen=True)
class VerifiedArtifact:
    """A manifest whose files all matched their hashes, with the bytes that were checked."""

    manifest: Manifest
    directory: Path
    model: bytes          # the exact bytes that were hashed: load these, not the path
    vocab: Vocabulary


def load_verified(manifest_path: str | Path, kind: str | None = None,
                  expected_vocab_sha256: str | None = None) -> VerifiedArtifact:
    """Read a manifest and check every file it lists, its kind and its vocabulary.

    Raises `MissingArtifact`, `HashMismatch`, `SchemaMismatch` or
    `VocabularyMismatch` (all `ArtifactError`), each naming the file at fault.
    """
    manifest_path = Path(manifest_path)
    manifest = read_manifest(manifest_path)
    if kind is not None and manifest.kind != kind:
        raise SchemaMismatch(f"{manifest_path} describes a {manifest.kind}, not a {kind}")
    directory = manifest_path.parent
    for name in (manifest.artifact, manifest.vocab_file):
        if name not in manifest.files:
            raise SchemaMismatch(f"{manifest_path}: 'files' has no hash for {name}")
    contents = {}
    for name, record in manifest.files.items():
        path = directory / name
        if Path(name).name != name:
            raise SchemaMismatch(f"{manifest_path}: file name {name!r} is not a plain name")
        if not path.is_file():
            raise MissingArtifact(f"{path} (listed in {manifest_path.name}) does not exist")
        data = path.read_bytes()
        actual = sha256_bytes(data)
        if actual != record.get("sha256"):
            raise HashMismatch(path, str(record.get("sha256")), actual)
        contents[name] = data
    vocab = Vocabulary.from_json(contents[manifest.vocab_file].decode("utf-8"))
    vocab_path = directory / manifest.vocab_file
    if vocab.sha256 != manifest.vocab_sha256:
        raise VocabularyMismatch(f"{vocab_path}: vocabulary sha256 {vocab.sha256} is not the "
                                 f"manifest's {manifest.vocab_sha256}")
    if len(vocab) != manifest.model_config.get("vocab_size"):
        raise VocabularyMismatch(f"{vocab_path}: {len(vocab)} tokens, but the model has "
                                 f"{manifest.model_config.get('vocab_size')}")
    if expected_vocab_sha256 is not None and expected_vocab_sha256 != vocab.sha256:
        raise VocabularyMismatch(f"{manifest_path}: the artifact's vocabulary {vocab.sha256} is "
                                 f"not the expected {expected_vocab_sha256}")
    return VerifiedArtifact(manifest, directory, contents[manifest.artifact], vocab)


def check_signatures(manifest: Manifest, actual: Mapping[str, dict], source: object) -> None:
    """Refuse a model whose signatures differ from what its manifest promises."""
    if dict(actual) != manifest.signatures:
        raise SchemaMismatch(f"{source}: the model's signatures {sorted(actual)} do not match "
                             f"its manifest's {sorted(manifest.signatures)}")
