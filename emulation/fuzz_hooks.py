"""schemathesis hooks for fuzzing the Nightjar server (loaded by schemathesis, in its own venv).

schemathesis generates requests from the server's own /openapi.json, the
`Nightjar-Protocol` header included (the document lists the versions served);
these hooks give it what a real client would have, so its requests reach
past authentication instead of all stopping at a 401:

* credentials come from an auth provider (`Credentials`), so schemathesis
  knows them for real ones: it still probes each operation without them and
  with forged ones (ignored_auth, missing_required_header) and expects 401.
  Operator operations get the operator token; device operations a
  pre-enrolled device's, or the one a link carried over from a registration;
* where the case is not deliberately invalid there, most requests name the
  served population (a random name only finds 404s), check-ins claim
  conditions a round accepts (all of a freshly registered device's, half of
  the others'), and a valid evaluation report keeps the
  document's cross-field rule top1_hits <= top3_hits <= positions (which JSON
  Schema cannot say);
* half of the valid registrations (every one in the stateful phase) are
  replaced by a real enrollment — a fresh
  nonce from the server, a statement signed by the development issuer, the
  app credential — so the stateful phase can follow the document's links
  from a real registration to a check-in and an upload;
* an operation on a session that a check-in assigned goes with that
  device's credential (`SESSIONS`, filled from the check-ins' answers),
  unless schemathesis made its headers invalid on purpose.

The hooks read their settings from the NIGHTJAR_FUZZ environment variable
(JSON: base URL, population, operator token, enrollment material, device
credentials). Of Nightjar they import only `contract.protocol.attestation`
and `contract.protocol.version`, which need nothing but `cryptography`:
schemathesis runs in a venv of its own (TFF pins typing-extensions 4.5,
schemathesis needs a newer one).
"""
from __future__ import annotations

import json
import os
import random
import re
import time
import urllib.request

import schemathesis
from schemathesis.core.parameters import ParameterLocation

# TF- and numpy-free: the fuzz venv imports them as they are (PYTHONPATH is the repository).
from contract.protocol import version as protocol
from contract.protocol.attestation import GENUINE, AttestationStatement, b64decode, sign
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

SETTINGS = json.loads(os.environ.get("NIGHTJAR_FUZZ", "{}"))
_rng = random.Random(SETTINGS.get("seed", 0))


def valid_registration() -> dict:
    """What an honest phone sends: a fresh nonce, signed by the development issuer."""
    population = SETTINGS["population"]
    request = urllib.request.Request(SETTINGS["url"] + "/v1/enrollment/nonces", method="POST",
                                     data=json.dumps({"population": population}).encode(),
                                     headers={"Content-Type": "application/json",
                                              protocol.HEADER: str(protocol.CURRENT)})
    with urllib.request.urlopen(request, timeout=10) as answer:
        nonce = json.loads(answer.read())["nonce"]
    enrollment = SETTINGS["enrollment"]
    key = Ed25519PrivateKey.from_private_bytes(b64decode(enrollment["issuer_private_key"], "issuer key"))
    attestation = sign(AttestationStatement(population, nonce, GENUINE, "nightjar.fuzz", time.time()), key)
    return {"population": population, "app_credential": enrollment["app_credential"],
            "attestation": attestation.to_json()}


DEVICE_CREDENTIAL = re.compile(r"Bearer d-[0-9a-f]{24}:[A-Za-z0-9_-]{43}")
ELIGIBLE = {"charging": True, "unmetered": True, "idle": True, "battery": 0.9, "free_memory_mb": 4096,
            "num_examples": 200, "runtime_version": "1.0.0"}


def consistent_personal_counts(counts: list) -> list:
    """A valid unmasked personal report built from generated numbers, by the document's rule: top1 <= top3
    <= positions for both models, devices = 1, one 1 in each histogram, helped + hurt <= 1 (the
    layout: contract.tasks.personal.PersonalReport.vector; not imported: it needs numpy)."""
    if len(counts) < 9 or not all(isinstance(c, (int, float)) and not isinstance(c, bool) and float(c).is_integer()
                                  for c in counts):
        return counts
    counts = [int(c) for c in counts]        # integers may be written 13468.0
    buckets = (len(counts) - 9) // 2
    g1, g3, positions = sorted(counts[0:3])
    p1, p3 = sorted(min(c, positions) for c in counts[3:5])
    out = [g1, g3, p1, p3, positions, 1] + [0] * (2 * buckets) + [0, 0, counts[-1] % 2]
    out[6 + counts[5] % buckets] = out[6 + buckets + counts[6] % buckets] = 1
    out[-3 + counts[7] % 2] = counts[8] % 2          # helped or hurt, at most one
    return out


def _security(operation) -> list[str]:
    return [name for rule in operation.definition.raw.get("security", []) for name in rule]


@schemathesis.auth(refresh_interval=None)
class Credentials:
    """The operator token for operator operations; a device's credential for device operations."""

    def get(self, case, context):
        security = _security(case.operation)
        if "operator" in security:
            return f"Bearer {SETTINGS['operator_token']}"
        if "device" in security:
            given = str(case.headers.get("Authorization", "")) if case.headers else ""
            if DEVICE_CREDENTIAL.fullmatch(given):      # a link's, from a registration: keep it
                return given
            return _rng.choice(SETTINGS["devices"]) if SETTINGS.get("devices") else None
        return None

    def set(self, case, data, context):
        case.headers = {**(case.headers or {}), "Authorization": data}


def _negative(case, location: ParameterLocation) -> bool:
    """Whether schemathesis made this part of the case invalid on purpose (then it is left alone)."""
    return case.meta is not None and case.meta.is_negative_at(location)


def _stateful(case) -> bool:
    """Whether the case is a step of the stateful phase (a phone's walk along the document's links)."""
    phase = getattr(getattr(case.meta, "phase", None), "name", "")
    return str(getattr(phase, "value", phase)).lower().endswith("stateful")


@schemathesis.hook
def before_call(context, case, kwargs):
    """The served population, eligible check-ins, the eval rule and real enrollments, where valid."""
    operation = case.operation
    body_ok = isinstance(case.body, dict) and not _negative(case, ParameterLocation.BODY)
    if ("population" in (case.path_parameters or {}) and not _negative(case, ParameterLocation.PATH)
            and _rng.random() < 0.8):
        case.path_parameters = {**case.path_parameters, "population": SETTINGS["population"]}
    if body_ok and "population" in case.body and _rng.random() < 0.8:
        case.body = {**case.body, "population": SETTINGS["population"]}
    post = operation.method.upper() == "POST"
    if post and operation.path == "/v1/checkin" and body_ok:
        # A check-in by a device the stateful phase just registered (its credential came over the
        # document's link, it is none of the pre-enrolled ones) goes as a phone's would, so the chain
        # can go on to an upload; the pre-enrolled devices' check-ins claim any conditions half the time.
        fresh = str((case.headers or {}).get("Authorization", "")) not in SETTINGS.get("devices", ())
        if fresh or _rng.random() < 0.5:
            case.body = {**case.body, "population": SETTINGS["population"], "conditions": dict(ELIGIBLE)}
    if post and operation.path == "/v1/sessions/{session_id}/eval" and body_ok:
        counts = sorted(case.body[k] for k in ("top1_hits", "top3_hits", "positions")
                        if isinstance(case.body.get(k), (int, float)))
        if len(counts) == 3:        # the document's rule top1_hits <= top3_hits <= positions
            case.body = {**case.body, **dict(zip(("top1_hits", "top3_hits", "positions"), counts))}
    if post and operation.path == "/v1/sessions/{session_id}/personal" and body_ok:
        case.body = {**case.body, "counts": consistent_personal_counts(case.body.get("counts"))} \
            if not case.body.get("masked") and isinstance(case.body.get("counts"), list) else case.body
    session = (case.path_parameters or {}).get("session_id")
    if session in SESSIONS and not _negative(case, ParameterLocation.HEADER):
        case.headers = {**(case.headers or {}), "Authorization": SESSIONS[session]}
    if post and operation.path == "/v1/devices" and body_ok and (_stateful(case) or _rng.random() < 0.5):
        case.body = valid_registration()
        case.media_type = "application/json"


# Session → the credential of the device it was assigned to, from the check-ins' answers: an operation
# on a session a link carried over goes with that device's credential, as the phone's own request would
# (the auth provider knows only the pre-enrolled devices).
SESSIONS: dict[str, str] = {}


@schemathesis.hook
def after_call(context, case, response):
    """Remember which device each assigned session belongs to."""
    if case.operation.method.upper() != "POST" or case.operation.path != "/v1/checkin" or response.status_code != 200:
        return
    try:
        assignment = json.loads(response.content or b"{}").get("assignment") or {}
    except (ValueError, AttributeError):
        return
    credential = str((case.headers or {}).get("Authorization", ""))
    if isinstance(assignment, dict) and isinstance(assignment.get("session_id"), str) and credential:
        SESSIONS[assignment["session_id"]] = credential
