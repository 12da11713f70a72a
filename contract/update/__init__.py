"""A model update from the phone to the server's running sum: the spec, the pipeline and its stages.

* `spec`     — how a population's devices encode updates, frozen into each round (`RoundSpec`);
* `pipeline` — the stages composed: the phone's `encode`, the server's `accept` and `decode`;
* `stages`   — clip, weight, rotate, quantize, pack: each stage with both halves;
* `masked`   — the stages of a round under secure aggregation: one grid, integers mod 2^m, masked;
* `packing`  — b-bit codes in bytes;
* `hadamard` — the randomized block Hadamard rotation;
* `robust`   — zeroing, trimmed mean and median.
"""
