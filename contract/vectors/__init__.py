"""Known-answer vectors of the device protocol: fixed inputs, the exact outputs, for any implementation.

A phone written in Kotlin or Swift (or a second server) checks itself
against these files: PROTOCOL.md says what each construction is, the
vectors say what it must compute, byte for byte. One JSON file per topic,
here beside this module (PROTOCOL.md, "Known-answer vectors", lists them):

    {"format": "nightjar-vectors-1", "protocol": 1, "name": ..., "title": ...,
     "cases": [{"name": ..., "function": ..., "input": {...}, "output": {...},
                "tolerance": {"<output field>": <relative tolerance>}  (rare)}],
     ...}                      (a round file also holds its spec, devices and messages)

`function` names an entry of an implementation's function table: a module
whose `FUNCTIONS` maps the name to a callable from the case's input object
to its output object (contract.vectors.reference: the Python phone and
server). Bytes are lowercase hex in fields named `*_hex`, base64url where
the wire uses it; a `*_safetensors_hex` output compares by content
(contract.vectors.codec). Extra output fields are ignored.

    python -m contract.vectors check [--impl MODULE] [--file NAME]   # exit 2 on any mismatch
    python -m contract.vectors generate                              # rewrite the files (a wire change)

* `reference`, `reference_secagg` — the Python implementation's table;
* `cases_update`, `cases_pipeline`, `cases_secagg` — every fixed input;
* `generate` — writes the files; `check` — runs a table over them;
* `codec` — values, safetensors bodies, comparison.

The package imports nothing at load time.
"""
from pathlib import Path

FORMAT = "nightjar-vectors-1"
DIRECTORY = Path(__file__).resolve().parent
