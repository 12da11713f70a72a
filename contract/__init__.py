"""What the phone, the server and the simulation agree on, defined once. TensorFlow- and Flask-free.

Every module here is imported by at least two of `device_runtime/` (the
phone), `server/` (the coordinator) and `models/` (training and simulation),
so a change to the protocol is a change in one place:

* `weights`  — the flat weight layout and checkpoints (safetensors);
* `text`     — tokenization and the vocabulary;
* `batching` — the order a client visits its examples in a round;
* `metrics`  — top-1 / top-3, the metric every number is reported in;
* `manifest`, `artifacts` — the manifest beside every exported model, and
  the errors of an artifact that cannot be trusted.

The package imports nothing at load time.
"""
