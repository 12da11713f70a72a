"""Per-population reads: the published app model (for apps) and round/version analytics (operators)."""
from __future__ import annotations

from flask import Blueprint, jsonify, request

from contract.artifacts.manifest import Manifest
from server import validation as v
from server.validation import MAX_INT
from server.checkin import artifact_ref, artifact_url
from server.populations import load_population
from server.versions import Version
from server.views._common import require_operator, services

bp = Blueprint("populations", __name__, url_prefix="/v1/populations/<population>")


def _app_model(version: Version) -> dict:
    store = services().artifacts
    manifest = Manifest.from_json(store.read(version.app_manifest_sha256).decode("utf-8"))
    files = {name: {"url": artifact_url(rec["sha256"]), "sha256": rec["sha256"], "bytes": rec.get("bytes")}
             for name, rec in manifest.files.items()}

    def ref(name: str | None) -> dict | None:
        return {"url": files[name]["url"], "sha256": files[name]["sha256"]} if name in files else None

    return {"population": version.population, "version": version.version,
            "published_at": version.published_at, "eval": version.eval,
            "privacy": services().privacy.spent(version.population, version.version),
            "manifest": {"url": artifact_url(version.app_manifest_sha256),
                         "sha256": version.app_manifest_sha256},
            "model": ref(manifest.artifact), "vocab": ref(manifest.vocab_file),
            "files": files, "personalization": _personalization(version, manifest.vocab_file in files and
                                                               files[manifest.vocab_file]["sha256"] or None)}


def _personalization(version: Version, vocab_sha256: str | None) -> dict | None:
    """What a phone personalizes this version with (contract.tasks.personal), if the population keeps personal
    models and its training plan speaks this version's vocabulary (and was public when it was published)."""
    svc = services()
    spec = svc.rounds.settings(version.population).personalization
    pop = load_population(svc.store.connection(), version.population)
    if spec is None or pop.plan is None or pop.plan.vocab_sha256 != vocab_sha256:
        return None
    needed = (version.checkpoint_sha256, pop.plan.manifest_sha256, pop.plan.artifact_sha256)
    if not all(svc.access.is_public(sha) for sha in needed):
        return None
    return {"spec": spec.to_json(), "checkpoint": artifact_ref(version.checkpoint_sha256),
            "plan": {**artifact_ref(pop.plan.artifact_sha256), "manifest": artifact_ref(pop.plan.manifest_sha256)},
            "vocab": artifact_ref(vocab_sha256)}


@bp.get("/app-model")
def latest_app_model(population: str):
    return jsonify(_app_model(services().versions.published(population)))


@bp.get(f"/app-model/<int(max={MAX_INT}):version>")
def app_model(population: str, version: int):
    return jsonify(_app_model(services().versions.published(population, version)))


@bp.get("/rounds")
def rounds(population: str):
    require_operator()
    svc = services()
    limit = v.query_int(request.args, "limit", 1, 1000, default=50)
    before = v.query_int(request.args, "before", 0, v.MAX_INT, default=None)
    return jsonify({"rounds": svc.analytics.list(population, svc.clock.now(), limit, before)})


@bp.get(f"/rounds/<int(max={MAX_INT}):number>")
def round_detail(population: str, number: int):
    require_operator()
    svc = services()
    return jsonify(svc.analytics.detail(population, number, svc.clock.now()))


@bp.get("/versions")
def versions(population: str):
    require_operator()
    svc = services()
    load_population(svc.store.connection(), population)   # 404 for an unknown population
    limit = v.query_int(request.args, "limit", 1, 1000, default=50)
    before = v.query_int(request.args, "before", 0, v.MAX_INT, default=None)
    return jsonify({"versions": [{**ver.to_json(), "dp": svc.privacy.spent(population, ver.version)}
                                 for ver in svc.versions.list(population, limit, before)]})


@bp.get("/privacy")
def privacy(population: str):
    """Operator: the DP ledger: the setting, the current clip, every round's event, ε spent, the budget."""
    require_operator()
    svc = services()
    load_population(svc.store.connection(), population)   # 404 for an unknown population
    return jsonify(svc.privacy.summary(population, svc.rounds.settings(population)) or {"dp": None})


@bp.get("/discovery")
def discovery(population: str):
    """Operator: the discovery pass in progress and every word discovered so far."""
    require_operator()
    svc = services()
    conn = svc.store.connection()
    load_population(conn, population)                      # 404 for an unknown population
    return jsonify(svc.kinds["discover"].summary(conn, population))


@bp.post("/devices/<pseudonym>/revoke")
def revoke(population: str, pseudonym: str):
    """Operator: revoke a device named by its pseudonym (as operator views show it)."""
    require_operator()
    changed = services().enrollment.revoke(population, pseudonym)
    return jsonify({"device": pseudonym, "revoked": True, "already_revoked": not changed})
