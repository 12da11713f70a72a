"""New words take free slots, their rows start as <oov>'s, nothing else moves (contract.model.weights)."""
from __future__ import annotations

import numpy as np

from contract.model.text import OOV_ID
from contract.model.weights import WeightLayout, copy_token_rows

V = 10
LAYOUT = WeightLayout([("embedding", (V, 3)), ("kernel", (3, 4)), ("projection", (4, V)), ("bias", (V,))])


def test_new_words_rows_start_as_the_oov_rows_and_nothing_else_changes():
    flat = np.random.default_rng(0).normal(size=LAYOUT.size).astype(np.float32)
    out = copy_token_rows(flat, LAYOUT, V, OOV_ID, [8, 9])
    before, after = LAYOUT.unflatten(flat), LAYOUT.unflatten(out)
    for slot in (8, 9):
        np.testing.assert_array_equal(after["embedding"][slot], before["embedding"][OOV_ID])
        np.testing.assert_array_equal(after["projection"][:, slot], before["projection"][:, OOV_ID])
        assert after["bias"][slot] == before["bias"][OOV_ID]
    np.testing.assert_array_equal(after["kernel"], before["kernel"])
    np.testing.assert_array_equal(after["embedding"][:8], before["embedding"][:8])
    np.testing.assert_array_equal(after["projection"][:, :8], before["projection"][:, :8])
    np.testing.assert_array_equal(flat, LAYOUT.flatten(list(before.values())))   # the input is untouched
