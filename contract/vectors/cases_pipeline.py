"""The inputs of the whole-update, plausibility and report vectors (contract.vectors.generate).

Whole encodings for several specs (the phone's side), what the server
decodes from them and what it refuses (the server's side), the mean of a
sum, the bounds of an unmasked sum and its refusals, and the reports'
rules.
"""
from __future__ import annotations

import json

import numpy as np

from contract.vectors.cases_update import PLAIN_8, SECURE_8, SIZE, bound, case, robust
from contract.vectors.codec import read_safetensors, write_safetensors
from contract.vectors.reference import FUNCTIONS


def _delta(seed: int, scale: float) -> list[float]:
    return [float(v) for v in np.asarray(np.random.default_rng(seed).normal(0, scale, SIZE), np.float32)]


UNIFORM_8 = {**PLAIN_8, "weighting": "uniform"}
CENTRAL_DP = ["central", 0.05, 20, 1.0]          # mechanism, noise stddev on the sum, denominator, σ_b
ENCODINGS = (   # name, update settings, delta seed, its scale, num_examples, session seed, DP binding
    ("8 bits, rotation, weight 40 of 100", PLAIN_8, 11, 0.05, 40, 1001, None),
    ("4 bits, rotation, clipped, shrunk to its bound", {**PLAIN_8, "bits": 4}, 12, 0.3, 100, 1002, None),
    ("2 bits, no rotation", {**PLAIN_8, "bits": 2, "rotation": False}, 13, 0.05, 70, 1003, None),
    ("16 bits, rotation", {**PLAIN_8, "bits": 16}, 14, 0.05, 25, 1004, None),
    ("32 bits: float32 values", {**PLAIN_8, "bits": 32, "rotation": False}, 15, 0.05, 60, 1005, None),
    ("8 bits, uniform weighting", UNIFORM_8, 16, 0.05, 9, 1006, None),
    ("8 bits, central DP: the unclipped bit", UNIFORM_8, 17, 0.2, 9, 1007, CENTRAL_DP),
)


def _encode(spec: dict, seed: int, scale: float, examples: int, session: int, name: str) -> dict:
    inputs = {"spec": spec, "delta": _delta(seed, scale), "num_examples": examples, "seed": session}
    made = case(f"encode: {name}", "encode_update", inputs)
    return robust(made, lambda f: {**inputs, "delta": [v * f for v in inputs["delta"]]})


def _tamper(body_hex: str, metadata: dict | None = None, tensor: str | None = None, data: bytes | None = None,
            dtype: str | None = None) -> str:
    """A body with one thing changed (what a refusal vector sends)."""
    parsed = read_safetensors(bytes.fromhex(body_hex))
    parsed["metadata"].update(metadata or {})
    if tensor is not None:
        t = parsed["tensors"][tensor]
        parsed["tensors"][tensor] = {**t, "data_hex": data.hex() if data is not None else t["data_hex"],
                                     "dtype": dtype or t["dtype"],
                                     "shape": [len(data) // (4 if (dtype or t["dtype"]) == "F32" else 1)]
                                     if data is not None else t["shape"]}
    return write_safetensors(parsed).hex()


def update_file() -> dict:
    cases, accepted = [], []
    for name, settings, seed, scale, examples, session, dp in ENCODINGS:
        spec = bound(settings, dp=dp)
        made = _encode(spec, seed, scale, examples, session, name)
        cases.append(made)
        body, weight = made["output"]["body_safetensors_hex"], made["output"]["weight"]
        cases.append(case(f"accept: {name}", "accept_update",
                          {"spec": spec, "body_safetensors_hex": body, "num_examples": weight}))
        accepted.append((spec, body, weight, cases[-1]["output"]))
    cases += _refusals(*accepted[0][:3], accepted[4][:3])
    spec, body, w, first = accepted[0]
    second = _encode(spec, 21, 0.05, 100, 1011, "8 bits, a second update of the round")
    units2 = FUNCTIONS["accept_update"]({"spec": spec, "body_safetensors_hex": second["output"]["body_safetensors_hex"],
                                         "num_examples": 100})
    cases.append(second)
    cases.append(case("decode the sum of two updates: the round's mean", "decode_sum", {
        "spec": spec, "units_sum": [a + b for a, b in zip(first["units"], units2["units"])],
        "weight_sum": w + 100}))
    secure = bound({**UNIFORM_8, "secure_aggregation": True}, cohort_max=3, dp=CENTRAL_DP)
    cases.append(case("the plaintext ring under secure aggregation and central DP: codes + L, weight, bit",
                      "ring_plaintext", {"spec": secure, "delta": _delta(18, 0.2), "num_examples": 9, "seed": 1008}))
    return {"title": "Whole updates: the phone's encoding, the server's decoding, its refusals, the round's mean",
            "cases": cases}


def _refusals(spec: dict, body: str, weight: int, float32: tuple) -> list[dict]:
    codes = bytes.fromhex(read_safetensors(bytes.fromhex(body))["tensors"]["codes"]["data_hex"])
    scales = bytes.fromhex(read_safetensors(bytes.fromhex(body))["tensors"]["scales"]["data_hex"])
    half = np.frombuffer(scales, "<f4").copy()
    half[0] *= 1.5
    tiny = np.frombuffer(scales, "<f4").copy()
    tiny[1] = np.float32(2.0 ** -39)
    nan = np.frombuffer(bytes.fromhex(read_safetensors(bytes.fromhex(float32[1]))["tensors"]["values"]["data_hex"]),
                        "<f4").copy()
    nan[3] = np.nan
    big = nan.copy()
    big[3], big[4] = 2.6, 0.0
    bad = [("another round's spec", body, weight, {"metadata": {"spec": "0" * 64}}),
           ("the wrong bit width", body, weight, {"metadata": {"bits": "4"}}),
           ("not this format", body, weight, {"metadata": {"format": "nightjar-update-0"}}),
           ("a code off the grid (2^b - 1)", body, weight, {"tensor": "codes", "data": b"\xff" + codes[1:]}),
           ("a code array one byte short", body, weight, {"tensor": "codes", "data": codes[:-1]}),
           ("a scale that is not a power of two", body, weight, {"tensor": "scales", "data": half.tobytes()}),
           ("a scale below 2^e_unit", body, weight, {"tensor": "scales", "data": tiny.tobytes()}),
           ("a float32 NaN", float32[1], float32[2], {"tensor": "values", "data": nan.tobytes()}),
           ("a float32 value above clip_norm", float32[1], float32[2], {"tensor": "values", "data": big.tobytes()})]
    out = [case(f"refuse: {name}", "accept_update", {"spec": float32[0] if "float32" in name else spec,
                                                     "body_safetensors_hex": _tamper(b, **change), "num_examples": w})
           for name, b, w, change in bad]
    out += [case("refuse: a weight above max_weight", "accept_update",
                 {"spec": spec, "body_safetensors_hex": body, "num_examples": 101}),
            case("refuse: the norm its weight does not allow (claims 1 example)", "accept_update",
                 {"spec": spec, "body_safetensors_hex": body, "num_examples": 1}),
            case("refuse: not a safetensors file", "accept_update",
                 {"spec": spec, "body_safetensors_hex": json.dumps({"codes": []}).encode().hex(), "num_examples": 1})]
    return out


def plausible_file() -> dict:
    spec = bound(SECURE_8, cohort_max=3)
    cases = [case("bounds of an unmasked sum", "plausible_bounds",
                  {"spec": spec, "reports": n, "weight_sums": [n, 50 * n, 100 * n]}) for n in (1, 2, 3)]
    plain = [FUNCTIONS["ring_plaintext"]({"spec": spec, "delta": _delta(40 + k, 0.05), "num_examples": 30 + k,
                                          "seed": 2000 + k})["ring"] for k in range(2)]
    modulus = 2 ** FUNCTIONS["round_spec"]({"update": SECURE_8, "bind": {
        "size": SIZE, "layout_sha256": spec["layout_sha256"], "round_key": spec["round_key"],
        "rotation_seed": spec["rotation_seed"], "cohort_max": 3}})["modulus_bits"]
    total = [(a + b) % (modulus if i < len(plain[0]) - 1 else 2**32) for i, (a, b) in enumerate(zip(*plain))]
    cases.append(case("decode an honest sum of 2", "decode_masked_sum", {"spec": spec, "ring_sum": total,
                                                                         "survivors": 2}))
    zero = total[:-1] + [0]
    L, count = 127, len(total) - 1          # the ring holds codes + L; a sum of 2 holds Σ codes + 2L
    off = [(3 * L + 2 * L) % modulus] + total[1:]
    loud = [((L if i % 2 == 0 else -L) + 2 * L) % modulus for i in range(count)] + total[-1:]
    for name, ring in (("Σw ≡ 0 (mod 2^32)", zero), ("a coordinate no 2 reports reach", off),
                       ("a norm no 2 clipped reports reach", loud)):
        cases.append(case(f"refuse: {name}", "decode_masked_sum", {"spec": spec, "ring_sum": ring, "survivors": 2}))
    return {"title": "Plausible sums under secure aggregation: the bounds, an honest sum's mean, implausible sums",
            "cases": cases}


def reports_file() -> dict:
    cases = [case("personal report", "personal_report", {"global": {"top1": 31, "top3": 52, "positions": 90},
                                                         "personal": {"top1": 37, "top3": 55, "positions": 90},
                                                         "fell_back": False}),
             case("personal report, fell back", "personal_report", {"global": {"top1": 0, "top3": 0, "positions": 0},
                                                                    "personal": {"top1": 0, "top3": 0, "positions": 0},
                                                                    "fell_back": True})]
    good = cases[0]["output"]["counts"]
    cases += [case("personal counts: one device", "personal_sum_valid", {"counts": good, "devices": 1}),
              case("personal counts: 48 of them", "personal_sum_valid", {"counts": good[:48], "devices": 1}),
              case("personal counts: top1 above top3", "personal_sum_valid",
                   {"counts": [60] + good[1:], "devices": 1}),
              case("personal counts: the sum of two", "personal_sum_valid",
                   {"counts": [a + b for a, b in zip(good, cases[1]["output"]["counts"])], "devices": 2})]
    for top1, top3, positions in ((3, 5, 9), (5, 5, 5), (6, 5, 9), (3, 10, 9)):
        cases.append(case(f"eval counts {top1}/{top3}/{positions}", "eval_report_valid",
                          {"top1_hits": top1, "top3_hits": top3, "positions": positions}))
    spec = {"min_devices": 2, "max_word_length": 12, "votes_per_device": 2}
    for votes in (["th", "sh"], ["th", "th"], ["t"], ["xa"], ["th", "sh", "ta"], ["the$"], ["t$"]):
        cases.append(case(f"discovery votes {votes}", "discovery_ballot_valid",
                          {"spec": spec, "level": 2, "prefixes": ["t", "s"], "votes": votes}))
    return {"title": "Reports: personal counts (49), evaluation counts, discovery votes", "cases": cases}
