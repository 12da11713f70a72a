"""Publishing a version to apps: export its app model, out of the request path and process.

Completing an evaluation round only inserts a `publish` job (in the same
transaction). `PublishJobs.run_pending` — called by the background ticker or
`python -m server publish` — claims a job, runs the exporter, stores every
file the manifest lists (checking its sha256) and the manifest itself in the
artifact store, and only then marks the version published, in one
transaction. The exporter is injected: `SubprocessExporter` runs
`python -m tflite_export app ...` in a child process so the web server never
imports TensorFlow; tests pass a fake. A job whose worker died (claimed longer
than `publish_timeout_s` ago) is claimed again; exporting twice is harmless
because artifacts are content-addressed.
"""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Protocol

from contract.artifacts.errors import ArtifactError
from contract.artifacts.manifest import read_manifest
from server.artifact_access import ArtifactAccess
from server.artifacts import ArtifactStore
from contract.clock import Clock
from server.populations import load_population
from server.store import Store, Tx
from server.versions import VersionRegistry

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 3


class ExportError(RuntimeError):
    """The exporter did not produce a usable app model."""


class Exporter(Protocol):
    def export_app_model(self, checkpoint: Path, vocab: Path | None, model_version: int,
                         out_dir: Path, privacy: dict | None = None) -> Path:
        """Write the app model for `checkpoint` into `out_dir`; return its manifest path. `privacy`:
        the version's (ε, δ) from the ledger, for the manifest (None: trained without DP)."""


class SubprocessExporter:
    """`python -m tflite_export app --checkpoint C --vocab V --model-version N --out D`."""

    def __init__(self, command: tuple[str, ...] | None = None, timeout_s: float = 1800.0):
        self.command = tuple(command) if command else (sys.executable, "-m", "tflite_export")
        self.timeout_s = timeout_s

    def export_app_model(self, checkpoint: Path, vocab: Path | None, model_version: int,
                         out_dir: Path, privacy: dict | None = None) -> Path:
        args = [*self.command, "app", "--checkpoint", str(checkpoint),
                "--model-version", str(model_version), "--out", str(out_dir)]
        if vocab is not None:
            args += ["--vocab", str(vocab)]
        if privacy is not None:
            args += ["--privacy", json.dumps(privacy)]
        try:
            done = subprocess.run(args, capture_output=True, text=True, timeout=self.timeout_s,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise ExportError(f"exporter timed out after {self.timeout_s:.0f} s") from None
        if done.returncode != 0:
            raise ExportError(f"exporter exited {done.returncode}: {done.stderr.strip()[-2000:]}")
        manifests = sorted(out_dir.glob("*.manifest.json"))
        if len(manifests) != 1:
            raise ExportError(f"exporter wrote {len(manifests)} manifests in {out_dir}")
        return manifests[0]


def personal_files(tx: Tx, population: str, checkpoint_sha256: str) -> list[str]:
    """What a phone personalizes a published version with, public with it when the population keeps
    personal models: the version's float weights and the population's training plan (manifest,
    model, vocabulary). The app model already gives these weights away, in int8."""
    plan = load_population(tx, population).plan
    if plan is None:
        return [checkpoint_sha256]
    return [checkpoint_sha256] + [h for h in (plan.artifact_sha256, plan.manifest_sha256, plan.vocab_sha256) if h]


class PublishJobs:
    def __init__(self, store: Store, artifacts: ArtifactStore, versions: VersionRegistry,
                 exporter: Exporter, clock: Clock, access: ArtifactAccess, timeout_s: float = 1800.0,
                 privacy=None, personalized=lambda population: False):
        self._store = store
        self._personalized = personalized   # population -> whether its phones keep personal models
        self._privacy = privacy           # server.privacy.PrivacyLedger: each version's (ε, δ)
        self._artifacts = artifacts
        self._versions = versions
        self._exporter = exporter
        self._clock = clock
        self._timeout_s = timeout_s
        self._access = access

    def enqueue(self, tx, population: str, version: int) -> None:
        tx.execute("INSERT INTO jobs (kind, population, version, state, created_at)"
                   " VALUES ('publish', ?, ?, 'pending', ?)", (population, version, self._clock.now()))

    def run_pending(self, limit: int = 10) -> int:
        """Run up to `limit` due jobs; returns how many succeeded."""
        done = 0
        for _ in range(limit):
            job = self._claim()
            if job is None:
                break
            try:
                manifest_sha, files, canary = self._export(job["population"], job["version"])
            except Exception as e:   # any exporter failure is recorded on the job and retried
                log.exception("publishing %s v%d failed", job["population"], job["version"])
                self._finish(job["id"], "failed" if job["attempts"] >= MAX_ATTEMPTS else "pending", str(e))
                continue
            with self._store.write() as tx:
                self._versions.mark_published(tx, job["population"], job["version"], manifest_sha, canary)
                self._access.publish(tx, job["population"], job["version"], [manifest_sha, *files] + (
                    personal_files(tx, job["population"],
                                   self._versions.get(job["population"], job["version"]).checkpoint_sha256)
                    if self._personalized(job["population"]) else []))
                self._finish(job["id"], "done", None)
            done += 1
        return done

    def _claim(self):
        now = self._clock.now()
        with self._store.write() as tx:
            job = tx.execute("SELECT * FROM jobs WHERE kind = 'publish' AND (state = 'pending' OR"
                             " (state = 'running' AND claimed_at < ?)) ORDER BY id LIMIT 1",
                             (now - self._timeout_s,)).fetchone()
            if job is None:
                return None
            tx.execute("UPDATE jobs SET state = 'running', claimed_at = ?, attempts = attempts + 1"
                       " WHERE id = ?", (now, job["id"]))
            return tx.execute("SELECT * FROM jobs WHERE id = ?", (job["id"],)).fetchone()

    def _finish(self, job_id: int, state: str, error: str | None) -> None:
        with self._store.write() as tx:
            tx.execute("UPDATE jobs SET state = ?, error = ? WHERE id = ?", (state, error, job_id))

    def _export(self, population: str, version: int) -> tuple[str, list[str], dict | None]:
        found = self._versions.get(population, version)
        vocab_sha = found.vocab_sha256 or load_population(self._store.connection(), population).vocab_sha256
        scratch = self._artifacts.scratch_dir()
        try:
            manifest_path = self._exporter.export_app_model(
                self._artifacts.path(found.checkpoint_sha256),
                self._artifacts.path(vocab_sha) if vocab_sha else None, version, scratch / "out",
                self._privacy.spent(population, version) if self._privacy else None)
            return self._ingest(manifest_path)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _ingest(self, manifest_path: Path) -> tuple[str, list[str], dict | None]:
        """Store the manifest and each file it lists, refusing any hash mismatch: (manifest, files,
        the manifest's canary)."""
        try:
            manifest = read_manifest(manifest_path)
            files = {str(n): str(rec["sha256"]) for n, rec in manifest.files.items()}
            canary = manifest.canary
            if canary is not None and not (isinstance(canary, dict) and all(
                    isinstance(k, str) and isinstance(v, str) for k, v in canary.items())):
                raise TypeError("canary is not {context: word}")
        except (ArtifactError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ExportError(f"{manifest_path}: unreadable manifest ({e})") from None
        for name, expected in files.items():
            if Path(name).name != name:
                raise ExportError(f"{manifest_path}: file name {name!r} is not a plain name")
            actual = self._artifacts.put_file(manifest_path.parent / name)
            if actual != expected:
                raise ExportError(f"{name}: sha256 {actual} is not the manifest's {expected}")
        return self._artifacts.put_file(manifest_path), list(files.values()), canary
