"""New words into the model: a version whose vocabulary's free slots hold the words discovery found.

A public vocabulary keeps free slots (`<free:i>`, contract.model.text) so that new
words change no tensor's shape. For each new word, every row of the model
that belongs to a token — along each tensor axis as long as the vocabulary:
the embedding row, the output layer's column and bias — starts as a copy of
`<oov>`'s, the token that stood for the word until now; so the new version
predicts exactly what the old one did, and training takes it from there.

The plan's graph does not depend on which word a slot holds, so the plan is
re-issued with the new vocabulary: the same plan file, a new vocabulary file
and a new manifest naming both (its hash is how a phone knows it must load
the plan again, and the manifest's vocabulary hash is checked against the
file before a phone trains). App models are exported, when a version is
published, with that version's vocabulary.
"""
from __future__ import annotations

import dataclasses
import json
import sqlite3

from contract.artifacts.manifest import file_record, utc_now
from contract.model.text import OOV_ID, Vocabulary
from contract.model.weights import copy_token_rows
from server.artifacts import ArtifactStore
from server.populations import Plan, Population, set_vocabulary
from server.versions import VersionRegistry


def reissue_plan(artifacts: ArtifactStore, plan: Plan, vocab: Vocabulary, vocab_sha: str) -> Plan:
    """The plan's manifest with the new vocabulary (same plan file), stored; the new Plan."""
    manifest = json.loads(artifacts.read(plan.manifest_sha256))
    data = vocab.to_json().encode("utf-8")
    manifest["vocab_sha256"] = vocab.sha256
    manifest["files"][manifest["vocab_file"]] = file_record(data)
    manifest["created_at"] = utc_now()
    manifest_sha = artifacts.put(json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8"))
    return dataclasses.replace(plan, manifest_sha256=manifest_sha, vocab_sha256=vocab_sha)


def grow(tx: sqlite3.Connection, artifacts: ArtifactStore, versions: VersionRegistry, pop: Population,
         round_number: int, words: list[str]) -> int | None:
    """A new version of `pop` with `words` in its vocabulary's free slots (as many as fit); its
    number, or None if no slot is free or the population has no vocabulary."""
    if pop.vocab_sha256 is None:
        return None
    vocab = Vocabulary.from_json(artifacts.read(pop.vocab_sha256).decode("utf-8"))
    slots = vocab.free_slots
    words = [w for w in words if vocab.id(w) == OOV_ID][:len(slots)]
    if not words:
        return None
    grown = vocab.with_words(words)
    vocab_sha = artifacts.put(grown.to_json().encode("utf-8"))
    parent = versions.get(pop.name, pop.current_version, tx)
    flat = copy_token_rows(versions.weights(parent), pop.layout, len(vocab), OOV_ID, slots[:len(words)])
    state = versions.optimizer_bytes(parent)
    version = versions.add(tx, pop.name, pop.layout, pop.model_config, parent.version, round_number, flat,
                           state, {"source": "discovery", "new_words": len(words)}, vocab_sha256=vocab_sha)
    plan = reissue_plan(artifacts, pop.plan, grown, vocab_sha) if pop.plan is not None else None
    set_vocabulary(tx, pop.name, vocab_sha, plan)
    return version.version
