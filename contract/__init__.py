"""What the phone, the server and the simulation agree on, defined once. TensorFlow- and Flask-free.

Every module here is used by at least two of `device_runtime/` (the phone),
`server/` (the coordinator) and `models/` (training and simulation), so a
change to the protocol is a change in one place. Grouped by what they are about:

* `protocol/`  — the wire: every message and its limits (`wire`), the typed JSON
  behind them and the OpenAPI document (`schema`), error codes (`errors`),
  attestation statements (`attestation`), enrollment, the protocol version (`version`);
* `update/`    — a model update from phone to running sum: the round's spec
  (`spec`), the pipeline and its stages (clip, weight, rotate, quantize, pack),
  robust aggregation, the masked encoding;
* `secagg/`    — secure aggregation: masking and unmasking, Shamir sharing and its
  Reed–Solomon decoding, the byte-level primitives, its messages, plausible sums;
* `dp/`        — differential privacy: DP-FedAvg's settings, adaptive clip and noise,
  DP-FTRL's tree noise (`ftrl`);
* `tasks/`     — the task kinds (train, eval, personalize, discover) and what the
  personalize and discover kinds' two halves share;
* `model/`     — the model's data: weight layout and checkpoints, text and vocabulary,
  batching order, the metric, the canary, dropout masks;
* `artifacts/` — the manifest beside every exported file, and untrusted-artifact errors;
* `vectors/`   — known-answer vectors of the wire (PROTOCOL.md) and the command that checks
  an implementation against them (`python -m contract.vectors check`);
* `clock`      — one `Clock` protocol (real, scaled for a fleet, manual for tests);
* `cli`        — one command-line convention for every `python -m <package>`;
* `optimizers` — the server optimizers' names, one list for the server and the simulation.

The package and its groups import nothing at load time.
"""
