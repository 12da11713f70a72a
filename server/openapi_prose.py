"""The OpenAPI document's prose: what JSON Schema cannot say (server.openapi assembles the document).

The normative description of the wire, byte for byte, is PROTOCOL.md (with
known-answer vectors under contract/vectors); these texts summarize it per
operation and point there, so the two cannot say different things about an
encoding's arithmetic. What they do state — limits, rules across fields,
which requests need the protocol version — is checked by the server tests
and by `make fuzz` (schemathesis with every check against this document).
"""
from __future__ import annotations

from contract.protocol import version
from contract.update.pipeline import FORMAT
from server.worker import BODY_IDLE_S, HEAD_TIMEOUT_S

SPEC = "PROTOCOL.md (in the Nightjar repository)"


def info(max_json_bytes: int, max_upload_bytes: int) -> str:
    """The document's description: versions, transport rules and limits, how errors look."""
    lo, hi = version.SUPPORTED
    return f"""Nightjar's device protocol (enrollment, check-in, artifacts, reports, secure aggregation),
app models and round analytics. The normative description, byte for byte, is {SPEC}, with known-answer
vectors under contract/vectors; this document lists every operation, its limits and every status it
answers.

Protocol versions. Every request of the device API (enrollment, check-in, a session's reports and its
secure-aggregation phases) names the version it speaks in the `{version.HEADER}` header; this server
serves versions {lo} to {hi}, each written as a decimal integer without a leading zero. A device API
request without the header, or naming another version, is answered 400 unsupported_protocol with
`"supported": {{"min": {lo}, "max": {hi}}}` before anything else is read (credentials, body, rate
limits). The public reads apps and CDNs make (an artifact, the app-model description) may leave the
header out — their bytes are pinned by their sha256 and described by their manifest's own
schema_version — but naming an unsupported version there is 400 too. Operator endpoints do not read it.
A new protocol version is needed for any change an existing phone could not follow: a message field
added, removed or retyped; a new stage, or a change to the arithmetic of an existing one (anything a
known-answer vector would change for); a cryptographic parameter (a label, a key size, a field, a PRG);
a new mandatory phase. Not a new version: an optional field added to an answer, which a phone ignores; a
new error code within an existing status; a new operator endpoint. Exported files carry their own
version (the manifest's schema_version): a phone refuses a plan or an app model whose manifest version
it does not know, and keeps the model it has.

Limits. JSON bodies need Content-Type application/json and at most {max_json_bytes} bytes; every body
these schemas allow fits when written as JSON usually is (the array lengths of secure aggregation's
messages are bounded so), and the server refuses at load a configuration under which an honest device's
message would not. An update body is application/octet-stream (nothing else: any other type, an image
too, is 415) of at most {max_upload_bytes} bytes. A body over its limit, by Content-Length or (chunked)
by the chunks so far, is refused 413 with Connection: close before the rest is read. A request head must
arrive within {HEAD_TIMEOUT_S:g} s of its first byte and a body must not pause longer than
{BODY_IDLE_S:g} s (408, Connection: close); a request line or headers over the HTTP layer's limits are
414 and 431, a malformed request 400. OPTIONS is not served: 405 with Allow naming the path's methods.

Text. No text the protocol carries holds U+0000: a NUL in the path, the query string, the Authorization
or Cookie header or a JSON body (raw, or escaped as \\u0000) is 400 invalid_field; every string schema says so by
its pattern. Objects are closed (an unknown key is 400 invalid_field). Integers accept whole-number floats
(13468.0); numbers are finite. Rules across fields that JSON Schema cannot state are in the schemas'
descriptions (EvalReport, PersonalEvalReport, SecAggShares, SecAggReveal) and refused with 400.

Errors. Every error is JSON {{error, message}} (unsupported_protocol adds `supported`); each
operation lists its statuses and their codes, those of the HTTP layer (400, 405, 408, 413, 414, 431)
included. URLs in responses are relative to the server. No response holds NaN or Infinity."""


UPLOAD = f"""The session's model update: the trained weights minus the downloaded checkpoint's, as one flat
vector in the order of the assignment's `layout` (each tensor flattened row-major), encoded as the
assignment's `update` spec says: {SPEC}, section 7 (clip, weight, rotation, quantization with its seeded
rounding stream, packing), with vectors in contract/vectors/update.json. Body: a safetensors file with metadata {{"format": "{FORMAT}", "bits":
"<bits>", "spec": "<update.fingerprint>"}} and, for bits = 32, the tensor "values" F32 [size]; otherwise
"codes" U8 (the codes bit-packed) and "scales" F32 [padded size / block_size]; under DP also "unclipped"
U8 [1]. Content-Type application/octet-stream only (415 otherwise). `num_examples` is the weight, in
[1, max_weight]; under secure aggregation (section 10.6) the body holds the masked codes and the weight
instead, the query has only model_version, and num_examples there is 400. The server decodes the body
and refuses with a 422 naming what is wrong (malformed_update, wrong_spec, wrong_width, wrong_length,
value_out_of_range, bad_scale, non_finite, weight_out_of_range, norm_exceeds_clip): no JSON Schema can
describe a safetensors file's contents, so a body of the right type may still be 422. Idempotent per
session: a repeated upload gets the first answer and is counted once. "accepted": the update is part of
the round. "aborted": the round closed or has its reports; the device drops the work. A 4xx error
changes nothing; the device may upload a corrected update."""

ENROLLMENT = f"""A device enrolls once per population ({SPEC}, section 4). It asks for a nonce, has its
platform's attestation service (Play Integrity, App Attest; a development issuer stands in) sign a
statement naming the population and the nonce (canonical JSON, base64url, with an Ed25519 signature of
those bytes), and sends it with the app's credential. The nonce works once and expires; the statement must
come from the configured issuer and say MEETS_DEVICE_INTEGRITY. Both calls are rate-limited per address
(429 with Retry-After)."""

SECAGG = f"""Secure aggregation (SecAgg+, Bell et al. 2020; {SPEC}, section 10, every byte of it, with
vectors in contract/vectors/secagg_*.json) when the assignment's update has `secure_aggregation`: the
server learns only the sum of the round's updates. The device polls GET .../secagg, which names the
session's phase and, when there is something to do, what it needs: keys (POST .../secagg/keys: two X25519
public keys and a SHA-256 commitment to a self-mask seed) → shares (the device's number, t and its
neighbours' keys; POST .../secagg/shares: one AES-256-GCM ciphertext per neighbour holding the Shamir
shares of the seed and of the masking private key) → masking (the inbox of ciphertexts sent to it; the
device masks its update and uploads it to .../update) → unmasking (which neighbours survived and which
dropped; POST .../secagg/reveal: their self-seed or masking-key shares, never both for one) → done.
`wait_s`: when to ask again. A message for another phase is 409 wrong_phase; a session that left the
masking set gets 409 not_in_cohort; keys, shares or reveals that cannot be used are 422 invalid_keys."""

SHARES = """Exactly one entry per neighbour the status named (else 422 invalid_keys). A round has at most
as many neighbours as the largest body fits under the JSON body cap (the server refuses at load a
configuration that would ask for more), and the array's maxItems says how many that is."""

REVEAL = """The self-seed share of each surviving neighbour and the masking-key share of each dropped one
the status asked for, one kind per owner (else 422 invalid_keys); at most one entry per neighbour, so the
body fits under the JSON body cap (maxItems)."""

CHECKPOINT = f"""A checkpoint (GET /v1/artifacts/<assignment.checkpoint.sha256>) is a safetensors file of
named float32 tensors whose metadata "layout" is the JSON of the flat layout ([{{name, shape, offset}}]);
"model_config", "round", "version" and "parent" are JSON strings too ({SPEC}, section 6). A plan and an
app model are .tflite files described by a Manifest. Who may fetch what: a published app model's files
anyone; the rest a device assigned to a round that uses them, or the operator (401/404 otherwise)."""

TRAIN = """How the version was made. A training round's: reports, zeroed, examples (Σ weights),
mean_delta_norm, update_bits, secure_aggregation, the mean of each training metric the devices reported,
and what an independent verifier needs to recompute the version from the round's mean: the server
optimizer (`optimizer`), its learning rate `server_lr`, `server_momentum` (sgdm's; null for the others)
and, for adam and yogi, server_beta_1, server_beta_2, server_epsilon (and yogi's
server_initial_preconditioner); under DP the round's clip (dp_clip), mechanism (dp_mechanism), the
standard deviation of the noise added to the sum of clipped updates (dp_stddev, in model units; per
tree node under ftrl), the mean's fixed denominator (dp_denominator) and the noise on the count of
unclipped updates (dp_count_stddev). The step itself: PROTOCOL.md, section 8. The initial checkpoint's
and a discovery version's say `source`."""
