"""The model's data as everyone reads it: weights, text, batching order, the metric, the canary.

* `weights`  — the flat weight layout and safetensors checkpoints;
* `text`     — tokenization and the vocabulary (with free slots for discovered words);
* `batching` — the order a client visits its examples in a round, from the session's seed;
* `metrics`  — top-1 / top-3, the metric every Nightjar number is reported in;
* `canary`   — fixed probe contexts whose first suggestion is recorded for every version.
"""
