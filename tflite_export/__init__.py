"""Nightjar's models for phones: an on-device training plan and a quantized suggestion model.

A phone runs LiteRT and nothing else. This package turns a checkpoint
(`contract.model.weights`) into

* a **training plan** (`plan.tflite`): signatures `train(x, y, lr) -> loss,
  tokens` (one plain SGD step on a fixed-size, pad-masked batch),
  `infer(x) -> logits`, `get_weights() -> flat`, `set_weights(flat)`, built
  from TFLite built-in ops only (a Flex op fails the export);
* an **app model** (`app.tflite`): `suggest(tokens, length) -> ids, probs`
  and `distribution(tokens, length) -> probs`, batch 1, within 1.4 MB (8-
  and 4-bit weights, `compact`), the top-k next words, never pad/bos/oov;

each with a JSON **manifest** (schema version, model version and config,
vocabulary hash, flat weight layout, signatures, sha256 of every file) and the
`vocab.json` it belongs to.

Public surface (attributes load lazily, so importing the package, its
`reader`, `modelinfo` or `errors` never imports TensorFlow):

* export side (TensorFlow): `export_plan`, `export_app_model`,
  `read_checkpoint`; CLI `python -m tflite_export plan|app|inspect|verify`;
* device side (LiteRT only): `load_plan` → `TrainingPlan`, `load_app_model` →
  `AppModel`;
* export errors: `ExportError` (`UnsupportedOpError`).

The manifest format and the errors of an artifact that cannot be trusted
(`ArtifactError` and its kinds) are part of the contract the phone and the
server share: `contract.artifacts.manifest`, `contract.artifacts.errors`.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "export_plan": "export", "export_app_model": "export", "read_checkpoint": "export",
    "load_plan": "reader", "load_app_model": "reader", "TrainingPlan": "reader",
    "AppModel": "reader", "TrainStep": "reader",
    "ExportError": "errors", "UnsupportedOpError": "errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tflite_export' has no attribute {name!r}")
    return getattr(importlib.import_module(f"tflite_export.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
