"""Secure aggregation (SecAgg+): the server learns only the sum of a round's vectors.

* `masking`  — keys, encrypted shares, masks, and unmasking the survivors' sum;
* `shamir`   — t-of-n Shamir sharing over GF(2^521 − 1), with error correction;
* `messages` — the phases' messages as the device and the server parse them.
"""
