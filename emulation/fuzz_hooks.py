"""schemathesis hooks for fuzzing the Nightjar server (loaded by schemathesis, in its own venv).

schemathesis generates requests from the server's own /openapi.json; these
hooks give it what a real client would have, so its requests reach past
authentication instead of all stopping at a 401:

* operator operations get the operator token (most of the time: every tenth
  goes without, so refusals are exercised too);
* device operations that carry no Authorization get a pre-enrolled device's;
* most requests name the served population (a random name only finds
  404s), and half of the check-ins claim conditions a round accepts;
* half of the registrations are replaced by a valid enrollment — a fresh
  nonce from the server, a statement signed by the development issuer, the
  app credential — so the stateful phase can follow the document's links
  from a real registration to a check-in and an upload.

The hooks read their settings from the NIGHTJAR_FUZZ environment variable
(JSON: base URL, population, operator token, enrollment material, device
credentials). Of Nightjar they import only `contract.protocol.attestation`, which
needs nothing but `cryptography`: schemathesis runs in a venv of its own
(TFF pins typing-extensions 4.5, schemathesis needs a newer one).
"""
from __future__ import annotations

import json
import os
import random
import re
import time
import urllib.request

import schemathesis

# TF- and numpy-free: the fuzz venv imports it as it is (PYTHONPATH is the repository).
from contract.protocol.attestation import GENUINE, AttestationStatement, b64decode, sign
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

SETTINGS = json.loads(os.environ.get("NIGHTJAR_FUZZ", "{}"))
_rng = random.Random(SETTINGS.get("seed", 0))


def valid_registration() -> dict:
    """What an honest phone sends: a fresh nonce, signed by the development issuer."""
    population = SETTINGS["population"]
    request = urllib.request.Request(SETTINGS["url"] + "/v1/enrollment/nonces", method="POST",
                                     data=json.dumps({"population": population}).encode(),
                                     headers={"Content-Type": "application/json"})
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


@schemathesis.hook
def before_call(context, case, kwargs):
    """Credentials where an operation declares them, and real enrollments for half the registrations."""
    operation = case.operation
    security = [name for rule in operation.definition.raw.get("security", []) for name in rule]
    if "operator" in security and _rng.random() < 0.9:
        case.headers["Authorization"] = f"Bearer {SETTINGS['operator_token']}"
    elif ("device" in security and SETTINGS.get("devices") and _rng.random() < 0.8
          and not DEVICE_CREDENTIAL.fullmatch(str(case.headers.get("Authorization", "")))):
        # A generated header, not one a link carried over from a registration: a real device's instead.
        case.headers["Authorization"] = _rng.choice(SETTINGS["devices"])
    if "population" in case.path_parameters and _rng.random() < 0.8:
        case.path_parameters = {**case.path_parameters, "population": SETTINGS["population"]}
    if isinstance(case.body, dict) and "population" in case.body and _rng.random() < 0.8:
        case.body = {**case.body, "population": SETTINGS["population"]}
    post = operation.method.upper() == "POST"
    if post and operation.path == "/v1/checkin" and isinstance(case.body, dict):
        # A check-in by a device the stateful phase just registered (its credential came over the
        # document's link, it is none of the pre-enrolled ones) mostly goes as a phone's would, so
        # the chain can go on to an upload.
        fresh = str(case.headers.get("Authorization", "")) not in SETTINGS.get("devices", ())
        if _rng.random() < (0.9 if fresh else 0.5):
            case.body = {**case.body, "population": SETTINGS["population"], "conditions": dict(ELIGIBLE)}
    if post and operation.path == "/v1/devices" and _rng.random() < 0.5:
        case.body = valid_registration()
        case.media_type = "application/json"
