"""The shipped predictor: causal scoring, weights chosen on training users only, the device threshold of the n-gram."""
from __future__ import annotations

import numpy as np
import pytest

from contract.model.text import BOS_ID, EOS_ID, PAD_ID
from contract.tasks.personal import PersonalCache
from models.shipped import (PredictorSpec, Selection, ThresholdedNgram, TypingCache, evaluate, select_and_score,
                            stream_hits)

V = 40
FIRST = 10          # ids below FIRST: specials and common words of the fixed "model"


def model_probs(window: np.ndarray) -> np.ndarray:
    """A stand-in network: always the same distribution, favouring the common words 4..9 (never the user's own)."""
    p = np.full(V, 0.1 / V)
    p[4:FIRST] += np.linspace(0.2, 0.1, FIRST - 4)
    return np.tile(p / p.sum(), (len(window) - 1, 1))


def sentence(*words: int, length: int = 8) -> np.ndarray:
    row = [BOS_ID, *words, EOS_ID]
    return np.array(row + [PAD_ID] * (length + 1 - len(row)), np.int64)


def user(word: int, n: int = 6) -> np.ndarray:
    """A user who keeps typing one word of their own after a common one: a cache learns it."""
    return np.stack([sentence(5, word, 6, word) for _ in range(n)])


def test_the_typing_cache_counts_what_the_personal_cache_counts():
    windows = np.stack([sentence(5, 20, 6, 21), sentence(20, 20, 7)])
    cache = TypingCache()
    for w in windows:
        cache.add(w)
    reference = PersonalCache.from_windows(windows)
    assert cache.unigrams == reference.unigrams and cache.bigrams == reference.bigrams
    assert TypingCache().snapshot() is None


def test_a_position_is_scored_with_a_cache_of_earlier_text_only():
    spec = PredictorSpec(cache_weight=0.5, cache_smoothing=1.0)
    once = stream_hits(model_probs, user(30, 1), [PredictorSpec(), spec])
    assert once[0] == once[1]                          # the first sentence: nothing typed before it to learn from
    twice = stream_hits(model_probs, user(30, 2), [PredictorSpec(), spec])
    assert twice[1].top1 - once[1].top1 > twice[0].top1 - once[0].top1   # the second one gains from the first
    # what follows a window never changes how it is scored
    later = np.concatenate([user(30, 2), user(31, 3)])
    first_two = stream_hits(model_probs, later[:2], [spec])[0]
    assert first_two == twice[1]


def test_the_predictor_is_chosen_on_training_users_and_never_reads_the_heldout_ones():
    train = {f"t{i}": user(20 + i % 10) for i in range(12)}
    heldout = {f"h{i}": user(30 + i % 10) for i in range(4)}
    seen: list[np.ndarray] = []

    def spying(window):
        seen.append(window)
        return model_probs(window)

    sel = Selection(tuning_users=5, cache_weights=(0.0, 0.2, 0.5), smoothings=(1.0,), ngram_min_devices=0)
    out = select_and_score(spying, train, heldout, V, sel)
    chosen = len(seen) - sum(len(w) for w in heldout.values())      # the scoring pass reads each window once
    held_ids = {tuple(w) for ws in heldout.values() for w in ws}
    assert not any(tuple(w) in held_ids for w in seen[:chosen])          # choosing read training text only
    assert set(out["tuning_users"]) <= set(train) and len(out["tuning_users"]) == 5
    assert out["spec"].cache_weight > 0 and out["hits"].top1 > out["model_alone"].top1
    # whatever the held-out users typed, the choice is the same
    other = {u: np.stack([sentence(7, 8, 9) for _ in range(6)]) for u in heldout}
    assert select_and_score(model_probs, train, other, V, sel)["spec"] == out["spec"]
    # and it is measured on the training users: other training text, other figures
    plain = {u: np.stack([sentence(4, 4, 4) for _ in range(6)]) for u in train}
    assert select_and_score(model_probs, plain, heldout, V, sel)["selection"] != out["selection"]


def test_the_ngram_keeps_only_trigrams_enough_users_typed():
    shared = sentence(11, 12, 13)
    users = {"a": np.stack([shared, sentence(14, 15, 16)] * 5),     # 14 15 16: one user, many times
             "b": np.stack([shared]), "c": np.stack([shared, sentence(17, 18)])}
    lm = ThresholdedNgram(V, min_devices=3).fit(users)
    everyone = ThresholdedNgram(V, min_devices=1).fit(users)
    assert 0 < lm.kept_types < everyone.kept_types == everyone.types
    p_shared = lm.probs(shared)[2]                      # after (11, 12): 13 was typed by three users
    assert p_shared.argmax() == 13 and p_shared[13] > 0.5
    p_private = lm.probs(sentence(14, 15, 16))[2]       # after (14, 15): nothing of user a's own trigram
    assert p_private[16] == pytest.approx(p_private[17]) and p_private[16] < 0.1
    assert everyone.probs(sentence(14, 15, 16))[2].argmax() == 16
    with pytest.raises(ValueError):
        ThresholdedNgram(V, 0)


def test_evaluate_sums_users():
    users = {"a": user(20), "b": user(21, 3)}
    total = evaluate(model_probs, users, [PredictorSpec(0.3)])[0]
    parts = [stream_hits(model_probs, w, [PredictorSpec(0.3)])[0] for w in users.values()]
    assert total == parts[0] + parts[1] and total.positions == sum(int((w[:, 1:] != PAD_ID).sum())
                                                                 for w in users.values())
