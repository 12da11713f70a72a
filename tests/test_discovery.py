"""Federated discovery of new words (contract.tasks.discovery, models.discovery): the threshold, what a
device may send, and a run over synthetic devices with planted words."""
from __future__ import annotations

import collections
import random

import pytest

from contract.tasks.discovery import END, DiscoverySpec, Trie, candidates, privacy, vote
from contract.model.text import Vocabulary
from models.discovery import DiscoveryConfig, run_discovery, score, true_top

VOCAB = Vocabulary.build(["the king is dead long live the king"], size=20, reserved=5)


def fleet(planted: dict[str, int], background: int = 60, seed: int = 0) -> dict[str, collections.Counter]:
    """`background` devices with random words of their own; planted[word] of them also type `word`."""
    rng = random.Random(seed)
    devices = {f"d{i}": collections.Counter({"".join(rng.choices("abcdefghij", k=6)): 3,
                                               "the": 5}) for i in range(background)}
    ids = sorted(devices)
    for word, count in planted.items():
        for d in rng.sample(ids, count):
            devices[d][word] += rng.randint(1, 4)
    return {d: candidates(list(c.elements()), VOCAB) for d, c in devices.items()}


@pytest.mark.parametrize("votes", [1, 3, 50])
def test_a_word_of_fewer_than_min_devices_is_never_revealed_and_one_of_min_devices_is_found(votes):
    theta = 8
    words = fleet({"falstaff": theta - 1, "hotspur": theta, "prithee": 3 * theta})
    spec = DiscoverySpec(min_devices=theta, votes_per_device=votes)
    found = set()
    for seed in range(5):
        found |= set(run_discovery(words, DiscoveryConfig(spec, 0, 3, seed), progress=False)["words"])
    assert "falstaff" not in found                       # 7 devices: never, whatever the draws
    assert {"hotspur", "prithee"} <= found or votes == 1 and "prithee" in found
    assert all(sum(1 for c in words.values() if w in c) >= theta for w in found)


def test_with_enough_votes_every_word_of_min_devices_is_found_within_one_pass():
    words = fleet({"falstaff": 7, "hotspur": 8, "prithee": 24, "wherefore": 9})
    run = run_discovery(words, DiscoveryConfig(DiscoverySpec(min_devices=8, votes_per_device=50), 0, 1, 0),
                        progress=False)
    assert set(run["words"]) == {"hotspur", "prithee", "wherefore"} and run["rounds"] <= 13
    assert run["words"][0] == "prithee" and run["votes"]["prithee"] == 24
    s = score(run["words"], true_top(words, 3, 12), words, 8)
    assert s == {"found": 3, "precision": 1.0, "recall": 1.0, "revealed_below_threshold": 0}


def test_a_device_votes_only_for_prefixes_extending_what_the_server_published():
    mine = collections.Counter({"hotspur": 5, "hamlet": 1, "zounds": 2})
    spec = DiscoverySpec(min_devices=2, votes_per_device=5)
    rng = random.Random(1)
    assert sorted(vote(mine, [""], 1, spec, rng)) == ["h", "z"]
    assert vote(mine, ["ho"], 3, spec, rng) == ["hot"]                 # nothing of "hamlet" or "zounds"
    assert vote(mine, ["hotspur"], 8, spec, rng) == ["hotspur" + END]
    assert vote(mine, ["xy"], 3, spec, rng) == []
    assert len(vote(mine, [""], 1, DiscoverySpec(min_devices=2, votes_per_device=1), rng)) == 1
    assert candidates(["the", "king", "zounds", "don't", "x-ray"], VOCAB) == collections.Counter(
        {"zounds": 1, "don't": 1})                                     # in-vocabulary words never vote


def test_the_server_refuses_ballots_off_the_trie():
    trie = Trie(DiscoverySpec(min_devices=2, votes_per_device=2))
    trie.tally([["h"], ["h", "z"], ["z"], ["q"]])
    assert trie.frontier == ["h", "z"] and trie.level == 2
    for bad in (["qa"], ["hot"], ["h"], ["ha", "ha"], ["ha", "zo", "hi"], ["h$x"], [7]):
        with pytest.raises(ValueError):
            trie.check(bad)
    assert trie.check(["ha", "z$"]) == ["ha", "z$"]
    trie.tally([["ha", "z$"], ["ha", "z$"], ["hi"]])
    assert trie.words == {"z": 2} and trie.frontier == ["ha"]


def test_privacy_holds_in_triehh_regime_only():
    spec = DiscoverySpec(min_devices=10, max_word_length=9, votes_per_device=1)
    p = privacy(spec, population=10_000, devices_per_level=500)       # γθ = 0.5
    assert p["epsilon"] == pytest.approx(10 * 0.6931, rel=1e-3)
    assert p["delta"] == pytest.approx(8 / (7 * 3628800))
    assert privacy(spec, 10_000, 1_000)["epsilon"] is None             # γθ = 1: no DP
    assert privacy(DiscoverySpec(min_devices=10, votes_per_device=5), 10_000, 500)["epsilon"] is None
    with pytest.raises(ValueError):
        DiscoverySpec(min_devices=1).validate()
