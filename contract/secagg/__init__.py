"""Secure aggregation (SecAgg+): the server learns only the sum of a round's vectors.

* `masking`      — keys, encrypted shares, masks, and unmasking the survivors' sum;
* `primitives`   — the byte-level constructions: HKDF, the share ciphertext, the mask PRG;
* `shamir`       — t-of-n Shamir sharing over GF(2^521 − 1), with error correction;
* `reed_solomon` — the error correction: decoding shares of which some are wrong;
* `plausible`    — whether an unmasked sum is one honest devices could have sent;
* `messages`     — the phases' messages as the device and the server parse them.
"""
