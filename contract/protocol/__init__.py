"""The device protocol's messages and rules, as both ends parse them (PROTOCOL.md is the prose).

* `wire`        — every request and answer of the device protocol: fields, limits, JSON;
* `enrollment`  — enrollment's requests and answers (nonce, registration), re-exported by `wire`;
* `schema`      — typed JSON values checked and documented (OpenAPI) from one definition;
* `errors`      — the closed set of error codes and their HTTP statuses;
* `attestation` — the statement an attestation service signs, and how the server checks it.
"""
