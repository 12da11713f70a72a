"""schemathesis hooks for fuzzing the Nightjar server (loaded by schemathesis, in its own venv).

schemathesis generates requests from the server's own /openapi.json; these
hooks give it what a real client would have, so its requests reach past
authentication instead of all stopping at a 401:

* operator operations get the operator token (most of the time: every tenth
  goes without, so refusals are exercised too);
* device operations that carry no Authorization get a pre-enrolled device's;
* half of the registrations are replaced by a valid enrollment — a fresh
  nonce from the server, a statement signed by the development issuer, the
  app credential — so the stateful phase can follow the document's links
  from a real registration to a check-in and an upload.

The hooks read their settings from the NIGHTJAR_FUZZ environment variable
(JSON: base URL, population, operator token, enrollment material, device
credentials). They import nothing of Nightjar: schemathesis runs in a venv
of its own (TFF pins typing-extensions 4.5, schemathesis needs a newer one).
"""
from __future__ import annotations

import base64
import json
import os
import random
import time
import urllib.request

import schemathesis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

SETTINGS = json.loads(os.environ.get("NIGHTJAR_FUZZ", "{}"))
_rng = random.Random(SETTINGS.get("seed", 0))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def valid_registration() -> dict:
    """What an honest phone sends: a fresh nonce, signed by the issuer (contract/attestation.py's format)."""
    population = SETTINGS["population"]
    request = urllib.request.Request(SETTINGS["url"] + "/v1/enrollment/nonces", method="POST",
                                     data=json.dumps({"population": population}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        nonce = json.loads(answer.read())["nonce"]
    enrollment = SETTINGS["enrollment"]
    statement = json.dumps({"app_id": "nightjar.fuzz", "issued_at": time.time(), "nonce": nonce,
                            "population": population, "verdict": "MEETS_DEVICE_INTEGRITY", "version": 1},
                           sort_keys=True, separators=(",", ":")).encode()
    key = Ed25519PrivateKey.from_private_bytes(_unb64(enrollment["issuer_private_key"]))
    return {"population": population, "app_credential": enrollment["app_credential"],
            "attestation": {"statement": _b64(statement), "signature": _b64(key.sign(statement))}}


@schemathesis.hook
def before_call(context, case, kwargs):
    operation = case.operation
    security = [name for rule in operation.definition.raw.get("security", []) for name in rule]
    headers = kwargs.setdefault("headers", {}) or {}
    kwargs["headers"] = headers
    if "operator" in security and _rng.random() < 0.9:
        headers["Authorization"] = f"Bearer {SETTINGS['operator_token']}"
    elif "device" in security and "Authorization" not in headers and SETTINGS.get("devices"):
        headers["Authorization"] = _rng.choice(SETTINGS["devices"])
    if operation.method.upper() == "POST" and operation.path == "/v1/devices" and _rng.random() < 0.5:
        kwargs["json"] = valid_registration()
        kwargs.pop("data", None)
        headers["Content-Type"] = "application/json"
